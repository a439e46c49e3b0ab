"""`convnet`: a small conv net on the 8x8 digits, BN vs none vs BN after the ReLU, and a test-time shift.

Images are the 64 digits features as ``(8, 8, 1)`` NHWC arrays in [0, 1]. The shift ("dog colour") maps
every test image ``x`` to ``shift_contrast * x + shift_offset``; the BN network is evaluated on it with its
training running statistics and with statistics re-estimated on the shifted test images (AdaBN).
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    num_steps=300,
    batch_size=60,
    learning_rate=0.05,
    optimizer="momentum",
    num_seeds=5,
    eval_every=100,
    drop=("hidden", "activation", "norm", "init_stddev"),
  )
  config.channels = (8, 16)  # Output channels of each conv block (3x3, the second with stride 2).
  config.shift_contrast = 0.5  # The shifted test image is shift_contrast * x + shift_offset.
  config.shift_offset = 0.5
  config.adapt_batch_size = 90  # Rows per batch when re-estimating BN statistics on shifted test images.
  config.criterion = dict(
    confidence=0.95,  # Paired intervals over seeds at this level.
    min_bn_gain_points=0.0,  # BN minus none (final test accuracy): the interval lies above this.
    min_recovered_points=5.0,  # On the shifted test set, AdaBN minus running statistics lies above this.
  )
  if arg == "quick":
    config.update(dict(num_steps=40, eval_every=20, num_seeds=2, channels=(4, 8)))
  return config


def validate(config):
  if not config.channels or any(not isinstance(c, int) or c <= 0 for c in config.channels):
    configs.fail("channels", config.channels, "a non-empty tuple of positive channel counts")
  configs.check_positive(config, "shift_contrast", "adapt_batch_size")
  if config.dataset not in ("digits", "mnist", "fashion_mnist"):
    configs.fail("dataset", config.dataset, "an image dataset: digits, mnist or fashion_mnist")
  if not 0.5 <= config.criterion.confidence < 1.0:
    configs.fail("criterion.confidence", config.criterion.confidence, "a confidence level in [0.5, 1)")
