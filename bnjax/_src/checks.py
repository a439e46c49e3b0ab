"""The one validation gate: public arguments in, one normalized description (`Spec`) out.

Every public entry point (the core's functions and the layers' constructors and calls) validates its
arguments here, once; everything behind the gate trusts what it produced. Each message names the
argument, what it got and what was expected.
"""

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src import types


class Spec(NamedTuple):
  """What a batch-norm call computes, in canonical form.

  Attributes:
    feature_axes: the kept axes, non-negative and sorted.
    reduced_axes: every other axis of x.
    feature_shape: x's sizes along `feature_axes`.
    axis_names: the mapped axes synchronised over (empty: none).
    axis_index_groups: groups of indices of `axis_names`, as tuples, or None.
    masked: a mask comes with the call (as an array of x's rank, full size on the reduced axes).
    count: values per feature before masking: local reduced size times the synchronised devices.

  A `Spec` is static (hashable); the mask itself travels beside it as data.
  """

  feature_axes: tuple[int, ...]
  reduced_axes: tuple[int, ...]
  feature_shape: tuple[int, ...]
  axis_names: tuple[str, ...] = ()
  axis_index_groups: tuple[tuple[int, ...], ...] | None = None
  masked: bool = False
  count: int = 1


def static_value(value):
  """A Python number for a concrete scalar (float, numpy or non-traced jax scalar), else None."""
  if isinstance(value, bool):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.shape(value) == ():
    try:
      host = np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      return None  # traced: checked by nobody, as with any traced hyperparameter
    if np.issubdtype(host.dtype, np.number):
      return float(np.real(host))
  return None


def _check_scalar(value, arg: str, kind: str) -> float | None:
  if isinstance(value, bool) or not (
    isinstance(value, numbers.Real) or (hasattr(value, "dtype") and np.shape(value) == ())
  ):
    raise TypeError(f"`{arg}` must be {kind}, got {value!r}.")
  return static_value(value)


def check_decay(decay, *, arg: str = "decay") -> None:
  """`decay` (Flax's `momentum`) is a real in [0, 1]; traced scalars (schedules) pass unchecked."""
  value = _check_scalar(decay, arg, "a float in [0, 1] or a scalar array")
  if value is not None and not 0.0 <= value <= 1.0:
    raise ValueError(
      f"`{arg}` must be in [0, 1] (the weight kept by the running average each step; "
      f"PyTorch's momentum m is {arg} = 1 - m), got {decay}."
    )


def check_epsilon(epsilon, *, arg: str = "epsilon") -> float:
  """`epsilon` is a concrete real > 0; returned as a Python float (a static argument)."""
  value = _check_scalar(epsilon, arg, "a float > 0")
  if value is None:
    raise TypeError(f"`{arg}` must be a concrete float > 0, not a traced value, got {epsilon!r}.")
  if not value > 0.0 or not math.isfinite(value):
    raise ValueError(f"`{arg}` must be a finite float > 0 (it keeps 1/sqrt(var + {arg}) finite), got {epsilon}.")
  return value


def check_bool(value, arg: str, *, optional: bool = False) -> None:
  if optional and value is None:
    return
  if not isinstance(value, (bool, np.bool_)):
    expected = "True, False or None" if optional else "True or False"
    raise TypeError(f"`{arg}` must be {expected}, got {value!r}.")


def axis_spec(axis, *, arg: str = "axis") -> tuple[int, ...]:
  """`axis` as a tuple of ints (rank-free checks: type, non-empty, no repeats)."""
  axes = (axis,) if isinstance(axis, (int, np.integer)) else axis
  try:
    axes = tuple(axes)
  except TypeError:
    axes = None
  if (
    isinstance(axis, bool) or not axes or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) for a in axes)
  ):
    raise TypeError(
      f"`{arg}` must be an int or a non-empty tuple of ints (static; under jax.jit mark it with "
      f"static_argnames), got {axis!r}."
    )
  if len(set(int(a) for a in axes)) != len(axes):
    raise ValueError(f"`{arg}`={axis!r} repeats an axis.")
  return tuple(int(a) for a in axes)


def feature_axes(axis, ndim: int, *, arg: str = "axis") -> tuple[int, ...]:
  """Canonical (non-negative, sorted) feature axes of a rank-`ndim` input.

  Every axis may be a feature axis: the values per feature then come from named axes alone (a
  per-example function under `vmap(..., axis_name=...)`) or nothing is reduced (inference mode).
  """
  axes = axis_spec(axis, arg=arg)
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
        f"`{arg}`={axis!r} is out of range for an input of rank {ndim}: each axis must be in [{-ndim}, {ndim - 1}]."
      )
  canonical = sorted(a % ndim for a in axes)
  if len(set(canonical)) != len(canonical):
    raise ValueError(f"`{arg}`={axis!r} repeats an axis (as non-negative axes: {canonical}).")
  return tuple(canonical)


def check_inexact(x, *, arg: str = "x") -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.inexact):
    raise TypeError(
      f"`{arg}` must have a floating or complex dtype (float32, bfloat16, float16, float64, complex64), "
      f"got {dtype}. Cast it first, e.g. `{arg}.astype(jnp.float32)`."
    )


