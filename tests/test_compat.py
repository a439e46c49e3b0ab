"""Drop-in compatibility: the idioms flax.linen, flax.nnx, Equinox and stax users type first.

Each test runs with the peer's layer and with bnjax's (`impl` = "flax" / "bnjax") and checks the result
against the peer (flax with `use_fast_variance=False`, Equinox `mode="batch"`, stax) or a float64 NumPy
reference, so any difference from the peer is a failure:

  * dummy batches of one in training mode: linen `init`, `nn.tabulate`, `jax.eval_shape` of `init`,
    `bind`; nnx eager calls, `nnx.jit` + `nnx.value_and_grad`, `nnx.tabulate`, `nnx.eval_shape`; the
    core's `allow_batch_of_one` (statistics of one value: the output is the bias);
  * per-example `jax.vmap` with an `axis_name` (core, linen, against Equinox too), one and two levels,
    with gradients;
  * evaluation mode on one unbatched example;
  * flax's masks (any boolean array broadcastable to x, each feature over its own true entries): eager,
    under `jit` with a traced mask, and synchronised over `vmap` / `shard_map`;
  * complex inputs;
  * `nnx.view` / `nnx.view_info`.

Float32 forward results are compared bit for bit where flax's two-pass statistics give identical bits,
within 1e-6 otherwise. The flax runs are cached: one run is both the flax variant and bnjax's reference.
"""

import contextlib
import functools
from collections.abc import Callable

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.example_libraries import stax
from jax.sharding import PartitionSpec as P

import bnjax
import bnjax.nn as bnn
import bnjax.nnx as bnnx

# bnjax may warn once about a batch of one; the tests compare results, not warnings.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

F = 3  # features
EPS = 1e-5
DECAY = 0.9
SHAPES = {"batch_of_one": (1, F), "batch": (4, F), "nhwc": (2, 3, 3, F)}
EXAMPLES = {"F": (F,), "T_F": (4, F)}  # one example seen inside vmap: a vector, or T vectors
_CONSOLE = dict(force_terminal=False, width=200)  # plain text, no column truncation

FLAX_LINEN = functools.partial(nn.BatchNorm, use_fast_variance=False)
FLAX_NNX = functools.partial(nnx.BatchNorm, use_fast_variance=False)
_LINEN = {"flax": FLAX_LINEN, "bnjax": bnn.BatchNorm}
_NNX = {"flax": FLAX_NNX, "bnjax": bnnx.BatchNorm}


def _flax_core(x, params, stats, *, train, decay=0.99, epsilon=EPS, axis_name=None, mask=None, allow_batch_of_one=None):
  """`bnjax.batch_norm`'s signature on flax.linen.BatchNorm (a batch of one is always allowed there)."""
  del allow_batch_of_one
  layer = FLAX_LINEN(use_running_average=not train, momentum=decay, epsilon=epsilon, axis_name=axis_name)
  variables = {
    "params": {"scale": params.scale, "bias": params.bias},
    "batch_stats": {"mean": stats.mean, "var": stats.var},
  }
  y, updates = layer.apply(variables, x, mask=mask, mutable=["batch_stats"])
  return y, bnjax.BatchStats(updates["batch_stats"]["mean"], updates["batch_stats"]["var"])


_CORE = {"flax": _flax_core, "bnjax": bnjax.batch_norm}


@pytest.fixture(params=("flax", "bnjax"))
def impl(request):
  return request.param


@pytest.fixture
def linen_bn(impl):
  return _LINEN[impl]


@pytest.fixture
def nnx_bn(impl):
  return _NNX[impl]


@pytest.fixture
def core(impl):
  return _CORE[impl]


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------


def _normal(shape, seed, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(1.0, 2.0, shape), dtype)


