"""Runs one experiment: config -> checks -> run folder -> experiment -> verdict -> summary and report.

A run writes ``<workdir>/<name>/<UTC time>/``: ``config.json``, ``metrics.jsonl`` (one JSON object a
line), ``summary.json`` (final metrics, the criterion's verdict, ``state_digest``, ``diverged``: the models
whose loss became non-finite and at which step, ``events``: what a resume skipped and where it started),
``report.md`` and PNG plots. ``config.json`` also holds, and ``summary.json`` ends with, the run's
``provenance`` (`experiments.provenance`: git commit and dirty files, package versions, the overrides given,
seeds, machine and load, the pre-registration version; the summary's adds the wall time). jax is imported
only after the config is checked, so the host device count can still be set for ``num_devices > 1`` on CPU.

The verdict line and the paths of the report and every figure are printed on stdout, always; logs and
progress bars go to stderr, and ``quiet`` hides the progress bars only.

Nothing that exists is removed before its replacement is complete: a run folder appears with its
``config.json`` (built aside, then renamed), and ``summary.json``, ``report.md`` and rewrites of
``metrics.jsonl`` replace the old file atomically (`experiments.files.write_atomic`). ``--resume`` continues
the latest run, or starts a new one from step 0, saying so, when there is none to continue. A run folder
has one writer: the runner holds its ``writer.lock`` (`experiments.files.exclusive`) while it runs, so a
second ``--resume`` of a run still going is refused, naming the process that has it.
"""

import dataclasses
import datetime
import importlib
import itertools
import json
import os
import pathlib
import platform
import shutil
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import ml_collections

from experiments import config_parsing
from experiments import files
from experiments import provenance

DEFAULT_WORKDIR = "runs"


@dataclasses.dataclass
class Verdict:
  """Whether the experiment's pre-registered criterion held, and why (the numbers it compared)."""

  held: bool
  reason: str


@dataclasses.dataclass
class Table:
  """A markdown table: a title, the column names and the rows (numbers are formatted by the report)."""

  title: str
  columns: Sequence[str]
  rows: Sequence[Sequence[Any]]


@dataclasses.dataclass
class Result:
  """What an experiment's ``run`` returns; the runner adds the verdict from ``metrics``."""

  metrics: dict
  tables: list
  plots: list
  state_digest: str
  notes: str = ""


class RunError(ValueError):
  """A run folder or file the runner cannot use (the message names it, what it got and what was expected)."""


class Run:
  """The run folder and the things an experiment writes into it.

  ``note`` prints a message about the run (a checkpoint skipped, where a resume started) and keeps it for
  the summary's ``events``; ``record_divergence`` keeps which models' loss became non-finite, and when,
  for the summary's ``diverged`` and the verdict.
  """

  def __init__(
    self,
    directory: pathlib.Path,
    config: ml_collections.ConfigDict,
    *,
    resume: bool,
    quiet: bool = False,
    name: str = "",
  ):
    self.dir = directory
    self.config = config
    self.resume = resume
    self.quiet = quiet
    self.name = name
    self.metrics_path = directory / "metrics.jsonl"
    self.events: list = []
    self.divergence: dict = {}
    self.models: dict = {}
    self._dropped: set = set()

  def note(self, message: str) -> None:
    """Prints ``message`` to stderr (also when quiet: it reports what happened to the run's data)."""
    self.events.append(message)
    print(f"[{self.name or self.dir.name}] {message}", file=sys.stderr, flush=True)

  def record_divergence(self, arm: str, diverged_at: Sequence[int | None], detail: str = "") -> None:
    """Records, for every model ``i`` of ``arm``, the step it diverged at, ``diverged_at[i]`` (None: never)."""
    steps = [None if s is None else int(s) for s in diverged_at]
    self.models[arm] = len(steps)
    if any(s is not None for s in steps):
      self.divergence[arm] = {"models": len(steps), "diverged_at": steps, "detail": detail}
    else:
      self.divergence.pop(arm, None)

  def log(self, **row) -> None:
    """Appends one JSON object to ``metrics.jsonl`` (numpy / jax scalars and arrays become lists)."""
    with self.metrics_path.open("a") as f:
      f.write(json.dumps(to_jsonable(row)) + "\n")

  def read_metrics(self) -> list:
    """The rows of ``metrics.jsonl``; a cut-short last line (an interrupted write) is dropped with a note.

    Raises:
      RunError: if a line before the last is not a JSON object.
    """
    if not self.metrics_path.exists():
      return []
    lines = self.metrics_path.read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        if not isinstance(row, dict):
          raise ValueError(f"a {type(row).__name__}, not an object")
      except ValueError as e:
        if i != last:
          raise RunError(
            f"{self.metrics_path}: line {i + 1} is not a JSON object ({e}); expected one a line "
            f"(only a cut-short last line is dropped)"
          ) from e
        if line not in self._dropped:
          self._dropped.add(line)
          self.note(f"warning: {self.metrics_path} line {i + 1} was cut short ({len(line)} bytes, not JSON); dropped")
        continue
      rows.append(row)
    return rows

  def rewrite_metrics(self, keep: Callable[[dict], bool]) -> None:
    """Drops the rows ``keep`` rejects (on resume: those past the restored checkpoint), atomically."""
    rows = [row for row in self.read_metrics() if keep(row)]
    files.write_atomic(self.metrics_path, "".join(json.dumps(row) + "\n" for row in rows))

  def progress(self, total: int, desc: str):
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    return tqdm(
      total=total, desc=desc, unit="step", disable=self.quiet, leave=False, dynamic_ncols=True, file=sys.stderr
    )

  def path(self, name: str) -> pathlib.Path:
    return self.dir / name