def axis_names(axis_name, axis_index_groups=None) -> tuple[str, ...]:
  """`axis_name` (None, a name, or a tuple of names) as a tuple; `()` means no synchronisation."""
  if axis_name is None:
    names = ()
  elif isinstance(axis_name, str):
    names = (axis_name,)
  elif isinstance(axis_name, (tuple, list)) and all(isinstance(n, str) for n in axis_name):
    names = tuple(axis_name)
  else:
    raise TypeError(f"`axis_name` must be None, a str or a tuple of str, got {axis_name!r}.")
  if axis_index_groups is not None and not names:
    raise ValueError(
      f"`axis_index_groups`={axis_index_groups!r} needs an `axis_name`: groups are subsets of the "
      "devices of a named mapped axis."
    )
  return names


def axis_size(names: tuple[str, ...], axis_index_groups=None) -> int:
  """Devices in a reduction over `names` (bound here); checks the groups against that size."""
  size = 1
  for name in names:
    try:
      size *= jax.lax.axis_size(name)
    except NameError as e:
      raise NameError(
        f"`axis_name`={name!r}: the axis {name!r} is not bound here. batch_norm with an "
        "axis_name must run inside a transformation that defines it: jax.pmap(..., axis_name=...), "
        "jax.shard_map over a Mesh with that axis, or jax.vmap(..., axis_name=...). Under a plain "
        "(sharded) jax.jit leave axis_name=None: the batch is already global."
      ) from e
  if axis_index_groups is None:
    return size
  sizes = {len(g) for g in axis_index_groups}
  if len(sizes) != 1:
    raise ValueError(f"`axis_index_groups` must be groups of equal size, got {axis_index_groups}.")
  if sorted(i for g in axis_index_groups for i in g) != list(range(size)):
    raise ValueError(
      f"`axis_index_groups`={axis_index_groups} must cover each of the {size} indices of {names} exactly once."
    )
  return sizes.pop()


