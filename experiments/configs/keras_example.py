"""`keras_example`: the article's Keras model on a 5-feature binary task, with and without its BN layer.

``Dense(16, relu) -> Dense(32, relu) -> BatchNormalization -> Dense(2, softmax)``
(`bnjax.models.keras_article_model`), trained with Keras's defaults (Adam, learning rate 1e-3, batches of
32) on the raw ``age_salary`` features (age, experience, salary, savings, dependents).
"""
from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
      dataset="age_salary", num_steps=3000, batch_size=32, learning_rate=1e-3, optimizer="adam",
      num_seeds=10, eval_every=100, epsilon=1e-3,  # Keras's BatchNormalization epsilon.
      drop=("hidden", "activation", "norm", "init_stddev"))  # The model is the article's.
  config.criterion = dict(
      confidence=0.95,  # Held if the paired CI of test accuracy (with BN - without) lies above zero.
  )
  if arg == "quick":
    config.update(dict(num_steps=60, eval_every=30, num_seeds=2))
  return config


def validate(config):
  if config.dataset not in ("age_salary", "breast_cancer"):
    configs.fail("dataset", config.dataset, "a binary tabular set: 'age_salary' or 'breast_cancer'")
  if not 0.5 <= config.criterion.confidence < 1.0:
    configs.fail("criterion.confidence", config.criterion.confidence, "a confidence level in [0.5, 1)")
