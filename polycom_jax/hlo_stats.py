"""What a compiled TPU program holds, read from its HLO text (the compile check's rows): the
bytes its collectives move per device (the size of each one's result, by kind), and its
Pallas (Mosaic) kernel calls by kernel.

A loop body (a scanned stack of layers) appears once in the text; the compile check
extrapolates the bytes from unrolled 1- and 2-layer compiles, as it does for FLOPs.
"""

from __future__ import annotations

import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
         "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.+?) (" + "|".join(sorted(KINDS, key=len, reverse=True))
    + r")(-start)?\(", re.M)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def _array_bytes(shape_text: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    sizes.append(n * _BYTES.get(dtype, 4))
  return sizes


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """{kind: bytes} over the program's collectives (each kind in KINDS, 0 when absent). An
  async "-start" counts its largest array (its tuple also holds the operand)."""
  totals = dict.fromkeys(KINDS, 0)
  for shape_text, kind, start in _INSTRUCTION.findall(hlo_text):
    sizes = _array_bytes(shape_text)
    totals[kind] += (max(sizes) if start else sum(sizes)) if sizes else 0
  return totals


_CALL = re.compile(r"^\s*(?:ROOT )?%([A-Za-z_][A-Za-z0-9_-]*?)(?:\.\d+)* = .*"
                   r'custom_call_target="tpu_custom_call"', re.M)


def mosaic_kernels(hlo_text: str) -> dict[str, int]:
  """{kernel: calls} of the Pallas TPU kernels in the program, by the name the compiler gives
  each call (gmm, tgmm, splash_mha_fwd..., _fwd_body / _bwd_body for the fused activation)."""
  counts: dict[str, int] = {}
  for name in _CALL.findall(hlo_text):
    counts[name] = counts.get(name, 0) + 1
  return counts
