"""The experiments runner: every experiment's quick form, verdicts, config checks, resume, report."""

import importlib
import json
import math
import shutil

import ml_collections
import pytest

from experiments import __main__ as cli
from experiments import config_parsing
from experiments import configs
from experiments import report
from experiments import runner

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "report.md")


@pytest.mark.parametrize("name", config_parsing.EXPERIMENTS)
def test_quick_run_writes_outputs_and_verdict_follows_metrics(name, tmp_path):
  workdir = tmp_path
  summary = runner.run_experiment(name, quick=True, workdir=str(workdir), quiet=True)
  run_dir = runner.latest_finished_run(workdir, name)
  assert run_dir is not None and str(run_dir) == summary["run_dir"]
  for filename in RUN_FILES:
    assert (run_dir / filename).stat().st_size > 0, filename
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert rows and all("step" in row for row in rows)
  config = json.loads((run_dir / "config.json").read_text())
  assert config["num_steps"] == config_parsing.load_config(name, quick=True).num_steps
  assert max(row["step"] for row in rows) == config["num_steps"]
  saved = json.loads((run_dir / "summary.json").read_text())
  assert saved["verdict"] == summary["verdict"]
  assert len(saved["state_digest"]) == 64 and int(saved["state_digest"], 16) >= 0
  assert saved["plots"], "every experiment draws at least one plot"
  for plot in saved["plots"]:
    assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The verdict is recomputed from the recorded metrics alone.
  module = importlib.import_module(f"experiments.{name}")
  criterion = ml_collections.ConfigDict(config["criterion"])
  recomputed = module.evaluate(saved["metrics"], criterion)
  assert (recomputed.held, recomputed.reason) == (saved["verdict"]["held"], saved["verdict"]["reason"])
  markdown = (run_dir / "report.md").read_text()
  assert ("**held**" in markdown) == saved["verdict"]["held"]
  assert saved["state_digest"] in markdown


