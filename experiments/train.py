"""One training run of the MLP: loss and accuracy curves, checkpoints, ``--resume``.

The batch at step ``t`` is `experiments.data.batch_at(train, batch_size, t, seed=seed)`, so a run resumed from
the checkpoint of step ``t`` sees exactly the batches the uninterrupted run would have, and ends in the
same state (the same ``state_digest``). With ``num_devices > 1`` the step is data-parallel
(`bnjax.training.make_train_step(parallel=...)`), batch statistics synchronised across devices.

A run whose training loss (or state) becomes non-finite stops at the first evaluation or checkpoint step
after it, records nothing non-finite, saves no further checkpoint (the last good one stays), and its
summary's verdict says "diverged at step N".

On many processes (``python -m experiments train`` under SLURM, Open MPI, Kubernetes, a TPU pod or
`experiments.launch`, which `experiments.__main__` joins with `experiments.launch.maybe_initialize`) the
mesh spans every process's devices (``num_devices`` must be all of them, ``parallel`` "jit" or "shard_map"),
each process places only its own rows of each batch, and every process writes the checkpoints (Orbax's
multi-process save). Process 0 owns the run folder; the others run in a scratch folder and take from it the
facts that must agree: the checkpoint folder, whether to resume, and the metrics rows so far.
"""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import training
from experiments import common
from experiments import data as data_lib
from experiments import report
from experiments.runner import Result
from experiments.runner import Table
from experiments.runner import Verdict

TITLE = "one training run of the MLP"
AXIS_NAME = "batch"


def describe_criterion(criterion) -> str:
  return f"the final test accuracy is at least {criterion.min_test_accuracy:.0%}."


def evaluate(metrics: dict, criterion) -> Verdict:
  accuracy = metrics["test_accuracy"]
  held = accuracy >= criterion.min_test_accuracy
  return Verdict(
    held=bool(held),
    reason=f"final test accuracy {accuracy:.2%} ({'>=' if held else '<'} {criterion.min_test_accuracy:.0%}).",
  )


def _placement(config):
  """Where the state and the batches go: None (one device), a Mesh (jit, shard_map) or devices (pmap)."""
  if jax.process_count() > 1:
    return _global_mesh(config)
  if config.num_devices == 1:
    return None
  devices = jax.devices()[: config.num_devices]
  return devices if config.parallel == "pmap" else training.batch_mesh(devices, AXIS_NAME)


def _global_mesh(config):
  """The mesh over every process's devices, for a run on many processes."""
  if config.num_devices != jax.device_count():
    raise ValueError(
      f"config.num_devices: got {config.num_devices} on {jax.process_count()} processes with "
      f"{jax.device_count()} devices in all; expected {jax.device_count()} (every device)"
    )
  if config.parallel not in ("jit", "shard_map"):
    raise ValueError(
      f"config.parallel: got {config.parallel!r} on {jax.process_count()} processes; expected "
      f"'jit' or 'shard_map' (pmap maps one process's devices)"
    )
  return training.batch_mesh(jax.devices(), AXIS_NAME)


def _from_primary(value):
  """Process 0's ``value`` (JSON-serializable) on every process."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
  padded = np.zeros(size, np.uint8)
  padded[: min(size, data.size)] = data[:size]
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(padded)).decode())


def _share_run(run):
  """The checkpoint folder and resume decision of process 0; its metrics rows copied into this run."""
  facts = _from_primary({"checkpoints": str(run.path("checkpoints")), "resume": run.resume, "rows": run.read_metrics()})
  if jax.process_index() != 0:
    run.resume = facts["resume"]
    run.rewrite_metrics(lambda r: False)
    for row in facts["rows"]:
      run.log(**row)
  return facts["checkpoints"]


def _local_copy(tree):
  """This process's copy of a replicated global state (the state itself on one process)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, tree)


