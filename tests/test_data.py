"""Generated scenes, tokenizers, the batch loader's padding and skipping."""

import collections
import types

import numpy as np
import pytest

from dpvl.data import loader
from dpvl.data import sources
from dpvl.data import synthetic
from dpvl.data import tokenizers
from dpvl.data import transforms
from dpvl.privacy import sampling


def test_scenes_are_deterministic_per_seed_and_index():
  a, b = synthetic.ShapeScenes(100, 32, seed=0), synthetic.ShapeScenes(100, 32, seed=0)
  c = synthetic.ShapeScenes(100, 32, seed=1)
  np.testing.assert_array_equal(a[7]["image"], b[7]["image"])
  assert a[7]["caption"] == b[7]["caption"]
  assert any(a[i]["caption"] != c[i]["caption"] for i in range(10))
  r = a[3]
  assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
  assert r["index"] == 3
  with pytest.raises(IndexError):
    a[100]


def test_captions_describe_the_objects():
  scenes = synthetic.ShapeScenes(10**9, 32, seed=5, max_objects=2)  # any size, nothing stored
  for i in range(0, 10**9, 10**8):
    objects, _, _ = synthetic.scene_spec(5, i, 2)
    record = scenes[i]
    for o in objects:
      assert f"{o.size} {o.colour} {o.shape}" in record["caption"]
      assert o.position in record["caption"]
    assert record["label"] == synthetic.SHAPES.index(objects[0].shape)


def test_objects_are_drawn_in_their_colour():
  for i in range(20):
    objects, _, _ = synthetic.scene_spec(0, i, 1)
    image = synthetic.ShapeScenes(50, 32, seed=0, max_objects=1)[i]["image"]
    colour = np.array(synthetic.COLOURS[objects[0].colour])
    assert np.all(image.reshape(-1, 3) == colour, axis=1).sum() >= 4


def test_labels_are_balanced():
  scenes = synthetic.ShapeScenes(2_000, 8, seed=0)
  counts = collections.Counter(scenes[i]["label"] for i in range(2_000))
  assert set(counts) == set(range(synthetic.num_classes))
  assert min(counts.values()) > 2_000 / synthetic.num_classes * 0.75


def test_byte_tokenizer_round_trip_padding_and_truncation():
  tok = tokenizers.build_tokenizer(types.SimpleNamespace(type="byte", vocab_file="", max_len=16))
  ids = tok.encode("héllo")
  assert ids.dtype == np.int32 and ids.shape == (16,)
  assert ids[0] == tok.bos_id and tok.decode(ids) == "héllo"
  assert ids[7] == tok.eos_id and np.all(ids[8:] == tok.pad_id)  # 6 bytes + BOS + EOS
  long = tok.encode("x" * 40)
  assert long[0] == tok.bos_id and tok.eos_id not in long and tok.pad_id not in long
  empty = tok.encode("")
  assert list(empty[:2]) == [tok.bos_id, tok.eos_id] and np.all(empty[2:] == tok.pad_id)
  assert tok.decode(tok.encode(b"caf\xc3\xa9 \xff")) == "café \ufffd"


def test_wordpiece_tokenizer(tmp_path):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "circle", "at", "the", "top", "cir",
           "##cle", "##s", ",", "left"]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(vocab) + "\n")
  tok = tokenizers.build_tokenizer(types.SimpleNamespace(type="wordpiece",
                                                         vocab_file=str(path), max_len=12))
  ids = tok.encode("A RED Circles, at the top-left!")
  pieces = [vocab[i] for i in ids if i not in (tok.pad_id,)]
  assert pieces == ["[CLS]", "a", "red", "circle", "##s", ",", "at", "the", "top", "[UNK]",
                    "left", "[UNK]"]  # '-' and '!' are not in this vocabulary
  assert tok.decode(tok.encode("a red circles")) == "a red circles"


@pytest.mark.parametrize("cfg, match", [
    (dict(type="sentencepiece", vocab_file="", max_len=8), "tokenizer.type"),
    (dict(type="wordpiece", vocab_file="/nonexistent/vocab.txt", max_len=8),
     "tokenizer.vocab_file"),
    (dict(type="byte", vocab_file="", max_len=1), "tokenizer.max_len"),
])
def test_tokenizer_config_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    tokenizers.build_tokenizer(types.SimpleNamespace(**cfg))


def test_unknown_source_is_named():
  with pytest.raises(ValueError, match="data.source"):
    sources.build_source(types.SimpleNamespace(source="laion"))


def test_normalisation_is_fixed():
  image = np.array([[[0, 255, 127]]], np.uint8)
  np.testing.assert_allclose(transforms.normalize_image(image),
                             [[[-1.0, 1.0, 127 / 127.5 - 1]]], rtol=1e-6)


class _FlakySource:
  """Record 3 cannot be read; record 5 has a caption the objective rejects."""

  def __len__(self):
    return 10

  def __getitem__(self, i):
    if i == 3:
      raise OSError("truncated file")
    return dict(value=np.float32(i), caption=None if i == 5 else "ok")


def _prepare(record):
  if record["caption"] is None:
    raise ValueError("empty caption")
  return dict(x=np.full(2, record["value"], np.float32))


def test_loader_pads_and_skips_bad_records_by_reason():
  import jax
  spec = dict(x=jax.ShapeDtypeStruct((2,), np.float32))
  batch_loader = loader.BatchLoader(_FlakySource(), _prepare, spec, num_microbatches=2,
                                    microbatch_size=4)
  selection = sampling.Selection(indices=np.array([1, 3, 5, 7, 9, 0, 0, 0]),
                                 mask=np.array([1, 1, 1, 1, 1, 0, 0, 0], bool),
                                 poisson_size=5, truncated=0)
  batch = batch_loader.load(selection)
  assert batch.mask.shape == (2, 4) and batch.examples["x"].shape == (2, 4, 2)
  np.testing.assert_array_equal(batch.mask.ravel(), [1, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch.examples["x"][..., 0].ravel(), [1, 0, 0, 7, 9, 0, 0, 0])
  assert sum(batch.skipped.values()) == 2
  assert any("unreadable" in k for k in batch.skipped)
  assert any("empty caption" in k for k in batch.skipped)
