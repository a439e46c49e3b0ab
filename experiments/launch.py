"""Runs N local processes of a command as one `jax.distributed` job, e.g. to test multi-process training on CPU.

    python -m experiments.launch --processes 2 --devices-per-process 2 [--port P] [--timeout S] -- python train.py

starts `python train.py` twice as a simulated SLURM job step on 127.0.0.1. Each child calls
`experiments.launch.initialize()` (or `maybe_initialize()`) before any other JAX call, which calls
`jax.distributed.initialize()` without a coordinator, process count or id: JAX's SLURM detection reads them
from the environment, as it would on a real cluster. The two processes then form one JAX system of 2 x 2 host
(CPU) devices: `jax.devices()` lists all 4, `jax.local_devices()` the process's 2, and a sharded `jit` over a
mesh of all 4 runs on both processes at once, its collectives going through Gloo over loopback TCP.

The launcher

* sets, in each child's environment, the variables of a SLURM job step (`SLURM_JOB_ID`, `SLURM_NTASKS`,
  `SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_STEP_NODELIST` and `SLURM_JOB_NODELIST` = `127.0.0.1`,
  `SLURM_STEP_NUM_NODES`) and JAX's `JAX_COORDINATOR_PORT` and `JAX_COORDINATOR_BIND_ADDRESS`
  (`127.0.0.1:PORT`); `BNJAX_INIT_TIMEOUT`, `BNJAX_HEARTBEAT_TIMEOUT` and `BNJAX_SHUTDOWN_TIMEOUT`
  (seconds, JAX has no variables for them), `BNJAX_RENDEZVOUS_ADDRESS` (a second loopback port where the
  processes meet before JAX connects them), `XLA_FLAGS` with
  `--xla_force_host_platform_device_count=<devices-per-process>`, `JAX_PLATFORMS=cpu` (unless set),
  `PYTHONUNBUFFERED=1`, and `PYTHONPATH` led by the repository root, so that a child imports
  `experiments.launch` wherever its script lives;
* checks that the coordinator port is free on 127.0.0.1 before starting anything;
* starts each child in a process group of its own and forwards every line the children print (stdout and
  stderr) prefixed with `[<process id>]`;
* stops the other processes (their whole process groups: SIGTERM, then SIGKILL after 5 s) as soon as one
  fails, names it (process id, exit code or signal, the last lines of its output) and returns its exit
  status; SIGTERM, SIGINT or SIGHUP to the launcher stops every process the same way (status 128 + signal);
* is bounded in time: a process that cannot reach its peers fails within `--timeout` seconds (in
  `initialize`, with a message naming the coordinator), and `--max-time` bounds the whole run (exit status
  124, like `timeout(1)`).

In the child, `initialize()` makes a failure end fast: an uncaught exception exits the process at once
(status 1, or 130 for KeyboardInterrupt) instead of waiting at JAX's shutdown barrier for peers that may
be blocked in a collective; a peer that dies is detected by JAX's heartbeats within
`--heartbeat-timeout` seconds (the survivors exit non-zero with a message naming the task that stopped);
and a process exiting while a peer never reaches the end waits at most `--shutdown-timeout` seconds.

On a real cluster (SLURM, Open MPI, Kubernetes, a Cloud TPU pod) the same `initialize()` finds the job
through JAX's detection; `maybe_initialize("auto")` initializes only when it finds one. Only loopback
addresses are used by the launcher; without `--port` a free port is picked. Run the launcher from the
repository root (the experiments are not installed with bnjax) or with the root on `PYTHONPATH`.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import inspect
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

__all__ = [
  "initialize",
  "maybe_initialize",
  "detect_cluster",
  "launch",
  "main",
  "free_port",
  "check_port_free",
  "ENV_COORDINATOR",
  "ENV_NUM_PROCESSES",
  "ENV_PROCESS_ID",
  "ENV_INIT_TIMEOUT",
  "ENV_HEARTBEAT_TIMEOUT",
  "ENV_SHUTDOWN_TIMEOUT",
  "ENV_RENDEZVOUS",
  "ENV_STATUS_DIR",
]

ENV_COORDINATOR = "BNJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "BNJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "BNJAX_PROCESS_ID"
ENV_INIT_TIMEOUT = "BNJAX_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "BNJAX_HEARTBEAT_TIMEOUT"
ENV_SHUTDOWN_TIMEOUT = "BNJAX_SHUTDOWN_TIMEOUT"
ENV_RENDEZVOUS = "BNJAX_RENDEZVOUS_ADDRESS"
ENV_STATUS_DIR = "BNJAX_STATUS_DIR"

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_TIMEOUT_EXIT_STATUS = 124  # timeout(1)'s status for "ran out of time"
_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when stopping the other processes
_INIT_TIMEOUT = 300  # JAX's default
_HEARTBEAT_TIMEOUT = 20  # JAX's default (100 s) would leave a dead peer unnoticed for minutes
_SHUTDOWN_TIMEOUT = 30  # JAX's default (300 s) would keep a failed job alive for minutes
_SLOW_SHUTDOWN_NOTICE = 5.0  # seconds at the shutdown barrier before a child says why it waits
_SETTLE_SECONDS = 1.0  # after a failure, to see which process ended first
_TAIL_LINES = 20  # of a failed process's output, repeated in the launcher's message
_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")
_PF_EXITING = 0x4  # /proc/<pid>/stat's flags: the process is exiting
_PIDS_FILE = "pids.json"  # in the status folder: {process id: pid}, written once every child started
_STACK_ADDRESS = re.compile(r"\s*@\s+0x[0-9a-f]+\s")  # a frame of absl's fatal-error stack trace
# Gloo's report of each connection it makes: noise in every run, shown with `verbose`.
_RUNTIME_CHATTER = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks")


# ------------------------------------------------------------------------------------------------------
# In the child.
# ------------------------------------------------------------------------------------------------------


def _env_int(name: str, environ, default: int | None = None) -> int:
  value = environ.get(name)
  if value is None and default is not None:
    return default
  if value is None:
    raise RuntimeError(
      f"environment variable {name} is not set: experiments.launch.initialize() runs in a process started by "
      "`python -m experiments.launch --processes N -- <command>`"
    )
  try:
    return int(value)
  except ValueError:
    raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def _explicit_job(environ) -> tuple[str, int, int] | None:
  """The job named by `BNJAX_COORDINATOR_ADDRESS`, `BNJAX_NUM_PROCESSES` and `BNJAX_PROCESS_ID`, if set."""
  coordinator = environ.get(ENV_COORDINATOR)
  if not coordinator:
    return None
  return coordinator, _env_int(ENV_NUM_PROCESSES, environ), _env_int(ENV_PROCESS_ID, environ)


def detect_cluster() -> tuple[str, str, int, int] | None:
  """The cluster JAX's `jax.distributed.initialize()` would find from this environment, if any.

  Reads what JAX's own detectors read (`jax._src.clusters`): SLURM's `SLURM_*` variables (as the launcher
  sets them), Open MPI's `OMPI_MCA_orte_hnp_uri`, Kubernetes' `KUBERNETES_SERVICE_HOST`, a Cloud TPU VM's
  metadata; `JAX_COORDINATOR_PORT` overrides the port.

  Returns:
    `(name, coordinator_address, num_processes, process_id)`, or None outside a cluster.
  """
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
  except ImportError:  # another JAX layout: no detection to mirror
    return None
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if env.opt_in_only_method or not env.is_env_present():
      continue
    port = os.environ.get("JAX_COORDINATOR_PORT")
    coordinator = env.get_coordinator_address(timeout_secs=None, override_coordinator_port=port)
    return env.name, coordinator, env.get_process_count(), env.get_process_id()
  return None


def maybe_initialize(mode: str = "auto") -> bool:
  """Joins the job this process belongs to, if any: `initialize()` under a cluster, nothing otherwise.

  Args:
    mode: "auto" initializes when a cluster of more than one process is detected (`detect_cluster`) or the
      `BNJAX_*` job variables are set; "on" always (failing outside a job); "off" never.

  Returns:
    Whether `jax.distributed` is initialized (also when it already was).

  Raises:
    ValueError: for a `mode` other than "auto", "on" or "off".
    RuntimeError: as `initialize`.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}")
  import jax  # pylint: disable=g-import-not-at-top

  if jax.distributed.is_initialized():
    return True
  if mode == "off":
    return False
  if mode == "auto" and _explicit_job(os.environ) is None:
    cluster = detect_cluster()
    if cluster is None or cluster[2] < 2:  # one process: nothing to join
      return False
  initialize()
  return True


