"""bnjax.models: the MLP (batch norm before or after the activation) and the article's Keras model."""

import functools

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import models

F32_TOL = dict(rtol=1e-5, atol=1e-5)


def _init(module, x, **kwargs):
  """`module.init` as one compiled program (eager mode compiles every operation on its own)."""
  return helpers.fast_jit(functools.partial(module.init, **kwargs))(jax.random.key(0), x)


def _apply(module, variables, *args, **kwargs):
  """`module.apply` as one compiled program; keyword arguments are fixed (static)."""
  return helpers.fast_jit(functools.partial(module.apply, **kwargs))(variables, *args)


def _layout(variables):
  return {collection: {name: sorted(leaves) for name, leaves in tree.items()} for collection, tree in variables.items()}


@pytest.mark.parametrize(
  "norm,norm_layers,expected",
  [
    (
      None,
      None,
      {"params": {"Dense_0": ["bias", "kernel"], "Dense_1": ["bias", "kernel"], "Dense_2": ["bias", "kernel"]}},
    ),
    (
      "pre",
      None,
      {
        "params": {
          "Dense_0": ["kernel"],
          "BatchNorm_0": ["bias", "scale"],
          "Dense_1": ["kernel"],
          "BatchNorm_1": ["bias", "scale"],
          "Dense_2": ["bias", "kernel"],
        },
        "batch_stats": {"BatchNorm_0": ["mean", "var"], "BatchNorm_1": ["mean", "var"]},
      },
    ),
    (
      "post",
      None,
      {
        "params": {
          "Dense_0": ["bias", "kernel"],
          "BatchNorm_0": ["bias", "scale"],
          "Dense_1": ["bias", "kernel"],
          "BatchNorm_1": ["bias", "scale"],
          "Dense_2": ["bias", "kernel"],
        },
        "batch_stats": {"BatchNorm_0": ["mean", "var"], "BatchNorm_1": ["mean", "var"]},
      },
    ),
    (
      "pre",
      (-1,),
      {
        "params": {
          "Dense_0": ["bias", "kernel"],
          "Dense_1": ["kernel"],
          "BatchNorm_1": ["bias", "scale"],
          "Dense_2": ["bias", "kernel"],
        },
        "batch_stats": {"BatchNorm_1": ["mean", "var"]},
      },
    ),
    (
      "post",
      (0,),
      {
        "params": {
          "Dense_0": ["bias", "kernel"],
          "BatchNorm_0": ["bias", "scale"],
          "Dense_1": ["bias", "kernel"],
          "Dense_2": ["bias", "kernel"],
        },
        "batch_stats": {"BatchNorm_0": ["mean", "var"]},
      },
    ),
  ],
)
def test_mlp_structure(norm, norm_layers, expected):
  model = models.MLP((7, 5, 3), norm=norm, norm_layers=norm_layers)
  variables = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), jnp.ones((4, 2, 3)))
  layout = _layout(variables)
  assert {c: sorted(t) for c, t in layout.items()} == {c: sorted(t) for c, t in expected.items()}
  assert layout == {c: {k: expected[c][k] for k in t} for c, t in layout.items()}
  assert variables["params"]["Dense_0"]["kernel"].shape == (6, 7)  # (4, 2, 3) flattened to (4, 6)
  assert variables["params"]["Dense_2"]["kernel"].shape == (5, 3)


def _dense(params, x):
  return x @ params["kernel"] + params.get("bias", 0.0)


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _relu(z):
  return np.maximum(z, 0.0)


@pytest.mark.parametrize("norm", [None, "pre", "post"])
def test_mlp_forward_and_sown_preactivations(norm):
  x = helpers.normal((16, 2, 3), 1)
  model = models.MLP((8, 4, 2), activation=nn.sigmoid, norm=norm, momentum=0.5)
  variables = _init(model, x, train=True)
  out, state = _apply(model, variables, x, train=True, mutable=["batch_stats", "intermediates"])
  p = helpers.to_numpy(variables["params"])

  def bn(z):
    return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)  # scale 1, bias 0 at init

  h = x.reshape(16, 6)
  for i in range(2):
    z = _dense(p[f"Dense_{i}"], h)
    if norm == "pre":
      helpers.close(
        state["batch_stats"][f"BatchNorm_{i}"], {"mean": 0.5 * z.mean(0), "var": 0.5 + 0.5 * z.var(0)}, F32_TOL
      )
      z = bn(z)
    (sown,) = state["intermediates"][f"preact_{i}"]
    helpers.close(sown, z, F32_TOL, f"preact_{i}")
    h = _sigmoid(z)
    if norm == "post":
      h = bn(h)
  helpers.close(out, _dense(p["Dense_2"], h), F32_TOL)
  if norm is None:
    assert "batch_stats" not in state


