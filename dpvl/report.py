"""Plots and a summary of dpvl runs, read from their workdirs' files alone.

  python -m dpvl.report WORKDIR [WORKDIR ...] [--out=DIR]

For each run: the loss, the epsilon spent and every evaluation metric against the step (PNG);
for several runs (a sweep), each final evaluation metric against the final epsilon, one point
per run; and `summary.md`, a table of the runs (objective, epsilon spent, delta, sigma, steps,
status, final evaluations, audit). `--out` defaults to `WORKDIR/report` for one workdir and is
needed for several; with several, each run's plots go in a folder named after its workdir.

Only config.json, privacy.json and metrics.jsonl are read (no jax, no checkpoint): a run in
progress reports too (an incomplete last line of metrics.jsonl is left out). A path that is not
a readable dpvl run is named with the reason in one line and left out; the exit status is 2 if
no run could be reported.
"""

import argparse
import dataclasses
import json
import math
import numbers
import os
import re
import sys

from matplotlib.figure import Figure  # drawn by the Agg canvas: no display is ever opened

# metrics.jsonl keys that are bookkeeping, not a metric of an evaluation row.
_NOT_METRICS = ("step", "eval_seconds", "standalone", "replayed")
# Evaluator outputs that are not scores: records the evaluator could not read (a note when not
# zero), and the chance level (a reference line in the plot of the evaluator's top-1).
SKIPPED, CHANCE = "skipped", "chance"
# Keys that make a row a training row (the loss of the private data, or a DP estimate of it).
_TRAINING_KEYS = ("loss", "dp_loss", "private_data_diagnostics")
DP_LOSS_LABEL = "DP loss estimate"
PRIVATE_LOSS_LABEL = "loss (private data, no noise)"


class NotARun(Exception):
  """A path that cannot be reported as a dpvl run, said in one sentence."""


@dataclasses.dataclass
class Run:
  """What the report reads of one workdir.

  Attributes:
    workdir: the path given.
    name: the workdir's name (made unique among the runs reported).
    config: config.json.
    ledger: privacy.json (`dpvl.privacy.ledger.Ledger.entry`).
    training: training rows, the last row of each step, by step.
    evals: evaluation metrics by step ({step: {metric: value}}, the latest value of each).
    audit: the last audit row's `audit` dict (with its `step`), or None.
    notes: what a reader should know (an incomplete last line, a run without metrics yet).
  """

  workdir: str
  name: str
  config: dict
  ledger: dict
  training: list[dict]
  evals: dict[int, dict[str, float]]
  audit: dict | None
  notes: list[str]

  @property
  def epsilon(self) -> float | None:
    """The epsilon spent (privacy.json; inf where it writes none for a private run); None for
    a non-private run."""
    if not self.ledger.get("private", True):
      return None
    spent = _number(self.ledger.get("epsilon_spent", self.ledger.get("epsilon")))
    return math.inf if spent is None else spent

  @property
  def simulation(self) -> dict | None:
    """A TAN simulation's reference run (privacy.json's `simulation`); None for a real run."""
    return self.ledger.get("simulation") or None

  @property
  def sweep_epsilon(self) -> float | None:
    """Where the run sits on an epsilon axis: its epsilon spent, or for a TAN simulation the
    reference run's epsilon (which the simulation itself does not have)."""
    if self.simulation:
      return _number(self.simulation.get("reference_epsilon"))
    return self.epsilon

  def final_evals(self, scores_only: bool = True) -> dict[str, tuple[int, float]]:
    """{metric: (step, value)}: each metric's value at the last step it was evaluated; only
    the scores (not `SKIPPED` or `CHANCE`) unless `scores_only` is False."""
    return final_values(self.evals, scores_only)


def _number(value) -> float | None:
  """`value` as a float if it is a finite or infinite real (not a bool), else None."""
  if isinstance(value, numbers.Real) and not isinstance(value, bool):
    return float(value)
  return None


