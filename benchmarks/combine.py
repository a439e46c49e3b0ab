"""Combines repeated runs of `benchmarks.ops` (or of `benchmarks.train`) into medians of ratios, for a machine
shared with other work.

  python -m benchmarks.combine benchmarks/out/ops_run1 benchmarks/out/ops_run2 ... [--out DIR] [--summary]
  python -m benchmarks.combine benchmarks/out/ops_run1 benchmarks/out/ops_run2 ... --summary --dtype bfloat16
  python -m benchmarks.combine benchmarks/out/train_run1 benchmarks/out/train_run2 ...

Each run's ratio is already the median over its rounds of per-round ratios; this takes, per case and
implementation, the median over runs of those ratios and of the median times, and judges the targets on them.
A run whose correctness checks failed is refused (a failure that `ops.KNOWN_DEVIATIONS` now lists counts
as that known deviation).
"""

import argparse
import json
import pathlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import _harness
from benchmarks import _reference
from benchmarks import ops

_COLUMNS = ("median_ms", "x_flax", "x_torch_best", "x_floor", "faults_per_call")


def _median(values):
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def _rejudged(row: dict[str, Any]) -> dict[str, Any]:
  """A FAIL that the current `ops.KNOWN_DEVIATIONS` covers becomes a known deviation (runs made before the
  entry was added)."""
  if row["check"] != "FAIL":
    return row
  case = ops.Case(tuple(row["shape"]), row["dtype"], row["mode"])
  tolerance = _reference.TOLERANCE[row["dtype"]]
  failing = {name for name, error in row["max_errors"].items() if error > tolerance}
  deviation = ops.known_deviation(case, row["implementation"], failing)
  return row if deviation is None else {**row, "check": "known deviation", "error": deviation.reason}


def combine(runs: Sequence[dict[str, Any]]) -> list[ops.Row]:
  """One Row per (case, implementation): the median over runs of each timing column."""
  grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for run in runs:
    rows = [_rejudged(row) for row in run["rows"]]
    if any(row["check"] in ("FAIL", "ERROR") for row in rows):
      raise ValueError("combine: a run whose correctness checks failed cannot be combined; rerun it")
    for row in rows:
      grouped.setdefault((row["case"], row["implementation"]), []).append(row)
  combined = []
  for rows in grouped.values():
    row = ops.Row(**{**rows[0], "max_errors": dict(rows[0]["max_errors"])})
    for column in _COLUMNS:
      setattr(row, column, _median([r[column] for r in rows]))
    row.p25_ms = row.p75_ms = None  # quantiles do not combine; the per-run files keep them
    row.rounds = sum(r["rounds"] for r in rows)
    row.max_errors = {k: max(r["max_errors"].get(k, 0.0) for r in rows) for k in row.max_errors}
    combined.append(row)
  return combined


