"""Shared pieces of the experiments: data, models, optimizers, the many-seed training engine, statistics.

The engine trains many models of one architecture at once: their `TrainState`s are stacked on a leading
axis and one pure training step (`bnjax.training.make_train_step(..., jit=False)`) is `jax.vmap`-ed over
it, and `jax.lax.scan` runs `eval_every` steps per compiled call. Seeds (and, through
`optax.inject_hyperparams`, learning rates) differ between the stacked models; the batch order of model
``i`` is `experiments.data.batch_at(train, batch_size, step, seed=seeds[i])`, the same order the single-run
`train` experiment uses, and the same seed gives the same order in every arm (paired comparisons).
"""

import contextlib
import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen

from bnjax import models
from bnjax import nn as bn_nn
from bnjax import training
from experiments import data as data_lib

ACTIVATIONS = {"relu": linen.relu, "sigmoid": linen.sigmoid, "tanh": jnp.tanh}


# ---------------------------------------------------------------------------------------------------------
# Data, models, optimizers.


def load_data(config, *, dataset: str | None = None, standardize: bool | None = None, seed: int | None = None):
  """The config's dataset (split with ``config.seed`` or ``seed``), optionally another one or standardized."""
  return data_lib.load_dataset(
    dataset or config.dataset,
    data_dir=config.data_dir or None,
    seed=config.seed if seed is None else seed,
    standardize=config.standardize if standardize is None else standardize,
  )


def load_replicates(config, seeds: Sequence[int], *, dataset: str | None = None, standardize: bool | None = None):
  """With ``config.split_per_seed``: model ``i``'s split drawn with ``seeds[i]``, stacked on a leading axis.

  Each split's ``x`` is ``(M, N, ...)`` and ``y`` ``(M, N)`` (split sizes depend on the row count only), so
  intervals over seeds include test-set variance; ``age_salary`` also redraws its rows. Without the switch:
  `load_data`, one split for every model.
  """
  if not config.get("split_per_seed", False):
    return load_data(config, dataset=dataset, standardize=standardize)
  drawn = {s: load_data(config, dataset=dataset, standardize=standardize, seed=s) for s in sorted(set(seeds))}
  stack = lambda name: data_lib.Split(
    np.stack([getattr(drawn[s], name).x for s in seeds]), np.stack([getattr(drawn[s], name).y for s in seeds])
  )
  return drawn[seeds[0]]._replace(train=stack("train"), val=stack("val"), test=stack("test"))


def kernel_init(init_stddev: float):
  """``N(0, init_stddev^2)`` kernels, or the layer default (LeCun normal) when ``init_stddev == 0``."""
  if init_stddev > 0:
    return linen.initializers.normal(stddev=init_stddev)
  return linen.linear.default_kernel_init


def make_mlp(
  config,
  num_classes: int,
  *,
  norm: str | None = None,
  activation: str | None = None,
  hidden: Sequence[int] | None = None,
  **kwargs,
) -> models.MLP:
  """The config's MLP; ``norm`` is ``"none"``, ``"pre"`` or ``"post"`` (default: ``config.norm``)."""
  norm = config.norm if norm is None else norm
  return models.MLP(
    features=(*(config.hidden if hidden is None else hidden), num_classes),
    activation=ACTIVATIONS[activation or config.activation],
    norm=None if norm == "none" else norm,
    momentum=config.momentum,
    epsilon=config.epsilon,
    kernel_init=kernel_init(config.init_stddev),
    **kwargs,
  )


class InputNormMLP(linen.Module):
  """A `bnjax.nn.BatchNorm` on the raw inputs, then ``mlp`` (the article's "normalize the input layer")."""

  mlp: models.MLP
  momentum: float = 0.99
  epsilon: float = 1e-5

  @linen.compact
  def __call__(self, x, *, train: bool):
    x = bn_nn.BatchNorm(
      use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon, name="BatchNorm_input"
    )(x)
    return self.mlp(x, train=train)


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """SGD, SGD with Nesterov-free momentum 0.9, or Adam; the learning rate lives in the optimizer state.

  `optax.inject_hyperparams` keeps ``learning_rate`` in ``opt_state.hyperparams``, so stacked states can
  train at different learning rates under one compiled, vmapped step.
  """
  factories = {
    "sgd": optax.sgd,
    "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    "adam": optax.adam,
  }
  return optax.inject_hyperparams(factories[name])(learning_rate=learning_rate)


