"""`--mode=compile`: the full private step compiled on abstract inputs, without data."""

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import pytest

from dpvl import dry_run
from dpvl import objectives
from tests import helpers


def test_the_private_step_compiles_without_data_and_reports_its_cost(dpcap_config):
  config = dpcap_config()
  config.batch.microbatch_size = 128  # one micro-batch: one compilation
  report = dry_run.compile_step(config)
  params = jax.jit(objectives.build_objective(config).init)(jax.random.key(0))
  assert report["parameters"] == sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  batch = report["batch"]
  assert batch["num_microbatches"] * batch["microbatch_size"] == batch["capacity"] >= 32
  assert batch["num_microbatches"] == 1
  per_microbatch = report["flops_per_microbatch_per_device"]
  assert report["flops_per_step_per_device"] == per_microbatch * batch["num_microbatches"]
  assert per_microbatch > 6 * report["parameters"] * batch["microbatch_size"]  # one device
  memory = report["bytes_per_device"]
  assert memory["arguments"] >= 4 * 3 * report["parameters"]  # params + Adam's two moments
  assert memory["total"] == (memory["arguments"] + memory["outputs"] + memory["temporaries"]
                             - memory["aliased"])
  assert report["mesh"]["shape"] == {"data": len(jax.devices()), "fsdp": 1, "model": 1}
  json.dumps(report)  # printed as one JSON object


def test_xla_counts_a_loop_body_once_so_the_step_is_scaled_by_hand():
  """Why `flops_per_step_per_device` is a one-micro-batch step's FLOPs times the micro-batches:
  XLA's cost analysis of a scan over 8 micro-batches counts its body once."""
  x = jax.ShapeDtypeStruct((64, 64), jnp.float32)

  def scanned(n):
    body = lambda c, _: (c @ c, None)
    return jax.jit(lambda c: jax.lax.scan(body, c, None, length=n)[0]).lower(x).compile()

  assert 0 < dry_run.xla_flops(scanned(8)) < 1.01 * dry_run.xla_flops(scanned(1))


# --topology: the devices of a TPU slice, compiled for from this host (libtpu needed).
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu: pip install "dpvl[tpu]"')


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed")
def test_a_topology_without_libtpu_is_one_sentence_saying_how_to_install_it():
  with helpers.raises_config_error(r'^--topology=v5e-256 needs libtpu .*: '
                                   r'pip install "dpvl\[tpu\]"\.$') as error:
    dry_run.topology_devices("v5e-256")
  assert "\n" not in str(error.value)


MEGACORE = dict(chip_config_name="megacore")


@pytest.mark.parametrize("name, topology, kwargs", [
    ("v5e-256", "v5e:16x16", {}),  # v5e and v6e count chips
    ("v5litepod-8", "v5e:2x4", {}),
    ("v6e-128", "v6e:8x16", {}),
    ("v4-128", "v4:4x4x4", MEGACORE),  # v4 and v5p count TensorCores, two per chip
    ("v4-8", "v4:2x2x1", MEGACORE),
    ("v5p-256", "v5p:4x4x8", MEGACORE),
    ("v5e-1", "v5e:1x1", dict(chips_per_host_bounds=(1, 1, 1))),  # less than a 2x2 host
    ("v5e:16x16", "v5e:16x16", {}),  # libtpu's own names pass as they are
    ("v4:2x2x2", "v4:2x2x2", MEGACORE),
])
def test_a_slice_name_is_the_chip_grid_libtpu_knows(name, topology, kwargs):
  assert dry_run.topology_spec(name) == (topology, kwargs)


@pytest.mark.parametrize("name, message", [
    ("v9-8", "unknown TPU generation 'v9'"),
    ("v5p-384", "name its chip grid instead, e.g. v5p:4x4x4"),
    ("v4-3", "name its chip grid instead"),
])
def test_a_slice_name_that_is_not_one_is_a_config_error(name, message):
  with helpers.raises_config_error(message):
    dry_run.topology_devices(name)


def test_a_tpu_device_s_memory_is_its_share_of_its_chip_s_hbm():
  gib = 2**30
  assert dry_run.tpu_memory("TPU v5 lite", 1) == 16 * gib
  assert dry_run.tpu_memory("TPU v6 lite", 1) == 32 * gib
  assert dry_run.tpu_memory("TPU v4", 2) == 32 * gib  # megacore: the whole chip
  assert dry_run.tpu_memory("TPU v4", 1) == 16 * gib  # one TensorCore of two
  assert dry_run.tpu_memory("TPU v5", 2) == 95 * gib  # v5p
  assert dry_run.tpu_memory("cpu", 1) is None
  compile_only = helpers.namespace(dict(device_kind="TPU v4", num_cores=2,
                                        memory_stats=lambda: 1 / 0))  # raises, as they do
  assert dry_run.device_memory(compile_only) == (32 * gib, "nominal HBM of a TPU v4 chip")
  local = helpers.namespace(dict(device_kind="TPU v4", num_cores=2,
                                 memory_stats=lambda: dict(bytes_limit=123)))
  assert dry_run.device_memory(local) == (123, "memory_stats")
  cpu = helpers.namespace(dict(device_kind="cpu", memory_stats=lambda: None))
  assert dry_run.device_memory(cpu) == (None, None)


@needs_libtpu
def test_topology_devices_report_the_device_kinds_of_the_memory_table(monkeypatch):
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another compile may hold libtpu
  for name, count, kind, gib in [("v5e-256", 256, "TPU v5 lite", 16), ("v4-128", 64, "TPU v4", 32),
                                 ("v5p-8", 4, "TPU v5", 95), ("v6e-16", 16, "TPU v6 lite", 32)]:
    devices = dry_run.topology_devices(name)
    assert len(devices) == count and devices[0].device_kind == kind
    assert dry_run.device_memory(devices[0])[0] == gib * 2**30


@needs_libtpu
def test_the_private_step_compiles_for_a_tpu_slice_from_this_host(dpcap_config, monkeypatch):
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another compile may hold libtpu
  config = dpcap_config()
  config.batch.microbatch_size = 128  # one micro-batch: one compilation
  report = dry_run.compile_step(config, dry_run.topology_devices("v5e-4"))
  assert report["mesh"]["platform"] == "tpu" and report["mesh"]["device_kind"] == "TPU v5 lite"
  assert math.prod(report["mesh"]["shape"].values()) == 4
  assert report["device_memory_bytes"] == 16 * 2**30 and report["fits"]
  assert report["flops_per_step_per_device"] > 6 * report["parameters"] * 128
  json.dumps(report)


@needs_libtpu
def test_a_step_the_tpu_compiler_refuses_for_memory_is_reported_as_not_fitting(
    dpcap_config, monkeypatch):
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  config = dpcap_config()
  config.data.size = 2_000_000
  config.batch.expected_size = config.batch.microbatch_size = 2**18  # ~100 GiB of activations
  report = dry_run.compile_step(config, dry_run.topology_devices("v5e-1"))
  assert report["fits"] is False and report["bytes_per_device"] is None
  assert report["out_of_memory"].startswith("RESOURCE_EXHAUSTED")
  json.dumps(report)
