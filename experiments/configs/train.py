"""`train`: one training run of the MLP; loss / accuracy curves, checkpoints, ``--resume``.

The building block of the other experiments: dataset, architecture, norm placement, optimizer and device
count all come from here. ``num_devices > 1`` trains data-parallel (``parallel``), which must give the
same result as one device on the global batch.
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    num_steps=1500,
    batch_size=64,
    learning_rate=0.1,
    optimizer="momentum",
    num_seeds=1,
    eval_every=100,
    checkpoint_every=500,
    hidden=(128, 128),
    activation="relu",
    norm="pre",
  )
  # Data parallelism when num_devices > 1: "shard_map", "pmap" or "jit" (sharded jit).
  config.parallel = "shard_map"
  config.criterion = dict(min_test_accuracy=0.9)
  if arg == "quick":
    config.update(dict(num_steps=60, eval_every=20, checkpoint_every=20, hidden=(32,)))
    config.criterion.min_test_accuracy = 0.5
  return config


def validate(config):
  configs.check_choice(config, "parallel", ("shard_map", "pmap", "jit"))
  if config.num_seeds != 1:
    configs.fail("num_seeds", config.num_seeds, "1 (train is one run; the other experiments vary seeds)")
  if not 0.0 <= config.criterion.min_test_accuracy <= 1.0:
    configs.fail("criterion.min_test_accuracy", config.criterion.min_test_accuracy, "a fraction in [0, 1]")
