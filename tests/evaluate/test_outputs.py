"""Evaluation outputs: numbers for metrics.jsonl, everything else to WORKDIR/evals/."""

import json
import os

import numpy as np

from dpvl import evaluate
from dpvl import metrics as metrics_lib


def test_split_outputs_keeps_numbers_as_python_scalars():
  row = {"step": 2, "standalone": True, "a/top1": np.float32(0.5), "a/n": np.int64(3),
         "a/zero_d": np.array(1.5), "s/captions": [{"caption": "a red circle"}],
         "s/text": "hi", "s/name": np.str_("x"), "s/array": np.arange(3), "s/table": {"a": 1}}
  scalars, artifacts = evaluate.split_outputs(row)
  assert scalars == {"step": 2, "standalone": True, "a/top1": 0.5, "a/n": 3, "a/zero_d": 1.5}
  assert all(type(v) in (int, float, bool) for v in scalars.values())
  assert list(artifacts) == ["s/captions", "s/text", "s/name", "s/array", "s/table"]
  json.dumps(scalars)  # as MetricsWriter writes it


def test_write_artifacts_adds_to_the_steps_file(tmp_path):
  workdir = str(tmp_path)
  assert evaluate.write_artifacts(workdir, 5, {}) is None
  assert not os.path.exists(tmp_path / "evals")
  path = evaluate.write_artifacts(workdir, 5, {"s/captions": ["a"], "s/ids": np.arange(2)})
  assert path == os.path.join(workdir, "evals", "step_5.json")
  evaluate.write_artifacts(workdir, 5, {"s/captions": ["b"], "t/table": {"k": np.float32(1)}})
  evaluate.write_artifacts(workdir, 6, {"s/captions": ["c"]})
  with open(path) as f:
    assert json.load(f) == {"step": 5, "s/captions": ["b"], "s/ids": [0, 1],
                            "t/table": {"k": 1.0}}
  assert sorted(os.listdir(tmp_path / "evals")) == ["step_5.json", "step_6.json"]


def test_a_row_with_artifacts_goes_to_both_places(tmp_path):
  # What a training or standalone evaluation does with a row of numbers and captions.
  row = dict(step=3, **{"p/top1": 0.25, "s/captions": [{"caption": "a", "reference": None}]})
  scalars, artifacts = evaluate.split_outputs(row)
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  writer.write(scalars)
  writer.close()
  evaluate.write_artifacts(str(tmp_path), row["step"], artifacts)
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line) for line in f] == [{"step": 3, "p/top1": 0.25}]
  with open(tmp_path / "evals" / "step_3.json") as f:
    assert json.load(f)["s/captions"] == [{"caption": "a", "reference": None}]
