"""Tokenizers behind one small protocol: byte-level, SentencePiece and HuggingFace `tokenizers`."""

import json
import os
import re
from typing import Protocol

import numpy as np

from polycom_jax.config_errors import ConfigError

TOKENIZERS = ("byte", "sentencepiece", "huggingface")
_HF_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")
_HF_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer(Protocol):
  """What the data pipeline and the eval metrics need from a tokenizer."""

  vocab_size: int
  eos_id: int
  pad_id: int  # fills padding positions; they are masked, so it may equal eos_id

  def encode(self, text: str) -> list[int]:
    """Text -> ids, without any special token."""

  def decode(self, ids) -> str:
    """Ids -> text."""

  def token_byte_lengths(self) -> np.ndarray:
    """[vocab_size] int32: UTF-8 bytes each id stands for (0 for special ids), for bits/byte."""


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, EOS = 256, PAD = 257: needs no file, knows bytes exactly."""

  vocab_size = 258
  eos_id = 256
  pad_id = 257

  def encode(self, text: str) -> list[int]:
    return np.frombuffer(text.encode("utf-8"), np.uint8).tolist()

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.ones([self.vocab_size], np.int32)
    lengths[256:] = 0
    return lengths


class SentencePieceTokenizer:
  """A SentencePiece `.model` file; pad falls back to EOS when the model has no pad piece."""

  def __init__(self, path: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id()
    if self.eos_id < 0:
      raise ConfigError(f"config.data.tokenizer_path={path!r}: the SentencePiece model has no EOS "
                        "piece (trained with eos_id=-1); the pipeline needs one.")
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  def piece(self, token_id: int) -> str:
    """The vocabulary string of an id (a special token's name, for a tokenizer_config.json)."""
    return self._sp.id_to_piece(int(token_id))

  def token_byte_lengths(self) -> np.ndarray:
    # '\u2581' is SentencePiece's space; the leading space it adds to a text is counted too.
    lengths = np.zeros([self.vocab_size], np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i):
        continue
      lengths[i] = 1 if self._sp.is_byte(i) else len(
          self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


class HuggingFaceTokenizer:
  """A `tokenizer.json`; EOS/PAD from a sibling `tokenizer_config.json`, else common names."""

  def __init__(self, path: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust error types are not importable
      raise ConfigError(f"config.data.tokenizer_path={path!r} is not a readable HuggingFace "
                        f"tokenizer.json: {e}") from e
    self._byte_level = isinstance(self._tok.decoder, tokenizers.decoders.ByteLevel)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    named = _special_tokens_from_config(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    self.eos_id = self._find_id(named.get("eos_token"), _HF_EOS_NAMES)
    if self.eos_id is None:
      raise ConfigError(f"config.data.tokenizer_path={path!r}: found no EOS token (looked for "
                        f"eos_token in tokenizer_config.json and {list(_HF_EOS_NAMES)}).")
    pad_id = self._find_id(named.get("pad_token"), _HF_PAD_NAMES)
    self.pad_id = self.eos_id if pad_id is None else pad_id

  def _find_id(self, configured: str | None, names: tuple[str, ...]) -> int | None:
    for name in ((configured,) if configured else ()) + names:
      token_id = self._tok.token_to_id(name)
      if token_id is not None:
        return token_id
    return None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def piece(self, token_id: int) -> str:
    """The vocabulary string of an id (a special token's name, for a tokenizer_config.json)."""
    return self._tok.id_to_token(int(token_id))

  def token_byte_lengths(self) -> np.ndarray:
    # Byte-level BPE maps each byte to one character; other models spell pieces in text.
    # Exact for byte-level and SentencePiece-style vocabularies; tokenizers that drop
    # whitespace in pre-tokenization (e.g. WordLevel on Whitespace) undercount it.
    special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    lengths = np.zeros([self.vocab_size], np.int32)
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if i in special or piece is None:
        continue
      if self._byte_level:
        lengths[i] = len(piece)
      elif _BYTE_PIECE.fullmatch(piece):
        lengths[i] = 1
      else:
        piece = piece.removeprefix("##").replace("\u2581", " ")
        lengths[i] = len(piece.encode("utf-8"))
    return lengths


def _special_tokens_from_config(path: str) -> dict[str, str]:
  """`eos_token` / `pad_token` strings of a HuggingFace tokenizer_config.json, if present."""
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  out = {}
  for key in ("eos_token", "pad_token"):
    value = config.get(key)
    if isinstance(value, dict):
      value = value.get("content")
    if isinstance(value, str):
      out[key] = value
  return out


def check_tokenizer_config(data_config) -> None:
  """Cheap checks of config.data.tokenizer / tokenizer_path, without loading anything."""
  name, path = data_config.tokenizer, data_config.tokenizer_path
  if name not in TOKENIZERS:
    raise ConfigError(f"config.data.tokenizer={name!r} is unknown; allowed: {list(TOKENIZERS)}.")
  if name == "byte":
    return
  if not path:
    raise ConfigError(f"config.data.tokenizer={name!r} needs config.data.tokenizer_path "
                      "(a .model file for sentencepiece, a tokenizer.json for huggingface).")
  if not os.path.isfile(path):
    raise ConfigError(f"config.data.tokenizer_path={path!r} does not exist or is not a file.")


def get_tokenizer(data_config) -> Tokenizer:
  """The tokenizer named by config.data.tokenizer, loaded from config.data.tokenizer_path."""
  check_tokenizer_config(data_config)
  name, path = data_config.tokenizer, data_config.tokenizer_path
  if name == "byte":
    return ByteTokenizer()
  if name == "huggingface":
    return HuggingFaceTokenizer(path)
  try:
    return SentencePieceTokenizer(path)
  except (OSError, RuntimeError) as e:
    raise ConfigError(f"config.data.tokenizer_path={path!r} is not a readable SentencePiece "
                      f"model: {e}") from e
