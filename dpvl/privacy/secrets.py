"""The run's secrets: one 256-bit root drawn from the OS, and every random stream derived from it.

The guarantee needs the adversary not to know who was sampled or what noise was drawn, so the
Poisson sampler's seed, the noise keys and per-batch clipping's group salt are secret. They are
all derived from one root secret (32 bytes from `os.urandom`) with HMAC-SHA256 under distinct
labels, so the streams are independent as far as HMAC-SHA256 is a pseudo-random function:

  sampler seed of segment s           HMAC(root, "dpvl/sampler/<s>")[:16]          128 bits
  group salt of segment s             HMAC(root, "dpvl/groups/<s>")[:8]             64 bits
  noise key of segment s, step t      HMAC(root, "dpvl/noise/<s>/<t>")[:8]          64 bits
  loss noise key of segment s, step t HMAC(root, "dpvl/loss-noise/<s>/<t>")[:8]     64 bits
  run id (public)                     HMAC(root, "dpvl/run-id")[:8]

A segment is a stretch of steps in the ledger (`dpvl.privacy.ledger`): a resume that cannot
reproduce released steps bit for bit starts a new segment, whose streams are all fresh.

The loss noise key draws the noise of the DP loss estimate (`config.privacy.loss_estimate`): a
stream of its own, so that the gradient's noise key is the same whether the estimate is on or off,
and the two noises are independent.

The noise key of a step is a threefry2x32 key built from its 64 bits of key data
(`jax.random.wrap_key_data`), never from a Python int (`jax.random.key(int)` keeps 32 bits when
x64 is off). Threefry's key is 64 bits: an attacker who wants one step's noise must search
2^64 keys for that step, and learns nothing about any other step's key or the sampler seed.
The sampler seeds numpy's PCG64 through a SeedSequence with 128 bits.
"""

import dataclasses
import hashlib
import hmac
import os

import jax
import numpy as np

ROOT_BYTES = 32


@dataclasses.dataclass(frozen=True)
class RunSecrets:
  """The root secret of a run; kept in the (private) checkpoint, never in logs or configs."""

  root: bytes

  def __post_init__(self):
    if len(self.root) != ROOT_BYTES:
      raise ValueError(f"the root secret must be {ROOT_BYTES} bytes, got {len(self.root)}.")

  @classmethod
  def draw(cls) -> "RunSecrets":
    """Fresh secrets from the operating system's generator."""
    return cls(os.urandom(ROOT_BYTES))

  @classmethod
  def from_test_seed(cls, seed: int) -> "RunSecrets":
    """Reproducible secrets for tests (`config.privacy.seed`): anyone who knows the seed knows
    the noise, so a run with a fixed seed has no privacy."""
    return cls(hashlib.sha256(f"dpvl/test-seed/{int(seed)}".encode()).digest())

  @classmethod
  def from_hex(cls, text: str) -> "RunSecrets":
    return cls(bytes.fromhex(text))

  def hex(self) -> str:
    return self.root.hex()

  def _derive(self, label: str, num_bytes: int) -> bytes:
    return hmac.new(self.root, f"dpvl/{label}".encode(), hashlib.sha256).digest()[:num_bytes]

  @property
  def run_id(self) -> str:
    """A public name of the run (reveals nothing of the streams): ties privacy.json to its
    checkpoints."""
    return self._derive("run-id", 8).hex()

  def sampler_seed(self, segment: int) -> int:
    """The 128-bit seed of segment `segment`'s Poisson sampler."""
    return int.from_bytes(self._derive(f"sampler/{segment}", 16), "little")

  def group_salt(self, segment: int) -> int:
    """The 64-bit key of segment `segment`'s per-batch hash groups."""
    return int.from_bytes(self._derive(f"groups/{segment}", 8), "little")

  def noise_key_data(self, segment: int, step: int) -> np.ndarray:
    """The 64 bits (uint32[2]) of the noise key of `step` in segment `segment`."""
    return np.frombuffer(self._derive(f"noise/{segment}/{step}", 8), "<u4").astype(np.uint32)

  def noise_key(self, segment: int, step: int) -> jax.Array:
    """The threefry2x32 noise key of `step` in segment `segment`."""
    return jax.random.wrap_key_data(self.noise_key_data(segment, step), impl="threefry2x32")

  def loss_noise_key(self, segment: int, step: int) -> jax.Array:
    """The threefry2x32 key of the DP loss estimate's noise at `step` in segment `segment`."""
    data = np.frombuffer(self._derive(f"loss-noise/{segment}/{step}", 8), "<u4")
    return jax.random.wrap_key_data(data.astype(np.uint32), impl="threefry2x32")