def _bn_variables(seed=0):
  """Random linen variables of one BatchNorm of F features (positive running variances)."""
  rng = np.random.default_rng(seed)

  def draw(lo, hi):
    return jnp.asarray(rng.uniform(lo, hi, F), jnp.float32)

  return {
    "params": {"scale": draw(0.5, 1.5), "bias": draw(-1.0, 1.0)},
    "batch_stats": {"mean": draw(-1.0, 1.0), "var": draw(0.5, 2.0)},
  }


def _core_args(variables):
  p, s = variables["params"], variables["batch_stats"]
  return bnjax.BatchNormParams(p["scale"], p["bias"]), bnjax.BatchStats(s["mean"], s["var"])


def _randomized(variables, seed=0):
  """The same tree with random values (positive for running variances)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    values = rng.uniform(0.5, 2.0, leaf.shape) if path[-1].key == "var" else rng.normal(size=leaf.shape)
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, variables)


def _load_nnx(layer, variables):
  for name, value in {**variables["params"], **variables["batch_stats"]}.items():
    getattr(layer, name)[...] = value
  return layer


def _nnx_variables(model):
  return {kind.__name__: nnx.to_pure_dict(nnx.state(model, kind)) for kind in (nnx.Param, nnx.BatchStat)}


def _assert_same(actual, expected):
  """Same tree: names, shapes, dtypes and values, bit for bit."""
  chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
  chex.assert_trees_all_equal(actual, expected)


def _assert_close(actual, expected, tol=1e-6):
  """Same tree: names, shapes, dtypes; values within `tol` (relative and absolute)."""
  chex.assert_trees_all_equal_shapes_and_dtypes(actual, expected)
  chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol)


# bnjax's backward pass is the closed form, flax's is autodiff of its forward: they round differently.
GRAD_TOL = 1e-5


def _moments(x, mask=None):
  """Per-feature (last axis) float64 mean and biased variance, over the true entries of `mask`."""
  x = np.asarray(x)
  mask = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
  rows = x.reshape(-1, x.shape[-1]).astype(np.complex128 if np.iscomplexobj(x) else np.float64)
  keep = mask.reshape(-1, x.shape[-1])
  count = keep.sum(axis=0)
  mean = np.where(keep, rows, 0).sum(axis=0) / count
  var = np.where(keep, np.abs(rows - mean) ** 2, 0).sum(axis=0) / count
  return mean, var


def _expected(x, variables, mean, var, train):
  """The float64 output and new running statistics for given batch (or running) statistics."""
  p, s = variables["params"], variables["batch_stats"]
  y = (np.asarray(x, np.float64) - mean) / np.sqrt(var + EPS) * np.asarray(p["scale"]) + np.asarray(p["bias"])
  if not train:
    return y, s
  return y, {
    "mean": DECAY * np.asarray(s["mean"]) + (1 - DECAY) * mean,
    "var": DECAY * np.asarray(s["var"]) + (1 - DECAY) * var,
  }


class _MLP(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense, the model of flax's batch-norm guide."""

  bn: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = self.bn(use_running_average=not train, momentum=DECAY)(x)
    return nn.Dense(2)(nn.relu(x))


