"""Generated scenes, tokenizers, sources, transforms, the batch loader's padding and skipping."""

import collections
import pickle
import types

import grain
import ml_collections
import numpy as np
import pytest

from dpvl.data import loader
from dpvl.data import shape_scenes
from dpvl.data import sources
from dpvl.data import tokenizers
from dpvl.data import transforms
from dpvl.privacy import sampling


def test_scenes_are_deterministic_per_seed_and_index():
  a, b = shape_scenes.ShapeScenes(100, 32, seed=0), shape_scenes.ShapeScenes(100, 32, seed=0)
  c = shape_scenes.ShapeScenes(100, 32, seed=1)
  np.testing.assert_array_equal(a[7]["image"], b[7]["image"])
  assert a[7]["caption"] == b[7]["caption"] and a[7]["label"] == b[7]["label"]
  np.testing.assert_array_equal(a[np.int64(7)]["image"], a[7]["image"])
  assert any(a[i]["caption"] != c[i]["caption"] for i in range(10))
  assert any(not np.array_equal(a[i]["image"], c[i]["image"]) for i in range(10))
  r = a[3]
  assert set(r) == {"image", "caption", "label", "index", "colour_label", "size_label",
                    "position_label"}
  assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
  assert isinstance(r["caption"], str) and r["caption"] == r["caption"].lower()
  assert isinstance(r["label"], int) and r["index"] == 3
  assert len(a) == 100
  assert repr(a) == "ShapeScenes(num_records=100, image_size=32, seed=0, max_objects=2)"
  for bad in (100, -1):
    with pytest.raises(IndexError):
      a[bad]  # pylint: disable=pointless-statement


def test_scenes_work_as_a_grain_source():
  scenes = shape_scenes.ShapeScenes(20, 16, seed=3)
  assert isinstance(scenes, grain.sources.RandomAccessDataSource)
  dataset = grain.MapDataset.source(scenes).seed(0).shuffle()
  assert sorted(dataset[i]["index"] for i in range(20)) == list(range(20))
  copy = pickle.loads(pickle.dumps(scenes))  # grain's worker processes pickle the source
  assert copy[5]["caption"] == scenes[5]["caption"]


@pytest.mark.parametrize("kwargs", [dict(num_records=0), dict(num_records=5, image_size=0),
                                    dict(num_records=5, seed=-1),
                                    dict(num_records=5, max_objects=0),
                                    dict(num_records=5, max_objects=10)])
def test_scene_arguments_are_checked(kwargs):
  with pytest.raises(ValueError):
    shape_scenes.ShapeScenes(**kwargs)


def test_captions_describe_the_objects():
  scenes = shape_scenes.ShapeScenes(10**9, 32, seed=5, max_objects=2)  # any size, nothing stored
  counts = collections.Counter()
  for i in range(0, 10**9, 10**7):
    objects = shape_scenes.scene_spec(5, i, 2).objects
    counts[len(objects)] += 1
    record = scenes[i]
    described = record["caption"].split(", ")
    assert len(described) == len(objects)
    for o, text in zip(objects, described):
      assert text.startswith(f"a {o.size} {o.colour} {o.shape} ") and text.endswith(o.position)
    assert record["label"] == shape_scenes.SHAPES.index(objects[0].shape)
  assert set(counts) == {1, 2}


def test_two_object_captions_mostly_fit_64_bytes():
  scenes = shape_scenes.ShapeScenes(1_000, 8, seed=0, max_objects=2)
  lengths = np.array([len(scenes[i]["caption"].encode()) for i in range(1_000)])
  assert np.mean(lengths + 2 <= 64) > 0.8  # + BOS and EOS
  single = shape_scenes.ShapeScenes(1_000, 8, seed=0, max_objects=1)
  assert max(len(single[i]["caption"]) for i in range(1_000)) + 2 <= 48


