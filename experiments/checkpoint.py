"""Saving and restoring a whole `bnjax.training.TrainState` with Orbax: verified, atomic, one writer at a time.

A checkpoint holds every leaf of the state (step, params, batch_stats, the optimizer state, the rng key)
and a small JSON dictionary `extra` (e.g. the data seed), so a restored run continues exactly where the
saved one stopped: with a data order that is a pure function of the step, the resumed run's final state is
bit-identical to an uninterrupted one.

Layout: `directory/<step>/{state, extra, digest.json}`, one folder per step. Orbax writes the step into
`directory/<step>.orbax-checkpoint-tmp` and renames it to `directory/<step>` once everything is on disk
(`AtomicRenameTemporaryPath`); then the step is *sealed*: `digest.json` (written atomically) records the
size and sha256 of every file of the step and the sha256 of the state's arrays. A step is complete once
sealed. `restore` checks the files against the digest before reading them and the restored arrays after,
so flipped, truncated or missing bytes raise `CorruptCheckpointError` instead of giving another state.
Without an explicit step, `restore` takes the newest intact checkpoint and warns (`CheckpointWarning`)
about each newer one it skipped; `resume`, for a run that continues, does the same and moves the skipped
folders aside to `<step>.skipped-<UTC time>` (kept, never deleted) so those steps can be written again.
A save cut short leaves a temporary folder, or an unsealed step, that readers skip and the next save
cleans up; at most `keep` sealed checkpoints are kept, the oldest deleted first (after the new one is
sealed).

One writer: `save`, `resume` and `writer` (which a training loop holds for its whole run) take
`directory/writer.lock` (`experiments.files.exclusive`: an advisory `flock` on a file naming the owner's
pid and host). A second process gets `CheckpointLockedError` naming the owner. The kernel drops the lock
when its owner dies, so a lock file left by a killed process of this host is taken over, with a
`CheckpointWarning`; one naming another host is refused (its process cannot be checked from here).

Saves are synchronous (no Orbax background threads): a failing save raises at once and leaves nothing that
delays the interpreter's exit, and a checkpoint folder that is a file, or under one, is refused before
Orbax sees it.

`jax.random` keys are stored as their raw `key_data` (uint32) and rewrapped with the target's key
implementation on restore, so checkpoints are plain arrays. Orbax is imported lazily: it is in the
`experiments` extra (`pip install 'bnjax[experiments]'`).

On many processes (`jax.distributed`), every process calls `save`, `restore` and `resume` with the same
arguments and global (e.g. replicated) arrays; the primary process alone locks, seals, prunes and moves
folders aside. A `pmap`-layout state (leading device axis) is saved as it is, or
`bnjax.training.unreplicate`d first to save one copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import os
import pathlib
import shutil
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import files

__all__ = [
  "save",
  "restore",
  "resume",
  "verify",
  "writer",
  "latest_step",
  "all_steps",
  "Resumed",
  "CheckpointError",
  "CorruptCheckpointError",
  "CheckpointLockedError",
  "CheckpointOrderError",
  "CheckpointWarning",
]

PyTree = Any
PathLike = str | os.PathLike

DIGEST_FILE = "digest.json"
LOCK_FILE = files.LOCK_FILE
DIGEST_FORMAT = "experiments.checkpoint/1"
_TMP_MARK = ".orbax-checkpoint-tmp"
_DELETING = ".deleting-"


class CheckpointError(Exception):
  """A checkpoint folder that cannot be used as asked: corrupt, locked by another writer, out of order."""


class CorruptCheckpointError(CheckpointError, ValueError):
  """A checkpoint step whose content differs from its digest, or that has none (a save cut short)."""

  def __init__(self, path: pathlib.Path, step: int | None, reason: str):
    self.path, self.step, self.reason = path, step, reason
    where = f"checkpoint step {step} in {path}" if step is not None else f"checkpoint folder {path}"
    super().__init__(f"{where} is corrupt or incomplete: {reason}")


class CheckpointLockedError(CheckpointError, RuntimeError):
  """Another process holds the checkpoint folder's writer lock."""


class CheckpointOrderError(CheckpointError, ValueError):
  """A save of a step before the folder's latest one."""


class CheckpointWarning(UserWarning):
  """A checkpoint skipped on restore, or a stale writer lock taken over."""


@dataclasses.dataclass
class Resumed:
  """What `resume` found: the restored state (the target when ``step`` is None), its extra, its step, and
  the newer steps it skipped, newest first, as ``(step, reason)``."""

  state: PyTree
  extra: dict
  step: int | None
  skipped: list


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
      "experiments.checkpoint needs the orbax-checkpoint package: pip install 'bnjax[experiments]' "
      "(or pip install orbax-checkpoint)"
    ) from e
  return ocp