class _NnxMLP(nnx.Module):
  def __init__(self, bn, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(F, 8, rngs=rngs)
    self.bn = bn(8, momentum=DECAY, rngs=rngs)
    self.linear2 = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.linear2(nnx.relu(self.bn(self.linear1(x))))


# ------------------------------------------------------------------------------------------------------
# 1. Dummy batches of one in training mode
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_linen_init_in_training_mode(linen_bn, shape):
  x = jnp.ones(shape)
  variables = _MLP(linen_bn).init(jax.random.key(0), x, train=True)
  _assert_same(variables, _MLP(FLAX_LINEN).init(jax.random.key(0), x, train=True))
  # init computes the batch's statistics but leaves the running ones at their initial values.
  _assert_same(variables["batch_stats"], {"BatchNorm_0": {"mean": jnp.zeros(8), "var": jnp.ones(8)}})


def test_linen_tabulate_batch_of_one(linen_bn):
  def table(bn):
    return nn.tabulate(_MLP(bn), jax.random.key(0), console_kwargs=_CONSOLE)(jnp.ones((1, F)), train=True)

  assert table(linen_bn) == table(FLAX_LINEN)


def test_linen_eval_shape_of_init_batch_of_one(linen_bn):
  def abstract_variables(bn):
    return jax.eval_shape(functools.partial(_MLP(bn).init, train=True), jax.random.key(0), jnp.ones((1, F)))

  chex.assert_trees_all_equal_shapes_and_dtypes(abstract_variables(linen_bn), abstract_variables(FLAX_LINEN))


@pytest.mark.parametrize("train", (True, False), ids=("train", "eval"))
@pytest.mark.parametrize("shape", ((1, F), (F,)), ids=("batch_of_one", "unbatched"))
def test_linen_bind_then_call(linen_bn, shape, train):
  variables = _randomized(_MLP(FLAX_LINEN).init(jax.random.key(0), jnp.ones((4, F)), train=False))
  x = _normal(shape, 1)

  def call(bn):
    bound = _MLP(bn).bind(variables, mutable=["batch_stats"])
    return bound(x, train=train), bound.variables

  _assert_same(call(linen_bn), call(FLAX_LINEN))


@functools.cache
def _linen_train_step(bn, shape, dtype):
  """Output, new batch_stats and gradients (params, x) of one training step under jit."""
  variables = _bn_variables()
  x, cotangent = _normal(shape, 1, dtype), _normal(shape, 2)
  layer = bn(use_running_average=False, momentum=DECAY, dtype=dtype)

  def loss(params, x):
    y, updates = layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
    return jnp.sum(y.astype(jnp.float32) * cotangent), (y, updates["batch_stats"])

  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)
  return y, stats, grads


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.bfloat16), ids=("f32", "bf16"))
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_linen_train_step(linen_bn, shape, dtype):
  y, stats, grads = _linen_train_step(linen_bn, shape, dtype)
  y_ref, stats_ref, grads_ref = _linen_train_step(FLAX_LINEN, shape, dtype)
  if dtype == jnp.float32:
    _assert_same((y, stats), (y_ref, stats_ref))
    _assert_close(grads, grads_ref, GRAD_TOL)
  else:  # bfloat16 outputs and input gradients: a couple of ulps (2**-8)
    _assert_close(y, y_ref, 1e-2)
    _assert_close(stats, stats_ref)
    _assert_close(grads, grads_ref, 1e-2)
  if shape == SHAPES["batch_of_one"]:
    # Statistics of one value: x - mean = 0 and var = 0, so the output is the bias.
    np.testing.assert_array_equal(y, jnp.broadcast_to(_bn_variables()["params"]["bias"].astype(dtype), shape))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_nnx_eager_training_call(nnx_bn, shape):
  x = _normal(shape, 1)
  model, ref = _NnxMLP(nnx_bn, nnx.Rngs(0)), _NnxMLP(FLAX_NNX, nnx.Rngs(0))
  _assert_same(_nnx_variables(model), _nnx_variables(ref))
  _assert_same(model(x), ref(x))
  _assert_same(_nnx_variables(model), _nnx_variables(ref))
  if shape[0] == 1 and len(shape) == 2:
    np.testing.assert_array_equal(model.bn(model.linear1(x)), model.bn.bias[...][None])


@functools.cache
def _nnx_train_step(bn, shape):
  """Loss, gradients and variables after one `nnx.jit` + `nnx.value_and_grad` step."""
  x, cotangent = _normal(shape, 1), _normal(shape[:-1] + (2,), 2)

  @nnx.jit
  def train_step(model, x):
    return nnx.value_and_grad(lambda model: jnp.sum(model(x) * cotangent))(model)

  model = _NnxMLP(bn, nnx.Rngs(0))
  loss, grads = train_step(model, x)
  return loss, nnx.to_pure_dict(grads), _nnx_variables(model)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_nnx_jit_value_and_grad(nnx_bn, shape):
  loss, grads, variables = _nnx_train_step(nnx_bn, shape)
  loss_ref, grads_ref, variables_ref = _nnx_train_step(FLAX_NNX, shape)
  _assert_close(loss, loss_ref)
  _assert_close(grads, grads_ref, GRAD_TOL)
  _assert_close(variables, variables_ref)


