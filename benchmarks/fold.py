"""Folding benchmark: evaluation-mode forward pass of a model with batch norm against its folded form.

  python -m benchmarks.fold [--quick] [--out DIR] [--rounds N]

Models (`bnjax.models`), their variables as after training (a training step moves the running statistics,
then every parameter is moved at random):

  MLP pre     784-1024-1024-1024-10, Dense -> BatchNorm -> ReLU, batches of 256 and of 1
  MLP post    the same with ReLU -> BatchNorm (each batch norm folds into the next Dense), batch 256
  ConvNet     channels (32, 64, 128) on 32x32x3 NHWC images, batches of 64 and of 1

Each model runs `model.apply(variables, x, train=False)` under `jax.jit`; the folded one is
`bnjax.models.fold_batch_norm`'s model and variables. Before timing, the two outputs are compared (at most
1e-5 relative to the largest logit); a mismatch is printed and makes the process exit with status 1. Timing
follows `benchmarks._harness`: warm-up, interleaved random-order rounds; the speed-up is the median over
rounds of the per-round ratio original / folded.

Results: a markdown table on stdout, and results.json / results.md in --out (default benchmarks/out/fold,
ignored by git).
"""

import argparse
import functools
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _harness

TOLERANCE = 1e-5  # relative to the largest magnitude of the original logits
HEADERS = ("model", "input", "original ms", "folded ms", "speed-up (median ratio)", "max rel. error", "rounds")


def cases(quick: bool):
  """`(name, model, input shape)` of each benchmarked model."""
  from bnjax import models  # flax: imported only when the benchmark runs

  if quick:
    return [
      ("MLP pre", models.MLP((32, 32, 10), norm="pre"), (16, 20)),
      ("MLP post", models.MLP((32, 32, 10), norm="post"), (16, 20)),
      ("ConvNet", models.ConvNet((4, 8), num_classes=10), (4, 8, 8, 3)),
    ]
  mlp_pre = models.MLP((1024, 1024, 1024, 10), norm="pre")
  convnet = models.ConvNet((32, 64, 128), num_classes=10)
  return [
    ("MLP pre", mlp_pre, (256, 784)),
    ("MLP pre", mlp_pre, (1, 784)),
    ("MLP post", models.MLP((1024, 1024, 1024, 10), norm="post"), (256, 784)),
    ("ConvNet", convnet, (64, 32, 32, 3)),
    ("ConvNet", convnet, (1, 32, 32, 3)),
  ]


def trained_variables(model, x, seed: int = 0):
  """Variables as after training: one step moves the running statistics, then every parameter moves."""
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x)
  _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(variables, 2.0 * x + 0.5)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
    lambda a: a * (1.0 + 0.1 * rng.standard_normal(a.shape).astype(np.float32)), variables["params"]
  )
  return {"params": params, **updates}


def run_case(name: str, model, shape, *, rounds: int, warmup: int, seed: int) -> dict:
  from bnjax import models

  x = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
  variables = trained_variables(model, x, seed)
  folded, folded_variables = models.fold_batch_norm(model, variables)
  original_fn = jax.jit(functools.partial(model.apply, train=False))
  folded_fn = jax.jit(functools.partial(folded.apply, train=False))
  want, got = np.asarray(original_fn(variables, x)), np.asarray(folded_fn(folded_variables, x))
  error = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
  samples = _harness.round_robin(
    {
      "original": lambda: original_fn(variables, x).block_until_ready(),
      "folded": lambda: folded_fn(folded_variables, x).block_until_ready(),
    },
    rounds=rounds,
    warmup=warmup,
    seed=seed,
  )
  return {
    "model": name,
    "input": "x".join(str(d) for d in shape),
    "original_s": samples["original"].median_s,
    "folded_s": samples["folded"].median_s,
    "speedup": _harness.median_ratio(samples["original"], samples["folded"]),
    "max_rel_error": error,
    "check": "pass" if error <= TOLERANCE else "FAIL",
    "rounds": rounds,
  }


def _cells(row: dict) -> list[str]:
  return [
    row["model"],
    row["input"],
    _harness.fmt_ms(row["original_s"]),
    _harness.fmt_ms(row["folded_s"]),
    _harness.fmt_ratio(row["speedup"]),
    f"{row['max_rel_error']:.1e}" + ("" if row["check"] == "pass" else " FAIL"),
    str(row["rounds"]),
  ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.fold", description=__doc__.split("\n")[0])
  parser.add_argument(
    "--quick", action="store_true", help="tiny models and few rounds: checks the folding in seconds, not the speed"
  )
  parser.add_argument("--out", default=os.path.join("benchmarks", "out", "fold"), help="directory for the results")
  parser.add_argument("--rounds", type=int, default=None, help="timed calls per model and form (default 31)")
  parser.add_argument("--seed", type=int, default=0)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmark; returns 0, or 1 if a folded model's outputs differ from the original's."""
  args = parse_args(argv)
  rounds = args.rounds or (3 if args.quick else 31)
  warmup = 1 if args.quick else 3
  info = _harness.machine_info()
  rows = []
  for name, model, shape in cases(args.quick):
    row = run_case(name, model, shape, rounds=rounds, warmup=warmup, seed=args.seed)
    if row["check"] != "pass":
      print(f"!!! {name}: the folded model differs by {row['max_rel_error']:.2e} (relative)", file=sys.stderr)
    print(f"done: {name}", file=sys.stderr, flush=True)
    rows.append(row)
  info["load_average_end"] = os.getloadavg()
  markdown = "\n\n".join(
    [
      "# Folded batch norm: evaluation-mode forward pass",
      _harness.machine_line(info),
      _harness.markdown_table(HEADERS, [_cells(row) for row in rows]),
    ]
  )
  print(markdown)
  failed = any(row["check"] != "pass" for row in rows)
  payload = {
    "benchmark": "fold",
    "quick": args.quick,
    "rounds": rounds,
    "warmup": warmup,
    "machine": info,
    "tolerance": TOLERANCE,
    "rows": rows,
    "all_checks_passed": not failed,
  }
  _harness.write_results(args.out, payload, markdown)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
