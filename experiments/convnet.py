"""A small conv net on the 8x8 digits: BN vs none vs BN after the ReLU, and a train -> test shift.

Arms: ``none`` (conv -> relu), ``pre`` (conv -> BN -> relu, `bnjax.models.ConvNet`) and ``post`` (conv ->
relu -> BN). A conv layer's BN keeps one mean and variance per feature map, taken over N*H*W (the paper's
prescription for convolutions); the run checks it: each BN layer's statistics have one entry per channel
and equal the conv output's moments over the batch and both spatial axes.

The shift (the article's "dog colour"): every test image ``x`` becomes ``contrast * x + offset``. The BN
networks are evaluated on it with their training running statistics and with statistics re-estimated on
the shifted (unlabelled) test images by `bnjax.precise_batch_stats` (AdaBN).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen

import bnjax
from bnjax import models
from bnjax import nn as bn_nn
from experiments import common
from experiments import data as data_lib
from experiments import report
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "a small conv net on the 8x8 digits: BN vs none vs placement, and a test-time shift with AdaBN"
ARMS = ("none", "pre", "post")
BN_ARMS = ("pre", "post")
STATS_TOLERANCE = 1e-4


class PostNormConvNet(linen.Module):
  """`bnjax.models.ConvNet`'s blocks with BN after the ReLU: conv (with bias) -> relu -> BN."""

  channels: tuple
  num_classes: int
  stride: int = 2
  momentum: float = 0.99
  epsilon: float = 1e-5

  @linen.compact
  def __call__(self, x, *, train: bool):
    for i, width in enumerate(self.channels):
      x = linen.Conv(width, (3, 3), strides=1 if i == 0 else self.stride, padding="SAME", name=f"Conv_{i}")(x)
      x = linen.relu(x)
      x = bn_nn.BatchNorm(
        use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon, name=f"BatchNorm_{i}"
      )(x)
    return linen.Dense(self.num_classes, name="Dense_0")(jnp.mean(x, axis=(1, 2)))


def make_model(config, arm: str, num_classes: int):
  kwargs = dict(num_classes=num_classes, momentum=config.momentum, epsilon=config.epsilon)
  if arm == "post":
    return PostNormConvNet(channels=tuple(config.channels), **kwargs)
  return models.ConvNet(channels=tuple(config.channels), norm=arm == "pre", **kwargs)


def describe_criterion(criterion) -> str:
  return (
    f"BN (conv -> BN -> relu) minus no BN, final test accuracy, paired {criterion.confidence:.0%} interval "
    f"over seeds lies above {criterion.min_bn_gain_points:g} points; on the shifted test images, BN with "
    f"re-estimated statistics (AdaBN) minus BN with its running statistics lies above "
    f"{criterion.min_recovered_points:g} points; and every BN layer keeps one statistic per channel, equal "
    f"to the conv output's moments over N*H*W (within {STATS_TOLERANCE:g})."
  )


def evaluate(metrics: dict, criterion) -> Verdict:
  acc, shift, stats = metrics["test_accuracy"], metrics["shift"], metrics["stats"]
  gain = common.paired_test(acc["pre"], acc["none"], confidence=criterion.confidence)
  recovered = common.paired_test(shift["pre_adabn"], shift["pre_running"], confidence=criterion.confidence)
  gain_ok = 100 * gain["low"] > criterion.min_bn_gain_points
  recovered_ok = 100 * recovered["low"] > criterion.min_recovered_points
  stats_ok = bool(stats["per_channel"]) and max(stats["max_abs_diff"]) <= STATS_TOLERANCE
  held = gain_ok and recovered_ok and stats_ok
  reason = (
    f"BN - none: {common.fmt_ci(gain)} points ({'above' if gain_ok else 'not above'} "
    f"{criterion.min_bn_gain_points:g}); shifted test, AdaBN - running: {common.fmt_ci(recovered)} points "
    f"({'above' if recovered_ok else 'not above'} {criterion.min_recovered_points:g}); statistics per "
    f"channel: {'yes' if stats['per_channel'] else 'no'}, largest gap to the N*H*W moments "
    f"{max(stats['max_abs_diff']):.2g}."
  )
  return Verdict(held=bool(held), reason=reason)


