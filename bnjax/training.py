"""Training Flax models that use batch normalization with Optax, on one device or many.

One training step, written once, runs four ways:

* `parallel=None`: one device (or whatever `jax.jit` makes of the inputs' shardings);
* `parallel="jit"`: sharded `jit` over a `Mesh`: the state is replicated (`P()`), the batch is split along
  its first axis (`P(axis_name)`) and XLA inserts the collectives. The batch is global, so the model's
  BatchNorm needs no `axis_name`: its statistics are already those of the whole batch;
* `parallel="shard_map"`: `jax.shard_map` over the same `Mesh`; each device sees its shard of the batch, the
  gradients, loss and metrics are summed explicitly with `psum`, and the model's BatchNorm must be built
  with `axis_name=axis_name` for its statistics to be those of the global batch;
* `parallel="pmap"`: `jax.pmap` over the local devices; the state carries a leading device axis
  (`replicate`), the batch is `(devices, per_device_batch, ...)` (`shard_batch`), and again the model's
  BatchNorm must be built with `axis_name=axis_name`.

All four compute the same update as one device on the global batch (up to float rounding): the loss is
the example-weighted mean over the global batch,

    L = sum_d n_d * L_d / sum_d n_d,        L_d = loss_fn(logits_d, labels_d)   (a mean over n_d examples),

and its gradient is `sum_d grad(n_d * L_d / N)` where each device's gradient already contains, through
the synchronised BatchNorm's backward pass, the other devices' dependence on its statistics.

A model whose BatchNorm has no `axis_name` under `pmap` / `shard_map` normalizes each device's shard with
that shard's own statistics: the per-device mode, where the paper's mini-batch is each device's batch
(Goyal et al. (2017), "Accurate, Large Minibatch SGD", Section 5, normalize 32 examples per worker this
way). Its running statistics then differ per device: `sync_batch_stats=True` (default) averages
them across devices after each step, so every replica keeps the same `batch_stats`;
`sync_batch_stats=False` keeps each device's own (under `shard_map` the state then holds them with a
leading device axis, see `replicate(..., per_device_batch_stats=True)`).

Sub-groups: on a 2-D mesh `("group", "batch")` with `group_axis="group"`, the batch is split over both
axes and BatchNorm statistics are those of each group's rows (the devices along "batch" that share a
"group" index) while gradients, metrics and running statistics are still averaged over every device; the
practice on large pods, where BN syncs over 8-64 devices. Under "shard_map" the model's BatchNorm names
`axis_name` ("batch"), so its `psum` spans one group. Under "jit" the model names no axis: the step reshapes
the batch to `(groups, rows per group, ...)` and `jax.vmap`s the model over groups with
`spmd_axis_name=group_axis`, so each group is normalized with its own statistics and XLA reduces them over
"batch" only.

Many processes: nothing changes. `batch_mesh()` spans every process's devices; each process passes the same
state to `replicate` and only its own rows (`process_batch_rows`) to `shard_batch(..., process_local=True)`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
  "TrainState",
  "create_train_state",
  "make_train_step",
  "make_eval_step",
  "softmax_cross_entropy",
  "accuracy",
  "replicate",
  "unreplicate",
  "shard_batch",
  "process_batch_rows",
  "batch_mesh",
]

PyTree = Any
Device = Any  # jax.Device, which type checkers do not accept in annotations
Batch = tuple[jax.Array, jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

_PARALLEL_MODES = (None, "pmap", "shard_map", "jit")


class TrainState(NamedTuple):
  """Everything a training run carries from one step to the next (a pytree).

  Attributes:
    step: int32 scalar, the number of steps taken.
    params: the model's `params` collection.
    batch_stats: the model's `batch_stats` collection (running statistics); `{}` for a model without one.
    opt_state: the Optax optimizer state of `params`.
    rng: a `jax.random` key, split at every step; one half becomes the next `rng`, the other is passed to
      the model as `rngs={"dropout": ...}`.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array


# ------------------------------------------------------------------------------------------------------
# Losses and metrics.
# ------------------------------------------------------------------------------------------------------