def final_values(evals: dict[int, dict[str, float]],
                 scores_only: bool = True) -> dict[str, tuple[int, float]]:
  """{metric: (step, value)} of evaluations by step: each metric at the last step it has."""
  final = {}
  for step in sorted(evals):
    for metric, value in evals[step].items():
      if not scores_only or is_score(metric):
        final[metric] = (step, value)
  return final


def is_score(metric: str) -> bool:
  """Whether an evaluation metric is a score to plot (not a count of skipped records or a
  chance level).

  >>> is_score("probe/top1"), is_score("probe/skipped"), is_score("zero_shot/chance")
  (True, False, False)
  """
  return metric.rsplit("/", 1)[-1] not in (SKIPPED, CHANCE)


def _read_json(workdir: str, name: str) -> dict:
  path = os.path.join(workdir, name)
  if not os.path.isfile(path):
    raise NotARun(f"no {name}")
  try:
    with open(path) as f:
      tree = json.load(f)
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise NotARun(f"{name} cannot be read ({type(e).__name__}: {e})") from None
  if not isinstance(tree, dict):
    raise NotARun(f"{name} is not a JSON object")
  return tree


def read_rows(path: str) -> tuple[list[dict], bool]:
  """The rows of a metrics.jsonl, and whether its last line was incomplete (left out).

  Args:
    path: the file.

  Returns:
    (rows in file order, incomplete): a last line without its newline that is not JSON is a
    row still being written by a running run.

  Raises:
    NotARun: for any other line that is not a JSON object with a numeric `step`.
  """
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise NotARun(f"metrics.jsonl cannot be read ({type(e).__name__}: {e})") from None
  lines = text.split("\n")
  rows, incomplete = [], False
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError:
      if number == len(lines):  # no newline after it: being written
        incomplete = True
        continue
      raise NotARun(f"metrics.jsonl line {number} is not JSON: {line[:40]!r}") from None
    if not isinstance(row, dict) or _number(row.get("step")) is None:
      raise NotARun(f"metrics.jsonl line {number} is not a row with a step: {line[:40]!r}")
    rows.append(row)
  return rows, incomplete


def loss_of(row: dict) -> tuple[float | None, str | None]:
  """(value, label) of a training row's loss: its DP estimate `dp_loss` where the row has one,
  else the loss on the private data (top-level `loss`, or `private_data_diagnostics.loss`).

  >>> loss_of({"step": 2, "loss": 3.5})
  (3.5, 'loss (private data, no noise)')
  >>> loss_of({"step": 2, "dp_loss": 3.4, "private_data_diagnostics": {"loss": 3.5}})
  (3.4, 'DP loss estimate')
  """
  if _number(row.get("dp_loss")) is not None:
    return float(row["dp_loss"]), DP_LOSS_LABEL
  nested = row.get("private_data_diagnostics")
  for value in (nested.get("loss") if isinstance(nested, dict) else None, row.get("loss")):
    if _number(value) is not None:
      return float(value), PRIVATE_LOSS_LABEL
  return None, None


def loss_series(training: list[dict]) -> tuple[str | None, list[int], list[float]]:
  """(label, steps, values) of the loss to plot: the DP estimate if any row has one (then only
  rows with it), else the loss on the private data."""
  losses = [(row["step"], *loss_of(row)) for row in training]
  label = DP_LOSS_LABEL if any(l == DP_LOSS_LABEL for _, _, l in losses) else PRIVATE_LOSS_LABEL
  kept = [(s, v) for s, v, l in losses if l == label]
  return (label if kept else None), [s for s, _ in kept], [v for _, v in kept]


def eval_metrics(row: dict) -> dict[str, float]:
  """The numeric metrics of an evaluation row (not `step`, `eval_seconds` or flags)."""
  return {k: float(v) for k, v in row.items()
          if k not in _NOT_METRICS and k not in _TRAINING_KEYS and k != "audit"
          and _number(v) is not None}


