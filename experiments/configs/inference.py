"""`inference`: population statistics (the paper's Algorithm 2) vs the running average, biased vs unbiased.

At each batch size m, MLPs with BN are trained; then their BN layers get, for inference: the running
averages of the batch statistics (biased variance, and the unbiased m/(m-1) version), and the population
statistics of Algorithm 2 (E[x] = E_B[mu_B], Var[x] = m/(m-1) E_B[sigma_B^2] over one epoch of training
batches of size m, the network in training mode). The reference is the statistics of the whole training
split as one batch. Reported: the statistics' error against the reference and the test accuracy of each.
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    num_steps=3000,
    batch_size=60,
    learning_rate=0.02,
    optimizer="momentum",
    num_seeds=10,
    eval_every=500,
    hidden=(100, 100),
    activation="relu",
    norm="pre",
  )
  config.batch_sizes = (4, 8, 60)  # One arm each; `batch_size` is not used.
  config.precise_batch_size = 200  # PreciseBN's batches (one epoch of them), weights frozen.
  config.criterion = dict(
    version=2,  # v1's part 1 was Bessel's correction (unbiased running variance closer at m=4).
    confidence=0.95,
    small_batch_max=8,  # At every batch size up to this, the paired CI of test accuracy (Algorithm 2 -
    max_loss_vs_precise_points=0.5,  # PreciseBN) lies above minus this many points, and
    max_accuracy_drop_points=1.0,  # Algorithm 2's statistics lose at most this many accuracy points
    # against the biased running average, at every batch size.
  )
  if arg == "quick":
    config.update(dict(num_steps=40, eval_every=20, num_seeds=2, hidden=(16,)))
    config.batch_sizes = (4,)
  return config


def validate(config):
  if not config.batch_sizes or any(b < 2 for b in config.batch_sizes):
    configs.fail("batch_sizes", config.batch_sizes, "a non-empty tuple of batch sizes >= 2")
  if not any(b <= config.criterion.small_batch_max for b in config.batch_sizes):
    configs.fail(
      "criterion.small_batch_max",
      config.criterion.small_batch_max,
      f"at least one of batch_sizes={tuple(config.batch_sizes)}",
    )
  configs.check_positive(config, "precise_batch_size")
  if config.norm == "none":
    configs.fail("norm", config.norm, "'pre' or 'post' (the experiment is about BN statistics)")
