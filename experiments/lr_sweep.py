"""Learning-rate sweep with and without batch norm: which learning rates still reach the target?

Ioffe & Szegedy (2015), section 3.3 ("Batch Normalization enables higher learning rates"). Each arm trains
every (learning rate, seed) pair at once; a learning rate counts as reaching the target when the mean over
seeds of the final test accuracy is at least ``criterion.target_accuracy``. A diverged run (NaN loss)
predicts class 0 and so counts as not reaching it.
"""

import numpy as np

from experiments import common
from experiments import report
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "learning-rate sweep, with and without batch norm"
ARMS = {"none": "none", "bn": "pre"}


HISTORY = (
  "v1 (count of grid points reaching the target, BN >= none + 2, fixed split, 5 seeds; run "
  "20261126T072630Z): held, BN at 7 learning rates (0.003 ... 3), no BN at 4 (0.01 ... 0.3): +3."
)


def describe_criterion(criterion) -> str:
  return (
    f"v{criterion.version}: the largest learning rate of the grid at which the mean final test accuracy "
    f"still reaches {criterion.target_accuracy:.0%} is at least {criterion.min_lr_ratio:g}x larger with BN "
    f"than without. Previous: {HISTORY}"
  )


def largest_reaching(learning_rates, accuracies, target: float):
  """The largest learning rate whose accuracy (None: diverged) is at least ``target``; None if none is."""
  hits = [lr for lr, acc in zip(learning_rates, accuracies, strict=True) if acc is not None and acc >= target]
  return max(hits) if hits else None


def evaluate(metrics: dict, criterion) -> Verdict:
  lrs = metrics["learning_rates"]
  largest = {arm: largest_reaching(lrs, metrics["final_test_accuracy"][arm], criterion.target_accuracy) for arm in ARMS}
  bn, none = largest["bn"], largest["none"]
  held = bn is not None and (none is None or bn >= criterion.min_lr_ratio * none)
  show = lambda lr: "none of the grid" if lr is None else f"{lr:g}"
  top = " (the top of the grid: the true limit may be higher)" if bn is not None and bn == max(lrs) else ""
  return Verdict(
    held=bool(held),
    reason=(
      f"largest learning rate reaching {criterion.target_accuracy:.0%}: BN {show(bn)}{top}, no BN {show(none)}; "
      f"{'at least' if held else 'not'} {criterion.min_lr_ratio:g}x."
    ),
  )


