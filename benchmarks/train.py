"""Training-step benchmark: an MLP or a small CNN with batch norm, bnjax layers against flax.linen layers.

  python -m benchmarks.train [--quick] [--out DIR] [--model mlp|cnn] [--batch-size N] [--rounds N]
                             [--compile-rounds N] [--modes M,...] [--platform cpu|cuda|rocm|tpu] [--devices N]
                             [--prototypes]

Two models (`--model`), both trained with softmax cross-entropy and Optax SGD with momentum, the training
state donated to the step:
  mlp (default)  Dense (no bias) -> BatchNorm -> ReLU per hidden layer, 784-1024-1024-1024-10
                 (--quick: 64-32-32-10);
  cnn            a ResNet-style CNN on NHWC images, 32x32x3 (--quick: 8x8x3): a 3x3 stem conv (no bias) of 16
                 channels (--quick: 4) -> BatchNorm -> ReLU, then one residual block per stage of 16, 32 and 64
                 channels (--quick: one stage of 8), conv3x3 -> BatchNorm -> ReLU -> conv3x3 -> BatchNorm, added
                 to the input (through a 1x1 conv -> BatchNorm where the channels or the stride change; stride 2
                 from the second stage on) -> ReLU, then a global average pool and a Dense classifier of 10
                 classes; 9 batch norms (--quick: 4).
Only the batch norm layer class differs between the two arms (`bnjax.nn.BatchNorm` is a drop-in for
`flax.linen.BatchNorm`, same arguments and variables), so both start from the very same parameters.

Three ways of running a step:
  1 device       jax.jit on one device;
  shard_map      N devices, the batch split over a `batch` mesh axis, batch statistics and gradients
                 synchronised with axis_name="batch";
  sharded jit    N devices, the batch sharded with a NamedSharding, no axis name (XLA partitions it).

The steps run in fresh worker processes whose JAX_PLATFORMS is --platform. On the CPU (the default) each device
count gets its own worker, whose XLA_FLAGS fix the number of host devices before jax is imported: 1, and
N = --devices (default 8). On an accelerator platform one worker runs every mode on that platform's own devices,
N being the first --devices of them (default all); the N-device modes are skipped, with the reason, where it has
only one. `--prototypes` adds layers built on `benchmarks.prototypes` (the exact two-pass statistics and the
guarded one-pass ones with their `lax.cond`) to the modes without an axis name.

Correctness: every configuration's first step (loss and the updated parameters and batch statistics) is
compared with a plain one-device flax.linen step on the same global batch, computed in the same worker
(on the CPU the checked step is the very executable then timed; elsewhere a float32-precision compilation);
a mismatch is reported loudly and makes the process exit with status 1. Timing follows
`benchmarks._harness` (warm-up, interleaved random-order rounds, medians); throughput is examples per second
of the global batch.

Compile time (`compile_s`) is the median over --compile-rounds interleaved rounds (default 3, --quick 1) of
tracing, lowering and XLA-compiling a freshly built step, in the worker after its reference step has compiled
(so no arm pays the process's first compilation). Peak memory (`peak_bytes`) is what XLA's buffer assignment
reserves on one device for one step, from the compiled step's `memory_analysis()`: arguments + outputs -
aliased (the donated state) + temporaries; per device in the N-device modes. It is a static figure of the
executable, the same on every platform, unlike `memory_stats()["peak_bytes_in_use"]`, which is process-wide
and cannot be reset. Every `x flax.linen` ratio is to flax.linen in the same mode (below 1: bnjax is faster,
smaller).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

from benchmarks import _harness

FULL_LAYERS = (784, 1024, 1024, 1024, 10)
QUICK_LAYERS = (64, 32, 32, 10)
# The CNN's sizes: image height, width and channels, the stem's channels, each stage's channels, classes.
FULL_CNN = (32, 32, 3, 16, 16, 32, 64, 10)
QUICK_CNN = (8, 8, 3, 4, 8, 10)
MODELS = ("mlp", "cnn")
MODES = ("1 device", "shard_map", "sharded jit")
IMPLEMENTATIONS = ("bnjax", "flax.linen")  # the keys of layer_classes()
DEFAULT_HOST_DEVICES = 8


def cpu_worker_devices(mode: str, devices: int | None = None) -> int:
  """The host devices of the CPU worker that runs `mode`: 1, or `devices` (default 8) for the N-device modes."""
  return 1 if mode == "1 device" else devices or DEFAULT_HOST_DEVICES


WORKER_DEVICES = {mode: cpu_worker_devices(mode) for mode in MODES}  # on the CPU with the default --devices
BASELINE = "flax.linen"
MOMENTUM = 0.9  # batch norm running-average decay
LEARNING_RATE = 0.05
TOLERANCE = 2e-4  # relative to the largest magnitude of each compared array


def layer_classes(prototypes: bool = False) -> dict[str, Callable[..., Any]]:
  """name -> a flax.linen batch norm class taking flax.linen.BatchNorm's arguments."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  import bnjax.nn  # pylint: disable=g-import-not-at-top

  classes = {"bnjax": bnjax.nn.BatchNorm, BASELINE: nn.BatchNorm}
  if prototypes:
    from benchmarks import prototypes as prototypes_lib  # pylint: disable=g-import-not-at-top

    classes.update(prototypes_lib.layer_classes())
  return classes


