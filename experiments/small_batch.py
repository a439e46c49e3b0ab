"""Normalization at small batches: BN, ghost BN, batch renorm, LayerNorm, GroupNorm and none.

Batch norm's statistics come from the batch, so at batch sizes of 2-4 they are noisy and differ from the
running statistics used at inference; LayerNorm and GroupNorm normalize each example alone. Batch renorm
(Ioffe 2017) corrects the batch statistics toward the running ones, and is reported to recover most of
what BN loses when batches are not i.i.d. (few classes per batch). Every (arm, batch size) trains every
seed for the same number of steps at the learning rate of the config's scaling rule; the BN family's test
accuracy is measured in inference mode (running statistics) and in training mode (test batches of the
training batch size), and the non-i.i.d. arms train on batches drawn from ``classes_per_batch`` classes.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen

import bnjax
from bnjax import nn as bn_nn
from experiments import common
from experiments import report
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "Normalization at small batch sizes"
ARMS = ("none", "bn", "ghost_bn", "renorm", "layernorm", "groupnorm")
BN_FAMILY = ("bn", "ghost_bn", "renorm")
NON_IID_ARMS = ("bn", "ghost_bn", "renorm", "layernorm")
RULES = ("sqrt", "linear")


# ---------------------------------------------------------------------------------------------------------
# Model.


class BatchRenorm(linen.Module):
  """A linen layer on `bnjax.batch_renorm` (running statistics as `bnjax.nn.BatchNorm` keeps them)."""

  momentum: float = 0.99
  epsilon: float = 1e-5
  rmax: float = 3.0
  dmax: float = 5.0

  @linen.compact
  def __call__(self, x, *, train: bool):
    shape = (x.shape[-1],)
    mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, jnp.float32))
    var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, jnp.float32))
    scale = self.param("scale", linen.initializers.ones, shape)
    params = bnjax.BatchNormParams(scale=scale, bias=self.param("bias", linen.initializers.zeros, shape))
    stats = bnjax.BatchStats(mean=mean.value, var=var.value, count=None)
    y, new = bnjax.batch_renorm(
      x, params, stats, train=train, rmax=self.rmax, dmax=self.dmax, decay=self.momentum, epsilon=self.epsilon
    )
    if train and not self.is_initializing():
      mean.value, var.value = new.mean, new.var
    return y


class NormMLP(linen.Module):
  """Dense -> norm -> relu -> dropout per hidden layer, then a Dense output layer.

  The norm is chosen per call by ``kind``, an index into `norms` (a traced value, so models of every norm
  train together under one compiled, vmapped step); every norm's layer exists and only the chosen one's
  output is used. ``dropout`` is a traced rate (0: none).
  """

  hidden: tuple
  num_classes: int
  ghost_sizes: tuple = (4,)
  groups: int = 4
  momentum: float = 0.9
  rmax: float = 3.0
  dmax: float = 5.0

  @property
  def norms(self) -> tuple:
    return ("none", "bn", "renorm", "layernorm", "groupnorm", *(f"ghost_bn{g}" for g in self.ghost_sizes))

  def _norms(self, x, train: bool) -> list:
    bn = lambda ghost: bn_nn.BatchNorm(use_running_average=not train, momentum=self.momentum, virtual_batch_size=ghost)
    # A ghost batch as large as the batch is the batch: plain BN.
    ghosts = [bn(g if train and x.shape[0] > g else None)(x) for g in self.ghost_sizes]
    return [
      x,
      bn(None)(x),
      BatchRenorm(momentum=self.momentum, rmax=self.rmax, dmax=self.dmax)(x, train=train),
      linen.LayerNorm()(x),
      linen.GroupNorm(num_groups=self.groups)(x),
      *ghosts,
    ]

  @linen.compact
  def __call__(self, x, kind, dropout=0.0, *, train: bool):
    for width in self.hidden:
      x = linen.relu(jnp.stack(self._norms(linen.Dense(width)(x), train))[kind])
      if train:
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0.0)
    return linen.Dense(self.num_classes)(x)


def make_model(config, num_classes: int, ghost_sizes=None) -> NormMLP:
  return NormMLP(
    hidden=tuple(config.hidden),
    num_classes=num_classes,
    ghost_sizes=tuple(ghost_sizes or (config.ghost_size,)),
    groups=config.groups,
    momentum=config.momentum,
    rmax=config.rmax,
    dmax=config.dmax,
  )


# ---------------------------------------------------------------------------------------------------------
# Training: every model (arm x seed) vmapped, steps scanned, batches given as row indices.


class Models(NamedTuple):
  """Per model: its seed (init and dropout), norm index, learning rate, dropout rate; ``rows``: its batches."""

  seeds: list
  kinds: list
  lrs: list
  dropouts: list
  rows: list  # One (steps, batch) array each.


def add(models: Models, seeds, kind: int, lr: float, rows, dropout: float = 0.0) -> slice:
  """Appends one arm (a model per seed, ``rows`` ``(steps, seeds, batch)``); returns its slice of the models."""
  start = len(models.seeds)
  for i, s in enumerate(seeds):
    models.seeds.append(int(s))
    models.kinds.append(kind)
    models.lrs.append(float(lr))
    models.dropouts.append(float(dropout))
    models.rows.append(rows[:, i])
  return slice(start, len(models.seeds))


def init(model, x, seeds):
  """Stacked ``{"params", "batch_stats"}``, one per seed (the same seed: the same weights in every arm)."""
  make = jax.jit(lambda key: model.init({"params": key, "dropout": key}, x, 0, train=False))
  cache = {}
  for s in seeds:
    cache.setdefault(s, make(jax.random.key(s)))
  return jax.tree.map(lambda *v: jnp.stack(v), *[cache[s] for s in seeds])


def train(model, x, y, models: Models):
  """Trains every model (SGD, momentum 0.9, its own learning rate); returns the stacked final variables."""
  tx = optax.sgd(1.0, momentum=0.9)
  rows = jnp.asarray(np.stack(models.rows, axis=1))  # (steps, models, batch)
  variables = init(model, x[: rows.shape[-1]], models.seeds)
  per_model = (
    jnp.asarray(models.kinds),
    jnp.asarray(models.lrs, jnp.float32),
    jnp.asarray(models.dropouts, jnp.float32),
    jnp.stack([jax.random.key(s + 10_000) for s in models.seeds]),
  )

  def one(v, o, r, kind, lr, dropout, key):
    def loss_fn(params):
      logits, new = model.apply(
        {**v, "params": params}, x[r], kind, dropout, train=True, mutable=["batch_stats"], rngs={"dropout": key}
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y[r]).mean(), new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
    updates, o = tx.update(grads, o, v["params"])
    params = optax.apply_updates(v["params"], jax.tree.map(lambda u: lr * u, updates))
    return {"params": params, "batch_stats": new["batch_stats"]}, o, loss

  def fit(variables, rows, kinds, lrs, dropouts, keys):
    def step(carry, t):
      variables, opt = carry
      step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, t)
      variables, opt, loss = jax.vmap(one)(variables, opt, rows[t], kinds, lrs, dropouts, step_keys)
      return (variables, opt), loss

    opt = jax.vmap(tx.init)(variables["params"])
    (variables, _), losses = jax.lax.scan(step, (variables, opt), jnp.arange(rows.shape[0]))
    return variables, losses

  variables, losses = jax.jit(fit)(variables, rows, *per_model)
  return variables, np.asarray(losses)


def accuracy(model, variables, kinds, x, y, *, batch: int | None = None) -> np.ndarray:
  """Per-model accuracy in inference mode, or in training mode on consecutive batches of ``batch`` rows."""
  x, y = jnp.asarray(x), jnp.asarray(y)

  def one(v, kind):
    if batch is None:
      return jnp.mean(jnp.argmax(model.apply(v, x, kind, train=False), -1) == y)
    n = x.shape[0] // batch * batch
    xb, yb = x[:n].reshape(-1, batch, x.shape[-1]), y[:n].reshape(-1, batch)
    apply = lambda b: model.apply(v, b, kind, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    logits = jax.vmap(lambda b: apply(b)[0])(xb)
    return jnp.mean(jnp.argmax(logits, -1) == yb)

  return np.asarray(jax.jit(jax.vmap(one))(variables, jnp.asarray(kinds)))


def iid_rows(num_rows: int, batch: int, steps: int, seeds) -> np.ndarray:
  """Uniform batches without replacement inside each batch: ``(steps, models, batch)``."""
  out = np.empty((steps, len(seeds), batch), np.int32)
  for i, s in enumerate(seeds):
    rng = np.random.default_rng(int(s))
    for t in range(steps):
      out[t, i] = rng.choice(num_rows, batch, replace=False)
  return out


def non_iid_rows(labels, batch: int, steps: int, seeds, classes: int) -> np.ndarray:
  """Batches of ``classes`` random classes each (rows split evenly between them): ``(steps, models, batch)``."""
  labels = np.asarray(labels)
  by_class = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
  out = np.empty((steps, len(seeds), batch), np.int32)
  for i, s in enumerate(seeds):
    rng = np.random.default_rng(int(s) + 1)
    for t in range(steps):
      picked = rng.choice(len(by_class), classes, replace=False)
      counts = np.diff(np.linspace(0, batch, classes + 1).round().astype(int))
      out[t, i] = np.concatenate([rng.choice(by_class[c], n, replace=False) for c, n in zip(picked, counts)])
  return out


def scaled_lr(config, batch: int, rule: str) -> float:
  ratio = batch / config.base_batch_size
  return config.base_learning_rate * (ratio if rule == "linear" else math.sqrt(ratio))


# ---------------------------------------------------------------------------------------------------------
# The criterion.


def describe_criterion(criterion) -> str:
  return (
    f"holds if (1) at batch sizes {list(criterion.small_batches)}, pooled over them and the seeds, BN's test "
    f"accuracy is below both LayerNorm's and GroupNorm's by more than {criterion.min_bn_deficit_points} points "
    f"(mean) with the paired {criterion.confidence:.0%} CI above zero; (2) at batch {criterion.non_iid_batch} "
    f"with non-i.i.d. batches, BN loses accuracy against its i.i.d. run (CI above zero) and batch renorm "
    f"recovers at least {criterion.min_renorm_recovery:.0%} of that loss (mean over seeds); (3) the sqrt "
    f"learning-rate rule beats the linear one, pooled over BN and none at every batch size but the base "
    f"(paired CI above zero)."
  )


def _pair(metrics, a, b, batches):
  acc = metrics["test_accuracy"]
  pick = lambda arm: [x for bs in batches for x in acc[arm][str(bs)]]
  return pick(a), pick(b)


def evaluate(metrics: dict, criterion) -> Verdict:
  conf = criterion.confidence
  small = list(criterion.small_batches)
  parts, held = [], []
  for other in ("layernorm", "groupnorm"):
    ci = common.paired_ci(*_pair(metrics, other, "bn", small), confidence=conf)
    ok = ci["low"] > 0 and 100 * ci["mean"] > criterion.min_bn_deficit_points
    held.append(ok)
    parts.append(f"{other} - bn at {small}: {common.fmt_ci(ci)} points ({'held' if ok else 'not held'})")
  b = str(criterion.non_iid_batch)
  iid, non = metrics["test_accuracy"]["bn"][b], metrics["non_iid_accuracy"]["bn"][b]
  loss = common.paired_ci(iid, non, confidence=conf)
  renorm = np.mean(metrics["non_iid_accuracy"]["renorm"][b])
  recovered = (renorm - np.mean(non)) / loss["mean"] if loss["mean"] > 0 else float("nan")
  ok = loss["low"] > 0 and recovered >= criterion.min_renorm_recovery
  held.append(bool(ok))
  parts.append(
    f"BN's non-i.i.d. loss at batch {b}: {common.fmt_ci(loss)} points, renorm recovers "
    f"{100 * recovered:.0f}% ({'held' if ok else 'not held'})"
  )
  rule = metrics["rule_test_accuracy"]
  sqrt = [x for arm in rule["sqrt"] for bs in rule["sqrt"][arm] for x in rule["sqrt"][arm][bs]]
  linear = [x for arm in rule["linear"] for bs in rule["linear"][arm] for x in rule["linear"][arm][bs]]
  ci = common.paired_ci(sqrt, linear, confidence=conf)
  held.append(bool(ci["low"] > 0))
  parts.append(f"sqrt - linear rule: {common.fmt_ci(ci)} points ({'held' if ci['low'] > 0 else 'not held'})")
  return Verdict(held=all(held), reason="; ".join(parts) + ".")


# ---------------------------------------------------------------------------------------------------------
# The run.


def run(config, run) -> Result:
  seeds = common.seeds_of(config)
  data = common.load_data(config)
  x, y = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
  n = data.train.y.shape[0]
  acc = {arm: {} for arm in ARMS}
  train_mode = {arm: {} for arm in BN_FAMILY}
  non_iid = {arm: {} for arm in NON_IID_ARMS}
  rule_acc = {r: {a: {} for a in config.rule_arms} for r in RULES}
  other = next(r for r in RULES if r != config.lr_rule)
  model = make_model(config, data.num_classes)
  kind = lambda arm: model.norms.index(f"ghost_bn{config.ghost_size}" if arm == "ghost_bn" else arm)
  finals = []
  for batch in config.batch_sizes:
    b = str(batch)
    models = Models([], [], [], [], [])
    rows = iid_rows(n, batch, config.num_steps, seeds)
    lr = scaled_lr(config, batch, config.lr_rule)
    arms = {arm: add(models, seeds, kind(arm), lr, rows) for arm in ARMS}
    if batch != config.base_batch_size:
      lr_other = scaled_lr(config, batch, other)
      arms.update({f"{arm}_{other}": add(models, seeds, kind(arm), lr_other, rows) for arm in config.rule_arms})
    if batch in config.non_iid_batches:
      skewed = non_iid_rows(data.train.y, batch, config.num_steps, seeds, config.classes_per_batch)
      arms.update({f"{arm}_non_iid": add(models, seeds, kind(arm), lr, skewed) for arm in NON_IID_ARMS})
    variables, losses = train(model, x, y, models)
    finals.append(variables)
    test = accuracy(model, variables, models.kinds, data.test.x, data.test.y)
    in_train_mode = accuracy(model, variables, models.kinds, data.test.x, data.test.y, batch=batch)
    tail = losses[-max(1, config.num_steps // 10) :].mean(0)
    for name, part in arms.items():
      run.log(
        arm=f"{name}_b{batch}",
        step=config.num_steps,
        batch_size=batch,
        learning_rate=models.lrs[part.start],
        test_accuracy=test[part],
        train_mode_test_accuracy=in_train_mode[part],
        train_loss=tail[part],
      )
    for arm in ARMS:
      acc[arm][b] = test[arms[arm]].tolist()
    for arm in BN_FAMILY:
      train_mode[arm][b] = in_train_mode[arms[arm]].tolist()
    for arm in config.rule_arms:
      rule_acc[config.lr_rule][arm][b] = acc[arm][b]
      if batch != config.base_batch_size:
        rule_acc[other][arm][b] = test[arms[f"{arm}_{other}"]].tolist()
      else:
        del rule_acc[config.lr_rule][arm][b]
    for arm in NON_IID_ARMS if batch in config.non_iid_batches else ():
      non_iid[arm][b] = test[arms[f"{arm}_non_iid"]].tolist()
  gap = {
    arm: {b: (np.array(train_mode[arm][b]) - np.array(acc[arm][b])).tolist() for b in train_mode[arm]}
    for arm in BN_FAMILY
  }
  metrics = {
    "test_accuracy": acc,
    "train_mode_test_accuracy": train_mode,
    "train_minus_eval_mode": gap,
    "non_iid_accuracy": non_iid,
    "rule_test_accuracy": rule_acc,
  }
  return Result(
    metrics=metrics,
    tables=_tables(config, metrics),
    plots=[_plot(run, config, metrics)],
    state_digest=common.state_digest(*finals),
    notes=(
      f"Learning rate: {config.lr_rule} rule, {config.base_learning_rate:g} x ({config.lr_rule} of batch / "
      f"{config.base_batch_size}), SGD momentum 0.9, {config.num_steps} steps at every batch size (fewer "
      f"examples seen at small batches). Ghost BN normalizes groups of {config.ghost_size} rows (plain BN at "
      f"batches of {config.ghost_size} or fewer); GroupNorm {config.groups} groups; renorm rmax "
      f"{config.rmax:g}, dmax {config.dmax:g} from the first step. Non-i.i.d. batches: "
      f"{config.classes_per_batch} classes each."
    ),
  )


def _tables(config, metrics) -> list:
  conf = config.criterion.confidence
  batches = [str(b) for b in config.batch_sizes]
  acc = Table(
    f"test accuracy % (inference mode), mean [{conf:.0%} CI] over {config.num_seeds} seeds; MLP "
    f"{tuple(config.hidden)}, {config.num_steps} steps, {config.lr_rule} lr rule",
    ["batch", *ARMS],
    [[b, *(common.fmt_mean_ci(metrics["test_accuracy"][a][b], conf) for a in ARMS)] for b in batches],
  )
  gap = Table(
    f"training-mode minus inference-mode test accuracy, points, mean [{conf:.0%} CI]",
    ["batch", *BN_FAMILY],
    [[b, *(common.fmt_mean_ci(metrics["train_minus_eval_mode"][a][b], conf) for a in BN_FAMILY)] for b in batches],
  )
  non = Table(
    f"non-i.i.d. batches ({config.classes_per_batch} classes each): test accuracy %, mean [{conf:.0%} CI]",
    ["batch", *(f"{a} (i.i.d.)" for a in NON_IID_ARMS), *(f"{a} (non-i.i.d.)" for a in NON_IID_ARMS)],
    [
      [
        str(b),
        *(common.fmt_mean_ci(metrics["test_accuracy"][a][str(b)], conf) for a in NON_IID_ARMS),
        *(common.fmt_mean_ci(metrics["non_iid_accuracy"][a][str(b)], conf) for a in NON_IID_ARMS),
      ]
      for b in config.non_iid_batches
    ],
  )
  rule = metrics["rule_test_accuracy"]
  rules = Table(
    f"learning-rate rule: test accuracy %, mean [{conf:.0%} CI]",
    ["batch", *(f"{a} {r}" for a in config.rule_arms for r in RULES)],
    [
      [b, *(common.fmt_mean_ci(rule[r][a][b], conf) for a in config.rule_arms for r in RULES)]
      for b in batches
      if b in rule[RULES[0]][config.rule_arms[0]]
    ],
  )
  return [acc, gap, non, rules]


def _plot(run, config, metrics) -> str:
  title = (
    f"Small batches: digits, MLP {tuple(config.hidden)}, SGD momentum, {config.num_steps} steps, "
    f"lr {config.base_learning_rate:g} x {config.lr_rule}(batch/{config.base_batch_size}), {config.num_seeds} seeds"
  )
  fig, axes = report.figure(3, width=4.4, height=3.4, title=title)
  batches = list(config.batch_sizes)
  steps = np.asarray(batches)[:, None]

  def curve(ax, table, arm, **kwargs):
    values = np.array([[100 * v for v in table[arm][str(b)]] for b in batches])
    return report.band(ax, steps[:, 0], values, label=arm, color=report.ARM_COLORS[arm], **kwargs)

  ax = axes[0, 0]
  for arm in ARMS:
    legend = curve(ax, metrics["test_accuracy"], arm)
  ax.set(xscale="log", xlabel="batch size (rows, log scale)", ylabel="test accuracy (%)", title="inference mode")
  ax.set_xticks(batches, [str(b) for b in batches], minor=False)
  ax.xaxis.set_minor_formatter("")
  ax.legend(fontsize="x-small", title=legend, title_fontsize="x-small")
  ax = axes[0, 1]
  for arm in BN_FAMILY:
    legend = curve(ax, metrics["train_minus_eval_mode"], arm)
  ax.axhline(0, color="k", linewidth=0.8, linestyle="--")
  ax.set(
    xscale="log",
    xlabel="batch size (rows, log scale)",
    ylabel="train-mode - eval-mode accuracy (points)",
    title="batch vs running statistics on test",
  )
  ax.set_xticks(batches, [str(b) for b in batches], minor=False)
  ax.xaxis.set_minor_formatter("")
  ax.legend(fontsize="x-small", title=legend, title_fontsize="x-small")
  ax = axes[0, 2]
  labels, cis, colors = [], [], []
  for b in config.non_iid_batches:
    for arm in NON_IID_ARMS:
      iid, non = metrics["test_accuracy"][arm][str(b)], metrics["non_iid_accuracy"][arm][str(b)]
      labels.append(f"{arm}, batch {b}")
      cis.append(common.paired_ci(non, iid, confidence=config.criterion.confidence))
      colors.append(report.ARM_COLORS[arm])
  report.differences(
    ax,
    labels,
    cis,
    title=f"non-i.i.d. batches ({config.classes_per_batch} classes each)",
    xlabel="non-i.i.d. - i.i.d. test accuracy (points)",
  )
  for y, (ci, c) in enumerate(zip(cis[::-1], colors[::-1])):
    ax.plot(100 * ci["mean"], y, "o", color=c, markersize=8, zorder=3)
  ax.legend(fontsize="x-small", title=f"paired {config.criterion.confidence:.0%} CI", title_fontsize="x-small")
  return report.save(fig, run, "small_batch")
