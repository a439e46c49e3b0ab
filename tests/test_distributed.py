"""Many processes through JAX's own runtime: a simulated SLURM job step on 127.0.0.1, with and without the
launcher; a lost peer; checkpoints resumed on the same and on another process count."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bnjax import training
from experiments import checkpoint
from experiments import common
from experiments import launch

ROOT = pathlib.Path(__file__).resolve().parents[1]
HANG_GUARD_S = 240  # a guard against hangs, not a timing assertion
LOST_PEER_BOUND_S = 60
# The quick train run (60 steps, checkpoints at 20, 40, 60) on 2 devices, data-parallel under sharded jit.
TRAIN = ["-m", "experiments", "train", "--quick", "--quiet", "--config.num_devices=2", "--config.parallel=jit"]

# Dies (SIGKILL) right after checkpoint step 20 is saved, on process DIE_PROCESS: a deterministic mid-run loss.
DYING_TRAIN = """
import os, signal, sys
from experiments import __main__ as cli
from experiments import checkpoint
save = checkpoint.save
def save_then_die(*args, step, **kwargs):
  path = save(*args, step=step, **kwargs)
  if step == 20 and os.environ["SLURM_PROCID"] == os.environ["DIE_PROCESS"]:
    os.kill(os.getpid(), signal.SIGKILL)
  return path
checkpoint.save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


def base_env() -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "BNJAX_", "JAX_COORDINATOR"))}
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def slurm_env(process_id: int, num_processes: int, port: int, devices: int = 1) -> dict:
  """What a SLURM job step of `num_processes` tasks on one node sets (JAX's detection reads these)."""
  env = base_env()
  env.update(
    {
      "SLURM_JOB_ID": "4242",
      "SLURM_NTASKS": str(num_processes),
      "SLURM_PROCID": str(process_id),
      "SLURM_LOCALID": str(process_id),
      "SLURM_STEP_NODELIST": "127.0.0.1",
      "JAX_COORDINATOR_PORT": str(port),  # SLURM's own would derive from the job id
      "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      "BNJAX_HEARTBEAT_TIMEOUT": "10",
    }
  )
  return env


def start(args, env, cwd) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, *args],
    env=env,
    cwd=cwd,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )


def finish(procs, timeout=HANG_GUARD_S) -> list:
  outs = []
  try:
    for proc in procs:
      outs.append(proc.communicate(timeout=timeout)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()
  return outs


SLURM_CHILD = """
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize()  # no arguments: JAX reads the SLURM job step
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("d",))
local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.device_count(), "sum", float(total))
"""


def test_simulated_slurm_step_initializes_without_arguments(tmp_path):
  port = launch.free_port()
  procs = [start(["-c", SLURM_CHILD], slurm_env(i, 2, port), tmp_path) for i in range(2)]
  outs = finish(procs)
  for i, (proc, out) in enumerate(zip(procs, outs)):
    assert proc.returncode == 0, out
    assert f"process {i} of 2 devices 2 sum 3.0" in out, out


def test_the_launcher_sets_what_jax_detects(tmp_path):
  """The same child under the launcher: its SLURM variables are the only description of the job."""
  result = subprocess.run(
    launch.command_line(2, [sys.executable, "-c", SLURM_CHILD], "--devices-per-process", "2"),
    env=base_env(),
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=HANG_GUARD_S,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  for i in (0, 1):
    assert f"[{i}] process {i} of 2 devices 4 sum 6.0" in result.stdout, result.stdout


def test_detect_cluster_reads_the_slurm_variables(monkeypatch):
  for key, value in slurm_env(1, 3, 12345).items():
    monkeypatch.setenv(key, value)
  assert launch.detect_cluster() == ("slurm", "127.0.0.1:12345", 3, 1)
  for key in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST"):
    monkeypatch.delenv(key)
  assert launch.detect_cluster() is None
  assert launch.maybe_initialize("off") is False
  assert launch.maybe_initialize("auto") is False  # no job: one process, nothing to join
  with pytest.raises(ValueError, match="distributed mode must be 'auto', 'on' or 'off', got 'yes'"):
    launch.maybe_initialize("yes")


def summary(workdir: pathlib.Path) -> dict:
  (path,) = sorted(workdir.glob("train/*/summary.json"))
  return json.loads(path.read_text())


def final_state(workdir: pathlib.Path):
  """The run's last checkpoint (step 60), as a TrainState."""
  (run_dir,) = sorted(workdir.glob("train/*"))
  target = training.create_train_state(
    common.make_mlp(_quick_config(), 10),
    common.make_optimizer("momentum", 0.1),
    np.zeros((1, 64), np.float32),
    rng=jax.random.key(0),
  )
  state, _ = checkpoint.restore(run_dir / "checkpoints", target, step=60)
  return state


def _quick_config():
  from experiments import config_parsing

  return config_parsing.load_config("train", quick=True)


def launched(workdir, processes, *, resume=False, script=None, env=None):
  """`python -m experiments train` on `processes` x (2 / processes) devices through the launcher."""
  devices = 2 // processes
  program = ["-c", script] if script else []
  command = [sys.executable, *program, *TRAIN[2 if script else 0 :], "--workdir", str(workdir)]
  command += ["--resume"] if resume else []
  return subprocess.run(
    launch.command_line(processes, command, "--devices-per-process", str(devices), "--heartbeat-timeout", "10"),
    env={**base_env(), **(env or {})},
    capture_output=True,
    text=True,
    timeout=HANG_GUARD_S,
  )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The run on 2 processes x 1 device and on 1 process x 2 devices, start to end."""
  runs = {}
  for processes in (2, 1):
    workdir = tmp_path_factory.mktemp(f"uninterrupted-{processes}")
    result = launched(workdir, processes)
    assert result.returncode == 0, result.stdout + result.stderr
    runs[processes] = workdir
  return runs


def test_two_processes_train_as_one(uninterrupted):
  two, one = uninterrupted[2], uninterrupted[1]
  assert summary(two)["environment"]["devices"] == summary(one)["environment"]["devices"] == 2
  assert len(list(two.glob("train/*"))) == 1  # one run folder: process 0's
  assert_close(final_state(two), final_state(one))


def assert_close(a, b):
  for (path, x), y in zip(
    jax.tree_util.tree_flatten_with_path(a._replace(rng=None))[0], jax.tree.leaves(b._replace(rng=None))
  ):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_a_lost_peer_is_named_and_the_run_resumes(tmp_path, uninterrupted):
  """SIGKILL of process 1 after checkpoint 20: process 0 exits non-zero naming task 1 within 60 s; --resume on
  2 processes ends in the uninterrupted digest, and on 1 process (2 -> 1) within 1e-5 of it."""
  workdir = tmp_path / "runs"
  port = launch.free_port()
  args = ["-c", DYING_TRAIN, *TRAIN[2:], "--workdir", str(workdir)]
  procs = [start(args, {**slurm_env(i, 2, port), "DIE_PROCESS": "1"}, ROOT) for i in range(2)]
  try:
    dead = procs[1].communicate(timeout=HANG_GUARD_S)[0]
    lost_at = time.monotonic()
    out = procs[0].communicate(timeout=HANG_GUARD_S)[0]
    detected = time.monotonic() - lost_at
  finally:
    finish(procs, timeout=1)
  # Killed by a signal: its own SIGKILL, or JAX's abort if the coordinator noticed the loss first.
  assert procs[1].returncode < 0, f"process 1:\n{dead}\nprocess 0:\n{out}"
  assert procs[0].returncode != 0 and detected < LOST_PEER_BOUND_S, out
  assert "lost peer: process 1 of 2" in out, out
  print(f"lost peer detected after {detected:.1f} s")
  other = tmp_path / "runs-2-to-1"
  shutil.copytree(workdir, other)

  result = launched(workdir, 2, resume=True)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "resuming from checkpoint step 20" in result.stdout + result.stderr
  assert summary(workdir)["state_digest"] == summary(uninterrupted[2])["state_digest"]

  result = launched(other, 1, resume=True)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "resuming from checkpoint step 20" in result.stdout + result.stderr
  assert_close(final_state(other), final_state(uninterrupted[2]))


def test_one_process_resumes_on_two(tmp_path, uninterrupted):
  """1 -> 2: a one-process run lost after checkpoint 20, resumed on two processes."""
  result = launched(tmp_path, 1, script=DYING_TRAIN, env={"DIE_PROCESS": "0"})
  assert result.returncode == 137, result.stdout + result.stderr
  result = launched(tmp_path, 2, resume=True)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "resuming from checkpoint step 20" in result.stdout + result.stderr
  assert_close(final_state(tmp_path), final_state(uninterrupted[1]))
