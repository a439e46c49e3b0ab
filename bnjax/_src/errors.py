"""Input validation: every message names the argument, what it got and what was expected."""
import numbers
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax._src import types


def feature_axes(axis: types.Axis, ndim: int, *, arg: str = "axis") -> Tuple[int, ...]:
  """Canonical (non-negative, sorted) feature axes; raises on out-of-range or repeated axes."""
  if isinstance(axis, (int, np.integer)):
    axes = (axis,)
  else:
    try:
      axes = tuple(axis)
    except TypeError:
      raise TypeError(
          f"`{arg}` must be a Python int or a tuple of ints (static; under jax.jit mark it with "
          f"static_argnames), got {axis!r}.") from None
  if not axes:
    raise ValueError(f"`{arg}` must name at least one feature axis, got {axis!r}.")
  canonical = []
  for a in axes:
    if not isinstance(a, (int, np.integer)):
      raise TypeError(f"`{arg}` must be an int or a tuple of ints, got {axis!r}.")
    if not -ndim <= a < ndim:
      raise ValueError(
          f"`{arg}`={axis!r} is out of range for an input of rank {ndim}: each axis must be in "
          f"[{-ndim}, {ndim - 1}].")
    canonical.append(int(a) % ndim)
  if len(set(canonical)) != len(canonical):
    raise ValueError(f"`{arg}`={axis!r} repeats an axis (as non-negative axes: {canonical}).")
  if len(canonical) == ndim:
    raise ValueError(
        f"`{arg}`={axis!r} keeps every axis of an input of rank {ndim}: at least one axis must be "
        "left to compute statistics over (the batch axis).")
  return tuple(sorted(canonical))


def check_floating(x, *, arg: str = "x") -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"`{arg}` must have a floating dtype (float32, bfloat16, float16, float64), got {dtype}. "
        f"Cast it first, e.g. `{arg}.astype(jnp.float32)`.")


def check_feature_shape(tree, names: Sequence[str], expected: Tuple[int, ...], *, arg: str,
                        x_shape: Tuple[int, ...], axes: Tuple[int, ...]) -> None:
  for name in names:
    value = getattr(tree, name)
    if value is None:
      continue
    shape = tuple(np.shape(value))
    if shape != expected:
      raise ValueError(
          f"`{arg}.{name}` has shape {shape}, but x (shape {x_shape}) has feature shape {expected} "
          f"along axis {axes if len(axes) > 1 else axes[0]}. Create matching variables with "
          f"`bnjax.init({expected})`, or pass the `axis` that holds the features.")


def check_stats_present(stats, *, arg: str = "stats") -> None:
  if stats is None or getattr(stats, "mean", None) is None or getattr(stats, "var", None) is None:
    raise ValueError(
        f"`{arg}` must be a bnjax.BatchStats with `mean` and `var`, got {stats!r}. "
        "Create one with `bnjax.init(feature_shape)`.")


def check_decay(decay) -> None:
  if isinstance(decay, numbers.Real) and not 0.0 <= float(decay) <= 1.0:
    raise ValueError(
        f"`decay` must be in [0, 1] (the weight kept by the running average each step; "
        f"PyTorch's momentum m is decay = 1 - m), got {decay}.")


def check_epsilon(epsilon) -> None:
  if isinstance(epsilon, numbers.Real) and not float(epsilon) > 0.0:
    raise ValueError(f"`epsilon` must be > 0 (it keeps 1/sqrt(var + epsilon) finite), got {epsilon}.")


def check_implementation(implementation) -> None:
  if implementation not in (None, "xla", "cpu_kernel"):
    raise ValueError(f"`implementation` must be None, 'xla' or 'cpu_kernel', got {implementation!r}.")


