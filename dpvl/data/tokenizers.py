"""Tokenizers that need no vocabulary fit on private data.

* `ByteTokenizer`: UTF-8 bytes, ids 3..258; 0 = pad, 1 = BOS, 2 = EOS.
* `WordPieceTokenizer`: a public BERT-style `vocab.txt` (e.g. bert-base-uncased, 30,522 pieces),
  lowercased, accents stripped, greedy longest-match-first; [CLS] = BOS, [SEP] = EOS.

* `SentencePieceTokenizer`: a public sentencepiece model file (`.model`); its BOS and EOS, and
  its pad piece or, if it has none, one extra id after its pieces.

`encode(text)` returns int32 [max_len]: BOS, tokens, EOS, then pad. A text too long is cut to
max_len keeping BOS and dropping EOS (the model then sees no end for that caption). Bytes are
decoded as UTF-8 (errors="replace"); other non-text input is a TypeError. `decode(ids)` stops at
the first EOS and skips pad and BOS.
"""

import os
import unicodedata

import numpy as np

from dpvl import config as config_lib
from dpvl import registry

_NO_SPACE_BEFORE = frozenset(".,!?;:")


def _is_punctuation(c: str, category: str) -> bool:
  """Unicode punctuation, or any ASCII character that is neither a letter, digit nor space."""
  return category.startswith("P") or (c.isascii() and not c.isalnum() and not c.isspace())


def _is_cjk(c: str) -> bool:
  """CJK ideographs, which BERT splits into one word each."""
  cp = ord(c)
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or
          0x2A700 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or
          0x2F800 <= cp <= 0x2FA1F)


class _Tokenizer:
  pad_id: int
  bos_id: int
  eos_id: int
  vocab_size: int

  def __init__(self, max_len: int):
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2:
      raise config_lib.ConfigError(f"tokenizer.max_len must be an integer >= 2, got {max_len!r}.")
    self.max_len = int(max_len)

  def _ids(self, text: str) -> list[int]:
    raise NotImplementedError

  def _text(self, ids: list[int]) -> str:
    raise NotImplementedError

  def encode(self, text) -> np.ndarray:
    """int32 [max_len]: BOS, tokens, EOS, pad; cut to max_len (EOS is then dropped)."""
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
      raise TypeError(f"can only encode str or bytes, got {type(text).__name__}.")
    ids = [self.bos_id, *self._ids(text), self.eos_id][:self.max_len]
    out = np.full(self.max_len, self.pad_id, np.int32)
    out[:len(ids)] = ids
    return out

  def decode(self, ids) -> str:
    """Text of `ids` up to the first EOS, without pad and BOS."""
    kept = []
    for i in np.asarray(ids).tolist():
      if i == self.eos_id:
        break
      if i not in (self.pad_id, self.bos_id):
        kept.append(i)
    return self._text(kept)


class ByteTokenizer(_Tokenizer):
  """UTF-8 bytes shifted by 3; vocab_size 259."""
  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 259
  _OFFSET = 3

  def _ids(self, text):
    return [b + self._OFFSET for b in text.encode("utf-8")]

  def _text(self, ids):
    return bytes(i - self._OFFSET for i in ids
                 if self._OFFSET <= i < self.vocab_size).decode("utf-8", errors="replace")