def varying_axes(x) -> frozenset:
  """The manual (shard_map) mesh axes over which x's type says it varies; empty elsewhere."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(getattr(manual, "varying", None) or getattr(aval, "vma", None) or ())


def _check_mapped_axes(x, names: tuple[str, ...]) -> None:
  missing = sorted(varying_axes(x) - set(names))
  if missing:
    raise ValueError(
      f"batch_norm(train=True) got an x that is split over the mapped axis/axes {missing} "
      "but `axis_name` is None, so each device would normalize with its own shard's statistics. "
      f"Pass axis_name={missing[0]!r} for statistics of the whole batch, or axis_name=() "
      "to keep per-device statistics on purpose."
    )


def mask_form(mask, x_shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
  """`mask` at x's rank, full size on the reduced axes, broadcastable to x.

  Two forms: x's shape without the feature axes (whole rows), or, as in Flax, any shape broadcastable
  to x (per element).
  """
  dtype = jnp.result_type(mask) if hasattr(mask, "dtype") else np.asarray(mask).dtype
  if dtype != jnp.bool_:
    raise TypeError(
      f"`mask` must be a boolean array (True marks the values that count), got dtype {dtype}. Pass `mask.astype(bool)`."
    )
  mask = jnp.asarray(mask)
  ndim = len(x_shape)
  rows_shape = tuple(d for i, d in enumerate(x_shape) if i not in axes)
  if mask.ndim < ndim and mask.shape == rows_shape:
    return jnp.expand_dims(mask, axes)  # the row form
  if mask.ndim > ndim or any(m not in (1, d) for m, d in zip(mask.shape[::-1], x_shape[::-1])):
    raise ValueError(
      f"`mask` has shape {mask.shape}, but x has shape {x_shape} with feature axes {axes}: expected "
      f"x's shape without the feature axes, {rows_shape}, or a shape broadcastable to {x_shape}."
    )
  mask = mask.reshape((1,) * (ndim - mask.ndim) + mask.shape)
  # Full size along the reduced axes, so that summing the mask counts values.
  full = tuple(m if i in axes else d for i, (m, d) in enumerate(zip(mask.shape, x_shape)))
  return jnp.broadcast_to(mask, full)


def check_variables(params, stats, feature_shape, x_shape, axes, *, stats_arg: str = "stats.") -> None:
  """`params` and `stats` (either may be None) hold arrays of the feature shape."""
  where = axes if len(axes) > 1 else axes[0]
  for arg, tree, names in (("params.", params, ("scale", "bias")), (stats_arg, stats, ("mean", "var"))):
    if tree is None:
      continue
    for name in names:
      value = getattr(tree, name, None)
      if value is None:
        continue
      shape = tuple(np.shape(value))
      if shape != feature_shape:
        raise ValueError(
          f"`{arg}{name}` has shape {shape}, but x (shape {x_shape}) has feature shape {feature_shape} "
          f"along axis {where}. Create matching variables with `bnjax.init({feature_shape})`, or pass "
          "the `axis` that holds the features."
        )


def check_running(running) -> None:
  if running not in types.RUNNING_RULES:
    raise ValueError(f"`running` must be one of {types.RUNNING_RULES}, got {running!r}.")


def check_stats(stats, running: str = "ema") -> None:
  if stats is None or getattr(stats, "mean", None) is None or getattr(stats, "var", None) is None:
    raise ValueError(
      f"`stats` must be a bnjax.BatchStats with `mean` and `var`, got {stats!r}. "
      "Create one with `bnjax.init(feature_shape)`."
    )
  check_running(running)
  if running != "ema" and stats.count is None:
    raise ValueError(
      f"`running`={running!r} needs `stats.count` (how many batches were averaged), but it is None. "
      "Create the statistics with `bnjax.init(...)`, which starts count at 0."
    )


def check_virtual_batch_size(virtual_batch_size, x_shape=None, axes=()) -> None:
  if virtual_batch_size is None:
    return
  if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, (int, np.integer)):
    raise TypeError(f"`virtual_batch_size` must be a positive int or None, got {virtual_batch_size!r}.")
  if virtual_batch_size < 1:
    raise ValueError(f"`virtual_batch_size` must be a positive int or None, got {virtual_batch_size!r}.")
  if x_shape is None:
    return
  if 0 in axes:
    raise ValueError(
      "`virtual_batch_size` splits axis 0 (the batch axis) into groups, but axis 0 is a feature axis "
      f"here (axis={axes})."
    )
  if x_shape[0] % virtual_batch_size:
    raise ValueError(
      f"`virtual_batch_size`={virtual_batch_size} does not divide the batch axis of x "
      f"(x.shape[0]={x_shape[0]}): use a batch size that is a multiple of it."
    )


def spec(
  x, params=None, stats=None, *, axis, axis_name=None, axis_index_groups=None, mask=None, stats_arg: str = "stats."
):
  """Validates x, its variables and the reduction; returns `(Spec, mask at x's rank or None)`."""
  check_inexact(x)
  shape = tuple(np.shape(x))
  axes = feature_axes(axis, len(shape))
  feature_shape = tuple(shape[a] for a in axes)
  check_variables(params, stats, feature_shape, shape, axes, stats_arg=stats_arg)
  names = axis_names(axis_name, axis_index_groups)
  groups = None if axis_index_groups is None else tuple(tuple(int(i) for i in g) for g in axis_index_groups)
  devices = axis_size(names, groups)
  if mask is not None:
    mask = mask_form(mask, shape, axes)
  reduced = tuple(i for i in range(len(shape)) if i not in axes)
  count = math.prod(shape[i] for i in reduced) * devices
  return Spec(axes, reduced, feature_shape, names, groups, mask is not None, count), mask


def train_spec(
  x, params, stats, *, axis, axis_name, axis_index_groups, mask, virtual_batch_size, allow_batch_of_one: bool
):
  """`spec` for training mode, plus: the shard_map typing check and at least two values per feature."""
  s, mask = spec(x, params, stats, axis=axis, axis_name=axis_name, axis_index_groups=axis_index_groups, mask=mask)
  if axis_name is None:
    _check_mapped_axes(x, ())
  check_virtual_batch_size(virtual_batch_size, np.shape(x), s.feature_axes)
  count = s.count
  if virtual_batch_size is not None:  # ghost batches are local to each device
    count = math.prod(x.shape[i] for i in s.reduced_axes) // x.shape[0] * virtual_batch_size
  check_bool(allow_batch_of_one, "allow_batch_of_one")
  if count == 0 or (count == 1 and not allow_batch_of_one):
    devices = f" across the devices of axis_name={axis_name!r}" if s.axis_names else ""
    ghost = f" per group of virtual_batch_size={virtual_batch_size}" if virtual_batch_size else ""
    raise ValueError(
      f"batch_norm(train=True) got {count} value per feature{ghost}{devices} to compute statistics over: "
      f"x has shape {tuple(x.shape)} with feature axes {s.feature_axes}. A batch of one has zero variance "
      "and normalizes every feature to 0 (the output is `bias`). Use a larger batch, train=False for the "
      "running statistics, or allow_batch_of_one=True (what the Flax layers do for dummy batches)."
    )
  return s, mask


def layer_options(
  *,
  use_running_average,
  axis,
  momentum,
  epsilon,
  use_bias,
  use_scale,
  axis_name,
  axis_index_groups,
  use_fast_variance,
  virtual_batch_size,
  unbiased_running_var,
  running,
) -> None:
  """The constructor arguments the linen and nnx `BatchNorm` layers share."""
  check_bool(use_running_average, "use_running_average", optional=True)
  axis_spec(axis)
  check_decay(momentum, arg="momentum")
  check_epsilon(epsilon)
  for name, value in (
    ("use_bias", use_bias),
    ("use_scale", use_scale),
    ("use_fast_variance", use_fast_variance),
    ("unbiased_running_var", unbiased_running_var),
  ):
    check_bool(value, name)
  axis_names(axis_name, axis_index_groups)
  check_virtual_batch_size(virtual_batch_size)
  check_running(running)
