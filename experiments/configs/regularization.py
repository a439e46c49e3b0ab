"""`regularization`: BN vs dropout vs both vs neither on a small training set; ghost batch size at a large batch.

Part 1 trains each arm on ``train_rows`` rows (each seed draws its own) at ``batch_size`` and
``learning_rate``; part 2 trains BN and ghost BN (``ghost_sizes``) on the whole training split at
``ghost_batch_size`` and ``ghost_learning_rate``. Paired: a seed gives the same weights and batches in every arm.
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    standardize=True,
    num_steps=300,
    batch_size=32,
    learning_rate=0.05,
    optimizer="momentum",
    num_seeds=8,
    eval_every=300,
    hidden=(64,),
    momentum=0.9,
    drop=("activation", "norm", "init_stddev", "epsilon"),
  )
  config.train_rows = 200
  config.dropout = 0.5
  config.ghost_batch_size = 256
  config.ghost_sizes = (4, 16, 64)
  config.ghost_learning_rate = 0.1
  config.criterion = dict(
    confidence=0.95,
    min_gap_reduction_points=0.0,  # gap(none) - gap(bn): the CI's lower bound must lie above this.
    ghost_size=16,  # Ghost batches of this size must beat BN over the whole batch.
  )
  if arg == "quick":
    config.update(dict(num_steps=20, eval_every=20, num_seeds=2, hidden=(16,), ghost_batch_size=64))
    config.ghost_sizes = (16,)
  return config


def validate(config):
  configs.check_positive(config, "train_rows", "ghost_batch_size", "ghost_learning_rate")
  if not 0.0 <= config.dropout < 1.0:
    configs.fail("dropout", config.dropout, "a rate in [0, 1)")
  if config.batch_size > config.train_rows:
    configs.fail("batch_size", config.batch_size, f"at most train_rows={config.train_rows}")
  if not config.ghost_sizes or any(g < 2 or config.ghost_batch_size % g for g in config.ghost_sizes):
    configs.fail("ghost_sizes", config.ghost_sizes, f"sizes >= 2 dividing ghost_batch_size={config.ghost_batch_size}")
  if config.criterion.ghost_size not in config.ghost_sizes:
    configs.fail("criterion.ghost_size", config.criterion.ghost_size, f"one of ghost_sizes {config.ghost_sizes}")
  if not 0.5 <= config.criterion.confidence < 1.0:
    configs.fail("criterion.confidence", config.criterion.confidence, "a confidence level in [0.5, 1)")
