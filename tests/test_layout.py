"""The package layout: `import bnjax` needs jax alone, and nothing under bnjax/ imports the experiments."""

import ast
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Top-level packages that `import bnjax` must not load: the Flax layers' and the tests' dependencies, and
# the experiment infrastructure (importable here, from the repository root, so a stray import would load it).
FORBIDDEN = ("flax", "optax", "chex", "orbax", "experiments")


def test_import_bnjax_loads_neither_flax_optax_chex_orbax_nor_experiments():
  code = "import json, sys, bnjax; print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    check=False,
  )
  assert result.returncode == 0, result.stderr
  loaded = set(json.loads(result.stdout.splitlines()[-1]))
  assert "bnjax" in loaded and "jax" in loaded
  assert not loaded & set(FORBIDDEN), f"`import bnjax` imported {sorted(loaded & set(FORBIDDEN))}"


def _imported_modules(source: str, package: tuple[str, ...]):
  """(line, module) for every import statement in `source`, and every `importlib.import_module("...")` or
  `__import__("...")` call with a literal name; relative imports are resolved against `package`."""
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = ".".join(package[: len(package) - node.level + 1])
        yield node.lineno, ".".join(filter(None, (base, node.module)))
      else:
        yield node.lineno, node.module
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
      if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
        yield node.lineno, node.args[0].value


def _imports_experiments(module: str) -> bool:
  return module == "experiments" or module.startswith("experiments.")


def test_nothing_under_bnjax_imports_experiments():
  sources = sorted((ROOT / "bnjax").rglob("*.py"))
  assert ROOT / "bnjax" / "__init__.py" in sources
  offenders = [
    f"{path.relative_to(ROOT)}:{line}: {module}"
    for path in sources
    for line, module in _imported_modules(path.read_text(), path.relative_to(ROOT).parts[:-1])
    if _imports_experiments(module)
  ]
  assert not offenders, "bnjax imports the experiments:\n" + "\n".join(offenders)


def test_the_import_scan_finds_every_form():
  """The scan above is not vacuous: each way of importing the experiments is found, none of the others."""
  source = """
import experiments
import experiments.data as data
from experiments import checkpoint
from experiments.launch import initialize
importlib.import_module("experiments.data")
__import__("experiments")
import experimentsx
from bnjax import nn
from . import training
"""
  found = [module for _, module in sorted(_imported_modules(source, ("bnjax", "_src")))]
  assert [m for m in found if _imports_experiments(m)] == [
    "experiments",
    "experiments.data",
    "experiments",
    "experiments.launch",
    "experiments.data",
    "experiments",
  ]
  assert [m for m in found if not _imports_experiments(m)] == ["experimentsx", "bnjax", "bnjax._src"]
