"""A Hugging Face model directory on disk: config.json and safetensors weights (one file, or
shards listed in an index), read and written as plain dicts of numpy arrays."""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from polycom_jax.config_errors import ConfigError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


def write_hf_dir(out_dir: str, tensors: Mapping[str, np.ndarray], config: Mapping):
  """model.safetensors (PyTorch metadata, so from_pretrained accepts it) and config.json."""
  os.makedirs(out_dir, exist_ok=True)
  contiguous = {n: np.ascontiguousarray(t) for n, t in tensors.items()}
  save_file(contiguous, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)


def read_hf_dir(hf_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, name -> array) of a Hugging Face directory, one safetensors file or shards."""
  config_path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise ConfigError(f"--hf_dir={hf_dir}: no {CONFIG_FILE} there")
  with open(config_path) as f:
    config = json.load(f)
  index_path = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(hf_dir, WEIGHTS_FILE)):
    files = [WEIGHTS_FILE]
  else:
    raise ConfigError(f"--hf_dir={hf_dir}: no {WEIGHTS_FILE} or {INDEX_FILE} there (only "
                      "safetensors weights are read; save the PyTorch model with "
                      "save_pretrained(..., safe_serialization=True))")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(load_file(os.path.join(hf_dir, name)))
  return config, tensors