_DISTRIBUTED = ("train",)  # the many-seed experiments parallelize over models, on one process's devices


@contextlib.contextmanager
def job_workdir(mode: str, workdir: str, names: Sequence[str]):
  """For `python -m experiments`: joins the job (`maybe_initialize(mode)`) when `names` can run on many processes.

  Process 0 owns the run folder and prints the results; the others get a scratch workdir, removed afterwards,
  and print only to stderr.

  Args:
    mode: "auto", "on" or "off" (`--distributed`).
    workdir: the `--workdir` given.
    names: the experiments to run.

  Returns:
    A context manager giving the workdir this process writes to.

  Raises:
    ValueError: for `mode` "on" with experiments that run on one process.
  """
  names = tuple(names)
  if mode == "on" and names != _DISTRIBUTED:
    raise ValueError(
      f"--distributed=on: got experiments {list(names)}; expected only {list(_DISTRIBUTED)} (the others run on one "
      "process)"
    )
  if names != _DISTRIBUTED or not maybe_initialize(mode):
    yield workdir
    return
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    yield workdir
    return
  with (
    tempfile.TemporaryDirectory(prefix=f"experiments-process-{jax.process_index()}-") as scratch,
    open(os.devnull, "w") as quiet,
    contextlib.redirect_stdout(quiet),  # results are process 0's to print; errors still reach stderr
  ):
    yield scratch