def to_jsonable(value):
  """JSON-ready copy of ``value``: numpy and jax arrays to lists, numpy scalars to Python numbers, NaN to None."""
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if hasattr(value, "tolist"):
    return to_jsonable(value.tolist())
  if isinstance(value, float) and value != value:  # NaN is not JSON; keep it visible.
    return None
  return value


def utc_stamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def ready_workdir(workdir: pathlib.Path, name: str) -> pathlib.Path:
  """``workdir/name``, created if missing; a `RunError` naming ``--workdir`` when that cannot be done."""
  base = pathlib.Path(workdir) / name
  existing = next((p for p in (base, *base.parents) if p.exists()), None)
  if existing is not None and not existing.is_dir():
    where = "is a file" if existing == pathlib.Path(workdir) else f"holds a file at {existing}"
    raise RunError(f"--workdir: got {str(workdir)!r}, which {where}; expected a folder to write runs in")
  try:
    base.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise RunError(
      f"--workdir: got {str(workdir)!r}, where {base} cannot be created ({e.strerror or e}); expected a writable folder"
    ) from e
  return base


def check_writable(directory: pathlib.Path, what: str) -> None:
  """Creates and removes a probe file in ``directory``: a `RunError` naming ``what`` when it cannot."""
  probe = directory / f".write-probe-{os.getpid()}"
  try:
    probe.touch(exist_ok=True)
    probe.unlink()
  except OSError as e:
    raise RunError(
      f"{what}: {directory} is not writable ({e.strerror or e}); expected a folder this process can write"
    ) from e


def new_run_dir(workdir: pathlib.Path, name: str, config_json: dict | None = None) -> pathlib.Path:
  """A new run folder ``workdir/name/<UTC time>`` holding ``config.json``; it appears complete or not at all."""
  base = ready_workdir(workdir, name)
  partial = base / f".{utc_stamp()}-{os.getpid()}.partial"
  try:
    partial.mkdir()
    if config_json is not None:
      files.write_atomic(partial / "config.json", json.dumps(config_json, indent=2) + "\n")
  except OSError as e:
    shutil.rmtree(partial, ignore_errors=True)
    raise RunError(
      f"--workdir: got {str(workdir)!r}, where {base} is not writable ({e.strerror or e}); expected a writable folder"
    ) from e
  stamp = utc_stamp()
  for n in itertools.count():
    directory = base / (stamp if n == 0 else f"{stamp}-{n}")
    if directory.exists():
      continue
    try:
      os.rename(partial, directory)  # Fails on a non-empty folder that appeared meanwhile: next name.
    except OSError:
      if directory.exists():
        continue
      raise
    files.fsync_dir(base)
    return directory


