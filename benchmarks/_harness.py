"""Timing, statistics and report helpers shared by the benchmarks.

The discipline every benchmark follows:
  * each candidate is warmed up (compiled, caches filled) before anything is timed;
  * candidates are timed one call at a time, interleaved round by round in a fresh random order, so slow
    drifts of the machine (another process, frequency changes, a spinning thread pool left behind by the
    previous candidate) hit every candidate alike instead of whichever ran during the disturbance;
  * the statistic is the median over rounds; a ratio between two candidates is the median over rounds of
    the per-round ratio, which cancels noise common to a round;
  * minor page faults per call (`getrusage` `ru_minflt` deltas) are recorded next to the time, since fresh
    large output buffers that the allocator maps and unmaps on every call cost one fault per page.
"""

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass
class Samples:
  """Per-call measurements of one candidate, one entry per round (round i of every candidate aligned)."""

  seconds: list[float] = dataclasses.field(default_factory=list)
  minor_faults: list[int] = dataclasses.field(default_factory=list)

  @property
  def median_s(self) -> float:
    return statistics.median(self.seconds)

  @property
  def faults_per_call(self) -> float:
    return statistics.fmean(self.minor_faults)

  def quantile_s(self, q: float) -> float:
    """The q-quantile of the call times (linear interpolation between order statistics)."""
    ordered = sorted(self.seconds)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_call(call: Callable[[], Any]) -> tuple[float, int]:
  """Seconds and minor page faults of one synchronous call (the call must block until its result is ready)."""
  faults = _minor_faults()
  start = time.perf_counter()
  call()
  seconds = time.perf_counter() - start
  return seconds, _minor_faults() - faults


def round_robin(
  calls: Mapping[str, Callable[[], Any]],
  *,
  rounds: int,
  warmup: int,
  seed: int = 0,
  setups: Mapping[str, Callable[[], Any]] | None = None,
) -> dict[str, Samples]:
  """Times every call `rounds` times, interleaved: each round runs each candidate once, in a random order.

  Args:
    calls: name -> a zero-argument callable that performs one complete, blocking call.
    rounds: timed calls per candidate (the median is taken over these).
    warmup: untimed calls per candidate first (compilation, allocator and cache warm-up).
    seed: seeds the per-round order, so a run is reproducible.
    setups: name -> a callable run, untimed, before each of that candidate's calls (e.g. to set a library's
      thread count, which is process-global).

  Returns:
    name -> Samples, whose i-th entries all come from round i.
  """
  setups = setups or {}
  no_setup = lambda: None
  for name, call in calls.items():
    for _ in range(warmup):
      setups.get(name, no_setup)()
      call()
  order = list(calls)
  rng = random.Random(seed)
  samples = {name: Samples() for name in calls}
  for _ in range(rounds):
    rng.shuffle(order)
    for name in order:
      setups.get(name, no_setup)()
      seconds, faults = time_call(calls[name])
      samples[name].seconds.append(seconds)
      samples[name].minor_faults.append(faults)
  return samples


def median_ratio(numerator: Samples, denominator: Samples) -> float:
  """Median over rounds of numerator/denominator time: robust to noise that hits a whole round."""
  return statistics.median(a / b for a, b in zip(numerator.seconds, denominator.seconds))


def compile_seconds(jitted: Any, *args: Any, **kwargs: Any) -> float:
  """Wall time of `jitted.lower(*args).compile()`: tracing, lowering and XLA compilation, nothing run."""
  start = time.perf_counter()
  jitted.lower(*args, **kwargs).compile()
  return time.perf_counter() - start


def _lscpu_model() -> str:
  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  except OSError:
    return platform.processor() or "unknown"
  for line in text.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or "unknown"


def _version(module_name: str) -> str | None:
  try:
    module = __import__(module_name)
  except ImportError:
    return None
  return getattr(module, "__version__", None)


def jax_device() -> dict[str, str]:
  """JAX's default backend and device kind, when the benchmark process has imported jax (a parent process that
  only launches workers has not, and must not initialise a backend for this)."""
  jax = sys.modules.get("jax")
  if jax is None:
    return {}
  return {"jax_backend": jax.default_backend(), "jax_device": jax.devices()[0].device_kind}


def machine_info() -> dict[str, Any]:
  """The facts a reader needs to compare numbers across machines: CPU, cores, library versions, flags."""
  return {
    "cpu_model": _lscpu_model(),
    "cpu_count": os.cpu_count(),
    "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "versions": {
      name: _version(name) for name in ("jax", "jaxlib", "flax", "optax", "haiku", "equinox", "torch", "numpy", "bnjax")
    },
    **jax_device(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    # glibc.malloc.hugetlb=1 backs large buffers with transparent huge pages, which changes the cost of
    # every fresh output buffer (see docs/performance.md); the same setting applies to every implementation of a run.
    "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    "load_average": os.getloadavg(),
    "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join([os.path.basename(sys.executable), "-m", _module_name()] + sys.argv[1:]),
  }


def _module_name() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  return spec.name if spec is not None else (sys.argv[0] if sys.argv else "?")


def machine_line(info: Mapping[str, Any]) -> str:
  """One line naming the machine and versions, for the head of a markdown report."""
  versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items() if version)
  tunables = f"; GLIBC_TUNABLES={info['glibc_tunables']}" if info.get("glibc_tunables") else ""
  accelerator = "" if info.get("jax_backend", "cpu") == "cpu" else f"{info['jax_device']} ({info['jax_backend']}); "
  return (
    f"{accelerator}{info['cpu_model']}, {info['usable_cores']} cores; {versions}; "
    f"load average at start {info['load_average'][0]:.2f}{tunables}"
  )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-flavoured markdown table; numbers are expected pre-formatted as strings."""
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def fmt_ms(seconds: float | None) -> str:
  if seconds is None:
    return "-"
  ms = seconds * 1e3
  return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(ratio: float | None) -> str:
  return "-" if ratio is None else f"{ratio:.2f}"


def write_results(out_dir: str | os.PathLike, payload: Mapping[str, Any], markdown: str) -> pathlib.Path:
  """Writes results.json and results.md into out_dir (created if missing) and returns the directory."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
  (out / "results.md").write_text(markdown + "\n")
  return out


def _json_default(value: Any) -> Any:
  if hasattr(value, "tolist"):
    return value.tolist()
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