def _skip_reason(mode: str, name: str, devices: int) -> str | None:
  """Why `name` cannot run in `mode` on `devices` devices, or None."""
  if mode != "1 device" and devices < 2:
    return f"{mode} needs at least 2 devices; the platform has {devices}"
  if mode == "shard_map" and name.startswith("proto:"):
    return "the prototypes take no axis_name"
  return None


def model_sizes(model: str, quick: bool) -> tuple[int, ...]:
  """The `layers` of `model` (see make_model)."""
  if model == "cnn":
    return QUICK_CNN if quick else FULL_CNN
  return QUICK_LAYERS if quick else FULL_LAYERS


def input_shape(sizes: Sequence[int], model: str = "mlp") -> tuple[int, ...]:
  """One example's shape."""
  return tuple(sizes[:3]) if model == "cnn" else (sizes[0],)


def make_model(sizes: Sequence[int], norm: Callable[..., Any], axis_name: str | None, model: str = "mlp"):
  """The mlp: Dense(no bias) -> norm -> relu for each hidden size, then a Dense classifier; the cnn: see
  make_cnn."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  if model == "cnn":
    return make_cnn(sizes, norm, axis_name)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      for features in sizes[1:-1]:
        x = nn.Dense(features, use_bias=False)(x)  # the norm's bias makes a Dense bias redundant
        x = norm(use_running_average=not train, momentum=MOMENTUM, epsilon=1e-5, axis_name=axis_name)(x)
        x = nn.relu(x)
      return nn.Dense(sizes[-1])(x)

  return MLP()


def make_cnn(sizes: Sequence[int], norm: Callable[..., Any], axis_name: str | None):
  """A ResNet-style CNN on NHWC images of `sizes[:3]`: a conv3x3 stem of `sizes[3]` channels, one residual
  block per stage width `sizes[4:-1]` (stride 2 from the second), global average pool, Dense(`sizes[-1]`)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  stem, widths, classes = sizes[3], sizes[4:-1], sizes[-1]

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      def conv_norm(x, features, kernel=3, strides=1):  # the norm's bias makes a conv bias redundant
        x = nn.Conv(features, (kernel, kernel), strides=strides, padding="SAME", use_bias=False)(x)
        return norm(use_running_average=not train, momentum=MOMENTUM, epsilon=1e-5, axis_name=axis_name)(x)

      x = nn.relu(conv_norm(x, stem))
      for stage, features in enumerate(widths):
        strides = 1 if stage == 0 else 2
        y = conv_norm(nn.relu(conv_norm(x, features, strides=strides)), features)
        if strides != 1 or x.shape[-1] != features:
          x = conv_norm(x, features, kernel=1, strides=strides)
        x = nn.relu(x + y)
      return nn.Dense(classes)(x.mean(axis=(1, 2)))

  return CNN()


