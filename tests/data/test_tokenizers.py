"""The byte, word-piece and sentencepiece tokenizers, and every bad tokenizer field named."""

import sys
import types

import numpy as np
import pytest

from dpvl.data import shape_scenes
from dpvl.data import tokenizers
from tests.helpers import raises_config_error


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


def _tokenizer(type_, vocab_file="", max_len=8):
  return tokenizers.build_tokenizer(types.SimpleNamespace(type=type_, vocab_file=vocab_file,
                                                          max_len=max_len))


def test_tokenizer_fields(tmp_path, monkeypatch):
  with raises_config_error("tokenizer.max_len must be an integer >= 2, got 1"):
    _tokenizer("byte", max_len=1)
  with raises_config_error("tokenizer.vocab_file='' is not a readable file. .* vocab.txt of "
                           "bert-base-uncased"):  # and how to get it
    _tokenizer("wordpiece")
  (tmp_path / "latin1.txt").write_bytes(b"[PAD]\n\xff\xfe\n")
  with raises_config_error("tokenizer.vocab_file=.*latin1.txt' cannot be read"):
    _tokenizer("wordpiece", str(tmp_path / "latin1.txt"))
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\na\n")
  with raises_config_error(r"lacks \['\[CLS\]', '\[SEP\]'\]"):
    _tokenizer("wordpiece", str(tmp_path / "vocab.txt"))
  with raises_config_error("tokenizer.vocab_file=.*/none.model' is not a readable file"):
    _tokenizer("sentencepiece", str(tmp_path / "none.model"))
  (tmp_path / "bad.model").write_bytes(b"nonsense")
  with raises_config_error("is not a sentencepiece model"):
    _tokenizer("sentencepiece", str(tmp_path / "bad.model"))
  monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
  with raises_config_error("pip install sentencepiece"):
    _tokenizer("sentencepiece", str(tmp_path / "bad.model"))


def test_sentencepiece_model_without_bos_or_eos(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  scenes = shape_scenes.ShapeScenes(200, 8, seed=0)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([scenes[i]["caption"] for i in range(200)]),
      model_prefix=str(tmp_path / "no_eos"), vocab_size=30, model_type="unigram", bos_id=-1,
      eos_id=-1, minloglevel=2)
  with raises_config_error("has no BOS or EOS piece"):
    _tokenizer("sentencepiece", str(tmp_path / "no_eos.model"))