def _is_integer_labels(logits: jax.Array, labels: jax.Array) -> bool:
  return jnp.issubdtype(labels.dtype, jnp.integer) and labels.shape == logits.shape[:-1]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  r"""Mean softmax cross-entropy, `-mean_i log softmax(logits_i)[labels_i]`.

  Args:
    logits: `(N, ..., C)` unnormalized log-probabilities.
    labels: `(N, ...)` integer class indices in `[0, C)`, or `(N, ..., C)` probabilities (e.g. one-hot).

  Returns:
    The float32 scalar mean over every axis but the class axis.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if _is_integer_labels(logits, labels):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  elif labels.shape == logits.shape:
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32))
  else:
    raise ValueError(
      f"labels have shape {labels.shape} and dtype {labels.dtype}; for logits of shape {logits.shape} "
      f"expected integer class indices of shape {logits.shape[:-1]} or probabilities of shape {logits.shape}"
    )
  return jnp.mean(losses)


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array | None:
  """Fraction of examples whose arg-max logit is the label (`None` when the labels are not classes).

  Args:
    logits: `(N, ..., C)`.
    labels: `(N, ...)` integer classes, or `(N, ..., C)` probabilities with `C > 1` (compared by arg-max).

  Returns:
    A float32 scalar, or None for labels of any other shape (e.g. regression targets).
  """
  if _is_integer_labels(logits, labels):
    target = labels
  elif labels.shape == logits.shape and logits.ndim >= 1 and logits.shape[-1] > 1:
    target = jnp.argmax(labels, axis=-1)
  else:
    return None
  return jnp.mean((jnp.argmax(logits, axis=-1) == target).astype(jnp.float32))


# ------------------------------------------------------------------------------------------------------
# The state.
# ------------------------------------------------------------------------------------------------------


def _check_key(rng: Any, arg: str = "rng") -> jax.Array:
  if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == ():
    return rng
  if isinstance(rng, (jax.Array, np.ndarray)) and rng.dtype == jnp.uint32 and rng.shape == (2,):
    return jnp.asarray(rng)  # a raw `jax.random.PRNGKey`
  raise TypeError(
    f"{arg} must be a jax.random key (jax.random.key(seed) or jax.random.PRNGKey(seed)), got "
    f"{type(rng).__name__} with shape {getattr(rng, 'shape', None)} and dtype {getattr(rng, 'dtype', None)}"
  )


def create_train_state(model, tx: optax.GradientTransformation, sample_x, *, rng) -> TrainState:
  """Initializes a model and its optimizer.

  The model is initialized with `model.init({"params": k1, "dropout": k2}, sample_x, train=False)`; only
  `sample_x`'s shape and dtype matter (its batch size does not).

  Args:
    model: a `flax.linen.Module` whose `__call__(x, *, train)` returns logits, with variables `params` and
      optionally `batch_stats` (e.g. `bnjax.models.MLP`).
    tx: the Optax optimizer.
    sample_x: an input batch, `(N, ...)`.
    rng: a `jax.random` key; split into the initialization keys and the state's `rng`.

  Returns:
    A `TrainState` at step 0 on the default device.
  """
  rng = _check_key(rng)
  if not isinstance(tx, optax.GradientTransformation):
    raise TypeError(f"tx must be an optax.GradientTransformation, got {type(tx).__name__}")
  init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  variables = model.init({"params": init_rng, "dropout": dropout_rng}, jnp.asarray(sample_x), train=False)
  if "params" not in variables:
    raise ValueError(
      f"model {type(model).__name__} has no 'params' collection (got collections {sorted(variables)}); "
      "expected a model with trainable parameters"
    )
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    rng=state_rng,
  )


# ------------------------------------------------------------------------------------------------------
# Placement helpers.
# ------------------------------------------------------------------------------------------------------


def batch_mesh(
  devices: Sequence[Device] | None = None,
  axis_name: str = "batch",
  *,
  group_size: int | None = None,
  group_axis: str = "group",
) -> Mesh:
  """A `Mesh` over `devices` (default: every device of every process) to split the batch over.

  Args:
    devices: the devices, in order (processes' devices contiguous, as `jax.devices()` lists them).
    axis_name: the name of the batch axis.
    group_size: None for a one-dimensional mesh `(axis_name,)`; k for a 2-D mesh `(group_axis, axis_name)`
      of `len(devices) // k` groups of k consecutive devices (see `make_train_step(group_axis=...)`).
    group_axis: the name of the group axis.

  Returns:
    The mesh.
  """
  grid = np.asarray(jax.devices() if devices is None else list(devices))
  if group_size is None:
    return Mesh(grid, (axis_name,))
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or grid.size % group_size:
    raise ValueError(f"group_size must be a positive divisor of the {grid.size} devices, got {group_size!r}")
  return Mesh(grid.reshape(-1, group_size), (group_axis, axis_name))


def _axes(axis_name) -> tuple[str, ...]:
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _check_mesh_axis(mesh: Mesh, axis_name, arg: str = "mesh") -> None:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"{arg} must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  missing = [a for a in _axes(axis_name) if a not in mesh.axis_names]
  if missing:
    raise ValueError(
      f"{arg} has axes {mesh.axis_names}, expected one named axis_name={missing[0]!r} to split the batch over"
    )


def _axis_size(mesh: Mesh, axis_name) -> int:
  return int(np.prod([mesh.shape[a] for a in _axes(axis_name)]))


def _batch_spec(axis_name) -> P:
  return P(axis_name if isinstance(axis_name, str) else tuple(axis_name))


def _pmap_devices(target) -> list[Device]:
  if target is None:
    return jax.local_devices()
  if isinstance(target, Mesh):
    return [d for d in target.devices.flat if d.process_index == jax.process_index()]
  devices = list(target)
  if not devices or not all(isinstance(d, jax.Device) for d in devices):
    raise TypeError(f"mesh_or_devices must be a Mesh, a non-empty sequence of jax devices or None, got {target!r}")
  return devices


def _pmap_sharding(devices: Sequence[Device], axis_name: str) -> NamedSharding:
  """The layout `pmap` gives its outputs: the leading axis split over `devices`, one entry per device."""
  return NamedSharding(Mesh(np.asarray(devices), (axis_name,)), P(axis_name))


def _place(a: Any, sharding: NamedSharding) -> jax.Array:
  """`jax.device_put(a, sharding)`, also when `sharding` spans other processes' devices.

  Then every process must hold the same value `a`; each one places the pieces its own devices hold.
  """
  if all(d.process_index == jax.process_index() for d in np.asarray(sharding.mesh.devices).flat):
    # A copy first: device_put would reuse `a`'s buffer for its device, and a step that donates the
    # placed state would then delete `a` too.
    return jax.device_put(jnp.copy(a), sharding)
  if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_place(jax.random.key_data(a), sharding), impl=jax.random.key_impl(a))
  host = np.asarray(a)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(
  tree: PyTree,
  mesh_or_devices: Mesh | Sequence[Device] | None = None,
  *,
  axis_name: str = "batch",
  per_device_batch_stats: bool = False,
) -> PyTree:
  """Places a state (or any pytree) for a data-parallel step.

  * `mesh_or_devices` a `Mesh` (for `parallel="jit"` or `"shard_map"`): every leaf is replicated,
    `NamedSharding(mesh, P())`; on many processes every process passes the same `tree` (e.g. created
    from the same key) and places its own devices' copies. With `per_device_batch_stats=True` (for
    `shard_map` with `sync_batch_stats=False`; `tree` must be a `TrainState`), `batch_stats` leaves get a
    leading axis of size `mesh.shape[axis_name]`, split over `axis_name`: one copy per device.
  * a sequence of devices, or None for the local devices (for `parallel="pmap"`): every leaf gets a leading
    device axis, one copy per device, as `pmap` expects.

  Returns:
    The placed pytree (new arrays; `tree` is left as it is).
  """
  if isinstance(mesh_or_devices, Mesh):
    _check_mesh_axis(mesh_or_devices, axis_name, "mesh_or_devices")
    replicated = NamedSharding(mesh_or_devices, P())
    if not per_device_batch_stats:
      return jax.tree.map(lambda a: _place(a, replicated), tree)
    if not isinstance(tree, TrainState):
      raise TypeError(f"per_device_batch_stats=True needs a TrainState, got {type(tree).__name__}")
    size = _axis_size(mesh_or_devices, axis_name)
    split = NamedSharding(mesh_or_devices, _batch_spec(axis_name))
    stacked = jax.tree.map(lambda a: _place(jnp.broadcast_to(a, (size,) + jnp.shape(a)), split), tree.batch_stats)
    placed = jax.tree.map(lambda a: _place(a, replicated), tree._replace(batch_stats=None))
    return placed._replace(batch_stats=stacked)
  devices = _pmap_devices(mesh_or_devices)
  sharding = _pmap_sharding(devices, axis_name)
  return jax.tree.map(lambda a: jax.device_put(jnp.broadcast_to(a, (len(devices),) + jnp.shape(a)), sharding), tree)


def unreplicate(tree: PyTree) -> PyTree:
  """The first device's copy of a `pmap`-layout pytree (every leaf indexed `[0]` along its device axis)."""
  return jax.tree.map(lambda a: a[0], tree)