def set_learning_rates(state, learning_rates):
  """``state`` (stacked) with per-model learning rates ``learning_rates`` (shape ``(M,)``)."""
  opt_state = state.opt_state
  hyperparams = dict(opt_state.hyperparams)
  hyperparams["learning_rate"] = jnp.asarray(learning_rates, jnp.float32)
  return state._replace(opt_state=opt_state._replace(hyperparams=hyperparams))


# ---------------------------------------------------------------------------------------------------------
# Evaluation.


def variables(state) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def make_eval_fn(model) -> Callable:
  """``eval_fn(state, x, y) -> {"loss", "accuracy"}`` in inference mode (running statistics)."""

  def eval_fn(state, x, y):
    logits = model.apply(variables(state), x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
    return {"loss": loss, "accuracy": accuracy}

  return eval_fn


def preactivations(model, state, x, *, train: bool = False) -> dict[int, jax.Array]:
  """The inputs of each hidden activation (the MLP's sown ``preact_i``), keyed by layer index."""
  mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
  _, updates = model.apply(variables(state), x, train=train, mutable=mutable)
  sown = updates["intermediates"]
  return {int(k.rsplit("_", 1)[1]): v[0] for k, v in sown.items() if k.startswith("preact_")}


# ---------------------------------------------------------------------------------------------------------
# The many-seed engine.


@dataclasses.dataclass
class History:
  """What the engine recorded at each evaluation: ``values[key]`` has shape ``(num_evals, M, ...)``.

  ``diverged_at[i]`` is the step at which model ``i``'s training loss (or its state) became non-finite,
  None if it never did.
  """

  steps: np.ndarray
  values: dict[str, np.ndarray]
  diverged_at: list = dataclasses.field(default_factory=list)

  def final(self, key: str) -> np.ndarray:
    return self.values[key][-1]


def batch_rows(num_rows: int, batch_size: int, seed: int, start: int, num_steps: int) -> np.ndarray:
  """Row indices of the batches of steps ``start .. start+num_steps-1``: ``(num_steps, batch_size)``.

  The same rows `experiments.data.batch_at` picks (it is asked for the batches of a split whose features are
  the row numbers), so every run of a seed sees the same data order.
  """
  index_split = data_lib.Split(np.arange(num_rows, dtype=np.int32), np.zeros(num_rows, np.int32))
  batches = data_lib.iterate_batches(index_split, batch_size, seed=seed, start_step=start, num_steps=num_steps)
  return np.stack([rows for rows, _ in batches])


def _boundaries(num_steps: int, eval_every: int, checkpoint_every: int) -> list:
  points = set(record_steps(num_steps, eval_every))
  if checkpoint_every:
    points |= set(range(checkpoint_every, num_steps + 1, checkpoint_every))
  return sorted(points - {0})


def record_steps(num_steps: int, eval_every: int) -> list:
  """The steps with a metrics row: 0, every ``eval_every``-th step and ``num_steps``."""
  return sorted({0, num_steps, *range(eval_every, num_steps + 1, eval_every)})


def covered_through(logged, schedule: Sequence[int]) -> int:
  """The last step up to which every step of ``schedule`` is in ``logged`` (-1: not even step 0).

  Args:
    logged: the steps that have a metrics row.
    schedule: the steps that should have one, ascending (`record_steps`).

  Returns:
    The step before the first missing one, or the last of ``schedule`` when none is missing.
  """
  logged = set(logged)
  for step in schedule:
    if step not in logged:
      return step - 1
  return schedule[-1] if schedule else -1


def resume_state(run, ckpt_dir, target, *, label: str, rows: Sequence[dict], schedule: Sequence[int]):
  """On ``--resume``: the newest intact checkpoint of ``ckpt_dir`` that the metrics ``rows`` cover.

  Newer checkpoints (corrupt, unsealed, or past the metrics) are moved aside by
  `experiments.checkpoint.resume`; each is named in a note, and so is the step the run continues from.

  Args:
    run: the `experiments.runner.Run`.
    ckpt_dir: the checkpoint folder.
    target: a state of the saved structure (returned as it is when nothing is restored).
    label: the arm named in the notes ("" for a single run).
    rows: this arm's metrics rows so far.
    schedule: the steps that have a metrics row (`record_steps`).

  Returns:
    ``(state, step, extra)``; ``(target, 0, {})`` when no checkpoint can be continued from.
  """
  from experiments import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top

  prefix = f"{label}: " if label else ""
  covered = covered_through({r.get("step") for r in rows}, schedule)
  found = checkpoint_lib.resume(ckpt_dir, target, max_step=covered)
  for step, reason in found.skipped:
    if step > covered:
      reason = f"metrics.jsonl has rows only up to step {covered}" if covered >= 0 else "metrics.jsonl has no rows"
    run.note(f"{prefix}skipped checkpoint step {step}: {reason}; moved it aside")
  if found.step is None:
    run.note(f"{prefix}no checkpoint to continue from; starting from step 0")
    return target, 0, {}
  run.note(f"{prefix}resuming from checkpoint step {found.step}")
  return found.state, found.step, found.extra


def all_finite(tree) -> bool:
  """Whether every float leaf of ``tree`` is finite (one host transfer of a bool per leaf)."""
  return all(
    bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)
  )