def split_rows(rows: list[dict]) -> tuple[list[dict], dict[int, dict], dict | None]:
  """(training rows, evals by step, last audit) of metrics.jsonl's rows.

  A step logged again after a resume (`replayed`) keeps its last row; an evaluation metric
  keeps its last value at each step.
  """
  training, evals, audit = {}, {}, None
  for row in rows:
    step = int(row["step"])
    if isinstance(row.get("audit"), dict):
      audit = dict(row["audit"], step=step)
    elif any(k in row for k in _TRAINING_KEYS) or "epsilon" in row:
      training[step] = row
    elif metrics := eval_metrics(row):
      evals.setdefault(step, {}).update(metrics)
  return [training[s] for s in sorted(training)], dict(sorted(evals.items())), audit


def load_run(workdir: str, name: str | None = None) -> Run:
  """Reads a workdir.

  Args:
    workdir: the run directory.
    name: the run's name in the report (default: the workdir's name).

  Returns:
    The run. NotARun, naming what is missing or unreadable, for a path that is not a
    directory or lacks a readable config.json and privacy.json (a run that has logged nothing
    yet has no metrics.jsonl: it reports with a note), or whose metrics.jsonl is corrupt.
  """
  if not os.path.isdir(workdir):
    raise NotARun("not a directory" if os.path.exists(workdir) else "no such directory")
  present = [f for f in ("config.json", "privacy.json", "metrics.jsonl")
             if os.path.exists(os.path.join(workdir, f))]
  if not present:
    raise NotARun("not a dpvl run: no config.json, privacy.json or metrics.jsonl")
  ledger = _read_json(workdir, "privacy.json")
  if "status" not in ledger or "steps_done" not in ledger:
    raise NotARun("privacy.json is not a dpvl ledger (no status or steps_done)")
  config = _read_json(workdir, "config.json")
  notes = []
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  rows = []
  if os.path.exists(metrics_path):
    rows, incomplete = read_rows(metrics_path)
    if incomplete:
      notes.append("the last line of metrics.jsonl is incomplete (still being written?); "
                   "left out")
  else:
    notes.append("no metrics.jsonl yet: nothing logged")
  training, evals, audit = split_rows(rows)
  if training and loss_series(training)[0] is None:
    notes.append("no loss logged (no `dp_loss`, and the private data diagnostics are off)")
  for metric, (step, value) in final_values(evals, scores_only=False).items():
    if metric.rsplit("/", 1)[-1] == SKIPPED and value:
      notes.append(f"{metric}: {value:g} evaluation records could not be read (step {step})")
  if ledger.get("status") == "running":
    notes.append(f"running: step {ledger.get('steps_done')} of {ledger.get('steps')} "
                 "when privacy.json was last written")
  name = name or os.path.basename(os.path.normpath(os.path.abspath(workdir)))
  return Run(workdir, name, config, ledger, training, evals, audit, notes)


# --- Plots ------------------------------------------------------------------------------------


def _slug(text: str) -> str:
  """`text` as a file name part: letters, digits and `._=,+-`; other characters become '_'."""
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text).strip("._") or "run"


def _figure(columns: int = 1, rows: int = 1):
  figure = Figure(figsize=(5.2 * columns, 3.6 * rows), layout="constrained")
  return figure, figure.subplots(rows, columns, squeeze=False).ravel()


def _marker(points: int) -> dict:
  """Markers on a line of few points; a plain line for a long run."""
  return dict(marker="o", markersize=3) if points <= 60 else {}


def _save(figure: Figure, path: str) -> str:
  figure.savefig(path, dpi=100)
  return path


def _title(run: Run, what: str) -> str:
  status = run.ledger.get("status")
  return f"{run.name}: {what}" + ("" if status == "completed" else f" ({status})")


def plot_loss(run: Run, path: str) -> str | None:
  """Loss against step (the DP estimate where the rows have one); None if nothing logged."""
  label, steps, values = loss_series(run.training)
  if not steps:
    return None
  figure, (ax,) = _figure()
  ax.plot(steps, values, label=label, **_marker(len(steps)))
  ax.set(xlabel="step", ylabel=label, title=_title(run, label))
  ax.grid(alpha=0.3)
  return _save(figure, path)


