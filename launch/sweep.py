"""A grid of dpvl runs, one workdir per point, run one after another.

  python launch/sweep.py --config=configs/dpcap_tiny.py \\
      --sweep=privacy.target_epsilon=1,2,4,8 --sweep=optimizer.learning_rate=1e-3,2e-3 \\
      --workdir_root=runs/sweep [--dry-run] [-- extra dpvl.main flags for every run]

The runs are the Cartesian product of the --sweep lists, in the order given (the last --sweep
varies fastest). Each run's workdir is named from its values, e.g.
`runs/sweep/target_epsilon=1,learning_rate=0.001`, so re-running the same sweep resumes each
run where it stopped; runs whose privacy.json says "completed" or "budget_exhausted" are
skipped. A failed run does not stop the sweep; the exit status is 1 if any failed, 130 if the
sweep was interrupted (Ctrl-C reaches the running run too, which stops with a checkpoint).

Every run spends its own privacy budget on the same data: the search over the grid is not
accounted (docs/privacy.md, "What is not private").

This script uses the standard library only (it does not import jax or dpvl).
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

FINISHED = ("completed", "budget_exhausted")
_FIELD = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")  # '=' and ',' separate the fields of a name


class SweepError(ValueError):
  """A bad command line, said in one sentence."""


def parse_sweep(spec: str) -> tuple[str, list[str]]:
  """`privacy.target_epsilon=1,2,4` -> ("privacy.target_epsilon", ["1", "2", "4"])."""
  field, sep, values = spec.partition("=")
  field = field.strip()
  if not sep:
    raise SweepError(f"--sweep={spec}: expected FIELD=VALUE,VALUE,... "
                     "(e.g. --sweep=privacy.target_epsilon=1,2,4).")
  if not _FIELD.fullmatch(field):
    raise SweepError(f"--sweep={spec}: {field!r} is not a dotted config field name.")
  values = [v.strip() for v in values.split(",")]
  if values == [""]:
    raise SweepError(f"--sweep={spec}: the value list is empty.")
  if "" in values:
    raise SweepError(f"--sweep={spec}: a value is empty.")
  seen = {}
  for value in values:
    key = value_name(value)
    if key in seen:
      raise SweepError(f"--sweep={spec}: {seen[key]} and {value} are the same value.")
    seen[key] = value
  return field, values


def value_name(value: str) -> str:
  """How a value reads in a workdir name: numbers normalised (1e-3 -> 0.001, 08 -> 8)."""
  try:
    return str(int(value))
  except ValueError:
    pass
  try:
    number = float(value)
  except ValueError:
    return value
  return repr(number) if math.isfinite(number) else value


def _safe(text: str) -> str:
  """`text` with only filesystem-safe characters; a replaced one adds a hash of the original,
  so that two values never share a name."""
  safe = _UNSAFE.sub("_", text)
  if safe != text or len(safe) > 80:
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    safe = f"{safe[:60]}-{digest}"
  return safe


def labels(fields: list[str]) -> dict[str, str]:
  """The name of each field in workdir names: its leaf, or its full dotted name where two
  fields share a leaf."""
  leaves = [f.rsplit(".", 1)[-1] for f in fields]
  return {f: leaf if leaves.count(leaf) == 1 else f for f, leaf in zip(fields, leaves)}


def expand(sweeps: list[tuple[str, list[str]]]) -> list[tuple[str, dict[str, str]]]:
  """The grid of the sweeps: (workdir name, {field: value}) per run, the last sweep varying
  fastest."""
  fields = [field for field, _ in sweeps]
  if len(set(fields)) < len(fields):
    duplicate = next(f for f in fields if fields.count(f) > 1)
    raise SweepError(f"--sweep={duplicate}=... is given twice; list all its values in one.")
  label = labels(fields)
  runs = []
  for values in itertools.product(*(values for _, values in sweeps)):
    point = dict(zip(fields, values))
    name = ",".join(f"{label[f]}={_safe(value_name(v))}" for f, v in point.items())
    runs.append((name, point))
  return runs


def command(python: str, config: str, workdir: str, point: dict[str, str],
            extra: list[str]) -> list[str]:
  """The dpvl.main command line of one run."""
  overrides = [f"--config.{field}={value}" for field, value in point.items()]
  return [python, "-m", "dpvl.main", f"--config={config}", f"--workdir={workdir}", *overrides,
          *extra]


def check_extra(extra: list[str], fields: list[str]):
  """Refuses flags after `--` that the sweep sets itself."""
  for flag in extra:
    name = flag.split("=", 1)[0]
    if name in ("--workdir", "--config"):
      raise SweepError(f"{name} is set by the sweep (--workdir_root, --config); do not pass it "
                       "after --.")
    if name.startswith("--config.") and name[len("--config."):] in fields:
      raise SweepError(f"{name} is swept; do not pass it after --.")


def ledger(workdir: str) -> dict:
  """The workdir's privacy.json ({} if there is none or it cannot be read)."""
  try:
    with open(os.path.join(workdir, "privacy.json")) as f:
      entry = json.load(f)
  except (OSError, ValueError):
    return {}
  return entry if isinstance(entry, dict) else {}


