"""Every ```python block of README.md and of the documentation pages (docs/**/*.md) runs.

The blocks of one page share a namespace and run in order, in a fresh temporary directory, so a block may use
names an earlier block of the same page defined. Each page runs twice in a row in that same directory, as a
reader who runs the snippets again would. Tracebacks name the page and its line. A block right after
one of these HTML comments does not run; while any block is marked, a skipped test lists them with their
reasons:

  <!-- skip: reason -->      never meant to run here (say why; keep this rare);
  <!-- pending: reason -->   written for an API that is not in the code yet: remove the comment when it is.

Blocks in other languages (```bash, ```text) are not run here: README.md's test command is what .ci/run runs,
and tests/test_launch.py runs the multi-process launch command of docs/guides/training.md.
"""

import ast
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"^<!--\s*(?P<kind>skip|pending)\s*:\s*(?P<reason>.*?)\s*-->[ \t]*$", re.M)


def _pages() -> list:
  """README.md and every page under docs/, not following symlinks (docs/results is the generated results page)."""
  pages = [ROOT / "README.md"]
  for directory, subdirectories, files in os.walk(DOCS):
    subdirectories.sort()
    pages += [pathlib.Path(directory) / f for f in sorted(files) if f.endswith(".md")]
  return pages


def _blocks(path: pathlib.Path) -> list:
  """`(first code line, language, code, marker kind or None, reason)` of each fenced block of a page."""
  text = path.read_text()
  blocks = []
  for fence in FENCE.finditer(text):
    preceding = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
    marker = MARKER.fullmatch(preceding)
    line = text.count("\n", 0, fence.start("code")) + 1
    blocks.append((line, fence["lang"], fence["code"], marker and marker["kind"], marker and marker["reason"]))
  return blocks


def _rel(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix()


PAGES = _pages()
BLOCKS = {_rel(page): _blocks(page) for page in PAGES}
RUNNABLE = sorted(page for page, blocks in BLOCKS.items() if any(b[1] == "python" and not b[3] for b in blocks))
MARKED = [(page, b[0], b[3], b[4]) for page, blocks in sorted(BLOCKS.items()) for b in blocks if b[3]]


def test_pages_have_python_blocks():
  assert "README.md" in RUNNABLE, "README.md has no ```python block that runs"
  assert any(page.startswith("docs/") for page in RUNNABLE), "docs/ has no ```python block that runs"


def test_markers_precede_a_code_block():
  """A skip/pending comment must sit on the line right above a fence, or it marks nothing."""
  for page in PAGES:
    text = page.read_text()
    for marker in MARKER.finditer(text):
      following = text[marker.end() :].lstrip("\n").split("\n", 1)[0]
      assert following.startswith("```"), f"{_rel(page)}: {marker[0]!r} is not right above a code block"
      assert marker["reason"], f"{_rel(page)}: {marker[0]!r} gives no reason"


def test_readme_quickstart_has_the_two_commands():
  """Exactly two set-up-to-result commands: the main experiment, and the tests with every CI extra."""
  commands = [c for c in (ROOT / "README.md").read_text().splitlines() if c.startswith("python3 -m venv ")]
  assert len(commands) == 2, commands
  experiment, tests = commands
  assert experiment.endswith("python -m experiments fig1"), experiment
  assert '".[test,experiments,bench,docs,lint]"' in tests and " && python -m pytest" in tests, tests


def _run_page(page: str) -> None:
  namespace = {"__name__": "__docs__"}
  for line, lang, code, marker, _ in BLOCKS[page]:
    if lang == "python" and not marker:
      # Padded so that tracebacks give the line numbers of the page.
      exec(compile("\n" * (line - 1) + code, str(ROOT / page), "exec"), namespace)  # noqa: S102


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_runs(page, tmp_path, monkeypatch):
  """Twice in a row in the same directory: a snippet may not depend on a fresh folder (e.g. a checkpoint)."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(ROOT))  # `experiments` is a folder of the checkout, not an installed package
  _run_page(page)
  _run_page(page)


def test_marked_blocks_are_listed():
  """Skipped, with every marked block and its reason, while any block is marked."""
  if MARKED:
    pytest.skip(
      "blocks not run: " + "; ".join(f"{page}:{line} {kind}: {reason}" for page, line, kind, reason in MARKED)
    )


def test_the_bad_input_catalogue_names_existing_tests():
  """Each row of docs/guides/errors.md names a test (`tests/file.py::name`) that exists."""
  text = (DOCS / "guides" / "errors.md").read_text()
  rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| input")]
  named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
  assert len(named) == len(rows), "every row of the catalogue names one test"
  for path, name in named:
    tree = ast.parse((ROOT / path).read_text())
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert name in functions, f"docs/guides/errors.md names {path}::{name}, which does not exist"