@contextlib.contextmanager
def _restoring_methods(*classes):
  """nnx.tabulate swaps the methods of the model's classes and puts them back only if the call succeeds."""
  saved = [(cls, dict(vars(cls))) for cls in classes]
  try:
    yield
  finally:
    for cls, attributes in saved:
      for name, value in attributes.items():
        if vars(cls).get(name) is not value:
          setattr(cls, name, value)


def test_nnx_tabulate_batch_of_one(nnx_bn):
  def table(bn):
    with _restoring_methods(_NnxMLP, nnx.Linear, getattr(bn, "func", bn)):
      return nnx.tabulate(_NnxMLP(bn, nnx.Rngs(0)), jnp.ones((1, F)), console_kwargs=_CONSOLE)

  assert table(nnx_bn) == table(FLAX_NNX)


def test_nnx_eval_shape_batch_of_one(nnx_bn):
  def build_and_call(bn):
    def f(x):
      model = _NnxMLP(bn, nnx.Rngs(0))
      return model, model(x)

    model, y = nnx.eval_shape(f, jnp.ones((1, F)))
    return _nnx_variables(model), y

  chex.assert_trees_all_equal_shapes_and_dtypes(build_and_call(nnx_bn), build_and_call(FLAX_NNX))


def test_core_batch_of_one_is_an_error_by_default():
  params, stats = bnjax.init(F)
  with pytest.raises(ValueError):
    bnjax.batch_norm(jnp.ones((1, F)), params, stats, train=True)


@pytest.mark.parametrize("shape", ((1, F), (1, 1, 1, F)), ids=("batch_of_one", "nhwc_one_pixel"))
def test_core_allow_batch_of_one(core, shape):
  variables = _bn_variables()
  params, stats = _core_args(variables)
  x = _normal(shape, 1)
  y, new_stats = core(x, params, stats, train=True, decay=DECAY, allow_batch_of_one=True)
  y_ref, stats_ref = _flax_core(x, params, stats, train=True, decay=DECAY)
  np.testing.assert_array_equal(y, jnp.broadcast_to(params.bias, shape))
  _assert_same((y, new_stats[:2]), (y_ref, stats_ref[:2]))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
def test_core_matches_stax(core, shape):
  variables = _bn_variables()
  params, stats = _core_args(variables)
  x = _normal(shape, 1)
  _, apply_fun = stax.BatchNorm(axis=tuple(range(len(shape) - 1)))
  y_stax = apply_fun((params.bias, params.scale), x)
  y, _ = core(x, params, stats, train=True, **({"allow_batch_of_one": True} if shape[0] == 1 else {}))
  # stax's jax.nn.standardize rounds its own way.
  _assert_close(y, y_stax, 1e-5)


# ------------------------------------------------------------------------------------------------------
# 2. Per-example vmap with an axis name
# ------------------------------------------------------------------------------------------------------


def _apply(apply, variables, x, params, **kwargs):
  """`apply` (a linen apply, maybe vmapped) with new params and the running statistics of `variables`."""
  return apply({"params": params, "batch_stats": variables["batch_stats"]}, x, **kwargs)


