"""`deep_gradients`: vanishing / exploding gradients in 20-layer sigmoid and tanh MLPs, with and without BN.

The per-layer gradient norms of the Dense kernels, on a fixed batch of training rows in training mode, at
initialization and during training. The first-to-last ratio is ``||dL/dW_0|| / ||dL/dW_{L-1}||`` over the
hidden layers ``0 .. L-1``.
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    num_steps=1000,
    batch_size=60,
    learning_rate=0.05,
    optimizer="sgd",
    num_seeds=10,
    eval_every=100,
    hidden=(64,) * 20,
    drop=("activation", "norm"),
  )  # Both activations, with and without BN.
  config.activations = ("sigmoid", "tanh")
  config.probe_rows = 256  # The fixed batch of training rows the gradients are measured on.
  config.criterion = dict(
    low=0.1,  # With BN every recorded first-to-last ratio (seeds' geometric mean) stays in
    high=10.0,  # [low, high]; without BN some recorded ratio leaves it (for every activation).
  )
  if arg == "quick":
    config.update(dict(num_steps=40, eval_every=20, num_seeds=2, hidden=(16,) * 4, probe_rows=64))
    config.activations = ("sigmoid",)
  return config


def validate(config):
  if not config.activations or any(a not in configs.ACTIVATIONS for a in config.activations):
    configs.fail("activations", config.activations, f"a non-empty tuple from {configs.ACTIVATIONS}")
  if len(config.hidden) < 2:
    configs.fail("hidden", config.hidden, "at least two hidden layers (first and last are compared)")
  configs.check_positive(config, "probe_rows")
  if not 0 < config.criterion.low < 1 < config.criterion.high:
    configs.fail("criterion.low", (config.criterion.low, config.criterion.high), "0 < low < 1 < high")
