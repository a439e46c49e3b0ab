"""`small_batch`: BN, ghost BN, batch renorm, LayerNorm, GroupNorm and none at batch sizes 2 to 128.

Every (arm, batch size) trains ``num_seeds`` seeds for ``num_steps`` steps (SGD, momentum 0.9) at
``base_learning_rate`` scaled by ``lr_rule`` (sqrt or linear in batch / ``base_batch_size``); the other
rule is trained too for ``rule_arms``. Non-i.i.d. runs draw each batch from ``classes_per_batch`` classes.
"""

from experiments import configs


def get_config(arg: str = ""):
  config = configs.training_config(
    dataset="digits",
    standardize=True,
    num_steps=150,
    batch_size=32,
    learning_rate=0.1,
    optimizer="momentum",
    num_seeds=5,
    eval_every=150,
    hidden=(32,),
    momentum=0.9,
    drop=("activation", "norm", "init_stddev", "epsilon"),
  )
  # These replace `batch_size` and `learning_rate`, which are not used.
  config.batch_sizes = (2, 4, 8, 16, 32, 128)
  config.base_batch_size = 32
  config.base_learning_rate = 0.1
  config.lr_rule = "sqrt"
  config.rule_arms = ("none", "bn")
  config.ghost_size = 4
  config.groups = 4
  config.rmax = 3.0
  config.dmax = 5.0
  config.non_iid_batches = (32,)
  config.classes_per_batch = 2
  config.criterion = dict(
    confidence=0.95,
    small_batches=[2, 4],
    min_bn_deficit_points=2.0,  # LayerNorm and GroupNorm beat BN by more than this at small_batches.
    non_iid_batch=32,
    min_renorm_recovery=0.5,  # Renorm recovers at least this fraction of BN's non-i.i.d. loss.
  )
  if arg == "quick":
    config.update(dict(num_steps=20, eval_every=20, num_seeds=2, hidden=(8,)))
    config.batch_sizes = (2, 4, 32)
  return config


def validate(config):
  if not config.batch_sizes or any(b < 2 for b in config.batch_sizes):
    configs.fail("batch_sizes", config.batch_sizes, "a non-empty tuple of batch sizes >= 2")
  if config.base_batch_size not in config.batch_sizes:
    configs.fail("base_batch_size", config.base_batch_size, f"one of batch_sizes {config.batch_sizes}")
  configs.check_positive(config, "base_learning_rate", "ghost_size", "groups", "classes_per_batch")
  configs.check_choice(config, "lr_rule", ("sqrt", "linear"))
  if any(a not in ("none", "bn", "ghost_bn", "renorm", "layernorm", "groupnorm") for a in config.rule_arms):
    configs.fail("rule_arms", config.rule_arms, "arms of the experiment")
  if any(h % config.groups for h in config.hidden):
    configs.fail("groups", config.groups, f"a divisor of every hidden width {config.hidden}")
  if config.rmax < 1 or config.dmax < 0:
    configs.fail("rmax", (config.rmax, config.dmax), "rmax >= 1 and dmax >= 0")
  if any(b not in config.batch_sizes or b < config.classes_per_batch for b in config.non_iid_batches):
    configs.fail("non_iid_batches", config.non_iid_batches, "batch sizes of batch_sizes, >= classes_per_batch")
  c = config.criterion
  if any(b not in config.batch_sizes for b in c.small_batches) or c.non_iid_batch not in config.non_iid_batches:
    configs.fail("criterion", c.to_dict(), "small_batches in batch_sizes and non_iid_batch in non_iid_batches")
  if not 0.5 <= c.confidence < 1.0:
    configs.fail("criterion.confidence", c.confidence, "a confidence level in [0.5, 1)")
