"""Start-up of multi-process runs and what the processes share (the 2-process run itself is in
test_multiprocess.py)."""

import collections

import jax
import pytest

from dpvl import train
from dpvl.data import errors
from dpvl.parallel import hosts


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),  # one task: a single process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu"),
    ({"DPVL_DISTRIBUTED": "1"}, "env"),
])
def test_the_cluster_is_detected_from_the_environment(env, expected):
  assert hosts.cluster(env) == expected


def test_initialize_needs_all_three_flags_or_none(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  with pytest.raises(ValueError, match="go together"):
    hosts.initialize("localhost:1234", 2, None)
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, 2\)"):
    hosts.initialize("localhost:1234", 2, 2)
  assert hosts.initialize(env={}) is None and not calls  # a single process: nothing to join
  assert hosts.initialize("localhost:1234", 1, 0) is None and not calls
  assert hosts.initialize("localhost:1234", 2, 1) == "flags"
  assert calls == [(("localhost:1234", 2, 1), {})]
  assert hosts.initialize(env={"OMPI_COMM_WORLD_SIZE": "8"}) == "openmpi"
  assert calls[-1] == ((), {})  # JAX reads the cluster's environment itself


@pytest.mark.parametrize("message", [None, "in use by pid 12", {"secrets": "ab" * 32,
                                                                 "header": {"run_id": "x"}}])
def test_messages_survive_the_byte_encoding(message):
  assert hosts._decode(hosts._encode(message)) == message  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="exceeds"):
    hosts._encode("x" * hosts.JSON_BYTES)  # pylint: disable=protected-access


def test_one_process_shares_with_itself():
  assert hosts.is_primary()
  assert hosts.broadcast_json({"a": 1}) == {"a": 1}
  assert hosts.gather_json([1, "b"]) == [[1, "b"]]
  tree = dict(w=jax.numpy.ones(3))
  assert hosts.whole(tree) is tree
  hosts.sync("nothing to wait for")
  skipped = collections.Counter(corrupt_image=2)
  assert train._agree_step(True, skipped) == (True, skipped)  # pylint: disable=protected-access


def test_gathered_skips_and_stops_are_combined(monkeypatch):
  views = [dict(stop=False, skipped={"corrupt_image": 1}),
           dict(stop=True, skipped={"corrupt_image": 2, "empty_caption": 1})]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(hosts, "gather_json", lambda mine, size: views)
  stop, skipped = train._agree_step(False, collections.Counter())  # pylint: disable=protected-access
  assert stop and skipped == collections.Counter(corrupt_image=3, empty_caption=1)


def test_a_step_message_holds_every_skip_reason():
  reasons = [v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)]
  assert len(reasons) >= 8
  message = dict(stop=True, skipped={reason: 10**12 for reason in reasons})
  buffer = hosts._encode(message, train.STEP_MESSAGE_BYTES)  # pylint: disable=protected-access
  assert buffer.size == train.STEP_MESSAGE_BYTES
  assert hosts._decode(buffer) == message  # pylint: disable=protected-access
