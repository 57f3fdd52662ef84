"""The library's shape: no import cycles, no module reaching into another's private names, no
flags defined at import, small modules, and evaluation/interop/downstream independent of the loop.

Read from the source with `ast` (function-local imports included), so a violation fails here
before it confuses a reader.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "polycom_jax"
MAX_LINES = 400


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path) -> list[tuple[str, ast.AST]]:
  """(imported polycom_jax module, node) for every import in the file, wherever it is."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(a.name, node) for a in node.names if a.name.startswith("polycom_jax")]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("polycom_jax"):
      for a in node.names:            # `from pkg import submodule` imports the submodule
        sub = f"{node.module}.{a.name}"
        found.append((sub if sub in MODULES else node.module, node))
  return found


def _graph() -> dict[str, set[str]]:
  return {name: {m for m, _ in _imports(path) if m in MODULES and m != name}
          for name, path in MODULES.items()}


def _reaches(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for nxt in graph[todo.pop()]:
      if nxt not in seen:
        seen.add(nxt)
        todo.append(nxt)
  return seen


def test_no_import_cycles():
  graph = _graph()
  # A package's own __init__ re-exporting its submodules is not a cycle of the design.
  for name in graph:
    graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
  cycles = [name for name in graph if name in _reaches(graph, name)]
  assert not cycles, f"modules on an import cycle: {cycles}"


def test_no_module_uses_another_modules_private_names():
  offences = []
  for name, path in MODULES.items():
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("polycom_jax"):
        for a in node.names:
          if a.name.startswith("_"):
            offences.append(f"{name}: from {node.module} import {a.name}")
          if f"{node.module}.{a.name}" in MODULES:
            aliases[a.asname or a.name] = f"{node.module}.{a.name}"
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.name.startswith("polycom_jax") and a.asname:
            aliases[a.asname] = a.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        offences.append(f"{name}: {node.value.id}.{node.attr}")
  assert not offences, offences


def test_modules_are_small():
  sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
  assert all(n <= MAX_LINES for n in sizes.values()), {k: v for k, v in sizes.items()
                                                        if v > MAX_LINES}


@pytest.mark.parametrize("user", ["polycom_jax.evaluation", "polycom_jax.interop",
                                  "polycom_jax.downstream.scoring", "polycom_jax.steps",
                                  "polycom_jax.compile_check"])
def test_evaluation_and_interop_do_not_depend_on_the_training_loop(user):
  assert "polycom_jax.loop" not in _reaches(_graph(), user)


def test_the_library_defines_no_flags_at_import():
  """Every library module imports into a program that has its own --config (train.py), where a
  library flag would raise DuplicateFlagError, and defines no flag of its own (the entry points
  ask for distributed.define_flags() themselves)."""
  modules = sorted(MODULES)
  script = (
      "import importlib\nfrom absl import flags\nimport train\n"
      "before = set(flags.FLAGS)\n"
      f"for m in {modules!r}: importlib.import_module(m)\n"
      "added = sorted(set(flags.FLAGS) - before)\n"
      "ours = [f for f in added if flags.FLAGS.find_module_defining_flag(f).startswith("
      "'polycom_jax')]\n"
      "assert not ours, ours\n"
      "print('ok')\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