def combine_train(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """`benchmarks.train` runs: per (mode, implementation) the median over runs of time, throughput and ratio."""
  grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for run in runs:
    if not run["all_checks_passed"]:
      raise ValueError("combine: a run whose correctness checks failed cannot be combined; rerun it")
    for row in run["rows"]:
      grouped.setdefault((row["mode"], row["implementation"]), []).append(row)
  train_columns = (
    "median_ms",
    "examples_per_s",
    "x_flax",
    "faults_per_call",
    "compile_s",
    "x_flax_compile",
    "peak_bytes",
    "x_flax_memory",
  )
  combined = []
  for rows in grouped.values():
    row = dict(rows[0])
    for column in train_columns:
      row[column] = _median([r.get(column) for r in rows])  # .get: runs from before a column existed
    row["p25_ms"] = row["p75_ms"] = None
    row["rounds"] = sum(r["rounds"] for r in rows)
    errors = [r["max_error"] for r in rows if r["max_error"] is not None]
    row["max_error"] = max(errors) if errors else None  # None: skipped in every run
    combined.append(row)
  return combined


def summary(rows: Sequence[ops.Row], dtype: str = "float32") -> str:
  """A compact table: per shape and mode, bnjax against flax.linen, the best PyTorch variant and the floor.

  Times are the medians over runs; "PyTorch best ms" is the PyTorch variant with the lowest of them, while the
  "bnjax / PyTorch" ratio is the median over runs of each run's ratio to that run's fastest variant.
  """
  by_case: dict[str, dict[str, ops.Row]] = {}
  for row in rows:
    if row.dtype == dtype:
      by_case.setdefault(row.case, {})[row.implementation] = row
  lines = []
  for case_rows in by_case.values():
    flax, floor = case_rows.get(ops.BASELINE), case_rows.get(ops.FLOOR)
    torch_rows = [row for row in case_rows.values() if row.family == "torch" and row.median_ms is not None]
    torch = min(torch_rows, key=lambda row: row.median_ms) if torch_rows else None
    ms = lambda row: "-" if row is None or row.median_ms is None else _harness.fmt_ms(row.median_ms / 1e3)
    for name in ops.BNJAX:
      bnjax = case_rows.get(name)
      if bnjax is None or flax is None:
        continue
      lines.append(
        [
          bnjax.mode.replace("fwd_bwd", "fwd+bwd"),
          "x".join(map(str, bnjax.shape)),
          name,
          ms(bnjax),
          ms(flax),
          "-" if torch is None else f"{ms(torch)} ({torch.implementation})",
          ms(floor),
          _harness.fmt_ratio(bnjax.x_flax),
          _harness.fmt_ratio(bnjax.x_torch_best),
          _harness.fmt_ratio(bnjax.x_floor),
        ]
      )
  return _harness.markdown_table(
    (
      "mode",
      "shape",
      "bnjax implementation",
      "bnjax ms",
      "flax.linen ms",
      "PyTorch best ms",
      "floor ms",
      "bnjax / flax",
      "bnjax / PyTorch",
      "bnjax / floor",
    ),
    lines,
  )


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.combine", description=__doc__.split("\n")[0])
  parser.add_argument("runs", nargs="+", help="directories holding a results.json of benchmarks.ops")
  parser.add_argument("--out", default=None, help="write the combined results.json / results.md here")
  parser.add_argument(
    "--summary", action="store_true", help="print only the compact table of bnjax against flax, PyTorch and the floor"
  )
  parser.add_argument("--dtype", default="float32", help="the dtype of the --summary table (default float32)")
  args = parser.parse_args(argv)
  runs = [json.loads((pathlib.Path(d) / "results.json").read_text()) for d in args.runs]
  if {run["benchmark"] for run in runs} == {"train"}:
    from benchmarks import train  # pylint: disable=g-import-not-at-top

    rows = combine_train(runs)
    info = dict(runs[0]["machine"], command=" ".join(["python -m benchmarks.combine"] + list(args.runs)))
    markdown = train.render(rows, info, runs[0]["layers"], runs[0].get("model", "mlp"))
    print(f"Medians over {len(runs)} runs.\n" + markdown)
    return 0
  rows = combine(runs)
  if args.summary:
    print(summary(rows, args.dtype))
    return 0
  verdicts = ops.targets(rows, runs[0]["machine"].get("backend", "cpu"))
  info = dict(runs[0]["machine"])
  info["command"] = " ".join(["python -m benchmarks.combine"] + list(args.runs))
  info["load_average"] = max((run["machine"]["load_average"] for run in runs), key=lambda la: la[0])
  markdown = f"Medians over {len(runs)} runs (each a median of {runs[0]['rounds']} interleaved rounds).\n" + ops.render(
    rows, verdicts, info
  )
  print(markdown)
  if args.out:
    _harness.write_results(
      args.out,
      {
        "benchmark": "ops (combined)",
        "runs": list(args.runs),
        "machine": info,
        "rows": [r.__dict__ for r in rows],
        "targets": verdicts,
        "all_checks_passed": True,
      },
      markdown,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