def initialize(environ=None) -> None:
  """Joins this process to the others of its job: `jax.distributed.initialize()` from the environment.

  Call it first thing in the child, before any JAX computation (the backend must not be initialized yet).
  Under the launcher or a cluster JAX detects, `jax.distributed.initialize` gets no coordinator, process
  count or id: JAX reads them itself. It selects Gloo for cross-process CPU collectives (on 127.0.0.1 under
  the launcher), waits at most `BNJAX_INIT_TIMEOUT` seconds (default 300) for every process to arrive,
  bounds JAX's failure detection by `BNJAX_HEARTBEAT_TIMEOUT` and `BNJAX_SHUTDOWN_TIMEOUT`, and makes an
  uncaught exception exit the process at once rather than wait at the shutdown barrier for peers that may
  never get there. `BNJAX_COORDINATOR_ADDRESS`, `BNJAX_NUM_PROCESSES` and `BNJAX_PROCESS_ID`, when set,
  name a job outside any cluster.

  Args:
    environ: the environment to read (default: `os.environ`); cluster detection reads `os.environ`.

  Raises:
    RuntimeError: outside a job, or if the coordinator's port is taken, or the peers cannot be reached in
      time.
  """
  import jax  # pylint: disable=g-import-not-at-top  (the launcher itself never imports jax)

  environ = os.environ if environ is None else environ
  explicit = _explicit_job(environ)
  cluster = detect_cluster() if explicit is None and environ is os.environ else None
  if explicit is None and cluster is None:
    raise RuntimeError(
      "no job to join: experiments.launch.initialize() runs in a process started by "
      "`python -m experiments.launch --processes N -- <command>` or by a cluster JAX detects (SLURM, Open MPI, "
      f"Kubernetes, Cloud TPU), or with {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} set"
    )
  coordinator, num_processes, process_id = explicit or cluster[1:]
  timeout = _env_int(ENV_INIT_TIMEOUT, environ, _INIT_TIMEOUT)
  heartbeat = _env_int(ENV_HEARTBEAT_TIMEOUT, environ, _HEARTBEAT_TIMEOUT)
  shutdown = _env_int(ENV_SHUTDOWN_TIMEOUT, environ, _SHUTDOWN_TIMEOUT)
  rendezvous = environ.get(ENV_RENDEZVOUS)
  if rendezvous and num_processes > 1:
    # JAX's own wait for missing peers ends in a C++ abort with a terse message; meeting first in Python
    # turns that case into a RuntimeError that says who is missing.
    _rendezvous(rendezvous, num_processes=num_processes, process_id=process_id, timeout=timeout)
  host, port = _split_address(coordinator)
  if process_id == 0 and _is_loopback(host):
    # A taken port makes JAX's coordinator crash with SIGSEGV; say which port instead.
    try:
      check_port_free(port, host=host)
    except ValueError as e:
      raise RuntimeError(f"process 0 of {num_processes}: cannot host the coordinator: {e}") from None
  _gloo(jax, loopback=_is_loopback(host))
  job = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id) if explicit else {}
  options = _supported_options(
    jax.distributed.initialize,
    heartbeat_timeout_seconds=heartbeat,
    shutdown_timeout_seconds=shutdown,
  )
  if explicit and _is_loopback(host):  # JAX's default binds every interface: keep to the address given
    options.update(_supported_options(jax.distributed.initialize, coordinator_bind_address=coordinator))
  try:
    jax.distributed.initialize(initialization_timeout=timeout, **job, **options)
  except Exception as e:  # the runtime raises several types (XlaRuntimeError, RuntimeError, ...)
    raise RuntimeError(
      f"process {process_id} of {num_processes} could not join the others through the coordinator at "
      f"{coordinator} within {timeout} s (a peer never started, exited early, or the port is blocked): {e}"
    ) from e
  if num_processes > 1:
    _fail_fast(process_id, num_processes, shutdown, environ.get(ENV_STATUS_DIR), heartbeat)


def _is_loopback(host: str) -> bool:
  return host in ("127.0.0.1", "localhost", "::1", "[::1]") or host.startswith("127.")


def _supported_options(function, **options) -> dict:
  """The keyword `options` that `function`'s signature accepts (they vary across JAX versions).

  Args:
    function: the callable to inspect.
    **options: candidate keyword arguments.

  Returns:
    The subset of `options` whose names are parameters of `function`.
  """
  parameters = inspect.signature(function).parameters
  return {name: value for name, value in options.items() if name in parameters}


