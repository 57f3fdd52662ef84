"""Train a PolyCom language model.

  python train.py --config=configs/default.py --workdir=workdirs/run1 [--config.a.b=v ...]

Resumes from the workdir's latest checkpoint when there is one. SIGTERM/SIGINT write a
checkpoint and exit 0; run the same command to continue.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from polycom_jax import distributed, train_lib
from polycom_jax.checkpoint import CheckpointError
from polycom_jax.config_errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here.", required=True)
distributed.define_flags()


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every save step at INFO
  try:
    distributed.initialize()
    train_lib.train(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except (CheckpointError, train_lib.NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
