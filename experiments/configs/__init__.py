"""One ``ml_collections`` config per experiment: ``experiments/configs/<name>.py`` defines ``get_config(arg)``.

``arg`` is ``""`` for the full experiment and ``"quick"`` for the seconds-long form the tests run (the
``config.py:arg`` convention of ``ml_collections.config_flags``). Every criterion lives in the config's
``criterion`` block, so it is fixed, and recorded in ``config.json``, before anything runs.
"""
import ml_collections

# The datasets `experiments.data.load_dataset` knows; checked before anything is imported or compiled.
DATASETS = ("digits", "breast_cancer", "wine", "age_salary", "mnist", "fashion_mnist")
OPTIMIZERS = ("sgd", "momentum", "adam")
ACTIVATIONS = ("relu", "sigmoid", "tanh")
NORMS = ("none", "pre", "post")


def training_config(*, drop=(), **values) -> ml_collections.ConfigDict:
  """The keys every training config has, with defaults, updated with ``values``.

  ``drop`` removes model keys an experiment fixes itself (e.g. ``norm`` where the arms are the
  placements), so an override of them is refused instead of silently ignored.

  ``data_dir=""`` means the bundled data; ``checkpoint_every=0`` means no checkpoints; ``init_stddev=0``
  means the layer's default initializer (LeCun normal), otherwise ``N(0, init_stddev^2)`` kernels.
  """
  config = ml_collections.ConfigDict()
  config.dataset = "digits"
  config.data_dir = ""
  config.standardize = False
  config.num_steps = 1000
  config.batch_size = 60
  config.learning_rate = 0.1
  config.optimizer = "sgd"
  config.seed = 0
  config.num_seeds = 5
  config.eval_every = 50
  config.checkpoint_every = 0
  config.num_devices = 1
  config.hidden = (100, 100, 100)
  config.activation = "relu"
  config.norm = "pre"
  config.init_stddev = 0.0
  config.momentum = 0.99
  config.epsilon = 1e-5
  for key, value in values.items():
    if key not in config:
      raise KeyError(f"training_config got unknown key {key!r}; valid keys: {sorted(config)}")
    config[key] = value
  for key in drop:
    if key in ("dataset", "num_steps", "batch_size", "learning_rate", "optimizer", "seed", "eval_every",
               "checkpoint_every", "num_devices"):
      raise KeyError(f"training_config cannot drop {key!r}: every training config has it")
    del config[key]
  return config


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks ``config`` so an override can only change existing keys, with their types."""
  config.lock()
  return config


def fail(key: str, got, expected: str):
  """Raises the ValueError every config check uses: the key, what it got, what was expected."""
  raise ValueError(f"config.{key}: got {got!r}, expected {expected}")


def check_positive(config, *keys: str, allow_zero: bool = False) -> None:
  for key in keys:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      fail(key, value, "a number")
    if value < 0 or (value == 0 and not allow_zero):
      fail(key, value, "a non-negative number" if allow_zero else "a positive number")


def check_choice(config, key: str, choices) -> None:
  if config[key] not in choices:
    fail(key, config[key], f"one of {', '.join(map(str, choices))}")


def check_training(config) -> None:
  """Checks the keys every training config has (those of `training_config`) that ``config`` holds."""
  for key in ("num_steps", "batch_size", "eval_every", "num_devices", "num_seeds"):
    if key in config:
      check_positive(config, key)
  for key in ("learning_rate", "epsilon"):
    if key in config:
      check_positive(config, key)
  for key in ("checkpoint_every", "init_stddev", "seed"):
    if key in config:
      check_positive(config, key, allow_zero=True)
  if "momentum" in config and not 0.0 <= config.momentum < 1.0:
    fail("momentum", config.momentum, "a decay in [0, 1)")
  if "dataset" in config:
    check_choice(config, "dataset", DATASETS)
    if config.dataset in ("mnist", "fashion_mnist") and not config.data_dir:
      fail("data_dir", config.data_dir, f"the folder holding the {config.dataset} IDX files "
           f"(dataset={config.dataset!r} is not bundled)")
  if "optimizer" in config:
    check_choice(config, "optimizer", OPTIMIZERS)
  if "activation" in config:
    check_choice(config, "activation", ACTIVATIONS)
  if "norm" in config:
    check_choice(config, "norm", NORMS)
  if "hidden" in config:
    if not config.hidden or any(not isinstance(h, int) or isinstance(h, bool) or h <= 0
                                for h in config.hidden):
      fail("hidden", config.hidden, "a non-empty tuple of positive layer widths")
  if "batch_size" in config and "num_devices" in config:
    if config.batch_size % config.num_devices:
      raise ValueError(f"config.batch_size: got {config.batch_size}, which config.num_devices="
                       f"{config.num_devices} does not divide; expected a multiple of num_devices")
  if "num_steps" in config and "eval_every" in config and config.eval_every > config.num_steps:
    fail("eval_every", config.eval_every, f"at most num_steps={config.num_steps}")