def _gloo(jax, *, loopback: bool) -> None:
  """Selects Gloo for CPU collectives; with `loopback`, listening on 127.0.0.1 where this JAX lets us say so.

  Left alone, Gloo listens on the address the host name resolves to, which need not be loopback.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if not loopback:
    return
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top

    make_collectives, make_client = _jax.make_gloo_tcp_collectives, xla_bridge.make_cpu_client
    register = xla_bridge.register_backend_factory
  except (ImportError, AttributeError):
    return  # another JAX layout: keep its default
  if "hostname" not in (make_collectives.__doc__ or ""):
    return  # this version's Gloo cannot be told an address

  def cpu_client():
    collectives = make_collectives(distributed_client=distributed.global_state.client, hostname="127.0.0.1")
    return make_client(collectives=collectives)

  try:
    register("cpu", cpu_client, priority=0, fail_quietly=False)
  except RuntimeError:
    pass  # the backend exists already: jax.distributed.initialize says so, in its words


class _ProgramExit(SystemExit):
  """The SystemExit of `sys.exit` after `initialize()`: notes the status when the interpreter exits with it.

  Only the interpreter reads `code` with no Python caller (when the exception ended the program), so a
  SystemExit the program catches, even one whose `code` it reads, leaves no note.
  """

  @property
  def code(self):  # pyright: ignore[reportIncompatibleVariableOverride]
    code = SystemExit.code.__get__(self)
    try:
      sys._getframe(1)  # pylint: disable=protected-access
    except ValueError:
      _ENDING_STATUS.append(code)
    return code


_ENDING_STATUS: list = []  # the status `sys.exit` ended the program with (see `_ProgramExit`)


def _status_of(code) -> int:
  if code is None:
    return 0
  return code if isinstance(code, int) else 1  # as the interpreter does: a message exits with 1


def _fail_fast(
  process_id: int, num_processes: int, shutdown: int, status_dir: str | None, heartbeat: int = _HEARTBEAT_TIMEOUT
) -> None:
  """Makes a failing process exit at once, without waiting at JAX's shutdown barrier for the others.

  At exit JAX waits for every process to shut down too; a peer blocked in a collective with this one never
  does, so a failed process would hang there for `shutdown` seconds and then abort, its status lost. Here an
  uncaught exception (status 1, or 130 for KeyboardInterrupt) and `sys.exit(n)` with n != 0 end the
  process as soon as the program ends; a process that ends with 0 still waits, and says so after a while.

  Args:
    process_id: this process's id, for the messages.
    num_processes: the number of processes, for the messages.
    shutdown: the barrier's timeout in seconds, for the message.
    status_dir: the launcher's status folder (peers' pids in, this process's failure out), or None.
    heartbeat: the heartbeat timeout in seconds: how long to wait for JAX to tell which peer was lost.
  """
  me = f"process {process_id} of {num_processes}"
  previous_hook = sys.excepthook
  owner = os.getpid()  # a process forked from this one (a data worker, say) is not a process of the launch

  def excepthook(kind, value, traceback):
    try:
      previous_hook(kind, value, traceback)
    finally:
      if os.getpid() == owner:
        status = 130 if issubclass(kind, KeyboardInterrupt) else 1
        why = f"the uncaught {kind.__name__} above"
        if _LOST_CONNECTION.search(str(value)):
          why += _lost_peers_text(process_id, num_processes, heartbeat)
        _leave(me, process_id, status_dir, status, why)

  def exit(status=None):  # pylint: disable=redefined-builtin
    raise _ProgramExit(status)

  exiting = threading.Event()

  def at_exit():  # registered after JAX's own exit handler, so it runs before the barrier
    status = _status_of(_ENDING_STATUS[-1]) if _ENDING_STATUS else 0
    if status and os.getpid() == owner:
      _leave(me, process_id, status_dir, status, "sys.exit")
    exiting.set()

  sys.excepthook = excepthook
  sys.exit = exit
  # Started now: a thread cannot be started once the interpreter is exiting.
  threading.Thread(target=_explain_the_wait, args=(exiting, me, shutdown), daemon=True).start()
  atexit.register(at_exit)


# A collective or the coordination service lost a peer (Gloo's "Connection reset by peer", a heartbeat).
_LOST_CONNECTION = re.compile(r"Gloo|[Cc]onnection|heartbeat|UNAVAILABLE|peer", re.I)


def _lost_peers_text(process_id: int, num_processes: int, heartbeat: int) -> str:
  """ ", process(es) [..] of n lost" from JAX's coordination service, or "" when it cannot tell in time.

  Gloo names only a socket; the coordination service knows the task, once its heartbeats stop (at most
  `heartbeat` seconds). Asked from a thread: the call waits for the live tasks and must not hold us longer.
  """
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top

    client = distributed.global_state.client
  except ImportError:
    return ""
  if client is None:
    return ""
  found: list = []

  def ask():
    try:
      found.append(client.get_live_nodes(list(range(num_processes))))
    except Exception:  # noqa: BLE001  the runtime raises several types; only a hint for the message
      pass

  thread = threading.Thread(target=ask, daemon=True)
  thread.start()
  thread.join(heartbeat + 10)
  lost = sorted(set(range(num_processes)) - set(found[0])) if found else []
  return f"; lost peer: process {', '.join(map(str, lost))} of {num_processes} (task {lost[0]})" if lost else ""


def _leave(me: str, process_id: int, status_dir: str | None, status: int, why: str) -> None:
  """Reports the failure (to the launcher and on stderr) and exits with `status` now.

  Args:
    me: "process i of n", for the message.
    process_id: this process's id.
    status_dir: the launcher's status folder, or None.
    status: the exit status.
    why: what failed, for the message.
  """
  try:
    ended = _peers_ended(status_dir, process_id) if status_dir else []
    if ended:  # this failure is most likely the consequence: say which peer went first
      why += f", after process {', '.join(map(str, ended))} ended"
    if status_dir:
      _record_failure(status_dir, process_id, status, ended)
    print(f"{me}: exiting with status {status} ({why}), without waiting for the other processes", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
  finally:
    os._exit(status)  # pylint: disable=protected-access


def _explain_the_wait(exiting: threading.Event, me: str, shutdown: int) -> None:
  """Once `exiting` is set, says after a while why the process is still there (the shutdown barrier)."""
  exiting.wait()
  time.sleep(min(_SLOW_SHUTDOWN_NOTICE, shutdown / 2))
  print(
    f"{me}: exiting, but waiting at JAX's shutdown barrier for the other processes (at most {shutdown} s; a "
    "peer blocked in a collective with this one never arrives)",
    file=sys.stderr,
    flush=True,
  )


def _ended(pid: int) -> bool:
  """Whether process `pid` has ended or is ending (a zombie, or exiting); False when that cannot be told."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except OSError:  # not ours to signal: alive
    return False
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    state, flags = fields[0], int(fields[6])
  except (OSError, IndexError, ValueError):  # no /proc: take it as alive
    return False
  # Its sockets close while it exits, before it is a zombie: a peer may fail (and look) in between.
  return state in ("Z", "X") or bool(flags & _PF_EXITING)


