"""Plots (matplotlib, Agg) and markdown: a run's ``report.md``, the results page and the README section.

``python -m experiments report`` takes the latest finished run of each experiment under the workdir,
copies its plots to the tracked ``experiments/results/<name>/``, writes ``experiments/results/README.md``
and rewrites the README between ``<!-- section:experiments -->`` and ``<!-- /section:experiments -->``.

A run folder is not trusted: its ``summary.json`` is checked field by field (the experiment must be the
one whose folder holds it, plots plain ``.png`` names), every file read must lie inside its run folder
(a symlink out of it is refused), and text that reaches markdown cannot open a code block, raw HTML or
the section markers. Nothing is replaced before its replacement is complete: each ``results/<name>/`` is
built beside the old one and swapped in by renames, files are written atomically.
"""
import json
import math
import os
import pathlib
import re
import shutil
import stat
import uuid
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import config_parsing  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments import files  # noqa: E402  pylint: disable=g-import-not-at-top

SECTION_START = "<!-- section:experiments -->"
SECTION_END = "<!-- /section:experiments -->"
ARM_COLORS = {"none": "tab:gray", "bn": "tab:blue", "pre": "tab:blue", "post": "tab:orange",
              "input_bn": "tab:green", "hidden_bn": "tab:blue", "standardized": "tab:purple"}


# ---------------------------------------------------------------------------------------------------------
# Plots.


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.2):
  fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
  return fig, axes


def band(ax, steps, values, *, label: str, color: str | None = None, logy: bool = False):
  """The mean over models (axis 1 of ``values``, shape ``(T, M)``) with a +- 1 standard-error band."""
  values = np.asarray(values, np.float64)
  if logy:
    values = np.log10(values)
  mean = np.nanmean(values, axis=1)
  n = values.shape[1]
  se = np.nanstd(values, axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(mean)
  color = color or ARM_COLORS.get(label)
  if logy:
    ax.plot(steps, 10**mean, label=label, color=color)
    ax.fill_between(steps, 10**(mean - se), 10**(mean + se), alpha=0.25, color=color, linewidth=0)
    ax.set_yscale("log")
  else:
    ax.plot(steps, mean, label=label, color=color)
    ax.fill_between(steps, mean - se, mean + se, alpha=0.25, color=color, linewidth=0)


def save(fig, run, name: str) -> str:
  """Saves ``fig`` as ``<run dir>/<name>.png`` and returns the file name."""
  fig.tight_layout()
  filename = f"{name}.png"
  fig.savefig(run.path(filename), dpi=90)
  plt.close(fig)
  return filename


# ---------------------------------------------------------------------------------------------------------
# Markdown.


def fmt(value) -> str:
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, float):
    if math.isnan(value):
      return "n/a"
    if math.isinf(value):
      return "never"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
      return f"{value:.3g}"
    return f"{value:.4g}"
  if value is None:
    return "n/a"
  return str(value)


_FENCE = re.compile(r"`{3,}|~{3,}")


def text(value) -> str:
  """``value`` as one line of markdown that cannot open a code block, raw HTML or a section marker.

  Args:
    value: any value; run folders are not trusted, so neither is its text.

  Returns:
    Its text with line breaks and runs of blanks as one space, fences shortened to one character, and
    ``<`` as an entity (no tag, comment or marker can start).
  """
  line = " ".join(str(value).split())
  line = _FENCE.sub(lambda m: m.group(0)[0], line)
  return line.replace("<", "&lt;")


def cell(value) -> str:
  """``value`` formatted (`fmt`) as the text of one table cell."""
  return text(fmt(value)).replace("|", "\\|")


def code(value) -> str:
  """``value`` as an inline code span (backticks dropped: they would end it)."""
  return "`" + text(value).replace("`", "") + "`"


def table_markdown(table: dict) -> str:
  lines = [f"**{text(table['title'])}**", "", "| " + " | ".join(cell(c) for c in table["columns"]) + " |",
           "|" + "|".join("---" for _ in table["columns"]) + "|"]
  for row in table["rows"]:
    lines.append("| " + " | ".join(cell(v) for v in row) + " |")
  return "\n".join(lines) + "\n"


def verdict_word(summary: dict) -> str:
  return "**held**" if summary["verdict"]["held"] else "**not held**"


def image(alt: str, path: str) -> str:
  """A markdown image; ``path`` is built from checked names only (see `_check_summary`)."""
  return f"![{text(alt)}]({path})"