class TrainState(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: Any


def make_step(model, tx, axis_name: str | None) -> Callable:
  """The per-shard training step; with `axis_name` the loss and gradients are averaged across it."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  def loss_fn(params, batch_stats, x, labels):
    logits, updates = model.apply(
      {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if axis_name is not None:
      # The global batch's mean loss. shard_map differentiates it into the global gradient by itself: the
      # replicated parameters' cotangents are summed over the axis, so no pmean of the gradients follows.
      loss = jax.lax.pmean(loss, axis_name)
    return loss, updates.get("batch_stats", batch_stats)  # a layer may leave the statistics untouched

  def step(state: TrainState, x, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.batch_stats, x, labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), loss

  return step


def compile_step(
  mode: str,
  model_for: Callable[[str | None], Any],
  tx,
  state: TrainState,
  x,
  labels,
  devices: Sequence[Any] | None = None,
):
  """The jitted, state-donating step for `mode`, and its (state, x, labels) placed as it expects; the N-device
  modes run on `devices` (default: all of the default backend's)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  if mode == "1 device":
    return jax.jit(make_step(model_for(None), tx, None), donate_argnums=0), (state, x, labels)
  devices = list(devices or jax.devices())
  # Auto axes: the classic sharded jit that XLA partitions, as bnjax.training.batch_mesh builds it.
  mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(AxisType.Auto,), devices=devices)
  replicated, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
  args = (jax.device_put(state, replicated), jax.device_put(x, by_batch), jax.device_put(labels, by_batch))
  if mode == "shard_map":
    step = jax.shard_map(
      make_step(model_for("batch"), tx, "batch"),
      mesh=mesh,
      in_specs=(P(), P("batch"), P("batch")),
      out_specs=(P(), P()),
    )
    return jax.jit(step, donate_argnums=0), args
  if mode == "sharded jit":
    step = make_step(model_for(None), tx, None)
    return jax.jit(
      step, in_shardings=(replicated, by_batch, by_batch), out_shardings=(replicated, replicated), donate_argnums=0
    ), args
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _relative_errors(got, want) -> dict[str, float]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  errors = {}
  flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
  flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
  if [p for p, _ in flat_got] != [p for p, _ in flat_want]:
    return {"tree structure": float("inf")}
  for (path, a), (_, b) in zip(flat_got, flat_want):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-12)
    error = float(np.max(np.abs(a - b))) / scale if a.shape == b.shape and np.all(np.isfinite(a)) else np.inf
    errors[jax.tree_util.keystr(path)] = error
  return errors


@dataclasses.dataclass
class Row:
  mode: str
  implementation: str
  devices: int
  batch_size: int
  layers: list[int]
  median_ms: float | None = None
  p25_ms: float | None = None
  p75_ms: float | None = None
  rounds: int = 0
  examples_per_s: float | None = None
  x_flax: float | None = None  # time ratio to flax.linen in the same mode (< 1 is faster)
  faults_per_call: float | None = None
  compile_s: float | None = None
  check: str = "n/a"
  max_error: float | None = None
  worst_leaf: str | None = None
  error: str | None = None
  x_flax_compile: float | None = None  # compile time ratio to flax.linen in the same mode
  peak_bytes: int | None = None  # XLA's buffer assignment for one step on one device (see the module docstring)
  x_flax_memory: float | None = None  # peak_bytes ratio to flax.linen in the same mode


def _compile(step, *args) -> Any:
  """The compiled `step` for `args` (its memory_analysis() is the executable's)."""
  return step.lower(*args).compile()


