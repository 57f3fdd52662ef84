"""Train a PolyCom language model.

  python train.py --config=configs/default.py --workdir=workdirs/run1 [--config.a.b=v ...]

Resumes from the workdir's latest checkpoint when there is one. SIGTERM/SIGINT write a
checkpoint and exit 0; run the same command to continue.
"""

from absl import app, flags
from ml_collections import config_flags

from polycom_jax import cli, distributed, loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here.", required=True)
distributed.define_flags()


def main(argv):
  del argv
  cli.run(lambda: loop.train(_CONFIG.value, _WORKDIR.value), config=_CONFIG)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
