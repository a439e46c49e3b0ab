"""Batch renormalization, inference folding and precise population statistics."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


def _setup(shape=(32, 5), seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(2.0, 3.0, shape).astype(np.float32)
  params, stats = bnjax.init(shape[-1])
  params = params._replace(
    scale=jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32),
    bias=jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
  )
  stats = stats._replace(
    mean=jnp.asarray(rng.normal(size=shape[-1]), jnp.float32),
    var=jnp.asarray(rng.uniform(0.5, 20.0, shape[-1]), jnp.float32),
  )
  return x, params, stats


def test_renorm_with_unit_bounds_is_batch_norm():
  x, params, stats = _setup()
  f_renorm = lambda x, p: bnjax.batch_renorm(x, p, stats, train=True, rmax=1.0, dmax=0.0)
  f_bn = lambda x, p: bnjax.batch_norm(x, p, stats, train=True)
  chex.assert_trees_all_close(f_renorm(x, params), f_bn(x, params), atol=1e-6)
  loss = lambda f: lambda x, p: jnp.sum(jnp.tanh(f(x, p)[0]))
  chex.assert_trees_all_close(
    jax.grad(loss(f_renorm), (0, 1))(x, params), jax.grad(loss(f_bn), (0, 1))(x, params), atol=1e-5
  )


@pytest.mark.parametrize("rmax,dmax", [(1.5, 0.5), (3.0, 5.0)])
def test_renorm_matches_its_formula_and_gradient(rmax, dmax):
  x, params, stats = _setup()
  eps = 1e-5

  def formula(x, scale, bias):
    mu_b = x.mean(0)
    sigma_b = jnp.sqrt(((x - mu_b) ** 2).mean(0) + eps)
    sigma = jnp.sqrt(stats.var + eps)
    r = jax.lax.stop_gradient(jnp.clip(sigma_b / sigma, 1 / rmax, rmax))
    d = jax.lax.stop_gradient(jnp.clip((mu_b - stats.mean) / sigma, -dmax, dmax))
    return scale * ((x - mu_b) / sigma_b * r + d) + bias

  def ours(x, scale, bias):
    return bnjax.batch_renorm(x, bnjax.BatchNormParams(scale, bias), stats, train=True, rmax=rmax, dmax=dmax)[0]

  args = (x, params.scale, params.bias)
  np.testing.assert_allclose(ours(*args), formula(*args), atol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  chex.assert_trees_all_close(
    jax.grad(loss(ours), (0, 1, 2))(*args), jax.grad(loss(formula), (0, 1, 2))(*args), atol=1e-4
  )
  # The corrections really clip here: the running statistics are far from the batch's.
  assert not np.allclose(ours(*args), bnjax.batch_norm(x, params, stats, train=True)[0], atol=1e-3)


def test_renorm_eval_is_batch_norm_eval_and_bounds_are_checked():
  x, params, stats = _setup()
  chex.assert_trees_all_close(
    bnjax.batch_renorm(x, params, stats, train=False), bnjax.batch_norm(x, params, stats, train=False)
  )
  with pytest.raises(ValueError, match=r"`rmax` must be >= 1"):
    bnjax.batch_renorm(x, params, stats, train=True, rmax=0.5)


@pytest.mark.parametrize("use_dense_bias", [True, False])
def test_fold_dense_equals_dense_then_eval_batch_norm(use_dense_bias):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 7)).astype(np.float32)
  kernel = rng.normal(size=(7, 5)).astype(np.float32)
  dense_bias = rng.normal(size=5).astype(np.float32) if use_dense_bias else None
  _, params, stats = _setup((16, 5))
  z = x @ kernel + (0.0 if dense_bias is None else dense_bias)
  want, _ = bnjax.batch_norm(z, params, stats, train=False)
  k, b = bnjax.fold_dense(kernel, dense_bias, params, stats)
  np.testing.assert_allclose(x @ k + b, want, atol=1e-4, rtol=1e-5)
  with pytest.raises(ValueError, match=r"`stats.mean` has shape \(4,\)"):
    bnjax.fold_dense(kernel, dense_bias, params, stats._replace(mean=jnp.zeros(4)))


class _TwoNorms(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False, momentum=0.9)(x)
    x = nn.Dense(4)(x)
    return nn.BatchNorm(use_running_average=False, momentum=0.7)(x)


def test_precise_batch_stats_average_each_layers_batch_statistics():
  model = _TwoNorms()
  rng = np.random.default_rng(0)
  batches = [rng.normal(i, 1 + i, (16, 3)).astype(np.float32) for i in range(4)]
  variables = model.init(jax.random.key(0), batches[0])
  apply_fn = lambda v, x: model.apply(v, x, mutable=["batch_stats"])
  apply_fn_stats = lambda v, x: (lambda out: (out[0], out[1]["batch_stats"]))(apply_fn(v, x))
  precise = bnjax.precise_batch_stats(apply_fn_stats, variables, batches)

  kernel = variables["params"]["Dense_0"]["kernel"]
  dense_bias = variables["params"]["Dense_0"]["bias"]
  first, second = [], []
  for x in batches:
    first.append(bnjax.moments(x))
    hidden = bnjax.batch_norm(x, *bnjax.init(3), train=True)[0] @ kernel + dense_bias
    second.append(bnjax.moments(hidden))
  for name, per_batch in (("BatchNorm_0", first), ("BatchNorm_1", second)):
    np.testing.assert_allclose(precise[name]["mean"], np.mean([m for m, _ in per_batch], 0), atol=1e-4)
    np.testing.assert_allclose(precise[name]["var"], np.mean([v for _, v in per_batch], 0), rtol=1e-4)
  unbiased = bnjax.precise_batch_stats(apply_fn_stats, variables, batches, unbiased_batch_size=16)
  np.testing.assert_allclose(unbiased["BatchNorm_0"]["var"], precise["BatchNorm_0"]["var"] * 16 / 15, rtol=1e-6)
  np.testing.assert_allclose(unbiased["BatchNorm_0"]["mean"], precise["BatchNorm_0"]["mean"])