def peak_bytes(compiled) -> int | None:
  """Arguments + outputs - aliased + temporaries of one device's buffer assignment, or None if unknown."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return (
    stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes
  )


def _ratio(a: float | None, b: float | None) -> float | None:
  return None if a is None or not b else a / b


def run_worker(
  modes: Sequence[str],
  *,
  layers: Sequence[int],
  batch_size: int,
  rounds: int,
  warmup: int,
  seed: int = 0,
  classes: dict[str, Callable[..., Any]] | None = None,
  devices: int | None = None,
  model: str = "mlp",
  compile_rounds: int = 1,
) -> list[dict[str, Any]]:
  """Checks and times every (layer class, mode) on this process's devices (the N-device modes on the first
  `devices` of them, default all); returns Row dicts."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  classes = classes or layer_classes()
  mesh_devices = jax.devices()[:devices]
  tx = optax.sgd(LEARNING_RATE, momentum=0.9)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch_size, *input_shape(layers, model)), dtype=np.float32))
  labels = jnp.asarray(rng.integers(0, layers[-1], batch_size), jnp.int32)
  baseline_model = make_model(layers, classes[BASELINE], None, model)
  # Jitted: run eagerly, a CNN's init and optimizer state compile dozens of one-op programs.
  variables = jax.jit(lambda key, x: baseline_model.init(key, x, train=False))(jax.random.key(seed), x[:2])

  @jax.jit
  def fresh_state_jit(variables):
    params = jax.tree.map(jnp.copy, variables["params"])
    return TrainState(params, jax.tree.map(jnp.copy, variables["batch_stats"]), tx.init(params))

  def fresh_state():
    return fresh_state_jit(variables)

  # The reference: one plain one-device flax.linen step on the whole batch. The checked steps multiply in full
  # float32 precision (GPUs default to TF32, which would hide the layers' differences under the matmuls'); the
  # timed steps then run at the backend's default precision, as users run them.
  check_precision = jax.default_matmul_precision("highest")
  reference_step = jax.jit(make_step(baseline_model, tx, None))
  with check_precision:
    reference = jax.device_get(reference_step(fresh_state(), x, labels))

  # The CPU's float32 matmuls ignore the precision setting: there the timed executable itself is checked.
  separate_check = jax.default_backend() != "cpu"

  def check(row, step, state, xs, ys):
    """Runs `step` once, judges its result against the reference into `row`; returns the new state."""
    state, loss = step(state, xs, ys)
    errors = _relative_errors(jax.device_get((state, loss)), reference)
    worst = max(errors, key=errors.get)
    row.max_error, row.worst_leaf = errors[worst], worst
    row.check = "pass" if errors[worst] <= TOLERANCE else "FAIL"
    return state

  rows, builds, steps = {}, {}, {}
  for mode in modes:
    for name, norm in classes.items():
      key = f"{name} | {mode}"
      row = Row(
        mode=mode,
        implementation=name,
        devices=1 if mode == "1 device" else len(mesh_devices),
        batch_size=batch_size,
        layers=list(layers),
      )
      rows[key] = row
      skip = _skip_reason(mode, name, len(mesh_devices))
      if skip:
        row.check, row.error = "skipped", skip
        continue

      def build(mode=mode, norm=norm):  # a fresh step each time, so no compilation cache is hit
        return compile_step(
          mode,
          lambda axis_name: make_model(layers, norm, axis_name, model),
          tx,
          fresh_state(),
          x,
          labels,
          mesh_devices,
        )

      try:
        step, (state, xs, ys) = build()
        if separate_check:
          with check_precision:
            state = check(row, step, state, xs, ys)
        builds[key], steps[key] = build, {"state": state, "xs": xs, "ys": ys}
      except Exception as error:  # pylint: disable=broad-except
        row.check, row.error = "ERROR", f"{type(error).__name__}: {error}"

  # Compile time: fresh steps compiled in interleaved rounds; the last compiled executable is the one timed.
  built, failed = {}, {}

  def compile_setup(key):  # untimed: the fresh step and its placed arguments
    step, args = builds[key]()
    built[key] = (step, *args)

  def compile_call(key):
    try:
      steps[key]["compiled"] = _compile(*built.pop(key))
    except Exception as error:  # pylint: disable=broad-except
      failed[key] = error

  compile_samples = _harness.round_robin(
    {key: lambda key=key: compile_call(key) for key in builds},
    rounds=max(compile_rounds, 1),
    warmup=0,
    seed=seed,
    setups={key: lambda key=key: compile_setup(key) for key in builds},
  )
  calls = {}
  for key, holder in steps.items():
    row = rows[key]
    try:
      if key in failed:
        raise failed[key]
      if not separate_check:
        holder["state"] = check(row, holder["compiled"], holder["state"], holder["xs"], holder["ys"])
    except Exception as error:  # pylint: disable=broad-except
      row.check, row.error = "ERROR", f"{type(error).__name__}: {error}"
      continue
    row.compile_s = compile_samples[key].median_s
    row.peak_bytes = peak_bytes(holder["compiled"])

    def call(holder=holder):
      holder["state"], loss = holder["compiled"](holder["state"], holder["xs"], holder["ys"])
      jax.block_until_ready(loss)

    calls[key] = call
  samples = _harness.round_robin(calls, rounds=rounds, warmup=warmup, seed=seed)
  for key, sample in samples.items():
    row = rows[key]
    row.rounds = len(sample.seconds)
    row.median_ms = sample.median_s * 1e3
    row.p25_ms, row.p75_ms = sample.quantile_s(0.25) * 1e3, sample.quantile_s(0.75) * 1e3
    row.examples_per_s = batch_size / sample.median_s
    row.faults_per_call = sample.faults_per_call
    baseline = f"{BASELINE} | {row.mode}"
    if baseline in samples:
      row.x_flax = _harness.median_ratio(sample, samples[baseline])
      row.x_flax_compile = _harness.median_ratio(compile_samples[key], compile_samples[baseline])
      row.x_flax_memory = _ratio(row.peak_bytes, rows[baseline].peak_bytes)
  return [dataclasses.asdict(row) for row in rows.values()]