def process_batch_rows(global_batch_size: int, mesh: Mesh, *, axis_name: str = "batch") -> slice:
  """The rows of a global batch that this process's devices hold under `NamedSharding(mesh, P(axis_name))`.

  A multi-process data loader reads only these rows and passes them to
  `shard_batch(..., process_local=True)`. On one process this is `slice(0, global_batch_size)`.

  Raises:
    ValueError: if `global_batch_size` is not divisible by the size of `axis_name`, or the process's rows
      are not one contiguous block (a mesh whose device order interleaves processes).
  """
  _check_mesh_axis(mesh, axis_name)
  size = _axis_size(mesh, axis_name)
  if global_batch_size % size:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be divisible by the {size} devices of mesh axis {axis_name!r}"
    )
  indices = NamedSharding(mesh, _batch_spec(axis_name)).addressable_devices_indices_map((global_batch_size,))
  slices = [index[0] for index in indices.values() if index is not None]
  rows = sorted({(s.start or 0, global_batch_size if s.stop is None else s.stop) for s in slices})
  start, stop = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != stop - start or any(b != c for (_, b), (c, _) in zip(rows, rows[1:])):
    raise ValueError(
      f"this process's devices hold rows {rows} of the batch, not one contiguous block; order the mesh's "
      "devices by process (as jax.devices() does)"
    )
  return slice(start, stop)


