"""bnjax.nn: BatchNorm is a drop-in for flax.linen.BatchNorm."""

import functools

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.nn as bnn

F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _same_layout(a, b):
  """Same tree paths, shapes and dtypes: checkpoints of one load into the other."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert jax.tree.map(lambda v: (v.shape, v.dtype), a) == jax.tree.map(lambda v: (v.shape, v.dtype), b)


def _net(bn_cls, **bn_kwargs):
  """x -> BatchNorm -> elementwise weight: the BatchNorm class is the only difference between models."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      y = bn_cls(use_running_average=not train, **bn_kwargs)(x)
      w = self.param("w", nn.initializers.normal(1.0), x.shape[1:], jnp.float32)
      return y * w

  return Net()


def _init(module, x, **kwargs):
  """`module.init` as one compiled program (eager mode compiles every operation on its own)."""
  return helpers.fast_jit(functools.partial(module.init, **kwargs))(jax.random.key(0), x)


def _apply(module, variables, *args, **kwargs):
  """`module.apply` as one compiled program; keyword arguments are fixed (static)."""
  return helpers.fast_jit(functools.partial(module.apply, **kwargs))(variables, *args)


def _train(net, other_net, xs, targets, lr=0.1):
  """Init, SGD steps with `mutable=['batch_stats']`, then eval, as one compiled program.

  Returns the init variables, per step (output, new batch_stats, grads of params, grad of x), the final
  variables, the eval output on `xs[0]`, and the final variables applied by `net` and by `other_net`
  (eval on `xs[1]`, one training step on `xs[2]`).
  """

  def loss(params, stats, x, t):
    y, updates = net.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return jnp.mean((y.astype(jnp.float32) - t) ** 2), (y, updates["batch_stats"])

  def step(carry, batch):
    params, stats = carry
    grad_fn = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)
    (_, (y, stats)), (g_params, g_x) = grad_fn(params, stats, *batch)
    params = jax.tree.map(lambda p, g: p - lr * g, params, g_params)
    return (params, stats), (y, stats, g_params, g_x)

  @helpers.fast_jit
  def run(xs, targets):
    variables = net.init(jax.random.key(0), xs[0], train=True)
    (params, stats), history = jax.lax.scan(step, (variables["params"], variables["batch_stats"]), (xs, targets))
    final = {"params": params, "batch_stats": stats}

    def applied_by(module):
      return (
        module.apply(final, xs[1], train=False),
        module.apply(final, xs[2], train=True, mutable=["batch_stats"]),
      )

    return variables, history, final, net.apply(final, xs[0], train=False), applied_by(net), applied_by(other_net)

  return run(xs, targets)


def _batches(shape, dtype, n=5, seed=0):
  """`n` stacked input batches (mean 3, std 2, so that the statistics matter) and regression targets."""
  return jnp.asarray(3.0 + 2.0 * helpers.normal((n, *shape), seed), dtype), jnp.asarray(
    helpers.normal((n, *shape), seed + 1)
  )


SHAPES_AXES = [
  ((16, 6), -1),
  ((8, 4, 5), -1),
  ((4, 3, 5, 6), 1),  # NCHW
  ((6, 4, 5), (1, 2)),
  ((4, 5, 3, 2), (-1, 1)),
]


def _check_equivalent(shape, axis, x_dtype, tol, **bn_kwargs):
  """Same model with flax's and bnjax's BatchNorm: same variables, trajectory, gradients and eval."""
  xs, targets = _batches(shape, x_dtype)
  flax_net = _net(nn.BatchNorm, axis=axis, momentum=0.9, use_fast_variance=False, **bn_kwargs)
  ours_net = _net(bnn.BatchNorm, axis=axis, momentum=0.9, **bn_kwargs)
  f_vars, f_hist, f_final, f_eval, f_by_flax, f_by_ours = _train(flax_net, ours_net, xs, targets)
  o_vars, o_hist, o_final, o_eval, o_by_ours, o_by_flax = _train(ours_net, flax_net, xs, targets)

  _same_layout(f_vars, o_vars)
  helpers.close(f_vars, o_vars, dict(rtol=0, atol=0), "init variables")
  # The input gradient has x's dtype: in bfloat16 both round float32 values, to within one bfloat16 ulp.
  grad_x_tol = tol if x_dtype == jnp.float32 else BF16_TOL
  assert f_hist[0].dtype == o_hist[0].dtype and f_hist[3].dtype == o_hist[3].dtype
  for i in range(len(xs)):
    f, o = jax.tree.map(lambda h: h[i], (f_hist, o_hist))
    helpers.close(f[:3], o[:3], tol, f"training step {i}: (output, batch_stats, grad params)")
    helpers.close(f[3], o[3], grad_x_tol, f"training step {i}: grad x")
  helpers.close(f_final, o_final, tol, "final variables")
  helpers.close(f_eval, o_eval, tol, "eval output")
  # Variables trained with one class apply in the other, both directions, in eval and in training.
  helpers.close(f_by_ours, f_by_flax, tol, "flax-trained variables applied by bnjax")
  helpers.close(o_by_flax, o_by_ours, tol, "bnjax-trained variables applied by flax")


