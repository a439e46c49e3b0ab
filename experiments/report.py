"""Plots (matplotlib, Agg) and markdown: a run's ``report.md``, the results page and the README section.

``python -m experiments report`` takes the latest finished run of each experiment under the workdir,
copies its plots to the tracked ``experiments/results/<name>/``, writes ``experiments/results/README.md``
and rewrites the README between ``<!-- section:experiments -->`` and ``<!-- /section:experiments -->``.
"""
import json
import math
import pathlib
import shutil
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import config_parsing  # noqa: E402  pylint: disable=g-import-not-at-top

SECTION_START = "<!-- section:experiments -->"
SECTION_END = "<!-- /section:experiments -->"
ARM_COLORS = {"none": "tab:gray", "bn": "tab:blue", "pre": "tab:blue", "post": "tab:orange",
              "input_bn": "tab:green", "hidden_bn": "tab:blue", "standardized": "tab:purple"}


# ---------------------------------------------------------------------------------------------------------
# Plots.


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.2):
  fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
  return fig, axes


def band(ax, steps, values, *, label: str, color: Optional[str] = None, logy: bool = False):
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


def table_markdown(table: dict) -> str:
  lines = [f"**{table['title']}**", "", "| " + " | ".join(table["columns"]) + " |",
           "|" + "|".join("---" for _ in table["columns"]) + "|"]
  for row in table["rows"]:
    lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
  return "\n".join(lines) + "\n"


def verdict_word(summary: dict) -> str:
  return "**held**" if summary["verdict"]["held"] else "**not held**"


def run_markdown(summary: dict, config_json: dict) -> str:
  """A run's ``report.md``: what ran, the criterion and its verdict, the tables and the plots."""
  parts = [f"# {summary['experiment']}: {summary['title']}", "",
           f"Run `{summary['run_dir']}`{' (quick form)' if summary['quick'] else ''}, finished "
           f"{summary['finished_utc']} in {summary['wall_seconds']:.0f} s on "
           f"{summary['environment']['backend']} ({summary['environment']['devices']} devices).", "",
           f"**Criterion** (fixed in the config before the run): {summary['criterion']}", "",
           f"**Verdict**: {verdict_word(summary)}. {summary['verdict']['reason']}", ""]
  if summary.get("notes"):
    parts += [summary["notes"], ""]
  for table in summary["tables"]:
    parts += [table_markdown(table)]
  for plot in summary["plots"]:
    parts += [f"![{plot}]({plot})", ""]
  parts += [f"`state_digest`: `{summary['state_digest']}`", "", "<details><summary>config</summary>", "",
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


def _latest_summaries(workdir) -> list:
  from experiments import runner  # pylint: disable=g-import-not-at-top
  found = []
  for name in config_parsing.EXPERIMENTS:
    directory = runner.latest_finished_run(pathlib.Path(workdir), name)
    if directory is not None:
      found.append((directory, json.loads((directory / "summary.json").read_text())))
  return found


def _results_markdown(found, *, image_prefix: str, heading: str) -> str:
  parts = [RUNNER_TEXT]
  if not found:
    parts.append("No finished runs yet: run the experiments, then `python -m experiments report`.\n")
  parts.append("| experiment | criterion | verdict | seconds |\n|---|---|---|---|")
  for _, s in found:
    quick = " (quick)" if s["quick"] else ""
    parts.append(f"| [{s['experiment']}](#{s['experiment'].replace('_', '-')}){quick} | {s['criterion']} | "
                 f"{verdict_word(s)} | {s['wall_seconds']:.0f} |")
  parts.append("")
  for _, s in found:
    quick = " (quick form)" if s["quick"] else ""
    title = s["title"][:1].upper() + s["title"][1:]
    parts += [f"{heading} {s['experiment']}", "", f"{title}{quick}.", "",
              f"Criterion: {s['criterion']} Verdict: {verdict_word(s)}. {s['verdict']['reason']}", ""]
    if s.get("notes"):
      parts += [s["notes"], ""]
    for table in s["tables"]:
      parts.append(table_markdown(table))
    for plot in s["plots"]:
      parts += [f"![{s['experiment']} {plot}]({image_prefix}{s['experiment']}/{plot})", ""]
    env = s["environment"]
    parts += [f"<sub>{env['backend']}, {env['devices']} device(s), {env['cpus']} CPUs, jax {env['jax']}; "
              f"state_digest `{s['state_digest'][:16]}`</sub>", ""]
  return "\n".join(parts)


def build(*, workdir: str = "runs", results_dir: str = "experiments/results",
          readme: Optional[str] = "README.md") -> Sequence[pathlib.Path]:
  """Copies the latest runs' plots and summaries to ``results_dir`` and rewrites the README section."""
  results = pathlib.Path(results_dir)
  results.mkdir(parents=True, exist_ok=True)
  found = _latest_summaries(workdir)
  written = []
  for directory, summary in found:
    target = results / summary["experiment"]
    if target.exists():
      shutil.rmtree(target)
    target.mkdir()
    for plot in summary["plots"]:
      shutil.copy2(directory / plot, target / plot)
      written.append(target / plot)
    shutil.copy2(directory / "summary.json", target / "summary.json")
    written.append(target / "summary.json")
  page = results / "README.md"
  page.write_text("# bnjax experiment results\n\n" + _results_markdown(found, image_prefix="", heading="##"))
  written.append(page)
  if readme:
    readme_path = pathlib.Path(readme)
    text = readme_path.read_text()
    if SECTION_START not in text or SECTION_END not in text:
      raise ValueError(f"readme: {readme_path} has no {SECTION_START} ... {SECTION_END} markers; expected "
                       f"the section the results go in")
    prefix = str(results.as_posix()).rstrip("/") + "/"
    body = _results_markdown(found, image_prefix=prefix, heading="###")
    head, rest = text.split(SECTION_START, 1)
    _, tail = rest.split(SECTION_END, 1)
    readme_path.write_text(f"{head}{SECTION_START}\n{body}\n{SECTION_END}{tail}")
    written.append(readme_path)
  return written
