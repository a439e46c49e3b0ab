"""The benchmarks run end to end in --quick mode and their correctness checks catch wrong implementations.

Nothing here asserts anything about speed: --quick exists to prove that every implementation runs and agrees
with the float64 reference, and that a disagreement fails the run.
"""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import _harness
from benchmarks import _reference
from benchmarks import ops
from benchmarks import prototypes
from benchmarks import train


def _load(out_dir):
  return json.loads((out_dir / "results.json").read_text())


def test_ops_quick_every_implementation_runs_and_passes(tmp_path):
  status = ops.main(["--quick", "--out", str(tmp_path)])
  results = _load(tmp_path)
  assert (tmp_path / "results.md").read_text().startswith("Machine:")
  rows = results["rows"]
  cases = ops.cases_for(ops.QUICK_SHAPES, ops.DTYPES, ops.MODES)
  present = {(row["case"], row["implementation"]) for row in rows}
  for case in cases:
    for impl in ops.IMPLEMENTATIONS:
      if impl.supports(case):
        assert (case.label, impl.name) in present, (case.label, impl.name)
  failures = [
    (row["case"], row["implementation"], row["error"] or row["max_errors"])
    for row in rows
    if row["check"] not in ("pass", "n/a")
  ]
  assert not failures
  assert status == 0 and results["all_checks_passed"]
  # Only the floor goes unchecked; everything else compared every output array it must produce.
  for row in rows:
    if row["implementation"] == ops.FLOOR:
      assert row["check"] == "n/a"
    else:
      expected = {"y", "mean", "var"} if row["mode"] == "fwd" else {"dx", "dscale", "dbias", "mean", "var"}
      assert set(row["max_errors"]) == expected, row
    assert row["rounds"] == results["rounds"] and row["median_ms"] > 0
  for row in rows:  # both torch layouts appear for NHWC, and the best of them is named
    if len(row["shape"]) == 4 and row["implementation"] != ops.FLOOR:
      assert row["torch_best"].startswith(("torch NCHW", "torch channels_last"))
  assert {v["shape"][0] for v in results["targets"]} == {s[0] for s in ops.QUICK_SHAPES}
  assert {v["dtype"] for v in results["targets"]} == {r["dtype"] for r in rows} & set(ops.TARGET_DTYPES)


def _ops_row(mode="fwd", dtype="float32", implementation="bnjax", **fields) -> ops.Row:
  """A row of the 8x4 case; `fields` set the timings and the check."""
  return ops.Row(
    case=f"{mode} {dtype} 8x4",
    mode=mode,
    dtype=dtype,
    shape=[8, 4],
    implementation=implementation,
    family="jax",
    note="",
    **fields,
  )


def test_targets_judge_each_dtype_and_the_floor_only_on_a_gpu():
  rows = [_ops_row(mode, dtype) for mode in ("fwd", "fwd_bwd") for dtype in ("float32", "bfloat16", "float16")]
  for row in rows:
    row.x_flax, row.x_floor = (0.95, 1.3) if row.mode == "fwd" else (0.85, 1.1)
  on_cpu, on_gpu = ops.targets(rows, "cpu"), ops.targets(rows, "gpu")
  assert {v["dtype"] for v in on_cpu} == {"float32", "bfloat16"}
  assert not [v for v in on_cpu if "floor" in v["target"]]
  floor = [v for v in on_gpu if "floor" in v["target"]]
  assert len(floor) == 2 and all(v["met"] for v in floor)
  assert all(v["met"] for v in on_gpu if "flax" in v["target"])


# Wrong batch norms, each a plausible bug, to prove the check fails them. Each is a forward(x, params, state).
def _wrong_forward(bug):
  def forward(x, params, state):
    scale, bias = params
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes)
    var = jnp.var(x32, axis=axes, ddof=1 if bug == "unbiased variance in y" else 0)
    if bug == "statistics treated as constants":  # forward right, backward misses d(mean)/dx, d(var)/dx
      mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    y = (x32 - mean) * jax.lax.rsqrt(var + ops.EPSILON) * scale + bias
    running_mean, running_var = state
    if bug != "running statistics not updated":
      running_mean = ops.DECAY * running_mean + (1 - ops.DECAY) * mean
      running_var = ops.DECAY * running_var + (1 - ops.DECAY) * var
    return y.astype(x.dtype), (running_mean, running_var)

  return forward


