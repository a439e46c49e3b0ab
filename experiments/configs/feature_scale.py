"""`feature_scale`: the article's age / salary example: raw features on wildly different scales.

Arms on the synthetic ``age_salary`` set (age 18-100 next to salary 1e4-1e6 and savings up to ~1e7):
``none`` (raw inputs, no BN), ``input_bn`` (a BatchNorm on the raw inputs), ``hidden_bn`` (raw inputs, BN
before each hidden activation) and ``standardized`` (inputs standardized with training-split statistics,
no BN).
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="age_salary",
    num_steps=3000,
    batch_size=64,
    learning_rate=1e-3,
    optimizer="adam",
    num_seeds=10,
    eval_every=100,
    hidden=(64, 64),
    activation="relu",
    drop=("norm",),
  )  # The arms fix where BN goes.
  config.split_per_seed = True  # Each seed its own data draw and split (split seed = replicate seed).
  config.criterion = dict(
    max_gap_points=1.0,  # |acc(input_bn) - acc(standardized)| at most this, in accuracy points.
    min_raw_deficit_points=1.0,  # acc(none) must be below acc(standardized) by more than this.
  )
  if arg == "quick":
    config.update(dict(num_steps=60, eval_every=30, num_seeds=2, hidden=(16,)))
  return config


def validate(config):
  if config.dataset != "age_salary":
    configs.fail("dataset", config.dataset, "'age_salary' (the experiment is about its raw feature scales)")
  if config.standardize:
    configs.fail("standardize", config.standardize, "False (the standardized arm is built in)")
