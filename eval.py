"""Evaluate a checkpoint on the validation split (and optionally sample text).

  python eval.py --config=configs/default.py --workdir=workdirs/run1 [--step=N]
      [--sample --prompt="def main(" --max_new_tokens=64 --temperature=0.8]

Writes WORKDIR/eval/metrics_step_<N>.json (step, loss, perplexity, bits_per_byte, tokens,
unigram_loss) and prints a summary.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from polycom_jax import distributed, evaluation
from polycom_jax.checkpoint import CheckpointError
from polycom_jax.config_errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SAMPLE = flags.DEFINE_bool("sample", False, "Also generate text from --prompt.")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Prompt for --sample.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate with --sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
distributed.define_flags()


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every save step at INFO
  try:
    distributed.initialize()
    result = evaluation.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _STEP.value)
    print(evaluation.format_summary(result))
    if _SAMPLE.value:
      s, params, _ = evaluation.restore_params(_CONFIG.value, _WORKDIR.value, result["step"])
      text = evaluation.generate(s, params, _PROMPT.value, _MAX_NEW.value, _TEMPERATURE.value)
      print(f"--- sample ---\n{_PROMPT.value}{text}")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
