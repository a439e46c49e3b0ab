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


# What each key means, for ``python -m experiments <name> --show-config``: the keys of `training_config`,
# then those some experiments add. A key an experiment reads differently is in `EXPERIMENT_HELP`.
HELP = {
  "dataset": f"which dataset: one of {', '.join(DATASETS)}",
  "data_dir": "folder of IDX files for mnist / fashion_mnist; empty: the bundled data",
  "standardize": "standardize features with the training split's mean and scale",
  "num_steps": "training steps per model",
  "batch_size": "rows per training batch (a multiple of num_devices)",
  "learning_rate": "the optimizer's learning rate (finite, > 0)",
  "optimizer": f"one of {', '.join(OPTIMIZERS)}",
  "seed": "first seed: model i of a run uses seed + i (also the data split's seed)",
  "num_seeds": "models trained per arm, one per seed",
  "eval_every": "steps between evaluations (metrics.jsonl rows)",
  "checkpoint_every": "steps between checkpoints; 0: none (needed for --resume)",
  "num_devices": "devices the batch is split across (on CPU the host device count is set for it)",
  "hidden": "widths of the hidden layers",
  "activation": f"one of {', '.join(ACTIVATIONS)}",
  "norm": f"where batch norm goes: {', '.join(NORMS)} (none, before or after the activation)",
  "init_stddev": "0: the layers' default kernel initializer; else N(0, init_stddev^2) kernels",
  "momentum": "decay of batch norm's running statistics, in [0, 1)",
  "epsilon": "batch norm's epsilon, added to the variance",
  "parallel": "data parallelism when num_devices > 1: shard_map, pmap or jit (sharded jit)",
  "unit": "which sigmoid of the last hidden layer panels (b, c) follow",
  "learning_rates": "the learning-rate grid; every model trains at one of these (learning_rate is not used)",
  "split_per_seed": "each seed draws its own data split (split seed = replicate seed)",
  "activations": "the activations compared, each with and without batch norm",
  "probe_rows": "the fixed batch of training rows the gradients are measured on",
  "datasets": "the datasets compared (dataset is not used)",
  "batch_sizes": "the batch sizes compared, one arm each (batch_size is not used)",
  "noise_shift": "noisy BN: per step and unit, the shift is drawn from U(-noise_shift, noise_shift)",
  "noise_scale": "noisy BN: per step and unit, the scale is drawn from U(1, noise_scale)",
  "probe_steps": "steps along minus the gradient, in multiples of the learning rate (smoothness probe)",
  "weight_decay": "the decay arm's optax.add_decayed_weights coefficient (on every parameter)",
  "scales": "the kernel scales a at which the scale-invariance identities are checked",
  "identity_rows": "rows of the random batch u the identities are checked on",
  "identity_inputs": "input width of the Dense + BN layer the identities are checked on",
  "identity_features": "output width of that layer",
  "epsilon_identity": "BN's epsilon in the identity check (it breaks the invariance, so tiny)",
  "criterion.max_noisy_gap_points": "noisy BN minus BN accuracy must lie above minus this, in points",
  "criterion.tolerance": "the largest relative error either identity may have",
  "criterion.min_growth": "without decay every seed's final ||W_T|| / ||W_0|| must be at least this",
  "criterion.late_growth": "no decay must grow ||W|| by more than this factor over the second half; decay at most",
  "criterion.version": "the criterion's version: its pre-registration record says what changed",
  "criterion.target_accuracy": "the test accuracy the arms race to",
  "criterion.max_step_ratio": "BN must reach the target in at most this fraction of no-BN's steps",
  "criterion.warmup_fraction": "drift is measured after this fraction of the steps",
  "criterion.drift_statistic": "how drift is summarised over time: median or max",
  "criterion.min_seeds_less_drift": "BN's percentile drift must be smaller in at least this many seeds",
  "criterion.min_extra_points": "BN must reach the target at this many more learning rates than no BN",
  "criterion.min_lr_ratio": "BN's largest target-reaching learning rate over no-BN's must be at least this",
  "criterion.max_gap_points": "|acc(input BN) - acc(standardized)| at most this, in accuracy points",
  "criterion.min_raw_deficit_points": "acc(no BN, raw) must be below acc(standardized) by more than this",
  "criterion.low": "with BN every first-to-last gradient-norm ratio stays at or above this",
  "criterion.high": "... and at or below this; without BN some ratio leaves [low, high]",
  "criterion.confidence": "the confidence level of the paired intervals the verdict reads",
  "criterion.min_over_majority_points": "BN minus the majority-class rate must lie above this, in points",
  "criterion.max_gap_to_standardized_points": "BN minus the standardized no-BN network must lie above minus this",
  "criterion.unbiased_better_at": "at this batch size the unbiased running variance must be the closer one",
  "criterion.max_accuracy_drop_points": "Algorithm 2's statistics may lose at most this many accuracy points",
  "criterion.min_test_accuracy": "the final test accuracy must be at least this",
  "channels": "output channels of each conv block",
  "shift_contrast": "the shifted test image is shift_contrast * x + shift_offset",
  "shift_offset": "... the offset added to every pixel of the shifted test image",
  "adapt_batch_size": "rows per batch when BN statistics are re-estimated on shifted test images (AdaBN)",
  "criterion.min_bn_gain_points": "BN minus no BN, test accuracy: the paired interval lies above this, in points",
  "criterion.min_recovered_points": "shifted test, AdaBN minus running statistics: the interval lies above this",
  "width": "units of every hidden layer",
  "init_scales": "kernel standard deviations, as multiples of LeCun normal's",
  "depths": "hidden-layer counts of the trained networks",
  "grad_depths": "hidden-layer counts of the networks whose gradients are probed at initialization",
  "criterion.min_extra_cells": "BN must reach the target in at least this many more (scale, depth) cells",
  "criterion.explode_ratio": "BN's first/last gradient ratio at the deepest probed depth must lie above this",
  "base_batch_size": "the batch size at which the learning rate is base_learning_rate",
  "base_learning_rate": "the learning rate at base_batch_size; lr_rule scales it to the other batch sizes",
  "lr_rule": "learning rate vs batch size: sqrt (lr ~ sqrt(batch)) or linear (lr ~ batch)",
  "rule_arms": "the arms also trained under the other learning-rate rule, to test the rule",
  "ghost_size": "rows per ghost batch of ghost BN (virtual_batch_size)",
  "groups": "GroupNorm's number of groups (divides every hidden width)",
  "rmax": "batch renorm's bound on the scale correction r (>= 1)",
  "dmax": "batch renorm's bound on the shift correction d (>= 0)",
  "non_iid_batches": "batch sizes also trained on non-i.i.d. batches (few classes each)",
  "classes_per_batch": "classes per non-i.i.d. batch (rows split evenly between them)",
  "criterion.small_batches": "the batch sizes at which BN must lose to LayerNorm and GroupNorm",
  "criterion.min_bn_deficit_points": "LayerNorm and GroupNorm must beat BN by more than this, in points",
  "criterion.non_iid_batch": "the batch size of the non-i.i.d. criterion",
  "criterion.min_renorm_recovery": "batch renorm must recover at least this fraction of BN's non-i.i.d. loss",
  "train_rows": "rows of the training split each seed draws to train on (the reduced training set)",
  "dropout": "dropout rate after each hidden activation in the dropout arms",
  "ghost_batch_size": "the large batch whose ghost batches are compared",
  "ghost_sizes": "ghost batch sizes compared with BN over the whole ghost_batch_size batch",
  "ghost_learning_rate": "the learning rate of the ghost-batch runs",
  "criterion.min_gap_reduction_points": "gap(none) - gap(bn): the paired interval lies above this, in points",
  "criterion.ghost_size": "ghost batches of this size must beat BN over the whole batch in test accuracy",
}
EXPERIMENT_HELP = {
  "placement": {"learning_rates": "the grid each (dataset, activation, arm) picks its best rate from"},
}