def mask_to_input_rank(mask, x_shape: Tuple[int, ...], axes: Tuple[int, ...]):
  """Returns `mask` with x's rank and size-1 feature axes; raises on a wrong shape or dtype."""
  reduced_shape = tuple(d for i, d in enumerate(x_shape) if i not in axes)
  keepdims_shape = tuple(1 if i in axes else d for i, d in enumerate(x_shape))
  dtype = jnp.result_type(mask)
  if dtype != jnp.bool_:
    raise TypeError(
        f"`mask` must be boolean (True marks the rows that count), got dtype {dtype}. "
        "Pass `mask.astype(bool)`.")
  shape = tuple(np.shape(mask))
  if shape == reduced_shape:
    return jnp.expand_dims(mask, axes)
  if shape == keepdims_shape:
    return mask
  raise ValueError(
      f"`mask` has shape {shape}, but x has shape {x_shape} with feature axes {axes}: expected "
      f"x's shape without the feature axes, {reduced_shape} (or {keepdims_shape}).")


def check_virtual_batch_size(virtual_batch_size: Optional[int], x_shape, axes) -> None:
  if virtual_batch_size is None:
    return
  if 0 in axes:
    raise ValueError(
        f"`virtual_batch_size` splits axis 0 (the batch axis) into groups, but axis 0 is a feature "
        f"axis here (axis={axes}).")
  if not isinstance(virtual_batch_size, (int, np.integer)) or virtual_batch_size < 1:
    raise ValueError(f"`virtual_batch_size` must be a positive int, got {virtual_batch_size!r}.")
  if x_shape[0] % virtual_batch_size:
    raise ValueError(
        f"`virtual_batch_size`={virtual_batch_size} does not divide the batch axis of x "
        f"(x.shape[0]={x_shape[0]}): use a batch size that is a multiple of it.")


def axis_size(axis_name: types.AxisName, axis_index_groups=None) -> int:
  """Number of participants in a reduction over `axis_name`; re-raises an unbound name with a hint."""
  if axis_name is None:
    return 1
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  size = 1
  for name in names:
    try:
      size *= jax.lax.axis_size(name)
    except NameError as e:
      raise NameError(
          f"`axis_name`={axis_name!r}: the axis {name!r} is not bound here. batch_norm with an "
          "axis_name must run inside a transformation that defines it: jax.pmap(..., axis_name=...), "
          "jax.shard_map over a Mesh with that axis, or jax.vmap(..., axis_name=...). Under a plain "
          "(sharded) jax.jit leave axis_name=None: the batch is already global.") from e
  if axis_index_groups is not None:
    sizes = {len(g) for g in axis_index_groups}
    if len(sizes) != 1:
      raise ValueError(f"`axis_index_groups` must be groups of equal size, got {axis_index_groups}.")
    members = sorted(i for g in axis_index_groups for i in g)
    if members != list(range(size)):
      raise ValueError(
          f"`axis_index_groups`={axis_index_groups} must cover each of the {size} indices of "
          f"axis {axis_name!r} exactly once.")
    size = sizes.pop()
  return size


def varying_axes(x) -> frozenset:
  """The manual (shard_map) mesh axes over which x's type says it varies; empty elsewhere."""
  try:
    aval = jax.typeof(x)
  except AttributeError:  # jax without typeof
    return frozenset()
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(getattr(manual, "varying", None) or getattr(aval, "vma", None) or ())


def check_mapped_axes(x, axis_name: types.AxisName) -> None:
  """Under shard_map, an input that varies over a mesh axis that is not synchronised is an error."""
  varying = set(varying_axes(x))
  if not varying:
    return
  names = set() if axis_name is None else (
      {axis_name} if isinstance(axis_name, str) else set(axis_name))
  missing = varying - names
  if missing and axis_name is None:
    raise ValueError(
        f"batch_norm(train=True) got an x that is split over the mapped axis/axes {sorted(missing)} "
        "but `axis_name` is None, so each device would normalize with its own shard's statistics. "
        f"Pass axis_name={sorted(missing)[0]!r} for statistics of the whole batch, or axis_name=() "
        "to keep per-device statistics on purpose.")