def _peers_ended(status_dir: str, process_id: int) -> list[int]:
  """The ids of the other processes of the launch that have ended, from the pids in `status_dir`."""
  try:
    with open(os.path.join(status_dir, _PIDS_FILE)) as f:
      pids = json.load(f)
  except (OSError, ValueError):
    return []
  return sorted(int(i) for i, pid in pids.items() if int(i) != process_id and _ended(int(pid)))


def _record_failure(status_dir: str, process_id: int, status: int, after: list[int]) -> None:
  """Tells the launcher this process failed, and which peers had ended before (whose failure caused it)."""
  _write_json(os.path.join(status_dir, f"failed-{process_id}.json"), {"status": status, "after": after})


def _write_json(path: str, value) -> None:
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(value, f)
    os.replace(tmp, path)  # a reader sees the whole file or none
  except OSError:
    pass  # only a hint for the launcher's message


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise RuntimeError(f"expected an address HOST:PORT, got {address!r}")
  return host, int(port)


def _rendezvous(address: str, *, num_processes: int, process_id: int, timeout: float) -> None:
  """A barrier over TCP: returns once all `num_processes` processes have arrived, or raises in `timeout` s.

  Process 0 listens at `address`; each other process connects (retrying until process 0 listens), sends
  its id, and waits for process 0's go-ahead, which comes once every id has arrived.
  """
  host, port = _split_address(address)
  deadline = time.monotonic() + timeout
  if process_id == 0:
    _rendezvous_host(host, port, num_processes, deadline, timeout)
  else:
    _rendezvous_join(host, port, num_processes, process_id, deadline, timeout)


def _rendezvous_host(host, port, num_processes, deadline, timeout) -> None:
  arrived: dict[int, socket.socket] = {}
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      server.bind((host, port))
    except OSError as e:
      raise RuntimeError(
        f"process 0 of {num_processes}: cannot open the rendezvous at {host}:{port}: {e.strerror or e} "
        "(is another program using the port?)"
      ) from None
    server.listen(num_processes)
    try:
      while len(arrived) < num_processes - 1:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          missing = sorted(set(range(1, num_processes)) - set(arrived))
          raise RuntimeError(
            f"process 0 of {num_processes}: process(es) {missing} did not arrive at {host}:{port} within "
            f"{timeout:g} s (did they start, and call experiments.launch.initialize()?)"
          )
        server.settimeout(remaining)
        try:
          conn, _ = server.accept()
          conn.settimeout(max(0.1, deadline - time.monotonic()))
          peer = int(conn.makefile("r").readline().strip() or -1)
        except (OSError, ValueError):  # socket.timeout is an OSError
          continue
        if 0 < peer < num_processes:
          arrived[peer] = conn
        else:
          conn.close()
      for conn in arrived.values():
        conn.sendall(b"go\n")
    finally:
      for conn in arrived.values():
        conn.close()


def _rendezvous_join(host, port, num_processes, process_id, deadline, timeout) -> None:
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=max(0.1, min(1.0, deadline - time.monotonic())))
      break
    except OSError:
      if time.monotonic() > deadline:
        raise RuntimeError(
          f"process {process_id} of {num_processes}: process 0 did not open {host}:{port} within {timeout:g} s "
          "(did it start, and call experiments.launch.initialize()?)"
        ) from None
      time.sleep(0.1)
  with conn:
    conn.settimeout(max(0.1, deadline - time.monotonic()))
    try:
      conn.sendall(f"{process_id}\n".encode())
      reply = conn.makefile("r").readline().strip()
    except OSError:  # socket.timeout among them
      reply = ""
  if reply != "go":
    raise RuntimeError(
      f"process {process_id} of {num_processes}: the other processes did not all arrive at {host}:{port} "
      f"within {timeout:g} s (see process 0's message for who is missing)"
    )


# ------------------------------------------------------------------------------------------------------
# The launcher.
# ------------------------------------------------------------------------------------------------------


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (another program may still take it before it is used)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
  """Raises unless a TCP server could listen on `host:port` now (as the coordinator will).

  Args:
    port: the TCP port.
    host: the address to bind; only loopback addresses are used.

  Raises:
    ValueError: naming the address, when it is taken (or cannot be bound at all).
  """
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: ignore TIME_WAIT leftovers
    try:
      s.bind((host, port))
      s.listen(1)
    except OSError as e:
      raise ValueError(
        f"port {port}: {host}:{port} is already in use or cannot be bound ({e.strerror or e}); expected a free "
        "port (omit --port to pick one)"
      ) from None


# Variables that would name another job to JAX (or to `initialize`) than the launcher's.
_FOREIGN_JOB = (
  ENV_COORDINATOR,
  ENV_NUM_PROCESSES,
  ENV_PROCESS_ID,
  "JAX_COORDINATOR_ADDRESS",
  "JAX_LOCAL_DEVICE_IDS",
  "OMPI_MCA_orte_hnp_uri",
  "KUBERNETES_SERVICE_HOST",
)