def as_images(dataset):
  """Square grey images as NHWC: digits' 64 features as ``(N, 8, 8, 1)``, MNIST's 784 as ``(N, 28, 28, 1)``."""
  side = math.isqrt(dataset.train.x.shape[-1])
  image = lambda s: data_lib.Split(s.x.reshape(-1, side, side, 1), s.y)
  return dataset._replace(train=image(dataset.train), val=image(dataset.val), test=image(dataset.test))


def unstack(states, i: int):
  return jax.tree.map(lambda a: a[i], states)


def train_mode(model):
  """``apply_fn(variables, x) -> (logits, new batch_stats)`` in training mode, for `precise_batch_stats`."""

  def apply_fn(variables, x):
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return logits, updates["batch_stats"]

  return apply_fn


def adapted(model, state, x, batch_size: int) -> dict:
  """``state``'s variables with BN statistics re-estimated on the unlabelled inputs ``x`` (AdaBN)."""
  batches = [x[i : i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)]
  stats = bnjax.precise_batch_stats(train_mode(model), common.variables(state), batches)
  return {"params": state.params, "batch_stats": stats}


def accuracy(model, variables, x, y) -> float:
  return float(jnp.mean(jnp.argmax(model.apply(variables, x, train=False), -1) == y))


def check_stats(model, state, x) -> dict:
  """Per BN layer: its statistics' shape, and the largest gap to the conv output's moments over N*H*W."""
  variables = common.variables(state)
  _, sown = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True)
  stats = bnjax.precise_batch_stats(train_mode(model), variables, [x])
  shapes, gaps, per_channel = {}, [], True
  for i, width in enumerate(model.channels):
    out = sown["intermediates"][f"Conv_{i}"]["__call__"][0]
    if isinstance(model, PostNormConvNet):
      out = jax.nn.relu(out)
    layer = stats[f"BatchNorm_{i}"]
    shapes[f"BatchNorm_{i}"] = {k: list(v.shape) for k, v in layer.items()}
    per_channel &= all(v.shape == (width,) for v in layer.values())
    gaps += [
      float(jnp.max(jnp.abs(layer["mean"] - out.mean((0, 1, 2))))),
      float(jnp.max(jnp.abs(layer["var"] - out.var((0, 1, 2))))),
    ]
  return {"shapes": shapes, "per_channel": bool(per_channel), "max_abs_diff": gaps}


def run(config, run) -> Result:
  dataset = as_images(common.load_data(config))
  test = dataset.test
  shifted = np.asarray(config.shift_contrast * test.x + config.shift_offset, np.float32)
  probe_x = jnp.asarray(dataset.train.x[: config.batch_size])
  metrics = {"steps": None, "test_accuracy": {}, "test_curve": {}, "shift": {}, "stats": {}}
  finals, stats = [], []
  for arm in ARMS:
    model = make_model(config, arm, dataset.num_classes)
    state, history = common.train_arm(run, arm, config, model, dataset)
    finals.append(state)
    metrics["steps"] = history.steps.tolist()
    metrics["test_curve"][arm] = history.values["test_accuracy"].tolist()
    metrics["test_accuracy"][arm] = history.final("test_accuracy").tolist()
    seeds = range(config.num_seeds)
    running = [accuracy(model, common.variables(unstack(state, i)), shifted, test.y) for i in seeds]
    metrics["shift"][f"{arm}_running"] = running
    if arm in BN_ARMS:
      ada = [adapted(model, unstack(state, i), shifted, config.adapt_batch_size) for i in seeds]
      metrics["shift"][f"{arm}_adabn"] = [accuracy(model, v, shifted, test.y) for v in ada]
      stats.append(check_stats(model, unstack(state, 0), probe_x))
  metrics["stats"] = {
    "shapes": {arm: s["shapes"] for arm, s in zip(BN_ARMS, stats, strict=True)},
    "per_channel": all(s["per_channel"] for s in stats),
    "max_abs_diff": [g for s in stats for g in s["max_abs_diff"]],
  }
  table = _table(config, metrics)
  plots = [_plot(run, config, metrics)]
  return Result(metrics=metrics, tables=[table], plots=plots, state_digest=common.state_digest(*finals))


