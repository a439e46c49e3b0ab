"""Inference: fold_conv, whole-model folding (linen and nnx), export, and fine-tuning with frozen statistics."""

import functools
import json
import subprocess
import sys
import textwrap

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax import traverse_util

import bnjax
import bnjax.nnx
from bnjax import models


def _norm_variables(features, seed=0):
  """Batch-norm parameters and statistics far from the identity (mean != 0, var != 1, scale != 1)."""
  rng = np.random.default_rng(seed)
  params = bnjax.BatchNormParams(
    scale=rng.uniform(0.5, 2.0, features).astype(np.float32), bias=rng.normal(size=features).astype(np.float32)
  )
  stats = bnjax.BatchStats(
    mean=rng.normal(size=features).astype(np.float32), var=rng.uniform(0.2, 3.0, features).astype(np.float32)
  )
  return params, stats


def _assert_close(got, want, rtol=1e-5):
  """Equal to `rtol` relative to the largest magnitude of `want` (float32 rounding of sums)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)))


# ------------------------------------------------------------------------------------------------------
# fold_conv
# ------------------------------------------------------------------------------------------------------

_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}


def _conv_then_norm(rank, layout, groups, x, kernel, bias, params, stats, dtype=jnp.float32):
  """`(conv -> eval-mode batch norm, the folded conv)`, one compiled program."""
  sp = _SPATIAL[rank]
  if layout == "HWIO":
    numbers, feature_axis, out_axis = (f"N{sp}C", f"{sp}IO", f"N{sp}C"), -1, -1
  else:
    numbers, feature_axis, out_axis = (f"NC{sp}", f"OI{sp}", f"NC{sp}"), 1, 0

  def conv(x, kernel, bias):
    y = jax.lax.conv_general_dilated(
      x, kernel, (1,) * rank, "SAME", dimension_numbers=numbers, feature_group_count=groups
    )
    if bias is None:
      return y
    shape = [1] * y.ndim
    shape[feature_axis] = -1
    return y + bias.reshape(shape)

  @helpers.fast_jit
  def both(x, kernel, bias, params, stats):
    want, _ = bnjax.batch_norm(conv(x, kernel, bias), params, stats, train=False, axis=feature_axis)
    folded_kernel, folded_bias = bnjax.fold_conv(kernel, bias, params, stats, out_axis=out_axis)
    return want, conv(x, folded_kernel, folded_bias), folded_kernel

  def cast(a):
    return None if a is None else jnp.asarray(a, dtype)

  return both(cast(x), cast(kernel), cast(bias), params, stats)


@pytest.mark.parametrize(
  "rank,layout,groups,use_bias",
  [
    (1, "HWIO", 1, True),
    (2, "HWIO", 1, False),
    (3, "HWIO", 1, True),
    (1, "OIHW", 1, False),
    (2, "OIHW", 1, True),
    (3, "OIHW", 2, False),
    (2, "HWIO", 2, True),
    (2, "HWIO", "depthwise", False),
    (1, "OIHW", "depthwise", True),
  ],
)
def test_fold_conv_equals_conv_then_eval_batch_norm(rank, layout, groups, use_bias):
  in_features, multiplier = 4, 3
  groups = in_features if groups == "depthwise" else groups
  out_features = 2 * in_features if groups == 1 else multiplier * groups
  spatial = (5,) * rank
  window = (3,) * rank
  x_shape = (2, *spatial, in_features) if layout == "HWIO" else (2, in_features, *spatial)
  k_shape = (*window, in_features // groups, out_features)
  if layout == "OIHW":
    k_shape = (out_features, in_features // groups, *window)
  params, stats = _norm_variables(out_features)
  bias = helpers.normal(out_features, 3) if use_bias else None
  want, got, folded_kernel = _conv_then_norm(
    rank, layout, groups, helpers.normal(x_shape, 1), helpers.normal(k_shape, 2), bias, params, stats
  )
  assert folded_kernel.shape == k_shape and folded_kernel.dtype == jnp.float32
  _assert_close(got, want)


def test_fold_conv_bfloat16_kernel_stays_bfloat16():
  params, stats = _norm_variables(8)
  want, got, folded_kernel = _conv_then_norm(
    2,
    "HWIO",
    1,
    helpers.normal((2, 5, 5, 4), 1),
    helpers.normal((3, 3, 4, 8), 2),
    helpers.normal(8, 3),
    params,
    stats,
    jnp.bfloat16,
  )
  assert folded_kernel.dtype == jnp.bfloat16
  _assert_close(got, want, rtol=3e-2)


def test_fold_conv_without_norm_params_and_rank_two_kernel_is_fold_dense():
  _, stats = _norm_variables(5)
  kernel = helpers.normal((7, 5))
  for params in (None, bnjax.BatchNormParams(None, None)):
    conv = bnjax.fold_conv(kernel, None, params, stats)
    dense = bnjax.fold_dense(kernel, None, params, stats)
    jax.tree.map(np.testing.assert_array_equal, conv, dense)
  # No scale and no bias: (x W - mean) / sqrt(var + eps).
  want = (helpers.normal((3, 7)) @ kernel - stats.mean) / np.sqrt(stats.var + 1e-5)
  got = helpers.normal((3, 7)) @ conv[0] + conv[1]
  _assert_close(got, want)


@pytest.mark.parametrize(
  "kernel_shape,kwargs,error,match",
  [
    ((3, 3, 4, 8), dict(out_axis=4), ValueError, r"`out_axis`=4 is out of range for a kernel of rank 4"),
    ((3, 3, 4, 8), dict(out_axis=1.0), TypeError, r"`out_axis` must be an int"),
    ((3, 3, 4, 8), dict(out_axis=True), TypeError, r"`out_axis` must be an int"),
    # An OIHW kernel with the HWIO default: the statistics name the mismatch and the fix.
    ((8, 4, 3, 3), dict(), ValueError, r"`stats.mean` has shape \(8,\), expected \(3,\).*out_axis=0"),
    ((3, 3, 4, 8), dict(epsilon=0.0), ValueError, r"`epsilon` must be a finite float > 0"),
  ],
)
def test_fold_conv_bad_arguments_name_the_argument(kernel_shape, kwargs, error, match):
  params, stats = _norm_variables(8)
  with pytest.raises(error, match=match):
    bnjax.fold_conv(np.zeros(kernel_shape, np.float32), None, params, stats, **kwargs)


def test_fold_bad_shapes_and_dtypes_name_the_argument():
  params, stats = _norm_variables(8)
  kernel = np.zeros((3, 3, 4, 8), np.float32)
  with pytest.raises(ValueError, match=r"`bias` has shape \(4,\), expected \(8,\)"):
    bnjax.fold_conv(kernel, np.zeros(4, np.float32), params, stats)
  with pytest.raises(ValueError, match=r"`params.scale` has shape \(3,\)"):
    bnjax.fold_conv(kernel, None, params._replace(scale=np.ones(3, np.float32)), stats)
  with pytest.raises(TypeError, match=r"`kernel` must have a floating or complex dtype"):
    bnjax.fold_conv(kernel.astype(np.int32), None, params, stats)
  with pytest.raises(ValueError, match=r"`kernel` must be 2-D .*bnjax.fold_conv"):
    bnjax.fold_dense(kernel, None, params, stats)
  with pytest.raises(ValueError, match=r"`stats` must be a bnjax.BatchStats"):
    bnjax.fold_conv(kernel, None, params, None)


# ------------------------------------------------------------------------------------------------------
# Whole linen models
# ------------------------------------------------------------------------------------------------------


def _trained(model, x, seed=0):
  """Variables as after training: a few training steps, then every parameter moved at random."""
  init = helpers.fast_jit(functools.partial(model.init, train=False))
  variables = init(jax.random.key(seed), x)
  step = helpers.fast_jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
  for shift in (0.5, -1.0):
    _, updates = step(variables, 2.0 * x + shift)
    variables = {**variables, **updates}
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape).astype(np.float32), variables["params"])
  return {**variables, "params": params}


def _eval(model, variables, x):
  return helpers.fast_jit(functools.partial(model.apply, train=False))(variables, x)


LINEN_MODELS = {
  "mlp-pre": (lambda: models.MLP((16, 12, 3), norm="pre"), (8, 2, 5)),
  "mlp-post": (lambda: models.MLP((16, 12, 3), activation=nn.tanh, norm="post"), (8, 10)),
  "mlp-post-some": (lambda: models.MLP((16, 12, 8, 3), norm="post", norm_layers=(0, 2)), (8, 10)),
  "keras-article": (models.keras_article_model, (8, 5)),
  "convnet-2d": (lambda: models.ConvNet((4, 8), num_classes=3), (4, 8, 8, 3)),
  "convnet-1d": (lambda: models.ConvNet((4,), num_classes=2, stride=1), (4, 9, 2)),
}


@pytest.mark.parametrize("name", LINEN_MODELS)
def test_fold_batch_norm_linen_equals_eval_mode(name):
  make, x_shape = LINEN_MODELS[name]
  model, x = make(), helpers.normal(x_shape, 1)
  variables = _trained(model, x)
  folded, folded_variables = models.fold_batch_norm(model, variables)
  assert set(folded_variables) == {"params"}
  assert not any("BatchNorm" in layer for layer in folded_variables["params"])
  assert folded.norm in (None, False)
  _assert_close(_eval(folded, folded_variables, x), _eval(model, variables, x))


def test_fold_batch_norm_refuses_other_models_and_incomplete_variables():
  with pytest.raises(TypeError, match=r"`model` must be a bnjax.models.MLP or ConvNet, got Dense"):
    models.fold_batch_norm(nn.Dense(3), {})
  model = models.MLP((6, 2), norm="pre")
  variables = helpers.fast_jit(functools.partial(model.init, train=False))(
    jax.random.key(0), np.zeros((2, 3), np.float32)
  )
  with pytest.raises(ValueError, match=r"`variables` has no batch_stats/BatchNorm_0"):
    models.fold_batch_norm(model, {"params": variables["params"]})
  with pytest.raises(ValueError, match=r"`variables` for Dense_0: `stats.mean` has shape \(4,\)"):
    stats = {"BatchNorm_0": {"mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}}
    models.fold_batch_norm(model, {**variables, "batch_stats": stats})


def test_convnet_layout_and_argument_checks():
  model = models.ConvNet((4, 8), num_classes=3)
  variables = helpers.fast_jit(functools.partial(model.init, train=False))(
    jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32)
  )
  shapes = jax.tree.map(jnp.shape, variables)
  assert shapes["params"]["Conv_0"] == {"kernel": (3, 3, 3, 4)} and shapes["params"]["Dense_0"]["kernel"] == (8, 3)
  assert shapes["batch_stats"]["BatchNorm_1"] == {"mean": (8,), "var": (8,)}
  y = _eval(model, variables, np.zeros((2, 8, 8, 3), np.float32))
  assert y.shape == (2, 3)
  with pytest.raises(TypeError, match=r"`channels` must be a non-empty sequence"):
    models.ConvNet(4)
  with pytest.raises(ValueError, match=r"`num_classes` must be a positive int"):
    models.ConvNet(num_classes=0)
  with pytest.raises(ValueError, match=r"`x` must be \(N, \*spatial, C\)"):
    model.apply(variables, np.zeros((2, 3), np.float32), train=False)


# ------------------------------------------------------------------------------------------------------
# nnx
# ------------------------------------------------------------------------------------------------------


def _perturbed(module, seed=0):
  """Every parameter and statistic moved at random (variances kept positive), in place."""
  rng = np.random.default_rng(seed)
  for _, node in nnx.iter_graph(module):
    if isinstance(node, (nnx.Param, nnx.BatchStat)) and node[...].dtype == jnp.float32:
      noise = np.abs(rng.standard_normal(node[...].shape)).astype(np.float32)
      node[...] = node[...] + 0.5 * noise
  return module


def _nnx_eval(module, x):
  module.eval()
  return nnx.jit(lambda m, x: m(x))(module, x)


def test_fold_batch_norm_nnx_sequential_mlp_pre_and_post():
  rngs = nnx.Rngs(0)
  model = _perturbed(
    nnx.Sequential(
      nnx.Linear(10, 16, use_bias=False, rngs=rngs),
      bnjax.nnx.BatchNorm(16, rngs=rngs),  # after a Linear: folds into it
      nnx.relu,
      nnx.Linear(16, 8, rngs=rngs),
      nnx.relu,
      nnx.BatchNorm(8, rngs=rngs),  # flax's, after an activation: folds into the next Linear
      nnx.Linear(8, 3, rngs=rngs),
    )
  )
  x = helpers.normal((6, 10), 1)
  before = jax.tree.map(np.asarray, nnx.state(model))
  folded = models.fold_batch_norm_nnx(model)
  assert len(folded.layers) == 5 and folded.layers[0].bias is not None
  _assert_close(_nnx_eval(folded, x), _nnx_eval(model, x))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)  # the original is untouched


def test_fold_batch_norm_nnx_nested_sequential_convnet():
  rngs = nnx.Rngs(0)

  def block(cin, cout):
    return nnx.Sequential(nnx.Conv(cin, cout, (3, 3), rngs=rngs), bnjax.nnx.BatchNorm(cout, rngs=rngs), nnx.relu)

  model = _perturbed(
    nnx.Sequential(
      block(3, 4),
      block(4, 8),
      nnx.Conv(8, 8, (3, 3), feature_group_count=8, use_bias=False, rngs=rngs),  # depthwise
      nnx.BatchNorm(8, rngs=rngs),
      lambda x: x.mean(axis=(1, 2)),
      nnx.Linear(8, 3, rngs=rngs),
    )
  )
  x = helpers.normal((2, 6, 6, 3), 1)
  folded = models.fold_batch_norm_nnx(model)
  assert not any(isinstance(n, bnjax.nnx.BatchNorm | nnx.BatchNorm) for _, n in nnx.iter_graph(folded))
  _assert_close(_nnx_eval(folded, x), _nnx_eval(model, x))


class _Residual(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(4, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn = bnjax.nnx.BatchNorm(4, rngs=rngs)
    self.head_bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = x + nnx.relu(self.bn(self.conv(x)))
    return self.head(self.head_bn(x.mean(axis=(1, 2))))


def test_fold_batch_norm_nnx_named_pairs():
  model = _perturbed(_Residual(nnx.Rngs(0)))
  x = helpers.normal((2, 5, 5, 4), 1)
  folded = models.fold_batch_norm_nnx(model, pairs=[("conv", "bn"), ("head_bn", "head")])
  assert not isinstance(folded.bn, bnjax.nnx.BatchNorm) and not isinstance(folded.head_bn, nnx.BatchNorm)
  _assert_close(_nnx_eval(folded, x), _nnx_eval(model, x))


def test_fold_batch_norm_nnx_refusals_name_why():
  rngs = nnx.Rngs(0)
  with pytest.raises(TypeError, match=r"not an nnx.Sequential: its call order is unknown"):
    models.fold_batch_norm_nnx(_Residual(rngs))
  with pytest.raises(ValueError, match=r"model.head_bn is a batch norm that was not folded"):
    models.fold_batch_norm_nnx(_Residual(rngs), pairs=[("conv", "bn")])
  with pytest.raises(ValueError, match=r"zero padding is not normalized"):
    models.fold_batch_norm_nnx(nnx.Sequential(nnx.BatchNorm(3, rngs=rngs), nnx.Conv(3, 4, (3, 3), rngs=rngs)))
  with pytest.raises(ValueError, match=r"model.layers\[2\] is a batch norm between custom_jvp, nothing"):
    models.fold_batch_norm_nnx(nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.relu, nnx.BatchNorm(4, rngs=rngs)))
  with pytest.raises(ValueError, match=r"normalizes axis=1; only a batch norm over the last axis"):
    models.fold_batch_norm_nnx(
      nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=rngs), bnjax.nnx.BatchNorm(4, axis=1, rngs=rngs))
    )
  with pytest.raises(ValueError, match=r"model.layers\[1\]: `stats.mean` has shape \(5,\), expected \(4,\)"):
    models.fold_batch_norm_nnx(nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.BatchNorm(5, rngs=rngs)))
  with pytest.raises(ValueError, match=r"`pairs\[0\]\[1\]`='bnn': the model has no 'bnn' there"):
    models.fold_batch_norm_nnx(_Residual(rngs), pairs=[("conv", "bnn")])
  with pytest.raises(ValueError, match=r"names a Conv and a Linear"):
    models.fold_batch_norm_nnx(_Residual(rngs), pairs=[("conv", "head")])


# ------------------------------------------------------------------------------------------------------
# Export, reloaded in a fresh process
# ------------------------------------------------------------------------------------------------------

_RELOAD = textwrap.dedent(
  """
  import sys
  import numpy as np
  import jax
  folder = sys.argv[1]
  for name in ("fixed", "symbolic"):
    exported = jax.export.deserialize(bytearray(open(f"{folder}/{name}.bin", "rb").read()))
    for batch in ((4,) if name == "fixed" else (4, 7)):
      x = np.load(f"{folder}/x.npy")[:batch]
      np.save(f"{folder}/{name}_{batch}.npy", np.asarray(exported.call(x)))
  print("bnjax" in sys.modules)
  """
)


def test_export_inference_reloads_in_a_fresh_process(tmp_path):
  model = models.ConvNet((4, 8), num_classes=3)
  x = helpers.normal((7, 6, 6, 2), 1)
  variables = _trained(model, x)
  want = np.asarray(_eval(model, variables, x))
  fixed = models.export_inference(model, variables, x[:4], symbolic_batch=False)
  symbolic = models.export_inference(model, variables, jax.ShapeDtypeStruct((1, 6, 6, 2), jnp.float32))
  assert fixed.in_avals[0].shape == (4, 6, 6, 2) and str(symbolic.in_avals[0].shape[0]) == "b"
  (tmp_path / "fixed.bin").write_bytes(fixed.serialize())
  (tmp_path / "symbolic.bin").write_bytes(symbolic.serialize())
  np.save(tmp_path / "x.npy", x)
  run = subprocess.run(
    [sys.executable, "-c", _RELOAD, str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
  )
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == "False"  # the reloaded function needs no bnjax
  for name, batch in (("fixed", 4), ("symbolic", 4), ("symbolic", 7)):
    _assert_close(np.load(tmp_path / f"{name}_{batch}.npy"), want[:batch])


def test_export_inference_checks_its_arguments():
  model = models.MLP((4, 2), norm="pre")
  with pytest.raises(TypeError, match=r"`symbolic_batch` must be True or False"):
    models.export_inference(model, {}, np.zeros((2, 3), np.float32), symbolic_batch=1)
  with pytest.raises(ValueError, match=r"`example_x` must have a batch axis"):
    models.export_inference(model, {}, np.float32(1.0))


# ------------------------------------------------------------------------------------------------------
# Fine-tuning with frozen statistics
# ------------------------------------------------------------------------------------------------------


def test_core_train_false_learns_scale_and_bias_with_statistics_fixed():
  x, target = helpers.normal((16, 4), 1), helpers.normal((16, 4), 2)
  params, stats = _norm_variables(4)
  tx = optax.sgd(0.1)

  @helpers.fast_jit
  def step(params, opt_state, stats):
    def loss(params):
      y, new_stats = bnjax.batch_norm(x, params, stats, train=False)
      return jnp.mean((y - target) ** 2), new_stats

    (_, new_stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, new_stats, grads

  start, opt_state = params, tx.init(params)
  for _ in range(3):
    params, opt_state, stats_after, grads = step(params, opt_state, stats)
    jax.tree.map(np.testing.assert_array_equal, stats_after, stats)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in grads)
  assert not np.allclose(params.scale, start.scale) and not np.allclose(params.bias, start.bias)


def _linen_setup():
  model = models.MLP((8, 3), norm="pre")
  x, target = helpers.normal((16, 5), 1), helpers.normal((16, 3), 2)
  variables = _trained(model, x)
  return model, x, target, variables


def _linen_fine_tune(model, x, target, variables, tx, steps=3):
  @helpers.fast_jit
  def step(params, opt_state, batch_stats):
    def loss(params):  # use_running_average: no `mutable`, the statistics cannot move
      y = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
      return jnp.mean((y - target) ** 2)

    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = variables["params"], tx.init(variables["params"])
  for _ in range(steps):
    params, opt_state = step(params, opt_state, variables["batch_stats"])
  return params


def test_linen_eval_mode_fine_tuning_moves_scale_and_bias_only():
  model, x, target, variables = _linen_setup()
  params = _linen_fine_tune(model, x, target, variables, optax.sgd(0.1))
  for name in ("scale", "bias"):
    assert not np.allclose(params["BatchNorm_0"][name], variables["params"]["BatchNorm_0"][name])


def test_linen_frozen_batch_norm_parameters_with_multi_transform():
  model, x, target, variables = _linen_setup()
  labels = traverse_util.path_aware_map(
    lambda path, _: "frozen" if path[0].startswith("BatchNorm") else "trained", variables["params"]
  )
  tx = optax.multi_transform({"trained": optax.sgd(0.1), "frozen": optax.set_to_zero()}, labels)
  params = _linen_fine_tune(model, x, target, variables, tx)
  jax.tree.map(np.testing.assert_array_equal, params["BatchNorm_0"], variables["params"]["BatchNorm_0"])
  assert not np.allclose(params["Dense_0"]["kernel"], variables["params"]["Dense_0"]["kernel"])


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(5, 4, use_bias=False, rngs=rngs)
    self.bn = bnjax.nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.linear(x))


def _nnx_fine_tune(wrt, steps=3):
  model = _perturbed(_Tiny(nnx.Rngs(0)))
  model.eval()  # running statistics used, and not updated
  x, target = helpers.normal((16, 5), 1), helpers.normal((16, 4), 2)
  before = jax.tree.map(np.asarray, nnx.state(model))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=wrt)

  @nnx.jit
  def step(model, optimizer):
    def loss(model):
      return jnp.mean((model(x) - target) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)

  for _ in range(steps):
    step(model, optimizer)
  return before, nnx.state(model)


def test_nnx_eval_mode_fine_tuning_moves_scale_and_bias_only():
  before, after = _nnx_fine_tune(nnx.Param)
  for name in ("mean", "var"):
    np.testing.assert_array_equal(after["bn"][name][...], before["bn"][name][...])
  for name in ("scale", "bias"):
    assert not np.allclose(after["bn"][name][...], before["bn"][name][...])


def test_nnx_frozen_batch_norm_with_a_filter():
  before, after = _nnx_fine_tune(nnx.All(nnx.Param, nnx.Not(nnx.PathContains("bn"))))
  jax.tree.map(np.testing.assert_array_equal, after["bn"], before["bn"])
  assert not np.allclose(after["linear"]["kernel"][...], before["linear"]["kernel"][...])


def test_fold_benchmark_quick_runs_and_checks_the_outputs(tmp_path, capsys):
  from benchmarks import fold

  assert fold.main(["--quick", "--rounds", "1", "--out", str(tmp_path)]) == 0
  payload = json.loads((tmp_path / "results.json").read_text())
  assert payload["all_checks_passed"] and [row["model"] for row in payload["rows"]] == [
    "MLP pre",
    "MLP post",
    "ConvNet",
  ]
  assert "speed-up (median ratio)" in capsys.readouterr().out