def _slurm_step(port: int, *, num_processes: int, process_id: int) -> dict:
  """The variables of task `process_id` of a one-node SLURM job step on 127.0.0.1, as JAX's detection reads them.

  The coordinator's port comes from `JAX_COORDINATOR_PORT` (SLURM's own would be derived from the job id),
  and `JAX_COORDINATOR_BIND_ADDRESS` keeps it on loopback (JAX binds every interface by default).
  """
  return {
    "SLURM_JOB_ID": str(port),
    "SLURM_NTASKS": str(num_processes),
    "SLURM_PROCID": str(process_id),
    "SLURM_LOCALID": str(process_id),
    "SLURM_STEP_NODELIST": "127.0.0.1",
    "SLURM_JOB_NODELIST": "127.0.0.1",
    "SLURM_STEP_NUM_NODES": "1",
    "JAX_COORDINATOR_PORT": str(port),
    "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
  }


# The folder that holds the experiments package (it is not installed with bnjax).
_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env(
  base,
  *,
  port,
  rendezvous_port,
  num_processes,
  process_id,
  devices_per_process,
  init_timeout,
  heartbeat_timeout=_HEARTBEAT_TIMEOUT,
  shutdown_timeout=_SHUTDOWN_TIMEOUT,
  status_dir=None,
):
  # Whatever job the launcher itself runs in is not the children's: they see only the simulated one.
  env = {k: v for k, v in base.items() if k not in _FOREIGN_JOB and not k.startswith("SLURM_")}
  env.update(_slurm_step(port, num_processes=num_processes, process_id=process_id))
  env[ENV_INIT_TIMEOUT] = str(init_timeout)
  env[ENV_HEARTBEAT_TIMEOUT] = str(heartbeat_timeout)
  env[ENV_SHUTDOWN_TIMEOUT] = str(shutdown_timeout)
  env[ENV_RENDEZVOUS] = f"127.0.0.1:{rendezvous_port}"
  if status_dir is not None:
    env[ENV_STATUS_DIR] = status_dir
  else:
    env.pop(ENV_STATUS_DIR, None)
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONUNBUFFERED"] = "1"
  # The children import this module (`from experiments import launch`) wherever their script lives.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, (_REPOSITORY_ROOT, env.get("PYTHONPATH"))))
  if devices_per_process is not None:
    # Replace any device count inherited from the caller (e.g. a test runner's 8 devices).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
  return env


class _Child:
  """One started process: its id, the `Popen`, the last lines it printed and the threads that watch it."""

  def __init__(self, index: int, proc: subprocess.Popen):
    self.index = index
    self.proc = proc
    self.tail: collections.deque = collections.deque(maxlen=_TAIL_LINES)
    self.forwarder: threading.Thread | None = None
    self.output_closed_at: float | None = None  # its output's end: when it exited, unless a descendant holds it
    self.reaped_at: float | None = None

  def ended_at(self) -> float:
    """When the process ended, as closely as seen (its output closes before its exit status is ready)."""
    seen = [t for t in (self.output_closed_at, self.reaped_at) if t is not None]
    return min(seen) if seen else float("inf")


def _start(index: int, command: Sequence[str], env) -> _Child:
  # A session (and process group) of its own: stopping a child also stops whatever it started.
  proc = subprocess.Popen(
    list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
  )
  return _Child(index, proc)


def _watch(child: _Child, exits: queue.Queue, out, lock: threading.Lock, verbose: bool) -> None:
  """Starts the threads that forward `child`'s output and put `(index, returncode)` on `exits` at its end."""
  child.forwarder = threading.Thread(target=_forward, args=(child, out, lock, verbose), daemon=True)
  child.forwarder.start()
  threading.Thread(target=_reap, args=(child, exits), daemon=True).start()


def _forward(child: _Child, out, lock: threading.Lock, verbose: bool) -> None:
  for line in iter(child.proc.stdout.readline, b""):
    text = line.decode("utf-8", errors="replace").rstrip("\n")
    if not verbose and _RUNTIME_CHATTER.match(text):
      continue
    if not _STACK_ADDRESS.match(text):  # a native stack's addresses would crowd out the message
      child.tail.append(text)
    with lock:
      out.write(f"[{child.index}] {text}\n")
      out.flush()
  child.output_closed_at = time.monotonic()
  child.proc.stdout.close()


def _reap(child: _Child, exits: queue.Queue) -> None:
  code = child.proc.wait()
  child.reaped_at = time.monotonic()
  exits.put((child.index, code))


def _signal_group(pid: int, signum: int) -> None:
  try:
    os.killpg(pid, signum)
  except (ProcessLookupError, PermissionError):
    pass  # the group is gone (a PermissionError: on some systems, for a group of zombies only)


def _stop(children: Sequence[_Child]) -> None:
  """SIGTERM to every child's process group, then SIGKILL to those left after a grace period.

  A child that has exited may have left processes of its own in its group: they are stopped too.
  """
  for child in children:
    _signal_group(child.proc.pid, signal.SIGTERM)
  deadline = time.monotonic() + _GRACE_SECONDS
  for child in children:
    try:
      child.proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      pass
  for child in children:
    _signal_group(child.proc.pid, signal.SIGKILL)
    child.proc.wait()


def _exit_status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode  # killed by signal s: 128 + s, as shells do