def _setup(config) -> str:
  return (
    f"8x8 digits, conv {'-'.join(map(str, config.channels))} (3x3, stride 2 after the first), "
    f"{config.optimizer} lr {config.learning_rate:g}, batch {config.batch_size}, {config.num_steps} steps, "
    f"{config.num_seeds} seeds; shift: {config.shift_contrast:g}*x + {config.shift_offset:g}"
  )


def _table(config, metrics) -> Table:
  rows = []
  for arm in ARMS:
    clean = common.mean_ci(metrics["test_accuracy"][arm])
    run_ci = common.mean_ci(metrics["shift"][f"{arm}_running"])
    ada = metrics["shift"].get(f"{arm}_adabn")
    rows.append(
      [
        arm,
        100 * clean["mean"],
        100 * run_ci["mean"],
        100 * common.mean_ci(ada)["mean"] if ada else None,
      ]
    )
  return Table(
    _setup(config),
    ["arm", "test acc % (clean)", "shifted test acc %, running stats", "shifted test acc %, AdaBN"],
    rows,
  )


def _plot(run, config, metrics) -> str:
  fig, axes = report.figure(3, title=f"conv net on {_setup(config)}", width=4.6)
  ax = axes[0, 0]
  legend = ""
  for arm in ARMS:
    label = {"none": "none", "pre": "pre (conv-BN-relu)", "post": "post (conv-relu-BN)"}[arm]
    legend = report.band(
      ax, metrics["steps"], 100 * np.asarray(metrics["test_curve"][arm]), label=label, color=report.ARM_COLORS[arm]
    )
  ax.set(xlabel="training step", ylabel="test accuracy (%)", title="clean test accuracy")
  ax.legend(title=legend, fontsize="small", title_fontsize="small")
  ax = axes[0, 1]
  conditions = [("clean", None), ("shifted, running stats", "running"), ("shifted, AdaBN", "adabn")]
  width = 0.8 / len(conditions)
  for j, (name, key) in enumerate(conditions):
    means, errs, xs = [], [], []
    for k, arm in enumerate(ARMS):
      values = metrics["test_accuracy"][arm] if key is None else metrics["shift"].get(f"{arm}_{key}")
      if values is None:
        continue
      ci = common.mean_ci(values)
      xs.append(k + (j - 1) * width)
      means.append(100 * ci["mean"])
      errs.append(100 * (ci["high"] - ci["mean"]) if len(values) > 1 else 0.0)
    color = {"clean": "tab:gray", "running": report.ARM_COLORS["running_biased"], "adabn": report.ARM_COLORS["adabn"]}
    ax.bar(xs, means, width, yerr=errs, capsize=3, label=name, color=color[key or "clean"], alpha=0.4 + 0.3 * j)
  ax.set_xticks(range(len(ARMS)), ARMS)
  ax.set(xlabel="arm", ylabel="test accuracy (%)", title="shift: which statistics (bars: 95% CI)")
  ax.legend(fontsize="small")
  acc, shift = metrics["test_accuracy"], metrics["shift"]
  pairs = [
    ("pre - none (clean)", acc["pre"], acc["none"]),
    ("post - pre (clean)", acc["post"], acc["pre"]),
    ("pre: AdaBN - running (shifted)", shift["pre_adabn"], shift["pre_running"]),
    ("post: AdaBN - running (shifted)", shift["post_adabn"], shift["post_running"]),
  ]
  cis = [common.paired_ci(a, b, confidence=config.criterion.confidence) for _, a, b in pairs]
  report.differences(
    axes[0, 2],
    [p[0] for p in pairs],
    cis,
    title=f"paired differences, {config.criterion.confidence:.0%} CI over seeds",
    xlabel="accuracy difference (points)",
  )
  axes[0, 2].legend(fontsize="small")
  return report.save(fig, run, "convnet")