def _spawn_worker(modes: Sequence[str], args: argparse.Namespace, host_devices: int | None = None) -> dict[str, Any]:
  """Runs `modes` in a fresh interpreter on `args.platform` (with `host_devices` devices on the CPU); returns its
  {"rows": [...], "device": {...}}."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = args.platform
  if host_devices is not None:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={host_devices}"])
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "rows.json")
    command = [
      sys.executable,
      "-m",
      "benchmarks.train",
      "--worker",
      out,
      "--modes",
      ",".join(modes),
      "--rounds",
      str(args.rounds),
      "--batch-size",
      str(args.batch_size),
      "--seed",
      str(args.seed),
      "--platform",
      args.platform,
      "--model",
      args.model,
      "--compile-rounds",
      str(args.compile_rounds),
    ]
    if args.devices is not None:
      command += ["--devices", str(args.devices)]
    command += ["--quick"] * args.quick + ["--prototypes"] * args.prototypes
    completed = subprocess.run(command, env=env, cwd=_repo_root(), check=False)
    if completed.returncode != 0 or not os.path.exists(out):
      return {
        "rows": [
          dataclasses.asdict(
            Row(
              mode=m,
              implementation="(worker)",
              devices=host_devices or 0,
              batch_size=args.batch_size,
              layers=[],
              check="ERROR",
              error=f"worker exited with status {completed.returncode}",
            )
          )
          for m in modes
        ],
        "device": {},
      }
    with open(out) as f:
      return json.load(f)


def _repo_root() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HEADERS = (
  "mode",
  "implementation",
  "devices",
  "batch",
  "ms/step (median)",
  "p25-p75",
  "examples/s",
  "x flax.linen (time)",
  "faults/step",
  "compile s",
  "x flax.linen (compile)",
  "peak MiB",
  "x flax.linen (memory)",
  "check (max rel err)",
)


def describe(model: str, layers: Sequence[int]) -> str:
  """The report's one-line description of the model."""
  if model == "cnn":
    height, width, channels, stem, *widths, classes = layers
    return (
      f"ResNet-style CNN, NHWC {height}x{width}x{channels} input, conv3x3 stem {stem}, one residual block "
      f"per stage of {'-'.join(map(str, widths))} channels (stride 2 from the second, 1x1 projection), "
      f"conv -> BatchNorm -> ReLU, global average pool, Dense {classes}"
    )
  return f"MLP {'-'.join(map(str, layers))}, Dense -> BatchNorm -> ReLU"


def render(rows: Sequence[dict[str, Any]], info: dict[str, Any], layers: Sequence[int], model: str = "mlp") -> str:
  def cells(row):
    spread = "-" if row["p25_ms"] is None else f"{row['p25_ms']:.2f}-{row['p75_ms']:.2f}"
    check = row["check"] if row["max_error"] is None else f"{row['check']} ({row['max_error']:.1e})"
    if row["error"]:
      check = f"{row['check']}: {row['error'][:80]}"
    return [
      row["mode"],
      row["implementation"],
      row["devices"],
      row["batch_size"],
      "-" if row["median_ms"] is None else f"{row['median_ms']:.2f}",
      spread,
      "-" if row["examples_per_s"] is None else f"{row['examples_per_s']:.0f}",
      _harness.fmt_ratio(row["x_flax"]),
      "-" if row["faults_per_call"] is None else f"{row['faults_per_call']:.0f}",
      "-" if row["compile_s"] is None else f"{row['compile_s']:.2f}",
      _harness.fmt_ratio(row.get("x_flax_compile")),
      "-" if row.get("peak_bytes") is None else f"{row['peak_bytes'] / 2**20:.1f}",
      _harness.fmt_ratio(row.get("x_flax_memory")),
      check,
    ]

  lines = [
    f"Machine: {_harness.machine_line(info)}",
    f"Command: `{info['command']}`",
    f"Model: {describe(model, layers)}; SGD momentum 0.9, donated state",
    "",
    _harness.markdown_table(HEADERS, [cells(row) for row in rows]),
  ]
  failures = [row for row in rows if row["check"] in ("FAIL", "ERROR")]
  if failures:
    lines += ["", "CORRECTNESS FAILURES:"]
    lines += [
      f"  {row['mode']} {row['implementation']}: {row['error'] or row['worst_leaf']} {row['max_error']}"
      for row in failures
    ]
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="a tiny model and few rounds: correctness in seconds")
  parser.add_argument("--model", choices=MODELS, default="mlp", help="mlp (the default) or cnn")
  parser.add_argument("--out", default=os.path.join("benchmarks", "out", "train"))
  parser.add_argument("--batch-size", type=int, default=None, help="global batch (default 256; quick 64)")
  parser.add_argument("--rounds", type=int, default=None, help="timed steps per configuration (default 31)")
  parser.add_argument(
    "--compile-rounds", type=int, default=None, help="fresh compilations per configuration (default 3; quick 1)"
  )
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--platform", default="cpu", help="JAX_PLATFORMS of the workers: cpu (host devices, the default), cuda, rocm, tpu"
  )
  parser.add_argument(
    "--devices",
    type=int,
    default=None,
    help="devices of the shard_map and sharded jit modes (CPU: host devices, default 8; "
    "accelerators: the first N, default all)",
  )
  parser.add_argument(
    "--prototypes",
    action="store_true",
    help="also time the layers of benchmarks.prototypes (modes without an axis name)",
  )
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: write rows here
  args = parser.parse_args(argv)
  if args.devices is not None and args.devices < 1:
    parser.error(f"--devices must be at least 1, got {args.devices}")
  args.batch_size = args.batch_size or (64 if args.quick else 256)
  args.rounds = args.rounds or (3 if args.quick else 31)
  args.compile_rounds = args.compile_rounds or (1 if args.quick else 3)
  unknown = set(args.modes.split(",")) - set(MODES)
  if unknown:
    parser.error(f"--modes: unknown {sorted(unknown)}, expected some of {list(MODES)}")
  return args