def plot_epsilon(run: Run, path: str) -> str | None:
  """Epsilon spent against step, with the target epsilon; None for a non-private run or one
  without training rows."""
  points = [(row["step"], _number(row.get("epsilon"))) for row in run.training]
  points = [(s, e) for s, e in points if e is not None and math.isfinite(e)]
  if not points:
    return None
  figure, (ax,) = _figure()
  ax.plot(*zip(*points), **_marker(len(points)),
          label=f"epsilon spent (delta={_fmt(run.ledger.get('delta'), '.3g')}, "
                f"{run.ledger.get('accountant', '?')})")
  target = _number(run.ledger.get("target_epsilon"))
  if target is not None:
    ax.axhline(target, color="tab:red", linestyle="--", linewidth=1,
               label=f"target epsilon {target:g}")
  ax.set(xlabel="step", ylabel="epsilon", title=_title(run, "epsilon spent"))
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  return _save(figure, path)


def _by_evaluator(metrics) -> dict[str, list[str]]:
  """Metric names grouped by evaluator (the part before '/'), in order."""
  groups = {}
  for metric in metrics:
    groups.setdefault(metric.split("/")[0] if "/" in metric else "eval", []).append(metric)
  return groups


def plot_evals(run: Run, out: str) -> list[str]:
  """One PNG per evaluator: each of its scores against step, in a grid (with the chance level
  on its top-1 where the evaluator reports one)."""
  names = list(dict.fromkeys(m for metrics in run.evals.values() for m in metrics))
  final = run.final_evals(scores_only=False)
  paths = []
  for evaluator, metrics in _by_evaluator(filter(is_score, names)).items():
    columns = min(3, len(metrics))
    figure, axes = _figure(columns, math.ceil(len(metrics) / columns))
    for ax, metric in zip(axes, metrics):
      steps = [s for s in run.evals if metric in run.evals[s]]
      ax.plot(steps, [run.evals[s][metric] for s in steps], **_marker(len(steps)))
      chance = final.get(f"{evaluator}/{CHANCE}")
      if chance is not None and metric.endswith("/top1"):
        ax.axhline(chance[1], color="tab:gray", linestyle="--", linewidth=1,
                   label=f"chance {chance[1]:.3g}")
        ax.legend(fontsize="small")
      ax.set(xlabel="step", ylabel=metric, title=metric)
      ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
      ax.set_visible(False)
    figure.suptitle(_title(run, f"evaluation {evaluator}"))
    paths.append(_save(figure, os.path.join(out, f"eval_{_slug(evaluator)}_vs_step.png")))
  return paths


def plot_sweep(runs: list[Run], out: str) -> list[str]:
  """One PNG per evaluation metric: its final value against the final epsilon, a labelled
  point per private run and a dashed line per non-private one."""
  finals = {run.name: run.final_evals() for run in runs}
  names = list(dict.fromkeys(m for f in finals.values() for m in f))
  paths = []
  for metric in names:
    figure, (ax,) = _figure()
    points = [(run.sweep_epsilon, finals[run.name][metric][1], run.name, bool(run.simulation))
              for run in runs if metric in finals[run.name] and run.sweep_epsilon is not None
              and math.isfinite(run.sweep_epsilon)]
    for epsilon, value, name, simulated in sorted(points):
      ax.plot([epsilon], [value], marker="x" if simulated else "o",
              color="tab:orange" if simulated else "tab:blue")
      ax.annotate(name + (" (TAN simulation)" if simulated else ""), (epsilon, value),
                  textcoords="offset points", xytext=(4, 4), fontsize="small")
    epsilons = [p[0] for p in points]
    if len(points) > 1 and min(epsilons) > 0 and max(epsilons) / min(epsilons) > 20:
      ax.set_xscale("log")
    ax.margins(x=0.2, y=0.15)  # room for the labels
    for run in runs:
      if metric in finals[run.name] and run.epsilon is None:
        ax.axhline(finals[run.name][metric][1], color="tab:gray", linestyle="--", linewidth=1,
                   label=f"{run.name} (non-private)")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize="small")
    ax.set(xlabel="epsilon spent", ylabel=f"final {metric}", title=f"final {metric} vs epsilon")
    ax.grid(alpha=0.3)
    paths.append(_save(figure, os.path.join(out, f"sweep_{_slug(metric)}_vs_epsilon.png")))
  return paths


