"""Batch norm's scale invariance and the weight norm's growth during training, with and without weight decay.

The identities (Ioffe & Szegedy 2015, Section 3.3): for a Dense layer ``W`` (no bias) followed by batch norm
in training mode and any ``a > 0``, ``BN((aW)u) = BN(Wu)`` and ``dL/d(aW) = (1/a) dL/dW``. They are checked
numerically in float64 (epsilon ``identity_epsilon``, tiny, since epsilon is what breaks them), as the
largest relative error over the scales ``a`` and seeds. A consequence: the loss is invariant to the kernel's
scale, so its gradient is orthogonal to the kernel and plain SGD can only grow ``||W||``
(``||W - lr g||^2 = ||W||^2 + lr^2 ||g||^2``); weight decay pulls it back. Here: the mean over hidden layers
of ``||W_t|| / ||W_0||`` in a ``norm='pre'`` MLP trained with SGD, with and without decay.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen

from bnjax import nn as bn_nn
from experiments import common
from experiments import report
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "batch norm's scale invariance and the weight norm's growth with and without weight decay"
ARMS = ("no_decay", "decay")


def describe_criterion(criterion) -> str:
  return (
    f"the largest relative error of BN((aW)u) = BN(Wu) and of dL/d(aW) = dL/dW / a (float64) is at most "
    f"{criterion.tolerance:g}; without decay every seed's final mean ||W_T|| / ||W_0|| is at least "
    f"{criterion.min_growth:g} and still grows by more than a factor {criterion.late_growth:g} over the second "
    f"half of training; with decay every seed's grows by at most that factor over the second half (bounded)."
  )


def evaluate(metrics: dict, criterion) -> Verdict:
  out_err, grad_err = metrics["max_output_error"], metrics["max_grad_error"]
  grown, late = metrics["final_ratio"]["no_decay"], metrics["late_growth"]
  parts = {
    "identities": max(out_err, grad_err) <= criterion.tolerance,
    "growth": min(grown) >= criterion.min_growth and min(late["no_decay"]) > criterion.late_growth,
    "bounded": max(late["decay"]) <= criterion.late_growth,
  }
  reason = (
    f"identities: max relative error {out_err:.3g} (output), {grad_err:.3g} (gradient), tolerance "
    f"{criterion.tolerance:g} ({'hold' if parts['identities'] else 'fail'}); no decay: final norm ratio "
    f"{min(grown):.3g}..{max(grown):.3g} over seeds (need >= {criterion.min_growth:g}), second-half growth "
    f"{min(late['no_decay']):.3g}..{max(late['no_decay']):.3g} (need > {criterion.late_growth:g}): "
    f"{'grows' if parts['growth'] else 'does not grow enough'}; decay: second-half growth "
    f"{min(late['decay']):.3g}..{max(late['decay']):.3g} (need <= {criterion.late_growth:g}: "
    f"{'bounded' if parts['bounded'] else 'not bounded'})."
  )
  return Verdict(held=all(parts.values()), reason=reason)


class DenseBN(linen.Module):
  """``BN(Wu)`` in float64: a bias-free Dense layer, then `bnjax.nn.BatchNorm` in training mode."""

  features: int
  epsilon: float

  @linen.compact
  def __call__(self, u):
    h = linen.Dense(self.features, use_bias=False, dtype=jnp.float64, param_dtype=jnp.float64)(u)
    norm = bn_nn.BatchNorm(
      use_running_average=False,
      epsilon=self.epsilon,
      dtype=jnp.float64,
      param_dtype=jnp.float64,
      force_float32_reductions=False,
    )
    return norm(h)


def relative(a, b) -> float:
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def identity_errors(config, seed: int) -> dict:
  """Per scale ``a``: the relative errors of the output and gradient identities, for one seed's draw."""
  with jax.enable_x64(True):
    model = DenseBN(config.identity_features, config.epsilon_identity)
    ku, kp, kr = jax.random.split(jax.random.key(seed), 3)
    u = jax.random.normal(ku, (config.identity_rows, config.identity_inputs), jnp.float64)
    variables = model.init(kp, u)
    weights = jax.random.normal(kr, (config.identity_rows, config.identity_features), jnp.float64)

    def output(kernel):
      params = {**variables["params"], "Dense_0": {"kernel": kernel}}
      out, _ = model.apply({**variables, "params": params}, u, mutable=["batch_stats"])
      return out

    loss = lambda kernel: jnp.sum(jnp.tanh(output(kernel)) * weights)
    kernel = variables["params"]["Dense_0"]["kernel"]
    grad = jax.grad(loss)(kernel)
    errors = {"output": [], "grad": []}
    for a in config.scales:
      errors["output"].append(relative(output(a * kernel), output(kernel)))
      errors["grad"].append(relative(jax.grad(loss)(a * kernel), grad / a))
  return errors


def kernel_norm_probe(num_hidden: int):
  def probe(state):
    return {
      "kernel_norms": jnp.stack([jnp.linalg.norm(state.params[f"Dense_{i}"]["kernel"]) for i in range(num_hidden)])
    }

  return probe


def optimizer(config, decay: bool) -> optax.GradientTransformation:
  sgd = optax.sgd(config.learning_rate)
  return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd) if decay else sgd


