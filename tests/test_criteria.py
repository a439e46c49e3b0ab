"""Each experiment's criterion on synthetic metrics: it holds where it should and fails where it should."""

import importlib

import ml_collections
import numpy as np
import pytest

from experiments import common
from experiments import config_parsing


def criterion(name: str, **changes) -> ml_collections.ConfigDict:
  result = config_parsing.load_config(name).criterion
  result.update(changes)
  return result


def verdict(name: str, metrics: dict, **changes):
  module = importlib.import_module(f"experiments.{name}")
  result = module.evaluate(metrics, criterion(name, **changes))
  assert result.reason
  return result


# ---------------------------------------------------------------------------------------------------------
# fig1: steps to the target and the median-over-time drift.


def fig1_metrics(bn_drift, none_drift=None, steps=(300.0, 1000.0)):
  none_drift = [2.0] * len(bn_drift) if none_drift is None else none_drift
  return {"steps_to_target": {"bn": steps[0], "none": steps[1]}, "drift": {"bn": bn_drift, "none": none_drift}}


def test_fig1_holds_when_bn_is_faster_and_drifts_less_in_enough_seeds():
  assert verdict("fig1", fig1_metrics([1.0] * 8 + [3.0] * 2)).held


@pytest.mark.parametrize(
  "metrics",
  [
    fig1_metrics([1.0] * 7 + [3.0] * 3),  # 7 of 10 seeds: one short.
    fig1_metrics([1.0] * 10, steps=(600.0, 1000.0)),  # Faster, but not 2x.
    fig1_metrics([1.0] * 10, steps=(None, 1000.0)),  # BN never reaches the target.
  ],
  ids=["too_few_seeds", "not_fast_enough", "bn_never"],
)
def test_fig1_fails(metrics):
  assert not verdict("fig1", metrics).held


def test_fig1_median_drift_ignores_one_spike_that_decides_the_max():
  steps = np.arange(0, 1100, 100)
  calm = np.zeros((len(steps), 1, 3))
  spiked = calm.copy()
  spiked[7, 0, 1] = 5.0
  fig1 = importlib.import_module("experiments.fig1")
  assert fig1.drift(steps, spiked, 100, "median")[0] == 0.0
  assert fig1.drift(steps, spiked, 100, "max")[0] == 5.0
  trend = np.linspace(0, 2, len(steps))[:, None, None] * np.ones((1, 1, 3))
  assert fig1.drift(steps, trend, 0, "median")[0] > 0.9  # A sustained shift still counts.


# ---------------------------------------------------------------------------------------------------------
# lr_sweep: the largest learning rate that still reaches the target.


def lr_metrics(none, bn, lrs=(0.01, 0.1, 1.0, 3.0)):
  return {"learning_rates": list(lrs), "final_test_accuracy": {"none": none, "bn": bn}}


def test_lr_sweep_holds_when_bn_reaches_the_target_at_a_3x_larger_rate():
  assert verdict("lr_sweep", lr_metrics([0.95, 0.95, 0.2, 0.1], [0.9, 0.96, 0.95, 0.93])).held


@pytest.mark.parametrize(
  "metrics",
  [
    # BN reaches the target at more rates (the low end, v1 counted it) but no higher one: fails now.
    lr_metrics([0.5, 0.95, 0.2, 0.1], [0.95, 0.96, 0.5, 0.1]),
    lr_metrics([0.95, 0.95, 0.95, 0.1], [0.95, 0.96, 0.93, 0.93]),  # 3 / 1 = 3x, short of 4x.
    lr_metrics([0.95, 0.2, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5]),  # BN never reaches it.
    lr_metrics([0.95, 0.2, 0.1, 0.1], [None, None, None, None]),  # BN diverged everywhere.
  ],
  ids=["low_end_only", "ratio_short", "bn_never", "bn_diverged"],
)
def test_lr_sweep_fails(metrics):
  assert not verdict("lr_sweep", metrics, min_lr_ratio=4.0).held


def test_lr_sweep_holds_when_no_bn_never_reaches_the_target():
  assert verdict("lr_sweep", lr_metrics([0.5, 0.5, 0.2, 0.1], [0.5, 0.96, 0.5, 0.1])).held


# ---------------------------------------------------------------------------------------------------------
# keras_example: against no BN, the majority-class rate and the standardized network.


def keras_metrics(bn=0.86, none=0.70, standardized=0.87, majority=0.53, n=10):
  noise = np.linspace(-0.01, 0.01, n)
  seeds = lambda v: (v + noise).tolist()
  return {
    "seed_test_accuracy": {"bn": seeds(bn), "none": seeds(none), "standardized": seeds(standardized)},
    "seed_majority_rate": [majority] * n,
  }