def test_mlp_eval_uses_running_statistics_and_output_activation():
  x = 2.0 + helpers.normal((16, 6), 1)
  model = models.MLP((8, 3), norm="pre")
  with_softmax = models.MLP((8, 3), norm="pre", output_activation=nn.softmax)

  @helpers.fast_jit
  def run(x):
    variables = model.init(jax.random.key(0), x, train=True)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {**variables, **updates}
    return variables, model.apply(variables, x, train=False), with_softmax.apply(variables, x, train=False)

  variables, logits, probabilities = run(x)
  p, s = helpers.to_numpy((variables["params"], variables["batch_stats"]["BatchNorm_0"]))
  z = (_dense(p["Dense_0"], x) - s["mean"]) / np.sqrt(s["var"] + 1e-5)
  helpers.close(logits, _dense(p["Dense_1"], _relu(z)), F32_TOL)
  exp = np.exp(np.asarray(logits, np.float64))
  helpers.close(probabilities, exp / exp.sum(1, keepdims=True), F32_TOL)


def test_mlp_axis_name_synchronises_statistics():
  x = helpers.normal((4, 8, 6), 1)
  model = models.MLP((5, 2), norm="pre", axis_name="batch")

  @helpers.fast_jit
  def run(x):
    variables = model.init(jax.random.key(0), x[0], train=True)
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    mapped = jax.vmap(apply, in_axes=(None, 0), axis_name="batch")(variables, x)
    whole = models.MLP((5, 2), norm="pre").apply(variables, x.reshape(32, 6), train=True, mutable=["batch_stats"])
    return mapped, whole

  (y, stats), (y_whole, stats_whole) = run(x)
  helpers.close(y.reshape(32, 2), y_whole, F32_TOL)
  helpers.close(jax.tree.map(lambda s: s[2], stats), stats_whole, F32_TOL)


def test_mlp_dtype():
  model = models.MLP((8, 3), norm="post", dtype=jnp.bfloat16)
  x = jnp.ones((4, 6), jnp.bfloat16)
  variables = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(0), x)
  assert jax.eval_shape(functools.partial(model.apply, train=False), variables, x).dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    ({"features": ()}, TypeError, "features"),
    ({"features": 4}, TypeError, "features"),
    ({"features": (4, 0)}, ValueError, "features"),
    ({"features": (4, 2), "norm": "middle"}, ValueError, "norm"),
    ({"features": (4, 4, 2), "norm": "pre", "norm_layers": (2,)}, ValueError, "norm_layers"),
    ({"features": (4, 2), "norm": None, "norm_layers": (0,)}, ValueError, "norm_layers"),
    ({"features": (4, 2), "norm": "pre", "norm_layers": 0}, TypeError, "norm_layers"),
    ({"features": (4, 2), "momentum": -0.1}, ValueError, "momentum"),
    ({"features": (4, 2), "activation": "relu"}, TypeError, "activation"),
  ],
)
def test_mlp_constructor_errors_name_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    models.MLP(**kwargs)


def test_mlp_train_must_be_a_bool():
  model = models.MLP((4, 2), norm="pre")
  with pytest.raises(TypeError, match="train"):
    jax.eval_shape(functools.partial(model.init, train=None), jax.random.key(0), jnp.ones((4, 3)))


def test_keras_article_model():
  x = helpers.normal((8, 5), 1)
  model = models.keras_article_model()
  variables = _init(model, x, train=True)
  assert jax.tree.map(jnp.shape, variables) == {
    "params": {
      "Dense_0": {"kernel": (5, 16), "bias": (16,)},
      "Dense_1": {"kernel": (16, 32), "bias": (32,)},
      "BatchNorm_1": {"scale": (32,), "bias": (32,)},
      "Dense_2": {"kernel": (32, 2), "bias": (2,)},
    },
    "batch_stats": {"BatchNorm_1": {"mean": (32,), "var": (32,)}},
  }
  assert sum(v.size for v in jax.tree.leaves(variables["params"])) == 770
  # Dense(16, relu) -> Dense(32, relu) -> BatchNorm (Keras's epsilon 1e-3) -> Dense(2) logits.
  p = helpers.to_numpy(variables["params"])
  h = _relu(_dense(p["Dense_1"], _relu(_dense(p["Dense_0"], x))))
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-3)
  logits, _ = _apply(model, variables, x, train=True, mutable=["batch_stats"])
  helpers.close(logits, _dense(p["Dense_2"], h), F32_TOL)

  plain = models.keras_article_model(batch_norm=False)
  plain_vars = jax.eval_shape(functools.partial(plain.init, train=True), jax.random.key(0), x)
  assert set(plain_vars) == {"params"}
  assert sum(v.size for v in jax.tree.leaves(plain_vars)) == 770 - 64


def test_mlp_unbiased_running_var_reaches_every_batch_norm():
  x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
  biased, unbiased = (models.MLP((4, 4, 2), norm="pre", momentum=0.0, unbiased_running_var=u) for u in (False, True))
  variables = biased.init(jax.random.key(0), x, train=False)
  _, b = biased.apply(variables, x, train=True, mutable=["batch_stats"])
  _, u = unbiased.apply(variables, x, train=True, mutable=["batch_stats"])
  for layer in ("BatchNorm_0", "BatchNorm_1"):
    np.testing.assert_allclose(u["batch_stats"][layer]["var"], b["batch_stats"][layer]["var"] * 8 / 7, rtol=1e-5)
    np.testing.assert_allclose(u["batch_stats"][layer]["mean"], b["batch_stats"][layer]["mean"])