def run_markdown(summary: dict, config_json: dict) -> str:
  """A run's ``report.md``: what ran, the criterion and its verdict, the tables and the plots."""
  env = summary["environment"]
  parts = [f"# {text(summary['experiment'])}: {text(summary['title'])}", "",
           f"Run {code(summary['run_dir'])}{' (quick form)' if summary['quick'] else ''}, finished "
           f"{text(summary['finished_utc'])} in {summary['wall_seconds']:.0f} s on "
           f"{text(env['backend'])} ({text(env['devices'])} devices).", "",
           f"**Criterion** (fixed in the config before the run): {text(summary['criterion'])}", "",
           f"**Verdict**: {verdict_word(summary)}. {text(summary['verdict']['reason'])}", ""]
  if summary.get("notes"):
    parts += [text(summary["notes"]), ""]
  for table in summary["tables"]:
    parts += [table_markdown(table)]
  for plot in summary["plots"]:
    parts += [image(plot, plot), ""]
  parts += [f"`state_digest`: {code(summary['state_digest'])}", "", "<details><summary>config</summary>", "",
            "```json", json.dumps(config_json, indent=2), "```", "", "</details>", ""]
  return "\n".join(parts)


def list_text() -> str:
  lines = []
  for name in config_parsing.EXPERIMENTS:
    module = config_parsing.config_module(name)
    doc = (module.__doc__ or "").strip().splitlines()[0]
    lines.append(f"{name:15s} {doc.split(': ', 1)[-1]}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The results page and the README section.

RUNNER_TEXT = """\
Every experiment is one command, run from the repository root; each writes `runs/<name>/<UTC time>/`
(`config.json`, `metrics.jsonl`, `summary.json` with the verdict and a `state_digest` of the final
training state, `report.md`, PNG plots):

```bash
python -m experiments list                       # the experiments
python -m experiments fig1                       # the paper's Figure 1, scaled down (the main job)
python -m experiments train --config.norm=post --config.num_devices=4   # any config key can be overridden
python -m experiments train --resume             # continue the latest run from its checkpoint
python -m experiments all --quick                # every experiment in its seconds-long form
python -m experiments report                     # rebuild this section from the latest runs
```

Each criterion below was written into the experiment's config (`experiments/configs/<name>.py`) before it
ran; the verdict is computed from the recorded metrics and reported whichever way it goes. Numbers are
mean ± standard error over seeds unless a row says otherwise.
"""


class ReportError(ValueError):
  """A run folder, results folder or README the report cannot use; the message names it and what was expected."""


_PLOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.png")  # a plain file name: no folder, no "..", no blanks
_DIGEST = re.compile(r"[0-9a-f]{1,128}")
_SCALAR = (str, int, float, bool, type(None))
_REQUIRED_ENVIRONMENT = ("backend", "devices", "cpus", "jax")


class _Run:
  """A finished run, checked: its experiment, folder, summary, and the bytes of its summary and plots."""

  def __init__(self, name: str, folder: pathlib.Path, summary: dict, summary_bytes: bytes, plots: dict):
    self.name = name
    self.folder = folder
    self.summary = summary
    self.summary_bytes = summary_bytes
    self.plots = plots


def _read_inside(folder: pathlib.Path, name: str) -> bytes:
  """The bytes of the regular file ``folder/name``; a `ReportError` if it resolves outside ``folder``.

  Args:
    folder: a run folder (already resolved).
    name: a file name in it.

  Returns:
    The file's content.
  """
  path = folder / name
  resolved = path.resolve()
  if not resolved.is_relative_to(folder):
    raise ReportError(f"--workdir: {path}: resolves to {resolved}, outside its run folder {folder}; expected a "
                      f"file inside the run folder")
  try:  # No following a link swapped in since, no blocking on a FIFO.
    fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
  except OSError as e:
    raise ReportError(f"--workdir: {path}: cannot be read ({e.strerror or e}); expected a readable file") from None
  with os.fdopen(fd, "rb") as f:
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
      raise ReportError(f"--workdir: {path}: is not a regular file; expected a file")
    return f.read()


def _check(ok: bool, where: pathlib.Path, field: str, value, expected: str) -> None:
  if not ok:
    raise ReportError(f"--workdir: {where}: {field}: got {value!r:.100}, expected {expected}")


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_table(table, where: pathlib.Path, field: str) -> None:
  _check(isinstance(table, dict), where, field, table, "an object with title, columns and rows")
  _check(isinstance(table.get("title"), str), where, f"{field}.title", table.get("title"), "a string")
  columns, rows = table.get("columns"), table.get("rows")
  _check(isinstance(columns, list) and all(isinstance(c, str) for c in columns), where, f"{field}.columns",
         columns, "a list of strings")
  _check(isinstance(rows, list) and all(isinstance(r, list) and all(isinstance(v, _SCALAR) for v in r)
                                         for r in rows), where, f"{field}.rows", rows,
         "a list of rows, each a list of numbers, strings, booleans or nulls")


def _check_summary(summary, name: str, where: pathlib.Path) -> dict:
  """``summary`` if it is a well-formed summary of experiment ``name``; else a `ReportError` naming the field.

  Args:
    summary: the parsed ``summary.json``.
    name: the experiment whose folder holds it.
    where: the file, for messages.

  Returns:
    ``summary``.
  """
  _check(isinstance(summary, dict), where, "the summary", summary, "a JSON object")
  try:
    config_parsing.check_name(summary.get("experiment"))
  except config_parsing.ConfigError as e:
    raise ReportError(f"--workdir: {where}: {e}") from None
  _check(summary["experiment"] == name, where, "experiment", summary["experiment"],
         f"{name!r}, the experiment whose folder holds it")
  for field in ("title", "criterion", "finished_utc"):
    _check(isinstance(summary.get(field), str), where, field, summary.get(field), "a string")
  _check(isinstance(summary.get("notes", ""), (str, type(None))), where, "notes", summary.get("notes"),
         "a string")
  _check(isinstance(summary.get("quick"), bool), where, "quick", summary.get("quick"), "true or false")
  _check(_is_number(summary.get("wall_seconds")), where, "wall_seconds", summary.get("wall_seconds"), "a number")
  digest = summary.get("state_digest")
  _check(isinstance(digest, str) and _DIGEST.fullmatch(digest) is not None, where, "state_digest", digest,
         "a hexadecimal string")
  verdict = summary.get("verdict")
  _check(isinstance(verdict, dict) and isinstance(verdict.get("held"), bool)
         and isinstance(verdict.get("reason"), str), where, "verdict", verdict,
         "an object with held (true or false) and reason (a string)")
  env = summary.get("environment")
  _check(isinstance(env, dict) and all(isinstance(env.get(k), _SCALAR) and k in env for k in _REQUIRED_ENVIRONMENT),
         where, "environment", env, f"an object with {', '.join(_REQUIRED_ENVIRONMENT)}")
  tables = summary.get("tables")
  _check(isinstance(tables, list), where, "tables", tables, "a list")
  for i, table in enumerate(tables):
    _check_table(table, where, f"tables[{i}]")
  plots = summary.get("plots")
  _check(isinstance(plots, list), where, "plots", plots, "a list of file names")
  for i, plot in enumerate(plots):
    _check(isinstance(plot, str) and _PLOT_NAME.fullmatch(plot) is not None, where, f"plots[{i}]", plot,
           "the name of a .png file in the run folder (letters, digits, '.', '_', '-'; no folder)")
  _check(len(set(plots)) == len(plots), where, "plots", plots, "no name twice")
  return summary


def _read_run(workdir: pathlib.Path, name: str, directory: pathlib.Path) -> _Run:
  """The checked run in ``directory``: inside ``workdir`` (resolved), a valid summary, its plots read."""
  folder = directory.resolve()
  if not folder.is_relative_to(workdir):
    raise ReportError(f"--workdir: {directory}: resolves to {folder}, outside the workdir {workdir}; expected a "
                      f"run folder inside it")
  where = directory / "summary.json"
  raw = _read_inside(folder, "summary.json")
  try:
    summary = json.loads(raw)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise ReportError(f"--workdir: {where}: is not valid JSON ({e}); expected a run's summary") from None
  _check_summary(summary, name, where)
  plots = {plot: _read_inside(folder, plot) for plot in summary["plots"]}
  return _Run(name, directory, summary, raw, plots)


def _latest_runs(workdir) -> list:
  """The latest finished run of each experiment in ``workdir``, checked (see `_read_run`)."""
  from experiments import runner  # pylint: disable=g-import-not-at-top
  resolved = pathlib.Path(workdir).resolve()
  runs = []
  for name in config_parsing.EXPERIMENTS:
    directory = runner.latest_finished_run(pathlib.Path(workdir), name)
    if directory is not None:
      runs.append(_read_run(resolved, name, directory))
  return runs


def _results_markdown(runs: Sequence[_Run], *, image_prefix: str, heading: str) -> str:
  parts = [RUNNER_TEXT]
  if not runs:
    parts.append("No finished runs yet: run the experiments, then `python -m experiments report`.\n")
  parts.append("| experiment | criterion | verdict | seconds |\n|---|---|---|---|")
  for run in runs:
    s = run.summary
    quick = " (quick)" if s["quick"] else ""
    parts.append(f"| [{run.name}](#{run.name.replace('_', '-')}){quick} | {cell(s['criterion'])} | "
                 f"{verdict_word(s)} | {s['wall_seconds']:.0f} |")
  parts.append("")
  for run in runs:
    s = run.summary
    quick = " (quick form)" if s["quick"] else ""
    title = text(s["title"])
    parts += [f"{heading} {run.name}", "", f"{title[:1].upper()}{title[1:]}{quick}.", "",
              f"Criterion: {text(s['criterion'])} Verdict: {verdict_word(s)}. {text(s['verdict']['reason'])}", ""]
    if s.get("notes"):
      parts += [text(s["notes"]), ""]
    for table in s["tables"]:
      parts.append(table_markdown(table))
    for plot in s["plots"]:
      parts += [image(f"{run.name} {plot}", f"{image_prefix}{run.name}/{plot}"), ""]
    env = s["environment"]
    parts += [f"<sub>{text(env['backend'])}, {text(env['devices'])} device(s), {text(env['cpus'])} CPUs, "
              f"jax {text(env['jax'])}; state_digest {code(s['state_digest'][:16])}</sub>", ""]
  return "\n".join(parts)


def _readme_with_section(readme_path: pathlib.Path, body: str) -> str:
  """The README's text with ``body`` between the section markers; a `ReportError` if the markers are missing."""
  try:
    old = readme_path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise ReportError(f"--readme: {readme_path} cannot be read ({e}); expected the README to update") from None
  if SECTION_START not in old or SECTION_END not in old.split(SECTION_START, 1)[1]:
    raise ReportError(f"--readme: {readme_path} has no {SECTION_START} ... {SECTION_END} markers; expected "
                      f"the section the results go in")
  head, rest = old.split(SECTION_START, 1)
  _, tail = rest.split(SECTION_END, 1)
  return f"{head}{SECTION_START}\n{body}\n{SECTION_END}{tail}"


def _unique(folder: pathlib.Path, name: str, kind: str) -> pathlib.Path:
  return folder / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}"