def finite_models(states) -> jax.Array:
  """Per stacked model (leading axis): whether every float leaf of its params, batch_stats and optimizer
  state is finite; shape ``(M,)``."""
  leaves = [
    leaf
    for leaf in jax.tree.leaves((states.params, states.batch_stats, states.opt_state))
    if jnp.issubdtype(leaf.dtype, jnp.inexact)
  ]
  num_models = jax.tree.leaves(states.params)[0].shape[0]
  return functools.reduce(
    jnp.logical_and, [jnp.isfinite(leaf).reshape(num_models, -1).all(1) for leaf in leaves], jnp.ones(num_models, bool)
  )


def init_states(model, tx, sample_x, seeds: Sequence[int], learning_rates=None):
  """Stacked `TrainState`s, one per seed (``jax.random.key(seed)`` initializes it)."""
  # One jitted init called per seed, then stacked: XLA compiles the random initializers far faster
  # unbatched than under vmap, and the values are the same.
  create = jax.jit(lambda key: training.create_train_state(model, tx, sample_x, rng=key))
  states = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[create(jax.random.key(int(s))) for s in seeds])
  if learning_rates is not None:
    states = set_learning_rates(states, learning_rates)
  return states


def train_models(
  run,
  arm: str,
  model,
  tx,
  dataset,
  *,
  seeds: Sequence[int],
  num_steps: int,
  batch_size: int,
  eval_every: int,
  checkpoint_every: int = 0,
  learning_rates=None,
  probe: Callable | None = None,
  eval_splits=("val", "test"),
  num_devices: int = 1,
):
  """Trains ``len(seeds)`` models of ``model`` at once; returns ``(final stacked state, History)``.

  Args:
    run: the `experiments.runner.Run` (metrics rows, progress bar, checkpoints, resume).
    arm: the name of this group of models in ``metrics.jsonl`` and the checkpoint folder.
    model, tx: the flax module and the optax optimizer (`make_optimizer`).
    dataset: an `experiments.data.Dataset`.
    seeds: one init / batch-order seed per model.
    learning_rates: optional per-model learning rates (``tx`` must come from `make_optimizer`).
    probe: optional ``probe(state) -> dict of arrays`` for one model, run (vmapped) at each evaluation.
    eval_splits: the splits whose loss and accuracy are recorded at each evaluation.
    num_devices: the stacked models are split over this many devices (``len(seeds)`` must divide).

  At step 0 and every ``eval_every`` steps it records ``{split}_loss`` and ``{split}_accuracy`` per
  model, ``train_loss`` (the mean over the steps since the last record) and the probe's outputs. With
  ``checkpoint_every > 0`` the stacked state is saved under ``<run>/checkpoints/<arm>`` (whose writer lock
  it holds throughout), and a resumed run restarts from the newest intact checkpoint its metrics cover.

  Divergence: a model whose training loss (or state) becomes non-finite is recorded as diverged at that
  step (``History.diverged_at``, the rows' ``diverged_at``, ``run.record_divergence``) and the others carry
  on. Once every model has diverged the arm stops: no further steps, no further checkpoints (the last good
  one stays), and its remaining rows repeat the last evaluation with a NaN training loss.
  """
  seeds = [int(s) for s in seeds]
  num_models = len(seeds)
  train = dataset.train
  stacked = train.y.ndim == 2  # One split per model (`load_replicates`).
  num_rows = train.y.shape[-1]
  train_x, train_y = jnp.asarray(train.x), jnp.asarray(train.y)
  splits = {name: getattr(dataset, name) for name in eval_splits}
  splits = {k: (jnp.asarray(s.x), jnp.asarray(s.y)) for k, s in splits.items() if s.y.shape[-1]}
  states = init_states(model, tx, (train_x[0] if stacked else train_x)[:batch_size], seeds, learning_rates)
  sharding = None
  if num_devices > 1:
    if num_models % num_devices:
      raise ValueError(
        f"num_devices: got {num_devices}, which does not divide the {num_models} models "
        f"of arm {arm!r}; expected a divisor"
      )
    mesh = jax.make_mesh((num_devices,), ("models",), devices=jax.devices()[:num_devices])
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("models"))
    states = jax.device_put(states, sharding)

  step_fn = training.make_train_step(model, tx, jit=False)
  eval_fn = make_eval_fn(model)

  def run_chunk(states, x, y, rows):  # rows: (steps, models, batch)
    def body(states, rows_t):
      batch = jax.vmap(lambda xs, ys, r: (xs[r], ys[r]))(x, y, rows_t) if stacked else (x[rows_t], y[rows_t])
      states, metrics = jax.vmap(step_fn)(states, batch)
      return states, metrics["loss"]

    states, losses = jax.lax.scan(body, states, rows)
    bad = ~jnp.isfinite(losses)
    first_bad = jnp.where(bad.any(0), jnp.argmax(bad, 0), -1)  # Per model: the chunk's first non-finite step.
    return states, losses.mean(0), first_bad, finite_models(states)

  def evaluate(states, split_arrays):
    out = {}
    for name, (x, y) in split_arrays.items():
      metrics = jax.vmap(eval_fn, in_axes=(0, 0, 0) if stacked else (0, None, None))(states, x, y)
      out[f"{name}_loss"], out[f"{name}_accuracy"] = metrics["loss"], metrics["accuracy"]
    if probe is not None:
      out.update(jax.vmap(probe)(states))
    return out

  run_chunk = jax.jit(run_chunk, donate_argnums=0)
  evaluate = jax.jit(evaluate)

  ckpt_dir = run.path("checkpoints") / arm if checkpoint_every else None
  schedule = record_steps(num_steps, eval_every)
  from experiments import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top

  with checkpoint_lib.writer(ckpt_dir) if ckpt_dir is not None else contextlib.nullcontext():
    start, extra = 0, {}
    if run.resume and ckpt_dir is not None:
      rows = [r for r in run.read_metrics() if r.get("arm") == arm]
      states, start, extra = resume_state(run, ckpt_dir, states, label=arm, rows=rows, schedule=schedule)
    elif run.resume:
      run.note(f"{arm}: no checkpoints (checkpoint_every=0); starting from step 0")
    diverged_at = list(extra.get("diverged_at") or [None] * num_models)
    if start:
      records = [r for r in run.read_metrics() if r.get("arm") == arm and r["step"] <= start]
      run.rewrite_metrics(lambda r: r.get("arm") != arm or r["step"] <= start)
    else:
      run.rewrite_metrics(lambda r: r.get("arm") != arm)
      records = [_record(run, arm, 0, jax.device_get(evaluate(states, splits)), None, diverged_at)]

    def describe(members):
      rates = "" if learning_rates is None else sorted({float(learning_rates[i]) for i in members})
      lrs = f", learning rate(s) {rates}" if rates else ""
      return f"model(s) {members} (seed(s) {sorted({seeds[i] for i in members})}{lrs})"

    with run.progress(num_steps, desc=arm) as bar:
      bar.update(start)
      last = start
      for end in (b for b in _boundaries(num_steps, eval_every, checkpoint_every) if b > start):
        rows = np.stack([batch_rows(num_rows, batch_size, s, last, end - last) for s in seeds], axis=1)
        states, train_loss, first_bad, finite = run_chunk(states, train_x, train_y, jnp.asarray(rows))
        new = _newly_diverged(diverged_at, jax.device_get(first_bad), jax.device_get(finite), last, end)
        if new:
          run.note(
            f"{arm}: {describe(new)} diverged at step {min(diverged_at[i] for i in new)}"
            + ("; the others carry on" if None in diverged_at else "")
          )
        if None not in diverged_at:
          values = jax.device_get(evaluate(states, splits))
          nan_loss = np.full(num_models, np.nan, np.float32)
          for step in (s for s in schedule if s >= end):
            records.append(
              _record(run, arm, step, values, jax.device_get(train_loss) if step == end else nan_loss, diverged_at)
            )
          kept = checkpoint_lib.latest_step(ckpt_dir) if ckpt_dir is not None else None
          run.note(
            f"{arm}: every model diverged; stopped at step {end}"
            + (f", last good checkpoint: step {kept}" if kept is not None else "")
          )
          bar.update(num_steps - last)
          break
        if end % eval_every == 0 or end == num_steps:
          records.append(
            _record(run, arm, end, jax.device_get(evaluate(states, splits)), jax.device_get(train_loss), diverged_at)
          )
        if ckpt_dir is not None and (end % checkpoint_every == 0 or end == num_steps):
          checkpoint_lib.save(ckpt_dir, jax.device_get(states), step=end, keep=2, extra={"diverged_at": diverged_at})
        bar.update(end - last)
        last = end
  gone = [i for i, s in enumerate(diverged_at) if s is not None]
  run.record_divergence(arm, diverged_at, detail=describe(gone) if gone else "")
  return states, _history(records, diverged_at)


