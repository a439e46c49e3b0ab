"""The article's Keras model on a 5-feature binary task, with and without its BatchNormalization layer.

``Dense(16, relu) -> Dense(32, relu) -> BatchNormalization -> Dense(2)`` (`bnjax.models.keras_article_model`),
Keras's BatchNormalization defaults (momentum 0.99, epsilon 1e-3), on the raw features of the synthetic
``age_salary`` set, the article's own example of features on different scales. Baselines: the same model
without BN on standardized inputs (``standardized``), and the majority-class rate (always predict the
training split's most frequent class). Each seed trains every arm from the same batch order and its own
data split; comparisons are paired by seed.
"""

import numpy as np

from bnjax import models
from experiments import common
from experiments import report
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "the article's Keras model, with and without its BN layer"
ARMS = {"none": False, "bn": True, "standardized": False}
HISTORY = (
  "v1 (paired 95% CI of BN - none above zero, fixed split; run 20261126T072805Z): held, +6.13 points "
  "[+1.93, +10.33] over 10 seeds, with no BN at 53.8% (about the majority-class rate) and BN at 60.0%, "
  "far below a standardized network (86.8% in feature_scale)."
)


def describe_criterion(criterion) -> str:
  return (
    f"v{criterion.version}: paired {criterion.confidence:.0%} confidence intervals over seeds of final "
    f"test accuracy: BN - no BN lies above zero, BN - majority-class rate lies above "
    f"+{criterion.min_over_majority_points:g} points, and BN - the standardized-input network without BN "
    f"lies above -{criterion.max_gap_to_standardized_points:g} points. Previous: {HISTORY}"
  )


def evaluate(metrics: dict, criterion) -> Verdict:
  acc = metrics["seed_test_accuracy"]
  level = criterion.confidence
  vs_none = common.paired_ci(acc["bn"], acc["none"], confidence=level)
  vs_majority = common.paired_ci(acc["bn"], metrics["seed_majority_rate"], confidence=level)
  vs_standardized = common.paired_ci(acc["bn"], acc["standardized"], confidence=level)
  checks = {
    "BN - no BN": (vs_none, vs_none["low"] > 0, "above 0"),
    "BN - majority": (
      vs_majority,
      vs_majority["low"] > criterion.min_over_majority_points / 100,
      f"above +{criterion.min_over_majority_points:g}",
    ),
    "BN - standardized": (
      vs_standardized,
      vs_standardized["low"] > -criterion.max_gap_to_standardized_points / 100,
      f"above -{criterion.max_gap_to_standardized_points:g}",
    ),
  }
  parts = [f"{name} {common.fmt_ci(ci)} ({'' if ok else 'not '}{need})" for name, (ci, ok, need) in checks.items()]
  held = all(ok for _, ok, _ in checks.values())
  return Verdict(
    held=bool(held), reason=f"{level:.0%} CIs in points over {vs_none['n']} seeds: " + "; ".join(parts) + "."
  )


def majority_rate(train_y, test_y) -> float:
  """The test accuracy of always predicting the training split's most frequent class."""
  return float(np.mean(np.asarray(test_y) == np.bincount(np.asarray(train_y)).argmax()))


