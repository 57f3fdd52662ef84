"""Multiple-choice tasks: the example type, one prompt format per task, TFDS and JSONL loaders.

Prompts follow EleutherAI's lm-evaluation-harness (the numbers papers report), so accuracies
here are comparable with theirs: each choice is scored as the continuation
`target_delimiter + choice` (a space by default) of its context.

`--tasks` spec, comma-separated:
  NAME          a built-in task (TASKS), read from its TFDS dataset prepared in the data dir;
  NAME=PATH     a JSONL file: for a built-in NAME, that task's own records (the fields its format
                function reads, e.g. SciQ's question/distractor1-3/correct_answer/support);
                for any other NAME, the plain format {"context", "choices", "gold"} (format_jsonl);
  jsonl:PATH    the plain format, named after the file (its name without .jsonl).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from typing import Any, Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds

from polycom_jax.config_errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """One example: which of `choices` continues `context` (one context per choice allowed)."""

  context: str | tuple[str, ...]   # a tuple: one context per choice (Winogrande)
  choices: tuple[str, ...]
  gold: int
  target_delimiter: str = " "

  def __post_init__(self):
    if len(self.choices) < 2 or not all(isinstance(c, str) for c in self.choices):
      raise ValueError(f"choices must be at least two strings, got {self.choices!r}")
    if isinstance(self.context, tuple):
      if len(self.context) != len(self.choices) or not all(isinstance(c, str)
                                                           for c in self.context):
        raise ValueError(f"a context list needs one string per choice ({len(self.choices)}), "
                         f"got {self.context!r}")
    elif not isinstance(self.context, str):
      raise ValueError(f"context must be a string or a list of strings, got {self.context!r}")
    if not 0 <= self.gold < len(self.choices):
      raise ValueError(f"gold={self.gold} is not an index into the {len(self.choices)} choices")

  def requests(self) -> list[tuple[str, str]]:
    """(context, continuation) per choice: what the model scores."""
    contexts = self.context if isinstance(self.context, tuple) else (self.context,) * len(
        self.choices)
    return [(ctx, self.target_delimiter + c) for ctx, c in zip(contexts, self.choices)]


# ------------------------------------------------------------------------------------------------
# Prompt formats: record (TFDS features decoded, or a JSON object) -> MultipleChoice.
# They raise ValueError for a record they cannot use (no label, no blank).

def _str(x: Any) -> str:
  """TFDS text arrives as bytes (array_record), str (mock data) or a 0-d array."""
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _label(x: Any) -> int | str:
  """A class label: an int index (TFDS ClassLabel) or a string key ('A', '1')."""
  if isinstance(x, (bytes, str)):
    return _str(x)
  return int(x)


def format_arc(r: dict) -> MultipleChoice:
  """ARC (ai2_arc): "Question: {question}\\nAnswer:" + " {choice}"; gold: answerKey's position
  among the choice labels."""
  texts = [_str(t) for t in r["choices"]["text"]]
  labels = [_label(x) for x in r["choices"]["label"]]
  key = _label(r["answerKey"])
  if key not in labels[:len(texts)]:
    raise ValueError(f"answerKey {key!r} is not among the choice labels {labels}")
  return MultipleChoice(f"Question: {_str(r['question'])}\nAnswer:", tuple(texts),
                        labels.index(key))


def _hellaswag_clean(text: str) -> str:
  """The harness's HellaSwag cleanup: WikiHow's [title] markers and other [tags] removed."""
  text = text.strip().replace(" [title]", ". ")
  return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def format_hellaswag(r: dict) -> MultipleChoice:
  """HellaSwag: "{activity_label}: {context}" + " {ending}", cleaned like the harness.

  TFDS keeps only the joined context (ctx_a + " " + ctx_b), so ctx_b's first letter is not
  capitalised as the harness does; expect differences of a fraction of a point."""
  gold = int(r["label"])
  if gold < 0:
    raise ValueError("unlabelled example (the test split has no labels)")
  context = _hellaswag_clean(f"{_str(r['activity_label'])}: {_str(r['context'])}")
  return MultipleChoice(context, tuple(_hellaswag_clean(_str(e)) for e in r["endings"]), gold)


def format_piqa(r: dict) -> MultipleChoice:
  """PIQA: "Question: {goal}\\nAnswer:" + " {sol1}" / " {sol2}"."""
  return MultipleChoice(f"Question: {_str(r['goal'])}\nAnswer:",
                        (_str(r["sol1"]), _str(r["sol2"])), int(r["label"]))


def format_sciq(r: dict) -> MultipleChoice:
  """SciQ: "{support}\\nQuestion: {question}\\nAnswer:" + " {choice}"; the correct answer is
  the fourth choice, after distractor1-3 (the harness's order). TFDS has no SciQ: records come
  as JSONL with allenai/sciq's fields (question, distractor1-3, correct_answer, support)."""
  choices = tuple(_str(r[k]) for k in ("distractor1", "distractor2", "distractor3",
                                       "correct_answer"))
  context = f"{_str(r['support']).lstrip()}\nQuestion: {_str(r['question'])}\nAnswer:"
  return MultipleChoice(context, choices, 3)


def format_winogrande(r: dict) -> MultipleChoice:
  """WinoGrande, partial scoring as in the harness: one context per option (the sentence up to
  the blank with the option filled in), each scored on the same continuation (the rest of the
  sentence), so the model compares how well each option predicts what follows."""
  sentence = _str(r["sentence"])
  if "_" not in sentence:
    raise ValueError(f"sentence has no blank '_': {sentence!r}")
  blank = sentence.index("_")
  options = (_str(r["option1"]), _str(r["option2"]))
  rest = sentence[blank + 1:].strip()
  return MultipleChoice(tuple(sentence[:blank] + o for o in options), (rest, rest),
                        _winogrande_gold(r))


def _winogrande_gold(r: dict) -> int:
  """TFDS: label 0/1 (ClassLabel of '1', '2'); the original JSONL: answer '1'/'2'."""
  if "label" in r:
    return int(r["label"])
  return {"1": 0, "2": 1}[_str(r["answer"])]


def format_jsonl(r: Any) -> MultipleChoice:
  """The plain format: {"context": str or [str, one per choice], "choices": [str], "gold": int,
  optional "target_delimiter": str (default " ")}."""
  if not isinstance(r, dict):
    raise ValueError(f"expected a JSON object, got {type(r).__name__}")
  missing = [k for k in ("context", "choices", "gold") if k not in r]
  if missing:
    raise ValueError(f"missing field(s) {missing}; a line is "
                     '{"context": str, "choices": [str, ...], "gold": int}')
  context, choices, gold = r["context"], r["choices"], r["gold"]
  if not isinstance(choices, list):
    raise ValueError(f"choices must be a list of strings, got {choices!r}")
  if not isinstance(gold, int) or isinstance(gold, bool):
    raise ValueError(f"gold must be an integer index into choices, got {gold!r}")
  delimiter = r.get("target_delimiter", " ")
  if not isinstance(delimiter, str):
    raise ValueError(f"target_delimiter must be a string, got {delimiter!r}")
  context = tuple(context) if isinstance(context, list) else context
  return MultipleChoice(context, tuple(choices), gold, delimiter)


@dataclasses.dataclass(frozen=True)
class Task:
  """A built-in task: its format function and where TFDS keeps it (None: not in TFDS)."""

  format: Callable[[Any], MultipleChoice]
  tfds_name: str | None
  split: str
  tfds_module: str | None = None   # imported first: TFDS does not register these by itself


TASKS = {
    "arc_easy": Task(format_arc, "ai2_arc/ARC-Easy", "test"),
    "arc_challenge": Task(format_arc, "ai2_arc/ARC-Challenge", "test"),
    "hellaswag": Task(format_hellaswag, "hellaswag", "validation",
                      "tensorflow_datasets.text.hellaswag"),
    "piqa": Task(format_piqa, "piqa", "validation"),
    "sciq": Task(format_sciq, None, "test"),
    "winogrande": Task(format_winogrande, "winogrande", "validation",
                       "tensorflow_datasets.text.winogrande"),
}


# ------------------------------------------------------------------------------------------------
# Loading

@dataclasses.dataclass
class TaskData:
  """A loaded task: its examples, where they came from, how many records could not be used."""

  name: str
  examples: list[MultipleChoice]
  source: str
  skipped: int = 0


def parse_spec(spec: str) -> list[tuple[str, str | None]]:
  """'arc_easy,my=/a.jsonl,jsonl:/b.jsonl' -> [(name, jsonl path or None for TFDS)]."""
  out = []
  for item in filter(None, (x.strip() for x in spec.split(","))):
    if item.startswith("jsonl:"):
      path = item[len("jsonl:"):]
      name, path = os.path.splitext(os.path.basename(path))[0], path
    elif "=" in item:
      name, path = (x.strip() for x in item.split("=", 1))
    elif item in TASKS:
      name, path = item, None
    else:
      raise ConfigError(f"--tasks: unknown task {item!r}; built-in tasks: {sorted(TASKS)}, or "
                        "give a JSONL file as NAME=PATH or jsonl:PATH")
    if not name or (path is not None and not path):
      raise ConfigError(f"--tasks: {item!r} needs both a name and a path")
    if name in (n for n, _ in out):
      raise ConfigError(f"--tasks: task {name!r} is given twice")
    out.append((name, path))
  if not out:
    raise ConfigError("--tasks is empty")
  return out


def load_jsonl(path: str, format_fn: Callable[[Any], MultipleChoice],
               limit: int = 0) -> list[MultipleChoice]:
  """Examples from a JSONL file, one per non-blank line; a bad line is a ConfigError naming it."""
  if not os.path.isfile(path):
    raise ConfigError(f"--tasks: {path} does not exist or is not a file")
  examples = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if limit and len(examples) == limit:
        break
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{lineno}: not valid JSON ({e})") from e
      try:
        examples.append(format_fn(record))
      except (ValueError, KeyError, TypeError, AttributeError) as e:
        kind = "missing field " if isinstance(e, KeyError) else ""
        raise ConfigError(f"{path}:{lineno}: {kind}{e}") from e
  if not examples:
    raise ConfigError(f"--tasks: {path} has no examples")
  return examples


def _tfds_source(name: str, task: Task, data_dir: str):
  """The task's random-access TFDS source, or a ConfigError saying how to prepare it."""
  how = (f"prepare it with `tfds build {task.tfds_name} --data_dir={data_dir} "
         f"--file_format=array_record`")
  if task.tfds_module:
    importlib.import_module(task.tfds_module)
  builder = tfds.builder(task.tfds_name, data_dir=data_dir)
  try:
    return builder.as_data_source(task.split)
  except Exception as e:  # explain the common causes; re-raise anything else unchanged
    if not builder.is_prepared():
      raise ConfigError(f"task {name!r}: TFDS dataset {task.tfds_name!r} is not prepared in "
                        f"{data_dir} (--tasks_data_dir); {how}") from e
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ConfigError(f"task {name!r}: {task.tfds_name!r} in {data_dir} is stored as "
                        f"{builder.info.file_format.value}; random access needs array_record: "
                        f"{how}") from e
    raise


def _format_records(records: Iterable[Any], format_fn, limit: int) -> tuple[list, int]:
  """(examples, number of unusable records) for the first `limit` usable ones (0: all)."""
  examples, skipped = [], 0
  for r in records:
    if limit and len(examples) == limit:
      break
    try:
      examples.append(format_fn(r))
    except ValueError:
      skipped += 1
  return examples, skipped


def load_task(name: str, path: str | None, data_dir: str, limit: int = 0) -> TaskData:
  """One task from its TFDS dataset (path None) or a JSONL file."""
  task = TASKS.get(name)
  if path is not None:
    format_fn = task.format if task else format_jsonl
    return TaskData(name, load_jsonl(path, format_fn, limit), path)
  if task.tfds_name is None:
    raise ConfigError(f"task {name!r} has no TFDS dataset; give its {task.split} records as "
                      f"JSONL: --tasks={name}=PATH (the fields {task.format.__name__} in "
                      f"polycom_jax/downstream/tasks.py reads)")
  source = _tfds_source(name, task, data_dir)
  examples, skipped = _format_records((source[i] for i in range(len(source))), task.format,
                                      limit)
  if not examples:
    raise ConfigError(f"task {name!r}: no usable examples in {task.tfds_name}[{task.split}] "
                      f"({skipped} skipped)")
  return TaskData(name, examples, f"tfds:{task.tfds_name}[{task.split}]", skipped)


def load_tasks(spec: str, data_dir: str, limit: int = 0) -> list[TaskData]:
  """Every task of a --tasks spec, loaded (and checked) before anything compiles."""
  if limit < 0:
    raise ConfigError(f"--tasks_limit={limit} must be >= 0 (0: all examples)")
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  return [load_task(name, path, data_dir, limit) for name, path in parse_spec(spec)]