def test_keras_example_holds_when_bn_learns_beats_no_bn_and_nears_standardized():
  assert verdict("keras_example", keras_metrics()).held


@pytest.mark.parametrize(
  "metrics",
  [
    keras_metrics(bn=0.60, none=0.54),  # The old run: beats no BN, far below standardized.
    keras_metrics(bn=0.55, none=0.50, standardized=0.56, majority=0.53),  # Near majority rate.
    keras_metrics(bn=0.86, none=0.86),  # No better than no BN.
  ],
  ids=["below_standardized", "at_majority_rate", "no_better_than_none"],
)
def test_keras_example_fails(metrics):
  assert not verdict("keras_example", metrics).held


# ---------------------------------------------------------------------------------------------------------
# inference: Algorithm 2 against PreciseBN at small batch sizes, and against the running average.


def size(alg2, precise, biased=0.95, n=10):
  noise = np.linspace(-0.002, 0.002, n)
  return {
    "seed_test_accuracy": {"population_alg2": (alg2 + noise).tolist(), "precise_bn": (precise + noise[::-1]).tolist()},
    "test_accuracy": {"running_biased": biased, "population_alg2": alg2},
  }


def test_inference_holds_when_algorithm_2_matches_precise_bn():
  metrics = {"by_batch_size": {"4": size(0.95, 0.952), "8": size(0.96, 0.96), "60": size(0.97, 0.97)}}
  assert verdict("inference", metrics).held


@pytest.mark.parametrize(
  "metrics",
  [
    {"by_batch_size": {"4": size(0.93, 0.95), "8": size(0.96, 0.96), "60": size(0.97, 0.97)}},
    {"by_batch_size": {"4": size(0.95, 0.95), "8": size(0.96, 0.96), "60": size(0.95, 0.95, biased=0.97)}},
    {"by_batch_size": {"60": size(0.97, 0.97)}},  # No batch size small enough to test part 1.
  ],
  ids=["worse_than_precise_at_m4", "worse_than_running_at_m60", "no_small_batch"],
)
def test_inference_fails(metrics):
  assert not verdict("inference", metrics).held


def test_inference_large_batch_differences_do_not_count_for_part_1():
  metrics = {"by_batch_size": {"4": size(0.95, 0.95), "60": size(0.93, 0.95, biased=0.935)}}
  assert verdict("inference", metrics).held


# ---------------------------------------------------------------------------------------------------------
# placement, feature_scale and deep_gradients: criteria unchanged, still able to fail.


def test_placement_holds_and_fails():
  cell = lambda pre, post: {"test_accuracy": {"pre": pre, "post": post}}
  better = [cell([0.90, 0.91, 0.92], [0.93, 0.95, 0.94])]
  assert verdict("placement", {"cells": better}).held
  assert not verdict("placement", {"cells": [cell([0.93, 0.95, 0.94], [0.90, 0.91, 0.92])]}).held


def test_feature_scale_holds_and_fails():
  acc = {"none": 0.60, "input_bn": 0.835, "hidden_bn": 0.8, "standardized": 0.84}
  assert verdict("feature_scale", {"final_test_accuracy": acc}).held
  assert not verdict("feature_scale", {"final_test_accuracy": {**acc, "input_bn": 0.80}}).held


def test_deep_gradients_holds_and_fails():
  ratio = {"sigmoid": {"none": [1e-3], "bn": [2.0]}, "tanh": {"none": [20.0], "bn": [1.0]}}
  assert verdict("deep_gradients", {"ratio": ratio}).held
  assert not verdict("deep_gradients", {"ratio": {**ratio, "tanh": {"none": [2.0], "bn": [1.0]}}}).held


# ---------------------------------------------------------------------------------------------------------
# Statistics helpers.


def test_holm_adjusts_step_down_and_keeps_order():
  assert common.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
  assert common.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 2 x 0.8 caps at 1, then monotone.


def test_corrected_tests_widen_with_the_family():
  rng = np.random.default_rng(0)
  a, b = rng.normal(1.0, 1.0, 12), rng.normal(0.0, 1.0, 12)
  one = common.corrected_tests({"x": (a, b)})["x"]
  six = common.corrected_tests({f"x{i}": (a, b) for i in range(6)})["x0"]
  assert one["confidence"] == pytest.approx(0.95) and six["confidence"] == pytest.approx(1 - 0.05 / 6)
  assert six["high"] - six["low"] > one["high"] - one["low"]
  assert six["p_holm"] == pytest.approx(min(1.0, 6 * six["p"]))


def test_paired_test_without_spread():
  assert common.paired_test([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
  assert common.paired_test([2.0, 2.0], [1.0, 1.0])["p"] == 0.0