def run(config, run) -> Result:
  seeds = common.seeds_of(config)
  data = {
    "raw": common.load_replicates(config, seeds, standardize=False),
    "standardized": common.load_replicates(config, seeds, standardize=True),
  }
  raw = data["raw"]
  train_y, test_y = raw.train.y.reshape(-1, raw.train.y.shape[-1]), raw.test.y.reshape(-1, raw.test.y.shape[-1])
  if len(train_y) == 1:  # One split for every seed.
    train_y, test_y = np.repeat(train_y, len(seeds), 0), np.repeat(test_y, len(seeds), 0)
  metrics = {
    "seed_test_accuracy": {},
    "final_test_accuracy": {},
    "final_test_accuracy_se": {},
    "seed_majority_rate": [majority_rate(a, b) for a, b in zip(train_y, test_y, strict=True)],
  }
  histories, finals = {}, []
  for arm, batch_norm in ARMS.items():
    model = models.keras_article_model(batch_norm=batch_norm, momentum=config.momentum, epsilon=config.epsilon)
    state, history = common.train_arm(run, arm, config, model, data["standardized" if arm == "standardized" else "raw"])
    finals.append(state)
    histories[arm] = history
    final = history.final("test_accuracy")
    mean, se = common.mean_se(final)
    metrics["seed_test_accuracy"][arm] = final.tolist()
    metrics["final_test_accuracy"][arm], metrics["final_test_accuracy_se"][arm] = float(mean), float(se)
  acc = metrics["seed_test_accuracy"]
  level = config.criterion.confidence
  diffs = {
    "bn - none": common.paired_ci(acc["bn"], acc["none"], confidence=level),
    "bn - majority": common.paired_ci(acc["bn"], metrics["seed_majority_rate"], confidence=level),
    "none - majority": common.paired_ci(acc["none"], metrics["seed_majority_rate"], confidence=level),
    "bn - standardized": common.paired_ci(acc["bn"], acc["standardized"], confidence=level),
  }
  metrics["differences"] = diffs
  rows = [
    [
      arm,
      common.fmt_pm(metrics["final_test_accuracy"][arm], metrics["final_test_accuracy_se"][arm], 100.0),
      common.fmt_pm(*common.mean_se(histories[arm].final("val_accuracy")), 100.0),
    ]
    for arm in ARMS
  ]
  rows.append(["majority class", common.fmt_pm(*common.mean_se(metrics["seed_majority_rate"]), 100.0), ""])
  rows += [[f"{name} (paired, {level:.0%} CI)", common.fmt_ci(ci), ""] for name, ci in diffs.items()]
  split = "its own split per seed" if config.split_per_seed else f"the split of seed {config.seed}"
  table = Table(
    f"{config.dataset} (raw features unless standardized), {config.optimizer} lr "
    f"{config.learning_rate:g}, batch {config.batch_size}, {config.num_steps} steps, {config.num_seeds} "
    f"seeds, {split}",
    ["model", "final test acc % (± s.e.)", "final val acc % (± s.e.)"],
    rows,
  )
  notes = (
    f"Criterion history: {HISTORY} The standardized arm is the same model without BN on inputs "
    f"standardized with training-split statistics; the majority-class rate is per seed's test split."
  )
  plots = [_plot(run, config, histories, diffs)]
  return Result(metrics=metrics, tables=[table], plots=plots, state_digest=common.state_digest(*finals), notes=notes)


def _plot(run, config, histories, diffs) -> str:
  title = (
    f"Keras model on {config.dataset}: {config.optimizer} lr {config.learning_rate:g}, batch "
    f"{config.batch_size}, {config.num_seeds} seeds"
  )
  fig, axes = report.figure(3, title=title)
  for arm, h in histories.items():
    note = report.band(axes[0, 0], h.steps, h.values["test_accuracy"], label=arm)
    report.band(axes[0, 1], h.steps, h.values["test_loss"], label=arm, logy=True)
  axes[0, 0].set(title="test accuracy", xlabel="training step", ylabel="test accuracy (fraction)", ylim=(0.3, 1))
  axes[0, 1].set(title="test loss (geometric mean)", xlabel="training step", ylabel="cross-entropy (nats, log scale)")
  axes[0, 0].legend(title=note, fontsize="small", title_fontsize="small")
  axes[0, 1].legend(title=note, fontsize="small", title_fontsize="small")
  report.differences(
    axes[0, 2],
    list(diffs),
    list(diffs.values()),
    xlabel="difference (accuracy points)",
    title=f"paired differences ({config.criterion.confidence:.0%} CI)",
  )
  axes[0, 2].legend(fontsize="small")
  return report.save(fig, run, "keras_example")
