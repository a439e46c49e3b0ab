"""Plots (matplotlib, Agg) and markdown: a run's ``report.md``, the results page and the README section.

``python -m experiments report`` takes the latest finished run of each experiment under the workdir,
copies its plots to the tracked ``experiments/results/<name>/``, writes ``experiments/results/README.md``
and rewrites the README between ``<!-- section:experiments -->`` and ``<!-- /section:experiments -->``.
A run from a dirty tree (or one whose code version is unknown) or with ``--config`` overrides is refused
unless allowed (``allow_dirty``, ``allow_overrides``); the page names each published run folder, its commit,
its pre-registration version and the machine its seconds were measured on, and lists every finished run of
an experiment when their verdicts differ.

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
from experiments import provenance  # noqa: E402  pylint: disable=g-import-not-at-top

SECTION_START = "<!-- section:experiments -->"
SECTION_END = "<!-- /section:experiments -->"
# One colour per arm across every figure of the study: BN before the activation (bn, pre, hidden_bn) is blue
# everywhere, no BN grey; inference's statistics have their own.
ARM_COLORS = {
  "none": "tab:gray",
  "bn": "tab:blue",
  "pre": "tab:blue",
  "post": "tab:orange",
  "input_bn": "tab:green",
  "hidden_bn": "tab:blue",
  "standardized": "tab:purple",
  "majority": "black",
  "running_biased": "tab:gray",
  "running_unbiased": "tab:brown",
  "population_alg2": "tab:blue",
  "precise_bn": "tab:red",
  "whole_split": "tab:green",
  "adabn": "tab:red",
  "noisy_bn": "tab:cyan",
  "no_decay": "tab:orange",
  "decay": "tab:green",
  "ghost_bn": "tab:cyan",
  "renorm": "tab:red",
  "layernorm": "tab:green",
  "groupnorm": "tab:purple",
  "dropout": "tab:olive",
  "bn_dropout": "tab:brown",
}
PNG_DPI = 160


# ---------------------------------------------------------------------------------------------------------
# Plots.


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.2, title: str = ""):
  """A grid of axes; ``title`` (the setup: data, model, optimizer, steps, seeds) heads the figure."""
  extra = 0.45 if title else 0.0
  # Constrained layout spaces panels by their titles and labels, so none overlaps or is clipped.
  fig, axes = plt.subplots(
    nrows, ncols, figsize=(width * ncols, height * nrows + extra), squeeze=False, layout="constrained"
  )
  if title:
    fig.suptitle(title, fontsize="medium")
  return fig, axes


def target_line(ax, accuracy: float) -> None:
  """A dotted horizontal line at a preregistered target accuracy (a fraction), labelled in percent."""
  ax.axhline(accuracy, color="k", linestyle=":", linewidth=0.8, label=f"target {accuracy:.0%}")


def band(
  ax,
  steps,
  values,
  *,
  label: str,
  color: str | None = None,
  logy: bool = False,
  interval: str = "ci",
  linestyle: str = "-",
) -> str:
  """The mean over models (axis 1 of ``values``, ``(T, M)``) with a 95% CI (``"ci"``) or +-1 s.e. band.

  Returns what the band is, e.g. "bands: 95% CI over 10 seeds", for the legend's title. With ``logy`` the
  mean and band are taken over log10 of the values (geometric mean).
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  values = np.asarray(values, np.float64)
  if logy:
    values = np.log10(values)
  mean = np.nanmean(values, axis=1)
  n = values.shape[1]
  se = np.nanstd(values, axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(mean)
  half = se * (stats.t.ppf(0.975, n - 1) if interval == "ci" and n > 1 else 1.0)
  color = color or ARM_COLORS.get(label)
  low, high = mean - half, mean + half
  if logy:
    mean, low, high = 10**mean, 10**low, 10**high
    ax.set_yscale("log")
  ax.plot(steps, mean, label=label, color=color, linestyle=linestyle)
  ax.fill_between(steps, low, high, alpha=0.25, color=color, linewidth=0)
  return f"bands: {'95% CI' if interval == 'ci' else '±1 s.e.'} over {n} seeds"


def save(fig, run, name: str) -> str:
  """Saves ``fig`` as ``<run dir>/<name>.png`` (``PNG_DPI``) and ``<name>.svg``; returns the PNG's name."""
  filename = f"{name}.png"
  fig.savefig(run.path(filename), dpi=PNG_DPI)
  fig.savefig(run.path(f"{name}.svg"))
  plt.close(fig)
  return filename


def differences(
  ax, labels: Sequence[str], cis: Sequence[dict], *, title: str, xlabel: str, color: str = "k", scale: float = 100.0
) -> None:
  """Paired differences as points with their interval bars (one row each), and the zero line."""
  y = np.arange(len(labels))[::-1]
  means = np.array([scale * c["mean"] for c in cis])
  err = np.array([[scale * (c["mean"] - c["low"]), scale * (c["high"] - c["mean"])] for c in cis]).T
  ax.errorbar(means, y, xerr=err, fmt="o", color=color, capsize=3)
  ax.axvline(0.0, color="k", linewidth=0.8, linestyle="--", label="no difference")
  ax.set_yticks(y, labels, fontsize="small")
  ax.set(title=title, xlabel=xlabel)


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
  lines = [
    f"**{text(table['title'])}**",
    "",
    "| " + " | ".join(cell(c) for c in table["columns"]) + " |",
    "|" + "|".join("---" for _ in table["columns"]) + "|",
  ]
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
  parts = [
    f"# {text(summary['experiment'])}: {text(summary['title'])}",
    "",
    f"Run {code(summary['run_dir'])}{' (quick form)' if summary['quick'] else ''}, finished "
    f"{text(summary['finished_utc'])} in {summary['wall_seconds']:.0f} s on "
    f"{text(env['backend'])} ({text(provenance.plural(env['devices'], 'device'))}).",
    "",
    f"**Criterion** (fixed in the config before the run): {text(summary['criterion'])}",
    "",
    *([provenance_line(summary["provenance"]), ""] if summary.get("provenance") else []),
    f"**Verdict**: {verdict_word(summary)}. {text(summary['verdict']['reason'])}",
    "",
  ]
  if summary.get("notes"):
    parts += [text(summary["notes"]), ""]
  for table in summary["tables"]:
    parts += [table_markdown(table)]
  for plot in summary["plots"]:
    parts += [image(plot, plot), ""]
  parts += [
    f"`state_digest`: {code(summary['state_digest'])}",
    "",
    "<details><summary>config</summary>",
    "",
    "```json",
    json.dumps(config_json, indent=2),
    "```",
    "",
    "</details>",
    "",
  ]
  return "\n".join(parts)


def plain(line: str) -> str:
  """``line`` without reST markup: ````code```` and ```ref``` become their text."""
  return re.sub(r"`{1,2}([^`]+)`{1,2}", r"\1", line)


def list_text() -> str:
  lines = []
  for name in config_parsing.EXPERIMENTS:
    module = config_parsing.config_module(name)
    doc = (module.__doc__ or "").strip().splitlines()[0]
    lines.append(f"{name:15s} {plain(doc.split(': ', 1)[-1])}")
  return "\n".join(lines)


def provenance_line(prov: dict) -> str:
  """One line naming the code (commit, dirty files), the overrides and the pre-registration a run used."""
  git = prov.get("git") or {}
  if not git.get("available"):
    code_state = f"code version unknown ({text(git.get('reason') or 'not recorded')})"
  else:
    dirty = git.get("dirty_files") or []
    changed = f"dirty: {', '.join(code(f) for f in dirty[:5])}{' ...' if len(dirty) > 5 else ''}" if dirty else "clean"
    code_state = f"commit {code(str(git.get('commit'))[:12])} ({changed})"
  overrides = prov.get("overrides") or []
  given = ", ".join(code(o) for o in overrides) if overrides else "none"
  pre = prov.get("preregistration") or {}
  if pre.get("version") is None:
    registered = "no pre-registration record"
  else:
    match = "matches" if pre.get("criterion_matches") else "differs from"
    registered = (
      f"pre-registration version {text(pre['version'])} ({code(str(pre.get('digest'))[:12])}; the "
      f"run's criterion {match} it)"
    )
  return f"Provenance: {code_state}; overrides: {given}; {registered}."


# ---------------------------------------------------------------------------------------------------------
# The results page and the README section.

RUNNER_TEXT = """\
Every experiment is one command, run from the repository root; each writes `runs/<name>/<UTC time>/`
(`config.json`, `metrics.jsonl`, `summary.json` with the verdict and a `state_digest` of the final
training state, `report.md`, PNG plots):

```bash
python -m experiments list                       # the experiments
python -m experiments fig1 --show-config         # every config key, its default and what it means
python -m experiments fig1                       # the paper's Figure 1, scaled down (the main job)
python -m experiments train --config.norm=post --config.num_devices=4   # any config key can be overridden
python -m experiments train --resume             # continue the latest run from its checkpoint
python -m experiments all --quick                # every experiment in its seconds-long form
python -m experiments report                     # rebuild this page from the latest runs
```

Each criterion below is in the experiment's config (`experiments/configs/<name>.py`) and in its
pre-registration record (`experiments/preregistration/<name>.toml`: hypothesis, metric, arms, seeds,
threshold, and pilot runs with their results, one version per change; the first versions were
reconstructed from git history). The verdict is computed from the recorded metrics and reported whichever
way it goes. Each section names the run it shows (folder, commit, pre-registration version); when runs of
an experiment disagree, all of them are listed. Numbers are mean ± standard error over seeds unless a row
says otherwise.
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
    self.siblings: list = []  # Every finished run of the experiment, when their verdicts differ.


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
    raise ReportError(
      f"--workdir: {path}: resolves to {resolved}, outside its run folder {folder}; expected a "
      f"file inside the run folder"
    )
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
  _check(
    isinstance(columns, list) and all(isinstance(c, str) for c in columns),
    where,
    f"{field}.columns",
    columns,
    "a list of strings",
  )
  _check(
    isinstance(rows, list) and all(isinstance(r, list) and all(isinstance(v, _SCALAR) for v in r) for r in rows),
    where,
    f"{field}.rows",
    rows,
    "a list of rows, each a list of numbers, strings, booleans or nulls",
  )


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
  _check(
    summary["experiment"] == name,
    where,
    "experiment",
    summary["experiment"],
    f"{name!r}, the experiment whose folder holds it",
  )
  for field in ("title", "criterion", "finished_utc"):
    _check(isinstance(summary.get(field), str), where, field, summary.get(field), "a string")
  _check(isinstance(summary.get("notes", ""), (str, type(None))), where, "notes", summary.get("notes"), "a string")
  _check(isinstance(summary.get("quick"), bool), where, "quick", summary.get("quick"), "true or false")
  _check(_is_number(summary.get("wall_seconds")), where, "wall_seconds", summary.get("wall_seconds"), "a number")
  digest = summary.get("state_digest")
  _check(
    isinstance(digest, str) and _DIGEST.fullmatch(digest) is not None,
    where,
    "state_digest",
    digest,
    "a hexadecimal string",
  )
  verdict = summary.get("verdict")
  _check(
    isinstance(verdict, dict) and isinstance(verdict.get("held"), bool) and isinstance(verdict.get("reason"), str),
    where,
    "verdict",
    verdict,
    "an object with held (true or false) and reason (a string)",
  )
  env = summary.get("environment")
  _check(
    isinstance(env, dict) and all(isinstance(env.get(k), _SCALAR) and k in env for k in _REQUIRED_ENVIRONMENT),
    where,
    "environment",
    env,
    f"an object with {', '.join(_REQUIRED_ENVIRONMENT)}",
  )
  if "provenance" in summary:
    _check_provenance(summary["provenance"], where)
  tables = summary.get("tables")
  _check(isinstance(tables, list), where, "tables", tables, "a list")
  for i, table in enumerate(tables):
    _check_table(table, where, f"tables[{i}]")
  plots = summary.get("plots")
  _check(isinstance(plots, list), where, "plots", plots, "a list of file names")
  for i, plot in enumerate(plots):
    _check(
      isinstance(plot, str) and _PLOT_NAME.fullmatch(plot) is not None,
      where,
      f"plots[{i}]",
      plot,
      "the name of a .png file in the run folder (letters, digits, '.', '_', '-'; no folder)",
    )
  _check(len(set(plots)) == len(plots), where, "plots", plots, "no name twice")
  return summary


def _is_text_list(value) -> bool:
  return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_provenance(prov, where: pathlib.Path) -> None:
  """The fields of a summary's ``provenance`` the report reads, checked like the rest of the summary."""
  _check(isinstance(prov, dict), where, "provenance", prov, "an object")
  git = prov.get("git")
  _check(
    isinstance(git, dict) and isinstance(git.get("available"), bool),
    where,
    "provenance.git",
    git,
    "an object with available (true or false)",
  )
  _check(
    isinstance(git.get("commit"), (str, type(None))),
    where,
    "provenance.git.commit",
    git.get("commit"),
    "a string or null",
  )
  _check(
    isinstance(git.get("dirty"), (bool, type(None))),
    where,
    "provenance.git.dirty",
    git.get("dirty"),
    "true, false or null",
  )
  _check(
    _is_text_list(git.get("dirty_files", [])),
    where,
    "provenance.git.dirty_files",
    git.get("dirty_files"),
    "a list of file names",
  )
  _check(
    _is_text_list(prov.get("overrides")),
    where,
    "provenance.overrides",
    prov.get("overrides"),
    "a list of KEY=VALUE strings",
  )
  machine = prov.get("machine")
  _check(
    isinstance(machine, dict)
    and all(
      isinstance(v, _SCALAR) or (isinstance(v, list) and all(_is_number(x) for x in v)) for v in machine.values()
    ),
    where,
    "provenance.machine",
    machine,
    "an object of strings and numbers",
  )
  pre = prov.get("preregistration")
  _check(
    isinstance(pre, dict)
    and isinstance(pre.get("version"), (int, type(None)))
    and isinstance(pre.get("digest"), (str, type(None))),
    where,
    "provenance.preregistration",
    pre,
    "an object with version (a number or null) and digest (a string or null)",
  )


def _refusal(run: _Run, allow_dirty: bool, allow_overrides: bool) -> str | None:
  """Why ``run`` may not be published without an allowance (None: it may)."""
  prov = run.summary.get("provenance")
  if prov is None:
    return None  # Made before runs recorded provenance: published, and the page says it is not recorded.
  git = prov["git"]
  where = run.folder
  if not allow_dirty and not git["available"]:
    return (
      f"--workdir: {where}: its code version is unknown ({git.get('reason')}); expected a run from a git "
      f"checkout at a clean commit (rerun it there, or pass --allow-dirty)"
    )
  if not allow_dirty and git.get("dirty"):
    dirty = git.get("dirty_files") or []
    return (
      f"--workdir: {where}: ran from a dirty tree ({len(dirty)} changed file(s): {', '.join(dirty[:5])}"
      f"{' ...' if len(dirty) > 5 else ''}); expected a run from a clean commit (commit, rerun, or pass "
      f"--allow-dirty)"
    )
  if not allow_overrides and prov["overrides"]:
    return (
      f"--workdir: {where}: ran with overrides {prov['overrides']}; expected the config as committed "
      f"(rerun without them, or pass --allow-overrides)"
    )
  return None


def _sibling(directory: pathlib.Path, folder: pathlib.Path) -> dict:
  """What the page lists of a finished run: folder, verdict, quick, commit, overrides (None: unreadable)."""
  try:
    summary = json.loads(_read_inside(folder, "summary.json"))
    prov = summary.get("provenance") or {}
    if not isinstance(summary["verdict"]["held"], bool):
      raise TypeError("verdict.held")
    return {
      "folder": directory,
      "held": summary["verdict"]["held"],
      "quick": summary.get("quick") is True,
      "commit": (prov.get("git") or {}).get("commit"),
      "overrides": prov.get("overrides"),
    }
  except (ReportError, ValueError, KeyError, TypeError, AttributeError):
    return {"folder": directory, "held": None, "quick": None, "commit": None, "overrides": None}


def _siblings(workdir: pathlib.Path, name: str) -> list:
  """Every finished run of ``name``, if their verdicts differ; else an empty list."""
  from experiments import runner  # pylint: disable=g-import-not-at-top

  finished = [d for d in runner.run_dirs(pathlib.Path(workdir), name) if (d / "summary.json").exists()]
  inside = pathlib.Path(workdir).resolve()
  listed = [
    _sibling(d, d.resolve()) if d.resolve().is_relative_to(inside) else _sibling(d, inside / ".outside")
    for d in finished
  ]
  verdicts = {s["held"] for s in listed if s["held"] is not None}
  return listed if len(verdicts) > 1 else []


def _read_run(workdir: pathlib.Path, name: str, directory: pathlib.Path) -> _Run:
  """The checked run in ``directory``: inside ``workdir`` (resolved), a valid summary, its plots read."""
  folder = directory.resolve()
  if not folder.is_relative_to(workdir):
    raise ReportError(
      f"--workdir: {directory}: resolves to {folder}, outside the workdir {workdir}; expected a run folder inside it"
    )
  where = directory / "summary.json"
  raw = _read_inside(folder, "summary.json")
  try:
    summary = json.loads(raw)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
    raise ReportError(f"--workdir: {where}: is not valid JSON ({e}); expected a run's summary") from None
  _check_summary(summary, name, where)
  plots = {plot: _read_inside(folder, plot) for plot in summary["plots"]}
  for plot in summary["plots"]:  # each figure's vector twin, published beside its PNG when the run made one
    twin = plot[: -len(".png")] + ".svg"
    if os.path.lexists(folder / twin):
      plots[twin] = _read_inside(folder, twin)
  return _Run(name, directory, summary, raw, plots)


def _latest_runs(workdir, *, allow_dirty: bool = False, allow_overrides: bool = False) -> list:
  """The latest finished run of each experiment in ``workdir``, checked (see `_read_run`) and allowed."""
  from experiments import runner  # pylint: disable=g-import-not-at-top

  resolved = pathlib.Path(workdir).resolve()
  runs = []
  for name in config_parsing.EXPERIMENTS:
    directory = runner.latest_finished_run(pathlib.Path(workdir), name)
    if directory is not None:
      run = _read_run(resolved, name, directory)
      refusal = _refusal(run, allow_dirty, allow_overrides)
      if refusal:
        raise ReportError(refusal)
      run.siblings = _siblings(workdir, name)
      runs.append(run)
  return runs


def _machines_and_loads(runs) -> list:
  """One entry per machine the runs were measured on, with the range of their loads at start."""
  loads: dict = {}
  for run in runs:
    machine = (run.summary.get("provenance") or {}).get("machine")
    if machine is None:
      loads.setdefault(_machine_of(run.summary), [])
      continue
    machine = dict(machine)
    load = machine.pop("load_average", None)
    loads.setdefault(text(provenance.machine_line(machine)), []).extend(load[:1] if load else [])
  return [
    f"{machine} (load average at start {min(values)}-{max(values)})" if values else machine
    for machine, values in sorted(loads.items())
  ]


def _machine_of(summary: dict) -> str:
  prov = summary.get("provenance")
  if prov is None:
    env = summary["environment"]
    return (
      f"{text(env['cpus'])} CPUs, {text(env['backend'])}, "
      f"{text(provenance.plural(env['devices'], 'device'))} (load not recorded)"
    )
  return text(provenance.machine_line(prov["machine"]))


def _published_lines(run: _Run) -> list:
  """Which run a section shows, its provenance and machine, and every run when their verdicts differ."""
  s = run.summary
  lines = [f"Published run {code(run.folder.as_posix())}, {text(s['wall_seconds'])} s on {_machine_of(s)}.", ""]
  lines += [
    provenance_line(s["provenance"])
    if s.get("provenance")
    else "Provenance: not recorded (a run made before runs recorded their commit, overrides and pre-registration).",
    "",
  ]
  if run.siblings:
    lines += [f"**Runs disagree**: {len(run.siblings)} finished runs of {run.name} have different verdicts:", ""]
    for sib in run.siblings:
      held = {True: "held", False: "not held", None: "unreadable"}[sib["held"]]
      overrides = ", ".join(code(o) for o in sib["overrides"] or []) or "none"
      lines.append(
        f"- {code(sib['folder'].as_posix())}: {held}{' (quick)' if sib['quick'] else ''}, commit "
        f"{code(str(sib['commit'])[:12])}, overrides {overrides}"
      )
    lines.append("")
  return lines


def _results_markdown(runs: Sequence[_Run], *, image_prefix: str, heading: str) -> str:
  parts = [RUNNER_TEXT]
  if not runs:
    parts.append("No finished runs yet: run the experiments, then `python -m experiments report`.\n")
  parts.append("| experiment | criterion | verdict | seconds |\n|---|---|---|---|")
  for run in runs:
    s = run.summary
    quick = " (quick)" if s["quick"] else ""
    disagree = " (runs disagree)" if run.siblings else ""
    parts.append(
      f"| [{run.name}](#{run.name}){quick} | {cell(s['criterion'])} | "
      f"{verdict_word(s)}{disagree} | {s['wall_seconds']:.0f} |"
    )
  machines = _machines_and_loads(runs)
  if machines:
    parts.append(
      f"\nSeconds are each run's wall time, measured on: {'; or '.join(machines)} (the machine of "
      f"each run is in its section)."
    )
  parts.append("")
  for run in runs:
    s = run.summary
    quick = " (quick form)" if s["quick"] else ""
    title = text(s["title"])
    parts += [
      f"{heading} {run.name}",
      "",
      f"{title[:1].upper()}{title[1:]}{quick}.",
      "",
      f"Criterion: {text(s['criterion'])} Verdict: {verdict_word(s)}. {text(s['verdict']['reason'])}",
      "",
    ]
    if s.get("notes"):
      parts += [text(s["notes"]), ""]
    for table in s["tables"]:
      parts.append(table_markdown(table))
    for plot in s["plots"]:
      parts += [image(f"{run.name} {plot}", f"{image_prefix}{run.name}/{plot}"), ""]
    parts += _published_lines(run)
    env = s["environment"]
    parts += [
      f"<sub>{text(env['backend'])}, {text(provenance.plural(env['devices'], 'device'))}, "
      f"{text(env['cpus'])} CPUs, jax {text(env['jax'])}; state_digest {code(s['state_digest'][:16])}</sub>",
      "",
    ]
  return "\n".join(parts)


def _readme_with_section(readme_path: pathlib.Path, body: str) -> str:
  """The README's text with ``body`` between the section markers; a `ReportError` if the markers are missing."""
  try:
    old = readme_path.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise ReportError(f"--readme: {readme_path} cannot be read ({e}); expected the README to update") from None
  if SECTION_START not in old or SECTION_END not in old.split(SECTION_START, 1)[1]:
    raise ReportError(
      f"--readme: {readme_path} has no {SECTION_START} ... {SECTION_END} markers; expected "
      f"the section the results go in"
    )
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


def build(
  *,
  workdir: str = "runs",
  results_dir: str = "experiments/results",
  readme: str | None = None,
  allow_dirty: bool = False,
  allow_overrides: bool = False,
) -> Sequence[pathlib.Path]:
  """Copies the latest runs' plots and summaries to ``results_dir`` and rewrites the README section.

  Every run is read and checked, and every new file written, before anything that exists is replaced.

  Args:
    workdir: the folder of runs (``<workdir>/<experiment>/<UTC time>/``).
    results_dir: the tracked results folder; ``<results_dir>/<experiment>/`` is replaced for each run found.
    readme: the README whose section is rewritten, or None.
    allow_dirty: publish runs from a dirty tree, or whose code version is unknown.
    allow_overrides: publish runs made with ``--config`` overrides.

  Returns:
    The files written.

  Raises:
    ReportError: naming the run folder, file and field, the results folder or the README that is unusable.
  """
  results = pathlib.Path(results_dir)
  runs = _latest_runs(workdir, allow_dirty=allow_dirty, allow_overrides=allow_overrides)
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