EQUIVALENCE_CASES = [(shape, axis, jnp.float32) for shape, axis in SHAPES_AXES] + [
  (shape, axis, jnp.bfloat16) for shape, axis in SHAPES_AXES[2:]
]


@pytest.mark.parametrize(
  "shape,axis,dtype", EQUIVALENCE_CASES, ids=[f"{s}-ax{a}-{jnp.dtype(d).name}" for s, a, d in EQUIVALENCE_CASES]
)
def test_matches_flax_over_training_steps(shape, axis, dtype):
  # bfloat16 inputs with float32 parameters give float32 outputs (flax's promotion), computed from the
  # same bfloat16 values, so float32 tolerances apply to both.
  _check_equivalent(shape, axis, dtype, F32_TOL)


@pytest.mark.parametrize("use_scale,use_bias", [(False, True), (True, False), (False, False)])
def test_matches_flax_without_scale_or_bias(use_scale, use_bias):
  _check_equivalent((8, 4, 5), -1, jnp.float32, F32_TOL, use_scale=use_scale, use_bias=use_bias)


def test_matches_flax_in_bfloat16_compute():
  # dtype=bfloat16 and bfloat16 parameters: the output is bfloat16, rounded once at the end by bnjax and
  # after bfloat16 arithmetic by flax, so the two agree to bfloat16 precision.
  _check_equivalent((16, 6), -1, jnp.bfloat16, BF16_TOL, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)


@pytest.mark.parametrize(
  "x_dtype,kwargs",
  [
    (jnp.float32, {}),
    (jnp.bfloat16, {}),
    (jnp.float32, {"dtype": jnp.bfloat16}),
    (jnp.bfloat16, {"dtype": jnp.float32}),
    (jnp.bfloat16, {"param_dtype": jnp.bfloat16}),
    (jnp.bfloat16, {"param_dtype": jnp.bfloat16, "force_float32_reductions": False}),
    (jnp.float16, {"param_dtype": jnp.float16, "use_scale": False, "use_bias": False}),
  ],
)
def test_dtypes_follow_flax(x_dtype, kwargs):
  x = jnp.asarray(1.0 + helpers.normal((16, 4), 1), x_dtype)
  results = []
  for cls, extra in ((nn.BatchNorm, {"use_fast_variance": False}), (bnn.BatchNorm, {})):
    layer = cls(**kwargs, **extra)

    @helpers.fast_jit
    def run(x):
      variables = layer.init(jax.random.key(0), x, use_running_average=False)
      y, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
      return variables, y, updates, layer.apply({**variables, **updates}, x, use_running_average=True)

    results.append(run(x))
  (f_vars, f_y, f_upd, f_eval), (o_vars, o_y, o_upd, o_eval) = results
  _same_layout(f_vars, o_vars)
  _same_layout(f_upd, o_upd)
  assert o_y.dtype == f_y.dtype and o_eval.dtype == f_eval.dtype
  helpers.close((f_y, f_upd, f_eval), (o_y, o_upd, o_eval), BF16_TOL)


def test_use_running_average_at_construction_or_call():
  x = helpers.normal((8, 3), 0)
  variables = {
    "params": {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])},
    "batch_stats": {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 1.0, 9.0])},
  }
  at_call = _apply(bnn.BatchNorm(), variables, x, use_running_average=True)
  at_construction = _apply(bnn.BatchNorm(use_running_average=True), variables, x)
  stats, params = variables["batch_stats"], variables["params"]
  stats, params = helpers.to_numpy((stats, params))
  expected = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]
  helpers.close(at_call, expected, F32_TOL)
  helpers.close(at_construction, expected, F32_TOL)
  with pytest.raises(ValueError, match="use_running_average"):
    bnn.BatchNorm().apply(variables, x)
  with pytest.raises(ValueError, match="use_running_average"):
    bnn.BatchNorm(use_running_average=True).apply(variables, x, use_running_average=False)


def test_init_does_not_update_running_statistics():
  x = 10.0 + helpers.normal((8, 3), 0)
  layer = bnn.BatchNorm(use_running_average=False, momentum=0.0)
  variables = _init(layer, x)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(3))
  # The same apply outside init does update them (momentum 0: to the batch's statistics).
  _, updates = _apply(layer, variables, x, mutable=["batch_stats"])
  helpers.close(updates["batch_stats"], {"mean": x.mean(0), "var": x.var(0)}, F32_TOL)