@functools.cache
def _vmap_step(api, bn, example):
  """Output, new statistics and gradients (x, params) of a batch of 5 examples, per example under
  `jax.vmap(..., axis_name="batch")` (bn given), or as one batch through flax.linen (bn None)."""
  variables = _bn_variables()
  x, cotangent = _normal((5,) + example, 1), _normal((5,) + example, 2)
  if bn is None:
    layer = FLAX_LINEN(use_running_average=False, momentum=DECAY)
    step = functools.partial(_apply, layer.apply, variables, mutable=["batch_stats"])
  elif api == "core":
    stats = _core_args(variables)[1]

    def one(x, params):
      y, new = bn(
        x, bnjax.BatchNormParams(params["scale"], params["bias"]), stats, train=True, decay=DECAY, axis_name="batch"
      )
      return y, {"batch_stats": {"mean": new.mean, "var": new.var}}

    step = jax.vmap(one, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
  else:
    layer = bn(use_running_average=False, momentum=DECAY, axis_name="batch")
    apply = jax.vmap(
      functools.partial(layer.apply, mutable=["batch_stats"]), in_axes=(None, 0), out_axes=(0, None), axis_name="batch"
    )
    step = functools.partial(_apply, apply, variables)

  def loss(x, params):
    y, updates = step(x, params)
    return jnp.sum(y * cotangent), (y, updates["batch_stats"])

  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, variables["params"])
  return y, stats, grads


@pytest.mark.parametrize("example", EXAMPLES.values(), ids=EXAMPLES)
def test_core_vmap_per_example(core, example):
  y, stats, grads = _vmap_step("core", core, example)
  y_ref, stats_ref, grads_ref = _vmap_step("linen", None, example)
  _assert_same((y, stats), (y_ref, stats_ref))
  _assert_close(grads, grads_ref, GRAD_TOL)


@pytest.mark.parametrize("example", EXAMPLES.values(), ids=EXAMPLES)
def test_linen_vmap_per_example(linen_bn, example):
  x = _normal((5,) + example, 1)
  # Initialised on one unbatched example: init neither synchronises nor moves the statistics.
  layer = linen_bn(use_running_average=False, momentum=DECAY, axis_name="batch")
  _assert_same(layer.init(jax.random.key(0), x[0]), FLAX_LINEN(use_running_average=False).init(jax.random.key(0), x[0]))
  y, stats, grads = _vmap_step("linen", linen_bn, example)
  y_ref, stats_ref, grads_ref = _vmap_step("linen", None, example)
  _assert_same((y, stats), (y_ref, stats_ref))
  _assert_close(grads, grads_ref, GRAD_TOL)


