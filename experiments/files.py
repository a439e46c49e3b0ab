"""Files that are never seen half-written, and folders with one writer at a time. Nothing here imports jax.

`write_atomic`: a replacement is written to a temporary file in the same folder, flushed and fsynced,
renamed over the target with `os.replace` (atomic on POSIX), and the folder is fsynced so the rename itself
is durable. A process killed at any point leaves the old file intact, at worst beside a hidden
``.<name>.*.partial`` file.

`exclusive`: ``<folder>/writer.lock``, an advisory `flock` on a file naming the owner (pid, host, start
time, command). A second process is refused, naming the owner. The kernel drops the lock when its owner
dies, so a lock file left by a killed process of this host is taken over, with a warning; one naming
another host is refused (its process cannot be checked from here). The lock file is removed on release.
"""

import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
import uuid
import warnings
from collections.abc import Iterator

try:
  import fcntl
except ImportError:  # pragma: no cover - not POSIX: the lock falls back to the owner's pid alone
  fcntl = None

LOCK_FILE = "writer.lock"

PathLike = str | os.PathLike


def fsync_dir(directory: PathLike) -> None:
  """Makes the entries of ``directory`` (creations, renames) durable; a no-op where folders cannot be fsynced.

  Args:
    directory: an existing folder.
  """
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # Some file systems refuse fsync on folders; the rename is still atomic there.
    pass
  finally:
    os.close(fd)


def write_atomic(path: PathLike, data: str | bytes) -> pathlib.Path:
  """Replaces the file ``path`` with ``data`` atomically (temporary file, fsync, rename, fsync the folder).

  Args:
    path: the file to write; its folder must exist.
    data: the new content, text (written as UTF-8) or bytes.

  Returns:
    ``path`` as a `pathlib.Path`.
  """
  path = pathlib.Path(path)
  tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
  payload = data.encode() if isinstance(data, str) else bytes(data)
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(payload)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  fsync_dir(path.parent)
  return path


class LockWarning(UserWarning):
  """A writer lock left by a process that is gone, taken over."""


_held: dict = {}  # folder -> [lock file descriptor, nesting depth]


def _owner_record() -> dict:
  return {
    "pid": os.getpid(),
    "host": socket.gethostname(),
    "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
    "command": " ".join(sys.argv)[:300],
  }


def _read_owner(fd: int):
  try:
    owner = json.loads(os.pread(fd, 1 << 16, 0) or b"null")
  except (OSError, ValueError):
    return None
  return owner if isinstance(owner, dict) else None


def _describe(owner) -> str:
  if not owner:
    return "owner not recorded yet"
  return f"pid {owner.get('pid')} on host {owner.get('host')}, since {owner.get('since')}: {owner.get('command', '')!r}"


def running(pid) -> bool:
  """Whether local process ``pid`` exists and is not a zombie."""
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except (OSError, IndexError):
    return True
  return state not in ("Z", "X")


def _acquire(path: pathlib.Path, what: str, error: type, warning: type) -> int:
  """Takes ``path``'s writer lock; returns its file descriptor, which holds the lock until closed."""
  lock, me = path / LOCK_FILE, _owner_record()
  while True:
    try:
      fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise type(e)(
        f"{what} {path} cannot be written ({e.strerror or e}); expected a folder this process can create files in"
      ) from e
    owner = _read_owner(fd)
    try:
      if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      elif owner and owner.get("pid") != me["pid"] and running(owner.get("pid")):
        raise BlockingIOError
    except BlockingIOError:
      os.close(fd)
      raise error(
        f"{what} {path} is being written by another process ({_describe(owner)}; lock file {lock}); "
        f"expected one writer at a time: wait for it to finish, or stop it"
      ) from None
    try:
      same = os.stat(lock).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # Its holder removed that lock file while we opened it: take the one there now.
  owner = _read_owner(fd)
  if owner and (owner.get("pid"), owner.get("host")) != (me["pid"], me["host"]):
    if owner.get("host") != me["host"]:
      os.close(fd)
      raise error(
        f"{what} {path} has a writer lock of another host ({_describe(owner)}; lock file {lock}), "
        f"which cannot be checked from {me['host']}; expected no other writer: if that process has "
        f"ended, delete {lock}"
      )
    state = "no longer running" if not running(owner.get("pid")) else "running but no longer holding it"
    warnings.warn(
      f"{what} {path}: taking over the writer lock left by {_describe(owner)} ({state})", warning, stacklevel=4
    )
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
  os.fsync(fd)
  return fd


def _release(path: pathlib.Path, fd: int) -> None:
  with contextlib.suppress(OSError):
    os.unlink(path / LOCK_FILE)  # Before closing: a process that opened it meanwhile sees another inode, retries.
  os.close(fd)


@contextlib.contextmanager
def exclusive(
  directory: PathLike, *, what: str = "folder", error: type = RuntimeError, warning: type = LockWarning
) -> Iterator[pathlib.Path]:
  """Holds the writer lock of the existing folder ``directory`` for the block; re-entrant in a process.

  Args:
    directory: the folder to lock.
    what: how messages name the folder (e.g. "checkpoint directory").
    error: the exception raised when another live process holds the lock.
    warning: the warning category for a stale lock taken over.

  Returns:
    A context manager giving the folder's absolute path.
  """
  path = pathlib.Path(directory).absolute()
  held = _held.get(path)
  if held is None:
    held = _held[path] = [_acquire(path, what, error, warning), 0]
  held[1] += 1
  try:
    yield path
  finally:
    held[1] -= 1
    if held[1] == 0:
      del _held[path]
      _release(path, held[0])
