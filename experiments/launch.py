"""Runs N local processes of a command under `jax.distributed`, e.g. to test multi-process training on CPU.

    python -m experiments.launch --processes 2 --devices-per-process 2 [--port P] [--timeout S] -- python train.py

starts `python train.py` twice with a loopback coordinator. Each child calls `experiments.launch.initialize()`
before any other JAX call; the two processes then form one JAX system of 2 x 2 host (CPU) devices:
`jax.devices()` lists all 4, `jax.local_devices()` the process's 2, and a sharded `jit` over a mesh of all 4
runs on both processes at once, its collectives going through Gloo over loopback TCP.

The launcher

* sets, in each child's environment: `BNJAX_COORDINATOR_ADDRESS=127.0.0.1:PORT`, `BNJAX_NUM_PROCESSES`,
  `BNJAX_PROCESS_ID`, `BNJAX_INIT_TIMEOUT` (seconds), `BNJAX_RENDEZVOUS_ADDRESS` (a second loopback port
  where the processes meet before JAX connects them), `XLA_FLAGS` with
  `--xla_force_host_platform_device_count=<devices-per-process>`, `JAX_PLATFORMS=cpu` (unless set),
  `PYTHONUNBUFFERED=1`, and `PYTHONPATH` led by the repository root, so that a child imports
  `experiments.launch` wherever its script lives;
* forwards every line the children print (stdout and stderr) prefixed with `[<process id>]`;
* stops the other processes as soon as one fails, and returns the first failure's exit status (non-zero);
* is bounded in time: a process that cannot reach its peers fails within `--timeout` seconds (in
  `initialize`, with a message naming the coordinator), and `--max-time` bounds the whole run (exit status
  124, like `timeout(1)`).

Only loopback addresses are used; without `--port` a free port is picked. Run the launcher from the
repository root (the experiments are not installed with bnjax) or with the root on `PYTHONPATH`.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

__all__ = [
  "initialize",
  "launch",
  "main",
  "free_port",
  "ENV_COORDINATOR",
  "ENV_NUM_PROCESSES",
  "ENV_PROCESS_ID",
  "ENV_INIT_TIMEOUT",
  "ENV_RENDEZVOUS",
]

ENV_COORDINATOR = "BNJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "BNJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "BNJAX_PROCESS_ID"
ENV_INIT_TIMEOUT = "BNJAX_INIT_TIMEOUT"
ENV_RENDEZVOUS = "BNJAX_RENDEZVOUS_ADDRESS"

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_TIMEOUT_EXIT_STATUS = 124  # timeout(1)'s status for "ran out of time"
_GRACE_SECONDS = 5.0  # between SIGTERM and SIGKILL when stopping the other processes


# ------------------------------------------------------------------------------------------------------
# In the child.
# ------------------------------------------------------------------------------------------------------


def _env_int(name: str, environ) -> int:
  value = environ.get(name)
  if value is None:
    raise RuntimeError(
      f"environment variable {name} is not set: experiments.launch.initialize() runs in a process started by "
      "`python -m experiments.launch --processes N -- <command>`"
    )
  try:
    return int(value)
  except ValueError:
    raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(environ=None) -> None:
  """Joins this process to the others of the launch: `jax.distributed.initialize` from the launcher's env.

  Call it first thing in the child, before any JAX computation (the backend must not be initialized yet).
  It selects Gloo for cross-process CPU collectives and connects to the coordinator, waiting at most
  `BNJAX_INIT_TIMEOUT` seconds for every process to arrive.

  Raises:
    RuntimeError: if the environment variables are missing, or the peers cannot be reached in time.
  """
  import jax  # pylint: disable=g-import-not-at-top  (the launcher itself never imports jax)

  environ = os.environ if environ is None else environ
  coordinator = environ.get(ENV_COORDINATOR)
  if not coordinator:
    raise RuntimeError(
      f"environment variable {ENV_COORDINATOR} is not set: experiments.launch.initialize() runs in a process "
      "started by `python -m experiments.launch --processes N -- <command>`"
    )
  num_processes = _env_int(ENV_NUM_PROCESSES, environ)
  process_id = _env_int(ENV_PROCESS_ID, environ)
  timeout = _env_int(ENV_INIT_TIMEOUT, environ)
  rendezvous = environ.get(ENV_RENDEZVOUS)
  if rendezvous and num_processes > 1:
    # JAX's own wait for missing peers ends in a C++ abort with a terse message; meeting first in Python
    # turns that case into a RuntimeError that says who is missing.
    _rendezvous(rendezvous, num_processes=num_processes, process_id=process_id, timeout=timeout)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=timeout,
    )
  except Exception as e:  # the runtime raises several types (XlaRuntimeError, RuntimeError, ...)
    raise RuntimeError(
      f"process {process_id} of {num_processes} could not join the others through the coordinator at "
      f"{coordinator} within {timeout} s (a peer never started, exited early, or the port is blocked): {e}"
    ) from e


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
    server.bind((host, port))
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
        except (socket.timeout, OSError, ValueError):
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
    except (socket.timeout, OSError):
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


# The folder that holds the experiments package (it is not installed with bnjax).
_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env(base, *, port, rendezvous_port, num_processes, process_id, devices_per_process, init_timeout):
  env = dict(base)
  env[ENV_COORDINATOR] = f"127.0.0.1:{port}"
  env[ENV_NUM_PROCESSES] = str(num_processes)
  env[ENV_PROCESS_ID] = str(process_id)
  env[ENV_INIT_TIMEOUT] = str(init_timeout)
  env[ENV_RENDEZVOUS] = f"127.0.0.1:{rendezvous_port}"
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["PYTHONUNBUFFERED"] = "1"
  # The children import this module (`from experiments import launch`) wherever their script lives.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, (_REPOSITORY_ROOT, env.get("PYTHONPATH"))))
  if devices_per_process is not None:
    # Replace any device count inherited from the caller (e.g. a test runner's 8 devices).
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
  return env


def _forward(stream, prefix: str, out, lock: threading.Lock) -> None:
  for line in iter(stream.readline, b""):
    text = line.decode("utf-8", errors="replace").rstrip("\n")
    with lock:
      out.write(f"{prefix} {text}\n")
      out.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
  """SIGTERM to each live child's process group, then SIGKILL after a grace period."""
  live = [p for p in procs if p.poll() is None]
  for p in live:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  deadline = time.monotonic() + _GRACE_SECONDS
  for p in live:
    try:
      p.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def _exit_status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode  # killed by signal s: 128 + s, as shells do


