"""Untrusted run folders in the report, and a launcher whose job ends when any process fails or is stopped."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from experiments import __main__ as cli
from experiments import launch
from experiments import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
HANG_GUARD_S = 120  # a guard against hangs, not a timing assertion
FAILURE_BOUND_S = 60  # a failed process must end the whole job within this
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


# ------------------------------------------------------------------------------------------------------
# The report: run folders are not trusted.
# ------------------------------------------------------------------------------------------------------


def valid_summary(name: str) -> dict:
  return {
    "experiment": name,
    "title": "a title",
    "criterion": "a criterion.",
    "verdict": {"held": True, "reason": "a reason."},
    "quick": True,
    "wall_seconds": 1.5,
    "finished_utc": "20260101T000000Z",
    "run_dir": f"runs/{name}/20260101T000000Z",
    "environment": {"backend": "cpu", "devices": 1, "cpus": 2, "jax": "0.0"},
    "tables": [{"title": "t", "columns": ["a", "b"], "rows": [[1, 0.5], ["x", None]]}],
    "plots": [f"{name}.png"],
    "notes": "",
    "metrics": {},
    "state_digest": "ab" * 32,
  }


def make_run(workdir: pathlib.Path, name: str = "train", **fields) -> pathlib.Path:
  """A finished run folder of `name` whose summary has `fields` replaced (a value None removes the key)."""
  run = workdir / name / "20260101T000000Z"
  run.mkdir(parents=True)
  (run / "config.json").write_text("{}")
  summary = valid_summary(name)
  for key, value in fields.items():
    if value is None:
      summary.pop(key, None)
    else:
      summary[key] = value
  (run / "summary.json").write_text(json.dumps(summary))
  (run / f"{name}.png").write_bytes(PNG)
  return run


@pytest.fixture
def site(tmp_path):
  """A workdir, a results folder with an earlier result and a user's file, a README, and a folder outside."""
  results = tmp_path / "results"
  (results / "train").mkdir(parents=True)
  (results / "train" / "earlier.txt").write_text("earlier result")
  (results / "mine.txt").write_text("the user's")
  readme = tmp_path / "README.md"
  readme.write_text(f"# x\n{report.SECTION_START}\nold section\n{report.SECTION_END}\nafter\n")
  victim = tmp_path / "victim"
  victim.mkdir()
  (victim / "precious.txt").write_text("precious")
  return {"workdir": tmp_path / "runs", "results": results, "readme": readme, "victim": victim, "tmp": tmp_path}


def build(site):
  return report.build(workdir=str(site["workdir"]), results_dir=str(site["results"]), readme=str(site["readme"]))


