"""Many-process training step: step time for 1, 2 and 4 processes here, and what one BatchNorm layer sends.

  python -m benchmarks.distributed [--processes 1,2,4] [--steps N] [--batch-size N] [--hidden N]

Timing: for each process count P, `experiments.launch` starts P processes of one CPU device each, which
train the MLP (Dense -> BatchNorm -> ReLU, `--hidden` units, 2 hidden layers) data-parallel under sharded
`jit` on a mesh of all P devices, global batch `--batch-size`; each process feeds its own rows. Printed: the
median and quartiles of the step time (after a warm-up), measured by process 0.

Communication: in one process of 4 host devices, the compiled training step (sharded jit and shard_map) is
searched for all-reduce ops; their count and operand bytes for a model with 1 and with 2 BatchNorm layers
give what one more BatchNorm layer adds per step.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ALL_REDUCE = re.compile(r"= (.*?) all-reduce(?:-start)?\(")  # the result shape(s) of one op
_SHAPE = re.compile(r"(f32|f16|bf16|s32|u32|f64)\[([\d,]*)\]")
_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f64": 8}


def _model(hidden: int, layers: int, axis_name=None):
  from bnjax import models  # pylint: disable=g-import-not-at-top

  return models.MLP((hidden,) * layers + (10,), norm="pre", axis_name=axis_name)


def _setup(hidden, layers, batch, parallel, mesh):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from bnjax import training  # pylint: disable=g-import-not-at-top

  tx = optax.sgd(0.1, momentum=0.9)
  model = _model(hidden, layers, "batch" if parallel == "shard_map" else None)
  state = training.create_train_state(_model(hidden, layers), tx, np.zeros((1, 64), np.float32), rng=jax.random.key(0))
  step = training.make_train_step(model, tx, parallel=parallel, mesh=mesh)
  return step, training.replicate(state, mesh)


def all_reduces(hlo: str) -> tuple[int, int]:
  """(count, operand bytes) of the all-reduce ops in compiled HLO text."""
  count = size = 0
  for line in hlo.splitlines():
    match = _ALL_REDUCE.search(line)
    if not match:
      continue
    count += 1
    for dtype, dims in _SHAPE.findall(match.group(1)):
      elements = 1
      for d in filter(None, dims.split(",")):
        elements *= int(d)
      size += elements * _BYTES[dtype]
  return count, size


def communication(hidden: int, batch: int) -> dict:
  """All-reduces per step for 1 and 2 BatchNorm layers, under sharded jit and shard_map, on 4 devices."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from bnjax import training  # pylint: disable=g-import-not-at-top

  mesh = training.batch_mesh()
  x = training.shard_batch((np.zeros((batch, 64), np.float32), np.zeros((batch,), np.int32)), mesh)
  found = {}
  for parallel in ("jit", "shard_map"):
    for layers in (1, 2):
      step, state = _setup(hidden, layers, batch, parallel, mesh)
      count, size = all_reduces(step.lower(state, x).compile().as_text())
      found[f"{parallel}, {layers} BN layer(s)"] = {"all_reduces": count, "bytes": size}
    one, two = found[f"{parallel}, 1 BN layer(s)"], found[f"{parallel}, 2 BN layer(s)"]
    found[f"{parallel}, per extra BN layer"] = {k: two[k] - one[k] for k in one}
  return found


def worker(hidden: int, batch: int, steps: int) -> None:
  from experiments import launch  # pylint: disable=g-import-not-at-top

  launch.maybe_initialize("auto")
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from bnjax import training  # pylint: disable=g-import-not-at-top

  mesh = training.batch_mesh()
  step, state = _setup(hidden, 2, batch, "jit", mesh)
  rows = training.process_batch_rows(batch, mesh)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, 64)).astype(np.float32)[rows]
  y = rng.integers(0, 10, size=batch).astype(np.int32)[rows]
  placed = training.shard_batch((x, y), mesh, process_local=True)
  times = []
  for i in range(steps + 10):  # 10 warm-up steps
    start = time.perf_counter()
    state, metrics = step(state, placed)
    metrics["loss"].block_until_ready()
    if i >= 10:
      times.append(time.perf_counter() - start)
  if jax.process_index() == 0:
    q1, median, q3 = np.percentile(times, [25, 50, 75]) * 1e3
    print("RESULT " + json.dumps({"processes": jax.process_count(), "median_ms": median, "q1_ms": q1, "q3_ms": q3}))


def _launch(processes: int, args) -> dict:
  from experiments import launch  # pylint: disable=g-import-not-at-top

  command = [
    sys.executable,
    "-m",
    "benchmarks.distributed",
    "--worker",
    "--steps",
    str(args.steps),
    "--batch-size",
    str(args.batch_size),
    "--hidden",
    str(args.hidden),
  ]
  out = subprocess.run(
    launch.command_line(processes, command, "--devices-per-process", "1"),
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  return json.loads(next(line for line in out.splitlines() if "RESULT " in line).split("RESULT ", 1)[1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.splitlines()[0])
  parser.add_argument("--processes", default="1,2,4", help="process counts to time (default 1,2,4)")
  parser.add_argument("--steps", type=int, default=200, help="timed steps per count (default 200)")
  parser.add_argument("--batch-size", type=int, default=256, help="global batch (default 256)")
  parser.add_argument("--hidden", type=int, default=256, help="hidden units per layer (default 256)")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--hlo", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args.hidden, args.batch_size, args.steps)
    return 0
  if args.hlo:
    print("RESULT " + json.dumps(communication(args.hidden, args.batch_size)))
    return 0
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "benchmarks.distributed",
      "--hlo",
      "--hidden",
      str(args.hidden),
      "--batch-size",
      str(args.batch_size),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    check=True,
  ).stdout
  for name, value in json.loads(out.split("RESULT ", 1)[1]).items():
    print(f"{name:32s} {value['all_reduces']:3d} all-reduce(s), {value['bytes']:8d} bytes")
  for processes in map(int, args.processes.split(",")):
    r = _launch(processes, args)
    print(
      f"{processes} process(es) x 1 CPU device: step {r['median_ms']:.2f} ms median "
      f"(quartiles {r['q1_ms']:.2f}-{r['q3_ms']:.2f})"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
