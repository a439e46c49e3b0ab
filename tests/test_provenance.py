"""Provenance of runs, pre-registration records, what the report publishes, and the command line's output."""

import json
import pathlib
import shutil

import pytest

from experiments import __main__ as cli
from experiments import config_parsing
from experiments import configs
from experiments import preregistration
from experiments import provenance
from experiments import report
from experiments import runner

OVERRIDES = ["--config.num_steps=20", "--config.eval_every=10"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One quick `train` run with overrides: its workdir, folder and summary."""
  workdir = tmp_path_factory.mktemp("runs")
  summary = runner.run_experiment("train", quick=True, workdir=str(workdir), quiet=True, overrides=OVERRIDES)
  return workdir, pathlib.Path(summary["run_dir"]), summary


def _copy_run(finished, tmp_path, **provenance_fields) -> pathlib.Path:
  """A workdir holding a copy of the finished run, its summary's provenance updated with the fields given."""
  _, folder, _ = finished
  workdir = tmp_path / "runs"
  copy = workdir / "train" / folder.name
  shutil.copytree(folder, copy)
  summary = json.loads((copy / "summary.json").read_text())
  for key, value in provenance_fields.items():
    summary["provenance"][key] = value
  (copy / "summary.json").write_text(json.dumps(summary))
  return workdir


def _build(workdir, tmp_path, **allow):
  readme = tmp_path / "README.md"
  readme.write_text(f"{report.SECTION_START}\n{report.SECTION_END}\n")
  report.build(workdir=str(workdir), results_dir=str(tmp_path / "results"), readme=str(readme), **allow)
  return (tmp_path / "results" / "README.md").read_text()


CLEAN = {"available": True, "reason": "", "commit": "a" * 40, "dirty": False, "dirty_files": [], "dirty_count": 0}


# Pre-registration records.


@pytest.mark.parametrize("name", config_parsing.EXPERIMENTS)
def test_every_experiment_has_a_record_whose_threshold_is_the_configs(name):
  versions = preregistration.load(name)
  latest = preregistration.check(name, config_parsing.load_config(name).criterion.to_dict())
  assert latest == versions[-1]
  for version in versions:
    assert version["hypothesis"] and version["metric"] and version["arms"] and version["seeds"]


def test_a_changed_criterion_without_a_new_version_fails(tmp_path):
  shutil.copy(preregistration.path("train"), tmp_path / "train.toml")
  registered = preregistration.load("train", tmp_path)[-1]
  changed = {**registered["criterion"], "min_test_accuracy": 0.8}
  with pytest.raises(preregistration.PreregistrationError, match=r"criterion differs .*min_test_accuracy"):
    preregistration.check("train", changed, tmp_path)
  assert preregistration.describe("train", changed, tmp_path)["criterion_matches"] is False
  record = (tmp_path / "train.toml").read_text()
  body = record.split("[[version]]", 1)[1].split("[[version.result]]", 1)[0]
  (tmp_path / "train.toml").write_text(
    record + "\n[[version]]" + body.replace("version = 1", "version = 2").replace("= 0.9", "= 0.8")
  )
  versions = preregistration.load("train", tmp_path)
  assert preregistration.check("train", changed, tmp_path)["version"] == 2
  assert preregistration.digest(versions[0]) == preregistration.digest(registered)  # the old one is kept
  assert versions[0]["result"], "the old version keeps its result"


def test_a_record_out_of_order_or_missing_is_refused(tmp_path):
  with pytest.raises(preregistration.PreregistrationError, match="missing"):
    preregistration.load("train", tmp_path)
  (tmp_path / "train.toml").write_text(preregistration.path("train").read_text().replace("version = 1", "version = 3"))
  with pytest.raises(preregistration.PreregistrationError, match=r"version\[0\].version: got 3"):
    preregistration.load("train", tmp_path)


def test_the_digest_ignores_later_pilots_and_results():
  version = preregistration.load("fig1")[0]
  assert preregistration.digest(version) == preregistration.digest({**version, "pilot": [], "result": []})
  assert preregistration.digest(version) != preregistration.digest({**version, "metric": "another"})


# What a run records.


def test_a_run_records_its_provenance_in_config_and_summary(finished):
  _, folder, summary = finished
  started = json.loads((folder / "config.json").read_text())["provenance"]
  prov = summary["provenance"]
  assert json.loads((folder / "summary.json").read_text())["provenance"] == prov
  for record in (started, prov):
    assert record["overrides"] == ["num_steps=20", "eval_every=10"]
    assert set(record["packages"]) >= {"jax", "jaxlib", "flax", "optax", "numpy", "bnjax", "python"}
    assert record["config"]["num_steps"] == 20 and record["config"]["criterion"]
    assert record["seeds"] == {"seed": 0, "model_seeds": [0]}
    machine = record["machine"]
    assert machine["cpu_model"] and machine["cores"] >= 1 and machine["platform"] and machine["device_count"] >= 1
    assert len(machine["load_average"]) == 3
    git = record["git"]
    assert isinstance(git["available"], bool)
    if git["available"]:
      assert len(git["commit"]) == 40 and isinstance(git["dirty"], bool) and isinstance(git["dirty_files"], list)
  assert prov["wall_seconds"] == summary["wall_seconds"] > 0
  pre = prov["preregistration"]
  assert pre["version"] == preregistration.load("train")[-1]["version"] and len(pre["digest"]) == 64
  assert pre["criterion_matches"] is False  # the quick form's threshold is not the registered one
  markdown = (folder / "report.md").read_text()
  devices = summary["environment"]["devices"]
  assert f"({provenance.plural(devices, 'device')})" in markdown and "devices)" not in markdown.replace(
    f"{devices} devices)", ""
  )
  assert "Provenance: " in markdown and "pre-registration version" in markdown


def test_a_tree_without_git_is_recorded_as_such(tmp_path):
  git = provenance.git_state(tmp_path)
  assert git["available"] is False and git["commit"] is None and git["dirty"] is None and git["reason"]


def test_the_machine_line_names_cpu_cores_load_and_devices():
  line = provenance.machine_line(
    {
      "cpu_model": "X CPU",
      "cores": 2,
      "usable_cores": 2,
      "load_average": [1.5, 1, 1],
      "platform": "Linux",
      "backend": "cpu",
      "device_count": 1,
    }
  )
  assert line == "X CPU, 2 cores; load average 1.5 at start; Linux; cpu, 1 device"
  assert provenance.plural(1, "device") == "1 device" and provenance.plural(8, "device") == "8 devices"


# What the report publishes.


def test_the_report_refuses_overrides_and_dirty_trees_unless_allowed(finished, tmp_path):
  workdir = _copy_run(finished, tmp_path, git=CLEAN)
  with pytest.raises(report.ReportError, match=r"overrides .*--allow-overrides"):
    _build(workdir, tmp_path)
  page = _build(workdir, tmp_path, allow_overrides=True)
  assert "commit `aaaaaaaaaaaa` (clean)" in page and "`num_steps=20`" in page
  dirty = {**CLEAN, "dirty": True, "dirty_files": ["bnjax/core.py"], "dirty_count": 1}
  workdir = _copy_run(finished, tmp_path / "dirty", git=dirty, overrides=[])
  with pytest.raises(report.ReportError, match=r"dirty tree .*bnjax/core.py.*--allow-dirty"):
    _build(workdir, tmp_path)
  assert "dirty: `bnjax/core.py`" in _build(workdir, tmp_path, allow_dirty=True)
  unknown = {**CLEAN, "available": False, "reason": "not a git checkout", "commit": None, "dirty": None}
  workdir = _copy_run(finished, tmp_path / "unknown", git=unknown, overrides=[])
  with pytest.raises(report.ReportError, match=r"code version is unknown \(not a git checkout\)"):
    _build(workdir, tmp_path)
  assert "code version unknown (not a git checkout)" in _build(workdir, tmp_path, allow_dirty=True)


def test_the_report_names_the_run_its_machine_and_its_preregistration(finished, tmp_path):
  workdir = _copy_run(finished, tmp_path, git=CLEAN, overrides=[])
  page = _build(workdir, tmp_path)
  folder = next((workdir / "train").iterdir())
  assert f"Published run `{folder.as_posix()}`" in page
  machine = dict(finished[2]["provenance"]["machine"])
  load = machine.pop("load_average")[0]
  line = provenance.machine_line(machine)
  assert f"Seconds are each run's wall time, measured on: {line} (load average at start {load}-{load})" in page
  assert provenance.machine_line(finished[2]["provenance"]["machine"]) in page  # the run's section, with its load
  version = preregistration.load("train")[-1]["version"]
  assert f"pre-registration version {version} (`{finished[2]['provenance']['preregistration']['digest'][:12]}`" in page
  assert "Runs disagree" not in page


def test_the_report_lists_every_run_when_verdicts_differ(finished, tmp_path):
  workdir = _copy_run(finished, tmp_path, git=CLEAN, overrides=[])
  first = next((workdir / "train").iterdir())
  second = first.with_name("29990101T000000Z")
  shutil.copytree(first, second)
  summary = json.loads((first / "summary.json").read_text())
  summary["verdict"]["held"] = not summary["verdict"]["held"]
  (first / "summary.json").write_text(json.dumps(summary))
  page = _build(workdir, tmp_path)
  assert "(runs disagree)" in page and "**Runs disagree**: 2 finished runs of train" in page
  assert f"`{first.as_posix()}`: " in page and f"`{second.as_posix()}`: " in page


# The command line.


def test_quiet_prints_the_verdict_report_and_figures_on_stdout(tmp_path, capsys):
  argv = ["train", "--quick", "--quiet", "--workdir", str(tmp_path), *OVERRIDES]
  assert cli.main(argv) == 0
  out, err = capsys.readouterr()
  folder = runner.run_dirs(tmp_path, "train")[-1]
  summary = json.loads((folder / "summary.json").read_text())
  assert out.startswith("[train] criterion HELD: ") or out.startswith("[train] criterion NOT HELD: ")
  assert f"[train] report: {folder / 'report.md'}" in out
  for plot in summary["plots"]:
    assert f"[train] figure: {folder / plot}" in out
  assert f"[train] writing {folder}" in err and "writing" not in out


def test_show_config_prints_every_key_with_its_default_and_help(capsys):
  assert cli.main(["fig1", "--show-config", "--config.seed=3"]) == 0
  out = capsys.readouterr().out
  config = config_parsing.load_config("fig1")
  for key in config_parsing.leaf_keys(config):
    assert f"  {key} " in out, key
  assert "= 3 (default 0)" in out
  for key in ("num_steps", "learning_rate", "seed", "num_devices", "criterion.target_accuracy"):
    assert configs.help_text("fig1", key) in out
  for name in config_parsing.EXPERIMENTS:  # every key every training config has comes with its help
    for key in ("dataset", "num_steps", "batch_size", "learning_rate", "optimizer", "seed", "num_devices"):
      assert configs.help_text(name, key), (name, key)


def test_list_shows_plain_text():
  assert cli.main(["list"]) == 0
  assert "`" not in report.list_text() and "--resume" in report.list_text()
