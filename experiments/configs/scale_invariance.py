"""`scale_invariance`: BN((aW)u) = BN(Wu) and dL/d(aW) = dL/dW / a, and the weight norm's growth under SGD."""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    num_steps=1000,
    batch_size=60,
    learning_rate=0.1,
    optimizer="sgd",
    num_seeds=5,
    eval_every=50,
    hidden=(64, 64, 64),
    init_stddev=0.01,
    drop=("norm",),
  )  # BN before relu always; small kernels, so the growth the identity predicts is visible.
  config.weight_decay = 5e-3
  config.scales = (0.01, 0.1, 0.5, 2.0, 10.0, 100.0)
  config.identity_rows = 128
  config.identity_inputs = 32
  config.identity_features = 16
  config.epsilon_identity = 1e-15  # Epsilon breaks the invariance; tiny so float64 rounding dominates.
  config.criterion = dict(
    tolerance=1e-8,  # Largest relative error of either identity, float64.
    min_growth=2.0,  # Without decay every seed's final mean ||W_T|| / ||W_0|| is at least this,
    late_growth=1.05,  # and grows by more than this factor over the second half; with decay at most this.
  )
  if arg == "quick":
    config.update(dict(num_steps=40, eval_every=20, num_seeds=2, hidden=(16, 16)))
  return config


def validate(config):
  if config.optimizer != "sgd":  # Adam rescales the step and hides the growth the identity predicts.
    configs.fail("optimizer", config.optimizer, "sgd (the growth argument is about plain SGD)")
  configs.check_positive(
    config, "weight_decay", "identity_rows", "identity_inputs", "identity_features", "epsilon_identity"
  )
  if not config.scales or any(a <= 0 for a in config.scales):
    configs.fail("scales", config.scales, "a non-empty tuple of positive scales")
  if config.identity_rows < 2:
    configs.fail("identity_rows", config.identity_rows, "at least 2 (batch statistics)")
  if not config.criterion.min_growth > 1.0 or not config.criterion.late_growth >= 1.0:
    configs.fail("criterion", config.criterion.to_dict(), "min_growth > 1, late_growth >= 1")