def targets(rows: Sequence[dict[str, Any]], model: str = "mlp") -> list[dict[str, Any]]:
  """bnjax's verdicts against flax.linen per mode: throughput; for the CNN also peak memory and compile time."""
  columns = {"training throughput >= flax.linen": "x_flax"}  # a time ratio: <= 1 is throughput >= flax's
  if model == "cnn":
    columns = {
      "cnn training throughput >= flax.linen": "x_flax",
      "cnn peak memory <= flax.linen": "x_flax_memory",
      "cnn compile time <= flax.linen": "x_flax_compile",
    }
  return [
    {
      "target": target,
      "implementation": row["implementation"],
      "mode": row["mode"],
      "ratio": row.get(column),
      "met": row.get(column) is not None and row[column] <= 1.0,
    }
    for target, column in columns.items()
    for row in rows
    if row["implementation"] in IMPLEMENTATIONS and row["implementation"] != BASELINE and row["check"] != "skipped"
  ]


def main(argv: Sequence[str] | None = None) -> int:
  """Runs every mode in worker processes; returns 0, or 1 if any configuration failed its check."""
  args = parse_args(argv)
  layers = model_sizes(args.model, args.quick)
  modes = args.modes.split(",")
  if args.worker:
    rows = run_worker(
      modes,
      layers=layers,
      batch_size=args.batch_size,
      rounds=args.rounds,
      warmup=1 if args.quick else 3,
      seed=args.seed,
      classes=layer_classes(args.prototypes),
      devices=args.devices,
      model=args.model,
      compile_rounds=args.compile_rounds,
    )
    with open(args.worker, "w") as f:
      json.dump({"rows": rows, "device": _harness.jax_device()}, f)
    return 0
  info = _harness.machine_info()
  if args.platform == "cpu":
    counts = {mode: cpu_worker_devices(mode, args.devices) for mode in modes}
    workers = [
      _spawn_worker([m for m in modes if counts[m] == n], args, host_devices=n) for n in sorted(set(counts.values()))
    ]
  else:
    workers = [_spawn_worker(modes, args)]
  rows = [row for worker in workers for row in worker["rows"]]
  for worker in workers:
    info.update(worker["device"])  # the platform and device kind the steps ran on
  info["load_average_end"] = os.getloadavg()
  markdown = render(rows, info, layers, args.model)
  print(markdown)
  failed = any(row["check"] in ("FAIL", "ERROR") for row in rows)
  for row in rows:
    if row["check"] in ("FAIL", "ERROR"):
      print(
        f"!!! CORRECTNESS {row['check']}: {row['mode']} {row['implementation']}: "
        f"{row['error'] or row['worst_leaf']} {row['max_error']}",
        file=sys.stderr,
      )
  payload = {
    "benchmark": "train",
    "model": args.model,
    "quick": args.quick,
    "rounds": args.rounds,
    "compile_rounds": args.compile_rounds,
    "layers": list(layers),
    "batch_size": args.batch_size,
    "machine": info,
    "tolerance": TOLERANCE,
    "rows": rows,
    "targets": targets(rows, args.model),
    "all_checks_passed": not failed,
  }
  _harness.write_results(args.out, payload, markdown)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
