"""Batch norm as a regularizer: BN vs dropout vs both vs neither on a small training set; ghost batch size.

The article repeats that batch norm "adds a slight regularization effect" and lessens the need for dropout.
Part 1 trains every arm on ``train_rows`` rows of digits (each seed its own rows) until it fits them and
compares the train - test accuracy gap. Part 2 (Hoffer et al. 2017) trains on the whole training split at
a large batch, normalizing over ghost batches of several sizes: smaller ghost batches are said to
generalize better.
"""

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments import report
from experiments import small_batch
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "BN vs dropout as regularizers; ghost batch size"
ARMS = {"none": ("none", False), "bn": ("bn", False), "dropout": ("none", True), "bn_dropout": ("bn", True)}


def describe_criterion(criterion) -> str:
  return (
    f"holds if (1) BN narrows the train - test accuracy gap on the small training set: the paired "
    f"{criterion.confidence:.0%} CI of gap(none) - gap(bn) lies above {criterion.min_gap_reduction_points} "
    f"points, and (2) ghost batches of {criterion.ghost_size} rows beat plain BN over the whole large batch "
    f"in test accuracy: the paired CI of the difference lies above zero. Dropout's gap reduction is reported "
    f"as a control (the setup can show a regularizer), not judged."
  )


def evaluate(metrics: dict, criterion) -> Verdict:
  conf = criterion.confidence
  gap = metrics["gap"]
  bn = common.paired_ci(gap["none"], gap["bn"], confidence=conf)
  drop = common.paired_ci(gap["none"], gap["dropout"], confidence=conf)
  ghost = metrics["ghost_test_accuracy"]
  g = common.paired_ci(ghost[str(criterion.ghost_size)], ghost["full"], confidence=conf)
  first = 100 * bn["low"] > criterion.min_gap_reduction_points
  second = g["low"] > 0
  word = lambda ok: "held" if ok else "not held"
  return Verdict(
    held=bool(first and second),
    reason=(
      f"gap(none) - gap(bn) = {common.fmt_ci(bn)} points ({word(first)}); ghost {criterion.ghost_size} - "
      f"full-batch BN test accuracy = {common.fmt_ci(g)} points ({word(second)}); control: gap(none) - "
      f"gap(dropout) = {common.fmt_ci(drop)} points."
    ),
  )


def model_of(config, num_classes: int) -> small_batch.NormMLP:
  return small_batch.NormMLP(
    hidden=tuple(config.hidden),
    num_classes=num_classes,
    ghost_sizes=tuple(config.ghost_sizes),
    momentum=config.momentum,
  )


def subset_accuracy(model, variables, kinds, x, subsets, y) -> np.ndarray:
  """Per-model inference-mode accuracy on its own rows ``subsets[i]`` of ``x``."""

  def one(v, kind, rows):
    return jnp.mean(jnp.argmax(model.apply(v, x[rows], kind, train=False), -1) == y[rows])

  return np.asarray(jax.jit(jax.vmap(one))(variables, jnp.asarray(kinds), jnp.asarray(subsets)))


def _small_set(config, run, data, model, seeds):
  x, y = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
  subsets = np.stack(
    [np.random.default_rng(s).choice(len(data.train.y), config.train_rows, replace=False) for s in seeds]
  )
  rows = small_batch.iid_rows(config.train_rows, config.batch_size, config.num_steps, seeds)
  rows = np.stack([subsets[i][rows[:, i]] for i in range(len(seeds))], axis=1)
  models = small_batch.Models([], [], [], [], [])
  parts = {
    arm: small_batch.add(
      models, seeds, model.norms.index(norm), config.learning_rate, rows, config.dropout if drop else 0.0
    )
    for arm, (norm, drop) in ARMS.items()
  }
  variables, losses = small_batch.train(model, x, y, models)
  test = small_batch.accuracy(model, variables, models.kinds, data.test.x, data.test.y)
  train = subset_accuracy(model, variables, models.kinds, x, np.tile(subsets, (len(ARMS), 1)), y)
  for arm, part in parts.items():
    run.log(
      arm=arm, step=config.num_steps, train_accuracy=train[part], test_accuracy=test[part], train_loss=losses[-1][part]
    )
  out = {k: {arm: v[part].tolist() for arm, part in parts.items()} for k, v in (("train", train), ("test", test))}
  return out, variables


def _ghosts(config, run, data, model, seeds):
  x, y = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
  rows = small_batch.iid_rows(len(data.train.y), config.ghost_batch_size, config.num_steps, seeds)
  models = small_batch.Models([], [], [], [], [])
  names = {"full": "bn", **{str(g): f"ghost_bn{g}" for g in config.ghost_sizes}}
  parts = {
    k: small_batch.add(models, seeds, model.norms.index(n), config.ghost_learning_rate, rows) for k, n in names.items()
  }
  variables, losses = small_batch.train(model, x, y, models)
  test = small_batch.accuracy(model, variables, models.kinds, data.test.x, data.test.y)
  train = small_batch.accuracy(model, variables, models.kinds, data.train.x, data.train.y)
  for k, part in parts.items():
    run.log(
      arm=f"ghost_{k}",
      step=config.num_steps,
      train_accuracy=train[part],
      test_accuracy=test[part],
      train_loss=losses[-1][part],
    )
  return (
    {k: test[part].tolist() for k, part in parts.items()},
    {k: train[part].tolist() for k, part in parts.items()},
    variables,
  )


