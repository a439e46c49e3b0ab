"""Vanishing and exploding gradients in deep sigmoid and tanh MLPs, with and without batch norm.

Backpropagation multiplies, layer by layer, by the weights and the activation's derivative (at most 1/4
for a sigmoid), so in a deep plain network the gradient of the first layers shrinks or grows
geometrically; batch norm rescales each layer's input to unit variance, which keeps the factors near one.
Here: the norm of ``dL/dW_i`` for every hidden Dense kernel ``i``, on a fixed batch of training rows in
training mode, at initialization and at every evaluation, and the first-to-last ratio
``||dL/dW_0|| / ||dL/dW_{L-1}||`` (geometric mean over seeds).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from experiments import report
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "vanishing / exploding gradients in 20-layer sigmoid and tanh MLPs"
ARMS = {"none": "none", "bn": "pre"}


def describe_criterion(criterion) -> str:
  return (
    f"with BN the first-to-last layer gradient-norm ratio stays within [{criterion.low:g}, "
    f"{criterion.high:g}] at every evaluation (geometric mean over seeds), and without BN it leaves "
    f"that range at some evaluation, for every activation."
  )


def evaluate(metrics: dict, criterion) -> Verdict:
  inside = lambda r: criterion.low <= r <= criterion.high
  parts, held = [], True
  for activation, arms in metrics["ratio"].items():
    bn_ok = all(inside(r) for r in arms["bn"])
    none_out = any(not inside(r) for r in arms["none"])
    held &= bn_ok and none_out
    parts.append(
      f"{activation}: BN ratios {min(arms['bn']):.3g}..{max(arms['bn']):.3g} "
      f"({'inside' if bn_ok else 'leaves the range'}), no BN {min(arms['none']):.3g}.."
      f"{max(arms['none']):.3g} ({'leaves the range' if none_out else 'stays inside'})"
    )
  return Verdict(held=bool(held), reason="; ".join(parts) + ".")


def grad_norm_probe(model, x, y, num_hidden: int):
  """``probe(state) -> {"grad_norms": (num_hidden,)}``: ``||dL/dW_i||`` on ``(x, y)``, training mode."""

  def probe(state):
    def loss(params):
      logits, _ = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(state.params)
    return {"grad_norms": jnp.stack([jnp.linalg.norm(grads[f"Dense_{i}"]["kernel"]) for i in range(num_hidden)])}

  return probe


def geometric_mean(values, axis):
  return np.exp(np.mean(np.log(np.asarray(values, np.float64)), axis=axis))


def run(config, run) -> Result:
  dataset = common.load_data(config)
  x = jnp.asarray(dataset.train.x[: config.probe_rows])
  y = jnp.asarray(dataset.train.y[: config.probe_rows])
  num_hidden = len(config.hidden)
  metrics = {"steps": None, "ratio": {}, "grad_norms_init": {}, "grad_norms_final": {}, "final_test_accuracy": {}}
  norms, finals = {}, []
  for activation in config.activations:
    for key in ("ratio", "grad_norms_init", "grad_norms_final", "final_test_accuracy"):
      metrics[key][activation] = {}
    for arm, norm in ARMS.items():
      model = common.make_mlp(config, dataset.num_classes, norm=norm, activation=activation)
      state, history = common.train_arm(
        run, f"{activation}_{arm}", config, model, dataset, probe=grad_norm_probe(model, x, y, num_hidden)
      )
      finals.append(state)
      g = history.values["grad_norms"]  # (evals, seeds, layers)
      norms[activation, arm] = (history.steps, g)
      metrics["steps"] = history.steps.tolist()
      metrics["ratio"][activation][arm] = geometric_mean(g[:, :, 0] / g[:, :, -1], axis=1).tolist()
      metrics["grad_norms_init"][activation][arm] = geometric_mean(g[0], axis=0).tolist()
      metrics["grad_norms_final"][activation][arm] = geometric_mean(g[-1], axis=0).tolist()
      metrics["final_test_accuracy"][activation][arm] = float(history.final("test_accuracy").mean())
  rows = []
  for activation in config.activations:
    for arm in ARMS:
      r = metrics["ratio"][activation][arm]
      rows.append([activation, arm, r[0], r[-1], min(r), max(r), 100 * metrics["final_test_accuracy"][activation][arm]])
  table = Table(
    f"{config.dataset}, {num_hidden} hidden layers of {config.hidden[0]}, {config.optimizer} "
    f"lr {config.learning_rate:g}, {config.num_steps} steps, {config.num_seeds} seeds",
    ["activation", "arm", "ratio at init", "ratio at end", "min ratio", "max ratio", "final test acc %"],
    rows,
  )
  plots = [_plot(run, config, norms, metrics)]
  return Result(metrics=metrics, tables=[table], plots=plots, state_digest=common.state_digest(*finals))


def _plot(run, config, norms, metrics) -> str:
  acts = list(config.activations)
  title = (
    f"gradient norms on {config.dataset}: {len(config.hidden)} hidden layers of {config.hidden[0]}, "
    f"{config.optimizer} lr {config.learning_rate:g}, {config.num_steps} steps; lines: geometric mean over "
    f"{config.num_seeds} seeds, {config.probe_rows} training rows, training mode"
  )
  fig, axes = report.figure(3, len(acts), title=title)
  layers = np.arange(len(config.hidden))
  for row, activation in enumerate(acts):
    for col, (when, key) in enumerate((("at initialization", "grad_norms_init"), ("at the end", "grad_norms_final"))):
      ax = axes[row, col]
      for arm in ARMS:
        ax.plot(layers, metrics[key][activation][arm], marker=".", label=arm, color=report.ARM_COLORS[arm])
      ax.set(
        yscale="log",
        xlabel="hidden layer index (0 = first)",
        ylabel="||dL/dW|| (Frobenius, log scale)",
        title=f"{activation}, {when}",
      )
      ax.legend(fontsize="small")
    ax = axes[row, 2]
    for arm in ARMS:
      ax.plot(metrics["steps"], metrics["ratio"][activation][arm], marker=".", label=arm, color=report.ARM_COLORS[arm])
    ax.axhspan(
      config.criterion.low,
      config.criterion.high,
      color="tab:green",
      alpha=0.1,
      label=f"criterion range [{config.criterion.low:g}, {config.criterion.high:g}]",
    )
    ax.set(
      yscale="log",
      xlabel="training step",
      ylabel="||dL/dW_0|| / ||dL/dW_last|| (log scale)",
      title=f"{activation}: first / last layer ratio",
    )
    ax.legend(fontsize="small")
  return report.save(fig, run, "deep_gradients")