def epsilon_text(entry: dict) -> str:
  epsilon = entry.get("epsilon_spent")
  if isinstance(epsilon, (int, float)):
    return f"{epsilon:.4g}"
  return "n/a" if entry else "-"


def execute(cmd: list[str]) -> int:
  """Runs one command with our stdout and stderr; returns its exit status."""
  process = subprocess.Popen(cmd)
  try:
    return process.wait()
  except KeyboardInterrupt:
    # The run got the same SIGINT: wait while it stops at the end of its step with a
    # checkpoint (a second Ctrl-C aborts both at once).
    process.wait()
    raise


def _python() -> str:
  """sys.executable, printed as `python` where that is what `python` runs."""
  found = shutil.which("python")
  if found and os.path.abspath(found) == os.path.abspath(sys.executable):
    return "python"
  return sys.executable


def _note(text: str):
  print(text, file=sys.stderr, flush=True)


def summary(rows: list[tuple[str, str, str, str]]) -> str:
  """The table printed at the end: workdir, result, status, epsilon_spent."""
  rows = [("workdir", "result", "status", "epsilon_spent"), *rows]
  widths = [max(len(row[i]) for row in rows) for i in range(3)]
  return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3]
                   for row in rows)


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise SweepError(message)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """(the sweep's own flags, the flags after `--`)."""
  extra = []
  if "--" in argv:
    at = argv.index("--")
    argv, extra = argv[:at], argv[at + 1:]
  parser = _Parser(prog="launch/sweep.py", description=__doc__.split("\n", 1)[0])
  parser.add_argument("--config", required=True, help="dpvl config file.")
  parser.add_argument("--sweep", action="append", required=True, metavar="FIELD=V1,V2,...",
                      help="A config field and its values; repeat for a grid.")
  parser.add_argument("--workdir_root", required=True, help="Parent of the runs' workdirs.")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="Print the commands; run nothing.")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.config) and not os.path.isfile(args.config.split(":", 1)[0]):
    raise SweepError(f"--config={args.config}: no such file.")
  return args, extra


def main(argv: list[str], run=execute) -> int:
  """The sweep; `run(command) -> exit status` runs one command. Returns the exit status."""
  try:
    args, extra = parse_args(argv)
    sweeps = [parse_sweep(spec) for spec in args.sweep]
    runs = expand(sweeps)
    check_extra(extra, [field for field, _ in sweeps])
  except SweepError as e:
    _note(f"error: {e}")
    return 2
  _note(f"note: each of these {len(runs)} runs spends its own privacy budget on the same data; "
        "choosing among them is not accounted (docs/privacy.md, 'What is not private').")
  rows, failed, interrupted = [], 0, False
  for name, point in runs:
    workdir = os.path.join(args.workdir_root, name)
    entry = ledger(workdir)
    if interrupted:
      rows.append((workdir, "not run", entry.get("status", "-"), epsilon_text(entry)))
      continue
    if entry.get("status") in FINISHED:
      _note(f"skip: {workdir} ({entry['status']}, epsilon {epsilon_text(entry)})")
      rows.append((workdir, "skipped", entry["status"], epsilon_text(entry)))
      continue
    cmd = command(sys.executable, args.config, workdir, point, extra)
    print(shlex.join([_python(), *cmd[1:]]), flush=True)
    if args.dry_run:
      continue
    try:
      status = run(cmd)
    except KeyboardInterrupt:
      status = 130
    entry = ledger(workdir)
    # Ctrl-C (exit status 130), or a SIGTERM the run obeyed (exit 0, ledger "interrupted"):
    # the sweep stops too.
    if status == 130 or (status == 0 and entry.get("status") == "interrupted"):
      result, interrupted = "interrupted", True
      _note(f"interrupted: {workdir} (exit status {status}, stopped with a checkpoint)")
    elif status == 0:
      result = "ok"
    else:
      result = f"failed ({status})"
      failed += 1
      _note(f"failed: {workdir} (exit status {status})")
    rows.append((workdir, result, entry.get("status", "-"), epsilon_text(entry)))
  if args.dry_run:
    return 0
  _note(summary(rows))
  if interrupted:
    _note("sweep interrupted: re-run the same command to resume it.")
    return 130
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
