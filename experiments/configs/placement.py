"""`placement`: batch norm before vs after the activation vs none (the article claims after is better).

For each dataset, activation and arm, every learning rate of the grid trains ``num_seeds`` seeds; the arm's
learning rate is the one with the best mean validation accuracy, and its test accuracies are compared
seed by seed (paired: the same seed gives the same initial weights and batch order in every arm).
Inputs are standardized, so the comparison is about the hidden layers, not the input scales.
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    standardize=True,
    num_steps=1500,
    batch_size=32,
    optimizer="momentum",
    num_seeds=10,
    eval_every=500,
    hidden=(64, 64),
    drop=("activation", "norm"),
  )
  # These replace `dataset` and `learning_rate`, which are not used.
  config.split_per_seed = True  # Each seed its own data split (split seed = replicate seed).
  config.datasets = ("digits", "breast_cancer", "wine")
  config.activations = ("relu", "tanh")
  config.learning_rates = (0.003, 0.01, 0.03, 0.1)
  config.criterion = dict(
    confidence=0.95,  # The article's claim holds if the pooled paired CI of
    # test accuracy (post - pre), over every dataset, activation and seed, lies above zero.
  )
  if arg == "quick":
    config.update(dict(num_steps=40, eval_every=20, num_seeds=2, hidden=(16,)))
    config.datasets = ("wine",)
    config.activations = ("relu",)
    config.learning_rates = (0.01, 0.1)
  return config


def validate(config):
  if not config.datasets or any(d not in configs.DATASETS[:4] for d in config.datasets):
    configs.fail("datasets", config.datasets, f"a non-empty tuple from {configs.DATASETS[:4]}")
  if not config.activations or any(a not in configs.ACTIVATIONS for a in config.activations):
    configs.fail("activations", config.activations, f"a non-empty tuple from {configs.ACTIVATIONS}")
  if not config.learning_rates or any(lr <= 0 for lr in config.learning_rates):
    configs.fail("learning_rates", config.learning_rates, "a non-empty tuple of positive learning rates")
  if not 0.5 <= config.criterion.confidence < 1.0:
    configs.fail("criterion.confidence", config.criterion.confidence, "a confidence level in [0.5, 1)")