def test_objects_are_drawn_in_their_colour_and_do_not_overlap():
  scenes = shape_scenes.ShapeScenes(50, 32, seed=0, max_objects=2)
  for i in range(50):
    scene = shape_scenes.scene_spec(0, i, 2)
    image = scenes[i]["image"]
    assert np.all(image[0, 0] == scene.background)  # the corner is never covered
    for o in scene.objects:
      colour = np.array(shape_scenes.COLOURS[o.colour])
      assert np.all(image.reshape(-1, 3) == colour, axis=1).sum() >= 4
    if len(scene.objects) == 2:  # the bounding boxes (before jitter) are apart
      (y0, x0), (y1, x1) = (shape_scenes.POSITIONS[o.position] for o in scene.objects)
      r0, r1 = (shape_scenes.SIZES[o.size] for o in scene.objects)
      assert max(abs(y0 - y1), abs(x0 - x1)) >= r0 + r1 - 1e-9


def test_labels_are_balanced():
  scenes = shape_scenes.ShapeScenes(2_000, 8, seed=0)
  labels = [scenes[i]["label"] for i in range(2_000)]
  counts = collections.Counter(labels)
  assert set(counts) == set(range(shape_scenes.num_classes)) == set(range(len(shape_scenes.SHAPES)))
  assert min(counts.values()) > 2_000 / shape_scenes.num_classes * 0.75
  # The other attribute labels name the first object's attributes, as the caption does.
  for i in range(20):
    r = scenes[i]
    first = r["caption"].split(",")[0].split()
    assert first[1] == tuple(shape_scenes.SIZES)[r["size_label"]]
    assert first[2] == tuple(shape_scenes.COLOURS)[r["colour_label"]]
    assert first[3] == shape_scenes.SHAPES[r["label"]]
    position = tuple(shape_scenes.POSITIONS)[r["position_label"]]
    assert r["caption"].split(",")[0].endswith(
        "in the centre" if position == "centre" else position)


def _byte(max_len):
  return tokenizers.build_tokenizer(types.SimpleNamespace(type="byte", vocab_file="",
                                                          max_len=max_len))


def test_byte_tokenizer_round_trip_padding_and_truncation():
  tok = _byte(16)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
  ids = tok.encode("héllo")
  assert ids.dtype == np.int32 and ids.shape == (16,)
  assert ids[0] == tok.bos_id and tok.decode(ids) == "héllo"
  assert ids[7] == tok.eos_id and np.all(ids[8:] == tok.pad_id)  # 6 bytes + BOS + EOS
  assert list(ids[1:3]) == [ord("h") + 3, 0xC3 + 3]
  assert _byte(64).decode(_byte(64).encode("日本の猫 ünïcödé 🙂")) == "日本の猫 ünïcödé 🙂"
  exact = tok.encode("x" * 14)  # BOS + 14 + EOS: just fits
  assert exact[-1] == tok.eos_id and tok.pad_id not in exact
  long = tok.encode("x" * 40)
  assert long[0] == tok.bos_id and tok.eos_id not in long and tok.pad_id not in long
  assert tok.decode(long) == "x" * 15
  empty = tok.encode("")
  assert list(empty[:2]) == [tok.bos_id, tok.eos_id] and np.all(empty[2:] == tok.pad_id)
  assert tok.decode(empty) == ""
  assert tok.decode(tok.encode(b"caf\xc3\xa9 \xff")) == "café \ufffd"
  assert tok.decode([tok.bos_id, ord("a") + 3, tok.eos_id, ord("b") + 3]) == "a"  # stops at EOS
  with pytest.raises(TypeError):
    tok.encode(None)


def _wordpiece(tmp_path, vocab, max_len=12):
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
  return tokenizers.build_tokenizer(types.SimpleNamespace(type="wordpiece",
                                                          vocab_file=str(path), max_len=max_len))


_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "circle", "at", "the", "top", "cir",
          "##cle", "##s", ",", "left", "cafe", "猫"]