def snapshot(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_untouched(site, before: dict) -> None:
  assert snapshot(site["tmp"]) == before
  assert (site["victim"] / "precious.txt").read_text() == "precious"


HOSTILE = [
  ("experiment", "/abs/victim", "experiment name"),
  ("experiment", "../victim", "experiment name"),
  ("experiment", "fig1", "experiment: got 'fig1', expected 'train'"),
  ("experiment", "no_such_experiment", "experiment name"),
  ("experiment", 5, "experiment name: got 5"),
  ("experiment", ["train"], "experiment name"),
  ("plots", ["../../x.png"], "plots[0]"),
  ("plots", ["/etc/passwd"], "plots[0]"),
  ("plots", ["sub/train.png"], "plots[0]"),
  ("plots", ["train.svg"], "plots[0]"),
  ("plots", [5], "plots[0]"),
  ("plots", "train.png", "plots: got 'train.png', expected a list"),
  ("plots", ["train.png", "train.png"], "no name twice"),
  ("title", 5, "title: got 5, expected a string"),
  ("notes", ["x"], "notes"),
  ("quick", "yes", "quick"),
  ("wall_seconds", "3", "wall_seconds"),
  ("state_digest", "`rm -rf /`", "state_digest"),
  ("verdict", {"held": "yes", "reason": "r"}, "verdict"),
  ("environment", {"backend": "cpu"}, "environment"),
  ("tables", "x", "tables"),
  ("tables", [{"title": "t", "columns": ["a"], "rows": [[{"x": 1}]]}], "tables[0].rows"),
  ("title", None, "title"),
]


@pytest.mark.parametrize("field,value,message", HOSTILE, ids=[f"{f}={v!r}" for f, v, _ in HOSTILE])
def test_a_hostile_summary_is_refused_and_nothing_changes(site, field, value, message):
  make_run(site["workdir"], **{field: value})
  before = snapshot(site["tmp"])
  with pytest.raises(report.ReportError, match=re.escape(message)) as error:
    build(site)
  assert str(error.value).startswith("--workdir: ") and "summary.json" in str(error.value)
  assert_untouched(site, before)


def test_the_demonstrated_attacks_delete_and_write_nothing_outside(site):
  """`"experiment": "/abs/path"` once made the report rmtree that path; `"plots": ["../../x"]` wrote outside."""
  run = make_run(site["workdir"], experiment=str(site["victim"]))
  with pytest.raises(report.ReportError, match="experiment name"):
    build(site)
  assert (site["victim"] / "precious.txt").read_text() == "precious"
  (run / "summary.json").write_text(json.dumps(valid_summary("train") | {"plots": ["../../x"]}))
  with pytest.raises(report.ReportError, match=r"plots\[0\]"):
    build(site)
  assert not (site["tmp"] / "x").exists() and not (site["results"] / "x").exists()


@pytest.mark.parametrize("what", ["plot", "summary", "run folder", "fifo"])
def test_a_file_outside_its_run_folder_is_refused(site, what):
  secret = site["tmp"] / "secret.png"
  secret.write_bytes(b"secret")
  run = make_run(site["workdir"])
  if what == "plot":
    (run / "train.png").unlink()
    (run / "train.png").symlink_to(secret)
    expected = "outside its run folder"
  elif what == "summary":
    outside_summary = site["tmp"] / "summary.json"
    outside_summary.write_text(json.dumps(valid_summary("train")))
    (run / "summary.json").unlink()
    (run / "summary.json").symlink_to(outside_summary)
    expected = "outside its run folder"
  elif what == "run folder":
    elsewhere = site["tmp"] / "elsewhere"
    run.rename(elsewhere)
    run.symlink_to(elsewhere, target_is_directory=True)
    expected = "outside the workdir"
  else:  # opening a FIFO for reading would block the report forever
    (run / "train.png").unlink()
    os.mkfifo(run / "train.png")
    expected = "not a regular file"
  before = snapshot(site["tmp"]) if what != "fifo" else None
  with pytest.raises(report.ReportError, match=expected):
    build(site)
  if before is not None:
    assert_untouched(site, before)
  assert not any(p.name.endswith(".png") for p in site["results"].rglob("*"))


def test_a_symlink_inside_the_run_folder_is_followed(site):
  run = make_run(site["workdir"])
  (run / "real.png").write_bytes(PNG + b"real")
  (run / "train.png").unlink()
  (run / "train.png").symlink_to("real.png")
  build(site)
  copied = site["results"] / "train" / "train.png"
  assert copied.read_bytes() == PNG + b"real" and not copied.is_symlink()


def test_summary_text_cannot_inject_code_blocks_html_or_section_markers(site):
  hostile = f"```python\nimport os; os.system('x')\n```\n{report.SECTION_END}\n<script>x</script>\n    indented | pipe"
  make_run(
    site["workdir"],
    title=hostile,
    notes=hostile,
    criterion=hostile,
    verdict={"held": False, "reason": hostile},
    tables=[{"title": hostile, "columns": [hostile, "b"], "rows": [[hostile, 1]]}],
    environment={"backend": hostile, "devices": 1, "cpus": 2, "jax": hostile},
  )
  build(site)
  for text in (site["readme"].read_text(), (site["results"] / "README.md").read_text()):
    assert "```python" not in text and "<script>" not in text and "\n    indented" not in text
    assert text.count(report.SECTION_END) <= 1
  readme = site["readme"].read_text()
  assert readme.endswith(f"{report.SECTION_END}\nafter\n") and readme.count(report.SECTION_START) == 1
  assert "indented \\| pipe" in readme  # a table cell's "|" does not split it
  build(site)  # the section is found again: nothing injected moved its markers
  assert site["readme"].read_text() == readme


def test_a_good_report_replaces_only_what_it_rebuilds(site):
  make_run(site["workdir"])
  make_run(site["workdir"], "fig1")
  written = build(site)
  results = site["results"]
  assert sorted(p.name for p in results.iterdir()) == ["README.md", "fig1", "mine.txt", "train"]
  assert sorted(p.name for p in (results / "train").iterdir()) == ["summary.json", "train.png"]
  assert (results / "mine.txt").read_text() == "the user's"
  assert {results / "train" / "train.png", results / "fig1" / "summary.json", site["readme"]} <= set(written)
  assert "### fig1" in site["readme"].read_text() and "old section" not in site["readme"].read_text()
  assert not [p for p in results.rglob(".*")]  # no staging folder or old copy is left behind


def test_the_results_folder_is_not_touched_when_the_readme_has_no_markers(site):
  make_run(site["workdir"])
  site["readme"].write_text("# no markers\n")
  before = snapshot(site["tmp"])
  with pytest.raises(report.ReportError, match="--readme: .* has no"):
    build(site)
  assert_untouched(site, before)


def test_the_command_line_names_the_bad_summary_without_a_traceback(site, capsys):
  make_run(site["workdir"], experiment="/abs/victim")
  argv = ["report", "--workdir", str(site["workdir"]), "--results_dir", str(site["results"])]
  code = cli.main(argv + ["--readme", str(site["readme"])])
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.startswith("error: --workdir: ") and "summary.json" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------------
# The launcher: a failure ends the job, a stop signal stops every process, a taken port is named.
# ------------------------------------------------------------------------------------------------------


def child_env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  env.pop("XLA_FLAGS", None)
  return env


# Two processes meet, run one collective, then process 1 fails as told while process 0 blocks in the next.
COLLECTIVE_CHILD = """
import os, signal, sys, time
from experiments import launch
launch.initialize()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("d",))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
def ones():
  local = np.ones((jax.local_device_count(),), np.float32)
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
print("first", float(total(ones())), flush=True)
if jax.process_index() == 1:
  how = sys.argv[1]
  if how == "raise":
    raise RuntimeError("boom after initialize")
  if how == "exit":
    sys.exit(3)
  if how == "raise SystemExit":  # not seen as a failure: waits at the shutdown barrier for process 0
    raise SystemExit(3)
  os.kill(os.getpid(), signal.SIGKILL)
print("second", float(total(ones())), flush=True)
"""


def launcher_command(path, *args: str, extra=()) -> list:
  """Two processes of `python path args` under the launcher, bounded by --max-time."""
  return launch.command_line(2, [sys.executable, str(path), *args], "--max-time", "110", *extra)


def run_launcher(tmp_path, script: str, *args: str, extra=()) -> tuple[subprocess.CompletedProcess, float]:
  path = tmp_path / "child.py"
  path.write_text(script)
  start = time.monotonic()
  result = subprocess.run(
    launcher_command(path, *args, extra=extra),
    env=child_env(),
    capture_output=True,
    text=True,
    timeout=HANG_GUARD_S,
  )
  return result, time.monotonic() - start


@pytest.mark.parametrize(
  "how,status,ending,last_line",
  [
    ("raise", 1, "exit code 1", "[1] RuntimeError: boom after initialize"),
    ("exit", 3, "exit code 3", "[1] process 1 of 2: exiting with status 3 (sys.exit)"),
    ("kill", 137, "killed by SIGKILL (signal 9)", "[1] first 2.0"),
  ],
)
def test_a_failed_process_ends_the_job_and_is_named(tmp_path, how, status, ending, last_line):
  """Before: a child raising after initialize() hung in JAX's shutdown barrier until --max-time."""
  result, elapsed = run_launcher(tmp_path, COLLECTIVE_CHILD, how)
  out = result.stdout
  assert elapsed < FAILURE_BOUND_S, f"the job took {elapsed:.0f} s to end\n{out}"
  assert result.returncode == status, out + result.stderr
  assert re.search(rf"\[launch\] process 1 exited with status {status}; stopping the [01] still running", out), out
  assert re.search(rf"\[launch\] process 1 \(pid \d+\) failed: {re.escape(ending)}; the last", out), out
  assert f"[launch]   {last_line}" in out, out
  assert "[0] second" not in out


def test_an_exit_unseen_as_a_failure_is_bounded_by_the_shutdown_timeout(tmp_path):
  """`raise SystemExit(3)` cannot be told from success: the shutdown barrier's timeout ends the job."""
  result, elapsed = run_launcher(tmp_path, COLLECTIVE_CHILD, "raise SystemExit", extra=["--shutdown-timeout", "4"])
  out = result.stdout
  assert elapsed < FAILURE_BOUND_S and result.returncode != 0, out
  assert "[1] process 1 of 2: exiting, but waiting at JAX's shutdown barrier for the other processes" in out, out
  assert re.search(r"\[launch\] process [01] \(pid \d+\) failed: ", out), out


def test_a_survivor_names_its_dead_peer_without_the_launcher(tmp_path):
  """No launcher to stop it: JAX's heartbeats (--heartbeat-timeout) end the survivor, naming the dead task."""
  code = (
    "from experiments import launch; launch.initialize()\n"
    "from jax.experimental import multihost_utils; multihost_utils.sync_global_devices('ready')\n"
    "print('ready', flush=True); import time; time.sleep(300)\n"
  )
  port, rendezvous = launch.free_port(), launch.free_port()
  procs = []
  for index in range(2):
    env = launch._child_env(
      child_env(),
      port=port,
      rendezvous_port=rendezvous,
      num_processes=2,
      process_id=index,
      devices_per_process=1,
      init_timeout=60,
      heartbeat_timeout=5,
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
      )
    )
  try:
    for proc in procs:
      assert any("ready" in line for line in iter(proc.stdout.readline, "")), "a child did not start"
    start = time.monotonic()
    procs[1].kill()
    out, _ = procs[0].communicate(timeout=FAILURE_BOUND_S)
    elapsed = time.monotonic() - start
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
  assert procs[0].returncode != 0 and elapsed < FAILURE_BOUND_S, out
  assert re.search(r"stopped sending heartbeats\):\s*1\b|Task 1 heartbeat", out), out


def alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie, waiting for a parent that is not the launcher to reap it, does not)."""
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError):
    return False
  return state not in ("Z", "X")


# Each child starts a grandchild; JAX children also report the addresses their sockets listen on.
STOPPED_CHILD = """
import os, socket, subprocess, sys, time
if sys.argv[1] == "jax":
  from experiments import launch
  launch.initialize()
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("ready")
  inodes = set()
  for fd in os.listdir("/proc/self/fd"):
    try:
      link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # the listing's own descriptor, closed since
      continue
    if link.startswith("socket:"):
      inodes.add(link[8:-1])
  listening = []
  for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for row in open(table).read().splitlines()[1:]:
      cols = row.split()
      if cols[3] == "0A" and cols[9] in inodes:
        listening.append(cols[1].split(":")[0])
  print("listening", " ".join(sorted(listening)), flush=True)
grandchild = subprocess.Popen(["sleep", "300"])
print("pids", os.getpid(), grandchild.pid, flush=True)
time.sleep(300)
"""
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


@pytest.mark.parametrize("signum,kind", [(signal.SIGTERM, "jax"), (signal.SIGINT, "plain")])
def test_a_stop_signal_to_the_launcher_leaves_no_process_behind(tmp_path, signum, kind):
  script = tmp_path / "child.py"
  script.write_text(STOPPED_CHILD)
  launcher = subprocess.Popen(
    launcher_command(script, kind),
    env=child_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  pids, lines = [], []
  try:
    deadline = time.monotonic() + HANG_GUARD_S
    while len(pids) < 4 and time.monotonic() < deadline:
      line = launcher.stdout.readline()
      if not line:
        break
      lines.append(line)
      if " pids " in line:
        pids += [int(p) for p in line.split(" pids ")[1].split()]
    assert len(pids) == 4, "".join(lines)
    launcher.send_signal(signum)
    out, _ = launcher.communicate(timeout=30)
  finally:
    if launcher.poll() is None:
      launcher.kill()
      launcher.wait()
  lines.append(out)
  assert launcher.returncode == 128 + signum, "".join(lines)
  assert f"[launch] got {signal.Signals(signum).name}; stopping every process" in out
  deadline = time.monotonic() + 5  # the grandchildren's new parent reaps them
  while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not [pid for pid in pids if alive(pid)], "".join(lines)
  if kind == "jax":  # the coordinator and Gloo listen on loopback only
    addresses = [a for line in lines if " listening " in line for a in line.split(" listening ", 1)[1].split()]
    assert addresses and set(addresses) <= LOOPBACK, addresses


def test_a_taken_port_is_named_before_anything_starts():
  """Before: the coordinator crashed with SIGSEGV (status 139) on a port in use."""
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = subprocess.run(
      launch.command_line(2, [sys.executable, "-c", "print('started')"], "--port", str(port)),
      env=child_env(),
      capture_output=True,
      text=True,
      timeout=HANG_GUARD_S,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"port {port}: 127.0.0.1:{port} is already in use" in result.stderr
    assert "started" not in result.stdout
    with pytest.raises(ValueError, match=f"port {port}: 127.0.0.1:{port} is already in use"):
      launch.check_port_free(port)


def test_a_child_names_a_taken_coordinator_or_rendezvous_port():
  """Outside the launcher's check (another launcher, or a port taken since): process 0 says which port."""
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    environ = {
      launch.ENV_COORDINATOR: f"127.0.0.1:{port}",
      launch.ENV_NUM_PROCESSES: "1",
      launch.ENV_PROCESS_ID: "0",
      launch.ENV_INIT_TIMEOUT: "5",
    }
    with pytest.raises(RuntimeError, match=f"process 0 of 1: cannot host the coordinator: port {port}"):
      launch.initialize(environ=environ)
    with pytest.raises(RuntimeError, match=f"cannot open the rendezvous at 127.0.0.1:{port}"):
      launch._rendezvous(f"127.0.0.1:{port}", num_processes=2, process_id=0, timeout=1)


def test_a_figures_vector_twin_is_published_and_an_escaping_one_refused(site):
  run = make_run(site["workdir"])
  (run / "train.svg").write_text("<svg/>")
  build(site)
  assert (site["results"] / "train" / "train.svg").read_text() == "<svg/>"
  (run / "train.svg").unlink()
  (run / "train.svg").symlink_to(site["victim"] / "precious.txt")
  with pytest.raises(report.ReportError, match="outside its run folder"):
    build(site)
