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
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "BN before vs after the activation vs none"
ARMS = ("none", "pre", "post")
COMPARISONS = (("post", "pre"), ("pre", "none"), ("post", "none"))
HISTORY = (
  "the same criterion on one fixed split (seed 0) for every replicate (run 20261126T072800Z): not held, "
  "pooled post - pre -0.19 points [-0.59, +0.20] over 60 pairs; pre - none -0.72 [-1.28, -0.15], with "
  "wine -3.33 (relu) and -2.22 (tanh) uncorrected."
)


def describe_criterion(criterion) -> str:
  return (
    f"the article's claim, after-activation BN beats before-activation BN, holds if the pooled "
    f"paired {criterion.confidence:.0%} confidence interval of test accuracy (post - pre), over every "
    f"dataset, activation and seed, lies above zero. Previous: {HISTORY}"
  )


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
  return Verdict(
    held=bool(held),
    reason=(
      f"pooled post - pre = {100 * ci['mean']:+.2f} points, {criterion.confidence:.0%} CI "
      f"[{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}] over {ci['n']} pairs: {word}."
    ),
  )


def run(config, run) -> Result:
  seeds = common.seeds_of(config)
  lrs, flat_seeds = common.grid(config.learning_rates, seeds)
  shape = (len(config.learning_rates), len(seeds))
  cells, finals = [], []
  for dataset_name in config.datasets:
    dataset = common.load_replicates(config, flat_seeds, dataset=dataset_name)
    for activation in config.activations:
      cell = {
        "dataset": dataset_name,
        "activation": activation,
        "learning_rate": {},
        "test_accuracy": {},
        "val_accuracy": {},
      }
      for arm in ARMS:
        model = common.make_mlp(config, dataset.num_classes, norm=arm, activation=activation)
        state, history = common.train_arm(
          run, f"{dataset_name}_{activation}_{arm}", config, model, dataset, learning_rates=lrs, seeds=flat_seeds
        )
        finals.append(state)
        val = history.final("val_accuracy").reshape(shape)
        test = history.final("test_accuracy").reshape(shape)
        best = int(np.argmax(val.mean(axis=1)))  # First best on ties: the smaller learning rate.
        cell["learning_rate"][arm] = config.learning_rates[best]
        cell["val_accuracy"][arm] = val[best].tolist()
        cell["test_accuracy"][arm] = test[best].tolist()
      for a, b in COMPARISONS:
        cell[f"{a}_minus_{b}"] = common.paired_ci(
          cell["test_accuracy"][a], cell["test_accuracy"][b], confidence=config.criterion.confidence
        )
      cells.append(cell)
  metrics = {"cells": cells}
  name = lambda c: f"{c['dataset']} {c['activation']}"
  for a, b in COMPARISONS:  # One family per comparison: its cells, Bonferroni intervals, Holm p-values.
    family = common.corrected_tests(
      {name(c): (c["test_accuracy"][a], c["test_accuracy"][b]) for c in cells}, confidence=config.criterion.confidence
    )
    for c in cells:
      c[f"{a}_minus_{b}_corrected"] = family[name(c)]
  for a, b in COMPARISONS:
    metrics[f"pooled_{a}_minus_{b}"] = common.paired_ci(
      [x for c in cells for x in c["test_accuracy"][a]],
      [x for c in cells for x in c["test_accuracy"][b]],
      confidence=config.criterion.confidence,
    )
  pct = common.fmt_ci
  rows = []
  for c in cells:
    accs = [
      common.fmt_pm(*common.mean_se(c["test_accuracy"][arm]), 100.0) + f" (lr {c['learning_rate'][arm]:g})"
      for arm in ARMS
    ]
    rows.append([c["dataset"], c["activation"], *accs, pct(c["post_minus_pre"]), pct(c["pre_minus_none"])])
  rows.append(["pooled", "", "", "", "", pct(metrics["pooled_post_minus_pre"]), pct(metrics["pooled_pre_minus_none"])])
  table = Table(
    f"test accuracy % (mean ± SE over {config.num_seeds} seeds, at the learning rate with the best "
    f"validation accuracy); differences: paired mean [{config.criterion.confidence:.0%} CI] in "
    f"points; MLP {tuple(config.hidden)}, {config.optimizer}, {config.num_steps} steps, batch "
    f"{config.batch_size}, standardized inputs={config.standardize}",
    ["dataset", "activation", "none", "pre (BN before)", "post (BN after)", "post - pre", "pre - none"],
    rows,
  )
  family = cells[0]["post_minus_pre_corrected"]
  corrected = Table(
    f"per-dataset paired differences, points: mean [Bonferroni {family['confidence']:.2%} CI, i.e. "
    f"{config.criterion.confidence:.0%} for all {family['family']} cells of a column together] (Holm-adjusted p)",
    ["dataset", "activation", *(f"{a} - {b}" for a, b in COMPARISONS)],
    [
      [
        c["dataset"],
        c["activation"],
        *(
          f"{pct(c[f'{a}_minus_{b}_corrected'])} (p={c[f'{a}_minus_{b}_corrected']['p_holm']:.2g})"
          for a, b in COMPARISONS
        ),
      ]
      for c in cells
    ],
  )
  plots = [_plot(run, config, cells, metrics)]
  notes = (
    f"Criterion history: {HISTORY} This run draws each seed's own split (split seed = replicate seed), "
    f"so the intervals include test-set variance. Effects no criterion asks about: " + _effects(cells) + "."
  )
  return Result(
    metrics=metrics, tables=[table, corrected], plots=plots, state_digest=common.state_digest(*finals), notes=notes
  )