def run(config, run) -> Result:
  dataset = common.load_data(config)
  tx = common.make_optimizer(config.optimizer, config.learning_rate)
  model = common.make_mlp(config, dataset.num_classes)
  # Under pmap / shard_map the batch statistics are synchronised over the mapped axis.
  synced = config.num_devices > 1 and config.parallel in ("pmap", "shard_map") and config.norm != "none"
  model_train = common.make_mlp(config, dataset.num_classes, axis_name=AXIS_NAME) if synced else model
  placement = _placement(config)
  if placement is None:
    step_fn = training.make_train_step(model_train, tx)
  else:
    mesh = training.batch_mesh(placement, AXIS_NAME) if config.parallel == "pmap" else placement
    step_fn = training.make_train_step(model_train, tx, parallel=config.parallel, mesh=mesh, axis_name=AXIS_NAME)
  place = (lambda tree: tree) if placement is None else (lambda tree: training.replicate(tree, placement))
  unplace = training.unreplicate if config.parallel == "pmap" and placement is not None else _local_copy
  if jax.process_count() > 1:  # this process's rows of each global batch only
    own = training.process_batch_rows(config.batch_size, placement, axis_name=AXIS_NAME)
    shard = lambda b: training.shard_batch(jax.tree.map(lambda a: np.asarray(a)[own], b), placement, process_local=True)
  else:
    shard = (lambda batch: batch) if placement is None else (lambda b: training.shard_batch(b, placement))
  eval_fn = jax.jit(common.make_eval_fn(model))
  train = dataset.train
  state = training.create_train_state(
    model, tx, jnp.asarray(train.x[: config.batch_size]), rng=jax.random.key(config.seed)
  )

  ckpt_dir = _share_run(run)
  from experiments import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top

  schedule = common.record_steps(config.num_steps, config.eval_every)

  def record(step, train_metrics):
    row = {"step": step}
    for split in ("val", "test"):
      part = getattr(dataset, split)
      if len(part.y):
        metrics = jax.device_get(eval_fn(unplace(state), jnp.asarray(part.x), jnp.asarray(part.y)))
        row[f"{split}_loss"], row[f"{split}_accuracy"] = float(metrics["loss"]), float(metrics["accuracy"])
    if train_metrics:
      row["train_loss"] = float(np.mean([m["loss"] for m in train_metrics]))
      row["train_accuracy"] = float(np.mean([m["accuracy"] for m in train_metrics]))
    run.log(**row)
    return row

  diverged_at = None
  # The writer lock for the whole run: a second process resuming this run is refused before it trains.
  with checkpoint_lib.writer(ckpt_dir) if config.checkpoint_every else contextlib.nullcontext():
    start = 0
    if run.resume and config.checkpoint_every:
      state, start, _ = common.resume_state(run, ckpt_dir, state, label="", rows=run.read_metrics(), schedule=schedule)
    elif run.resume:
      run.note("no checkpoints (checkpoint_every=0); starting from step 0")
    run.rewrite_metrics((lambda r: r["step"] <= start) if start else (lambda r: False))

    state = place(state)
    if start == 0:
      record(0, [])
    pending = []
    batches = data_lib.iterate_batches(
      train, config.batch_size, seed=config.seed, start_step=start, num_steps=config.num_steps - start
    )
    with run.progress(config.num_steps, desc="train") as bar:
      bar.update(start)
      for step, (x, y) in enumerate(batches, start=start + 1):
        state, metrics = step_fn(state, shard((x, y)))
        pending.append(metrics)
        at_eval = step % config.eval_every == 0 or step == config.num_steps
        at_checkpoint = config.checkpoint_every and (step % config.checkpoint_every == 0 or step == config.num_steps)
        if at_eval or at_checkpoint:
          got = jax.device_get(pending)
          bad = [i for i, m in enumerate(got) if not np.all(np.isfinite(m["loss"]))]
          if bad or not common.all_finite(unplace(state)):  # Stop here: nothing non-finite is recorded or saved.
            diverged_at = step - len(got) + 1 + bad[0] if bad else step
            break
        if at_eval:
          row = record(step, got)
          pending = []
          bar.set_postfix(loss=f"{row['train_loss']:.3f}")
        if at_checkpoint:
          saved = state if jax.process_count() > 1 else unplace(state)  # every process writes its part
          checkpoint_lib.save(ckpt_dir, saved, step=step, keep=3)
        bar.update(1)
  if diverged_at is not None:
    kept = checkpoint_lib.latest_step(ckpt_dir) if config.checkpoint_every else None
    kept_text = f"last good checkpoint: step {kept}" if kept is not None else "no checkpoint before it"
    run.note(f"the training loss became non-finite at step {diverged_at}; stopped there ({kept_text})")
  run.record_divergence("train", [diverged_at], detail=kept_text if diverged_at is not None else "")

  rows = run.read_metrics()
  final = rows[-1]
  metrics = {k: final[k] for k in final if k != "step"}
  if diverged_at is not None:
    metrics["diverged_at"] = diverged_at
  table = Table(
    f"{config.dataset}, MLP {tuple(config.hidden)} {config.activation}, norm={config.norm}, "
    f"{config.optimizer} lr {config.learning_rate:g}, batch {config.batch_size}, "
    f"{config.num_devices} device(s)",
    ["step", "train loss", "val acc %", "test acc %"],
    [
      [
        rows[i]["step"],
        rows[i].get("train_loss"),
        100 * rows[i].get("val_accuracy", np.nan),
        100 * rows[i].get("test_accuracy", np.nan),
      ]
      for i in _spread(len(rows), 9)
    ],
  )
  plots = [_plot(run, rows)]
  return Result(metrics=metrics, tables=[table], plots=plots, state_digest=common.state_digest(unplace(state)))


def _spread(n: int, k: int) -> list:
  """Up to ``k`` indices spread evenly over ``range(n)``, first and last included."""
  return sorted(set(np.linspace(0, n - 1, min(n, k)).round().astype(int).tolist()))


def _plot(run, rows) -> str:
  fig, axes = report.figure(2)
  steps = [r["step"] for r in rows]
  axes[0, 0].plot(steps[1:], [r["train_loss"] for r in rows[1:]], label="train (mean since last)")
  for split in ("val", "test"):
    if f"{split}_loss" in rows[0]:
      axes[0, 0].plot(steps, [r[f"{split}_loss"] for r in rows], label=split)
      axes[0, 1].plot(steps, [r[f"{split}_accuracy"] for r in rows], label=split)
  axes[0, 1].plot(steps[1:], [r["train_accuracy"] for r in rows[1:]], label="train (mean since last)")
  axes[0, 0].set(title="loss", xlabel="step", yscale="log")
  axes[0, 1].set(title="accuracy", xlabel="step", ylim=(0, 1))
  for ax in axes[0]:
    ax.legend(fontsize="small")
  return report.save(fig, run, "train")