def plot_run(run: Run, out: str) -> list[str]:
  """The run's plots in `out` (created): loss, epsilon and evaluations against step."""
  os.makedirs(out, exist_ok=True)
  paths = [plot_loss(run, os.path.join(out, "loss_vs_step.png")),
           plot_epsilon(run, os.path.join(out, "epsilon_vs_step.png")),
           *plot_evals(run, out)]
  return [p for p in paths if p is not None]


# --- Summary ----------------------------------------------------------------------------------


def _fmt(value, spec: str = ".4g") -> str:
  number = _number(value)
  if number is None:
    return "-" if value is None else str(value)
  return format(number, spec)


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def describe_config(run: Run) -> str:
  """Objective, mechanism, data and batch of a run, in a few words."""
  config, ledger = run.config, run.ledger
  data = config.get("data") if isinstance(config.get("data"), dict) else {}
  batch = ledger.get("expected_batch_size", (config.get("batch") or {}).get("expected_size"))
  parts = [str(config.get("objective", "?"))]
  if ledger.get("mechanism"):
    parts.append(str(ledger["mechanism"]))
  if data.get("source"):
    parts.append(f"{data['source']} N={ledger.get('dataset_size', data.get('size'))}")
  if batch is not None:
    parts.append(f"B={batch}")
  return ", ".join(parts)


def describe_audit(audit: dict | None) -> str:
  """An audit's empirical lower bound on epsilon, with what it was measured against."""
  if not audit:
    return "-"
  text = _fmt(audit.get("empirical_epsilon_lower_bound"), ".3g")
  details = []
  if audit.get("claimed_epsilon") is not None:
    details.append(f"claimed {_fmt(audit['claimed_epsilon'], '.3g')}")
  if audit.get("canaries") is not None:
    details.append(f"{audit['canaries']} {audit.get('canary_kind', '')} canaries".replace(
        "  ", " "))
  if audit.get("confidence") is not None:
    details.append(f"confidence {audit['confidence']}")
  if audit.get("detectable_epsilon") is not None:
    details.append(f"detectable {_fmt(audit['detectable_epsilon'], '.3g')}")
  return text + (f" ({'; '.join(details)})" if details else "")