def run(config, run) -> Result:
  seeds = common.seeds_of(config)
  data = common.load_data(config)
  model = model_of(config, data.num_classes)
  small, first = _small_set(config, run, data, model, seeds)
  ghost_test, ghost_train, second = _ghosts(config, run, data, model, seeds)
  gap = {arm: (np.array(small["train"][arm]) - np.array(small["test"][arm])).tolist() for arm in ARMS}
  metrics = {
    "train_accuracy": small["train"],
    "test_accuracy": small["test"],
    "gap": gap,
    "ghost_test_accuracy": ghost_test,
    "ghost_train_accuracy": ghost_train,
  }
  return Result(
    metrics=metrics,
    tables=_tables(config, metrics),
    plots=[_plot(run, config, metrics)],
    state_digest=common.state_digest(first, second),
    notes=(
      f"Part 1: {config.train_rows} training rows per seed, batch {config.batch_size}, lr "
      f"{config.learning_rate:g}, dropout {config.dropout:g} after each hidden relu. Part 2: the whole "
      f"training split ({config.ghost_batch_size}-row batches, lr {config.ghost_learning_rate:g}). Both "
      f"{config.num_steps} steps of SGD with momentum 0.9; accuracies in inference mode."
    ),
  )


def _tables(config, metrics) -> list:
  conf = config.criterion.confidence
  small = Table(
    f"{config.train_rows} training rows: accuracy %, mean [{conf:.0%} CI] over {config.num_seeds} seeds; MLP "
    f"{tuple(config.hidden)}, {config.num_steps} steps, batch {config.batch_size}",
    ["arm", "train", "test", "train - test (points)", "gap(none) - gap(arm)"],
    [
      [
        arm,
        common.fmt_mean_ci(metrics["train_accuracy"][arm], conf),
        common.fmt_mean_ci(metrics["test_accuracy"][arm], conf),
        common.fmt_mean_ci(metrics["gap"][arm], conf),
        common.fmt_ci(common.paired_ci(metrics["gap"]["none"], metrics["gap"][arm], confidence=conf)),
      ]
      for arm in ARMS
    ],
  )
  full = metrics["ghost_test_accuracy"]["full"]
  ghost = Table(
    f"ghost batches at batch {config.ghost_batch_size}: accuracy %, mean [{conf:.0%} CI]",
    ["ghost batch", "train", "test", "test - full-batch BN (points)"],
    [
      [
        k,
        common.fmt_mean_ci(metrics["ghost_train_accuracy"][k], conf),
        common.fmt_mean_ci(metrics["ghost_test_accuracy"][k], conf),
        common.fmt_ci(common.paired_ci(metrics["ghost_test_accuracy"][k], full, confidence=conf)),
      ]
      for k in metrics["ghost_test_accuracy"]
    ],
  )
  return [small, ghost]


def _plot(run, config, metrics) -> str:
  conf = config.criterion.confidence
  title = (
    f"Regularization: digits, MLP {tuple(config.hidden)}, SGD momentum, {config.num_steps} steps, "
    f"{config.num_seeds} seeds; bars: {conf:.0%} CI"
  )
  fig, axes = report.figure(2, width=4.8, height=3.4, title=title)
  ax = axes[0, 0]
  arms = list(ARMS)
  for k, arm in enumerate(arms):
    for offset, key, marker in ((-0.15, "train_accuracy", "s"), (0.15, "test_accuracy", "o")):
      ci = common.mean_ci(metrics[key][arm], confidence=conf)
      ax.errorbar(
        k + offset,
        100 * ci["mean"],
        yerr=[[100 * (ci["mean"] - ci["low"])], [100 * (ci["high"] - ci["mean"])]],
        fmt=marker,
        color=report.ARM_COLORS[arm],
        capsize=3,
        label=("train" if key.startswith("train") else "test") if k == 0 else None,
      )
  ax.set_xticks(range(len(arms)), arms)
  ax.set(
    xlabel=f"arm (dropout rate {config.dropout:g})",
    ylabel="accuracy (%)",
    title=f"{config.train_rows} training rows, batch {config.batch_size}",
  )
  ax.legend(fontsize="x-small", title="squares: train, circles: test", title_fontsize="x-small")
  ax = axes[0, 1]
  full = metrics["ghost_test_accuracy"]["full"]
  keys = [k for k in metrics["ghost_test_accuracy"] if k != "full"]
  report.differences(
    ax,
    [f"ghost {k} rows" for k in keys],
    [common.paired_ci(metrics["ghost_test_accuracy"][k], full, confidence=conf) for k in keys],
    title=f"ghost BN vs BN over the whole batch of {config.ghost_batch_size}",
    xlabel="test accuracy, ghost - full-batch BN (points)",
    color=report.ARM_COLORS["ghost_bn"],
  )
  ax.legend(fontsize="x-small", title=f"paired {conf:.0%} CI", title_fontsize="x-small")
  return report.save(fig, run, "regularization")
