"""The run's secrets: full-entropy root, independent derived streams, 64-bit noise keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpvl.privacy import noise
from dpvl.privacy import secrets as secrets_lib

RunSecrets = secrets_lib.RunSecrets


def _noise(key):
  return np.asarray(noise.add_gaussian_noise(dict(a=jnp.zeros(1000)), key, 1.0)["a"])


def test_roots_that_differ_only_in_high_bits_give_different_noise():
  root = bytes(32)
  high = bytes(31) + b"\x80"  # the top bit of the last byte only
  a, b = RunSecrets(root), RunSecrets(high)
  assert not np.array_equal(a.noise_key_data(0, 0), b.noise_key_data(0, 0))
  assert abs(np.corrcoef(_noise(a.noise_key(0, 0)), _noise(b.noise_key(0, 0)))[0, 1]) < 0.2
  assert a.sampler_seed(0) != b.sampler_seed(0) and a.group_salt(0) != b.group_salt(0)


@pytest.mark.parametrize("high", [2**32, 2**62])
def test_test_seeds_that_differ_only_in_high_bits_give_different_noise(high):
  a, b = RunSecrets.from_test_seed(5), RunSecrets.from_test_seed(5 + high)
  assert not np.array_equal(_noise(a.noise_key(0, 0)), _noise(b.noise_key(0, 0)))


def test_the_noise_key_carries_all_64_bits_of_its_key_data():
  s = RunSecrets.from_test_seed(1)
  data = s.noise_key_data(0, 3)
  assert data.dtype == np.uint32 and data.shape == (2,)
  np.testing.assert_array_equal(jax.random.key_data(s.noise_key(0, 3)), data)
  # Changing either 32-bit word changes the draw: both are key material.
  for word in range(2):
    other = data.copy()
    other[word] ^= 1
    key = jax.random.wrap_key_data(other, impl="threefry2x32")
    assert not np.array_equal(_noise(key), _noise(s.noise_key(0, 3)))


def test_streams_are_distinct_per_step_segment_and_purpose():
  s = RunSecrets.draw()
  keys = {bytes(s.noise_key_data(segment, step)) for segment in range(3) for step in range(50)}
  assert len(keys) == 150
  seeds = [s.sampler_seed(segment) for segment in range(8)]
  assert len(set(seeds)) == 8 and max(seeds).bit_length() > 64  # 128-bit seeds
  assert len({s.group_salt(segment) for segment in range(8)}) == 8
  assert RunSecrets.from_hex(s.hex()) == s and RunSecrets.from_hex(s.hex()).run_id == s.run_id
  assert RunSecrets.draw().root != s.root
  with pytest.raises(ValueError, match="32 bytes"):
    RunSecrets(b"short")