def run(config, run) -> Result:
  seeds = common.seeds_of(config)
  lrs, flat_seeds = common.grid(config.learning_rates, seeds)
  dataset = common.load_replicates(config, flat_seeds)
  shape = (len(config.learning_rates), len(seeds))
  metrics = {
    "learning_rates": list(config.learning_rates),
    "final_test_accuracy": {},
    "final_test_accuracy_se": {},
    "diverged_fraction": {},
  }
  curves, finals = {}, []
  for arm, norm in ARMS.items():
    model = common.make_mlp(config, dataset.num_classes, norm=norm)
    state, history = common.train_arm(
      run, arm, config, model, dataset, learning_rates=lrs, seeds=flat_seeds, eval_splits=("test",)
    )
    finals.append(state)
    accuracy = history.final("test_accuracy").reshape(shape)
    mean, se = common.mean_se(accuracy.T)
    metrics["final_test_accuracy"][arm] = mean.tolist()
    metrics["final_test_accuracy_se"][arm] = se.tolist()
    loss = history.final("test_loss").reshape(shape)
    metrics["diverged_fraction"][arm] = (~np.isfinite(loss)).mean(axis=1).tolist()
    metrics.setdefault("seed_test_accuracy", {})[arm] = accuracy.tolist()
    metrics.setdefault("seed_largest_lr", {})[arm] = [
      largest_reaching(config.learning_rates, accuracy[:, j], config.criterion.target_accuracy)
      for j in range(len(seeds))
    ]
    curves[arm] = (history.steps, history.values["test_accuracy"].reshape(len(history.steps), *shape))

  rows = []
  for i, lr in enumerate(config.learning_rates):
    row = [lr]
    for arm in ARMS:
      row.append(
        common.fmt_pm(metrics["final_test_accuracy"][arm][i], metrics["final_test_accuracy_se"][arm][i], 100.0, 1)
      )
      row.append(f"{metrics['diverged_fraction'][arm][i]:.0%}")
    rows.append(row)
  table = Table(
    f"{config.dataset}, MLP {tuple(config.hidden)} {config.activation}, {config.optimizer}, "
    f"{config.num_steps} steps, batch {config.batch_size}, {config.num_seeds} seeds: final test "
    f"accuracy %",
    ["learning rate", "no BN", "no BN diverged", "BN", "BN diverged"],
    rows,
  )
  plots = [_plot(run, config, metrics, curves)]
  per_seed = metrics["seed_largest_lr"]
  above = sum((b or 0) > (n or 0) for b, n in zip(per_seed["bn"], per_seed["none"], strict=True))
  ties = sum((b or 0) == (n or 0) for b, n in zip(per_seed["bn"], per_seed["none"], strict=True))
  show = lambda v: " ".join("-" if x is None else f"{x:g}" for x in v)
  seeds_table = Table(
    f"largest learning rate reaching {config.criterion.target_accuracy:.0%} per seed "
    f"(- : none); split {'drawn per seed' if config.split_per_seed else 'fixed'}",
    ["arm", "per seed"],
    [[arm, show(per_seed[arm])] for arm in ARMS],
  )
  notes = (
    f"Criterion history: {HISTORY} This run, seed by seed: BN's largest target-reaching learning rate is "
    f"higher than no BN's in {above} of {len(seeds)} seeds, equal in {ties}. Intervals are over seeds, "
    f"each seed with its own data split (split seed = replicate seed)."
  )
  return Result(
    metrics=metrics, tables=[table, seeds_table], plots=plots, state_digest=common.state_digest(*finals), notes=notes
  )


def _plot(run, config, metrics, curves) -> str:
  title = (
    f"lr sweep on {config.dataset}: MLP {tuple(config.hidden)} {config.activation}, {config.optimizer}, "
    f"batch {config.batch_size}, {config.num_steps} steps, {config.num_seeds} seeds"
  )
  fig, axes = report.figure(2, title=title)
  ax = axes[0, 0]
  n = config.num_seeds
  for arm in ARMS:
    ci = [common.mean_ci(row) for row in metrics["seed_test_accuracy"][arm]]
    mean = np.array([c["mean"] for c in ci])
    err = np.array([[c["mean"] - c["low"], c["high"] - c["mean"]] for c in ci]).T
    ax.errorbar(config.learning_rates, mean, yerr=err, marker="o", capsize=3, label=arm, color=report.ARM_COLORS[arm])
  report.target_line(ax, config.criterion.target_accuracy)
  ax.set(
    xscale="log",
    xlabel="learning rate (log scale)",
    ylabel="final test accuracy (fraction)",
    ylim=(0, 1),
    title="final test accuracy vs learning rate",
  )
  ax.legend(title=f"bars: 95% CI over {n} seeds", fontsize="small", title_fontsize="small")
  ax = axes[0, 1]
  top = int(np.argmax(config.learning_rates))
  for arm in ARMS:
    steps, values = curves[arm]
    note = report.band(ax, steps, values[:, top], label=arm, color=report.ARM_COLORS[arm])
  ax.set(
    xlabel="training step",
    ylabel="test accuracy (fraction)",
    ylim=(0, 1),
    title=f"at the largest learning rate, {config.learning_rates[top]:g}",
  )
  ax.legend(title=note, fontsize="small", title_fontsize="small")
  return report.save(fig, run, "lr_sweep")