def run(config, run) -> Result:
  seeds = common.seeds_of(config)
  errors = [identity_errors(config, s) for s in seeds]
  output_errors = np.array([e["output"] for e in errors])  # (seeds, scales)
  grad_errors = np.array([e["grad"] for e in errors])
  dataset = common.load_data(config)
  num_hidden = len(config.hidden)
  model = common.make_mlp(config, dataset.num_classes, norm="pre")
  metrics = {
    "scales": list(config.scales),
    "output_error": output_errors.max(0).tolist(),
    "grad_error": grad_errors.max(0).tolist(),
    "max_output_error": float(output_errors.max()),
    "max_grad_error": float(grad_errors.max()),
    "steps": None,
    "ratio": {},
    "final_ratio": {},
    "max_ratio": {},
    "late_growth": {},
    "final_test_accuracy": {},
  }
  finals = []
  for arm in ARMS:
    state, history = common.train_models(
      run,
      arm,
      model,
      optimizer(config, arm == "decay"),
      dataset,
      seeds=seeds,
      num_steps=config.num_steps,
      batch_size=config.batch_size,
      eval_every=config.eval_every,
      checkpoint_every=config.checkpoint_every,
      num_devices=config.num_devices,
      probe=kernel_norm_probe(num_hidden),
    )
    finals.append(state)
    norms = history.values["kernel_norms"]  # (evals, seeds, layers)
    ratio = (norms / norms[:1]).mean(-1)  # (evals, seeds)
    metrics["steps"] = history.steps.tolist()
    metrics["ratio"][arm] = ratio.tolist()
    metrics["final_ratio"][arm] = ratio[-1].tolist()
    metrics["max_ratio"][arm] = ratio.max(0).tolist()
    metrics["late_growth"][arm] = (ratio[-1] / ratio[len(ratio) // 2]).tolist()
    metrics["final_test_accuracy"][arm] = history.final("test_accuracy").tolist()
  rows = [
    ["identity", f"a = {a:g}", metrics["output_error"][i], metrics["grad_error"][i], None, None]
    for i, a in enumerate(config.scales)
  ]
  for arm in ARMS:
    acc = common.mean_ci(metrics["final_test_accuracy"][arm])
    rows.append(
      [
        arm,
        f"weight decay {config.weight_decay if arm == 'decay' else 0:g}",
        None,
        None,
        float(np.mean(metrics["final_ratio"][arm])),
        100 * acc["mean"],
      ]
    )
  table = Table(
    f"identities: float64, {config.identity_rows} rows, {config.identity_inputs} -> {config.identity_features} units, "
    f"{config.num_seeds} seeds; training: {config.dataset}, MLP {config.hidden} BN before relu, SGD lr "
    f"{config.learning_rate:g}, {config.num_steps} steps",
    [
      "part",
      "setting",
      "max output rel. error",
      "max gradient rel. error",
      "mean final ||W_T||/||W_0||",
      "final test acc %",
    ],
    rows,
  )
  plots = [_plot(run, config, metrics)]
  return Result(metrics=metrics, tables=[table], plots=plots, state_digest=common.state_digest(*finals))


def _plot(run, config, metrics) -> str:
  title = (
    f"scale invariance of BN: identities in float64 ({config.num_seeds} seeds); weight norms on {config.dataset}, "
    f"MLP {'x'.join(map(str, config.hidden))} with BN before relu, SGD lr {config.learning_rate:g}, "
    f"{config.num_steps} steps"
  )
  fig, axes = report.figure(2, title=title, width=5.0)
  ax = axes[0, 0]
  ax.plot(
    config.scales, metrics["output_error"], marker="o", label="BN((aW)u) vs BN(Wu)", color=report.ARM_COLORS["bn"]
  )
  ax.plot(
    config.scales, metrics["grad_error"], marker="s", label="dL/d(aW) vs dL/dW / a", color=report.ARM_COLORS["post"]
  )
  ax.axhline(
    config.criterion.tolerance, color="tab:red", linestyle="--", label=f"tolerance {config.criterion.tolerance:g}"
  )
  ax.set(
    xscale="log",
    yscale="log",
    xlabel="kernel scale a (log scale)",
    ylabel="relative error, max over seeds (log)",
    title="identities (float64)",
  )
  ax.legend(fontsize="small")
  ax = axes[0, 1]
  legend = ""
  for arm in ARMS:
    label = f"{arm} (weight decay {config.weight_decay if arm == 'decay' else 0:g})"
    legend = report.band(ax, metrics["steps"], metrics["ratio"][arm], label=label, color=report.ARM_COLORS[arm])
  ax.axhline(
    config.criterion.min_growth,
    color=report.ARM_COLORS["no_decay"],
    linestyle=":",
    label=f"no decay must end >= {config.criterion.min_growth:g}",
  )
  ax.axvline(
    metrics["steps"][len(metrics["steps"]) // 2], color="k", linestyle="--", linewidth=0.8, label="second half starts"
  )
  ax.set(xlabel="training step", ylabel="||W_t|| / ||W_0|| (mean over hidden layers)", title="hidden kernel norms")
  ax.legend(fontsize="small", title=legend, title_fontsize="small")
  return report.save(fig, run, "scale_invariance")