# Metrics an evaluator must pass, then a change to them that must fail it.
def _evaluator_cases():
  # fig1, lr_sweep, keras_example and inference: more cases in tests/test_criteria.py.
  fig1 = {"steps_to_target": {"none": 1000.0, "bn": 300.0}, "drift": {"none": [2.0] * 10, "bn": [1.0] * 8 + [3.0] * 2}}
  yield (
    "fig1",
    fig1,
    [
      ("steps_to_target", {"none": 500.0, "bn": 300.0}),
      ("drift", {"none": [2.0] * 10, "bn": [1.0] * 7 + [3.0] * 3}),
      ("steps_to_target", {"none": 1000.0, "bn": None}),
    ],
  )
  lr = {
    "learning_rates": [0.01, 0.1, 1.0, 3.0],
    "final_test_accuracy": {"none": [0.95, 0.2, 0.1, 0.1], "bn": [0.95, 0.96, 0.93, 0.5]},
  }
  yield "lr_sweep", lr, [("final_test_accuracy", {"none": [0.95, 0.95, 0.1, 0.1], "bn": [0.95, 0.96, 0.5, 0.5]})]
  fs = {"final_test_accuracy": {"none": 0.60, "input_bn": 0.835, "hidden_bn": 0.8, "standardized": 0.84}}
  yield (
    "feature_scale",
    fs,
    [
      ("final_test_accuracy", {"none": 0.60, "input_bn": 0.80, "hidden_bn": 0.8, "standardized": 0.84}),
      ("final_test_accuracy", {"none": 0.835, "input_bn": 0.835, "hidden_bn": 0.8, "standardized": 0.84}),
    ],
  )
  dg = {"ratio": {"sigmoid": {"none": [1e-3, 1e-4], "bn": [2.0, 3.0]}, "tanh": {"none": [0.5, 20.0], "bn": [0.9, 1.1]}}}
  yield (
    "deep_gradients",
    dg,
    [
      (
        "ratio",
        {"sigmoid": {"none": [1e-3, 1e-4], "bn": [2.0, 30.0]}, "tanh": {"none": [0.5, 20.0], "bn": [0.9, 1.1]}},
      ),
      ("ratio", {"sigmoid": {"none": [1e-3, 1e-4], "bn": [2.0, 3.0]}, "tanh": {"none": [0.5, 2.0], "bn": [0.9, 1.1]}}),
    ],
  )
  cell = lambda pre, post: {"test_accuracy": {"pre": pre, "post": post}}
  pl = {"cells": [cell([0.90, 0.91, 0.92], [0.93, 0.95, 0.94]), cell([0.8, 0.8, 0.81], [0.83, 0.84, 0.82])]}
  yield (
    "placement",
    pl,
    [("cells", [cell([0.93, 0.95, 0.94], [0.90, 0.91, 0.92]), cell([0.8, 0.8, 0.81], [0.8, 0.81, 0.8])])],
  )
  ke = {
    "seed_test_accuracy": {
      "none": [0.70, 0.72, 0.71, 0.69],
      "bn": [0.80, 0.81, 0.83, 0.80],
      "standardized": [0.81, 0.80, 0.83, 0.81],
    },
    "seed_majority_rate": [0.5] * 4,
  }
  yield (
    "keras_example",
    ke,
    [
      (
        "seed_test_accuracy",
        {"none": [0.70, 0.72, 0.71, 0.69], "bn": [0.60, 0.81, 0.83, 0.62], "standardized": [0.81, 0.80, 0.83, 0.81]},
      )
    ],
  )
  size = lambda acc_b, acc_p, precise: {
    "seed_test_accuracy": {"population_alg2": [acc_p, acc_p + 0.002], "precise_bn": [precise, precise + 0.002]},
    "test_accuracy": {"running_biased": acc_b, "population_alg2": acc_p},
  }
  inf = {"by_batch_size": {"4": size(0.90, 0.92, 0.92), "60": size(0.95, 0.945, 0.9)}}
  yield (
    "inference",
    inf,
    [
      ("by_batch_size", {"4": size(0.90, 0.92, 0.95), "60": size(0.95, 0.945, 0.9)}),
      ("by_batch_size", {"4": size(0.90, 0.92, 0.92), "60": size(0.95, 0.92, 0.9)}),
    ],
  )
  tr = {"test_accuracy": 0.93}
  yield "train", tr, [("test_accuracy", 0.5)]


@pytest.mark.parametrize("name,passing,failing", list(_evaluator_cases()), ids=[case[0] for case in _evaluator_cases()])
def test_evaluator_passes_and_fails_on_given_metrics(name, passing, failing):
  module = importlib.import_module(f"experiments.{name}")
  criterion = config_parsing.load_config(name).criterion
  verdict = module.evaluate(passing, criterion)
  assert verdict.held, verdict.reason
  for key, value in failing:
    verdict = module.evaluate({**passing, key: value}, criterion)
    assert not verdict.held, (key, value, verdict.reason)
    assert verdict.reason


def test_unknown_key_is_refused_listing_valid_keys():
  with pytest.raises(config_parsing.ConfigError) as error:
    config_parsing.load_config("fig1", overrides=["--config.num_stepz=10"])
  message = str(error.value)
  assert "num_stepz" in message and "valid keys" in message
  for key in ("num_steps", "batch_size", "learning_rate", "criterion.target_accuracy"):
    assert key in message


def test_wrong_type_is_refused_naming_the_key():
  with pytest.raises(config_parsing.ConfigError, match=r"--config.batch_size.*int"):
    config_parsing.load_config("train", overrides=["--config.batch_size=sixty"])
  with pytest.raises(config_parsing.ConfigError, match=r"--config.criterion.min_test_accuracy"):
    config_parsing.load_config("train", overrides=["--config.criterion.min_test_accuracy=high"])


