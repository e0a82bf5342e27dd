"""The processes of a multi-host run: start-up, one writer, and agreement between them.

A pod slice or a multi-node GPU job runs the same command in one process per host (or per GPU).
`initialize` joins them into one JAX runtime (`jax.distributed.initialize`) before anything
touches a device: from explicit flags, or from the environment that a cluster sets (SLURM, Open
MPI, a Cloud TPU VM of a multi-host slice; `DPVL_DISTRIBUTED=1` asks JAX to auto-detect).

Process 0 is the primary: it alone writes the workdir's files (privacy.json, metrics.jsonl,
TensorBoard, config.json, the lock) and prints the progress lines; orbax checkpoints are written
by all processes together. What must be the same everywhere is made so: the run's secrets are
drawn on process 0 and broadcast (`broadcast_json`), and each step's stop requests and skipped
records are gathered from every process (`gather_json`), so that all stop at the same step.
"""

import json
import os

import jax
from jax.experimental import multihost_utils
import numpy as np

JSON_BYTES = 1 << 14  # the buffer of a JSON message of `broadcast_json` / `gather_json`


def cluster(env=os.environ) -> str | None:
  """The multi-process cluster the environment describes, or None for a single process.

  Args:
    env: the environment variables (default `os.environ`).

  Returns:
    "slurm", "openmpi" or "tpu" (JAX's `jax.distributed.initialize()` finds the coordinator,
    the process count and this process's id there), "env" for `DPVL_DISTRIBUTED=1`, or None.
  """
  if env.get("DPVL_DISTRIBUTED") == "1":
    return "env"
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  if "MEGASCALE_COORDINATOR_ADDRESS" in env or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, env=os.environ) -> str | None:
  """Joins this process to a multi-process run; call before anything touches a device.

  Args:
    coordinator_address: "host:port" of process 0's coordinator (`--coordinator_address`).
    num_processes: the number of processes (`--num_processes`).
    process_id: this process's number in [0, num_processes) (`--process_id`).
    env: the environment, for a cluster to detect when no flag is given.

  Returns:
    How the processes were found ("flags", or `cluster`'s name), or None for a single process.

  Raises:
    ValueError: if only some of the three flags are given, or they are inconsistent.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise ValueError("--coordinator_address, --num_processes and --process_id go together: "
                       "give all three (or none, to detect the cluster from the environment).")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}).")
    if num_processes == 1:
      return None
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return "flags"
  found = cluster(env)
  if found is not None:
    jax.distributed.initialize()
  return found


def is_primary() -> bool:
  """Whether this is process 0, the one that writes the workdir's files."""
  return jax.process_index() == 0


def _encode(obj, size: int = JSON_BYTES) -> np.ndarray:
  """`obj` as JSON in a `size`-byte buffer (its length first), for the collectives."""
  data = json.dumps(obj).encode()
  if len(data) + 4 > size:
    raise ValueError(f"a message of {len(data)} bytes exceeds {size}.")
  buffer = np.zeros(size, np.uint8)
  buffer[:4] = np.frombuffer(len(data).to_bytes(4, "little"), np.uint8)
  buffer[4:4 + len(data)] = np.frombuffer(data, np.uint8)
  return buffer


def _decode(buffer: np.ndarray):
  size = int.from_bytes(np.asarray(buffer[:4], np.uint8).tobytes(), "little")
  return json.loads(np.asarray(buffer[4:4 + size], np.uint8).tobytes())


def broadcast_json(obj):
  """Process 0's `obj` (a JSON-able value), on every process (`obj` itself in a single one)."""
  if jax.process_count() == 1:
    return obj
  return _decode(multihost_utils.broadcast_one_to_all(_encode(obj)))


def gather_json(obj, size: int = JSON_BYTES) -> list:
  """Every process's `obj` (a JSON-able value, at most `size` - 4 bytes of JSON), in process
  order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  gathered = multihost_utils.process_allgather(_encode(obj, size))
  return [_decode(row) for row in np.asarray(gathered).reshape(jax.process_count(), -1)]


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def whole(tree):
  """`tree` with every array whole on this host: unchanged in a single process, gathered from
  every process's shards (as numpy) in a multi-process run. Call it on all processes."""
  if jax.process_count() == 1:
    return tree
  return multihost_utils.process_allgather(tree, tiled=True)
