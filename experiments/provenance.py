"""What a run ran on: the code (git commit, dirty files), package versions, config, seeds, machine, time.

`collect` is called once the config is resolved and jax is importable; the runner writes its result into
``config.json`` at the start and, with the wall time, into ``summary.json``'s ``provenance``. A tree without
git (a pip-installed copy) is recorded as such: ``git.available`` false and the reason.
"""

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys

from experiments import preregistration

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "ml_collections", "bnjax")
MAX_FILES = 200  # Dirty files listed; the count is always complete.


def _git(*args: str, root: pathlib.Path) -> str:
  return subprocess.run(("git", "-C", str(root), *args), capture_output=True, text=True, check=True, timeout=30).stdout


def git_state(root: pathlib.Path = ROOT) -> dict:
  """The checkout's commit and whether it differs from it (the changed and untracked files); or why unknown."""
  try:
    commit = _git("rev-parse", "HEAD", root=root).strip()
    status = _git("status", "--porcelain", "--untracked-files=normal", root=root).splitlines()
  except FileNotFoundError:
    return {
      "available": False,
      "reason": "git is not installed",
      "commit": None,
      "dirty": None,
      "dirty_files": [],
      "dirty_count": None,
    }
  except (OSError, subprocess.SubprocessError) as e:
    detail = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
    return {
      "available": False,
      "reason": f"not a git checkout ({detail[0] if detail else e})",
      "commit": None,
      "dirty": None,
      "dirty_files": [],
      "dirty_count": None,
    }
  changed = [line[3:] for line in status if line.strip()]
  return {
    "available": True,
    "reason": "",
    "commit": commit,
    "dirty": bool(changed),
    "dirty_files": changed[:MAX_FILES],
    "dirty_count": len(changed),
  }


def packages() -> dict:
  """Installed versions of the packages results depend on (None: not installed), and Python's."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  versions["python"] = platform.python_version()
  return versions


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  """The CPU, cores (all and usable), the load average now, the platform, and jax's backend and devices."""
  try:
    load = [round(x, 2) for x in os.getloadavg()]
  except OSError:
    load = None
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  info = {
    "cpu_model": cpu_model(),
    "cores": os.cpu_count(),
    "usable_cores": usable,
    "load_average": load,
    "platform": platform.platform(),
    "architecture": platform.machine(),
  }
  if "jax" in sys.modules:
    jax = sys.modules["jax"]
    devices = jax.devices()
    info.update(backend=jax.default_backend(), device_count=len(devices), device_kind=devices[0].device_kind)
  return info


def seeds(config) -> dict:
  """The config's seed and the model seeds it implies (``seed + i`` for ``num_seeds`` models)."""
  seed = int(config.get("seed", 0))
  return {"seed": seed, "model_seeds": [seed + i for i in range(int(config.get("num_seeds", 1)))]}


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def collect(name: str, config, *, quick: bool, overrides) -> dict:
  """The provenance of a run of ``name`` starting now with ``config`` (resolved) and ``overrides`` (as given)."""
  given = [o[len("--config.") :] if o.startswith("--config.") else o for o in overrides]
  return {
    "started_utc": utc_now(),
    "command": " ".join(sys.argv)[:500],
    "git": git_state(),
    "packages": packages(),
    "quick": quick,
    "overrides": given,
    "config": json.loads(config.to_json()),
    "seeds": seeds(config),
    "machine": machine(),
    "preregistration": preregistration.describe(name, dict(config.criterion)),
  }


def machine_line(machine_info: dict) -> str:
  """``machine`` as one line: CPU, cores, load at start, platform, backend and device count."""
  cores = machine_info.get("usable_cores") or machine_info.get("cores")
  load = machine_info.get("load_average")
  devices = machine_info.get("device_count")
  parts = [f"{machine_info.get('cpu_model', '?')}, {cores} core{'s' if cores != 1 else ''}"]
  if load:
    parts.append(f"load average {load[0]} at start")
  parts.append(str(machine_info.get("platform", "?")))
  if devices is not None:
    parts.append(f"{machine_info.get('backend', '?')}, {plural(devices, 'device')}")
  return "; ".join(parts)


def plural(count, word: str) -> str:
  """``1 device``, ``2 devices``."""
  return f"{count} {word}" if count == 1 else f"{count} {word}s"
