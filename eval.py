"""Evaluate a checkpoint on the validation split (and optionally sample text).

  python eval.py --config=configs/default.py --workdir=workdirs/run1 [--step=N]
      [--sample --prompt="def main(" --max_new_tokens=64 --temperature=0.8]
      [--tasks=arc_easy,arc_challenge,hellaswag,piqa,winogrande,sciq=/path/sciq.jsonl
       --tasks_data_dir=DIR --tasks_limit=N]

Writes WORKDIR/eval/metrics_step_<N>.json (step, loss, perplexity, bits_per_byte, tokens,
unigram_loss) and prints a summary. With --tasks, also zero-shot multiple-choice accuracy
(polycom_jax/downstream) in WORKDIR/eval/downstream_step_<N>.json, printed as a table.
"""

from absl import app, flags
from ml_collections import config_flags

from polycom_jax import cli, compile_cache, distributed, downstream, evaluation, paths
from polycom_jax.data import resolve_data_dir

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SAMPLE = flags.DEFINE_bool("sample", False, "Also generate text from --prompt.")
_PROMPT = flags.DEFINE_string("prompt", "def ", "Prompt for --sample.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate with --sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
_TASKS = flags.DEFINE_string(
    "tasks", "", "Comma-separated multiple-choice tasks: built-in names (TFDS), NAME=PATH or "
    "jsonl:PATH (see polycom_jax/downstream/tasks.py).")
_TASKS_DATA_DIR = flags.DEFINE_string(
    "tasks_data_dir", "", "Where the tasks' TFDS datasets are prepared (default: "
    "config.data.data_dir).")
_TASKS_LIMIT = flags.DEFINE_integer("tasks_limit", 0, "Examples per task (0: all).")
distributed.define_flags()


def main(argv):
  del argv
  cli.run(_evaluate, config=_CONFIG)


def _evaluate():
  workdir = paths.resolve(_WORKDIR.value, "--workdir")     # a bad scheme fails here, first
  print(f"compilation cache: {compile_cache.enable(workdir) or 'off'}")
  tasks = downstream.load_tasks(                     # bad task data fails before compiling
      _TASKS.value, _TASKS_DATA_DIR.value or resolve_data_dir(_CONFIG.value.data),
      _TASKS_LIMIT.value) if _TASKS.value else []
  result = evaluation.evaluate_checkpoint(_CONFIG.value, workdir, _STEP.value)
  print(evaluation.format_summary(result))
  if tasks:
    scores = downstream.evaluate_checkpoint(_CONFIG.value, workdir, result["step"], tasks)
    print(downstream.format_table(scores["tasks"]))
    if "path" in scores:
      print(f"written to {scores['path']}")
  if _SAMPLE.value:
    s, params, _ = evaluation.restore_params(_CONFIG.value, workdir, result["step"])
    text = evaluation.generate(s, params, _PROMPT.value, _MAX_NEW.value, _TEMPERATURE.value)
    print(f"--- sample ---\n{_PROMPT.value}{text}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
