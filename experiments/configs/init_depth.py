"""`init_depth`: initialization scale x depth, with and without BN, and gradients at initialization vs depth.

ReLU MLPs of ``width`` units per hidden layer; every kernel is drawn from LeCun's truncated normal with its
standard deviation multiplied by the scale (``variance_scaling(scale**2, "fan_in")``). Each (scale, depth,
arm) cell trains ``num_seeds`` seeds; the gradient part only initializes (scale 1) and differentiates.
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    standardize=True,
    num_steps=150,
    batch_size=60,
    learning_rate=0.02,
    optimizer="momentum",
    num_seeds=5,
    eval_every=150,
    drop=("hidden", "activation", "norm", "init_stddev"),
  )
  config.width = 32  # Units of every hidden layer.
  config.init_scales = (0.01, 0.1, 1.0)  # Kernel std relative to LeCun normal.
  config.depths = (2, 5, 10, 20, 50)  # Hidden layers of the trained networks.
  config.grad_depths = (2, 5, 10, 20, 50, 100)  # Hidden layers of the networks probed at initialization.
  config.probe_rows = 128
  config.criterion = dict(
    target_accuracy=0.8,  # A (scale, depth) cell trains if its seeds' mean test accuracy reaches this.
    min_extra_cells=3,  # BN must train in at least this many more cells than no BN.
    explode_ratio=10.0,  # BN explodes at the deepest probed depth if the interval of the first/last
    confidence=0.95,  # gradient-norm ratio (log10, over seeds) lies above this; refuted if below it.
  )
  if arg == "quick":
    config.update(dict(num_steps=20, eval_every=10, num_seeds=2, width=8, probe_rows=32))
    config.init_scales = (0.1, 1.0)
    config.depths = (2, 4)
    config.grad_depths = (2, 8)
  return config


def validate(config):
  configs.check_positive(config, "width", "probe_rows")
  for key in ("init_scales", "depths", "grad_depths"):
    if not config[key] or any(v <= 0 for v in config[key]):
      configs.fail(key, config[key], "a non-empty tuple of positive values")
  if min(config.grad_depths) < 2:
    configs.fail("grad_depths", config.grad_depths, "depths of at least 2 (first and last layers are compared)")
  if not 0.5 <= config.criterion.confidence < 1.0:
    configs.fail("criterion.confidence", config.criterion.confidence, "a confidence level in [0.5, 1)")
