"""Loading, overriding and checking experiment configs; nothing here imports jax.

Overrides come from the command line as ``--config.key=value`` (nested: ``--config.criterion.target=0.9``).
Each value is parsed to the type the key already has, so a locked config refuses an unknown key or a value
of the wrong type with a message that lists the valid keys.
"""

import ast
import importlib
import math
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import ml_collections

from experiments import configs

# In the order `python -m experiments all` runs them.
EXPERIMENTS = (
  "train",
  "fig1",
  "lr_sweep",
  "feature_scale",
  "deep_gradients",
  "placement",
  "keras_example",
  "inference",
  "convnet",
  "init_depth",
  "small_batch",
  "mechanism",
  "scale_invariance",
  "regularization",
)


class ConfigError(ValueError):
  """A config key or value the experiment cannot run with."""


def check_name(name: str) -> str:
  if name not in EXPERIMENTS:
    raise ConfigError(f"experiment name: got {name!r}, expected one of {', '.join(EXPERIMENTS)}")
  return name


def config_module(name: str):
  return importlib.import_module(f"experiments.configs.{check_name(name)}")


def load_config(name: str, *, quick: bool = False, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The locked config of experiment ``name`` (its quick form if asked) with ``overrides`` applied."""
  module = config_module(name)
  config = module.get_config("quick" if quick else "")
  config.lock()
  overridden = apply_overrides(config, overrides)
  resolve = getattr(module, "resolve", None)
  if resolve is not None:  # Defaults that depend on other keys (fig1: MNIST files -> paper protocol).
    resolve(config, overridden)
  return config


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every settable key of ``config`` as a dotted path, sorted."""
  keys = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      keys.extend(leaf_keys(value, f"{prefix}{key}."))
    else:
      keys.append(f"{prefix}{key}")
  return sorted(keys)


def _parse_value(text: str, current: Any, key: str) -> Any:
  """``text`` as a value of ``current``'s type; a ConfigError names ``key`` when it is not one."""
  expected = type(current).__name__
  try:
    if isinstance(current, bool):
      lowered = text.strip().lower()
      if lowered in ("true", "1", "yes"):
        return True
      if lowered in ("false", "0", "no"):
        return False
      raise ValueError(text)
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      stripped = text.strip()
      if not stripped.startswith(("(", "[")):
        stripped = f"({stripped},)" if stripped else "()"
      value = ast.literal_eval(stripped)
      if not isinstance(value, (tuple, list)):
        raise ValueError(text)
      element_types = {type(v) for v in current}
      if element_types == {float}:
        value = [float(v) for v in value]
      return type(current)(value)
    if current is None:
      try:
        return ast.literal_eval(text)
      except (ValueError, SyntaxError):
        return text
  except (ValueError, SyntaxError):
    pass
  raise ConfigError(
    f"--config.{key}: got {text!r}, expected a value of type {expected} (the key's current value is {current!r})"
  )


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> set:
  """Applies ``key=value`` strings (a leading ``--config.`` is optional) to the locked ``config``.

  Returns the set of dotted keys that were set.
  """
  valid = leaf_keys(config)
  overridden = set()
  for item in overrides:
    body = item[len("--config.") :] if item.startswith("--config.") else item
    key, sep, text = body.partition("=")
    if not sep or not key:
      raise ConfigError(f"config override: got {item!r}, expected --config.KEY=VALUE; valid keys: {', '.join(valid)}")
    if key not in valid:
      raise ConfigError(f"--config.{key}: unknown key; valid keys: {', '.join(valid)}")
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    value = _parse_value(text, node[leaf], key)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(
        f"--config.{key}: got {text!r}, which has the wrong type ({e}); valid keys: {', '.join(valid)}"
      ) from e
    overridden.add(key)
  return overridden


def non_finite_keys(config: ml_collections.ConfigDict) -> list[str]:
  """The dotted keys whose value, or an element of it, is a NaN or infinite float."""
  bad = []
  for key in leaf_keys(config):
    value = config_value(config, key)
    values = value if isinstance(value, (tuple, list)) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
      bad.append(key)
  return bad


def check_learning_rates(config: ml_collections.ConfigDict) -> None:
  """Refuses a learning rate (``learning_rate``, each of ``learning_rates``) that is not finite and > 0."""
  for key in ("learning_rate", "learning_rates"):
    if key not in config:
      continue
    value = config[key]
    values = value if isinstance(value, (tuple, list)) else (value,)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0 for v in values):
      expected = "finite positive numbers" if key == "learning_rates" else "a finite positive number"
      raise ConfigError(f"config.{key}: got {value!r}, expected {expected}")


def validate(name: str, config: ml_collections.ConfigDict) -> None:
  """Refuses bad values before anything compiles, naming the key (the config module's ``validate``).

  Every float must be finite (a NaN or infinite value, e.g. ``--config.learning_rate=nan``, is refused
  here), and learning rates must be positive.
  """
  module = config_module(name)
  bad = non_finite_keys(config)
  if bad:
    raise ConfigError(
      f"config.{bad[0]}: got {config_value(config, bad[0])!r}, expected a finite number"
      + (f" (also non-finite: {', '.join(bad[1:])})" if len(bad) > 1 else "")
    )
  check_learning_rates(config)
  configs.check_training(config)
  extra = getattr(module, "validate", None)
  if extra is not None:
    extra(config)


def config_value(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value at dotted ``key`` of ``config``."""
  node = config
  for part in key.split("."):
    node = node[part]
  return node