def _effects(cells) -> str:
  """The corrected cells whose interval excludes zero, for each comparison."""
  parts = []
  for a, b in COMPARISONS:
    hits = [
      f"{c['dataset']} {c['activation']} {common.fmt_ci(c[f'{a}_minus_{b}_corrected'])}"
      for c in cells
      if c[f"{a}_minus_{b}_corrected"]["low"] > 0 or c[f"{a}_minus_{b}_corrected"]["high"] < 0
    ]
    parts.append(f"{a} - {b}: " + ("; ".join(hits) if hits else "no cell's corrected interval excludes zero"))
  return " | ".join(parts)


def _plot(run, config, cells, metrics) -> str:
  title = (
    f"BN placement: MLP {tuple(config.hidden)}, {config.optimizer}, {config.num_steps} steps, batch "
    f"{config.batch_size}, lr tuned on validation, {config.num_seeds} seeds (own split each)"
  )
  fig, axes = report.figure(3, width=4.6, height=0.5 * len(cells) + 2.4, title=title)
  labels = [f"{c['dataset']} {c['activation']}" for c in cells]
  ax = axes[0, 0]
  y = np.arange(len(cells))[::-1]
  for k, arm in enumerate(ARMS):
    ci = [common.mean_ci(c["test_accuracy"][arm], confidence=config.criterion.confidence) for c in cells]
    ax.errorbar(
      [100 * x["mean"] for x in ci],
      y + (1 - k) * 0.2,
      xerr=[[100 * (x["mean"] - x["low"]) for x in ci], [100 * (x["high"] - x["mean"]) for x in ci]],
      fmt="o",
      capsize=2,
      label=arm,
      color=report.ARM_COLORS[arm],
    )
  ax.set_yticks(y, labels, fontsize="small")
  ax.set(xlabel="test accuracy (%)", title="test accuracy at each arm's tuned lr")
  ax.legend(fontsize="x-small", title=f"95% CI over {config.num_seeds} seeds", title_fontsize="x-small")
  for ax, (a, b) in zip(axes[0, 1:], (("post", "pre"), ("pre", "none")), strict=True):
    cis = [c[f"{a}_minus_{b}_corrected"] for c in cells] + [metrics[f"pooled_{a}_minus_{b}"]]
    report.differences(
      ax,
      labels + ["pooled"],
      cis,
      xlabel=f"{a} - {b} (accuracy points)",
      title=f"paired {a} - {b}",
      color=report.ARM_COLORS[a],
    )
    ax.legend(
      fontsize="x-small",
      title=f"cells: Bonferroni {cis[0]['confidence']:.1%} CI\npooled: {config.criterion.confidence:.0%} CI",
      title_fontsize="x-small",
    )
  return report.save(fig, run, "placement")