def test_init_outside_the_mapped_axis():
  # Like flax, init does not synchronise, so a layer with an axis_name initialises without the axis.
  x = helpers.normal((8, 3), 0)
  layer = bnn.BatchNorm(use_running_average=False, axis_name="batch")
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"}
  with pytest.raises(NameError, match="batch"):
    jax.eval_shape(functools.partial(layer.apply, mutable=["batch_stats"]), variables, x)


def _apply_mutable(layer, variables, x):
  y, updates = layer.apply(variables, x, mutable=["batch_stats"])
  return y, updates["batch_stats"]


def _whole_batch(x, momentum):
  layer = bnn.BatchNorm(use_running_average=False, momentum=momentum)
  return helpers.fast_jit(lambda x: _apply_mutable(layer, layer.init(jax.random.key(0), x), x))(x)


def test_axis_name_under_vmap_matches_flax_and_the_whole_batch():
  x = 2.0 + helpers.normal((4, 8, 6), 0)  # 4 mapped members of 8 rows
  outputs = []
  for cls, extra in ((nn.BatchNorm, {"use_fast_variance": False}), (bnn.BatchNorm, {})):
    layer = cls(use_running_average=False, axis_name="batch", momentum=0.5, **extra)

    @helpers.fast_jit
    def run(x):
      variables = layer.init(jax.random.key(0), x[0])
      mapped = jax.vmap(functools.partial(_apply_mutable, layer), in_axes=(None, 0), axis_name="batch")
      return mapped(variables, x)

    outputs.append(run(x))
  helpers.close(outputs[0], outputs[1], F32_TOL)
  # Synchronised statistics are those of the concatenated batch, identical on every member.
  y, stats = outputs[1]
  y_whole, stats_whole = _whole_batch(x.reshape(32, 6), 0.5)
  helpers.close(y.reshape(32, 6), y_whole, F32_TOL)
  for member in range(4):
    helpers.close(jax.tree.map(lambda s: s[member], stats), stats_whole, F32_TOL)


@pytest.mark.devices(8)
def test_axis_name_under_shard_map_matches_flax_and_the_whole_batch():
  mesh = jax.make_mesh((8,), ("data",))
  x = 2.0 + helpers.normal((32, 6), 0)
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  outputs = []
  for cls, extra in ((nn.BatchNorm, {"use_fast_variance": False}), (bnn.BatchNorm, {})):
    layer = cls(use_running_average=False, axis_name="data", momentum=0.5, **extra)
    variables = {
      "params": {"scale": np.full(6, 2.0, np.float32), "bias": np.full(6, 0.5, np.float32)},
      "batch_stats": {"mean": np.full(6, 0.5, np.float32), "var": np.full(6, 2.0, np.float32)},
    }
    step = helpers.fast_jit(
      jax.shard_map(
        functools.partial(_apply_mutable, layer), mesh=mesh, in_specs=(P(), P("data")), out_specs=(P("data"), P())
      )
    )
    outputs.append(jax.device_get(step(variables, x_sharded)))
  helpers.close(outputs[0], outputs[1], F32_TOL)
  y, stats = outputs[1]
  y_whole, batch_stats = helpers.to_numpy(_whole_batch(x, 0.0))  # momentum 0: the running stats are the batch's
  helpers.close(y, 2.0 * y_whole + 0.5, F32_TOL)
  helpers.close(stats, {"mean": 0.25 + 0.5 * batch_stats["mean"], "var": 1.0 + 0.5 * batch_stats["var"]}, F32_TOL)


@pytest.mark.devices(8)
def test_axis_index_groups_under_pmap_match_flax():
  x = 2.0 + helpers.normal((8, 4, 6), 0)
  groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
  outputs = []
  for cls, extra in ((nn.BatchNorm, {"use_fast_variance": False}), (bnn.BatchNorm, {})):
    layer = cls(use_running_average=False, axis_name="d", axis_index_groups=groups, momentum=0.5, **extra)
    variables = jax.eval_shape(layer.init, jax.random.key(0), x[0])
    variables = jax.tree.map(lambda v: np.ones(v.shape, v.dtype), variables)
    outputs.append(jax.pmap(functools.partial(_apply_mutable, layer), in_axes=(None, 0), axis_name="d")(variables, x))
  helpers.close(outputs[0], outputs[1], F32_TOL)
  means = outputs[1][1]["mean"]
  for device in range(8):
    group = x[:4] if device < 4 else x[4:]
    helpers.close(means[device], 0.5 + 0.5 * group.reshape(16, 6).mean(0), F32_TOL)