def _checkpointer(ocp):
  # Synchronous: no background threads that could outlive a failed save and hold the interpreter at exit.
  return ocp.Checkpointer(
    ocp.CompositeCheckpointHandler(), temporary_path_class=ocp.path.atomicity.AtomicRenameTemporaryPath
  )


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


def _primary() -> bool:
  return jax.process_index() == 0


_sync_count = itertools.count()


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(f"experiments.checkpoint.{tag}.{next(_sync_count)}")


def _utc_stamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


# ---------------------------------------------------------------------------------------------------------
# The folder and its writer lock.


def _unwritable(path: pathlib.Path, error: OSError) -> OSError:
  return type(error)(
    f"checkpoint directory {path} cannot be written ({error.strerror or error}); "
    "expected a folder this process can create files in"
  )


def _ready_directory(path: pathlib.Path) -> pathlib.Path:
  """``path``, created if missing; a clear error when it, or a parent, is a file or cannot be created."""
  existing = next((p for p in (path, *path.parents) if p.exists()), None)
  if existing is not None and not existing.is_dir():
    where = "is a file" if existing == path else f"is under {existing}, which is a file"
    raise NotADirectoryError(f"checkpoint directory {path} {where}; expected a folder (or a path to create one at)")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise _unwritable(path, e) from e
  return path


@contextlib.contextmanager
def writer(directory: PathLike) -> Iterator[pathlib.Path]:
  """Holds the writer lock of checkpoint folder ``directory`` (created if missing) for the block.

  Re-entrant within a process, so a training loop holds it for its run and its `save` calls pass through.

  Args:
    directory: the checkpoint folder.

  Returns:
    A context manager giving the folder's absolute path.

  Raises:
    CheckpointLockedError: if another live process holds the lock.
    NotADirectoryError: if ``directory``, or a parent, is a file.
    OSError: if the folder cannot be created or written.
  """
  path = _ready_directory(_directory(directory))
  if not _primary():  # One lock per job: the primary process holds it for all of them.
    yield path
    return
  with files.exclusive(path, what="checkpoint directory", error=CheckpointLockedError, warning=CheckpointWarning):
    yield path


# ---------------------------------------------------------------------------------------------------------
# Digests.


def _sha256_file(path: pathlib.Path, *, sync: bool = False) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
    if sync:
      os.fsync(f.fileno())
  return digest.hexdigest()


