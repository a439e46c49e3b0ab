"""Every ```python snippet in README.md runs.

Snippets are grouped by their `## ` section; the snippets of one section share a namespace and run in
order, so a later snippet may use names an earlier one defined. A section runs in a fresh namespace.
"""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _sections():
  text = README.read_text()
  sections = {}
  for part in re.split(r"^## ", text, flags=re.M)[1:]:
    title, _, body = part.partition("\n")
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    if blocks:
      sections[title.strip()] = blocks
  return sections


SECTIONS = _sections()


def test_readme_has_snippets():
  assert SECTIONS, "README.md has no ```python snippets"


@pytest.mark.parametrize("title", sorted(SECTIONS))
def test_readme_section_runs(title, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": f"readme_{title}"}
  for i, block in enumerate(SECTIONS[title]):
    code = compile(block, f"README.md[{title}#{i}]", "exec")
    exec(code, namespace)  # noqa: S102