def test_overrides_are_parsed_to_the_keys_types():
  config = config_parsing.load_config(
    "train",
    overrides=[
      "--config.batch_size=32",
      "--config.learning_rate=1",
      "--config.hidden=16,8",
      "--config.standardize=true",
      "--config.norm=post",
    ],
  )
  assert config.batch_size == 32 and config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
  assert tuple(config.hidden) == (16, 8) and config.standardize is True and config.norm == "post"


def test_every_training_config_has_the_common_keys():
  for name in config_parsing.EXPERIMENTS:
    for quick in (False, True):
      config = config_parsing.load_config(name, quick=quick)
      for key in (*configs.COMMON_KEYS, "criterion"):
        assert key in config, (name, key)
      config_parsing.validate(name, config)
      if name != "train":
        assert quick or config.num_seeds >= 5, name


@pytest.mark.parametrize(
  "override,key",
  [
    ("--config.batch_size=-4", "config.batch_size"),
    ("--config.num_steps=0", "config.num_steps"),
    ("--config.dataset=imagenet", "config.dataset"),
    ("--config.num_devices=8", "config.batch_size"),  # 60 is not a multiple of 8.
    ("--config.learning_rate=-0.1", "config.learning_rate"),
    ("--config.optimizer=rmsprop", "config.optimizer"),
    ("--config.unit=500", "config.unit"),
  ],
)
def test_bad_values_are_refused_before_anything_runs(override, key, tmp_path):
  with pytest.raises(ValueError) as error:
    runner.run_experiment("fig1", quick=True, workdir=str(tmp_path), overrides=[override], quiet=True)
  assert key in str(error.value)
  assert not (tmp_path / "fig1").exists(), "nothing may be written for a refused config"


def test_cli_refuses_bad_config_with_exit_code_2(capsys, tmp_path):
  code = cli.main(["train", "--quick", "--workdir", str(tmp_path), "--config.bogus=1"])
  assert code == 2
  err = capsys.readouterr().err
  assert "bogus" in err and "valid keys" in err and "batch_size" in err


def test_cli_list_names_every_experiment(capsys):
  assert cli.main(["list"]) == 0
  out = capsys.readouterr().out
  for name in config_parsing.EXPERIMENTS:
    assert name in out


def test_resume_from_checkpoint_gives_the_uninterrupted_digest(tmp_path):
  overrides = ["--config.num_steps=60", "--config.checkpoint_every=20", "--config.eval_every=20"]
  full = runner.run_experiment("train", quick=True, workdir=str(tmp_path), overrides=overrides, quiet=True)
  run_dir = runner.run_dirs(tmp_path, "train")[-1]
  checkpoints = run_dir / "checkpoints"
  assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [20, 40, 60]
  # Interrupted after step 20: later checkpoints, metrics and the summary never got written.
  shutil.rmtree(checkpoints / "60")
  shutil.rmtree(checkpoints / "40")
  (run_dir / "summary.json").unlink()
  resumed = runner.run_experiment(
    "train", quick=True, workdir=str(tmp_path), overrides=overrides, resume=True, quiet=True
  )
  assert resumed["run_dir"] == full["run_dir"]
  assert resumed["state_digest"] == full["state_digest"]
  steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  assert steps == [0, 20, 40, 60]
  assert math.isclose(resumed["metrics"]["test_accuracy"], full["metrics"]["test_accuracy"])


def test_resume_refuses_a_different_config(tmp_path):
  runner.run_experiment("train", quick=True, workdir=str(tmp_path), quiet=True)
  with pytest.raises(ValueError, match="--resume.*differs"):
    runner.run_experiment(
      "train", quick=True, workdir=str(tmp_path), resume=True, quiet=True, overrides=["--config.learning_rate=0.5"]
    )