def summary(runs: list[Run], plots: dict[str, list[str]], unusable: list[tuple[str, str]],
            out: str) -> str:
  """summary.md: a table of the runs, their plots, notes, and the paths left out."""
  metrics = list(dict.fromkeys(m for run in runs for m in run.final_evals()))
  audited = any(run.audit for run in runs)
  header = ["run", "objective / config", "epsilon spent", "target epsilon", "delta", "sigma",
            "steps done/planned", "status", *[f"final {m}" for m in metrics]]
  header += ["audit epsilon lower bound"] if audited else []
  lines = ["# dpvl report", "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for run in runs:
    ledger = run.ledger
    epsilon = ("non-private" if run.epsilon is None
               else f"{_fmt(run.epsilon)} ({ledger.get('accountant', '?')})")
    if run.simulation:
      epsilon = (f"none: TAN simulation of a run at epsilon {_fmt(run.sweep_epsilon)} "
                 f"(B={run.simulation.get('reference_batch_size')})")
    steps = f"{ledger.get('steps_done')}/{ledger.get('steps')}"
    if ledger.get("configured_steps") not in (None, ledger.get("steps")):
      steps += f" (of {ledger['configured_steps']} configured)"
    finals = run.final_evals()
    row = [run.name, describe_config(run), epsilon, _fmt(ledger.get("target_epsilon")),
           _fmt(ledger.get("delta"), ".3g"), _fmt(ledger.get("noise_multiplier")), steps,
           str(ledger.get("status"))]
    for metric in metrics:
      if metric not in finals:
        row.append("-")
        continue
      step, value = finals[metric]
      row.append(_fmt(value) + ("" if step == ledger.get("steps_done") else f" (step {step})"))
    row += [describe_audit(run.audit)] if audited else []
    lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
  lines.append("")
  lines.append(f"Epsilon and delta are privacy.json's (the ledger). Loss: "
               f"'{DP_LOSS_LABEL}' where the rows have `dp_loss`, else "
               f"'{PRIVATE_LOSS_LABEL}', a diagnostic that is not differentially private.")
  notes = [(run.name, note) for run in runs for note in run.notes]
  if notes:
    lines += ["", "## Notes", ""] + [f"- {name}: {note}" for name, note in notes]
  if unusable:
    lines += ["", "## Not reported", ""] + [f"- `{path}`: {why}" for path, why in unusable]
  lines += ["", "## Plots", ""]
  for name, paths in plots.items():
    lines.append(f"- {name}: " + (", ".join(
        f"[{os.path.basename(p)}]({os.path.relpath(p, out)})" for p in paths) or "none"))
  return "\n".join(lines) + "\n"


# --- Command line -----------------------------------------------------------------------------


def _unique_names(workdirs: list[str]) -> list[str]:
  """Each workdir's name; names shared by several get their parent's name in front."""
  names = [os.path.basename(os.path.normpath(os.path.abspath(w))) for w in workdirs]
  for i, workdir in enumerate(workdirs):
    if names.count(names[i]) > 1:
      parent = os.path.basename(os.path.dirname(os.path.normpath(os.path.abspath(workdir))))
      names[i] = f"{parent}_{names[i]}"
  seen = {}
  for i, name in enumerate(names):  # still shared: numbered
    seen[name] = seen.get(name, 0) + 1
    if names.count(name) > 1:
      names[i] = f"{name}_{seen[name]}"
  return names


def report(workdirs: list[str], out: str | None = None, log=print, warn=None) -> int:
  """Writes the plots and summary.md of `workdirs` into `out`.

  Args:
    workdirs: run directories.
    out: the output folder (default: `report/` in the single workdir; needed for several).
    log: where the paths written go, one line each.
    warn: where each path that is not a usable run goes, one line each (default: stderr).

  Returns:
    The exit status: 0 if at least one run was reported, 2 if none could be (or --out is
    missing for several workdirs).
  """
  warn = warn or (lambda line: print(line, file=sys.stderr))
  if out is None:
    if len(workdirs) != 1:
      warn("error: --out is needed to report several workdirs.")
      return 2
    out = os.path.join(workdirs[0], "report")
  runs, unusable = [], []
  for workdir, name in zip(workdirs, _unique_names(workdirs)):
    if os.path.abspath(workdir) == os.path.abspath(out):
      continue  # a glob over a sweep's folder that holds its report
    try:
      runs.append(load_run(workdir, name))
    except NotARun as e:
      unusable.append((workdir, str(e)))
      warn(f"{workdir}: not reported: {e}")
  if not runs:
    warn("error: no dpvl run to report.")
    return 2
  plots = {}
  for run in runs:
    plots[run.name] = plot_run(run, out if len(workdirs) == 1 else
                               os.path.join(out, _slug(run.name)))
  if len(runs) > 1:
    plots["sweep"] = plot_sweep(runs, out)
  path = os.path.join(out, "summary.md")
  with open(path, "w") as f:
    f.write(summary(runs, plots, unusable, out))
  for name, paths in plots.items():
    for p in paths:
      log(f"{name}: {p}")
  log(f"summary of {len(runs)} run{'s' * (len(runs) > 1)}: {path}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dpvl.report",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="dpvl run directories")
  parser.add_argument("--out", default=None,
                      help="output folder (default: WORKDIR/report; needed for several)")
  args = parser.parse_args(argv)
  return report(args.workdirs, args.out)


if __name__ == "__main__":
  sys.exit(main())
