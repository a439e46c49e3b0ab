"""The core against flax.linen.BatchNorm and PyTorch's BatchNorm1d / BatchNorm2d."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import bnjax

torch.set_num_threads(1)


def _batches(shape, steps=5, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(i - 2.0, 1.0 + i, shape).astype(np.float32) for i in range(steps)]


@pytest.mark.parametrize("shape,axis", [((16, 5), -1), ((4, 3, 3, 5), -1), ((4, 5, 3, 3), 1), ((4, 3, 3, 5), (2, 3))])
def test_matches_flax_linen_over_five_steps_then_eval(shape, axis):
  decay = 0.9
  module = nn.BatchNorm(momentum=decay, axis=axis, use_fast_variance=False)
  batches = _batches(shape)
  variables = module.init(jax.random.key(0), batches[0], use_running_average=False)
  axes = (axis,) if isinstance(axis, int) else axis
  fshape = tuple(shape[a] for a in axes)
  rng = np.random.default_rng(1)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, fshape), jnp.float32)
  bias = jnp.asarray(rng.normal(size=fshape), jnp.float32)
  variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}
  params = bnjax.BatchNormParams(scale, bias)
  _, stats = bnjax.init(fshape)

  def flax_loss(p, bs, x):
    y, upd = module.apply({"params": p, "batch_stats": bs}, x, use_running_average=False, mutable=["batch_stats"])
    return jnp.sum(jnp.tanh(y)), (y, upd["batch_stats"])

  def our_loss(p, s, x):
    y, s = bnjax.batch_norm(x, p, s, train=True, axis=axis, decay=decay)
    return jnp.sum(jnp.tanh(y)), (y, s)

  flax_p, flax_bs = variables["params"], variables["batch_stats"]
  for x in batches:
    (_, (y_f, flax_bs)), (g_f, gx_f) = jax.value_and_grad(flax_loss, argnums=(0, 2), has_aux=True)(flax_p, flax_bs, x)
    (_, (y_o, stats)), (g_o, gx_o) = jax.value_and_grad(our_loss, argnums=(0, 2), has_aux=True)(params, stats, x)
    np.testing.assert_allclose(y_o, y_f, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gx_o, gx_f, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(g_o.scale, g_f["scale"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(g_o.bias, g_f["bias"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(stats.mean, flax_bs["mean"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(stats.var, flax_bs["var"], atol=1e-5, rtol=1e-5)

  x = _batches(shape, seed=7)[2]
  y_f = module.apply({"params": flax_p, "batch_stats": flax_bs}, x, use_running_average=True)
  y_o, _ = bnjax.batch_norm(x, params, stats, train=False, axis=axis)
  np.testing.assert_allclose(y_o, y_f, atol=1e-5, rtol=1e-5)


def _torch_layer(kind, features, decay, eps, scale, bias):
  layer = {"1d": torch.nn.BatchNorm1d, "2d": torch.nn.BatchNorm2d}[kind](features, eps=eps, momentum=1.0 - decay)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(np.asarray(scale)))
    layer.bias.copy_(torch.from_numpy(np.asarray(bias)))
  return layer


@pytest.mark.parametrize(
  "kind,shape,axis,channels_last",
  [
    ("1d", (16, 5), -1, False),  # BatchNorm1d on (N, C)
    ("1d", (4, 5, 7), 1, False),  # BatchNorm1d on (N, C, L)
    ("2d", (4, 5, 3, 3), 1, False),  # BatchNorm2d NCHW
    ("2d", (4, 3, 3, 5), -1, True),  # BatchNorm2d fed NHWC data, channels_last on the torch side
  ],
)
def test_matches_pytorch_over_five_steps_then_eval(kind, shape, axis, channels_last):
  decay, eps = 0.9, 1e-5
  features = shape[axis]
  rng = np.random.default_rng(1)
  scale = rng.uniform(0.5, 1.5, features).astype(np.float32)
  bias = rng.normal(size=features).astype(np.float32)
  layer = _torch_layer(kind, features, decay, eps, scale, bias).train()
  params = bnjax.BatchNormParams(jnp.asarray(scale), jnp.asarray(bias))
  _, stats = bnjax.init(features)

  def to_torch(a):
    t = torch.from_numpy(np.ascontiguousarray(a))
    if channels_last:
      t = t.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    return t

  def from_torch(t):
    a = t.detach().numpy()
    return np.transpose(a, (0, 2, 3, 1)) if channels_last else a

  def our_loss(p, s, x, w):
    y, s = bnjax.batch_norm(x, p, s, train=True, axis=axis, decay=decay, epsilon=eps, unbiased_running_var=True)
    return jnp.sum(y * w), (y, s)

  for i, x in enumerate(_batches(shape)):
    w = np.random.default_rng(100 + i).normal(size=shape).astype(np.float32)
    xt = to_torch(x).requires_grad_(True)
    layer.zero_grad()
    yt = layer(xt)
    (yt * to_torch(w)).sum().backward()
    (_, (y, stats)), (g, gx) = jax.value_and_grad(our_loss, argnums=(0, 2), has_aux=True)(params, stats, x, w)
    np.testing.assert_allclose(y, from_torch(yt), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(gx, from_torch(xt.grad), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(g.scale, layer.weight.grad.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(g.bias, layer.bias.grad.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(stats.mean, layer.running_mean.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(stats.var, layer.running_var.numpy(), atol=1e-5, rtol=1e-5)

  layer.eval()
  x = _batches(shape, seed=3)[1]
  y, _ = bnjax.batch_norm(x, params, stats, train=False, axis=axis, epsilon=eps)
  np.testing.assert_allclose(y, from_torch(layer(to_torch(x))), atol=1e-5, rtol=1e-5)


def test_large_mean_where_flax_default_fails():
  x = 1e4 + jax.random.normal(jax.random.key(0), (4096, 4))
  module = nn.BatchNorm(use_running_average=False)
  y_flax, _ = module.apply(module.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  y_ours, _ = bnjax.batch_norm(x, *bnjax.init(4), train=True)
  # flax's one-pass E[x^2] - E[x]^2 loses the variance (how badly depends on the backend's summation order)
  assert np.all(np.abs(np.std(np.asarray(y_flax), axis=0) - 1.0) > 0.5)
  np.testing.assert_allclose(np.std(np.asarray(y_ours), axis=0), 1.0, atol=1e-3)