class WordPieceTokenizer(_Tokenizer):
  """BERT word pieces from a public vocabulary file (one piece per line)."""

  _SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
  _MAX_WORD = 100

  def __init__(self, vocab_file: str, max_len: int):
    super().__init__(max_len)
    if not vocab_file or not os.path.isfile(vocab_file):
      raise config_lib.ConfigError(
          f"tokenizer.vocab_file={vocab_file!r} is not a readable file. BERT-uncased's public "
          "word pieces (30,522 lines) are the vocab.txt of bert-base-uncased: e.g. `wget -O "
          "vocab/bert-base-uncased.txt https://huggingface.co/bert-base-uncased/resolve/main/"
          "vocab.txt` (dpvl never downloads), or --config.tokenizer.vocab_file=PATH.")
    try:
      with open(vocab_file, encoding="utf-8") as f:
        pieces = [line.rstrip("\n") for line in f]
    except (OSError, UnicodeDecodeError) as e:
      raise config_lib.ConfigError(
          f"tokenizer.vocab_file={vocab_file!r} cannot be read: {e}") from e
    self.vocab = {p: i for i, p in enumerate(pieces) if p}
    missing = [s for s in self._SPECIAL if s not in self.vocab]
    if missing:
      raise config_lib.ConfigError(f"tokenizer.vocab_file={vocab_file!r} lacks {missing}.")
    self.pieces = pieces
    self.vocab_size = len(pieces)
    self.pad_id, self.unk_id, self.bos_id, self.eos_id = (self.vocab[s] for s in self._SPECIAL)

  @staticmethod
  def _words(text: str) -> list[str]:
    """BERT's basic tokenizer: clean, lowercase, strip accents, split on spaces/punctuation/CJK."""
    text = unicodedata.normalize("NFD", text.lower())
    words, current = [], []
    for c in text:
      category = unicodedata.category(c)
      if category == "Mn" or c == "\ufffd" or (category in ("Cc", "Cf") and not c.isspace()):
        continue  # accents, replacement and control characters are dropped
      if c.isspace() or _is_punctuation(c, category) or _is_cjk(c):
        if current:
          words.append("".join(current))
          current = []
        if not c.isspace():
          words.append(c)
      else:
        current.append(c)
    if current:
      words.append("".join(current))
    return words

  def _ids(self, text):
    ids = []
    for word in self._words(text):
      if len(word) > self._MAX_WORD:
        ids.append(self.unk_id)
        continue
      pieces, start = [], 0
      while start < len(word):
        end = len(word)
        while end > start:
          piece = word[start:end] if start == 0 else "##" + word[start:end]
          if piece in self.vocab:
            break
          end -= 1
        if end == start:
          pieces = [self.unk_id]
          break
        pieces.append(self.vocab[piece])
        start = end
      ids.extend(pieces)
    return ids

  def _text(self, ids):
    words = []
    for i in ids:
      if not 0 <= i < len(self.pieces):
        continue
      piece = self.pieces[i]
      if piece.startswith("##") and words:
        words[-1] += piece[2:]
      elif piece in _NO_SPACE_BEFORE and words:
        words[-1] += piece
      else:
        words.append(piece.removeprefix("##"))
    return " ".join(words)


class SentencePieceTokenizer(_Tokenizer):
  """Pieces of a public sentencepiece model file (`tokenizer.vocab_file`)."""

  def __init__(self, model_file: str, max_len: int):
    super().__init__(max_len)
    try:
      import sentencepiece  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise config_lib.ConfigError("tokenizer.type='sentencepiece' needs the sentencepiece "
                                   "package: pip install sentencepiece") from None
    if not model_file or not os.path.isfile(model_file):
      raise config_lib.ConfigError(f"tokenizer.vocab_file={model_file!r} is not a readable file.")
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    except (OSError, RuntimeError) as e:
      raise config_lib.ConfigError(f"tokenizer.vocab_file={model_file!r} is not a sentencepiece "
                                   f"model: {e}") from None
    pieces = self._sp.get_piece_size()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise config_lib.ConfigError(f"tokenizer.vocab_file={model_file!r} has no BOS or EOS "
                                   "piece.")
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else pieces
    self.vocab_size = pieces + (self.pad_id == pieces)

  def _ids(self, text):
    return self._sp.encode(text)

  def _text(self, ids):
    return self._sp.decode([i for i in ids if 0 <= i < self._sp.get_piece_size()])


def _byte(cfg) -> ByteTokenizer:
  return ByteTokenizer(cfg.max_len)


def _wordpiece(cfg) -> WordPieceTokenizer:
  return WordPieceTokenizer(cfg.vocab_file, cfg.max_len)


def _sentencepiece(cfg) -> SentencePieceTokenizer:
  return SentencePieceTokenizer(cfg.vocab_file, cfg.max_len)


# Builders: config.tokenizer -> tokenizer.
TYPES = registry.Registry("tokenizer.type", {
    "byte": _byte,
    "wordpiece": _wordpiece,
    "sentencepiece": _sentencepiece,
})


def build_tokenizer(cfg) -> _Tokenizer:
  """The tokenizer of config.tokenizer.

  Args:
    cfg: config.tokenizer: `type` (one of TYPES), `vocab_file` (vocab.txt or .model; unused by
      "byte"), `max_len`.

  Returns:
    The tokenizer; ConfigError naming the field for an unknown `type` or a bad field.
  """
  return TYPES[cfg.type](cfg)
