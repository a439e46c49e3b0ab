"""Learning-rate sweep with and without batch norm: which learning rates still reach the target?

Ioffe & Szegedy (2015), section 3.3 ("Batch Normalization enables higher learning rates"). Each arm trains
every (learning rate, seed) pair at once; a learning rate counts as reaching the target when the mean over
seeds of the final test accuracy is at least ``criterion.target_accuracy``. A diverged run (NaN loss)
predicts class 0 and so counts as not reaching it.
"""
import numpy as np

from experiments import common
from experiments import report
from experiments.runner import Result, Table, Verdict

TITLE = "learning-rate sweep, with and without batch norm"
ARMS = {"none": "none", "bn": "pre"}


def describe_criterion(criterion) -> str:
  return (f"BN reaches {criterion.target_accuracy:.0%} mean final test accuracy at no fewer than "
          f"{criterion.min_extra_points} more learning rates of the grid than no BN.")


def evaluate(metrics: dict, criterion) -> Verdict:
  reached = {arm: [lr for lr, acc in zip(metrics["learning_rates"], metrics["final_test_accuracy"][arm])
                   if acc is not None and acc >= criterion.target_accuracy] for arm in ARMS}
  extra = len(reached["bn"]) - len(reached["none"])
  held = extra >= criterion.min_extra_points
  return Verdict(held=bool(held), reason=(
      f"BN reaches the target at {len(reached['bn'])} learning rates {reached['bn']}, no BN at "
      f"{len(reached['none'])} {reached['none']}: {extra:+d} (need +{criterion.min_extra_points})."))


def run(config, run) -> Result:
  dataset = common.load_data(config)
  seeds = common.seeds_of(config)
  lrs, flat_seeds = common.grid(config.learning_rates, seeds)
  shape = (len(config.learning_rates), len(seeds))
  metrics = {"learning_rates": list(config.learning_rates), "final_test_accuracy": {},
             "final_test_accuracy_se": {}, "diverged_fraction": {}}
  curves, finals = {}, []
  for arm, norm in ARMS.items():
    model = common.make_mlp(config, dataset.num_classes, norm=norm)
    state, history = common.train_arm(run, arm, config, model, dataset, learning_rates=lrs,
                                      seeds=flat_seeds, eval_splits=("test",))
    finals.append(state)
    accuracy = history.final("test_accuracy").reshape(shape)
    mean, se = common.mean_se(accuracy.T)
    metrics["final_test_accuracy"][arm] = mean.tolist()
    metrics["final_test_accuracy_se"][arm] = se.tolist()
    loss = history.final("test_loss").reshape(shape)
    metrics["diverged_fraction"][arm] = (~np.isfinite(loss)).mean(axis=1).tolist()
    curves[arm] = (history.steps, history.values["test_accuracy"].reshape(len(history.steps), *shape))

  rows = []
  for i, lr in enumerate(config.learning_rates):
    row = [lr]
    for arm in ARMS:
      row.append(common.fmt_pm(metrics["final_test_accuracy"][arm][i],
                               metrics["final_test_accuracy_se"][arm][i], 100.0, 1))
      row.append(f"{metrics['diverged_fraction'][arm][i]:.0%}")
    rows.append(row)
  table = Table(f"{config.dataset}, MLP {tuple(config.hidden)} {config.activation}, {config.optimizer}, "
                f"{config.num_steps} steps, batch {config.batch_size}, {config.num_seeds} seeds: final test "
                f"accuracy %", ["learning rate", "no BN", "no BN diverged", "BN", "BN diverged"], rows)
  plots = [_plot(run, config, metrics, curves)]
  return Result(metrics=metrics, tables=[table], plots=plots, state_digest=common.state_digest(*finals))


def _plot(run, config, metrics, curves) -> str:
  fig, axes = report.figure(2)
  ax = axes[0, 0]
  for arm in ARMS:
    mean = np.asarray(metrics["final_test_accuracy"][arm])
    se = np.asarray(metrics["final_test_accuracy_se"][arm])
    ax.errorbar(config.learning_rates, mean, yerr=se, marker="o", capsize=3, label=arm,
                color=report.ARM_COLORS[arm])
  ax.axhline(config.criterion.target_accuracy, color="k", linestyle=":", linewidth=0.8)
  ax.set(xscale="log", xlabel="learning rate", ylabel="final test accuracy", ylim=(0, 1),
         title="final test accuracy vs learning rate")
  ax.legend()
  ax = axes[0, 1]
  top = int(np.argmax(config.learning_rates))
  for arm in ARMS:
    steps, values = curves[arm]
    report.band(ax, steps, values[:, top], label=f"{arm}, lr {config.learning_rates[top]:g}",
                color=report.ARM_COLORS[arm])
  ax.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1), title="at the largest learning rate")
  ax.legend()
  return report.save(fig, run, "lr_sweep")