def launch(
  command: Sequence[str],
  *,
  processes: int,
  devices_per_process: int | None = None,
  port: int | None = None,
  timeout: int = 60,
  max_time: float | None = None,
  env=None,
  out=None,
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
    env: the children's base environment (default: this process's).
    out: where the prefixed output goes (default: sys.stdout).

  Returns:
    0 when every process exits with 0; otherwise the first failing process's status (a signal `s` as
    `128 + s`), or 124 when `max_time` ran out.
  """
  if not command:
    raise ValueError("command must name a program to run, got an empty command")
  for name, value, minimum in (("processes", processes, 1), ("timeout", timeout, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  if devices_per_process is not None and (not isinstance(devices_per_process, int) or devices_per_process < 1):
    raise ValueError(f"devices_per_process must be an int >= 1 or None, got {devices_per_process!r}")
  if port is not None and not (isinstance(port, int) and 0 < port < 65536):
    raise ValueError(f"port must be an int in [1, 65535] or None, got {port!r}")
  if max_time is not None and not max_time > 0:
    raise ValueError(f"max_time must be a positive number of seconds or None, got {max_time!r}")
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

  procs, threads = [], []
  try:
    for pid in range(processes):
      child_env = _child_env(
        base,
        port=port,
        rendezvous_port=rendezvous_port,
        num_processes=processes,
        process_id=pid,
        devices_per_process=devices_per_process,
        init_timeout=timeout,
      )
      # A session of its own, so that stopping a child also stops whatever it started.
      proc = subprocess.Popen(
        list(command), env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
      )
      procs.append(proc)
      thread = threading.Thread(target=_forward, args=(proc.stdout, f"[{pid}]", out, lock), daemon=True)
      thread.start()
      threads.append(thread)
    status = _wait(procs, max_time, log)
  except KeyboardInterrupt:
    log("interrupted; stopping every process")
    status = 130
  except OSError as e:  # e.g. the program does not exist
    log(f"could not start {command[0]!r}: {e}")
    status = 127
  finally:
    _stop(procs)
    for thread in threads:
      thread.join(timeout=_GRACE_SECONDS)
  return status


def _wait(procs: Sequence[subprocess.Popen], max_time: float | None, log) -> int:
  deadline = None if max_time is None else time.monotonic() + max_time
  while True:
    codes = [p.poll() for p in procs]
    for pid, code in enumerate(codes):
      if code not in (None, 0):
        others = sum(c is None for c in codes)
        log(f"process {pid} exited with status {_exit_status(code)}; stopping the {others} still running")
        return _exit_status(code)
    if all(c == 0 for c in codes):
      return 0
    if deadline is not None and time.monotonic() > deadline:
      log(f"the run exceeded --max-time {max_time:g} s; stopping every process")
      return _TIMEOUT_EXIT_STATUS
    time.sleep(0.05)


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
  parser.add_argument("command", nargs=argparse.REMAINDER, help="-- followed by the command to run")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --, e.g. -- python train.py")
  args.command = command
  return args


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
    )
  except ValueError as e:
    print(f"python -m experiments.launch: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