@functools.cache
def _equinox_step(example):
  """Equinox's per-example output and running (mean, var) after one training step."""
  params, _ = _core_args(_bn_variables())
  x = _normal((5,) + example, 1)
  bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(F, axis_name="batch", momentum=DECAY, mode="batch")
  bn = eqx.tree_at(lambda b: (b.weight, b.bias), bn, (params.scale, params.bias))
  channels_first = jnp.moveaxis(x, -1, 1)  # Equinox takes an example (T, F) as (F, T)
  y, state = jax.jit(jax.vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch"))(channels_first, state)
  return jnp.moveaxis(y, 1, -1), state.get(bn.batch_state_index)


@pytest.mark.parametrize("example", EXAMPLES.values(), ids=EXAMPLES)
def test_core_vmap_matches_equinox(core, example):
  params, _ = _core_args(_bn_variables())
  x = _normal((5,) + example, 1)
  # Equinox's running statistics start at mean 0 and var 1, as bnjax.init's; its `momentum` is the weight of
  # the old value (bnjax's `decay`), and it stores the biased batch variance (unbiased_running_var=False).
  _, stats = bnjax.init(F)
  f = functools.partial(core, params=params, stats=stats, train=True, decay=DECAY, axis_name="batch")
  y, new_stats = jax.jit(jax.vmap(f, out_axes=(0, None), axis_name="batch"))(x)
  y_eqx, (mean_eqx, var_eqx) = _equinox_step(example)
  _assert_close(y, y_eqx)
  _assert_close(new_stats[:2], (mean_eqx, var_eqx))


# ------------------------------------------------------------------------------------------------------
# 3. Evaluation mode on one unbatched example
# ------------------------------------------------------------------------------------------------------


def test_core_eval_unbatched(core):
  variables = _bn_variables()
  params, stats = _core_args(variables)
  x = _normal((F,), 1)
  y, same_stats = core(x, params, stats, train=False)
  y_expected, _ = _expected(x, variables, np.asarray(stats.mean), np.asarray(stats.var), train=False)
  np.testing.assert_allclose(y, y_expected, rtol=1e-6, atol=1e-6)
  _assert_same(y, _flax_core(x, params, stats, train=False)[0])
  _assert_same(same_stats[:2], stats[:2])


def test_linen_eval_unbatched(linen_bn):
  variables = _bn_variables()
  x = _normal((F,), 1)
  y = linen_bn(use_running_average=True).apply(variables, x)
  _assert_same(y, FLAX_LINEN(use_running_average=True).apply(variables, x))


def test_nnx_eval_unbatched(nnx_bn):
  variables = _bn_variables()
  x = _normal((F,), 1)
  layer = _load_nnx(nnx_bn(F, use_running_average=True, rngs=nnx.Rngs(0)), variables)
  ref = _load_nnx(FLAX_NNX(F, use_running_average=True, rngs=nnx.Rngs(0)), variables)
  _assert_same(layer(x), ref(x))
  _assert_same(_nnx_variables(layer), _nnx_variables(ref))


# ------------------------------------------------------------------------------------------------------
# 4. Flax's masks
# ------------------------------------------------------------------------------------------------------


def _mask_cases():
  """name -> (x's shape, the mask flax is given, the mask bnjax is given)."""
  rng = np.random.default_rng(5)
  # Every feature counts its own rows (at least two of six).
  per_element = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 0]], bool)
  rows = np.array([True, False, True, True, False, True])
  pixels = rng.random((2, 3, 3)) < 0.6
  full = rng.random((2, 3, 3, F)) < 0.6
  return {
    "per_element": ((6, F), per_element, per_element),
    "all_true_features": ((6, F), np.ones(F, bool), np.ones(F, bool)),
    "column": ((6, F), rows[:, None], rows[:, None]),
    # bnjax's own row form; flax broadcasts masks from the right, so it needs (N, 1).
    "row": ((6, F), rows[:, None], rows),
    "nhwc_pixels": ((2, 3, 3, F), pixels[..., None], pixels[..., None]),
    "nhwc_full": ((2, 3, 3, F), full, full),
  }


MASKS = _mask_cases()


def _mask(case, impl):
  return MASKS[case][1 if impl == "flax" else 2]


@functools.cache
def _linen_mask_step(bn, case, impl, jit):
  """Output, new batch_stats and gradients (params, x) of a training step with `impl`'s mask of `case`."""
  shape = MASKS[case][0]
  variables, x, cotangent = _bn_variables(), _normal(shape, 1), _normal(shape, 2)
  layer = bn(use_running_average=False, momentum=DECAY)

  def loss(params, x, mask):
    y, updates = layer.apply(
      {"params": params, "batch_stats": variables["batch_stats"]}, x, mask=mask, mutable=["batch_stats"]
    )
    return jnp.sum(y * cotangent), (y, updates["batch_stats"])

  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, (y, stats)), grads = (jax.jit(grad) if jit else grad)(variables["params"], x, jnp.asarray(_mask(case, impl)))
  return y, stats, grads


@functools.cache
def _nnx_mask_step(bn, case, impl):
  """The same under nnx.jit (a traced mask): output, variables, gradients (Params, x)."""
  shape = MASKS[case][0]
  variables, x, cotangent = _bn_variables(), _normal(shape, 1), _normal(shape, 2)
  layer = _load_nnx(bn(F, momentum=DECAY, rngs=nnx.Rngs(0)), variables)

  @nnx.jit
  def step(layer, x, mask):
    def loss(layer, x):
      y = layer(x, mask=mask)
      return jnp.sum(y * cotangent), y

    return nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)

  (_, y), (grads, dx) = step(layer, x, jnp.asarray(_mask(case, impl)))
  return y, _nnx_variables(layer), (nnx.to_pure_dict(grads), dx)


