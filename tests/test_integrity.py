"""Checkpoints, run folders and runs broken the way operators break them: flipped and truncated bytes,
SIGKILL in and between checkpoint writes, two writers, a file where a folder goes, an unwritable workdir,
and learning rates that are NaN, infinite or large enough to diverge."""

import contextlib
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import training
from experiments import __main__ as cli
from experiments import checkpoint
from experiments import common
from experiments import config_parsing
from experiments import files
from experiments import runner

REPO = pathlib.Path(__file__).resolve().parents[1]
# Checkpoints at steps 10, 20, 30 (train keeps 3); metrics rows at 0, 10, 20, 30.
QUICK = ["--config.num_steps=30", "--config.eval_every=10", "--config.checkpoint_every=10"]


def cli_args(workdir, *extra, overrides=QUICK):
  return ["train", "--quick", "--quiet", "--workdir", str(workdir), *overrides, *extra]


def child_env():
  return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def spawn(script: str, *args) -> subprocess.Popen:
  """A python child running ``script`` (dedented), stdout piped line by line."""
  return subprocess.Popen(
    [sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
    cwd=REPO,
    env=child_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def wait_for_line(proc: subprocess.Popen, prefix: str) -> str:
  for line in proc.stdout:
    if line.startswith(prefix):
      return line
  raise AssertionError(f"child ended without printing {prefix!r}: {proc.stderr.read()}")


def flip_bytes(path: pathlib.Path, rng: random.Random, count: int) -> None:
  data = bytearray(path.read_bytes())
  for offset in rng.sample(range(len(data)), min(count, len(data))):
    data[offset] ^= rng.randrange(1, 256)
  path.write_bytes(bytes(data))


def array_files(step_dir: pathlib.Path) -> list:
  """The files holding the state's array chunks (OCDBT data files)."""
  return sorted(p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d")


def summary_of(run_dir: pathlib.Path) -> dict:
  return json.loads((run_dir / "summary.json").read_text())


def train_target(overrides=QUICK):
  """A fresh `TrainState` of the train experiment: the structure its checkpoints restore into."""
  config = config_parsing.load_config("train", quick=True, overrides=overrides)
  dataset = common.load_data(config)
  model = common.make_mlp(config, dataset.num_classes)
  tx = common.make_optimizer(config.optimizer, config.learning_rate)
  return training.create_train_state(
    model, tx, jnp.asarray(dataset.train.x[: config.batch_size]), rng=jax.random.key(config.seed)
  )


def tiny_state(step: int) -> dict:
  return {
    "w": jnp.full((32, 32), step, jnp.float32),
    "b": jnp.arange(500, dtype=jnp.float32) + step,
    "rng": jax.random.key(step),
  }


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(checkpoint._storable(a)), jax.tree.leaves(checkpoint._storable(b)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished quick `train` run: (workdir, run folder, summary)."""
  workdir = tmp_path_factory.mktemp("finished")
  summary = runner.run_experiment("train", quick=True, workdir=str(workdir), overrides=QUICK, quiet=True)
  return workdir, pathlib.Path(summary["run_dir"]), summary


@pytest.fixture
def copied(finished, tmp_path):
  """A copy of the finished run to break: (workdir, run folder, original summary)."""
  workdir, run_dir, summary = finished
  shutil.copytree(workdir, tmp_path / "w")
  return tmp_path / "w", tmp_path / "w" / run_dir.relative_to(workdir), summary


# 1. Checkpoints carry a digest; a corrupt latest one is reported and the previous good one used.


def test_flipped_bytes_are_caught_and_resume_takes_the_previous_good_checkpoint(copied, tmp_path, capsys):
  rng = random.Random(13)
  ckpt = tmp_path / "ckpt"
  for step in (1, 2):
    checkpoint.save(ckpt, tiny_state(step), step=step, keep=None)
  targets = array_files(ckpt / "2")
  assert targets
  trials, caught = 24, 0
  for _ in range(trials):
    victim = rng.choice(targets)
    original = victim.read_bytes()
    flip_bytes(victim, rng, rng.randint(1, 4))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="sha256"):
      checkpoint.restore(ckpt, tiny_state(0), step=2)
    with pytest.warns(checkpoint.CheckpointWarning, match="step 2 .* skipped.*restoring step 1"):
      restored, _ = checkpoint.restore(ckpt, tiny_state(0))
    assert_same(restored, tiny_state(1))
    with pytest.warns(checkpoint.CheckpointWarning, match="step 2 .* skipped"):
      assert checkpoint.latest_step(ckpt) == 1
    caught += 1
    victim.write_bytes(original)
  assert caught == trials
  assert_same(checkpoint.restore(ckpt, tiny_state(0))[0], tiny_state(2))
  # Truncated, missing, and unsealed (a save cut short after Orbax's rename) are caught the same way.
  victim = rng.choice(targets)
  original = victim.read_bytes()
  victim.write_bytes(original[: len(original) // 2])
  with pytest.raises(checkpoint.CorruptCheckpointError, match="bytes"):
    checkpoint.verify(ckpt, 2)
  victim.unlink()
  with pytest.raises(checkpoint.CorruptCheckpointError, match="missing"):
    checkpoint.verify(ckpt, 2)
  victim.write_bytes(original)
  (ckpt / "2" / checkpoint.DIGEST_FILE).unlink()
  with pytest.raises(checkpoint.CorruptCheckpointError, match="cut short"):
    checkpoint.restore(ckpt, tiny_state(0), step=2)

  # Through the CLI: several random flips in the latest checkpoint of a finished run, then --resume.
  workdir, run_dir, summary = copied
  for victim in rng.sample(array_files(run_dir / "checkpoints" / "30"), 2):
    flip_bytes(victim, rng, 3)
  capsys.readouterr()
  assert cli.main(cli_args(workdir, "--resume")) == 0
  err = capsys.readouterr().err
  assert "skipped checkpoint step 30: the sha256 of state/" in err, err
  assert "resuming from checkpoint step 20" in err, err
  resumed = summary_of(run_dir)
  assert resumed["state_digest"] == summary["state_digest"]
  assert any("resuming from checkpoint step 20" in e for e in resumed["events"])
  assert [p.name.split(".")[0] for p in (run_dir / "checkpoints").glob("30.skipped-*")] == ["30"]
  assert checkpoint.verify(run_dir / "checkpoints") == 30  # written again, intact


# 2. A save before the latest step is refused, naming the folder and both steps.


def test_saving_an_earlier_step_is_refused(tmp_path):
  ckpt = tmp_path / "ckpt"
  checkpoint.save(ckpt, tiny_state(100), step=100)
  with pytest.raises(checkpoint.CheckpointOrderError) as error:
    checkpoint.save(ckpt, tiny_state(5), step=5)
  message = str(error.value)
  assert str(ckpt) in message and "step 5" in message and "100" in message
  with pytest.raises(FileExistsError, match="step 100 already exists"):
    checkpoint.save(ckpt, tiny_state(5), step=100)
  assert checkpoint.all_steps(ckpt) == [100] and not (ckpt / "5").exists()
  assert_same(checkpoint.restore(ckpt, tiny_state(0))[0], tiny_state(100))


# 3. Nothing that exists is deleted before its replacement is complete.


def test_a_failed_resume_keeps_the_finished_run_and_a_cut_short_metrics_line_is_dropped(copied, capsys, monkeypatch):
  workdir, run_dir, summary = copied
  metrics, summary_file = run_dir / "metrics.jsonl", run_dir / "summary.json"
  kept = {p: p.read_bytes() for p in (metrics, summary_file, run_dir / "report.md")}
  # A damaged line in the middle: --resume refuses, naming the file and line, and changes nothing.
  lines = kept[metrics].split(b"\n")
  metrics.write_bytes(b"\n".join([lines[0], lines[1][:20], *lines[2:]]))
  capsys.readouterr()
  assert cli.main(cli_args(workdir, "--resume")) == 1
  err = capsys.readouterr().err
  assert "metrics.jsonl: line 2 is not a JSON object" in err and "Traceback" not in err
  assert summary_file.read_bytes() == kept[summary_file]
  # A crash while the replacement is written (here: at the rename) leaves the old file whole.
  metrics.write_bytes(kept[metrics])
  monkeypatch.setattr(os, "replace", no_space)
  with pytest.raises(OSError):
    files.write_atomic(summary_file, "{}")
  with pytest.raises(OSError):
    runner.Run(run_dir, None, resume=True).rewrite_metrics(lambda r: False)
  monkeypatch.undo()
  for path, content in kept.items():
    assert path.read_bytes() == content, path
  assert not [p for p in run_dir.iterdir() if p.name.endswith(".partial")]
  # A last line cut short (a write interrupted): dropped with a warning; the run resumes from the
  # checkpoint its metrics cover and ends where the uninterrupted run ended.
  metrics.write_bytes(kept[metrics][:-25])
  assert cli.main(cli_args(workdir, "--resume")) == 0
  err = capsys.readouterr().err
  assert "was cut short" in err and "dropped" in err and "Traceback" not in err
  assert "skipped checkpoint step 30: metrics.jsonl has rows only up to step 29" in err, err
  assert summary_of(run_dir)["state_digest"] == summary["state_digest"]
  assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [0, 10, 20, 30]


def no_space(*args, **kwargs):
  raise OSError(28, "No space left on device")


# 4. --resume after a kill before the first checkpoint starts from step 0 (a requeued job can go on).


def test_resume_after_a_kill_before_the_first_checkpoint_starts_from_zero(tmp_path, capsys):
  overrides = ["--config.num_steps=300", "--config.eval_every=150", "--config.checkpoint_every=300"]
  # Killed before its run folder existed (or with none at all): --resume starts a new run.
  capsys.readouterr()
  assert cli.main(cli_args(tmp_path / "reference", "--resume", overrides=overrides)) == 0
  assert "no run of 'train'" in capsys.readouterr().err
  reference = summary_of(runner.run_dirs(tmp_path / "reference", "train")[-1])
  # Killed (SIGKILL) after training started, before its first checkpoint was sealed.
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(
    [sys.executable, "-m", "experiments", *cli_args(workdir, overrides=overrides)],
    cwd=REPO,
    env=child_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 120
  while not list(workdir.glob("train/*/metrics.jsonl")) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  run_dir = runner.run_dirs(workdir, "train")[-1]
  assert checkpoint.latest_step(run_dir / "checkpoints") is None, "killed too late: a checkpoint was sealed"
  assert cli.main(cli_args(workdir, "--resume", overrides=overrides)) == 0
  assert "no checkpoint to continue from; starting from step 0" in capsys.readouterr().err
  resumed = summary_of(run_dir)
  assert resumed["state_digest"] == reference["state_digest"]
  assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 150, 300]


KILLED_SAVER = """
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from experiments import checkpoint

  def state(step):
    return {"w": jnp.full((32, 32), step, jnp.float32), "b": jnp.arange(500, dtype=jnp.float32) + step,
            "rng": jax.random.key(step)}

  found = checkpoint.resume(sys.argv[1], state(0))
  start = 0 if found.step is None else found.step + 1
  print("ready", found.step, flush=True)
  for step in range(start, start + 100_000):
    checkpoint.save(sys.argv[1], state(step), step=step, keep=2)
    print("saved", step, flush=True)
"""


def test_sigkill_in_and_between_checkpoint_writes_then_resume(tmp_path):
  """A job killed at random points of a save loop and requeued: each restart continues from an intact step."""
  rng = random.Random(5)
  ckpt = tmp_path / "ckpt"
  for _ in range(3):
    proc = spawn(KILLED_SAVER, ckpt)
    wait_for_line(proc, "ready")
    time.sleep(rng.uniform(0.3, 1.5))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate()
    saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      found = checkpoint.resume(ckpt, tiny_state(0))
    # A kill inside a save leaves its lock file behind: taken over, with a warning naming the dead pid.
    assert all(f"lock left by pid {proc.pid}" in str(w.message) for w in caught), [str(w.message) for w in caught]
    # Every step printed as saved is sealed; the one the kill cut short, if any, is skipped and set aside.
    newest = saved[-1] if saved else None
    assert found.step is not None and found.step in (newest, (newest or 0) + 1), (found.step, saved)
    assert_same(found.state, tiny_state(found.step))
    assert all(step > found.step for step, _ in found.skipped)
  assert not (ckpt / checkpoint.LOCK_FILE).exists()


# 5. A second writer is refused; a lock left by a dead process is taken over.


HOLDER = """
  import sys, time
  import jax.numpy as jnp
  from experiments import checkpoint
  with checkpoint.writer(sys.argv[1]):
    checkpoint.save(sys.argv[1], {"a": jnp.ones(3)}, step=1)
    print("holding", flush=True)
    time.sleep(120)
"""
RUN_HOLDER = """
  import sys, time
  from experiments import files
  with files.exclusive(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(copied, capsys):
  workdir, run_dir, summary = copied
  ckpt = run_dir / "checkpoints"
  summary_bytes = (run_dir / "summary.json").read_bytes()
  holder = spawn(HOLDER, ckpt / "other")
  run_holder = spawn(RUN_HOLDER, run_dir)  # Another process running this run.
  try:
    wait_for_line(holder, "holding")
    wait_for_line(run_holder, "holding")
    owner = f"pid {holder.pid} on host {socket.gethostname()}"
    with pytest.raises(checkpoint.CheckpointLockedError, match=owner):
      checkpoint.save(ckpt / "other", {"a": jnp.zeros(3)}, step=2)
    with pytest.raises(checkpoint.CheckpointLockedError, match=owner):
      checkpoint.resume(ckpt / "other", {"a": jnp.zeros(3)})
    # The CLI: a second --resume of a run being written stops before training, and keeps the summary.
    capsys.readouterr()
    assert cli.main(cli_args(workdir, "--resume")) == 1
    err = capsys.readouterr().err
    assert f"run folder {run_dir} is being written by another process (pid {run_holder.pid}" in err, err
    assert "Traceback" not in err
    assert (run_dir / "summary.json").read_bytes() == summary_bytes
  finally:
    for proc in (holder, run_holder):
      proc.send_signal(signal.SIGKILL)
      proc.wait()
  with pytest.warns(
    checkpoint.CheckpointWarning, match=f"taking over the writer lock left by pid {holder.pid}.*no longer running"
  ):
    checkpoint.save(ckpt / "other", {"a": jnp.zeros(3)}, step=2)
  assert checkpoint.verify(ckpt / "other", 1) == 1 and checkpoint.verify(ckpt / "other", 2) == 2
  assert not (ckpt / "other" / checkpoint.LOCK_FILE).exists()


# 6. Non-finite learning rates are refused; a diverging run stops, keeps its good checkpoints, says so.


@pytest.mark.parametrize(
  "name,override,key",
  [
    ("train", "--config.learning_rate=nan", "config.learning_rate"),
    ("train", "--config.learning_rate=inf", "config.learning_rate"),
    ("train", "--config.learning_rate=-inf", "config.learning_rate"),
    ("train", "--config.learning_rate=0", "config.learning_rate"),
    ("lr_sweep", "--config.learning_rates=0.1,nan", "config.learning_rates"),
    ("lr_sweep", "--config.learning_rates=0.1,inf", "config.learning_rates"),
    ("fig1", "--config.criterion.target_accuracy=nan", "config.criterion.target_accuracy"),
  ],
)
def test_non_finite_learning_rates_are_refused_by_name(name, override, key, tmp_path, capsys):
  assert cli.main([name, "--quick", "--workdir", str(tmp_path), override]) == 2
  assert key in capsys.readouterr().err
  assert not (tmp_path / name).exists()


def test_a_diverging_run_stops_keeps_its_last_good_checkpoint_and_says_so(tmp_path):
  overrides = [
    "--config.learning_rate=1e20",
    "--config.num_steps=10",
    "--config.eval_every=5",
    "--config.checkpoint_every=1",
  ]
  summary = runner.run_experiment("train", quick=True, workdir=str(tmp_path), overrides=overrides, quiet=True)
  step = summary["diverged"]["train"]["diverged_at"][0]
  assert summary["verdict"]["held"] is False
  assert f"diverged at step {step}" in summary["verdict"]["reason"]
  run_dir = pathlib.Path(summary["run_dir"])
  steps = checkpoint.all_steps(run_dir / "checkpoints")
  assert steps and max(steps) < step, (steps, step)
  restored, _ = checkpoint.restore(run_dir / "checkpoints", train_target(overrides))
  assert common.all_finite(restored)
  assert "null" not in (run_dir / "metrics.jsonl").read_text()

  # An lr sweep whose largest rate diverges: those models are recorded as diverged, the others carry on.
  overrides = [
    "--config.learning_rates=0.1,1e20",
    "--config.num_steps=20",
    "--config.eval_every=10",
    "--config.checkpoint_every=10",
    "--config.hidden=16",
  ]
  summary = runner.run_experiment("lr_sweep", quick=True, workdir=str(tmp_path), overrides=overrides, quiet=True)
  diverged = summary["diverged"]
  assert "none" in diverged, diverged
  for arm, record in diverged.items():
    lost = [i for i, s in enumerate(record["diverged_at"]) if s is not None]
    assert lost and set(lost) <= {2, 3}, (arm, record)  # The grid is learning-rate major: models 2, 3 at 1e20.
  assert "diverged at step" in summary["verdict"]["reason"]
  for arm in ("none", "bn"):
    assert summary["metrics"]["final_test_accuracy"][arm][0] > 0.15  # lr 0.1 trained on (chance: 0.1)
  assert summary["metrics"]["diverged_fraction"]["none"] == [0.0, 1.0]


# 8. A failing save raises at once and the process exits at once.


FAILING_SAVE = """
  import sys, time
  import jax.numpy as jnp
  from experiments import checkpoint
  try:
    checkpoint.save(sys.argv[1], {"a": jnp.ones(3)}, step=0)
  except OSError as e:
    print("failed", time.time(), e, flush=True)
"""


def test_a_failing_save_fails_fast_and_exits_fast(copied, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  for directory in (blocker, blocker / "ckpt"):  # The folder is a file / its parent is a file.
    with pytest.raises(NotADirectoryError, match="is a file|which is a file"):
      checkpoint.save(directory, {"a": jnp.ones(3)}, step=0)
  proc = spawn(FAILING_SAVE, blocker)
  line = wait_for_line(proc, "failed")
  proc.wait(timeout=60)
  assert time.time() - float(line.split()[1]) < 5, "the interpreter lingered after the failed save"
  assert "is a file" in line

  # The CLI, resuming a run whose checkpoint folder is now a file: a clear message, then a prompt exit.
  workdir, run_dir, _ = copied
  shutil.rmtree(run_dir / "checkpoints")
  (run_dir / "checkpoints").write_text("")
  proc = subprocess.Popen(
    [sys.executable, "-m", "experiments", *cli_args(workdir, "--resume")],
    cwd=REPO,
    env=child_env(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  line = wait_for_line_stderr(proc, "error:")
  errored = time.time()
  assert proc.wait(timeout=60) == 1
  assert time.time() - errored < 5, "the CLI lingered after its error"
  assert "checkpoints is a file" in line


def wait_for_line_stderr(proc: subprocess.Popen, prefix: str) -> str:
  for line in proc.stderr:
    if line.startswith(prefix):
      return line
  raise AssertionError(f"child ended without printing {prefix!r}")


# --workdir that is a file, under a file, or unwritable: a clear error naming --workdir.


@contextlib.contextmanager
def unwritable(folder: pathlib.Path):
  """``folder`` made unwritable: chmod for a normal user; as root (which chmod does not stop) the
  immutable attribute, or a skip saying why."""
  if os.geteuid() != 0:
    folder.chmod(0o555)
    try:
      yield
    finally:
      folder.chmod(0o755)
    return
  chattr = shutil.which("chattr")
  done = chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0
  if not done:
    pytest.skip(
      "running as root, where chmod does not stop writes, and chattr +i (the immutable attribute) is not available here"
    )
  try:
    yield
  finally:
    subprocess.run([chattr, "-i", str(folder)], check=True)


def test_a_bad_workdir_is_named(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  for workdir in (blocker, blocker / "runs"):
    assert cli.main(cli_args(workdir)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --workdir") and "file" in err and "Traceback" not in err
  locked = tmp_path / "locked"
  locked.mkdir()
  with unwritable(locked):
    code = cli.main(cli_args(locked))
    err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: --workdir") and "Traceback" not in err, err
  assert not list(locked.iterdir())