def run_dirs(workdir: pathlib.Path, name: str) -> list:
  """The run folders of experiment ``name`` in ``workdir``, oldest first."""
  base = pathlib.Path(workdir) / name
  if not base.is_dir():
    return []
  return sorted(
    (d for d in base.iterdir() if not d.name.startswith(".") and (d / "config.json").exists()), key=lambda d: d.name
  )


def latest_finished_run(workdir: pathlib.Path, name: str) -> pathlib.Path | None:
  finished = [d for d in run_dirs(workdir, name) if (d / "summary.json").exists()]
  return finished[-1] if finished else None


def ensure_devices(num_devices: int) -> None:
  """Makes ``num_devices`` devices visible: on CPU, sets the host device count if jax is not imported yet."""
  if "jax" not in sys.modules:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and num_devices > 1:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
  import jax  # pylint: disable=g-import-not-at-top

  if jax.device_count() < num_devices:
    visible = provenance.plural(jax.device_count(), "device") + (" is" if jax.device_count() == 1 else " are")
    raise ValueError(
      f"config.num_devices: got {num_devices}, but only {visible} "
      f"visible; expected at most {jax.device_count()} (on CPU set XLA_FLAGS="
      f"--xla_force_host_platform_device_count=N before jax is imported)"
    )


def run_experiment(
  name: str,
  *,
  quick: bool = False,
  workdir: str = DEFAULT_WORKDIR,
  resume: bool = False,
  overrides: Sequence[str] = (),
  quiet: bool = False,
) -> dict:
  """Runs experiment ``name`` and returns its summary (also written to ``summary.json``).

  With ``resume``, continues the latest run of ``name`` under ``workdir``, or starts a new one (saying so)
  when there is none. Files that exist are replaced only once their replacement is complete.
  """
  config = config_parsing.load_config(name, quick=quick, overrides=overrides)
  config_parsing.validate(name, config)
  workdir = pathlib.Path(workdir)
  ready_workdir(workdir, name)
  ensure_devices(config.get("num_devices", 1))
  config_json = json.loads(config.to_json())
  origin = provenance.collect(name, config, quick=quick, overrides=overrides)
  directory = _resumable_dir(workdir, name, config_json) if resume else None
  started_anew = resume and directory is None
  if directory is None:
    directory = new_run_dir(workdir, name, {**config_json, "provenance": origin})
  else:
    check_writable(directory, "--resume")
  module = importlib.import_module(f"experiments.{name}")
  run = Run(directory, config, resume=resume and not started_anew, quiet=quiet, name=name)
  # One process per run folder: a second --resume of a run still going is refused before it changes a file.
  with files.exclusive(directory, what="run folder", error=RunError):
    if started_anew:
      run.note(f"--resume: no run of {name!r} under {workdir / name} to continue; started a new run from step 0")
    elif run.resume:
      _note_resumed_code(run, origin)
    print(f"[{name}] writing {directory}", file=sys.stderr, flush=True)
    summary = _execute(module, run, quick=quick, config_json=config_json, origin=origin)
  print_outcome(name, directory, summary)
  return summary


def print_outcome(name: str, directory: pathlib.Path, summary: dict) -> None:
  """The verdict line and the paths of the report and of every figure (with its vector twin), on stdout."""
  word = "HELD" if summary["verdict"]["held"] else "NOT HELD"
  lines = [f"[{name}] criterion {word}: {summary['verdict']['reason']}", f"[{name}] report: {directory / 'report.md'}"]
  for plot in summary["plots"]:
    vector = (directory / plot).with_suffix(".svg")
    lines += [f"[{name}] figure: {p}" for p in (directory / plot, vector) if p == directory / plot or p.exists()]
  print("\n".join(lines), flush=True)