def test_report_rebuilds_readme_section_and_results(tmp_path):
  workdir = tmp_path / "runs"
  quick_summaries = {
    name: runner.run_experiment(
      name, quick=True, workdir=str(workdir), quiet=True, overrides=["--config.num_steps=20", "--config.eval_every=10"]
    )
    for name in ("train", "keras_example")
  }
  readme = tmp_path / "README.md"
  readme.write_text(f"# x\n\n## Results\n\n{report.SECTION_START}\nold text\n{report.SECTION_END}\n\n## After\n")
  results = tmp_path / "results"
  # Test runs use overrides, and other work may leave the tree dirty: both allowed here (see test_provenance).
  report.build(
    workdir=str(workdir), results_dir=str(results), readme=str(readme), allow_dirty=True, allow_overrides=True
  )
  text = readme.read_text()
  assert "old text" not in text and text.endswith(f"{report.SECTION_END}\n\n## After\n")
  for name, summary in quick_summaries.items():
    assert f"### {name}" in text
    for plot in summary["plots"]:
      assert (results / name / plot).exists()
      assert f"{results.as_posix()}/{name}/{plot}" in text
  assert (results / "README.md").exists()
  assert "```python" not in text  # Nothing in the section for tests/test_readme.py to execute.


def test_fig1_switches_to_the_paper_protocol_when_given_mnist_files():
  config = config_parsing.load_config("fig1", overrides=["--config.data_dir=/data/mnist"])
  assert (config.dataset, config.num_steps, config.batch_size) == ("mnist", 50_000, 60)
  kept = config_parsing.load_config("fig1", overrides=["--config.data_dir=/data/mnist", "--config.num_steps=1000"])
  assert (kept.dataset, kept.num_steps) == ("mnist", 1000)
  with pytest.raises(ValueError, match="config.data_dir"):
    config_parsing.validate("fig1", config_parsing.load_config("fig1", overrides=["--config.dataset=mnist"]))


def test_data_parallel_train_matches_one_device(tmp_path):
  one = runner.run_experiment("train", quick=True, workdir=str(tmp_path / "one"), quiet=True)
  for parallel in ("shard_map", "pmap", "jit"):
    many = runner.run_experiment(
      "train",
      quick=True,
      workdir=str(tmp_path / parallel),
      quiet=True,
      overrides=["--config.num_devices=2", f"--config.parallel={parallel}"],
    )
    assert abs(one["metrics"]["test_loss"] - many["metrics"]["test_loss"]) < 1e-4, parallel


def test_cli_runs_an_experiment_and_the_report(tmp_path, capsys):
  workdir = str(tmp_path / "runs")
  assert (
    cli.main(
      [
        "train",
        "--quick",
        "--quiet",
        "--workdir",
        workdir,
        "--config.num_steps=20",
        "--config.eval_every=10",
        "--config.checkpoint_every=0",
      ]
    )
    == 0
  )
  readme = tmp_path / "README.md"
  readme.write_text(f"{report.SECTION_START}\n{report.SECTION_END}\n")
  assert (
    cli.main(
      [
        "report",
        "--workdir",
        workdir,
        "--results_dir",
        str(tmp_path / "results"),
        "--readme",
        str(readme),
        "--allow-dirty",
        "--allow-overrides",
      ]
    )
    == 0
  )
  assert (tmp_path / "results" / "train" / "train.png").exists()
  assert "### train" in readme.read_text()


def test_many_seed_experiment_resumes_each_arm_from_its_checkpoint(tmp_path):
  overrides = ["--config.checkpoint_every=100"]
  full = runner.run_experiment("fig1", quick=True, workdir=str(tmp_path), overrides=overrides, quiet=True)
  run_dir = runner.run_dirs(tmp_path, "fig1")[-1]
  # "none" was interrupted after its step-100 checkpoint; "bn" had not saved one yet.
  shutil.rmtree(run_dir / "checkpoints" / "none" / "200")
  shutil.rmtree(run_dir / "checkpoints" / "bn")
  resumed = runner.run_experiment(
    "fig1", quick=True, workdir=str(tmp_path), overrides=overrides, resume=True, quiet=True
  )
  assert resumed["state_digest"] == full["state_digest"]
  assert resumed["metrics"] == full["metrics"]
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  for arm in ("none", "bn"):
    assert [r["step"] for r in rows if r["arm"] == arm] == [0, 50, 100, 150, 200]
