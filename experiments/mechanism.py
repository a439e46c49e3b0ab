"""How batch norm helps optimization (Santurkar et al. 2018): noisy BN, their ICS measure, smoothness.

(a) Noisy BN: after each BN layer, in training only, every unit ``j`` is shifted and scaled by noise drawn
afresh at every step, ``sigma_tj * x + mu_tj`` with ``mu_tj ~ U(-noise_shift, noise_shift)`` and
``sigma_tj ~ U(1, noise_scale)``: the layer's output distribution moves at every step (non-zero mean,
non-unit variance). If it trains about as well as BN, stable layer distributions are not why BN helps.
(b) Internal covariate shift as they measure it: for hidden layer ``i >= 1``, ``||G_i - G'_i||`` with ``G_i``
the gradient of its kernel and ``G'_i`` the same gradient after the layers before ``i`` took their SGD step
(same batch, training mode).
(c) Smoothness along the gradient: from the current weights, steps ``eta * g`` for ``eta`` in
``probe_steps`` (multiples of the learning rate); the loss range over those points, and the effective
beta-smoothness ``max_eta ||grad L(w - eta g) - g|| / ||eta g||``.
(b) and (c) are measured on a fixed batch of training rows at every evaluation, for none and BN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen
from jax.flatten_util import ravel_pytree

from bnjax import nn as bn_nn
from experiments import common
from experiments import report
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "how batch norm helps optimization: noisy BN, internal covariate shift and loss smoothness"
ARMS = ("none", "bn", "noisy_bn")
PROBED = ("none", "bn")
TESTS = ("noisy_bn - bn mean accuracy", "noisy_bn - none mean accuracy", "log ICS bn / none", "log beta bn / none")


def describe_criterion(criterion) -> str:
  return (
    f"with Bonferroni-corrected paired intervals (family confidence {criterion.confidence:g}) over seeds: "
    f"(a) noisy BN's test accuracy averaged over the evaluations after step 0 (speed and level) is "
    f"within {criterion.max_noisy_gap_points:g} points of BN's (the "
    f"interval of noisy - BN lies above -{criterion.max_noisy_gap_points:g}; refutes 'distributional "
    f"stability is not needed' if not) and above no BN's (interval above 0); (b) BN's ICS is not lower than "
    f"no BN's (the interval of log(ICS_bn / ICS_none) reaches 0 or above; refutes the paper if it lies wholly "
    f"below 0, as the ICS explanation predicts); (c) BN's effective beta-smoothness is smaller (the interval "
    f"of log(beta_bn / beta_none) lies below 0; refutes the smoothing explanation if not)."
  )


def tests(metrics: dict, confidence: float) -> dict:
  acc, ics, beta = metrics["mean_test_accuracy"], metrics["ics"], metrics["beta"]
  log = lambda v: np.log(np.asarray(v, np.float64))
  pairs = {
    TESTS[0]: (acc["noisy_bn"], acc["bn"]),
    TESTS[1]: (acc["noisy_bn"], acc["none"]),
    TESTS[2]: (log(ics["bn"]), log(ics["none"])),
    TESTS[3]: (log(beta["bn"]), log(beta["none"])),
  }
  return common.corrected_tests(pairs, confidence=confidence)


def evaluate(metrics: dict, criterion) -> Verdict:
  t = tests(metrics, criterion.confidence)
  gap = criterion.max_noisy_gap_points / 100
  parts = {
    TESTS[0]: t[TESTS[0]]["low"] > -gap,
    TESTS[1]: t[TESTS[1]]["low"] > 0,
    TESTS[2]: t[TESTS[2]]["high"] >= 0,
    TESTS[3]: t[TESTS[3]]["high"] < 0,
  }
  text = [
    f"(a) noisy BN - BN {common.fmt_ci(t[TESTS[0]])} points (need > -{criterion.max_noisy_gap_points:g}: "
    f"{'yes' if parts[TESTS[0]] else 'no'}), noisy BN - none {common.fmt_ci(t[TESTS[1]])} (need > 0: "
    f"{'yes' if parts[TESTS[1]] else 'no'})",
    f"(b) log ICS BN/none {common.fmt_ci(t[TESTS[2]], scale=1, digits=3)} (BN not lower: "
    f"{'yes' if parts[TESTS[2]] else 'no, lower'})",
    f"(c) log beta BN/none {common.fmt_ci(t[TESTS[3]], scale=1, digits=3)} (BN smoother: "
    f"{'yes' if parts[TESTS[3]] else 'no'})",
  ]
  return Verdict(held=all(parts.values()), reason="; ".join(text) + f"; {t[TESTS[0]]['confidence']:.4g} intervals.")


class NoisyBNMLP(linen.Module):
  """Dense (no bias) -> BN -> per-step noise (training only) -> relu, per hidden layer; Dense logits."""

  features: tuple
  noise_shift: float
  noise_scale: float
  momentum: float = 0.99
  epsilon: float = 1e-5
  kernel_init: object = linen.linear.default_kernel_init

  @linen.compact
  def __call__(self, x, *, train: bool):
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.features[:-1]):
      x = linen.Dense(width, use_bias=False, kernel_init=self.kernel_init, name=f"Dense_{i}")(x)
      x = bn_nn.BatchNorm(
        use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon, name=f"BatchNorm_{i}"
      )(x)
      if train:
        x = self.noise(x)
      x = linen.relu(x)
    return linen.Dense(self.features[-1], kernel_init=self.kernel_init, name=f"Dense_{len(self.features) - 1}")(x)

  def noise(self, x):
    k_shift, k_scale = jax.random.split(self.make_rng("dropout"))
    shift = jax.random.uniform(k_shift, (1, x.shape[-1]), x.dtype, -self.noise_shift, self.noise_shift)
    scale = jax.random.uniform(k_scale, (1, x.shape[-1]), x.dtype, 1.0, self.noise_scale)
    return scale * x + shift


def landscape_probe(model, x, y, num_hidden: int, learning_rate: float, steps):
  """``probe(state)``: per-layer ICS and its cosine, loss range and effective beta along ``-g``."""

  def probe(state):
    def loss(params):
      logits, _ = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    params = state.params
    grads = jax.grad(loss)(params)
    ics, rel, cos = [], [], []
    for i in range(1, num_hidden):
      earlier = lambda name: name.rsplit("_", 1)[1].isdigit() and int(name.rsplit("_", 1)[1]) < i
      moved = {
        k: jax.tree.map(lambda p, g: p - learning_rate * g, v, grads[k]) if earlier(k) else v for k, v in params.items()
      }
      g, g2 = grads[f"Dense_{i}"]["kernel"], jax.grad(loss)(moved)[f"Dense_{i}"]["kernel"]
      ics.append(jnp.linalg.norm(g - g2))
      rel.append(jnp.linalg.norm(g - g2) / jnp.linalg.norm(g))
      cos.append(jnp.vdot(g, g2) / (jnp.linalg.norm(g) * jnp.linalg.norm(g2)))
    flat, unravel = ravel_pytree(params)
    g_flat = ravel_pytree(grads)[0]
    losses, betas = [loss(params)], []
    for eta in steps:
      point = unravel(flat - eta * learning_rate * g_flat)
      value, g_point = jax.value_and_grad(loss)(point)
      losses.append(value)
      betas.append(jnp.linalg.norm(ravel_pytree(g_point)[0] - g_flat) / (eta * learning_rate * jnp.linalg.norm(g_flat)))
    losses = jnp.stack(losses)
    return {
      "ics": jnp.stack(ics),
      "ics_relative": jnp.stack(rel),
      "ics_cos": jnp.stack(cos),
      "loss_range": losses.max() - losses.min(),
      "beta": jnp.stack(betas).max(),
    }

  return probe


def make_model(config, arm: str, num_classes: int):
  if arm == "noisy_bn":
    return NoisyBNMLP(
      features=(*config.hidden, num_classes),
      noise_shift=config.noise_shift,
      noise_scale=config.noise_scale,
      momentum=config.momentum,
      epsilon=config.epsilon,
      kernel_init=common.kernel_init(config.init_stddev),
    )
  return common.make_mlp(config, num_classes, norm="pre" if arm == "bn" else "none", activation="relu")


def run(config, run) -> Result:
  dataset = common.load_data(config)
  x = jnp.asarray(dataset.train.x[: config.probe_rows])
  y = jnp.asarray(dataset.train.y[: config.probe_rows])
  num_hidden = len(config.hidden)
  metrics = {"steps": None, "test_accuracy": {}, "final_test_accuracy": {}, "ics": {}, "beta": {}, "loss_range": {}}
  metrics.update(mean_test_accuracy={}, ics_relative={}, ics_cos={})
  curves, finals = {}, []
  for arm in ARMS:
    model = make_model(config, arm, dataset.num_classes)
    probe = None
    if arm in PROBED:
      probe = landscape_probe(model, x, y, num_hidden, config.learning_rate, config.probe_steps)
    state, history = common.train_arm(run, arm, config, model, dataset, probe=probe)
    finals.append(state)
    metrics["steps"] = history.steps.tolist()
    metrics["test_accuracy"][arm] = history.values["test_accuracy"].tolist()
    metrics["final_test_accuracy"][arm] = history.final("test_accuracy").tolist()
    metrics["mean_test_accuracy"][arm] = history.values["test_accuracy"][1:].mean(0).tolist()
    if arm in PROBED:
      v = history.values
      curves[arm] = {k: v[k] for k in ("ics", "loss_range", "beta")}
      # Per seed: the mean over evaluations after step 0 (and over layers for the ICS).
      metrics["ics"][arm] = v["ics"][1:].mean((0, 2)).tolist()
      # Reported, not judged: the gradient's scale differs between arms, the relative change and the cosine not.
      metrics["ics_relative"][arm] = v["ics_relative"][1:].mean((0, 2)).tolist()
      metrics["ics_cos"][arm] = v["ics_cos"][1:].mean((0, 2)).tolist()
      metrics["beta"][arm] = v["beta"][1:].mean(0).tolist()
      metrics["loss_range"][arm] = v["loss_range"][1:].mean(0).tolist()
  t = tests(metrics, config.criterion.confidence)
  metrics["tests"] = t
  rows = []
  for arm in ARMS:
    acc = common.mean_ci(metrics["final_test_accuracy"][arm])
    curve = 100 * float(np.mean(metrics["mean_test_accuracy"][arm]))
    extra = [
      float(np.mean(metrics[k][arm])) if arm in PROBED else None
      for k in ("ics", "ics_relative", "ics_cos", "beta", "loss_range")
    ]
    rows.append([arm, curve, 100 * acc["mean"], 100 * acc["low"], 100 * acc["high"], *extra])
  table = Table(
    f"{config.dataset}, MLP {config.hidden} relu, SGD lr {config.learning_rate:g}, batch {config.batch_size}, "
    f"{config.num_steps} steps, {config.num_seeds} seeds; probes on {config.probe_rows} training rows",
    [
      "arm",
      "mean test acc % over evals",
      "final test acc %",
      "95% CI low",
      "95% CI high",
      "mean ICS ||G-G'||",
      "ICS / ||G||",
      "cos(G, G')",
      "mean eff. beta",
      "mean loss range",
    ],
    rows,
  )
  diffs = Table(
    f"paired differences, Bonferroni over {len(TESTS)} (family 95%), Holm p-values",
    ["comparison", "mean", "low", "high", "p (Holm)"],
    [[name, c["mean"], c["low"], c["high"], c["p_holm"]] for name, c in t.items()],
  )
  plots = [_plot(run, config, metrics, curves)]
  return Result(metrics=metrics, tables=[table, diffs], plots=plots, state_digest=common.state_digest(*finals))


def _plot(run, config, metrics, curves) -> str:
  title = (
    f"BN mechanism on {config.dataset}: MLP {'x'.join(map(str, config.hidden))} relu, SGD lr "
    f"{config.learning_rate:g}, batch {config.batch_size}, {config.num_steps} steps, {config.num_seeds} seeds; "
    f"noise shift U(±{config.noise_shift:g}), scale U(1, {config.noise_scale:g}) per step and unit"
  )
  fig, axes = report.figure(4, title=title, width=4.4)
  steps = metrics["steps"]
  ax = axes[0, 0]
  for arm in ARMS:
    legend = report.band(ax, steps, 100 * np.asarray(metrics["test_accuracy"][arm]), label=arm)
  ax.set(xlabel="training step", ylabel="test accuracy (%)", title="(a) training with noisy BN")
  ax.legend(fontsize="small", title=legend, title_fontsize="small")
  panels = (
    ("ics", "||G - G'|| of the kernel gradient\n(mean over layers 1.., log)", "(b) internal covariate shift"),
    ("beta", "max ||grad(w - eta g) - g|| / ||eta g|| (log)", "(c) effective beta-smoothness"),
    ("loss_range", "loss range along -g (nats, log)", "(c) loss variation along the gradient"),
  )
  for ax, (key, ylabel, name) in zip(axes[0, 1:], panels, strict=True):
    for arm in PROBED:
      values = curves[arm][key]
      values = values.mean(-1) if values.ndim == 3 else values
      legend = report.band(ax, steps[1:], values[1:], label=arm, logy=True)
    ax.set(xlabel="training step", ylabel=ylabel, title=name)
    ax.legend(fontsize="small", title=legend, title_fontsize="small")
  return report.save(fig, run, "mechanism")
