"""Saving and restoring a whole `bnjax.training.TrainState` with Orbax.

A checkpoint holds every leaf of the state (step, params, batch_stats, the optimizer state, the rng key)
and a small JSON dictionary `extra` (e.g. the data seed), so a restored run continues exactly where the
saved one stopped: with a data order that is a pure function of the step, the resumed run's final state is
bit-identical to an uninterrupted one.

Layout: `directory/<step>/{state, extra}`, one folder per step, written by Orbax's `CheckpointManager`.
A save writes into `directory/<step>.orbax-checkpoint-tmp...` and renames it to `directory/<step>` once
everything is on disk (Orbax's `AtomicRenameTemporaryPath`), so a save cut short leaves only a temporary
folder that readers ignore and the next save cleans up; at most `keep` checkpoints are kept, the oldest
deleted first.

`jax.random` keys are stored as their raw `key_data` (uint32) and rewrapped with the target's key
implementation on restore, so checkpoints are plain arrays. Orbax is imported lazily: it is in the
`experiments` extra (`pip install 'bnjax[experiments]'`).

On many processes (`jax.distributed`), every process calls `save` and `restore` with the same arguments
and global (e.g. replicated) arrays; a `pmap`-layout state (leading device axis) is saved as it is, or
`bnjax.training.unreplicate`d first to save one copy.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["save", "restore", "latest_step", "all_steps"]

PyTree = Any
PathLike = str | os.PathLike


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "experiments.checkpoint needs the orbax-checkpoint package: pip install 'bnjax[experiments]' "
      "(or pip install orbax-checkpoint)"
    ) from e
  return ocp


def _directory(directory: Any) -> pathlib.Path:
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(f"directory must be a str or os.PathLike, got {type(directory).__name__}")
  # Orbax wants absolute paths; resolving here also makes the checkpoint independent of later chdirs.
  return pathlib.Path(directory).expanduser().absolute()


def _check_step(step: Any, arg: str = "step") -> int:
  if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
    raise TypeError(f"{arg} must be a non-negative int, got {step!r}")
  if step < 0:
    raise ValueError(f"{arg} must be a non-negative int, got {step}")
  return int(step)


def _is_key(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _storable(tree: PyTree) -> PyTree:
  """The tree with each typed `jax.random` key replaced by its uint32 `key_data`."""
  return jax.tree.map(lambda a: jax.random.key_data(a) if _is_key(a) else a, tree)


def _rewrap(restored: PyTree, target: PyTree) -> PyTree:
  """Undoes `_storable` using the target's key implementations."""
  return jax.tree.map(
    lambda r, t: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if _is_key(t) else r, restored, target
  )


def _manager(directory: pathlib.Path, *, keep: int | None = None, create: bool = False):
  ocp = _orbax()
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=create,
    temporary_path_class=ocp.path.atomicity.AtomicRenameTemporaryPath,
  )
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "extra"))


def all_steps(directory: PathLike) -> list[int]:
  """The steps with a complete checkpoint in `directory`, ascending (`[]` when there is none)."""
  path = _directory(directory)
  if not path.is_dir():
    return []
  with _manager(path) as manager:
    return sorted(int(s) for s in manager.all_steps())


def latest_step(directory: PathLike) -> int | None:
  """The largest step with a complete checkpoint in `directory`, or None (also when it does not exist)."""
  steps = all_steps(directory)
  return steps[-1] if steps else None


def save(
  directory: PathLike,
  state: PyTree,
  *,
  step: int,
  extra: dict[str, Any] | None = None,
  keep: int | None = 3,
) -> pathlib.Path:
  """Writes `state` and `extra` as checkpoint `step` of `directory`, atomically; waits until it is on disk.

  Args:
    directory: the checkpoint folder (created when missing).
    state: a pytree of arrays, typically a `bnjax.training.TrainState`.
    step: the checkpoint's number, usually `int(state.step)`; it must not exist yet.
    extra: a JSON-serializable dict stored beside the state (e.g. `{"data_seed": 0}`); None stores `{}`.
    keep: how many checkpoints to keep, the newest; older ones are deleted after this one is written.
      None keeps all.

  Returns:
    The path of the written checkpoint, `directory/<step>`.

  Raises:
    FileExistsError: if checkpoint `step` already exists.
    TypeError: if `extra` is not a dict of JSON-serializable values.
  """
  ocp = _orbax()
  path = _directory(directory)
  step = _check_step(step)
  if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1):
    raise ValueError(f"keep must be a positive int or None, got {keep!r}")
  extra = {} if extra is None else extra
  if not isinstance(extra, dict):
    raise TypeError(f"extra must be a dict of JSON-serializable values or None, got {type(extra).__name__}")
  try:
    json.dumps(extra)
  except (TypeError, ValueError) as e:
    raise TypeError(f"extra must be JSON-serializable, got {extra!r}: {e}") from e
  with _manager(path, keep=None if keep is None else int(keep), create=True) as manager:
    if step in manager.all_steps():
      raise FileExistsError(
        f"checkpoint step {step} already exists in {path}; saved steps: {sorted(manager.all_steps())}"
      )
    manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(_storable(state)), extra=ocp.args.JsonSave(extra)),
    )
    manager.wait_until_finished()
  return path / str(step)


def restore(directory: PathLike, target_state: PyTree, *, step: int | None = None) -> tuple[PyTree, dict]:
  """Reads checkpoint `step` (default: the latest) of `directory` into the structure of `target_state`.

  Args:
    directory: the checkpoint folder.
    target_state: a pytree with the saved state's structure, shapes and dtypes (e.g. a freshly created
      `TrainState`); the restored arrays take its leaves' shardings, its key implementations and its
      container types.
    step: the checkpoint to read; None reads the latest.

  Returns:
    `(state, extra)`: the restored state and the saved `extra` dict.

  Raises:
    FileNotFoundError: if `directory` has no checkpoint, or none at `step`.
    ValueError: if the checkpoint's structure or shapes do not match `target_state`.
  """
  ocp = _orbax()
  path = _directory(directory)
  steps = all_steps(path)
  if step is None:
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {path}: expected a folder written by experiments.checkpoint.save")
    step = steps[-1]
  else:
    step = _check_step(step)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint step {step} in {path}; saved steps: {steps}")
  target = _storable(target_state)
  with _manager(path) as manager:
    try:
      restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore())
      )
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
        f"checkpoint step {step} in {path} does not match target_state (structure, shapes or dtypes): {e}"
      ) from e
  state = _rewrap(restored.state, target_state)
  _check_like(state, target_state, step, path)
  return state, dict(restored.extra or {})


def _check_like(state: PyTree, target: PyTree, step: int, path: pathlib.Path) -> None:
  """Orbax casts and reshapes quietly in some versions; a mismatch here is a wrong target, not data."""
  if jax.tree.structure(state) != jax.tree.structure(target):
    raise ValueError(f"checkpoint step {step} in {path} has a different tree structure than target_state")
  for (key, got), want in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(target)):
    if jnp.shape(got) != jnp.shape(want):
      raise ValueError(
        f"checkpoint step {step} in {path}: leaf {jax.tree_util.keystr(key)} has shape {jnp.shape(got)}, "
        f"target_state expects {jnp.shape(want)}"
      )