def help_text(name: str, key: str) -> str:
  """The help of dotted ``key`` in experiment ``name``'s config (empty when none is written)."""
  return EXPERIMENT_HELP.get(name, {}).get(key) or HELP.get(key, "")


# The keys every training config keeps: the runner and the CLI rely on them.
COMMON_KEYS = (
  "dataset",
  "num_steps",
  "batch_size",
  "learning_rate",
  "optimizer",
  "seed",
  "eval_every",
  "checkpoint_every",
  "num_devices",
)


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
    if key in COMMON_KEYS:
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
      fail(
        "data_dir",
        config.data_dir,
        f"the folder holding the {config.dataset} IDX files (dataset={config.dataset!r} is not bundled)",
      )
  if "optimizer" in config:
    check_choice(config, "optimizer", OPTIMIZERS)
  if "activation" in config:
    check_choice(config, "activation", ACTIVATIONS)
  if "norm" in config:
    check_choice(config, "norm", NORMS)
  if "hidden" in config:
    if not config.hidden or any(not isinstance(h, int) or isinstance(h, bool) or h <= 0 for h in config.hidden):
      fail("hidden", config.hidden, "a non-empty tuple of positive layer widths")
  if "batch_size" in config and "num_devices" in config:
    if config.batch_size % config.num_devices:
      raise ValueError(
        f"config.batch_size: got {config.batch_size}, which config.num_devices="
        f"{config.num_devices} does not divide; expected a multiple of num_devices"
      )
  if "num_steps" in config and "eval_every" in config and config.eval_every > config.num_steps:
    fail("eval_every", config.eval_every, f"at most num_steps={config.num_steps}")