def _masked_expected(case):
  """The float64 output and new running statistics."""
  shape, flax_mask, _ = MASKS[case]
  x = _normal(shape, 1)
  mean, var = _moments(x, flax_mask)
  return _expected(x, _bn_variables(), mean, var, train=True)


@pytest.mark.parametrize("jit", (False, True), ids=("eager", "jit"))
@pytest.mark.parametrize("case", MASKS)
def test_linen_mask(impl, linen_bn, case, jit):
  y, stats, grads = _linen_mask_step(linen_bn, case, impl, jit)
  y_ref, stats_ref, grads_ref = _linen_mask_step(FLAX_LINEN, case, "flax", True)
  _assert_close(y, y_ref)
  _assert_close(stats, stats_ref)
  _assert_close(grads, grads_ref, GRAD_TOL)
  y_expected, stats_expected = _masked_expected(case)
  # float32 against float64
  np.testing.assert_allclose(y, y_expected, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(stats, stats_expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", MASKS)
def test_nnx_mask(impl, nnx_bn, case):
  y, variables, grads = _nnx_mask_step(nnx_bn, case, impl)
  y_ref, variables_ref, grads_ref = _nnx_mask_step(FLAX_NNX, case, "flax")
  _assert_close(y, y_ref)
  _assert_close(variables, variables_ref)
  _assert_close(grads, grads_ref, GRAD_TOL)
  np.testing.assert_allclose(y, _masked_expected(case)[0], rtol=1e-5, atol=1e-5)  # float32 against float64


def _mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:4]), ("batch",))  # Auto axes: unsharded inputs are split


