"""A Hugging Face model directory on disk: config.json and safetensors weights (one file, or
shards listed in an index), read and written as plain dicts of numpy arrays."""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from polycom_jax.config_errors import ConfigError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


def write_hf_dir(out_dir: str, tensors: Mapping[str, np.ndarray], config: Mapping):
  """model.safetensors (PyTorch metadata, so from_pretrained accepts it) and config.json. An
  older sharded export in the folder (index and shards) is removed first: a later import would
  otherwise read the old index and load the old weights."""
  os.makedirs(out_dir, exist_ok=True)
  for name in os.listdir(out_dir):
    if name == INDEX_FILE or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name):
      os.remove(os.path.join(out_dir, name))
  contiguous = {n: np.ascontiguousarray(t) for n, t in tensors.items()}
  save_file(contiguous, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
  write_json(out_dir, CONFIG_FILE, config)


def write_json(out_dir: str, name: str, value: Mapping):
  """out_dir/name as indented JSON (the tokenizer and generation configs beside the weights)."""
  with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2)


def read_hf_dir(hf_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, name -> array) of a Hugging Face directory, one safetensors file or shards."""
  config_path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise ConfigError(f"--hf_dir={hf_dir}: no {CONFIG_FILE} there")
  config = _read_json(config_path)
  index_path = os.path.join(hf_dir, INDEX_FILE)
  if os.path.isfile(index_path):
    index = _read_json(index_path)
    if not isinstance(index.get("weight_map"), dict):
      raise ConfigError(f"{index_path} has no weight_map")
    files = sorted(set(index["weight_map"].values()))
  elif os.path.isfile(os.path.join(hf_dir, WEIGHTS_FILE)):
    files = [WEIGHTS_FILE]
  else:
    raise ConfigError(f"--hf_dir={hf_dir}: no {WEIGHTS_FILE} or {INDEX_FILE} there (only "
                      "safetensors weights are read; save the PyTorch model with "
                      "save_pretrained(..., safe_serialization=True))")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    path = os.path.join(hf_dir, name)
    try:
      tensors.update(load_file(path))
    except Exception as e:  # safetensors raises its own error type for damaged files
      raise ConfigError(f"{path} cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}): is it truncated?") from None
  return config, tensors


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise ConfigError(f"{path} holds {type(value).__name__}, not a JSON object")
  return value