def _wrong_implementation(bug):
  def build(case, data):
    return ops.jax_prepared(
      case,
      _wrong_forward(bug),
      jnp.asarray(data.x),
      (jnp.asarray(data.scale), jnp.asarray(data.bias)),
      (jnp.asarray(data.mean0), jnp.asarray(data.var0)),
      jnp.asarray(data.cotangent),
      running=lambda s: s,
      param_grads=lambda p: p,
      rule=_reference.ema_rule(data.mean0, data.var0, data.decay),
    )

  return ops.Implementation(f"wrong: {bug}", build)


@pytest.mark.parametrize(
  "bug, mode, caught",
  [
    ("unbiased variance in y", "fwd", {"y", "var"}),
    ("statistics treated as constants", "fwd_bwd", {"dx"}),
    ("running statistics not updated", "fwd", {"mean", "var"}),
  ],
)
def test_ops_check_fails_a_wrong_implementation(bug, mode, caught):
  case = ops.Case((32, 16), "float32", mode)
  reference_impl = next(impl for impl in ops.IMPLEMENTATIONS if impl.name == "jnp+autodiff")
  rows = {
    row.implementation: row
    for row in ops.run_case(case, [reference_impl, _wrong_implementation(bug)], rounds=1, warmup=0)
  }
  assert rows["jnp+autodiff"].check == "pass"
  wrong = rows[f"wrong: {bug}"]
  assert wrong.check == "FAIL"
  failed = {name for name, error in wrong.max_errors.items() if error > _reference.TOLERANCE["float32"]}
  assert failed == caught


def test_ops_wrong_implementation_makes_the_run_fail(tmp_path, capsys):
  impls = [impl for impl in ops.IMPLEMENTATIONS if impl.name in (ops.BASELINE, ops.FLOOR)]
  impls.append(_wrong_implementation("statistics treated as constants"))
  status = ops.main(
    ["--quick", "--dtypes", "float32", "--modes", "fwd_bwd", "--out", str(tmp_path)], implementations=impls
  )
  assert status == 1
  results = _load(tmp_path)
  assert not results["all_checks_passed"]
  assert {row["implementation"]: row["check"] for row in results["rows"]} == {
    ops.BASELINE: "pass",
    ops.FLOOR: "n/a",
    "wrong: statistics treated as constants": "FAIL",
  }
  assert "CORRECTNESS FAIL" in capsys.readouterr().err


def test_reference_matches_finite_differences():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 3))
  scale, bias, g = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal((6, 3))
  ref = _reference.batch_norm_reference(x, scale, bias, g, epsilon=1e-3)
  loss = lambda x, s, b: np.sum(g * _reference.batch_norm_reference(x, s, b, g, epsilon=1e-3).y)
  step = 1e-6
  for i, j in [(0, 0), (3, 2), (5, 1)]:
    dx = np.zeros_like(x)
    dx[i, j] = step
    numeric = (loss(x + dx, scale, bias) - loss(x - dx, scale, bias)) / (2 * step)
    np.testing.assert_allclose(ref.dx[i, j], numeric, rtol=1e-5)
  e = np.eye(3)[1] * step
  np.testing.assert_allclose(
    ref.dscale[1], (loss(x, scale + e, bias) - loss(x, scale - e, bias)) / (2 * step), rtol=1e-5
  )
  np.testing.assert_allclose(ref.dbias[1], g[:, 1].sum(), rtol=1e-12)
  np.testing.assert_allclose(ref.y.mean(0), bias, atol=1e-12)


def test_harness_round_robin_interleaves_and_aligns_rounds():
  log = []
  calls = {name: (lambda name=name: log.append(name)) for name in "abc"}
  setups = []
  samples = _harness.round_robin(calls, rounds=4, warmup=1, seed=3, setups={"b": lambda: setups.append(len(log))})
  assert setups == [log.index("b", i) for i in setups]  # b's setup ran right before every call of b
  assert len(setups) == 5
  assert log[:3] == ["a", "b", "c"]  # warm-up, once each
  timed = log[3:]
  assert all(sorted(timed[3 * r : 3 * r + 3]) == ["a", "b", "c"] for r in range(4))  # one of each per round
  assert len({tuple(timed[3 * r : 3 * r + 3]) for r in range(4)}) > 1  # order varies
  assert all(len(s.seconds) == len(s.minor_faults) == 4 for s in samples.values())
  fast = _harness.Samples(seconds=[1.0, 2.0, 4.0])
  slow = _harness.Samples(seconds=[2.0, 4.0, 8.0])
  assert _harness.median_ratio(slow, fast) == 2.0
  assert fast.quantile_s(0.5) == fast.median_s == 2.0


