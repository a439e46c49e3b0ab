"""`lr_sweep`: learning rates 0.003 ... 3 with and without batch norm (the paper's "higher learning rates").

Ioffe & Szegedy (2015), section 3.3: batch norm makes training robust to the scale of the parameters, so
higher learning rates do not blow up. Every (learning rate, seed) pair of an arm trains at once (vmap).
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    num_steps=2000,
    batch_size=60,
    optimizer="sgd",
    num_seeds=10,
    eval_every=100,
    hidden=(100, 100),
    activation="relu",
    drop=("norm",),
  )  # The arms are no BN and BN before each activation.
  # Every model trains at one of these; `learning_rate` is not used.
  config.learning_rates = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
  config.split_per_seed = True  # Each seed its own data split (split seed = replicate seed).
  config.criterion = dict(
    version=2,  # v1: BN reaches the target at >= 2 more grid points than no BN.
    target_accuracy=0.9,  # A grid point "reaches" it when the seeds' mean final test accuracy does.
    min_lr_ratio=3.0,  # BN's largest target-reaching learning rate is at least this times no BN's.
  )
  if arg == "quick":
    config.update(dict(num_steps=60, eval_every=30, num_seeds=2, hidden=(32,)))
    config.learning_rates = (0.03, 0.3, 3.0)
    config.criterion.target_accuracy = 0.5
    config.criterion.min_lr_ratio = 3.0
  return config


def validate(config):
  if not config.learning_rates or any(lr <= 0 for lr in config.learning_rates):
    configs.fail("learning_rates", config.learning_rates, "a non-empty tuple of positive learning rates")
  if not 0.0 < config.criterion.target_accuracy <= 1.0:
    configs.fail("criterion.target_accuracy", config.criterion.target_accuracy, "a fraction in (0, 1]")
  if not config.criterion.min_lr_ratio >= 1.0:
    configs.fail("criterion.min_lr_ratio", config.criterion.min_lr_ratio, "a ratio >= 1")