def _arrays_digest(tree: PyTree) -> tuple[str | None, list | None]:
  """sha256 over the dtype, shape and bytes of every leaf (pytree order), and each leaf's [dtype, shape].

  A replicated leaf spanning many processes is hashed from this process's copy, so every process of a job,
  and a job of another process count, computes the same digest. None for both when a leaf is split across
  processes (that process's files are checked instead).
  """
  leaves = [_this_copy(leaf) for leaf in jax.tree.leaves(tree)]
  if any(isinstance(leaf, jax.Array) and not leaf.is_fully_addressable for leaf in leaves):
    return None, None
  digest, described = hashlib.sha256(), []
  for leaf in leaves:
    array = np.asarray(leaf)
    digest.update(f"{array.dtype.name}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    described.append([array.dtype.name, list(array.shape)])
  return digest.hexdigest(), described


def _this_copy(leaf: Any) -> Any:
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and leaf.is_fully_replicated:
    return leaf.addressable_data(0)
  return leaf


def _seal(step_dir: pathlib.Path, step: int, arrays: tuple[str | None, list | None]) -> None:
  """Writes ``step_dir/digest.json`` once every file of the step is on disk (each fsynced as it is hashed)."""
  listed = {}
  for file in sorted(step_dir.rglob("*")):
    rel = file.relative_to(step_dir).as_posix()
    if file.is_dir():
      files.fsync_dir(file)
    elif rel != DIGEST_FILE:
      listed[rel] = {"size": file.stat().st_size, "sha256": _sha256_file(file, sync=True)}
  record = {"format": DIGEST_FORMAT, "step": step, "arrays_sha256": arrays[0], "leaves": arrays[1], "files": listed}
  files.write_atomic(step_dir / DIGEST_FILE, json.dumps(record, indent=1) + "\n")
  files.fsync_dir(step_dir.parent)


def _check_files(path: pathlib.Path, step: int) -> dict:
  """The digest record of ``step`` once every file it lists matches; CorruptCheckpointError otherwise."""
  step_dir = path / str(step)
  digest_path = step_dir / DIGEST_FILE
  if not digest_path.is_file():
    raise CorruptCheckpointError(path, step, f"it has no {DIGEST_FILE} (its save was cut short before it was sealed)")
  try:
    record = json.loads(digest_path.read_text())
    listed = record["files"]
    if not isinstance(listed, dict) or not listed:
      raise ValueError("it lists no files")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CorruptCheckpointError(path, step, f"its {DIGEST_FILE} is unreadable ({e})") from e
  if record.get("format") != DIGEST_FORMAT:
    raise CorruptCheckpointError(
      path, step, f"its {DIGEST_FILE} has format {record.get('format')!r}, expected {DIGEST_FORMAT!r}"
    )
  if record.get("step") != step:
    raise CorruptCheckpointError(path, step, f"its {DIGEST_FILE} is that of step {record.get('step')!r}")
  for rel, want in sorted(listed.items()):
    file = step_dir / rel
    if pathlib.PurePosixPath(rel).is_absolute() or ".." in pathlib.PurePosixPath(rel).parts:
      raise CorruptCheckpointError(path, step, f"its {DIGEST_FILE} lists {rel!r}, outside the step folder")
    if not file.is_file():
      raise CorruptCheckpointError(path, step, f"{rel} is missing")
    try:
      size, sha = file.stat().st_size, _sha256_file(file)
    except OSError as e:
      raise CorruptCheckpointError(path, step, f"{rel} cannot be read ({e})") from e
    if size != want.get("size"):
      raise CorruptCheckpointError(path, step, f"{rel} has {size} bytes, {want.get('size')} when it was saved")
    if sha != want.get("sha256"):
      raise CorruptCheckpointError(path, step, f"the sha256 of {rel} differs from the one recorded when it was saved")
  return record


# ---------------------------------------------------------------------------------------------------------
# Steps.


def _step_folders(path: pathlib.Path) -> list[int]:
  """Steps with a finalized folder (named by the step alone), sealed or not, ascending."""
  if not path.is_dir():
    return []
  return sorted(
    int(p.name)
    for p in path.iterdir()
    if p.name.isascii() and p.name.isdigit() and p.name == str(int(p.name)) and p.is_dir()
  )


def all_steps(directory: PathLike) -> list[int]:
  """The steps with a complete (sealed) checkpoint in `directory`, ascending (`[]` when there is none).

  Sealed is not verified: `verify` and `restore` check a step's bytes against its digest.
  """
  path = _directory(directory)
  return [s for s in _step_folders(path) if (path / str(s) / DIGEST_FILE).is_file()]


def latest_step(directory: PathLike) -> int | None:
  """The largest step whose checkpoint in `directory` is complete and intact, or None (also when it does not
  exist); reads the files of each step it checks, and warns (`CheckpointWarning`) about each newer one
  skipped as corrupt."""
  path = _directory(directory)
  for step in reversed(all_steps(path)):
    try:
      _check_files(path, step)
    except CorruptCheckpointError as e:
      warnings.warn(f"checkpoint step {step} in {path} skipped: {e.reason}", CheckpointWarning, stacklevel=2)
      continue
    return step
  return None


def verify(directory: PathLike, step: int | None = None) -> int:
  """Checks every file of checkpoint `step` (default: the latest complete one) against its digest.

  Args:
    directory: the checkpoint folder.
    step: the step to check; None checks the latest complete one.

  Returns:
    The step checked.

  Raises:
    FileNotFoundError: if there is no such step.
    CorruptCheckpointError: if a file is missing, or its size or sha256 differs, or the step is unsealed.
  """
  path = _directory(directory)
  steps = _step_folders(path)
  if step is None:
    sealed = all_steps(path)
    if not sealed:
      raise FileNotFoundError(f"no complete checkpoint in {path}; finalized steps: {steps}")
    step = sealed[-1]
  step = _check_step(step)
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint step {step} in {path}; saved steps: {steps}")
  _check_files(path, step)
  return step


def _clean_leftovers(path: pathlib.Path) -> None:
  """Removes what saves and deletions cut short left behind (only the lock holder may)."""
  for entry in path.iterdir():
    if _TMP_MARK in entry.name or entry.name.startswith(_DELETING):
      if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
      else:
        entry.unlink(missing_ok=True)


def _discard(path: pathlib.Path, step: int) -> None:
  # Renamed first, so a deletion cut short leaves a name readers ignore, not a step with missing files.
  doomed = path / f"{_DELETING}{step}-{uuid.uuid4().hex[:8]}"
  os.rename(path / str(step), doomed)
  shutil.rmtree(doomed, ignore_errors=True)


def _prune(path: pathlib.Path, keep: int) -> None:
  sealed = all_steps(path)
  if len(sealed) <= keep:
    return
  oldest_kept = sealed[-keep]
  for step in _step_folders(path):
    if step < oldest_kept:
      _discard(path, step)
  files.fsync_dir(path)


def _set_aside(path: pathlib.Path, step: int) -> pathlib.Path:
  stamp = _utc_stamp()
  target = path / f"{step}.skipped-{stamp}"
  for n in itertools.count(1):
    if not target.exists():
      break
    target = path / f"{step}.skipped-{stamp}-{n}"
  os.rename(path / str(step), target)
  files.fsync_dir(path)
  return target


# ---------------------------------------------------------------------------------------------------------
# Save, restore, resume.


def save(
  directory: PathLike,
  state: PyTree,
  *,
  step: int,
  extra: dict[str, Any] | None = None,
  keep: int | None = 3,
) -> pathlib.Path:
  """Writes `state` and `extra` as checkpoint `step` of `directory`, atomically, and seals it with its digest.

  Returns once the step is on disk. Takes the folder's writer lock for the save (see `writer`).

  Args:
    directory: the checkpoint folder (created when missing).
    state: a pytree of arrays, typically a `bnjax.training.TrainState`.
    step: the checkpoint's number, usually `int(state.step)`; it must be after every step in `directory`.
    extra: a JSON-serializable dict stored beside the state (e.g. `{"data_seed": 0}`); None stores `{}`.
    keep: how many sealed checkpoints to keep, the newest; older ones are deleted after this one is sealed.
      None keeps all.

  Returns:
    The path of the written checkpoint, `directory/<step>`.

  Raises:
    FileExistsError: if checkpoint `step` already exists.
    CheckpointOrderError: if `directory` holds a later step than `step`.
    CheckpointLockedError: if another process is writing `directory`.
    NotADirectoryError: if `directory`, or a parent, is a file.
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
  storable = _storable(state)
  with writer(path):
    steps = _step_folders(path)
    if step in steps:
      raise FileExistsError(f"checkpoint step {step} already exists in {path}; saved steps: {steps}")
    if steps and step < steps[-1]:
      raise CheckpointOrderError(
        f"checkpoint step {step} is before the latest step in {path}, {steps[-1]}; expected a step after "
        f"{steps[-1]} (a new run needs a new folder; to go back, move the later steps away)"
      )
    if _primary():
      _clean_leftovers(path)
    final = path / str(step)
    checkpointer = _checkpointer(ocp)
    try:
      checkpointer.save(
        final, args=ocp.args.Composite(state=ocp.args.StandardSave(storable), extra=ocp.args.JsonSave(extra))
      )
    except BaseException:
      if _primary():
        _clean_leftovers(path)
      raise
    finally:
      checkpointer.close()
    if _primary():
      _seal(final, step, _arrays_digest(storable))
      if keep is not None:
        _prune(path, int(keep))
    _sync(f"save.{step}")
  return final


def _check_like(restored: PyTree, target: PyTree, record: dict, step: int, path: pathlib.Path) -> None:
  """Orbax casts and reshapes quietly in some versions; a mismatch here is a wrong target, not data."""
  if jax.tree.structure(restored) != jax.tree.structure(target):
    raise ValueError(f"checkpoint step {step} in {path} has a different tree structure than target_state")
  saved = record.get("leaves")
  leaves = jax.tree_util.tree_flatten_with_path(restored)[0]
  if saved is not None and len(saved) != len(leaves):
    raise ValueError(f"checkpoint step {step} in {path} has {len(saved)} arrays, target_state {len(leaves)}")
  for i, ((key, got), want) in enumerate(zip(leaves, jax.tree.leaves(target), strict=True)):
    if jnp.shape(got) != jnp.shape(want):
      raise ValueError(
        f"checkpoint step {step} in {path}: leaf {jax.tree_util.keystr(key)} has shape {jnp.shape(got)}, "
        f"target_state expects {jnp.shape(want)}"
      )
    if saved is not None and np.dtype(got.dtype).name != saved[i][0]:
      raise ValueError(
        f"checkpoint step {step} in {path}: leaf {jax.tree_util.keystr(key)} was saved as {saved[i][0]}, "
        f"target_state expects {np.dtype(got.dtype).name}"
      )


def _restore_step(path: pathlib.Path, step: int, target_state: PyTree) -> tuple[PyTree, dict]:
  record = _check_files(path, step)
  ocp = _orbax()
  target = _storable(target_state)
  with contextlib.closing(_checkpointer(ocp)) as checkpointer:
    try:
      restored = checkpointer.restore(
        path / str(step),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()),
      )
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
        f"checkpoint step {step} in {path} does not match target_state (structure, shapes or dtypes): {e}"
      ) from e
  _check_like(restored.state, target, record, step, path)
  sha = _arrays_digest(restored.state)[0]
  if record.get("arrays_sha256") is not None and sha is not None and sha != record["arrays_sha256"]:
    raise CorruptCheckpointError(
      path, step, "the sha256 of the restored arrays differs from the one recorded when it was saved"
    )
  return _rewrap(restored.state, target_state), dict(restored.extra or {})


def _newest_intact(path: pathlib.Path, target_state: PyTree, max_step: int | None) -> Resumed:
  skipped = []
  for step in reversed(_step_folders(path)):
    if max_step is not None and step > max_step:
      skipped.append((step, f"it is after step {max_step}, the latest one asked for (max_step)"))
      continue
    try:
      state, extra = _restore_step(path, step, target_state)
    except CorruptCheckpointError as e:
      skipped.append((step, e.reason))
      continue
    return Resumed(state, extra, step, skipped)
  return Resumed(target_state, {}, None, skipped)


def restore(directory: PathLike, target_state: PyTree, *, step: int | None = None) -> tuple[PyTree, dict]:
  """Reads checkpoint `step` (default: the newest intact one) of `directory` into the structure of `target_state`.

  Every file is checked against the step's digest before it is read, and the restored arrays after.

  Args:
    directory: the checkpoint folder.
    target_state: a pytree with the saved state's structure, shapes and dtypes (e.g. a freshly created
      `TrainState`); the restored arrays take its leaves' shardings, its key implementations and its
      container types.
    step: the checkpoint to read; None reads the newest intact one, warning (`CheckpointWarning`) about
      each newer one skipped as corrupt or incomplete.

  Returns:
    `(state, extra)`: the restored state and the saved `extra` dict.

  Raises:
    FileNotFoundError: if `directory` has no checkpoint, or none at `step`.
    CorruptCheckpointError: if checkpoint `step` (or, without `step`, every checkpoint) is corrupt or incomplete.
    ValueError: if the checkpoint's structure, shapes or dtypes do not match `target_state`.
  """
  path = _directory(directory)
  if step is not None:
    step = _check_step(step)
    steps = _step_folders(path)
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint step {step} in {path}; saved steps: {steps}")
    return _restore_step(path, step, target_state)
  found = _newest_intact(path, target_state, None)
  for skipped, reason in found.skipped:
    instead = f"restoring step {found.step} instead" if found.step is not None else "no older step is intact"
    warnings.warn(f"checkpoint step {skipped} in {path} skipped: {reason}; {instead}", CheckpointWarning, stacklevel=2)
  if found.step is not None:
    return found.state, found.extra
  if found.skipped:
    reasons = "; ".join(f"step {s}: {r}" for s, r in found.skipped)
    raise CorruptCheckpointError(path, None, f"no intact checkpoint ({reasons})")
  raise FileNotFoundError(f"no checkpoint in {path}: expected a folder written by experiments.checkpoint.save")


def resume(directory: PathLike, target_state: PyTree, *, max_step: int | None = None) -> Resumed:
  """For a run that continues: restores the newest intact checkpoint and moves every newer step aside.

  Steps skipped as corrupt, unsealed or after `max_step` are renamed to `<step>.skipped-<UTC time>` (kept
  for inspection), so the run can write those steps again. Holds the writer lock meanwhile.

  Args:
    directory: the checkpoint folder (created when missing).
    target_state: as for `restore`; returned as the state when no checkpoint is usable.
    max_step: use no step after this one (e.g. the last step the run's metrics record); None: any.

  Returns:
    A `Resumed`: the state, extra and step restored (`step` None and `state` `target_state` when no
    checkpoint is usable), and the skipped steps with the reason for each, newest first.

  Raises:
    CheckpointLockedError: if another process is writing `directory`.
    ValueError: if a checkpoint does not match `target_state`.
  """
  path = _directory(directory)
  with writer(path):
    found = _newest_intact(path, target_state, max_step)
    _sync("resume.found")
    if _primary():
      for step, _ in found.skipped:
        _set_aside(path, step)
    _sync("resume.set_aside")
  return found