def test_train_quick_every_configuration_runs_and_passes(tmp_path):
  status = train.main(["--quick", "--out", str(tmp_path)])
  results = _load(tmp_path)
  rows = results["rows"]
  assert {(row["mode"], row["implementation"]) for row in rows} == {
    (mode, name) for mode in train.MODES for name in train.IMPLEMENTATIONS
  }
  assert all(row["check"] == "pass" for row in rows), [(r["mode"], r["implementation"], r["error"]) for r in rows]
  assert {row["mode"]: row["devices"] for row in rows} == train.WORKER_DEVICES
  assert all(row["examples_per_s"] > 0 and row["rounds"] == results["rounds"] for row in rows)
  assert status == 0 and results["all_checks_passed"]


def test_train_quick_cnn_every_configuration_runs_and_passes(tmp_path):
  status = train.main(["--quick", "--model", "cnn", "--out", str(tmp_path)])
  results = _load(tmp_path)
  rows = results["rows"]
  assert {(row["mode"], row["implementation"]) for row in rows} == {
    (mode, name) for mode in train.MODES for name in train.IMPLEMENTATIONS
  }
  assert all(row["check"] == "pass" for row in rows), [(r["mode"], r["implementation"], r["error"]) for r in rows]
  assert all(row["peak_bytes"] > 0 and row["compile_s"] > 0 and row["examples_per_s"] > 0 for row in rows)
  assert all(row["x_flax_memory"] > 0 and row["x_flax_compile"] > 0 for row in rows)
  assert results["model"] == "cnn" and results["layers"] == list(train.QUICK_CNN)
  names = ("cnn training throughput >= flax.linen", "cnn peak memory <= flax.linen", "cnn compile time <= flax.linen")
  assert sorted((t["target"], t["mode"], t["implementation"]) for t in results["targets"]) == sorted(
    (name, mode, "bnjax") for name in names for mode in train.MODES
  )
  assert "ResNet-style CNN, NHWC 8x8x3" in (tmp_path / "results.md").read_text()
  assert status == 0 and results["all_checks_passed"]


def test_train_prototype_layers_and_modes_without_enough_devices(tmp_path):
  status = train.main(
    ["--quick", "--prototypes", "--modes", "1 device,shard_map", "--devices", "1", "--out", str(tmp_path)]
  )
  rows = {(row["mode"], row["implementation"]): row for row in _load(tmp_path)["rows"]}
  names = list(train.IMPLEMENTATIONS) + list(prototypes.LAYER_STATS)
  assert set(rows) == {(mode, name) for mode in ("1 device", "shard_map") for name in names}
  assert all(rows["1 device", name]["check"] == "pass" for name in names), rows
  assert all(
    rows["shard_map", name]["check"] == "skipped" and "at least 2 devices" in rows["shard_map", name]["error"]
    for name in names
  )
  assert status == 0


def test_train_on_an_accelerator_runs_one_worker_on_its_own_devices(tmp_path, monkeypatch):
  spawned = []

  def fake_worker(modes, args, host_devices=None):
    spawned.append((list(modes), args.platform, host_devices))
    rows = [
      dataclasses.asdict(
        train.Row(
          mode=mode,
          implementation=name,
          devices=1,
          batch_size=8,
          layers=[],
          median_ms=1.0,
          x_flax=1.0,
          check="pass",
          max_error=0.0,
        )
      )
      for mode in modes
      for name in ("bnjax", train.BASELINE)
    ]
    return {"rows": rows, "device": {"jax_backend": "gpu", "jax_device": "NVIDIA H100"}}

  monkeypatch.setattr(train, "_spawn_worker", fake_worker)
  assert train.main(["--quick", "--platform", "cuda", "--out", str(tmp_path)]) == 0
  assert spawned == [(list(train.MODES), "cuda", None)]  # no host-device flags, every mode in one process
  results = _load(tmp_path)
  assert "NVIDIA H100 (gpu)" in (tmp_path / "results.md").read_text()
  assert [t["implementation"] for t in results["targets"]] == ["bnjax"] * len(train.MODES)
  assert train.layer_classes().keys() == set(train.IMPLEMENTATIONS)


