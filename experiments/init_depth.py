"""Initialization scale x depth with and without BN, and the gradients of deep BN networks at initialization.

The paper says BN lets one be "less careful about initialization": here every (kernel scale, depth) cell of
ReLU MLPs trains with and without BN, and a cell counts as trained when its seeds' mean test accuracy
reaches the target. The counter-claim (Yang et al. 2019) is that deep BN networks have exploding gradients
at initialization: here the ratio ``||dL/dW_0|| / ||dL/dW_{L-1}||`` of the first to the last hidden
kernel's gradient, at initialization, in training mode, on a fixed batch of training rows, vs depth.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen

from bnjax import models
from experiments import common
from experiments import report
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "initialization scale x depth with and without BN, and gradient explosion at initialization"
ARMS = {"none": None, "bn": "pre"}


def describe_criterion(criterion) -> str:
  return (
    f"less careful about initialization: BN reaches {criterion.target_accuracy:.0%} mean test accuracy in "
    f"at least {criterion.min_extra_cells} more (scale, depth) cells than no BN (refuted otherwise); "
    f"exploding gradients: at the deepest probed depth BN's first/last gradient-norm ratio has a "
    f"{criterion.confidence:.0%} interval (log10, over seeds) above {criterion.explode_ratio:g} (refuted if "
    f"it lies below). Held when both hold."
  )


def trained_cells(accuracy, target: float) -> int:
  return int(sum(np.nanmean(seeds) >= target for row in accuracy for seeds in row))


def evaluate(metrics: dict, criterion) -> Verdict:
  cells = {arm: trained_cells(metrics["accuracy"][arm], criterion.target_accuracy) for arm in ARMS}
  total = sum(len(row) for row in metrics["accuracy"]["bn"])
  init_ok = cells["bn"] - cells["none"] >= criterion.min_extra_cells
  deepest = metrics["grad_depths"][-1]
  ci = {arm: common.mean_ci(np.log10(metrics["grad_ratio"][arm][-1]), confidence=criterion.confidence) for arm in ARMS}
  bound = np.log10(criterion.explode_ratio)
  explodes = ci["bn"]["low"] > bound
  side = "above" if explodes else "below" if ci["bn"]["high"] < bound else "straddling"
  outcome = "holds" if explodes else "refuted" if side == "below" else "not shown"
  fmt = lambda c: f"{10 ** c['mean']:.3g} [{10 ** c['low']:.3g}, {10 ** c['high']:.3g}]"
  reason = (
    f"trained cells (of {total}): BN {cells['bn']}, none {cells['none']} "
    f"({'holds' if init_ok else 'refuted'}); first/last gradient ratio at depth {deepest}: BN {fmt(ci['bn'])} "
    f"({side} {criterion.explode_ratio:g}: explosion {outcome}), "
    f"none {fmt(ci['none'])}."
  )
  return Verdict(held=bool(init_ok and explodes), reason=reason)


def make_model(config, depth: int, norm, scale: float, num_classes: int):
  return models.MLP(
    features=(*(config.width,) * depth, num_classes),
    activation=linen.relu,
    norm=norm,
    momentum=config.momentum,
    epsilon=config.epsilon,
    kernel_init=linen.initializers.variance_scaling(scale**2, "fan_in", "truncated_normal"),
  )


def grad_ratios(model, x, y, depth: int, seeds) -> np.ndarray:
  """Per seed, at initialization: ``||dL/dW_0|| / ||dL/dW_{depth-1}||`` in training mode on ``(x, y)``."""

  def ratio(key):
    variables = model.init(key, x, train=False)

    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(variables["params"])
    norm = lambda i: jnp.linalg.norm(grads[f"Dense_{i}"]["kernel"])
    return norm(0) / norm(depth - 1)

  keys = jnp.stack([jax.random.key(int(s)) for s in seeds])
  return np.asarray(jax.jit(jax.vmap(ratio))(keys), np.float64)


def run(config, run) -> Result:
  dataset = common.load_data(config)
  seeds = common.seeds_of(config)
  metrics = {"scales": list(config.init_scales), "depths": list(config.depths), "accuracy": {}, "diverged": {}}
  finals = []
  for arm, norm in ARMS.items():
    metrics["accuracy"][arm], metrics["diverged"][arm] = [], []
    for scale in config.init_scales:
      row, gone = [], []
      for depth in config.depths:
        model = make_model(config, depth, norm, scale, dataset.num_classes)
        state, history = common.train_arm(
          run, f"{arm}_s{scale:g}_d{depth}", config, model, dataset, eval_splits=("test",)
        )
        finals.append(state)
        row.append(history.final("test_accuracy").tolist())
        gone.append(sum(s is not None for s in history.diverged_at))
      metrics["accuracy"][arm].append(row)
      metrics["diverged"][arm].append(gone)
  x = jnp.asarray(dataset.train.x[: config.probe_rows])
  y = jnp.asarray(dataset.train.y[: config.probe_rows])
  metrics["grad_depths"] = list(config.grad_depths)
  metrics["grad_ratio"] = {arm: [] for arm in ARMS}
  for depth in config.grad_depths:
    for arm, norm in ARMS.items():
      ratios = grad_ratios(make_model(config, depth, norm, 1.0, dataset.num_classes), x, y, depth, seeds)
      metrics["grad_ratio"][arm].append(ratios.tolist())
      run.log(arm=f"grad_init_{arm}_d{depth}", step=0, grad_ratio=ratios.tolist())
  tables = _tables(config, metrics)
  plots = [_plot(run, config, metrics)]
  return Result(metrics=metrics, tables=tables, plots=plots, state_digest=common.state_digest(*finals))


def _setup(config) -> str:
  return (
    f"{config.dataset} (standardized), ReLU MLP width {config.width}, {config.optimizer} lr "
    f"{config.learning_rate:g}, batch {config.batch_size}, {config.num_steps} steps, {config.num_seeds} seeds"
  )


def _tables(config, metrics) -> list:
  rows = []
  for i, scale in enumerate(config.init_scales):
    for j, depth in enumerate(config.depths):
      cells = [100 * np.nanmean(metrics["accuracy"][arm][i][j]) for arm in ARMS]
      rows.append([scale, depth, *cells, metrics["diverged"]["none"][i][j], metrics["diverged"]["bn"][i][j]])
  grads = []
  for k, depth in enumerate(config.grad_depths):
    gm = {arm: 10 ** np.mean(np.log10(metrics["grad_ratio"][arm][k])) for arm in ARMS}
    grads.append([depth, gm["none"], gm["bn"]])
  return [
    Table(
      f"final test accuracy (mean over seeds), {_setup(config)}",
      ["scale (x LeCun std)", "depth", "none acc %", "bn acc %", "none diverged", "bn diverged"],
      rows,
    ),
    Table(
      f"first/last hidden-layer gradient-norm ratio at initialization (LeCun scale, geometric mean over "
      f"{config.num_seeds} seeds, {config.probe_rows} training rows, training mode)",
      ["depth", "none", "bn"],
      grads,
    ),
  ]


def _plot(run, config, metrics) -> str:
  fig, axes = report.figure(3, title=f"init scale x depth: {_setup(config)}", width=4.4)
  for k, arm in enumerate(ARMS):
    ax = axes[0, k]
    acc = 100 * np.array([[np.nanmean(s) for s in row] for row in metrics["accuracy"][arm]])
    image = ax.imshow(acc, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(acc):
      ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="w" if value < 60 else "k", fontsize="small")
    ax.set_xticks(range(len(config.depths)), config.depths)
    ax.set_yticks(range(len(config.init_scales)), [f"{s:g}" for s in config.init_scales])
    ax.set(xlabel="hidden layers (depth)", ylabel="kernel std (x LeCun)", title=f"{arm}: final test accuracy")
    fig.colorbar(image, ax=ax, label=f"test accuracy (%), mean of {config.num_seeds} seeds")
  ax = axes[0, 2]
  legend = ""
  for arm in ARMS:
    legend = report.band(ax, metrics["grad_depths"], metrics["grad_ratio"][arm], label=arm, logy=True)
  ax.axhline(
    config.criterion.explode_ratio, color="k", linestyle="--", label=f"criterion {config.criterion.explode_ratio:g}"
  )
  ax.set(
    xlabel="hidden layers (depth)",
    ylabel="||dL/dW_0|| / ||dL/dW_last|| (log scale)",
    title="gradient ratio at initialization (LeCun)",
  )
  ax.legend(title=legend.replace("bands:", "bands (geometric):"), fontsize="small", title_fontsize="small")
  return report.save(fig, run, "init_depth")