def _newly_diverged(diverged_at: list, first_bad, finite, last: int, end: int) -> list:
  """Marks, in ``diverged_at``, the models that diverged in the chunk ``last+1 .. end``; returns them."""
  new = []
  for i, step in enumerate(diverged_at):
    if step is None and (first_bad[i] >= 0 or not finite[i]):
      diverged_at[i] = last + int(first_bad[i]) + 1 if first_bad[i] >= 0 else end
      new.append(i)
  return new


def _record(run, arm, step, values, train_loss, diverged_at=None):
  row = {"arm": arm, "step": int(step)}
  row.update({k: np.asarray(v).tolist() for k, v in values.items()})
  if train_loss is not None:
    row["train_loss"] = np.asarray(train_loss).tolist()
  if diverged_at is not None and any(s is not None for s in diverged_at):
    row["diverged_at"] = list(diverged_at)
  run.log(**row)
  return row


def _history(records, diverged_at=()) -> History:
  records = sorted(records, key=lambda r: r["step"])
  keys = [k for k in records[-1] if k not in ("arm", "step", "diverged_at")]
  values = {}
  for key in keys:
    rows = [r.get(key) for r in records]
    fill = next(np.asarray(v, np.float64) for v in rows if v is not None)
    values[key] = np.stack([np.asarray(v, np.float64) if v is not None else np.full_like(fill, np.nan) for v in rows])
  return History(steps=np.asarray([r["step"] for r in records]), values=values, diverged_at=list(diverged_at))


