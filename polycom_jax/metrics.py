"""Training metrics: JSONL + TensorBoard (tensorboardX, no TensorFlow), progress, MFU, and the
one-process console log."""

from __future__ import annotations

import json
import time

import jax

from polycom_jax import paths

# Dense bf16 peak FLOP/s per chip, by jax's device_kind (vendor data sheets); a kind is matched
# exactly, else by the longest listed prefix ("NVIDIA H100 PCIe" is not the SXM card).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,             # SXM (the kind reads "NVIDIA H100 80GB HBM3")
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,             # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100": 312e12,             # SXM and PCIe alike
}


def log(message: str):
  """Prints on process 0 only (every process runs the same program)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def peak_flops(device_kind: str) -> float | None:
  """The chip's peak bf16 FLOP/s, or None when unknown (CPU): MFU is then reported as n/a."""
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  prefixes = [kind for kind in PEAK_FLOPS if device_kind.startswith(kind)]
  return PEAK_FLOPS[max(prefixes, key=len)] if prefixes else None


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int,
        device_kind: str) -> float | None:
  peak = peak_flops(device_kind)
  if peak is None:
    return None
  return flops_per_token * tokens_per_sec / (peak * num_devices)


class MetricWriter:
  """Writes one JSON object per logged step to WORKDIR/metrics.jsonl and TensorBoard events
  to WORKDIR/tensorboard; only process 0 writes. WORKDIR may be a gs:// URI."""

  def __init__(self, workdir: str, filename: str = "metrics.jsonl", resume_step: int = 0,
               tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self._jsonl = _JsonLines(paths.join(workdir, filename), resume_step)
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.append(json.dumps(record) + "\n")
    for k, v in record.items():
      if self._tb and k != "step" and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb:
        self._tb.close()


class _JsonLines:
  """A JSONL file that grows by a line per log. A run resumed at `resume_step` logs the steps
  after it again, so the records the interrupted run wrote past it are dropped first (every
  step appears once). Locally the file is appended to and flushed; an object store cannot
  append, so a gs:// file is uploaded again whole at each line (one atomic object write: a
  reader sees the file with or without the newest line)."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    lines = paths.read_text(path).splitlines(keepends=True) if paths.exists(path) else []
    kept = [line for line in lines if _record_step(line) <= resume_step]
    if len(kept) != len(lines):
      paths.write_text(path, "".join(kept))
    uri = paths.is_uri(path)
    self._lines = kept if uri else None        # only an object is written again whole
    self._file = None if uri else open(path, "a", encoding="utf-8")

  def append(self, line: str):
    if self._file is None:
      self._lines.append(line)
      paths.write_text(self.path, "".join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()


def _record_step(line: str) -> float:
  """The step of a JSONL record; a line cut short by a kill counts as after every step."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")


def _plain(v):
  if hasattr(v, "item"):
    v = v.item()
  return v


class Progress:
  """One status line per log with the latest metrics and the ETA."""

  def __init__(self, total_steps: int, start_step: int):
    self.total, self.start, self.t0 = total_steps, start_step, time.time()

  def line(self, step: int, metrics: dict) -> str:
    done = step - self.start
    elapsed = time.time() - self.t0
    eta = elapsed / max(done, 1) * (self.total - step)
    parts = [f"step {step}/{self.total}"]
    for k in ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
      if metrics.get(k) is not None:
        v = metrics[k]
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    parts.append(f"eta {eta / 60:.1f} min")
    return " | ".join(parts)