def test_wordpiece_tokenizer(tmp_path):
  tok = _wordpiece(tmp_path, _VOCAB)
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (len(_VOCAB), 0, 2, 3)
  ids = tok.encode("A RED Circles, at the top-left!")
  pieces = [_VOCAB[i] for i in ids if i not in (tok.pad_id,)]
  assert pieces == ["[CLS]", "a", "red", "circle", "##s", ",", "at", "the", "top", "[UNK]",
                    "left", "[UNK]"]  # '-' and '!' are not in this vocabulary; EOS cut
  assert tok.decode(tok.encode("a red circles")) == "a red circles"
  assert tok.decode(tok.encode("a red circle, at the top")) == "a red circle, at the top"
  assert [_VOCAB[i] for i in tok.encode("Café 猫猫")[:6]] == [
      "[CLS]", "cafe", "猫", "猫", "[SEP]", "[PAD]"]  # accents stripped, CJK split
  assert [_VOCAB[i] for i in tok.encode("redx " + "a" * 101)[:4]] == [
      "[CLS]", "[UNK]", "[UNK]", "[SEP]"]  # no piece for 'x'; a word over 100 characters
  empty = tok.encode("")
  assert list(empty[:2]) == [tok.bos_id, tok.eos_id] and np.all(empty[2:] == tok.pad_id)
  assert tok.decode(tok.encode(b"caf\xc3\xa9")) == "cafe"


@pytest.mark.parametrize("cfg, match", [
    (dict(type="unigram", vocab_file="", max_len=8), "tokenizer.type"),
    (dict(type="sentencepiece", vocab_file="/nonexistent/x.model", max_len=8),
     "tokenizer.vocab_file"),
    (dict(type="wordpiece", vocab_file="/nonexistent/vocab.txt", max_len=8),
     "tokenizer.vocab_file"),
    (dict(type="wordpiece", vocab_file="", max_len=8), "tokenizer.vocab_file"),
    (dict(type="byte", vocab_file="", max_len=1), "tokenizer.max_len"),
])
def test_tokenizer_config_errors(cfg, match):
  with pytest.raises(ValueError, match=match):
    tokenizers.build_tokenizer(types.SimpleNamespace(**cfg))


def test_wordpiece_vocab_without_special_tokens_is_named(tmp_path):
  with pytest.raises(ValueError, match=r"tokenizer.vocab_file.*\[SEP\]"):
    _wordpiece(tmp_path, ["[PAD]", "[UNK]", "[CLS]", "a"])


def test_sources_by_name():
  cfg = ml_collections.ConfigDict(dict(source="shape_scenes", size=10, image_size=16, seed=2,
                                       max_objects=1))
  source = sources.build_source(cfg)
  assert len(source) == 10 and source[0]["image"].shape == (16, 16, 3)
  assert ", " not in "".join(source[i]["caption"] for i in range(10))  # one object each
  plain = sources.build_source(types.SimpleNamespace(source="shape_scenes", size=10,
                                                     image_size=16, seed=2))
  assert repr(plain) == "ShapeScenes(num_records=10, image_size=16, seed=2, max_objects=2)"
  with pytest.raises(ValueError, match=r"data.source.*shape_scenes"):
    sources.build_source(types.SimpleNamespace(source="laion"))


