"""`fig1`: the paper's Figure 1, scaled down (Ioffe & Szegedy 2015, section 4.1).

A 3 x 100 sigmoid MLP with small Gaussian weights, trained by SGD on batches of 60, with batch norm
before each sigmoid ("pre") and without. Panel (a): test accuracy against steps; panels (b, c): the 15th,
50th and 85th percentiles of the input to one sigmoid of the last hidden layer over training.

By default it runs on scikit-learn's 8x8 digits. Given MNIST IDX files (``--config.data_dir=DIR``) it
switches to the paper's protocol: MNIST, 50 000 steps, batches of 60 (an explicit ``--config.num_steps``
or ``--config.dataset`` wins).
"""

from experiments import configs

PAPER_NUM_STEPS = 50_000
PAPER_EVAL_EVERY = 500


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    num_steps=6000,
    batch_size=60,
    learning_rate=0.5,
    optimizer="sgd",
    num_seeds=10,
    eval_every=50,
    hidden=(100, 100, 100),
    activation="sigmoid",
    norm="pre",
    init_stddev=0.1,
    drop=("norm",),
  )  # The arms are no BN and BN before each sigmoid.
  config.unit = 0  # Which sigmoid of the last hidden layer panels (b, c) follow.
  config.criterion = dict(
    version=3,  # v2: drift was the max over time, 5 seeds, min_seeds_less_drift=4.
    target_accuracy=0.9,  # Panel (a): test accuracy both arms race to.
    max_step_ratio=0.5,  # BN must reach it in at most this fraction of no-BN's steps.
    warmup_fraction=0.1,  # Drift is measured after this fraction of the steps.
    drift_statistic="median",  # Over the recorded steps after warm-up: robust to one spike.
    min_seeds_less_drift=8,  # BN's percentile drift must be smaller in at least this many seeds.
  )
  if arg == "quick":
    config.update(dict(num_steps=200, eval_every=50, num_seeds=2, hidden=(32, 32, 32)))
    config.criterion.min_seeds_less_drift = 2
  return config


def resolve(config, overridden):
  """With MNIST files given, the paper's protocol, unless the command line chose otherwise."""
  if config.data_dir and "dataset" not in overridden and config.dataset == "digits":
    config.dataset = "mnist"
    if "num_steps" not in overridden:
      config.num_steps = PAPER_NUM_STEPS
    if "eval_every" not in overridden:
      config.eval_every = PAPER_EVAL_EVERY


def validate(config):
  if config.unit < 0 or config.unit >= config.hidden[-1]:
    configs.fail("unit", config.unit, f"a unit index of the last hidden layer, 0..{config.hidden[-1] - 1}")
  criterion = config.criterion
  if not 0.0 < criterion.target_accuracy <= 1.0:
    configs.fail("criterion.target_accuracy", criterion.target_accuracy, "a fraction in (0, 1]")
  if not 0.0 < criterion.max_step_ratio <= 1.0:
    configs.fail("criterion.max_step_ratio", criterion.max_step_ratio, "a ratio in (0, 1]")
  if not 0.0 <= criterion.warmup_fraction < 1.0:
    configs.fail("criterion.warmup_fraction", criterion.warmup_fraction, "a fraction in [0, 1)")
  if criterion.drift_statistic not in ("median", "max"):
    configs.fail("criterion.drift_statistic", criterion.drift_statistic, "'median' or 'max'")
  if not 1 <= criterion.min_seeds_less_drift <= config.num_seeds:
    configs.fail(
      "criterion.min_seeds_less_drift", criterion.min_seeds_less_drift, f"a count in 1..num_seeds={config.num_seeds}"
    )
