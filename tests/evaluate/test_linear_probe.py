"""The linear probe: it learns separable features and is at chance on uninformative ones; as
an evaluator on a model's encoder, during training, standalone, in metrics.jsonl and
TensorBoard event files."""

import glob
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from configs import evals as eval_configs
from configs import vip_tiny
from dpvl import config as config_lib
from dpvl import evaluate
from dpvl import train
from dpvl.data import shape_scenes
from dpvl.evaluate import linear_probe
from dpvl.objectives import build_objective

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
# vip_tiny's model, trained for a few small steps; probes on a few hundred scenes.
SMALL = dict(steps=4, log_every=2, checkpoint_every=2, **{
    "data.size": 1_000, "batch.expected_size": 16, "batch.microbatch_size": 8,
    "privacy.noise_multiplier": 1.0, "privacy.target_epsilon": None, "privacy.seed": 3})
PROBE = {"train_size": 300, "test_size": 200, "steps": 200}


def _blobs(n, num_classes, dim, separation, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, dim)) * separation
  y = rng.integers(num_classes, size=n)
  return centres[y] + rng.normal(size=(n, dim)), y


def test_probe_separates_clusters_and_is_at_chance_on_noise():
  x, y = _blobs(1200, 5, 16, separation=3.0, seed=0)
  good = linear_probe.fit_linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], 5, steps=300)
  assert good.test_accuracy > 0.95
  noise = np.random.default_rng(1).normal(size=x.shape)
  bad = linear_probe.fit_linear_probe(noise[:1000], y[:1000], noise[1000:], y[1000:], 5,
                                      steps=300)
  assert bad.test_accuracy < 0.35  # chance is 0.2; 200 test points


def test_mean_pooled_blocks():
  blocks = [jnp.full((2, 3, 4), float(i)) for i in range(4)]
  out = linear_probe.mean_pooled_blocks(blocks, 2)
  assert out.shape == (2, 8)
  np.testing.assert_array_equal(out[0], [2.0] * 4 + [3.0] * 4)
  with pytest.raises(ValueError):
    linear_probe.mean_pooled_blocks(blocks, 5)


# -- the evaluator --------------------------------------------------------------------------


def _override(config, fields):
  for dotted, value in fields.items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def small_vip_config(**evals):
  c = _override(vip_tiny.get_config(), SMALL)
  c.evals = ml_collections.ConfigDict(evals)
  for name in c.evals:
    c.evals[name].update(PROBE)
    c.evals[name].data.size = PROBE["train_size"] + PROBE["test_size"]
  return c


def _events(workdir):
  """(tag, step, value) of every scalar in the run's TensorBoard event files."""
  out = []
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):  # TFRecord: length, crc, payload, crc
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
      i += 12 + n + 4
  return out


def test_probe_reads_the_encoder_of_the_objective():
  # Colour is a linear function of the pixels: even an untrained encoder's features carry it.
  # With the labels misaligned to the images the probe would be at chance (1/7).
  config = small_vip_config(colour=eval_configs.scene_probe("colour_label", blocks=0))
  objective = build_objective(config)
  (evaluator,) = evaluate.build_evaluators(config, objective)
  metrics = evaluator(jax.jit(objective.init)(jax.random.key(0)))
  assert set(metrics) == {"colour/top1", "colour/train_top1", "colour/skipped"}
  assert metrics["colour/top1"] > 0.5 and metrics["colour/skipped"] == 0


def test_probe_resizes_other_image_sizes_and_counts_bad_records():
  class Broken:
    """A labelled source of 64-pixel scenes with two bad records."""

    def __init__(self):
      self.scenes = shape_scenes.ShapeScenes(40, image_size=64, seed=5)

    def __len__(self):
      return len(self.scenes)

    def __getitem__(self, i):
      record = dict(self.scenes[i])
      if i == 3:
        del record["label"]
      if i == 7:
        record["image"] = record["image"][..., :2]
      return record

  images, labels, skipped = linear_probe.load_labelled(Broken(), 30, image_size=32)
  assert images.shape == (30, 32, 32, 3) and images.dtype == np.uint8  # normalised by chunks
  assert skipped == {"KeyError": 1, "ValueError": 1}
  assert labels[3] == Broken().scenes[4]["label"]  # record 3 was skipped, 4 took its place
  with pytest.raises(ValueError, match="38 usable records, 40 needed"):
    linear_probe.load_labelled(Broken(), 40, image_size=32)


@pytest.mark.parametrize("field, value, named", [
    ("type", "knn", "config.evals.probe.type"),
    ("blocks", 5, "config.evals.probe.blocks"),
    ("train_size", 0, "config.evals.probe.train_size"),
    ("data.source", "imagenet", "config.evals.probe.data"),
    ("data.size", 10, "config.evals.probe.data"),
])
def test_bad_eval_configs_name_the_field(field, value, named):
  config = small_vip_config(probe=eval_configs.scene_probe("label", blocks=1))
  _override(config.evals.probe, {field: value})
  with pytest.raises(config_lib.ConfigError, match=named.replace(".", r"\.")):
    evaluate.build_evaluators(config, build_objective(config))


def test_evals_run_before_during_and_after_training(tmp_path):
  config = small_vip_config(probe=eval_configs.scene_probe("label", blocks=2, every=2),
                            probe_last=eval_configs.scene_probe("label", blocks=0, every=0))
  lines = []
  train.run(config, str(tmp_path), log=lines.append)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = [r for r in rows if "probe/top1" in r or "probe_last/top1" in r]
  assert [(r["step"], "probe/top1" in r, "probe_last/top1" in r) for r in evals] == [
      (0, True, True), (2, True, False), (4, True, True)]
  assert all(0.0 <= r[k] <= 1.0 for r in evals for k in r if k.endswith("top1"))
  assert any(line.startswith("eval") and "probe/top1" in line for line in lines)
  # The same numbers, readable by TensorBoard.
  events = _events(str(tmp_path))
  for r in evals:
    assert ("probe/top1", r["step"], pytest.approx(r["probe/top1"])) in events
  assert {"private_data_diagnostics/loss", "epsilon", "probe_last/top1"} <= {
      tag for tag, _, _ in events}


def test_standalone_eval_on_a_checkpoint(tmp_path):
  config = small_vip_config(probe=eval_configs.scene_probe("label", blocks=2))
  config.evals = ml_collections.ConfigDict()
  train.run(config, str(tmp_path), log=lambda *_: None)
  overrides = [f"--config.evals.{name}.{k}={v}" for name in ("probe", "probe_last", "probe_shape")
               for k, v in dict(PROBE, **{"data.size": 500}).items()]
  out = subprocess.run(
      [sys.executable, "-m", "dpvl.main", "--config=configs/vip_tiny.py", "--mode=eval",
       f"--workdir={tmp_path}", "--step=2", *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["step"] == 2 and row["standalone"] and 0 <= row["probe/top1"] <= 1
  assert json.loads(open(tmp_path / "metrics.jsonl").readlines()[-1]) == row
  missing = subprocess.run(
      [sys.executable, "-m", "dpvl.main", "--config=configs/vip_tiny.py", "--mode=eval",
       f"--workdir={tmp_path}", "--step=3", *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert missing.returncode == 2 and "no checkpoint at step 3" in missing.stderr
  assert "Traceback" not in missing.stderr
