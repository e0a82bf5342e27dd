"""Warm-start provenance: only runs that touched no private data may seed a private run."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpvl import checkpoint as checkpoint_lib
from dpvl import config as config_lib
from dpvl.privacy import provenance

PARAMS = dict(dense=dict(kernel=jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
                         bias=jnp.ones((3,), jnp.float32)))
ABSTRACT = jax.eval_shape(lambda: PARAMS)


def _data(source="shape_scenes", **fields):
  return ml_collections.ConfigDict(dict(source=source, size=100, image_size=16, seed=0,
                                        **fields))


PRIVATE_DATA = _data("array_record", path="/data/private-ar")  # what "this run" trains on


def _stage1(tmp_path, name, data, private=False, steps=3, init_from=None, params=PARAMS,
            in_ledger=False, **ledger):
  """Writes a checkpoint in tmp_path/name as train.run would, the provenance in the meta or
  (`in_ledger`) in its ledger entry; `data` None: no provenance."""
  meta = dict(secret_seed=1, ledger=dict(private=private, steps_done=steps,
                                         epsilon_spent=1.5 if private else None, **ledger))
  where = meta["ledger"] if in_ledger else meta
  if data is not None:
    where["data"] = provenance.data_provenance(data)
  if init_from is not None:
    where["init_from"] = init_from
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / name / "checkpoints"))
  ckpt.save(steps, dict(params=params), meta)
  ckpt.close()
  return str(tmp_path / name)


def _load(workdir, data=PRIVATE_DATA, abstract=ABSTRACT):
  return provenance.load_warm_start(workdir, abstract, data)


def _refused(workdir, *fragments, data=PRIVATE_DATA, abstract=ABSTRACT):
  with pytest.raises(config_lib.ConfigError) as e:
    _load(workdir, data, abstract)
  message = str(e.value)
  assert f"config.init_from={workdir!r}" in message and message.count(". ") == 0
  for fragment in fragments:
    assert fragment in message
  return message


@pytest.mark.parametrize("source", ["shape_scenes", "procedural"])
def test_public_by_construction_stage1_is_accepted(tmp_path, source):
  workdir = _stage1(tmp_path, "stage1", _data(source))
  params, prov = _load(workdir)
  jax.tree.map(np.testing.assert_array_equal, params, PARAMS)
  assert prov == dict(path=os.path.abspath(workdir), steps=3, private=False, chain=[],
                      data=dict(source=source, size=100, seed=0, public="by_construction"))


def test_declared_public_stage1_is_accepted_and_recorded_as_declared(tmp_path):
  workdir = _stage1(tmp_path, "stage1", _data("webdataset", path="/data/cc12m/{00..09}.tar",
                                             public=True))
  _, prov = _load(workdir)
  assert prov["data"]["public"] == "declared"
  assert prov["data"]["path"] == "/data/cc12m/{00..09}.tar"


def test_non_private_run_on_a_private_source_is_refused(tmp_path):
  workdir = _stage1(tmp_path, "stage1", _data("webdataset", path="/data/laion/{00..09}.tar"))
  _refused(workdir, "data.source='webdataset'", "'/data/laion/{00..09}.tar'", "which is private",
           "config.data.public = True")


def test_dp_trained_stage1_is_refused(tmp_path):
  workdir = _stage1(tmp_path, "stage1", _data("shape_scenes"), private=True, steps=5)
  _refused(workdir, "trained with DP for 5 steps", "epsilon 1.5", "would forget")
  # Steps released, then re-run from an earlier checkpoint, still count.
  workdir = _stage1(tmp_path, "stage1b", _data(), private=True, steps=0, steps_accounted=4)
  _refused(workdir, "trained with DP for 4 steps")


def test_a_tan_simulation_never_seeds_a_run(tmp_path):
  # Even on public data: a simulation is a utility probe, never a model to build on.
  workdir = _stage1(tmp_path, "stage1", _data("shape_scenes"), private=True, steps=5,
                    simulation=dict(reference_batch_size=1_000))
  _refused(workdir, "TAN simulation", "any privacy guarantee", "real run")


def test_provenance_kept_in_the_ledger_entry_is_read(tmp_path):
  stage0 = _stage1(tmp_path, "stage0", _data("procedural"), in_ledger=True)
  _, link0 = _load(stage0)
  assert link0["data"]["source"] == "procedural"
  stage1 = _stage1(tmp_path, "stage1", _data(), in_ledger=True, init_from=dict(
      link0, data=provenance.data_provenance(_data("webdataset", path="/p.tar"))))
  _refused(stage1, "descends from", "which is private")


def test_private_run_not_yet_trained_still_needs_public_data(tmp_path):
  # A private run's step-0 checkpoint spent no budget, but names private data: refused.
  workdir = _stage1(tmp_path, "stage1", PRIVATE_DATA, private=True, steps=0)
  _refused(workdir, "data.source='array_record'", "which is private")


def test_stage1_without_data_provenance_is_refused(tmp_path):
  workdir = _stage1(tmp_path, "stage1", None)
  _refused(workdir, "records no data provenance", "retrain")


def test_missing_checkpoint_is_refused_without_creating_it(tmp_path):
  workdir = str(tmp_path / "typo")
  _refused(workdir, "holds no checkpoint")
  assert not os.path.exists(workdir)


def test_a_public_chain_is_kept_in_the_provenance(tmp_path):
  stage0 = _stage1(tmp_path, "stage0", _data("procedural"))
  _, link0 = _load(stage0)
  stage1 = _stage1(tmp_path, "stage1", _data("shape_scenes"), init_from=link0)
  _, link1 = _load(stage1)
  stage2 = _stage1(tmp_path, "stage2", _data("tfds", name="cifar10", public=True),
                   init_from=link1)
  _, prov = _load(stage2)
  assert prov["path"] == os.path.abspath(stage2) and prov["data"]["public"] == "declared"
  assert [link["path"] for link in prov["chain"]] == [os.path.abspath(stage1),
                                                       os.path.abspath(stage0)]
  assert [link["data"]["source"] for link in prov["chain"]] == ["shape_scenes", "procedural"]
  assert all("chain" not in link for link in prov["chain"])


@pytest.mark.parametrize("bad_link, fragment", [
    (dict(private=False, steps=4, data=provenance.data_provenance(
        _data("webdataset", path="/data/laion/{00..09}.tar"))), "which is private"),
    (dict(private=True, steps=4, data=provenance.data_provenance(_data())), "trained with DP"),
    (dict(data_source="shape_scenes", steps=4), "records no data provenance"),  # older code
])
def test_a_chain_with_a_non_public_link_is_refused(tmp_path, bad_link, fragment):
  ancestor = dict(bad_link, path="/runs/stage0")
  stage1 = _stage1(tmp_path, "stage1", _data("shape_scenes"),
                   init_from=dict(path="/runs/stage0b", steps=2, private=False,
                                  data=provenance.data_provenance(_data()),
                                  chain=[ancestor]))
  _refused(stage1, "descends from '/runs/stage0'", fragment)


def test_declaring_this_runs_private_data_public_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  this_run = _data("webdataset", path="/data/pairs/{000..099}.tar")
  # The same shards under another spelling: a sub-range, a relative path.
  workdir = _stage1(tmp_path, "stage1", _data("webdataset", path="/data/pairs/{000..009}.tar",
                                             public=True))
  _refused(workdir, "declared public", "the data this run trains on privately",
           "drop config.init_from", data=this_run)
  relative = _data("array_record", path="private-ar", public=True)
  workdir = _stage1(tmp_path, "stage1b", relative)
  _refused(workdir, "the data this run trains on privately",
           data=_data("array_record", path=str(tmp_path / "private-ar")))
  # Other shards of the same source are other data.
  workdir = _stage1(tmp_path, "stage1c", _data("webdataset", path="/data/pairs/{100..109}.tar",
                                              public=True))
  _load(workdir, data=this_run)


def test_parameters_of_another_model_are_refused(tmp_path):
  workdir = _stage1(tmp_path, "stage1", _data())
  other = jax.eval_shape(lambda: dict(dense=dict(kernel=jnp.zeros((2, 4)), bias=jnp.zeros(4))))
  _refused(workdir, "another model than config.model", abstract=other)


@pytest.mark.parametrize("data, expected", [
    (_data("shape_scenes", max_objects=2),
     dict(source="shape_scenes", size=100, seed=0, public="by_construction")),
    (_data("procedural", public=True),  # generated: declaring it changes nothing
     dict(source="procedural", size=100, seed=0, public="by_construction")),
    (_data("webdataset", path="gs://b/{0..3}.tar", index_cache=""),
     dict(source="webdataset", path="gs://b/{0..3}.tar", size=100, seed=0, public=None)),
    (_data("array_record", path="/d/ar/", crop="center", public=False),
     dict(source="array_record", path="/d/ar", size=100, seed=0, public=None)),
    (_data("tfds", name="cifar10", split="train", data_dir="gs://tfds", public=True),
     dict(source="tfds", name="cifar10", split="train", data_dir="gs://tfds", size=100, seed=0,
          public="declared")),
])
def test_data_provenance_of_each_source_kind(data, expected):
  assert provenance.data_provenance(data) == expected


def test_data_provenance_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  record = provenance.data_provenance(_data("webdataset", path="a/{0..1}.tar, s3://b/c.tar"))
  assert record["path"] == f"{tmp_path}/a/{{0..1}}.tar,s3://b/c.tar"


@pytest.mark.parametrize("a, b, same", [
    (dict(source="tfds", name="imagenet2012", split="train[:10%]"),
     dict(source="tfds", name="imagenet2012", split="train"), True),
    (dict(source="tfds", name="imagenet2012", split="validation"),
     dict(source="tfds", name="imagenet2012", split="train"), False),
    (dict(source="tfds", name="imagenet2012"), dict(source="tfds", name="cifar10"), False),
    (dict(source="webdataset", path="/x/{0..9}.tar"),
     dict(source="webdataset", path="/y/a.tar,/x/5.tar"), True),
    (dict(source="webdataset", path="/x/a.tar"), dict(source="array_record", path="/x/a.tar"),
     False),
    (dict(source="custom"), dict(source="custom"), True),  # nothing tells them apart
])
def test_same_data(a, b, same):
  assert provenance.same_data(a, b) is same