def shard_batch(
  batch: PyTree,
  mesh_or_devices: Mesh | Sequence[Device] | None = None,
  *,
  axis_name: str = "batch",
  process_local: bool = False,
) -> PyTree:
  """Splits a batch along its first axis for a data-parallel step.

  * `mesh_or_devices` a `Mesh` (for `parallel="jit"` or `"shard_map"`): every leaf of shape `(N, ...)`
    becomes a global array split over `axis_name`, `NamedSharding(mesh, P(axis_name))`. By default `batch`
    is the global batch (every process passes the same one and places only its own devices' rows); with
    `process_local=True` it is this process's rows only, `process_batch_rows(N, mesh)` of the global batch,
    joined with the other processes' rows by `jax.make_array_from_process_local_data`.
  * a sequence of devices, or None for the local devices (for `parallel="pmap"`): `(N, ...)` becomes
    `(D, N / D, ...)` with row `d` on device `d`.

  Raises:
    ValueError: if a leaf's first axis is not divisible by the number of devices it is split over.
  """
  if isinstance(mesh_or_devices, Mesh):
    mesh = mesh_or_devices
    _check_mesh_axis(mesh, axis_name, "mesh_or_devices")
    sharding = NamedSharding(mesh, _batch_spec(axis_name))
    size = _axis_size(mesh, axis_name)
    num_processes = len({d.process_index for d in mesh.devices.flat})

    def place(a):
      a = np.asarray(a)
      global_rows = a.shape[0] * num_processes if process_local else a.shape[0]
      if a.ndim == 0 or global_rows % size:
        raise ValueError(
          f"batch leaf of shape {a.shape} cannot be split over the {size} devices of mesh axis {axis_name!r}: "
          "expected a first axis divisible by that"
        )
      if process_local:
        return jax.make_array_from_process_local_data(sharding, a, (global_rows,) + a.shape[1:])
      return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(place, batch)
  devices = _pmap_devices(mesh_or_devices)
  sharding = _pmap_sharding(devices, axis_name)

  def split(a):
    a = np.asarray(a)
    if a.ndim == 0 or a.shape[0] % len(devices):
      raise ValueError(
        f"batch leaf of shape {a.shape} cannot be split over {len(devices)} devices: expected a first axis "
        "divisible by the number of devices"
      )
    a = a.reshape((len(devices), a.shape[0] // len(devices)) + a.shape[1:])
    return jax.device_put(a, sharding)

  return jax.tree.map(split, batch)


# ------------------------------------------------------------------------------------------------------
# The steps.
# ------------------------------------------------------------------------------------------------------


def _check_parallel(parallel, mesh, axis_name, model, group_axis=None) -> None:
  if parallel not in _PARALLEL_MODES:
    raise ValueError(f"parallel must be one of {_PARALLEL_MODES}, got {parallel!r}")
  if parallel is not None and not isinstance(axis_name, str):
    raise TypeError(f"axis_name must be a str, got {axis_name!r}")
  if group_axis is not None:
    if parallel not in ("jit", "shard_map"):
      raise ValueError(
        f"group_axis={group_axis!r} needs parallel='jit' or 'shard_map', got parallel={parallel!r} (under pmap, "
        "build the BatchNorm with axis_index_groups)"
      )
    if mesh is None or group_axis not in mesh.axis_names or group_axis == axis_name:
      axes = None if mesh is None else mesh.axis_names
      raise ValueError(
        f"group_axis={group_axis!r} must name a mesh axis other than axis_name={axis_name!r}; got mesh axes "
        f"{axes} (e.g. batch_mesh(group_size=k))"
      )
  if mesh is not None:
    if parallel is None:
      raise ValueError("mesh is only used with parallel='pmap', 'shard_map' or 'jit'; got parallel=None")
    _check_mesh_axis(mesh, axis_name)
  # A model that names its BatchNorm's axis (e.g. bnjax.models.MLP(axis_name=...)) must name the step's one.
  model_axis = getattr(model, "axis_name", None)
  if model_axis is None:
    return
  if parallel in (None, "jit"):
    raise ValueError(
      f"model.axis_name={model_axis!r} but parallel={parallel!r} maps no axis; build the model with "
      "axis_name=None (under a sharded jit the batch is global, so its statistics need no sync)"
    )
  if model_axis != axis_name:
    raise ValueError(
      f"model.axis_name={model_axis!r} must match the step's axis_name={axis_name!r} for the BatchNorm "
      "statistics to be synchronised across it"
    )


def _local_metrics(model, loss_fn, params, batch_stats, batch, *, train, dropout_rng):
  """Loss, metrics and updated batch_stats of one (local) batch; the loss is the local mean."""
  x, labels = batch
  variables = {"params": params, "batch_stats": batch_stats}
  if train:
    logits, mutated = model.apply(variables, x, train=True, rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    new_batch_stats = mutated.get("batch_stats", batch_stats)
  else:
    logits = model.apply(variables, x, train=False)
    new_batch_stats = batch_stats
  loss = jnp.asarray(loss_fn(logits, labels), jnp.float32)
  if loss.shape != ():
    raise ValueError(f"loss_fn must return a scalar mean over the batch, got shape {loss.shape}")
  metrics = {"loss": loss}
  acc = accuracy(logits, labels)
  if acc is not None:
    metrics["accuracy"] = acc
  return metrics, new_batch_stats


def _num_examples(batch) -> int:
  x, _ = batch
  return int(jnp.shape(x)[0])


def _step_fn(model, tx, loss_fn, *, axis_name, sync_batch_stats):
  """The training step on the batch a device sees; with `axis_name`, a shard of the global batch."""

  def step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    n_local = jnp.float32(_num_examples(batch))
    n_total = jax.lax.psum(n_local, axis_name) if axis_name else n_local
    weight = n_local / n_total
    rng, dropout_rng = jax.random.split(state.rng)
    if axis_name:  # different dropout masks on different shards, as on one device's global batch
      dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))

    def objective(params):
      metrics, new_batch_stats = _local_metrics(
        model, loss_fn, params, state.batch_stats, batch, train=True, dropout_rng=dropout_rng
      )
      # This shard's share of the global mean; its gradient summed over shards is the global gradient.
      return metrics["loss"] * weight, (metrics, new_batch_stats)

    grads, (metrics, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
    metrics = jax.tree.map(lambda m: m * weight, metrics)
    if axis_name:
      grads = jax.lax.psum(grads, axis_name)
      metrics = jax.lax.psum(metrics, axis_name)
      if sync_batch_stats:
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state, rng)
    return new_state, metrics

  return step


def _grouped_step_fn(model, tx, loss_fn, *, num_groups, group_axis):
  """The sharded-jit step whose BatchNorm statistics are per group: the model `vmap`ped over groups."""

  def step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    grouped = jax.tree.map(lambda a: a.reshape((num_groups, a.shape[0] // num_groups) + a.shape[1:]), batch)
    rng, dropout_rng = jax.random.split(state.rng)
    keys = jax.vmap(lambda i: jax.random.fold_in(dropout_rng, i))(jnp.arange(num_groups))

    def objective(params):
      def one_group(rows, key):
        return _local_metrics(model, loss_fn, params, state.batch_stats, rows, train=True, dropout_rng=key)

      # spmd_axis_name: the vmapped axis is the mesh's group axis, so XLA reduces each group's
      # statistics over its own devices only.
      metrics, batch_stats = jax.vmap(one_group, spmd_axis_name=group_axis)(grouped, keys)
      metrics = jax.tree.map(jnp.mean, metrics)  # groups hold equal numbers of rows
      return metrics["loss"], (metrics, jax.tree.map(lambda a: jnp.mean(a, axis=0), batch_stats))

    grads, (metrics, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, batch_stats, opt_state, rng), metrics

  return step


def _eval_fn(model, loss_fn, *, axis_name):
  def evaluate(state: TrainState, batch) -> dict[str, jax.Array]:
    n_local = jnp.float32(_num_examples(batch))
    metrics, _ = _local_metrics(model, loss_fn, state.params, state.batch_stats, batch, train=False, dropout_rng=None)
    if axis_name:
      n_total = jax.lax.psum(n_local, axis_name)
      metrics = jax.lax.psum(jax.tree.map(lambda m: m * n_local / n_total, metrics), axis_name)
    return metrics

  return evaluate


def _default_mesh(mesh, axis_name):
  return batch_mesh(axis_name=axis_name) if mesh is None else mesh


def make_train_step(
  model,
  tx: optax.GradientTransformation,
  loss_fn: LossFn = softmax_cross_entropy,
  *,
  parallel: str | None = None,
  mesh: Mesh | None = None,
  axis_name: str = "batch",
  sync_batch_stats: bool = True,
  donate: bool = True,
  jit: bool = True,
  group_axis: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Builds `train_step(state, (x, labels)) -> (state, metrics)`.

  The step splits `state.rng`, applies the model in training mode (`mutable=["batch_stats"]`,
  `rngs={"dropout": ...}`), takes the gradient of the global-batch mean loss, applies the Optax update
  and returns the new state with `step + 1`. `metrics` holds float32 scalars: `"loss"` (the global-batch
  mean of `loss_fn`, computed before the update) and `"accuracy"` (when the labels are classes, see
  `accuracy`), both example-weighted over devices.

  Args:
    model: a flax module, `model.apply(variables, x, train=...)` returning logits.
    tx: the Optax optimizer the state was created with.
    loss_fn: `loss_fn(logits, labels) -> scalar mean over the batch`.
    parallel: None (one device), "jit" (sharded jit), "shard_map" or "pmap"; see the module docstring for
      the state and batch layouts (`replicate`, `shard_batch`).
    mesh: for "jit" and "shard_map", the `Mesh` with an axis `axis_name` to split the batch over (default:
      every device); for "pmap", its devices on this process (default: the local devices).
    axis_name: the mesh axis / pmap axis name of the batch; under "pmap" and "shard_map" the model's
      BatchNorm must be built with the same `axis_name` to use global-batch statistics.
    sync_batch_stats: under "pmap" and "shard_map", average the running statistics across devices after
      each step (a no-op when the BatchNorm already synchronises); False keeps per-device running
      statistics (the per-device mode, for comparison; under "shard_map" the state must then come from
      `replicate(state, mesh, per_device_batch_stats=True)`).
    donate: donate the input state's buffers to the output (the input state must not be used afterwards).
    jit: False returns the pure, un-jitted step for `parallel=None` or "shard_map" (e.g. to `jax.vmap` it
      over seeds, or to compose it into a larger jitted function).
    group_axis: for "jit" and "shard_map", a second mesh axis the batch is split over (batch spec
      `P((group_axis, axis_name))`); BatchNorm statistics are then per group of devices along `axis_name`
      (see the module docstring; `batch_mesh(group_size=k)`). Dropout masks differ between the two modes.

  Returns:
    The step function.
  """
  _check_parallel(parallel, mesh, axis_name, model, group_axis)
  if not jit and parallel in ("pmap", "jit"):
    raise ValueError(f"jit=False is only available for parallel=None or 'shard_map', got parallel={parallel!r}")
  donate_argnums = (0,) if donate else ()

  if parallel is None:
    step = _step_fn(model, tx, loss_fn, axis_name=None, sync_batch_stats=sync_batch_stats)
    return jax.jit(step, donate_argnums=donate_argnums) if jit else step

  batch_axes = axis_name if group_axis is None else (group_axis, axis_name)
  if parallel == "jit":
    mesh = _default_mesh(mesh, axis_name)
    if group_axis is None:
      step = _step_fn(model, tx, loss_fn, axis_name=None, sync_batch_stats=sync_batch_stats)
    else:
      step = _grouped_step_fn(model, tx, loss_fn, num_groups=mesh.shape[group_axis], group_axis=group_axis)
    replicated = NamedSharding(mesh, P())
    return jax.jit(
      step,
      in_shardings=(replicated, NamedSharding(mesh, _batch_spec(batch_axes))),
      out_shardings=(replicated, replicated),
      donate_argnums=donate_argnums,
    )

  # Gradients, metrics and running statistics reduce over every device; the model's BatchNorm over axis_name.
  local_step = _step_fn(model, tx, loss_fn, axis_name=batch_axes, sync_batch_stats=sync_batch_stats)

  if parallel == "pmap":
    devices = _pmap_devices(mesh)
    return jax.pmap(local_step, axis_name=axis_name, devices=devices, out_axes=(0, None), donate_argnums=donate_argnums)

  # shard_map. check_vma=False: pmap's semantics, where the gradient of replicated parameters is each
  # device's own and the psum above makes it global (with varying-axis checks JAX would insert that psum
  # itself, and the explicit one would count it twice).
  mesh = _default_mesh(mesh, axis_name)
  per_device = not sync_batch_stats
  per_device_spec = _batch_spec(batch_axes)
  state_specs = TrainState._make([P()] * len(TrainState._fields))._replace(
    batch_stats=per_device_spec if per_device else P()
  )

  def shard_step(state, batch):
    if per_device:  # each device holds its (1, ...) slice of the stacked per-device statistics
      state = state._replace(batch_stats=jax.tree.map(lambda a: a[0], state.batch_stats))
    new_state, metrics = local_step(state, batch)
    if per_device:
      new_state = new_state._replace(batch_stats=jax.tree.map(lambda a: a[None], new_state.batch_stats))
    return new_state, metrics

  sharded = jax.shard_map(
    shard_step,
    mesh=mesh,
    in_specs=(state_specs, _batch_spec(batch_axes)),
    out_specs=(state_specs, P()),
    check_vma=False,
  )
  return jax.jit(sharded, donate_argnums=donate_argnums) if jit else sharded


def make_eval_step(
  model,
  loss_fn: LossFn = softmax_cross_entropy,
  *,
  parallel: str | None = None,
  mesh: Mesh | None = None,
  axis_name: str = "batch",
  jit: bool = True,
  group_axis: str | None = None,
) -> Callable[[TrainState, Batch], dict[str, jax.Array]]:
  """Builds `eval_step(state, (x, labels)) -> metrics`, the model in evaluation mode (running statistics).

  Arguments and layouts are those of `make_train_step`; metrics are the example-weighted means over the
  global batch. A BatchNorm built with `axis_name` does not synchronise in evaluation mode, so the same
  model serves both steps. Under "shard_map" the state's `batch_stats` are replicated: to evaluate a state
  trained with `sync_batch_stats=False`, pick one device's statistics first, e.g.
  `state._replace(batch_stats=unreplicate(state.batch_stats))`.
  """
  _check_parallel(parallel, mesh, axis_name, model, group_axis)
  batch_spec = _batch_spec(axis_name if group_axis is None else (group_axis, axis_name))
  if not jit and parallel in ("pmap", "jit"):
    raise ValueError(f"jit=False is only available for parallel=None or 'shard_map', got parallel={parallel!r}")
  if parallel is None:
    evaluate = _eval_fn(model, loss_fn, axis_name=None)
    return jax.jit(evaluate) if jit else evaluate
  if parallel == "jit":
    mesh = _default_mesh(mesh, axis_name)
    evaluate = _eval_fn(model, loss_fn, axis_name=None)
    return jax.jit(
      evaluate,
      in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, batch_spec)),
      out_shardings=NamedSharding(mesh, P()),
    )
  evaluate = _eval_fn(model, loss_fn, axis_name=axis_name if group_axis is None else (group_axis, axis_name))
  if parallel == "pmap":
    return jax.pmap(evaluate, axis_name=axis_name, devices=_pmap_devices(mesh), out_axes=None)
  mesh = _default_mesh(mesh, axis_name)
  sharded = jax.shard_map(evaluate, mesh=mesh, in_specs=(P(), batch_spec), out_specs=P(), check_vma=False)
  return jax.jit(sharded) if jit else sharded
