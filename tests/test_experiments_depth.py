"""The convnet and init_depth experiments: criteria on synthetic metrics, and quick runs re-judged from disk."""

import importlib

import numpy as np
import pytest

from experiments import config_parsing
from experiments import data
from experiments import runner


def verdict(name: str, metrics: dict):
  module = importlib.import_module(f"experiments.{name}")
  result = module.evaluate(metrics, config_parsing.load_config(name).criterion)
  assert result.reason
  return result


def convnet_metrics(**changes):
  metrics = {
    "test_accuracy": {"none": [0.80, 0.82, 0.81, 0.79, 0.80], "pre": [0.90, 0.91, 0.93, 0.92, 0.90]},
    "shift": {"pre_running": [0.40, 0.45, 0.50, 0.42, 0.38], "pre_adabn": [0.88, 0.90, 0.91, 0.89, 0.87]},
    "stats": {"per_channel": True, "max_abs_diff": [1e-7, 2e-7]},
  }
  metrics.update(changes)
  return metrics


def test_convnet_holds_when_bn_wins_and_adabn_recovers():
  assert verdict("convnet", convnet_metrics()).held


@pytest.mark.parametrize(
  "changes",
  [
    {"test_accuracy": {"none": [0.90, 0.91, 0.93, 0.92, 0.90], "pre": [0.80, 0.82, 0.81, 0.79, 0.80]}},
    {"shift": {"pre_running": [0.88, 0.90, 0.91, 0.89, 0.87], "pre_adabn": [0.89, 0.91, 0.92, 0.90, 0.88]}},
    {"stats": {"per_channel": False, "max_abs_diff": [1e-7]}},
    {"stats": {"per_channel": True, "max_abs_diff": [1e-2]}},
  ],
  ids=["bn_loses", "adabn_recovers_little", "not_per_channel", "not_nhw_moments"],
)
def test_convnet_fails(changes):
  assert not verdict("convnet", convnet_metrics(**changes)).held


def init_depth_metrics(bn_ratio=100.0, bn_acc=0.9):
  cells = lambda acc: [[[acc] * 5 for _ in range(5)] for _ in range(3)]
  none = cells(0.9)
  for row in none:
    row[-1] = row[-2] = [0.1] * 5
  return {
    "accuracy": {"none": none, "bn": cells(bn_acc)},
    "grad_depths": [2, 100],
    "grad_ratio": {
      "none": [[1.0, 1.1, 0.9, 1.0, 1.2]] * 2,
      "bn": [[1.0] * 5, [bn_ratio * f for f in (0.8, 1.0, 1.2, 0.9, 1.1)]],
    },
  }


def test_init_depth_holds_when_bn_trains_wider_and_its_gradients_explode():
  assert verdict("init_depth", init_depth_metrics()).held


@pytest.mark.parametrize(
  "metrics,refuted",
  [(init_depth_metrics(bn_ratio=1.0), "explosion refuted"), (init_depth_metrics(bn_acc=0.5), "(refuted)")],
  ids=["no_explosion", "bn_trains_nowhere"],
)
def test_init_depth_fails_and_says_which_side_is_refuted(metrics, refuted):
  result = verdict("init_depth", metrics)
  assert not result.held and refuted in result.reason


def test_convnet_runs_on_mnist_idx_files(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
    "train-images-idx3-ubyte": rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
    "train-labels-idx1-ubyte": (np.arange(300) % 10).astype(np.uint8),
    "t10k-images-idx3-ubyte": rng.integers(0, 256, (100, 28, 28), dtype=np.uint8),
    "t10k-labels-idx1-ubyte": (np.arange(100) % 10).astype(np.uint8),
  }
  (tmp_path / "mnist").mkdir()
  for stem, array in arrays.items():
    data.write_idx(tmp_path / "mnist" / stem, array)
  overrides = ["--config.dataset=mnist", f"--config.data_dir={tmp_path / 'mnist'}"]
  summary = runner.run_experiment(
    "convnet", quick=True, workdir=str(tmp_path / "runs"), overrides=overrides, quiet=True
  )
  assert summary["metrics"]["stats"]["per_channel"]
  config = (runner.latest_finished_run(tmp_path / "runs", "convnet") / "config.json").read_text()
  assert '"dataset": "mnist"' in config


def test_convnet_refuses_a_dataset_of_feature_vectors():
  config = config_parsing.load_config("convnet", overrides=["--config.dataset=wine"])
  with pytest.raises(ValueError, match=r"config.dataset: got 'wine', expected an image dataset"):
    config_parsing.validate("convnet", config)