# ---------------------------------------------------------------------------------------------------------
# Digests and statistics.


def state_digest(*states) -> str:
  """sha256 over the dtype, shape and bytes of every leaf of ``states`` (in pytree order)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(states)):
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    array = np.asarray(leaf)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def mean_se(values) -> tuple:
  """Mean and standard error (sample std / sqrt(n)) over the first axis; SE is 0 for one value."""
  values = np.asarray(values, np.float64)
  n = values.shape[0]
  mean = values.mean(0)
  se = values.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(mean)
  return mean, se


def paired_ci(a, b, *, confidence: float = 0.95) -> dict:
  """The mean of ``a - b`` over paired samples and its Student-t confidence interval.

  ``mean +- t_{(1+confidence)/2, n-1} * sd(a - b) / sqrt(n)``. Reference: any statistics text, e.g.
  Wasserman, "All of Statistics", section 10.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n = diff.size
  mean = float(diff.mean())
  if n < 2:
    return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": n}
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n))
  return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def mean_ci(values, *, confidence: float = 0.95) -> dict:
  """The mean of ``values`` (1-D) and its Student-t confidence interval (NaN bounds for one value)."""
  values = np.asarray(values, np.float64)
  return paired_ci(values, np.zeros_like(values), confidence=confidence)


def paired_test(a, b, *, confidence: float = 0.95) -> dict:
  """`paired_ci` of ``a - b`` plus the two-sided paired t-test's p-value (``p``)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  ci = paired_ci(a, b, confidence=confidence)
  diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if diff.size < 2:
    p = float("nan")
  elif diff.std(ddof=1) == 0:  # No spread: certain if the mean moved, no evidence if it did not.
    p = 1.0 if diff.mean() == 0 else 0.0
  else:
    p = float(stats.ttest_1samp(diff, 0.0).pvalue)
  return {**ci, "p": p}


def holm(pvalues: Sequence[float]) -> list:
  """Holm's step-down adjusted p-values (family-wise error control; Holm 1979), in the given order."""
  p = np.asarray(pvalues, np.float64)
  k = p.size
  order = np.argsort(p, kind="stable")
  adjusted = np.empty(k)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (k - rank) * p[i]))
    adjusted[i] = running
  return adjusted.tolist()