def test_prototype_layer_matches_flax_and_refuses_an_axis_name():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  x = 1e4 + jax.random.normal(jax.random.key(0), (64, 8))  # the guarded layer must take its exact branch
  flax_layer = nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=False)
  variables = flax_layer.init(jax.random.key(1), x)
  want, want_state = flax_layer.apply(variables, x, mutable=["batch_stats"])
  for name, layer_class in prototypes.layer_classes().items():
    layer = layer_class(use_running_average=False, momentum=0.9)
    assert jax.tree.structure(layer.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    got, got_state = layer.apply(variables, x, mutable=["batch_stats"])
    chex.assert_trees_all_close((got, got_state), (want, want_state), rtol=1e-5, atol=1e-3, custom_message=name)
    with pytest.raises(ValueError, match="axis_name"):
      layer_class(axis_name="batch").init(jax.random.key(1), x)


def _constant_statistics_batch_norm():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class BatchNorm(nn.BatchNorm):  # flax's fields and name, so its variables get the same paths
    """flax.linen.BatchNorm's variables and forward, but the batch statistics treated as constants in the
    backward: the loss of the first step is right, the gradients are not."""

    @nn.compact
    def __call__(self, x):
      features, axes = (x.shape[-1],), tuple(range(x.ndim - 1))
      scale = self.param("scale", nn.initializers.ones, features)
      bias = self.param("bias", nn.initializers.zeros, features)
      running_mean = self.variable("batch_stats", "mean", jnp.zeros, features)
      running_var = self.variable("batch_stats", "var", jnp.ones, features)
      mean = jax.lax.stop_gradient(x.mean(axes))
      var = jax.lax.stop_gradient(x.var(axes))
      if not self.is_initializing():
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
      return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias

  return {train.BASELINE: nn.BatchNorm, "wrong": BatchNorm}


@pytest.mark.parametrize("model,layers", [("mlp", train.QUICK_LAYERS), ("cnn", train.QUICK_CNN)])
def test_train_check_fails_a_wrong_layer(model, layers):
  rows = train.run_worker(
    ["1 device"],
    layers=layers,
    batch_size=16,
    rounds=1,
    warmup=0,
    classes=_constant_statistics_batch_norm(),
    model=model,
  )
  checks = {row["implementation"]: row["check"] for row in rows}
  assert checks == {train.BASELINE: "pass", "wrong": "FAIL"}, [row["error"] for row in rows]
  wrong = next(row for row in rows if row["implementation"] == "wrong")
  assert wrong["worst_leaf"].startswith("[0]")  # caught in the updated state (gradients), not the loss
  assert all(row["peak_bytes"] > 0 and row["compile_s"] > 0 for row in rows)


def test_hlo_anatomy_counts_passes_and_temporaries():
  from benchmarks import hlo  # pylint: disable=g-import-not-at-top

  counts = {}
  for mode in ops.MODES:
    case = ops.Case((64, 32), "float32", mode)
    data = ops.make_case_data(case)
    for impl in ops.IMPLEMENTATIONS:
      if impl.name in (ops.FLOOR, "jnp+autodiff"):
        prepared = impl.build(case, data)
        text = prepared.jitted.lower(*prepared.args).compile().as_text()
        counts[impl.name, mode] = hlo.anatomy(text, data.x.size, data.x.dtype.itemsize)
  assert counts[ops.FLOOR, "fwd"].passes == 2 and counts[ops.FLOOR, "fwd_bwd"].passes == 5
  assert not counts[ops.FLOOR, "fwd_bwd"].temporaries
  # The hand-written two-pass forward reads x for each reduction and for y: more than the floor.
  assert counts["jnp+autodiff", "fwd"].passes > 2
  assert counts["jnp+autodiff", "fwd_bwd"].passes > 5


def test_prototypes_pass_the_check_and_the_guard_keeps_the_variance_exact():
  for mode in ops.MODES:
    rows = ops.run_case(ops.Case((32, 16), "float32", mode), prototypes.IMPLEMENTATIONS, rounds=1, warmup=0)
    assert [row.check for row in rows] == ["pass"] * len(prototypes.IMPLEMENTATIONS)
  x = 1e4 + np.random.default_rng(0).standard_normal((2048, 4)).astype(np.float32)  # one pass loses all bits
  want = np.var(x.astype(np.float64), axis=0)
  for shift in (None, jnp.zeros(4)):
    stats = lambda x, k: prototypes.guarded_one_pass_stats(x, k, lambda a: a)
    _, var = jax.jit(stats)(jnp.asarray(x), shift)
    np.testing.assert_allclose(np.asarray(var), want, rtol=1e-5)


def test_combine_takes_medians_over_runs(tmp_path):
  from benchmarks import combine  # pylint: disable=g-import-not-at-top

  def run(ms, ratio):
    row = dataclasses.asdict(_ops_row(median_ms=ms, x_flax=ratio, rounds=3, check="pass", max_errors={"y": 1e-7}))
    return {"all_checks_passed": True, "rows": [row]}

  (row,) = combine.combine([run(1.0, 0.5), run(9.0, 0.9), run(2.0, 0.6)])
  assert (row.median_ms, row.x_flax, row.rounds) == (2.0, 0.6, 9)
  failed = run(1.0, 0.5)
  failed["rows"][0].update(check="FAIL", max_errors={"y": 1e-2})
  with pytest.raises(ValueError, match="failed"):
    combine.combine([failed])


def test_known_deviations_cover_only_their_arrays_and_never_bnjax():
  nhwc = ops.Case((64, 32, 32, 64), "bfloat16", "fwd_bwd")
  assert ops.known_deviation(nhwc, "haiku", {"dbias", "dscale"})
  assert not ops.known_deviation(nhwc, "haiku", {"dbias", "dx"})
  assert not ops.known_deviation(
    ops.Case((4096, 1024), "bfloat16", "fwd_bwd"),
    "haiku",
    {"dbias"},
  )
  assert not ops.known_deviation(nhwc._replace(dtype="float32"), "haiku", {"dbias"})
  assert all(deviation.implementation != "bnjax" for deviation in ops.KNOWN_DEVIATIONS)


def test_combine_train_takes_medians_over_runs():
  from benchmarks import combine  # pylint: disable=g-import-not-at-top

  def run(ms, ratio):
    row = dataclasses.asdict(
      train.Row(
        mode="1 device",
        implementation="bnjax",
        devices=1,
        batch_size=8,
        layers=[4, 2],
        median_ms=ms,
        examples_per_s=8e3 / ms,
        x_flax=ratio,
        rounds=3,
        check="pass",
        max_error=1e-7,
        peak_bytes=int(ms * 1000),
      )
    )
    return {"all_checks_passed": True, "rows": [row]}

  (row,) = combine.combine_train([run(1.0, 0.9), run(4.0, 1.2), run(2.0, 1.0)])
  assert (row["median_ms"], row["examples_per_s"], row["x_flax"], row["rounds"]) == (2.0, 4e3, 1.0, 9)
  assert (row["peak_bytes"], row["x_flax_memory"]) == (2000, None)


def test_combine_summary_picks_the_requested_dtype(tmp_path, capsys):
  from benchmarks import combine  # pylint: disable=g-import-not-at-top

  def row(dtype, implementation, ms, ratio):
    return dataclasses.asdict(
      _ops_row(
        dtype=dtype,
        implementation=implementation,
        median_ms=ms,
        x_flax=ratio,
        rounds=3,
        check="pass",
        max_errors={"y": 1e-7},
      )
    )

  run_dir = tmp_path / "run"
  run_dir.mkdir()
  rows = [
    row("float32", "bnjax", 1.0, 0.5),
    row("float32", ops.BASELINE, 2.0, 1.0),
    row("bfloat16", "bnjax", 3.0, 0.25),
    row("bfloat16", ops.BASELINE, 12.0, 1.0),
  ]
  (run_dir / "results.json").write_text(json.dumps({"benchmark": "ops", "all_checks_passed": True, "rows": rows}))
  assert combine.main([str(run_dir), "--summary", "--dtype", "bfloat16"]) == 0
  table = capsys.readouterr().out
  assert "0.25" in table and "0.50" not in table
  assert combine.main([str(run_dir), "--summary"]) == 0
  table = capsys.readouterr().out
  assert "0.50" in table and "0.25" not in table


def test_accuracy_report_separates_exact_stable_and_cancelling_formulations():
  rows = {(r["formulation"], r["location"]): r for r in prototypes.accuracy((4096, 4), locations=(0.0, 1e4))}
  for name in ("bnjax.moments", "proto: two-pass", "proto: guarded one-pass", "bnjax one-pass (GPU/TPU form)"):
    assert rows[name, 1e4]["var_relative_error"] < 1e-5
  assert rows["flax one-pass E[x^2]-E[x]^2", 1e4]["var_relative_error"] > 0.1
  # Chan's merges never cancel, but each rounds the running mean: stable, not exact.
  assert rows["proto: Chan one-pass", 0.0]["var_relative_error"] < 1e-5
  assert rows["proto: Chan one-pass", 1e4]["var_relative_error"] < 1e-2
