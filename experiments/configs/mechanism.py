"""`mechanism`: Santurkar et al. 2018's noisy BN, internal-covariate-shift measure and smoothness probes."""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    num_steps=1000,
    batch_size=60,
    learning_rate=0.1,
    optimizer="sgd",
    num_seeds=5,
    eval_every=100,
    hidden=(64, 64, 64, 64),
    drop=("norm", "activation"),
  )  # relu; the arms are none, BN before relu, noisy BN.
  config.noise_shift = 0.5  # Per step and unit, shift ~ U(-noise_shift, noise_shift).
  config.noise_scale = 1.5  # ... and scale ~ U(1, noise_scale).
  config.probe_rows = 256
  config.probe_steps = (0.5, 1.0, 2.0, 4.0)  # Steps along -g, in multiples of the learning rate.
  config.criterion = dict(
    confidence=0.95,  # Family confidence of the four Bonferroni-corrected paired intervals.
    max_noisy_gap_points=2.0,  # Noisy BN - BN mean accuracy over evaluations: above minus this, in points.
  )
  if arg == "quick":
    config.update(dict(num_steps=40, eval_every=20, num_seeds=2, hidden=(16, 16, 16), probe_rows=64))
  return config


def validate(config):
  configs.check_positive(config, "noise_shift", "probe_rows", allow_zero=False)
  if config.noise_scale < 1.0:
    configs.fail("noise_scale", config.noise_scale, "at least 1 (scale ~ U(1, noise_scale))")
  if len(config.hidden) < 2:
    configs.fail("hidden", config.hidden, "at least two hidden layers (ICS needs a layer before)")
  if not config.probe_steps or any(s <= 0 for s in config.probe_steps):
    configs.fail("probe_steps", config.probe_steps, "a non-empty tuple of positive step multiples")
  if config.optimizer != "sgd":  # The ICS update of the earlier layers is an SGD step.
    configs.fail("optimizer", config.optimizer, "sgd")
  if not 0 < config.criterion.confidence < 1 or config.criterion.max_noisy_gap_points <= 0:
    configs.fail("criterion", config.criterion.to_dict(), "0 < confidence < 1, max_noisy_gap_points > 0")