def corrected_tests(pairs: dict, *, confidence: float = 0.95) -> dict:
  """Paired tests of each ``name -> (a, b)`` of one family, corrected for the family's ``k`` comparisons.

  Each entry: `paired_test` at the Bonferroni level ``1 - (1 - confidence) / k`` (so all ``k`` intervals
  hold together with probability ``confidence``), ``p`` the raw p-value and ``p_holm`` Holm's adjusted one.
  """
  k = max(len(pairs), 1)
  level = 1.0 - (1.0 - confidence) / k
  tests = {name: paired_test(a, b, confidence=level) for name, (a, b) in pairs.items()}
  for name, p_holm in zip(tests, holm([t["p"] for t in tests.values()]), strict=True):
    tests[name].update(p_holm=p_holm, confidence=level, family=k)
  return tests


def fmt_ci(ci: dict, scale: float = 100.0, digits: int = 2, *, sign: bool = True) -> str:
  """``+m [+lo, +hi]`` (points or percent when ``scale`` is 100); ``sign=False`` drops the ``+``."""
  spec = f"{'+' if sign else ''}.{digits}f"
  return f"{scale * ci['mean']:{spec}} [{scale * ci['low']:{spec}}, {scale * ci['high']:{spec}}]"


def fmt_mean_ci(values, confidence: float) -> str:
  """A percentage's mean and confidence interval over seeds, ``m [lo, hi]`` to one decimal."""
  return fmt_ci(mean_ci(values, confidence=confidence), digits=1, sign=False)


def first_step_reaching(steps, values, target: float) -> float:
  """The first recorded step at which ``values`` (over steps) is at least ``target``; inf if never."""
  hits = np.flatnonzero(np.asarray(values) >= target)
  return float(np.asarray(steps)[hits[0]]) if hits.size else math.inf


def fmt_pm(mean, se, scale: float = 1.0, digits: int = 2) -> str:
  return f"{mean * scale:.{digits}f} ± {se * scale:.{digits}f}"


def grid(learning_rates: Sequence[float], seeds: Sequence[int]):
  """Flat per-model learning rates and seeds for every (learning rate, seed) pair, learning rate major."""
  lrs = [float(lr) for lr in learning_rates for _ in seeds]
  flat_seeds = [int(s) for _ in learning_rates for s in seeds]
  return lrs, flat_seeds


def seeds_of(config) -> list:
  return [config.seed + i for i in range(config.num_seeds)]


def train_arm(run, arm: str, config, model, dataset, *, learning_rates=None, seeds=None, batch_size=None, **kwargs):
  """`train_models` with the config's optimizer, steps, batch size, evaluation and checkpoint cadence."""
  seeds = seeds_of(config) if seeds is None else seeds
  tx = make_optimizer(config.optimizer, config.learning_rate)
  return train_models(
    run,
    arm,
    model,
    tx,
    dataset,
    seeds=seeds,
    num_steps=config.num_steps,
    batch_size=config.batch_size if batch_size is None else batch_size,
    eval_every=config.eval_every,
    checkpoint_every=config.checkpoint_every,
    learning_rates=learning_rates,
    num_devices=config.num_devices,
    **kwargs,
  )
