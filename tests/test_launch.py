"""Tests of experiments.launch: the training guide's multi-process example, and a launcher that never hangs."""

import io
import os
import pathlib
import re
import subprocess
import sys
import threading

import jax
import numpy as np
import optax
import pytest

from bnjax import models
from bnjax import training
from experiments import checkpoint
from experiments import launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A guard against hangs (the test fails instead of blocking CI); not a timing assertion.
HANG_GUARD_S = 240


GUIDE = ROOT / "docs" / "guides" / "training.md"


def documented_launch_command() -> str:
  """The ```bash block of the training guide's "Many processes" section, which runs experiments.launch."""
  section = re.search(r"^## Many processes\n(.*?)(?=^## |\Z)", GUIDE.read_text(), flags=re.S | re.M)
  assert section, f"{GUIDE.relative_to(ROOT)} has no '## Many processes' section"
  blocks = [b for b in re.findall(r"```bash\n(.*?)```", section.group(1), flags=re.S) if "experiments.launch" in b]
  assert len(blocks) == 1, f"expected one ```bash block with the launch command in {GUIDE.relative_to(ROOT)}"
  return blocks[0]


def child_env() -> dict:
  env = dict(os.environ)
  env["PATH"] = os.pathsep.join([str(pathlib.Path(sys.executable).parent), env.get("PATH", "")])
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  return env


def run_bash(script: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", "-c", "set -e\n" + script],
    cwd=cwd,
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=HANG_GUARD_S,
  )


def test_documented_launch_two_processes_equals_one_process(tmp_path):
  """2 processes x 2 devices (the guide's command) and 1 process x 4 devices save the same final state."""
  command = documented_launch_command()
  assert "--processes 2 --devices-per-process 2" in command
  two, one = tmp_path / "two_processes", tmp_path / "one_process"
  two.mkdir()
  one.mkdir()
  result = run_bash(command, two)
  assert result.returncode == 0, result.stdout + result.stderr
  for pid in (0, 1):
    assert f"[{pid}] process {pid} of 2, 4 devices: step 30" in result.stdout, result.stdout
  one_process = command.replace("--processes 2 --devices-per-process 2", "--processes 1 --devices-per-process 4")
  result = run_bash(one_process, one)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "[0] process 0 of 1, 4 devices: step 30" in result.stdout, result.stdout

  model = models.MLP((64, 10), norm="pre")
  target = training.create_train_state(
    model, optax.sgd(0.1, momentum=0.9), np.zeros((1, 64), np.float32), rng=jax.random.key(0)
  )
  state_two, extra_two = checkpoint.restore(two / "ckpt", target)
  state_one, extra_one = checkpoint.restore(one / "ckpt", target)
  assert extra_two == extra_one == {"data_seed": 0}
  assert int(state_two.step) == int(state_one.step) == 30
  np.testing.assert_array_equal(jax.random.key_data(state_two.rng), jax.random.key_data(state_one.rng))
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(state_two._replace(rng=None))[0], jax.tree.leaves(state_one._replace(rng=None))
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # The run trained: the parameters left their initial values.
  assert not np.allclose(state_two.params["Dense_0"]["kernel"], target.params["Dense_0"]["kernel"])


def launch_in_process(command, **kwargs):
  out = io.StringIO()
  kwargs.setdefault("env", child_env())
  status = launch.launch(command, out=out, **kwargs)
  return status, out.getvalue()


def test_output_is_prefixed_and_the_environment_is_set():
  code = (
    "import os; e = os.environ; "
    "print('hello', e['SLURM_PROCID'], e['SLURM_NTASKS'], e['SLURM_STEP_NODELIST'] + ':' + e['JAX_COORDINATOR_PORT'], "
    "e['BNJAX_INIT_TIMEOUT'], e['BNJAX_HEARTBEAT_TIMEOUT'], e['BNJAX_SHUTDOWN_TIMEOUT'], e['XLA_FLAGS'])"
  )
  port = launch.free_port()  # a port given is checked to be free first
  status, out = launch_in_process(
    [sys.executable, "-c", code],
    processes=2,
    devices_per_process=3,
    port=port,
    heartbeat_timeout=7,
    shutdown_timeout=9,
  )
  assert status == 0, out
  for pid in (0, 1):
    line = next(text for text in out.splitlines() if text.startswith(f"[{pid}] hello"))
    assert line.startswith(f"[{pid}] hello {pid} 2 127.0.0.1:{port} 60 7 9 ")
    assert line.endswith("--xla_force_host_platform_device_count=3")  # replaces the caller's count of 8
    assert "count=8" not in line


