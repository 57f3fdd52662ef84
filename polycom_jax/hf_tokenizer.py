"""The tokenizer an export carries, so that `AutoTokenizer.from_pretrained(dir)` turns text into
the ids the model was trained on.

- byte: a byte-level BPE without merges whose ids are the UTF-8 byte values (as ByteTokenizer),
  `<eos>` = 256, `<pad>` = 257. Encoding with special tokens (transformers' default) puts `<eos>`
  first: EOS doubles as BOS, as in training, where every document follows an EOS.
- huggingface: the run's tokenizer.json and, when it has them, its sibling tokenizer_config.json
  and special_tokens_map.json, copied as they are.
- sentencepiece: the .model file as tokenizer.model with a LlamaTokenizer config whose BOS is the
  EOS piece (transformers converts the model when loading; the reader needs sentencepiece).
Without a sibling tokenizer_config.json, a huggingface tokenizer gets one of the same kind.
"""

from __future__ import annotations

import os
import shutil

from polycom_jax.hf_files import write_json

BYTE_EOS, BYTE_PAD = "<eos>", "<pad>"
_HF_SIBLINGS = ("tokenizer_config.json", "special_tokens_map.json")


def _bytes_to_unicode() -> list[str]:
  """Byte b -> the printable character byte-level BPE spells it with (GPT-2's table)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
               *range(ord("\u00ae"), ord("\u00ff") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


def byte_tokenizer_json() -> str:
  """tokenizer.json of the byte tokenizer (ids = bytes; <eos> first with special tokens)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, processors
  vocab = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(BYTE_EOS, special=True),
                          tokenizers.AddedToken(BYTE_PAD, special=True)])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BYTE_EOS} $A", pair=f"{BYTE_EOS} $A {BYTE_EOS} $B:1",
      special_tokens=[(BYTE_EOS, 256)])
  return tok.to_str()


def write(data_config, tokenizer, out_dir: str):
  """Writes the run's tokenizer (config.data.tokenizer) into the export directory."""
  name, path = data_config.tokenizer, data_config.tokenizer_path
  if name == "byte":
    assert (tokenizer.eos_id, tokenizer.pad_id) == (256, 257), "ByteTokenizer's ids changed"
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(byte_tokenizer_json())
    write_json(out_dir, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BYTE_EOS,
        "eos_token": BYTE_EOS, "pad_token": BYTE_PAD, "add_bos_token": True,
        "model_max_length": None, "clean_up_tokenization_spaces": False})
  elif name == "huggingface":
    shutil.copyfile(path, os.path.join(out_dir, "tokenizer.json"))
    for sibling in _HF_SIBLINGS:
      source = os.path.join(os.path.dirname(path), sibling)
      if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(out_dir, sibling))
    if not os.path.isfile(os.path.join(out_dir, "tokenizer_config.json")):
      write_json(out_dir, "tokenizer_config.json", _special_names(tokenizer))
  else:
    shutil.copyfile(path, os.path.join(out_dir, "tokenizer.model"))
    write_json(out_dir, "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer",
                                                   **_special_names(tokenizer)})


def _special_names(tokenizer) -> dict:
  """tokenizer_config.json's special tokens: the EOS also as BOS (the start token training
  used), and the pad token."""
  eos = tokenizer.piece(tokenizer.eos_id)
  return {"bos_token": eos, "eos_token": eos, "pad_token": tokenizer.piece(tokenizer.pad_id),
          "add_bos_token": True}
