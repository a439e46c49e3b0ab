"""The article's Keras model on a 5-feature binary task, with and without its BatchNormalization layer.

``Dense(16, relu) -> Dense(32, relu) -> BatchNormalization -> Dense(2)`` (`bnjax.models.keras_article_model`),
Keras's BatchNormalization defaults (momentum 0.99, epsilon 1e-3), on the raw features of the synthetic
``age_salary`` set, the article's own example of features on different scales. Each seed trains both
models from the same batch order; the comparison is paired by seed.
"""
from bnjax import models
from experiments import common
from experiments import report
from experiments.runner import Result, Table, Verdict

TITLE = "the article's Keras model, with and without its BN layer"
ARMS = {"none": False, "bn": True}


def describe_criterion(criterion) -> str:
  return (f"the paired {criterion.confidence:.0%} confidence interval of final test accuracy (with BN - "
          f"without), over seeds, lies above zero.")


def evaluate(metrics: dict, criterion) -> Verdict:
  ci = common.paired_ci(metrics["seed_test_accuracy"]["bn"], metrics["seed_test_accuracy"]["none"],
                        confidence=criterion.confidence)
  held = ci["low"] > 0
  return Verdict(held=bool(held), reason=(
      f"with BN - without = {100 * ci['mean']:+.2f} points, {criterion.confidence:.0%} CI "
      f"[{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}] over {ci['n']} seeds."))


def run(config, run) -> Result:
  dataset = common.load_data(config)
  metrics = {"seed_test_accuracy": {}, "final_test_accuracy": {}, "final_test_accuracy_se": {}}
  histories, finals = {}, []
  for arm, batch_norm in ARMS.items():
    model = models.keras_article_model(batch_norm=batch_norm, momentum=config.momentum,
                                       epsilon=config.epsilon)
    state, history = common.train_arm(run, arm, config, model, dataset)
    finals.append(state)
    histories[arm] = history
    final = history.final("test_accuracy")
    mean, se = common.mean_se(final)
    metrics["seed_test_accuracy"][arm] = final.tolist()
    metrics["final_test_accuracy"][arm], metrics["final_test_accuracy_se"][arm] = float(mean), float(se)
  diff = common.paired_ci(metrics["seed_test_accuracy"]["bn"], metrics["seed_test_accuracy"]["none"],
                          confidence=config.criterion.confidence)
  metrics["bn_minus_none"] = diff
  rows = [[arm, common.fmt_pm(metrics["final_test_accuracy"][arm], metrics["final_test_accuracy_se"][arm],
                              100.0),
           common.fmt_pm(*common.mean_se(histories[arm].final("val_accuracy")), 100.0)] for arm in ARMS]
  rows.append(["bn - none (paired)", f"{100 * diff['mean']:+.2f} [{100 * diff['low']:+.2f}, "
               f"{100 * diff['high']:+.2f}]", ""])
  table = Table(f"{config.dataset} raw features, {config.optimizer} lr {config.learning_rate:g}, batch "
                f"{config.batch_size}, {config.num_steps} steps, {config.num_seeds} seeds",
                ["model", "final test acc %", "final val acc %"], rows)
  fig, axes = report.figure(2)
  for arm, h in histories.items():
    report.band(axes[0, 0], h.steps, h.values["test_accuracy"], label=arm)
    report.band(axes[0, 1], h.steps, h.values["test_loss"], label=arm, logy=True)
  axes[0, 0].set(title="test accuracy", xlabel="step", ylim=(0.3, 1))
  axes[0, 1].set(title="test loss", xlabel="step")
  axes[0, 0].legend()
  plots = [report.save(fig, run, "keras_example")]
  return Result(metrics=metrics, tables=[table], plots=plots, state_digest=common.state_digest(*finals))
