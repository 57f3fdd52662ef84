"""Log-likelihood scoring of multiple-choice tasks, and their accuracy.

Each (context, continuation) pair becomes one request: [EOS] + context + continuation tokens
(EOS begins every document in training), cut from the left to fit a row of seq_len inputs.
Requests are packed into fixed [batch, seq_len] rows: several per row as separate documents
(own segment id, positions from 0) when the model masks attention by document, else one per
row. One jitted, sharded step scores every batch of every task, so nothing recompiles per
example; the host sums each request's continuation log-probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from polycom_jax import evaluation, paths
from polycom_jax import setup as setup_lib
from polycom_jax import sharding as sharding_lib
from polycom_jax.config_errors import require
from polycom_jax.downstream.tasks import MultipleChoice, TaskData

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Request:
  """One scored pair: the model reads `inputs` and is scored on the last `num_scored` targets."""

  inputs: np.ndarray    # [n] int32, n <= seq_len
  targets: np.ndarray   # [n] int32: inputs shifted by one
  num_scored: int       # continuation tokens inside the row
  truncated: bool       # the context was cut to fit


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Context and continuation ids as the harness splits them: the context's trailing whitespace
  moves to the continuation, and the continuation is what encoding the whole adds to the context
  (so a tokenizer that merges across the boundary is scored on its own tokenization)."""
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  context_ids = tokenizer.encode(context)
  return context_ids, tokenizer.encode(context + continuation)[len(context_ids):]


START_TOKENS = ("eos", "none")


def make_request(tokenizer, context: str, continuation: str, seq_len: int,
                 start_token: str = "eos") -> Request:
  """The request for one pair, its tokens cut from the left to seq_len + 1. start_token "eos":
  EOS first, as training sees every document (and as lm-evaluation-harness does on this
  project's exported tokenizer, which adds it as BOS); "none": the context alone (the harness
  with add_bos_token=False, or a tokenizer that adds nothing), EOS only for an empty context."""
  context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
  start = [tokenizer.eos_id] if start_token == "eos" or not context_ids else []
  tokens = start + context_ids + continuation_ids
  kept = np.asarray(tokens[-(seq_len + 1):], np.int32)                # [n + 1]
  return Request(kept[:-1], kept[1:], min(len(continuation_ids), len(kept) - 1),
                 len(tokens) > seq_len + 1)