def test_a_child_anywhere_imports_the_launcher(tmp_path):
  """The experiments are not installed: the launcher puts their folder on the children's PYTHONPATH."""
  script = tmp_path / "child.py"  # the script's folder, not the repository root, leads the child's sys.path
  script.write_text("from experiments import launch\nprint('imported', launch.__name__)\n")
  env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
  status, out = launch_in_process([sys.executable, str(script)], processes=1, env=env)
  assert status == 0, out
  assert "[0] imported experiments.launch" in out


@pytest.mark.parametrize("absent", [0, 1])
def test_a_peer_that_never_comes_fails_with_a_clear_message(tmp_path, absent):
  """One process exits without joining; the other gives up after --timeout with a message, never hangs."""
  script = tmp_path / "child.py"
  script.write_text(
    "import os\n"
    "from experiments import launch\n"
    f"if os.environ['SLURM_PROCID'] != '{absent}':\n"
    "  launch.initialize()\n"
    "  raise SystemExit('unreachable: initialize() returned without the peer')\n"
    "print('leaving without joining')\n"
  )
  result = subprocess.run(
    launch.command_line(2, [sys.executable, str(script)], "--timeout", "3"),
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=HANG_GUARD_S,
  )
  waiting = 1 - absent
  assert result.returncode == 1, result.stdout + result.stderr
  assert f"[{absent}] leaving without joining" in result.stdout
  expected = "process(es) [1] did not arrive" if absent == 1 else "process 0 did not open"
  assert f"[{waiting}] RuntimeError: process {waiting} of 2: " in result.stdout
  assert expected in result.stdout, result.stdout
  assert f"[launch] process {waiting} exited with status 1" in result.stdout
  assert "unreachable" not in result.stdout


def test_one_failure_stops_the_others():
  code = "import os, sys, time\nif os.environ['SLURM_PROCID'] == '1': sys.exit(3)\ntime.sleep(600)"
  status, out = launch_in_process([sys.executable, "-c", code], processes=3)
  assert status == 3, out
  assert "[launch] process 1 exited with status 3; stopping the 2 still running" in out


def test_max_time_bounds_the_whole_run():
  status, out = launch_in_process([sys.executable, "-c", "import time; time.sleep(600)"], processes=2, max_time=1.5)
  assert status == 124, out
  assert "exceeded --max-time 1.5 s" in out


def test_a_missing_program_is_reported():
  status, out = launch_in_process(["/nonexistent/program"], processes=2)
  assert status == 127 and "could not start" in out


def test_rendezvous_meets_or_names_the_missing():
  """The barrier in initialize(): all three arrive and pass; with one missing, the others raise in time."""

  def meet(pids, num_processes, timeout):
    address, errors, threads = f"127.0.0.1:{launch.free_port()}", {}, []
    for pid in pids:

      def target(pid=pid):
        try:
          launch._rendezvous(address, num_processes=num_processes, process_id=pid, timeout=timeout)
        except RuntimeError as e:
          errors[pid] = str(e)

      threads.append(threading.Thread(target=target))
      threads[-1].start()
    for thread in threads:
      thread.join(HANG_GUARD_S)
      assert not thread.is_alive()
    return errors

  assert meet([0, 1, 2], 3, timeout=30) == {}
  errors = meet([0, 1], 3, timeout=1)
  assert "process 0 of 3: process(es) [2] did not arrive" in errors[0]
  assert "process 1 of 3: the other processes did not all arrive" in errors[1]


def test_initialize_outside_the_launcher_says_how_to_run():
  with pytest.raises(RuntimeError, match="python -m experiments.launch"):
    launch.initialize(environ={})


def test_command_line_errors():
  def cli(*args):
    return subprocess.run(
      [sys.executable, "-m", "experiments.launch", *args],
      env=child_env(),
      capture_output=True,
      text=True,
      timeout=HANG_GUARD_S,
    )

  result = cli("--processes", "2")
  assert result.returncode == 2 and "give the command to run after --" in result.stderr
  result = cli("--processes", "0", "--", "true")
  assert result.returncode == 2 and "processes must be an int >= 1, got 0" in result.stderr
  result = cli("--processes", "1", "--heartbeat-timeout", "0", "--", "true")
  assert result.returncode == 2 and "heartbeat_timeout must be an int >= 1, got 0" in result.stderr


@pytest.mark.parametrize("verbose", [False, True])
def test_gloo_connection_chatter_only_when_verbose(verbose):
  chatter = "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"
  status, out = launch_in_process(
    [sys.executable, "-c", f"print({chatter!r}); print('result')"], processes=1, verbose=verbose
  )
  assert status == 0 and "[0] result" in out, out
  assert (chatter in out) == verbose, out
