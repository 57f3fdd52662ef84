"""Move weights between this codebase's Orbax checkpoints and Hugging Face (PyTorch) directories.

  python convert.py --direction=export --config=configs/X.py --workdir=DIR --hf_dir=OUT [--step=N]
  python convert.py --direction=import --config=configs/X.py --hf_dir=IN --workdir=DIR [--step=0]
      [--model_from_hf]

export writes OUT/model.safetensors and OUT/config.json (Llama / Qwen3 / OLMoE layout, see polycom_jax/hf_layout.py)
from the checkpoint at --step (default: the latest). import writes IN's weights as the --step
checkpoint of the empty workdir DIR, with a fresh optimizer state: train.py continues from it and
eval.py evaluates it with the same --config. --model_from_hf takes config.model from IN's
config.json instead of --config and prints the overrides train.py / eval.py then need.
"""

from absl import app, flags
from ml_collections import config_flags

from polycom_jax import cli, distributed, hf_files, interop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_DIRECTION = flags.DEFINE_enum("direction", None, ["export", "import"],
                               "export: Orbax -> Hugging Face; import: Hugging Face -> Orbax.",
                               required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (its checkpoints/).",
                               required=True)
_HF_DIR = flags.DEFINE_string("hf_dir", None, "The Hugging Face directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest); "
                             "import: the step to write (default: 0).")
_MODEL_FROM_HF = flags.DEFINE_bool("model_from_hf", False,
                                   "import: take config.model from --hf_dir's config.json.")
distributed.define_flags()


def _model_overrides(config, fields: dict) -> list[str]:
  """--config.model.X=Y flags that turn config.model into fields."""
  return [f"--config.model.{k}={v}" for k, v in fields.items() if config.model.get(k) != v]


def _import(config) -> str:
  if _MODEL_FROM_HF.value:
    hf, _ = hf_files.read_hf_dir(_HF_DIR.value)
    fields = interop.model_fields_from_hf(hf)
    overrides = _model_overrides(config, fields)
    config = config.copy_and_resolve_references()
    config.model.update(fields)
    print("train.py / eval.py need the same model config: add " + (" ".join(overrides) or
                                                                    "nothing"))
  step = 0 if _STEP.value is None else _STEP.value
  path = interop.import_checkpoint(config, _HF_DIR.value, _WORKDIR.value, step)
  return f"imported {_HF_DIR.value} as {path}"


def main(argv):
  del argv
  cli.run(_convert, config=_CONFIG)


def _convert():
  if _DIRECTION.value == "export":
    step = interop.export_checkpoint(_CONFIG.value, _WORKDIR.value, _HF_DIR.value, _STEP.value)
    print(f"exported step {step} of {_WORKDIR.value} to {_HF_DIR.value}")
  else:
    print(_import(_CONFIG.value))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