def pack(requests: list[Request], seq_len: int, pad_id: int, share_rows: bool,
         multiple: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Rows {ROW_KEYS: [R, seq_len]} (R a multiple of `multiple`, padding rows masked) and each
  request's scored span [N, 3] = (row, start, stop) of target positions."""
  placements, row, fill, segment = [], -1, seq_len, 0
  for r in requests:
    if not share_rows or fill + len(r.inputs) > seq_len:
      row, fill, segment = row + 1, 0, 0
    segment += 1
    placements.append((row, fill, segment))
    fill += len(r.inputs)
  num_rows = max(1, math.ceil((row + 1) / multiple)) * multiple
  rows = {k: np.zeros([num_rows, seq_len], np.float32 if k == "loss_mask" else np.int32)
          for k in ROW_KEYS}
  rows["inputs"][:] = pad_id
  rows["targets"][:] = pad_id
  spans = np.zeros([len(requests), 3], np.int64)
  for i, (r, (row, start, segment)) in enumerate(zip(requests, placements)):
    stop = start + len(r.inputs)
    rows["inputs"][row, start:stop] = r.inputs
    rows["targets"][row, start:stop] = r.targets
    rows["segment_ids"][row, start:stop] = segment
    rows["positions"][row, start:stop] = np.arange(len(r.inputs))
    rows["loss_mask"][row, stop - r.num_scored:stop] = 1.0
    spans[i] = (row, stop - r.num_scored, stop)
  return rows, spans


def make_score_step(s: setup_lib.Setup) -> Callable[[Any, dict], jax.Array]:
  """jit(params, batch) -> log-probability of each target [B, T] (0 where loss_mask is 0),
  replicated so every process reads all rows."""
  def step(params, batch):
    model = nnx.merge(s.graphdef, params)
    logits = model(batch["inputs"], positions=batch["positions"],
                   segment_ids=batch["segment_ids"])                   # [B, T, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]  # [B, T]
    return jnp.where(batch["loss_mask"] > 0, target, 0.0)

  return jax.jit(sharding_lib.with_activation_sharding(step, s.mesh, s.rules),
                 in_shardings=(s.state_shardings["params"], s.batch_sharding),
                 out_shardings=NamedSharding(s.mesh, P()))


def _local_rows(s: setup_lib.Setup, batch: int, seq_len: int) -> slice:
  """The rows of a [batch, seq_len] batch that this process's devices hold."""
  index = s.batch_sharding.addressable_devices_indices_map((batch, seq_len)).values()
  starts = [i[0].start or 0 for i in index]
  stops = [batch if i[0].stop is None else i[0].stop for i in index]
  return slice(min(starts), max(stops))


def score_rows(s: setup_lib.Setup, score_step, params, rows: dict[str, np.ndarray]) -> np.ndarray:
  """Target log-probabilities [R, T] of all rows, config.eval.batch_size rows per step; each
  batch's result is fetched after the next is dispatched, so the devices never wait."""
  batch, seq_len = s.config.eval.batch_size, rows["inputs"].shape[1]
  local = _local_rows(s, batch, seq_len)
  outputs, pending = [], None
  with jax.set_mesh(s.mesh):
    for start in range(0, len(rows["inputs"]), batch):
      part = slice(start + local.start, start + local.stop)
      arrays = {k: jax.make_array_from_process_local_data(s.batch_sharding, v[part],
                                                          (batch, seq_len))
                for k, v in rows.items()}
      dispatched = score_step(params, arrays)
      if pending is not None:
        outputs.append(jax.device_get(pending))
      pending = dispatched
    outputs.append(jax.device_get(pending))
  return np.concatenate(outputs)


def request_logprobs(token_logprobs: np.ndarray, spans: np.ndarray) -> np.ndarray:
  """Sum of each request's scored log-probabilities [N], from [R, T] and spans [N, 3]."""
  cumulative = np.pad(np.cumsum(token_logprobs.astype(np.float64), axis=1), ((0, 0), (1, 0)))
  return cumulative[spans[:, 0], spans[:, 2]] - cumulative[spans[:, 0], spans[:, 1]]


def _stderr(p: float, n: int) -> float | None:
  """Standard error of a mean of n 0/1 outcomes (sample variance, as the harness reports)."""
  return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None


ACC_NORM_UNITS = ("chars", "bytes")


def choice_length(per: str) -> Callable[[str], int]:
  """The length acc_norm divides by; ConfigError for an unknown unit."""
  require(per in ACC_NORM_UNITS, "config.eval.acc_norm_per",
          f"must be one of {ACC_NORM_UNITS}, got {per!r}")
  return len if per == "chars" else (lambda c: len(c.encode("utf-8")))


def accuracy(examples: list[MultipleChoice], logprobs: np.ndarray, per: str = "chars") -> dict:
  """acc (highest log-likelihood is gold) and acc_norm: log-likelihood per character of the
  choice (lm-evaluation-harness's length normalisation), or per UTF-8 byte with per="bytes";
  the two differ on non-ASCII choices."""
  length = choice_length(per)
  correct, correct_norm, i = [], [], 0
  for ex in examples:
    lp = logprobs[i:i + len(ex.choices)]
    lengths = np.array([max(length(c), 1) for c in ex.choices])
    correct.append(int(np.argmax(lp)) == ex.gold)
    correct_norm.append(int(np.argmax(lp / lengths)) == ex.gold)
    i += len(ex.choices)
  n = len(examples)
  acc, acc_norm = float(np.mean(correct)), float(np.mean(correct_norm))
  return {"acc": acc, "acc_stderr": _stderr(acc, n), "acc_norm": acc_norm,
          "acc_norm_stderr": _stderr(acc_norm, n), "n": n}


def score_examples(s: setup_lib.Setup, score_step, params,
                   examples: list[MultipleChoice]) -> tuple[np.ndarray, int]:
  """Log-likelihood of every choice of every example, flattened [sum of choices], and how many
  requests had their context cut."""
  seq_len, tokenizer = s.config.data.seq_len, s.tokenizer
  start = s.config.eval.get("start_token", "eos")
  requests = [make_request(tokenizer, ctx, cont, seq_len, start)
              for ex in examples for ctx, cont in ex.requests()]
  rows, spans = pack(requests, seq_len, tokenizer.pad_id, s.model_config.document_mask,
                     s.config.eval.batch_size)
  logprobs = request_logprobs(score_rows(s, score_step, params, rows), spans)
  return logprobs, sum(r.truncated for r in requests)


def evaluate_tasks(s: setup_lib.Setup, params, tasks: list[TaskData]) -> dict[str, dict]:
  """Per task: acc, acc_norm, their standard errors, n, what was skipped or truncated, and every
  choice's log-likelihood (per example, for item-by-item comparison with the harness)."""
  per = s.config.eval.get("acc_norm_per", "chars")
  score_step = make_score_step(s)
  results = {}
  for task in tasks:
    logprobs, truncated = score_examples(s, score_step, params, task.examples)
    bounds = np.cumsum([0] + [len(ex.choices) for ex in task.examples])
    results[task.name] = {**accuracy(task.examples, logprobs, per), "skipped": task.skipped,
                          "truncated_requests": truncated, "source": task.source,
                          "loglikelihoods": [logprobs[a:b].tolist()
                                             for a, b in zip(bounds[:-1], bounds[1:])]}
  return results


def check_eval_config(config):
  """The downstream settings of config.eval, checked before anything is restored."""
  choice_length(config.eval.get("acc_norm_per", "chars"))
  start = config.eval.get("start_token", "eos")
  require(start in START_TOKENS, "config.eval.start_token",
          f"must be one of {START_TOKENS}, got {start!r}")


def evaluate_checkpoint(config, workdir: str, step: int | None,
                        tasks: list[TaskData]) -> dict:
  """{step, tasks: per-task results, path} for a workdir's checkpoint; process 0 writes them."""
  check_eval_config(config)                                   # bad settings fail first
  s, params, step = evaluation.restore_params(config, workdir, step)
  out = {"step": step, "tasks": evaluate_tasks(s, params, tasks)}
  if jax.process_index() == 0:
    out["path"] = write_results(workdir, step, out["tasks"])
  return out


def write_results(workdir: str, step: int, results: dict[str, dict]) -> str:
  """Writes WORKDIR/eval/downstream_step_<step>.json; returns its path."""
  out_dir = paths.join(paths.resolve(workdir, "--workdir"), "eval")
  paths.makedirs(out_dir)
  path = paths.join(out_dir, f"downstream_step_{step}.json")
  paths.write_text(path, json.dumps({"step": step, "tasks": results}, indent=2))
  return path


def _with_stderr(value: float, stderr: float | None) -> str:
  return f"{value:.4f}" if stderr is None else f"{value:.4f} ± {stderr:.4f}"


def format_table(results: dict[str, dict]) -> str:
  """A markdown table of the results, with notes on skipped records and cut contexts."""
  lines = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
  notes = []
  for name, r in results.items():
    lines.append(f"| {name} | {r['n']} | {_with_stderr(r['acc'], r['acc_stderr'])} | "
                 f"{_with_stderr(r['acc_norm'], r['acc_norm_stderr'])} |")
    if r["skipped"]:
      notes.append(f"{name}: {r['skipped']} records without a usable label skipped")
    if r["truncated_requests"]:
      notes.append(f"{name}: {r['truncated_requests']} requests longer than seq_len had their "
                   "context cut from the left")
  return "\n".join(lines + notes)