def test_mask_matches_flax_and_dropping_rows():
  x = 1.0 + helpers.normal((12, 5, 3), 0)
  rows = np.arange(12 * 5).reshape(12, 5) % 3 != 0
  flax_layer = nn.BatchNorm(use_running_average=False, momentum=0.0, use_fast_variance=False)
  ours = bnn.BatchNorm(use_running_average=False, momentum=0.0)
  variables = {
    "params": {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])},
    "batch_stats": {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)},
  }

  @helpers.fast_jit
  def run(x):
    expected = flax_layer.apply(variables, x, mask=rows[..., None], mutable=["batch_stats"])
    # bnjax's form, flax's form with size-1 features, flax's form spanning the features.
    masks = (rows, rows[..., None], np.broadcast_to(rows[..., None], x.shape))
    return expected, [ours.apply(variables, x, mask=m, mutable=["batch_stats"]) for m in masks]

  expected, got = run(x)
  for result in got:
    helpers.close(result, expected, F32_TOL)
  # The statistics are those of the true rows alone.
  helpers.close(got[0][1]["batch_stats"], {"mean": x[rows].mean(0), "var": x[rows].var(0)}, F32_TOL)
  # The mask is only for training statistics; evaluation ignores it.
  evaluate = bnn.BatchNorm(use_running_average=True)
  helpers.close(_apply(evaluate, variables, x, mask=rows), _apply(evaluate, variables, x), F32_TOL)


def test_mask_errors():
  x = helpers.normal((6, 4), 0)
  layer = bnn.BatchNorm(use_running_average=False)
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)

  def apply(mask):
    return jax.eval_shape(lambda v: layer.apply(v, x, mask=mask, mutable=["batch_stats"]), variables)

  with pytest.raises(ValueError, match=r"`mask` has shape \(5,\)"):
    apply(np.ones((5,), bool))
  with pytest.raises(TypeError, match="`mask` must be a boolean"):
    apply(np.ones((6,)))


def test_extras_are_the_core_options():
  x = 1.0 + helpers.normal((8, 3), 0)
  layer = bnn.BatchNorm(
    use_running_average=False, momentum=0.8, virtual_batch_size=4, unbiased_running_var=True, running="cumulative"
  )
  core = functools.partial(
    bnjax.batch_norm, train=True, decay=0.8, virtual_batch_size=4, unbiased_running_var=True, running="cumulative"
  )

  @helpers.fast_jit
  def run(x):
    variables = layer.init(jax.random.key(0), x)
    params, stats = bnjax.init(3)
    steps = []
    for step in range(2):
      x_step = x * (step + 1)
      y, updates = layer.apply(variables, x_step, mutable=["batch_stats"])
      variables = {**variables, **updates}
      y_core, stats = core(x_step, params, stats)
      steps.append(((y, updates["batch_stats"]), (y_core, stats._asdict())))
    return variables, steps

  variables, steps = run(x)
  assert jax.tree.map(jnp.shape, variables["batch_stats"]) == {"mean": (3,), "var": (3,), "count": ()}
  for ours, core_result in steps:
    helpers.close(ours, core_result, F32_TOL)
  assert int(variables["batch_stats"]["count"]) == 2


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    ({"momentum": 1.5}, ValueError, "momentum"),
    ({"momentum": "0.9"}, TypeError, "momentum"),
    ({"epsilon": 0.0}, ValueError, "epsilon"),
    ({"axis": "channels"}, TypeError, "axis"),
    ({"axis": (1, 1)}, ValueError, "axis"),
    ({"axis_index_groups": [[0, 1]]}, ValueError, "axis_index_groups"),
    ({"axis_name": 3}, TypeError, "axis_name"),
    ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size"),
    ({"running": "median"}, ValueError, "running"),
    ({"use_running_average": "yes"}, TypeError, "use_running_average"),
    ({"use_scale": 1}, TypeError, "use_scale"),
    ({"unbiased_running_var": None}, TypeError, "unbiased_running_var"),
  ],
)
def test_constructor_errors_name_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    bnn.BatchNorm(**kwargs)


def test_call_errors_name_the_argument():
  x = helpers.normal((4, 3), 0)
  with pytest.raises(ValueError, match="`axis`=2 is out of range"):
    jax.eval_shape(bnn.BatchNorm(use_running_average=False, axis=2).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"`axis`=\(-1, 1\) repeats an axis"):
    jax.eval_shape(bnn.BatchNorm(use_running_average=False, axis=(-1, 1)).init, jax.random.key(0), x)


def test_extras_are_keyword_only():
  with pytest.raises(TypeError):
    bnn.BatchNorm(None, -1, 0.99, 1e-5, None, jnp.float32, True, True, nn.initializers.zeros, nn.initializers.ones,
                  None, None, True, True, 4)  # fmt: skip
