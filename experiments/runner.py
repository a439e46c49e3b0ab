"""Runs one experiment: config -> checks -> run folder -> experiment -> verdict -> summary and report.

A run writes ``<workdir>/<name>/<UTC time>/``: ``config.json``, ``metrics.jsonl`` (one JSON object a
line), ``summary.json`` (final metrics, the criterion's verdict, ``state_digest``), ``report.md`` and PNG
plots. jax is imported only after the config is checked, so the host device count can still be set for
``num_devices > 1`` on CPU.
"""
import dataclasses
import datetime
import importlib
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Optional, Sequence

import ml_collections

from experiments import config_parsing

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


class Run:
  """The run folder and the things an experiment writes into it."""

  def __init__(self, directory: pathlib.Path, config: ml_collections.ConfigDict, *, resume: bool,
               quiet: bool = False):
    self.dir = directory
    self.config = config
    self.resume = resume
    self.quiet = quiet
    self.metrics_path = directory / "metrics.jsonl"

  def log(self, **row) -> None:
    """Appends one JSON object to ``metrics.jsonl`` (numpy / jax scalars and arrays become lists)."""
    with self.metrics_path.open("a") as f:
      f.write(json.dumps(to_jsonable(row)) + "\n")

  def read_metrics(self) -> list:
    if not self.metrics_path.exists():
      return []
    with self.metrics_path.open() as f:
      return [json.loads(line) for line in f if line.strip()]

  def rewrite_metrics(self, keep: Callable[[dict], bool]) -> None:
    """Drops the rows ``keep`` rejects (on resume: those past the restored checkpoint)."""
    rows = [row for row in self.read_metrics() if keep(row)]
    with self.metrics_path.open("w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")

  def progress(self, total: int, desc: str):
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(total=total, desc=desc, unit="step", disable=self.quiet, leave=False,
                dynamic_ncols=True, file=sys.stderr)

  def path(self, name: str) -> pathlib.Path:
    return self.dir / name


def to_jsonable(value):
  """JSON-ready copy of ``value``: numpy and jax arrays to lists, numpy scalars to Python numbers."""
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, float) and value != value:  # NaN is not JSON; keep it visible.
    return None
  return value


def utc_stamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def new_run_dir(workdir: pathlib.Path, name: str) -> pathlib.Path:
  base = workdir / name
  base.mkdir(parents=True, exist_ok=True)
  stamp = utc_stamp()
  directory, n = base / stamp, 1
  while directory.exists():
    directory, n = base / f"{stamp}-{n}", n + 1
  directory.mkdir()
  return directory


def run_dirs(workdir: pathlib.Path, name: str) -> list:
  """The run folders of experiment ``name`` in ``workdir``, oldest first."""
  base = pathlib.Path(workdir) / name
  if not base.is_dir():
    return []
  return sorted((d for d in base.iterdir() if (d / "config.json").exists()), key=lambda d: d.name)


def latest_finished_run(workdir: pathlib.Path, name: str) -> Optional[pathlib.Path]:
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
    raise ValueError(f"config.num_devices: got {num_devices}, but only {jax.device_count()} devices are "
                     f"visible; expected at most {jax.device_count()} (on CPU set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count=N before jax is imported)")


def run_experiment(name: str, *, quick: bool = False, workdir: str = DEFAULT_WORKDIR,
                   resume: bool = False, overrides: Sequence[str] = (), quiet: bool = False) -> dict:
  """Runs experiment ``name`` and returns its summary (also written to ``summary.json``)."""
  config = config_parsing.load_config(name, quick=quick, overrides=overrides)
  config_parsing.validate(name, config)
  ensure_devices(config.get("num_devices", 1))
  workdir = pathlib.Path(workdir)
  config_json = json.loads(config.to_json())
  if resume:
    directory = _resumable_dir(workdir, name, config_json)
  else:
    directory = new_run_dir(workdir, name)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
  (directory / "summary.json").unlink(missing_ok=True)
  module = importlib.import_module(f"experiments.{name}")
  run = Run(directory, config, resume=resume, quiet=quiet)
  if not quiet:
    print(f"[{name}] writing {directory}", file=sys.stderr)
  start = time.time()
  result = module.run(config, run)
  verdict = module.evaluate(result.metrics, config.criterion)
  import jax  # pylint: disable=g-import-not-at-top
  summary = {
      "experiment": name,
      "title": module.TITLE,
      "quick": quick,
      "run_dir": str(directory),
      "finished_utc": utc_stamp(),
      "wall_seconds": round(time.time() - start, 2),
      "criterion": module.describe_criterion(config.criterion),
      "verdict": {"held": bool(verdict.held), "reason": verdict.reason},
      "metrics": to_jsonable(result.metrics),
      "tables": [to_jsonable(dataclasses.asdict(t)) for t in result.tables],
      "plots": list(result.plots),
      "notes": result.notes,
      "state_digest": result.state_digest,
      "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                      "devices": jax.device_count(), "python": platform.python_version(),
                      "machine": platform.machine(), "cpus": os.cpu_count()},
  }
  (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  from experiments import report  # pylint: disable=g-import-not-at-top
  (directory / "report.md").write_text(report.run_markdown(summary, config_json))
  if not quiet:
    word = "HELD" if verdict.held else "NOT HELD"
    print(f"[{name}] criterion {word}: {verdict.reason}\n[{name}] {directory / 'report.md'}",
          file=sys.stderr)
  return summary


def _resumable_dir(workdir: pathlib.Path, name: str, config_json: dict) -> pathlib.Path:
  """The latest run folder of ``name``; its config must be the one asked for now."""
  dirs = run_dirs(workdir, name)
  if not dirs:
    raise ValueError(f"--resume: no run of {name!r} under {workdir}/{name}; expected an earlier run "
                     f"to continue (drop --resume to start one)")
  directory = dirs[-1]
  saved = json.loads((directory / "config.json").read_text())
  if saved != config_json:
    changed = sorted(k for k in set(saved) | set(config_json) if saved.get(k) != config_json.get(k))
    raise ValueError(f"--resume: the config differs from the one of {directory} in {changed}; "
                     f"expected the same config (same --quick and --config overrides)")
  return directory
