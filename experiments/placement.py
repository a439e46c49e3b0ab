"""Batch norm before vs after the activation vs none, with tuned learning rates and paired intervals.

The article: "it was proposed that normalization before activation will be very beneficial. But it was
found that applying batch norm after activation yields better results." Tested here on three datasets and
two activations: per (dataset, activation, arm) every learning rate of the grid trains every seed; the
arm's learning rate is the one with the best mean final validation accuracy (the test split plays no part
in the choice), and the arms' final test accuracies at their chosen rates are compared seed by seed.
"""
import numpy as np

from experiments import common
from experiments import report
from experiments.runner import Result, Table, Verdict

TITLE = "BN before vs after the activation vs none"
ARMS = ("none", "pre", "post")


def describe_criterion(criterion) -> str:
  return (f"the article's claim, after-activation BN beats before-activation BN, holds if the pooled "
          f"paired {criterion.confidence:.0%} confidence interval of test accuracy (post - pre), over every "
          f"dataset, activation and seed, lies above zero.")


def evaluate(metrics: dict, criterion) -> Verdict:
  pre = [a for cell in metrics["cells"] for a in cell["test_accuracy"]["pre"]]
  post = [a for cell in metrics["cells"] for a in cell["test_accuracy"]["post"]]
  ci = common.paired_ci(post, pre, confidence=criterion.confidence)
  held = ci["low"] > 0
  if held:
    word = "post is better"
  elif ci["high"] < 0:
    word = "pre is better: the claim is contradicted"
  else:
    word = "the interval contains zero: no significant difference"
  return Verdict(held=bool(held), reason=(
      f"pooled post - pre = {100 * ci['mean']:+.2f} points, {criterion.confidence:.0%} CI "
      f"[{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}] over {ci['n']} pairs: {word}."))


def run(config, run) -> Result:
  seeds = common.seeds_of(config)
  lrs, flat_seeds = common.grid(config.learning_rates, seeds)
  shape = (len(config.learning_rates), len(seeds))
  cells, finals = [], []
  for dataset_name in config.datasets:
    dataset = common.load_data(config, dataset=dataset_name)
    for activation in config.activations:
      cell = {"dataset": dataset_name, "activation": activation, "learning_rate": {},
              "test_accuracy": {}, "val_accuracy": {}}
      for arm in ARMS:
        model = common.make_mlp(config, dataset.num_classes, norm=arm, activation=activation)
        state, history = common.train_arm(run, f"{dataset_name}_{activation}_{arm}", config, model, dataset,
                                          learning_rates=lrs, seeds=flat_seeds)
        finals.append(state)
        val = history.final("val_accuracy").reshape(shape)
        test = history.final("test_accuracy").reshape(shape)
        best = int(np.argmax(val.mean(axis=1)))  # First best on ties: the smaller learning rate.
        cell["learning_rate"][arm] = config.learning_rates[best]
        cell["val_accuracy"][arm] = val[best].tolist()
        cell["test_accuracy"][arm] = test[best].tolist()
      for a, b in (("post", "pre"), ("pre", "none"), ("post", "none")):
        cell[f"{a}_minus_{b}"] = common.paired_ci(cell["test_accuracy"][a], cell["test_accuracy"][b],
                                                  confidence=config.criterion.confidence)
      cells.append(cell)
  metrics = {"cells": cells}
  for a, b in (("post", "pre"), ("pre", "none"), ("post", "none")):
    metrics[f"pooled_{a}_minus_{b}"] = common.paired_ci(
        [x for c in cells for x in c["test_accuracy"][a]], [x for c in cells for x in c["test_accuracy"][b]],
        confidence=config.criterion.confidence)
  pct = lambda ci: f"{100 * ci['mean']:+.2f} [{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}]"
  rows = []
  for c in cells:
    accs = [common.fmt_pm(*common.mean_se(c["test_accuracy"][arm]), 100.0) +
            f" (lr {c['learning_rate'][arm]:g})" for arm in ARMS]
    rows.append([c["dataset"], c["activation"], *accs, pct(c["post_minus_pre"]), pct(c["pre_minus_none"])])
  rows.append(["pooled", "", "", "", "", pct(metrics["pooled_post_minus_pre"]),
               pct(metrics["pooled_pre_minus_none"])])
  table = Table(f"test accuracy % (mean ± SE over {config.num_seeds} seeds, at the learning rate with the best "
                f"validation accuracy); differences: paired mean [{config.criterion.confidence:.0%} CI] in "
                f"points; MLP {tuple(config.hidden)}, {config.optimizer}, {config.num_steps} steps, batch "
                f"{config.batch_size}, standardized inputs={config.standardize}",
                ["dataset", "activation", "none", "pre (BN before)", "post (BN after)", "post - pre",
                 "pre - none"], rows)
  plots = [_plot(run, config, cells)]
  return Result(metrics=metrics, tables=[table], plots=plots, state_digest=common.state_digest(*finals))


def _plot(run, config, cells) -> str:
  fig, axes = report.figure(1, width=max(5.0, 1.6 * len(cells)), height=3.4)
  ax = axes[0, 0]
  width = 0.27
  for k, arm in enumerate(ARMS):
    means, ses = zip(*(common.mean_se(c["test_accuracy"][arm]) for c in cells))
    positions = np.arange(len(cells)) + (k - 1) * width
    ax.bar(positions, means, width, yerr=ses, capsize=2, label=arm, color=report.ARM_COLORS[arm])
  low = min(min(c["test_accuracy"][arm]) for c in cells for arm in ARMS)
  ax.set_ylim(max(0.0, low - 0.05), 1.0)
  ax.set_xticks(np.arange(len(cells)), [f"{c['dataset']}\n{c['activation']}" for c in cells],
                fontsize="small")
  ax.set(ylabel="test accuracy", title="test accuracy at each arm's tuned learning rate")
  ax.legend(fontsize="small", ncols=3)
  return report.save(fig, run, "placement")