def _how_it_ended(returncode: int) -> str:
  if returncode >= 0:
    return f"exit code {returncode}"
  try:
    name = signal.Signals(-returncode).name
  except ValueError:
    name = f"signal {-returncode}"
  return f"killed by {name} (signal {-returncode})"


def _failure_report(child: _Child, returncode: int, log) -> None:
  """Names the failed process, how it ended, and repeats the last lines of its output."""
  if child.forwarder is not None:
    child.forwarder.join(timeout=2.0)  # the pipe's last lines, unless a descendant still holds it open
  lines = list(child.tail)
  log(
    f"process {child.index} (pid {child.proc.pid}) failed: {_how_it_ended(returncode)}; "
    + (f"the last {len(lines)} line(s) of its output:" if lines else "it printed nothing")
  )
  for line in lines:
    log(f"  [{child.index}] {line}")


class _Stopped(BaseException):
  """Raised in the launcher's main thread by a stop signal (SIGTERM, SIGINT, SIGHUP)."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


class _StopSignals:
  """In the main thread, turns the first SIGTERM, SIGINT or SIGHUP into `_Stopped`; later ones are ignored.

  While `held()`, the signal is noted and raised when the block ends, so that a child being started is
  always recorded (and so stopped). Elsewhere than the main thread no handler can be set: nothing changes.
  """

  def __init__(self):
    self.received: int | None = None
    self.holding = False
    self.ignoring = False
    self.previous: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for name in _STOP_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
          self.previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    del frame
    if self.received is None and not self.ignoring:  # nothing may interrupt the stopping of the children
      self.received = signum
      if not self.holding:
        raise _Stopped(signum)

  def ignore(self) -> None:
    self.ignoring = True

  @contextlib.contextmanager
  def held(self):
    self.holding = True
    try:
      yield
    finally:
      self.holding = False
    if self.received is not None:
      raise _Stopped(self.received)


def launch(
  command: Sequence[str],
  *,
  processes: int,
  devices_per_process: int | None = None,
  port: int | None = None,
  timeout: int = 60,
  max_time: float | None = None,
  heartbeat_timeout: int = _HEARTBEAT_TIMEOUT,
  shutdown_timeout: int = _SHUTDOWN_TIMEOUT,
  env=None,
  out=None,
  verbose: bool = False,
) -> int:
  """Runs `processes` copies of `command` as one `jax.distributed` job; returns the exit status.

  Args:
    command: the program and its arguments, e.g. `["python", "train.py"]`.
    processes: the number of processes, >= 1.
    devices_per_process: host (CPU) devices per process (`--xla_force_host_platform_device_count`); None
      leaves `XLA_FLAGS` as it is.
    port: the coordinator's port on 127.0.0.1; None picks a free one.
    timeout: seconds each process waits in `initialize` for all processes to join.
    max_time: seconds the whole run may take; None for no limit.
    heartbeat_timeout: seconds after which JAX declares a silent process dead (the others then exit).
    shutdown_timeout: seconds an exiting process waits at JAX's shutdown barrier for the others.
    env: the children's base environment (default: this process's).
    out: where the prefixed output goes (default: sys.stdout).
    verbose: also forward the collectives' connection messages (Gloo's), hidden by default.

  Returns:
    0 when every process exits with 0; otherwise the first failing process's status (a signal `s` as
    `128 + s`), 124 when `max_time` ran out, or `128 + s` when the launcher got signal `s`.

  Raises:
    ValueError: for an argument out of range, or a `port` already in use.
  """
  if not command:
    raise ValueError("command must name a program to run, got an empty command")
  for name, value in (
    ("processes", processes),
    ("timeout", timeout),
    ("heartbeat_timeout", heartbeat_timeout),
    ("shutdown_timeout", shutdown_timeout),
  ):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  if devices_per_process is not None and (not isinstance(devices_per_process, int) or devices_per_process < 1):
    raise ValueError(f"devices_per_process must be an int >= 1 or None, got {devices_per_process!r}")
  if port is not None and not (isinstance(port, int) and 0 < port < 65536):
    raise ValueError(f"port must be an int in [1, 65535] or None, got {port!r}")
  if max_time is not None and not max_time > 0:
    raise ValueError(f"max_time must be a positive number of seconds or None, got {max_time!r}")
  if port is not None:
    check_port_free(port)
  out = sys.stdout if out is None else out
  port = free_port() if port is None else port
  rendezvous_port = free_port()
  while rendezvous_port == port:
    rendezvous_port = free_port()
  base = os.environ if env is None else env
  lock = threading.Lock()

  def log(message: str) -> None:
    with lock:
      out.write(f"[launch] {message}\n")
      out.flush()

  children: list[_Child] = []
  exits: queue.Queue = queue.Queue()
  status_dir = tempfile.mkdtemp(prefix="bnjax-launch-")  # the children report their failures here
  try:
    with _StopSignals() as stop_signals:
      try:
        for index in range(processes):
          child_env = _child_env(
            base,
            port=port,
            rendezvous_port=rendezvous_port,
            num_processes=processes,
            process_id=index,
            devices_per_process=devices_per_process,
            init_timeout=timeout,
            heartbeat_timeout=heartbeat_timeout,
            shutdown_timeout=shutdown_timeout,
            status_dir=status_dir,
          )
          with stop_signals.held():
            children.append(_start(index, command, child_env))
          _watch(children[-1], exits, out, lock, verbose)
        _write_json(os.path.join(status_dir, _PIDS_FILE), {c.index: c.proc.pid for c in children})
        status = _wait(children, exits, max_time, log, status_dir)
      except _Stopped as e:
        log(f"got {signal.Signals(e.signum).name}; stopping every process")
        status = 128 + e.signum
      except KeyboardInterrupt:  # SIGINT where no handler could be set (not the main thread)
        log("interrupted; stopping every process")
        status = 130
      except OSError as e:  # e.g. the program does not exist
        log(f"could not start {command[0]!r}: {e}")
        status = 127
      finally:
        stop_signals.ignore()
        _stop(children)
        for child in children:
          if child.forwarder is not None:
            child.forwarder.join(timeout=_GRACE_SECONDS)
        shutil.rmtree(status_dir, ignore_errors=True)
  except _Stopped as e:  # the first signal came while a failure was being handled; the children are stopped
    status = 128 + e.signum
  return status


def _wait(children: Sequence[_Child], exits: queue.Queue, max_time: float | None, log, status_dir: str) -> int:
  """Waits for every child to exit 0 (returns 0), or for the first failure or `max_time` (returns non-zero)."""
  deadline = None if max_time is None else time.monotonic() + max_time
  remaining = len(children)
  while remaining:
    try:
      # Short waits: a stop signal is handled between them.
      index, code = exits.get(timeout=0.1)
    except queue.Empty:
      if deadline is not None and time.monotonic() > deadline:
        log(f"the run exceeded --max-time {max_time:g} s; stopping every process")
        return _TIMEOUT_EXIT_STATUS
      continue
    remaining -= 1
    if code != 0:
      failed = {index: code}
      remaining -= _collect_failures(exits, remaining, failed)
      first, *later = _in_failure_order(failed, children, status_dir)
      log(f"process {first} exited with status {_exit_status(failed[first])}; stopping the {remaining} still running")
      _failure_report(children[first], failed[first], log)
      if later:
        also = ", ".join(f"process {i} ({_how_it_ended(failed[i])})" for i in later)
        log(f"failed after process {first}, likely because of it: {also}")
      return _exit_status(failed[first])
  return 0


def _in_failure_order(failed: dict, children: Sequence[_Child], status_dir: str) -> list[int]:
  """The failed processes' ids, the one that failed first (the likely cause of the others) leading.

  A process that reported failing after a failed peer had ended comes after it; among the rest, the one
  seen to end first leads (the launcher sees ends late, by a few milliseconds, so that comes second).
  """

  def order(index: int):
    record = _read_json(os.path.join(status_dir, f"failed-{index}.json"))
    after = record.get("after", []) if isinstance(record, dict) else []
    return (any(i in failed for i in after), children[index].ended_at())

  return sorted(failed, key=order)


def _collect_failures(exits: queue.Queue, remaining: int, failed: dict) -> int:
  """Waits a moment for other exits, adding the failures to `failed`; returns how many exited.

  A process's failure makes its peers fail in turn (a collective loses its peer), and the launcher may see
  those first: the moment lets it name the process that ended first instead.
  """
  settle = time.monotonic() + _SETTLE_SECONDS
  exited = 0
  while exited < remaining and time.monotonic() < settle:
    try:
      index, code = exits.get(timeout=max(0.0, settle - time.monotonic()))
    except queue.Empty:
      break
    exited += 1
    if code != 0:
      failed[index] = code
  return exited


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.launch",
    description="Run N local processes of a command under jax.distributed (loopback coordinator, CPU devices).",
    epilog="Example: python -m experiments.launch --processes 2 --devices-per-process 2 -- python train.py",
  )
  parser.add_argument("--processes", type=int, required=True, help="number of processes (>= 1)")
  parser.add_argument("--devices-per-process", type=int, default=None, help="host CPU devices per process")
  parser.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument(
    "--timeout", type=int, default=60, help="seconds a process waits for its peers in initialize() (default 60)"
  )
  parser.add_argument("--max-time", type=float, default=None, help="seconds the whole run may take (default: none)")
  parser.add_argument(
    "--heartbeat-timeout",
    type=int,
    default=_HEARTBEAT_TIMEOUT,
    help=f"seconds after which a silent process is declared dead (default {_HEARTBEAT_TIMEOUT})",
  )
  parser.add_argument(
    "--shutdown-timeout",
    type=int,
    default=_SHUTDOWN_TIMEOUT,
    help=f"seconds an exiting process waits for the others at the shutdown barrier (default {_SHUTDOWN_TIMEOUT})",
  )
  parser.add_argument("--verbose", action="store_true", help="also show the collectives' connection messages (Gloo's)")
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- followed by the command to run")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --, e.g. -- python train.py")
  args.command = command
  return args


def command_line(processes: int, program: Sequence[str], *options: str) -> list[str]:
  """The argv that runs `program` as `processes` processes under this launcher, with launcher `options`."""
  return [sys.executable, "-m", "experiments.launch", "--processes", str(processes), *options, "--", *program]


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    return launch(
      args.command,
      processes=args.processes,
      devices_per_process=args.devices_per_process,
      port=args.port,
      timeout=args.timeout,
      max_time=args.max_time,
      heartbeat_timeout=args.heartbeat_timeout,
      shutdown_timeout=args.shutdown_timeout,
      verbose=args.verbose,
    )
  except ValueError as e:
    print(f"python -m experiments.launch: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