def _stage(results: pathlib.Path, run: _Run) -> pathlib.Path:
  """A new hidden folder in ``results`` holding ``run``'s plots and ``summary.json``, written and fsynced."""
  stage = _unique(results, run.name, "partial")
  stage.mkdir()
  try:
    for filename, data in (*run.plots.items(), ("summary.json", run.summary_bytes)):
      files.write_atomic(stage / filename, data)
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    raise
  return stage


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  else:
    path.unlink()


def _swap_in(stage: pathlib.Path, target: pathlib.Path) -> None:
  """Renames ``stage`` to ``target``; what was at ``target`` is removed only once ``stage`` has its place."""
  old = None
  if os.path.lexists(target):
    old = _unique(target.parent, target.name, "old")
    os.rename(target, old)
  try:
    os.rename(stage, target)
  except BaseException:
    if old is not None:
      os.rename(old, target)
    raise
  files.fsync_dir(target.parent)
  if old is not None:
    _remove(old)


def _ready_results(results: pathlib.Path) -> None:
  try:
    results.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ReportError(f"--results_dir: {results} cannot be created ({e.strerror or e}); expected a folder") from None
  if not results.is_dir():
    raise ReportError(f"--results_dir: {results} is not a folder; expected a folder for the results")


def build(*, workdir: str = "runs", results_dir: str = "experiments/results",
          readme: str | None = "README.md") -> Sequence[pathlib.Path]:
  """Copies the latest runs' plots and summaries to ``results_dir`` and rewrites the README section.

  Every run is read and checked, and every new file written, before anything that exists is replaced.

  Args:
    workdir: the folder of runs (``<workdir>/<experiment>/<UTC time>/``).
    results_dir: the tracked results folder; ``<results_dir>/<experiment>/`` is replaced for each run found.
    readme: the README whose section is rewritten, or None.

  Returns:
    The files written.

  Raises:
    ReportError: naming the run folder, file and field, the results folder or the README that is unusable.
  """
  results = pathlib.Path(results_dir)
  runs = _latest_runs(workdir)
  page = "# bnjax experiment results\n\n" + _results_markdown(runs, image_prefix="", heading="##")
  readme_path = pathlib.Path(readme) if readme else None
  readme_text = None
  if readme_path is not None:
    prefix = str(results.as_posix()).rstrip("/") + "/"
    readme_text = _readme_with_section(readme_path, _results_markdown(runs, image_prefix=prefix, heading="###"))
  _ready_results(results)
  staged = []
  try:
    for run in runs:
      staged.append(_stage(results, run))
  except BaseException:
    for stage in staged:
      shutil.rmtree(stage, ignore_errors=True)
    raise
  written = []
  for stage, run in zip(staged, runs, strict=True):
    target = results / run.name
    _swap_in(stage, target)
    written += [target / plot for plot in run.plots] + [target / "summary.json"]
  written.append(files.write_atomic(results / "README.md", page))
  if readme_path is not None and readme_text is not None:
    written.append(files.write_atomic(readme_path, readme_text))
  return written
