"""The tokenizer an export carries, so that `AutoTokenizer.from_pretrained(dir)` turns text into
the ids the model was trained on. Each kind becomes a `tokenizer.json` (transformers' fast
tokenizer) with a `tokenizer_config.json`:

- byte: a byte-level BPE without merges whose ids are the UTF-8 byte values (as ByteTokenizer),
  `<eos>` = 256, `<pad>` = 257.
- sentencepiece: the model's pieces and scores as a Unigram model, with its own normaliser (the
  precompiled character map), whitespace rules, dummy prefix and byte fallback, read from the
  model file. Checked at export against SentencePiece itself on sample texts.
- huggingface: the run's tokenizer.json and, when it has them, its sibling tokenizer_config.json
  and special_tokens_map.json, copied as they are.

For byte and sentencepiece, encoding with special tokens (transformers' default) puts EOS first:
EOS doubles as BOS, as in training, where every document follows an EOS.
"""

from __future__ import annotations

import json
import os

from polycom_jax.config_errors import ConfigError

BYTE_EOS, BYTE_PAD = "<eos>", "<pad>"
_HF_SIBLINGS = ("tokenizer_config.json", "special_tokens_map.json")
# Texts the converted SentencePiece tokenizer must encode as SentencePiece does.
_CHECK_TEXTS = ("The quick brown fox, 1234 jumps!", "  two  spaces\tand a\nnewline  ",
                "ünïcode ﬁne Ａｂｃ ①② 日本語 🌍", "x")


def _bytes_to_unicode() -> list[str]:
  """Byte b -> the printable character byte-level BPE spells it with (GPT-2's table)."""
  printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
               *range(ord("\u00ae"), ord("\u00ff") + 1)}
  chars, extra = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def _eos_first(tok, eos: str, eos_id: int):
  """With special tokens, `<eos> text` (and `<eos> a <eos> b` for pairs)."""
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  tok.post_processor = processors.TemplateProcessing(
      single=f"{eos} $A", pair=f"{eos} $A {eos} $B:1", special_tokens=[(eos, eos_id)])


def _fast_config(eos: str, pad: str) -> dict:
  return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
          "pad_token": pad, "add_bos_token": True, "clean_up_tokenization_spaces": False}


def byte_tokenizer_json() -> str:
  """tokenizer.json of the byte tokenizer (ids = bytes; <eos> first with special tokens)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers
  vocab = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(BYTE_EOS, special=True),
                          tokenizers.AddedToken(BYTE_PAD, special=True)])
  _eos_first(tok, BYTE_EOS, 256)
  return tok.to_str()


def sentencepiece_tokenizer_json(path: str, tokenizer) -> str:
  """tokenizer.json of a SentencePiece Unigram model; ConfigError where it cannot be exact."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top
  from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
    raise ConfigError(f"config.data.tokenizer_path={path!r}: only SentencePiece Unigram models "
                      "(the default model_type) export to a Hugging Face tokenizer")
  spec = proto.normalizer_spec
  unk = next(i for i, p in enumerate(proto.pieces) if p.type == p.UNKNOWN)
  tok = tokenizers.Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces],
                                            unk_id=unk,
                                            byte_fallback=proto.trainer_spec.byte_fallback))
  steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
  if spec.remove_extra_whitespaces:
    steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
  tok.normalizer = normalizers.Sequence(steps)
  tok.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement="\u2581", prepend_scheme="always" if spec.add_dummy_prefix else "never",
      split=False)
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse(), decoders.Strip(" ", 1, 0)])
  tok.add_special_tokens([tokenizers.AddedToken(p.piece, special=True) for p in proto.pieces
                          if p.type in (p.CONTROL, p.UNKNOWN)])
  _eos_first(tok, tokenizer.piece(tokenizer.eos_id), tokenizer.eos_id)
  for text in _CHECK_TEXTS:
    if tok.encode(text, add_special_tokens=False).ids != tokenizer.encode(text):
      raise ConfigError(f"config.data.tokenizer_path={path!r}: the Hugging Face form of this "
                        f"SentencePiece model encodes {text!r} differently; not exported")
  return tok.to_str()


def tokenizer_files(data_config, tokenizer) -> dict[str, str]:
  """File name -> text of the run's tokenizer (config.data.tokenizer) for an export directory;
  built before anything is written, so a tokenizer that cannot be exported stops the export."""
  name, path = data_config.tokenizer, data_config.tokenizer_path
  if name == "byte":
    assert (tokenizer.eos_id, tokenizer.pad_id) == (256, 257), "ByteTokenizer's ids changed"
    return {"tokenizer.json": byte_tokenizer_json(),
            "tokenizer_config.json": json.dumps(_fast_config(BYTE_EOS, BYTE_PAD), indent=2)}
  if name == "sentencepiece":
    eos, pad = tokenizer.piece(tokenizer.eos_id), tokenizer.piece(tokenizer.pad_id)
    return {"tokenizer.json": sentencepiece_tokenizer_json(path, tokenizer),
            "tokenizer_config.json": json.dumps(_fast_config(eos, pad), indent=2)}
  files = {}
  for file_name, source in (("tokenizer.json", path), *(
      (s, os.path.join(os.path.dirname(path), s)) for s in _HF_SIBLINGS)):
    if os.path.isfile(source):
      with open(source, encoding="utf-8") as f:
        files[file_name] = f.read()
  files.setdefault("tokenizer_config.json", json.dumps({
      "eos_token": tokenizer.piece(tokenizer.eos_id),
      "pad_token": tokenizer.piece(tokenizer.pad_id)}, indent=2))
  return files


def write(files: dict[str, str], out_dir: str):
  for file_name, text in files.items():
    with open(os.path.join(out_dir, file_name), "w", encoding="utf-8") as f:
      f.write(text)