def _note_resumed_code(run: Run, origin: dict) -> None:
  """Notes a resume under another commit, or from a changed tree, than the run started with."""
  try:
    started = json.loads((run.dir / "config.json").read_text()).get("provenance", {}).get("git", {})
  except (OSError, ValueError, AttributeError):
    started = {}
  now = origin["git"]
  if started.get("commit") != now.get("commit") or now.get("dirty"):
    run.note(
      f"resumed at commit {now.get('commit')} (dirty: {now.get('dirty')}); the run started at "
      f"{started.get('commit')} (dirty: {started.get('dirty')})"
    )


def _execute(module, run: Run, *, quick: bool, config_json: dict, origin: dict) -> dict:
  """Runs the experiment in ``run``, then writes its summary and report (each replaced atomically)."""
  start = time.time()
  config = run.config
  result = module.run(config, run)
  verdict = _verdict(module, result, config.criterion, run)
  import jax  # pylint: disable=g-import-not-at-top

  summary = {
    "experiment": run.name,
    "title": module.TITLE,
    "quick": quick,
    "run_dir": str(run.dir),
    "finished_utc": utc_stamp(),
    "wall_seconds": round(time.time() - start, 2),
    "criterion": module.describe_criterion(config.criterion),
    "verdict": {"held": bool(verdict.held), "reason": verdict.reason},
    "metrics": to_jsonable(result.metrics),
    "tables": [to_jsonable(dataclasses.asdict(t)) for t in result.tables],
    "plots": list(result.plots),
    "notes": result.notes,
    "state_digest": result.state_digest,
    "diverged": to_jsonable(run.divergence),
    "events": list(run.events),
    "environment": {
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "python": platform.python_version(),
      "machine": platform.machine(),
      "cpus": os.cpu_count(),
    },
  }
  summary["provenance"] = {
    **origin,
    "finished_utc": summary["finished_utc"],
    "wall_seconds": summary["wall_seconds"],
    "load_average_at_end": provenance.machine().get("load_average"),
  }
  from experiments import report  # pylint: disable=g-import-not-at-top

  files.write_atomic(run.dir / "report.md", report.run_markdown(summary, config_json))
  files.write_atomic(run.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
  return summary


def _verdict(module, result: Result, criterion, run: Run) -> Verdict:
  """The criterion's verdict; a run whose every model diverged fails it, saying at which step."""
  if not run.divergence:
    return module.evaluate(result.metrics, criterion)
  steps = [s for arm in run.divergence.values() for s in arm["diverged_at"] if s is not None]
  where = "; ".join(
    f"{arm}: {sum(s is not None for s in a['diverged_at'])} of {a['models']} model(s)"
    + (f", {a['detail']}" if a.get("detail") else "")
    for arm, a in run.divergence.items()
  )
  lead = f"diverged at step {min(steps)} (the training loss became non-finite; {where})"
  if len(steps) >= sum(run.models.values()):
    return Verdict(False, f"{lead}; no model finished, so the criterion is not met.")
  try:
    verdict = module.evaluate(result.metrics, criterion)
  except (ArithmeticError, KeyError, TypeError, ValueError) as e:
    return Verdict(False, f"{lead}; the criterion cannot be evaluated on the rest ({type(e).__name__}: {e}).")
  return Verdict(verdict.held, f"{verdict.reason} Some models {lead}.")


def _resumable_dir(workdir: pathlib.Path, name: str, config_json: dict) -> pathlib.Path | None:
  """The latest run folder of ``name`` (None if there is none); its config must be the one asked for now."""
  dirs = run_dirs(workdir, name)
  if not dirs:
    return None
  directory = dirs[-1]
  try:
    saved = json.loads((directory / "config.json").read_text())
  except (OSError, ValueError) as e:
    raise RunError(
      f"--resume: {directory / 'config.json'} is unreadable ({e}); expected the config the run "
      f"started with (move that folder away to resume an older run, or drop --resume)"
    ) from e
  saved = {k: v for k, v in saved.items() if k != "provenance"} if isinstance(saved, dict) else saved
  if saved != config_json:
    saved = saved if isinstance(saved, dict) else {}
    changed = sorted(k for k in set(saved) | set(config_json) if saved.get(k) != config_json.get(k))
    raise ValueError(
      f"--resume: the config differs from the one of {directory} in {changed}; "
      f"expected the same config (same --quick and --config overrides)"
    )
  return directory
