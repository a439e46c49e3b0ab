"""small_batch and regularization: criteria on synthetic metrics, and the quick runs' verdicts recomputed."""

import importlib

import pytest

from experiments import config_parsing


def verdict(name: str, metrics: dict):
  module = importlib.import_module(f"experiments.{name}")
  result = module.evaluate(metrics, config_parsing.load_config(name).criterion)
  assert result.reason
  return result


# ---------------------------------------------------------------------------------------------------------
# small_batch.


def small_batch_metrics(bn_small=0.80, renorm_non_iid=0.9, linear=0.80):
  seeds = range(5)
  jitter = lambda v: [v + 0.002 * s for s in seeds]
  acc = {arm: {"2": jitter(0.9), "4": jitter(0.9), "32": jitter(0.92)} for arm in ("layernorm", "groupnorm")}
  acc["bn"] = {"2": jitter(bn_small), "4": jitter(bn_small), "32": jitter(0.93)}
  acc["none"] = {"2": jitter(0.85), "4": jitter(0.86), "32": jitter(0.9)}
  non_iid = {"bn": {"32": [0.83 + 0.001 * s * s for s in seeds]}, "renorm": {"32": jitter(renorm_non_iid)}}
  rule = {
    "sqrt": {arm: {b: acc[arm][b] for b in ("2", "4")} for arm in ("none", "bn")},
    "linear": {arm: {b: jitter(linear) for b in ("2", "4")} for arm in ("none", "bn")},
  }
  return {"test_accuracy": acc, "non_iid_accuracy": non_iid, "rule_test_accuracy": rule}


def test_small_batch_holds_when_bn_loses_small_and_renorm_recovers():
  assert verdict("small_batch", small_batch_metrics()).held


@pytest.mark.parametrize(
  "changes",
  [
    {"bn_small": 0.89},  # BN loses only 1 point at small batches.
    {"renorm_non_iid": 0.86},  # Renorm recovers less than half of BN's 10-point loss.
    {"linear": 0.95},  # The linear rule wins.
  ],
)
def test_small_batch_fails(changes):
  assert not verdict("small_batch", small_batch_metrics(**changes)).held


# ---------------------------------------------------------------------------------------------------------
# regularization.


def regularization_metrics(bn_gap=0.08, ghost=0.95):
  seeds = range(6)
  jitter = lambda v: [v + 0.003 * s * s for s in seeds]
  gap = {"none": jitter(0.15), "bn": [bn_gap + 0.002 * s for s in seeds], "dropout": jitter(0.10)}
  acc = {"full": [0.93 + 0.002 * s for s in seeds], "16": jitter(ghost)}
  return {"gap": gap, "ghost_test_accuracy": acc}


def test_regularization_holds_when_bn_narrows_the_gap_and_ghosts_help():
  assert verdict("regularization", regularization_metrics()).held


@pytest.mark.parametrize("changes", [{"bn_gap": 0.16}, {"ghost": 0.92}])
def test_regularization_fails(changes):
  assert not verdict("regularization", regularization_metrics(**changes)).held