def test_normalisation_is_fixed():
  image = np.array([[[0, 255, 127]]], np.uint8)
  out = transforms.normalize_image(image)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[[-1.0, 1.0, 127 / 127.5 - 1]]], rtol=1e-6)
  with pytest.raises(ValueError, match="uint8"):
    transforms.normalize_image(image.astype(np.float32))
  with pytest.raises(ValueError, match="shape"):
    transforms.normalize_image(np.zeros((4, 4), np.uint8))


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
  # The loader reads only `indices` and `mask` of a selection (`loader.Selection`).
  selection = types.SimpleNamespace(indices=np.array([1, 3, 5, 7, 9, 0, 0, 0]),
                                    mask=np.array([1, 1, 1, 1, 1, 0, 0, 0], bool))
  batch = batch_loader.load(selection)
  np.testing.assert_array_equal(selection.mask, [1, 1, 1, 1, 1, 0, 0, 0])  # left as it was
  assert batch.mask.shape == (2, 4) and batch.examples["x"].shape == (2, 4, 2)
  np.testing.assert_array_equal(batch.mask.ravel(), [1, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch.examples["x"][..., 0].ravel(), [1, 0, 0, 7, 9, 0, 0, 0])
  assert sum(batch.skipped.values()) == 2
  assert batch.skipped == {"unreadable_record": 1, "bad_record": 1}


def test_sentencepiece_tokenizer_from_a_model_file(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  # A tiny model trained here on generated (public) captions: no download.
  scenes = shape_scenes.ShapeScenes(300, 8, seed=0)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([scenes[i]["caption"] for i in range(300)]),
      model_prefix=str(tmp_path / "tiny"), vocab_size=40, model_type="unigram",
      minloglevel=2)
  tok = tokenizers.build_tokenizer(types.SimpleNamespace(
      type="sentencepiece", vocab_file=str(tmp_path / "tiny.model"), max_len=24))
  assert tok.pad_id == 40 and tok.vocab_size == 41  # no pad piece: one extra id
  assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3
  text = scenes[0]["caption"].split(",")[0]
  ids = tok.encode(text)
  assert ids.shape == (24,) and ids.dtype == np.int32 and ids[0] == tok.bos_id
  assert tok.decode(ids) == text
  length = int(np.sum(ids != tok.pad_id))
  assert ids[length - 1] == tok.eos_id and np.all(ids[length:] == tok.pad_id)
  long = tok.encode(" ".join([text] * 10))
  assert tok.pad_id not in long and tok.eos_id not in long  # cut to max_len, EOS dropped
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    (tmp_path / "bad.model").write_bytes(b"nonsense")
    tokenizers.build_tokenizer(types.SimpleNamespace(
        type="sentencepiece", vocab_file=str(tmp_path / "bad.model"), max_len=8))


def test_loader_worker_processes_give_the_same_batch():
  import jax
  spec = dict(x=jax.ShapeDtypeStruct((2,), np.float32))
  selection = sampling.Selection(indices=np.array([1, 3, 5, 7, 9, 2, 0, 0]),
                                 mask=np.array([1, 1, 1, 1, 1, 1, 0, 0], bool),
                                 poisson_size=6, truncated=0)
  threads = loader.BatchLoader(_FlakySource(), _prepare, spec, 2, 4)
  processes = loader.BatchLoader(_FlakySource(), _prepare, spec, 2, 4, processes=2)
  a, b = threads.load(selection), processes.load(selection)
  processes.close()
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(a.examples["x"], b.examples["x"])
  assert a.skipped == b.skipped == {"unreadable_record": 1, "bad_record": 1}


def test_each_host_loads_only_its_share_of_the_batch():
  import jax
  spec = dict(x=jax.ShapeDtypeStruct((2,), np.float32))
  selection = sampling.PoissonSampler(10, 0.5, capacity=8, seed=4).select(0)
  full = loader.BatchLoader(_FlakySource(), _prepare, spec, 2, 4).load(selection)
  shares = [loader.BatchLoader(_FlakySource(), _prepare, spec, 2, 4, host=h,
                               num_hosts=2).load(selection) for h in range(2)]
  assert all(s.mask.shape == (2, 2) and s.examples["x"].shape == (2, 2, 2) for s in shares)
  # The hosts' rows side by side are the global batch (micro-batch axis sharded over hosts).
  np.testing.assert_array_equal(np.concatenate([s.mask for s in shares], 1), full.mask)
  np.testing.assert_array_equal(np.concatenate([s.examples["x"] for s in shares], 1),
                                full.examples["x"])
  assert shares[0].skipped + shares[1].skipped == full.skipped
