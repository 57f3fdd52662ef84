"""Input pipeline throughput: prepared rows vs packing on the fly, per tokenizer, at seq 4096.

  python -m benchmarks.bench_data [--seq_len=4096] [--seconds=10] [--out=benchmarks/RESULTS.md]

On the built-in corpus (Python's standard library, ~11 MB): trains a SentencePiece and a
Hugging Face BPE tokenizer on it (8k vocabularies), prepares the rows with each tokenizer
(preparation speed, with the machine's cores), then reads training batches of 8 rows for
--seconds with this process pinned to ONE core, prepared and on the fly (shuffle window 4096
rows), and reports tokens/s and the reader's memory (peak RSS growth while reading).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

from configs.default import get_config
from polycom_jax import data as data_lib
from polycom_jax.data import prepared, sources


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _corpus_text(data_config, limit_bytes: int = 4_000_000) -> str:
  source = sources.get_data_source(data_config, data_config.train_split)
  parts, size = [], 0
  for i in range(len(source)):
    text = source[i]["text"].decode("utf-8", errors="replace")
    parts.append(text)
    size += len(text)
    if size > limit_bytes:
      break
  return "\n".join(parts)


def _train_tokenizers(data_config, work: str) -> dict[str, str]:
  """{name: tokenizer_path} for sentencepiece and huggingface, trained on the corpus."""
  import sentencepiece as spm
  import tokenizers as hf
  text_path = os.path.join(work, "corpus.txt")
  with open(text_path, "w", encoding="utf-8") as f:
    f.write(_corpus_text(data_config))
  spm.SentencePieceTrainer.train(input=text_path, model_prefix=os.path.join(work, "sp"),
                                 vocab_size=8000, byte_fallback=True, num_threads=2,
                                 minloglevel=2, input_sentence_size=200000,
                                 shuffle_input_sentence=True)
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>", "<pad>"],
                                   initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
  tok.train([text_path], trainer)
  hf_path = os.path.join(work, "tokenizer.json")
  tok.save(hf_path)
  return {"sentencepiece": os.path.join(work, "sp.model"), "huggingface": hf_path}


def _read(data_config, tokenizer, seconds: float) -> tuple[float, float]:
  """(tokens/s, peak RSS growth in MiB) reading batches of 8 rows on one core."""
  before = _rss_mib()
  it = data_lib.make_train_iterator(data_config, tokenizer, batch_size=8, seed=0)
  next(it)                                     # opening, first window / prefetch
  tokens, start = 0, time.perf_counter()
  peak = _rss_mib()
  while time.perf_counter() - start < seconds:
    batch = next(it)
    tokens += batch["inputs"].size
    peak = max(peak, _rss_mib())
  rate = tokens / (time.perf_counter() - start)
  it.close()
  return rate, peak - before


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq_len", type=int, default=4096)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  work = tempfile.mkdtemp(prefix="bench_data_")
  base = get_config().data
  base.update(seq_len=args.seq_len, data_dir=os.path.join(work, "data_cache"), prefetch=0)
  paths = {"byte": "", **_train_tokenizers(base, work)}
  cores = os.cpu_count()
  rows = []
  for name, path in paths.items():
    c = base.copy_and_resolve_references()
    c.update(tokenizer=name, tokenizer_path=path)
    tokenizer = data_lib.get_tokenizer(c)
    t0 = time.perf_counter()
    out = prepared.prepare(c, tokenizer, "train", workers=cores)
    prep_s = time.perf_counter() - t0
    manifest = prepared.read_manifest(out)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})     # read on one core
    fast, fast_mem = _read(c, tokenizer, args.seconds)
    c.update(prepared=False, shuffle_buffer_rows=4096)
    slow, slow_mem = _read(c, tokenizer, args.seconds)
    os.sched_setaffinity(0, set(range(cores)))
    rows.append(f"| {name} | {manifest['tokens'] / prep_s / 1e6:.2f}M ({cores} cores, "
                f"{prep_s:.1f} s) | {fast / 1e6:.2f}M | {fast_mem:.0f} MiB | {slow / 1e6:.3f}M "
                f"| {slow_mem:.0f} MiB |")
    print(rows[-1], flush=True)
  lines = [
      f"### Input pipeline throughput ({datetime.date.today()}, {platform.node()}, "
      f"{cores} cores, seq_len {args.seq_len}, batches of 8 rows)", "",
      f"`python -m benchmarks.bench_data --seq_len={args.seq_len} --seconds={args.seconds:g}` "
      "on the built-in corpus. Reading is pinned to one core; memory is the reader's peak RSS "
      "growth. On the fly shuffles rows in a window of 4096 (at seq 4096 that window alone is "
      "4096 rows x 4 arrays x 16 KiB = 256 MiB).", "",
      "| tokenizer | preparation (tokens/s) | prepared read (tokens/s, 1 core) | memory | "
      "on the fly (tokens/s, 1 core) | memory |",
      "|---|---:|---:|---:|---:|---:|", *rows, ""]
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n" + text)


if __name__ == "__main__":
  sys.exit(main())