def _even_mask(seed=6):
  """(4 groups, 4 rows, F): each group holds two true entries per feature, at rows of its own."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((4, 4, F), bool)
  for g in range(4):
    for f in range(F):
      mask[g, rng.permutation(4)[:2], f] = True
  return mask


@pytest.mark.devices(4)
@pytest.mark.parametrize("transform", ("vmap", "shard_map"))
def test_linen_mask_synchronised(linen_bn, transform):
  # Equal counts per group and feature: flax averages the groups' masked means unweighted, which is the
  # concatenated batch's mean only then (bnjax weighs them by count; uneven counts are checked below).
  variables = _bn_variables()
  x, mask = _normal((4, 4, F), 1), _even_mask()
  layer = linen_bn(use_running_average=False, momentum=DECAY, axis_name="batch")

  def apply(x, mask):
    return layer.apply(variables, x, mask=mask, mutable=["batch_stats"])

  if transform == "vmap":
    y, updates = jax.jit(jax.vmap(apply, out_axes=(0, None), axis_name="batch"))(x, mask)
  else:
    sharded = jax.shard_map(apply, mesh=_mesh(), in_specs=(P("batch"), P("batch")), out_specs=(P("batch"), P()))
    y, updates = jax.jit(sharded)(x.reshape(16, F), mask.reshape(16, F))
  mean, var = _moments(x, mask)
  y_expected, stats_expected = _expected(x, variables, mean, var, train=True)
  # float32 against a float64 reference
  np.testing.assert_allclose(np.reshape(y, x.shape), y_expected, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(updates["batch_stats"], stats_expected, rtol=1e-6, atol=1e-6)


@pytest.mark.devices(4)
@pytest.mark.parametrize("transform", ("vmap", "shard_map"))
def test_core_mask_synchronised_uneven_counts(transform):
  """bnjax only: with uneven counts, flax's unweighted average of masked means is not the batch's."""
  variables = _bn_variables()
  params, stats = _core_args(variables)
  x = _normal((8, F), 1)
  mask = np.random.default_rng(7).random((8, F)) < 0.6
  mask[:2] = True  # at least two true entries per feature

  def f(x, mask):
    return bnjax.batch_norm(x, params, stats, train=True, decay=DECAY, axis_name="batch", mask=mask)

  if transform == "vmap":
    y, new_stats = jax.jit(jax.vmap(f, out_axes=(0, None), axis_name="batch"))(x, mask)
  else:
    y, new_stats = jax.jit(
      jax.shard_map(f, mesh=_mesh(), in_specs=(P("batch"), P("batch")), out_specs=(P("batch"), P()))
    )(x, mask)
  y_one, stats_one = bnjax.batch_norm(x, params, stats, train=True, decay=DECAY, mask=mask)
  mean, var = _moments(x, mask)
  y_expected, stats_expected = _expected(x, variables, mean, var, train=True)
  _assert_close((y, new_stats), (y_one, stats_one))
  np.testing.assert_allclose(y, y_expected, rtol=1e-5, atol=1e-5)  # float32 against float64
  chex.assert_trees_all_close(new_stats[:2], (stats_expected["mean"], stats_expected["var"]), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# 5. Complex inputs
# ------------------------------------------------------------------------------------------------------


def _complex(shape, seed):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(1.0, 2.0, shape) + 1j * rng.normal(-1.0, 1.0, shape), jnp.complex64)


@pytest.mark.parametrize("shape", ((4, F), (2, 3, 3, F)), ids=("batch", "nhwc"))
def test_linen_complex(linen_bn, shape):
  x = _complex(shape, 1)

  def step(bn):
    layer = bn(use_running_average=False, momentum=DECAY)
    return jax.jit(lambda x: layer.apply(layer.init(jax.random.key(0), x), x, mutable=["batch_stats"]))(x)

  (y, updates), (y_ref, updates_ref) = step(linen_bn), step(FLAX_LINEN)
  _assert_close((y, updates), (y_ref, updates_ref))
  # flax: a complex mean, a real variance E|x - mean|^2; the running mean turns complex64, var stays float32.
  assert updates["batch_stats"]["mean"].dtype == jnp.complex64
  assert updates["batch_stats"]["var"].dtype == jnp.float32
  mean, var = _moments(x)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], (1 - DECAY) * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], DECAY + (1 - DECAY) * var, rtol=1e-6)


# flax.nnx writes the complex running mean into its float32 variable in place (JAX and NumPy warn).
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::numpy.exceptions.ComplexWarning")
@pytest.mark.parametrize("shape", ((4, F), (2, 3, 3, F)), ids=("batch", "nhwc"))
def test_nnx_complex(nnx_bn, shape):
  x = _complex(shape, 1)
  layer, ref = nnx_bn(F, momentum=DECAY, rngs=nnx.Rngs(0)), FLAX_NNX(F, momentum=DECAY, rngs=nnx.Rngs(0))
  _assert_close(layer(x), ref(x))
  _assert_close(_nnx_variables(layer), _nnx_variables(ref))
  # The variables stay float32: the running mean keeps the real part of the batch mean only.
  mean, _ = _moments(x)
  np.testing.assert_allclose(layer.mean[...], (1 - DECAY) * mean.real, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# 6. nnx.view and nnx.view_info
# ------------------------------------------------------------------------------------------------------


def test_nnx_view_info_and_view(nnx_bn):
  model, ref = _NnxMLP(nnx_bn, nnx.Rngs(0)), _NnxMLP(FLAX_NNX, nnx.Rngs(0))
  assert "use_running_average" in str(nnx.view_info(model))
  x = _normal((4, F), 1)
  before = _nnx_variables(model)
  eval_model = nnx.view(model, use_running_average=True)
  assert eval_model.bn.use_running_average is True
  assert model.bn.use_running_average is False
  _assert_same(eval_model(x), nnx.view(ref, use_running_average=True)(x))
  _assert_same(_nnx_variables(model), before)
  train_model = nnx.view(eval_model, use_running_average=False)
  _assert_close(train_model(x), ref(x))
  _assert_close(_nnx_variables(model), _nnx_variables(ref))
