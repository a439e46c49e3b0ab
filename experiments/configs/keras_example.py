"""`keras_example`: the article's Keras model on a 5-feature binary task, with and without its BN layer.

``Dense(16, relu) -> Dense(32, relu) -> BatchNormalization -> Dense(2, softmax)``
(`bnjax.models.keras_article_model`), against the same model without BN on standardized inputs and the
majority-class rate, trained with Keras's defaults (Adam, learning rate 1e-3, batches of
32) on the raw ``age_salary`` features (age, experience, salary, savings, dependents).
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="age_salary",
    num_steps=3000,
    batch_size=32,
    learning_rate=1e-3,
    optimizer="adam",
    num_seeds=10,
    eval_every=100,
    epsilon=1e-3,  # Keras's BatchNormalization epsilon.
    drop=("hidden", "activation", "norm", "init_stddev"),
  )  # The model is the article's.
  config.split_per_seed = True  # Each seed its own rows and split (split seed = replicate seed).
  config.criterion = dict(
    version=2,  # v1: only the paired CI of BN - no BN above zero.
    confidence=0.95,  # Paired CIs over seeds of final test accuracy:
    min_over_majority_points=5.0,  # BN - majority-class rate lies above this,
    max_gap_to_standardized_points=2.0,  # BN - standardized no-BN network lies above minus this.
  )
  if arg == "quick":
    config.update(dict(num_steps=60, eval_every=30, num_seeds=2))
  return config


def validate(config):
  if config.dataset not in ("age_salary", "breast_cancer"):
    configs.fail("dataset", config.dataset, "a binary tabular set: 'age_salary' or 'breast_cancer'")
  if not 0.5 <= config.criterion.confidence < 1.0:
    configs.fail("criterion.confidence", config.criterion.confidence, "a confidence level in [0.5, 1)")
