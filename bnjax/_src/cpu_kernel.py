"""Optional XLA:CPU kernels for batch norm's reductions, built from source on first use.

XLA:CPU compiles every reduction to its own kernel with its own full read of its operands, and does
not fuse sibling reductions into one pass. Training-mode batch norm needs two pairs of them: the
exact two-pass moments (`sum(x)`, then `sum((x - mean)^2)`) and the backward's `sum(g)` and
`sum(g * (x - mean))`. `cpu_kernels.cc` computes each pair in one read of x (and g) through XLA's
FFI, on XLA's intra-op thread pool; the elementwise passes stay in XLA, which fuses them well.

The moments stay exact, not `E[x^2] - E[x]^2`: each chunk of rows small enough to stay in cache is
read twice (its mean, then its squared deviations) and the chunks are merged with Chan et al.'s
pairwise rule in float64. The partition of the work depends only on the shape, so results do not
depend on the number of threads.

The kernels are opt-in (`batch_norm(..., implementation="cpu_kernel")`). The source is compiled
with the system C++ compiler (`$CXX`, else `c++`) against jaxlib's FFI headers on first use, and the
library is cached under `$BNJAX_CACHE_DIR` (default `~/.cache/bnjax`), keyed by the source, the
flags, the compiler, jaxlib and the CPU. Without a compiler, `build()` raises and `batch_norm` warns
once and uses the pure-JAX path.
"""
import ctypes
import functools
import hashlib
import importlib.metadata
import math
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from typing import Tuple

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bnjax._src import moments as moments_lib

SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
_TARGETS = {"bnjax_moments": "BnjaxMoments", "bnjax_backward_sums": "BnjaxBackwardSums",
            "bnjax_backward": "BnjaxBackward"}
# -march=native: the library is built on, and cached for, the machine that runs it.
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")
# The dtypes batch_norm sends to the kernels. They also take bfloat16, but measured (benchmarks/RESULTS.md)
# the pure-JAX path is as fast or faster there: it already reads bfloat16 in 8 fused passes.
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32),)


class KernelUnavailableError(RuntimeError):
  """The CPU kernels could not be built or loaded (the message says why)."""


def cache_dir() -> pathlib.Path:
  if os.environ.get("BNJAX_CACHE_DIR"):
    return pathlib.Path(os.environ["BNJAX_CACHE_DIR"])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "bnjax"


def _cpu_signature() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  return platform.machine() + platform.processor()


def _compiler() -> str:
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise KernelUnavailableError(
        f"no C++ compiler `{compiler}` on PATH to build bnjax's CPU kernels; install one (e.g. "
        "`apt install g++`) or set $CXX, or use implementation='xla'.")
  return compiler


def _library_path(compiler: str) -> pathlib.Path:
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), " ".join(_FLAGS).encode(), version.encode(),
               importlib.metadata.version("jaxlib").encode(), _cpu_signature().encode()):
    key.update(part)
    key.update(b"\0")
  return cache_dir() / f"libbnjax_cpu_{key.hexdigest()[:16]}.so"


def build() -> str:
  """Compiles the CPU kernels if no cached build matches, and returns the library's path.

  Raises:
    KernelUnavailableError: no compiler, or the compilation failed (with its messages).
  """
  compiler = _compiler()
  path = _library_path(compiler)
  if path.exists():
    return str(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise KernelUnavailableError(
        f"cannot create the kernel cache folder {path.parent} ({e}); set $BNJAX_CACHE_DIR to a "
        "writable folder.") from e
  # Built under a temporary name and renamed, so concurrent processes never load a partial file.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  cmd = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    os.unlink(tmp)
    raise KernelUnavailableError(
        f"building bnjax's CPU kernels failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
  os.replace(tmp, path)
  return str(path)


@functools.cache
def load() -> None:
  """Builds (or finds) the library and registers its FFI targets with XLA, once per process."""
  library = ctypes.CDLL(build())
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")


@functools.cache
def unavailable_reason():
  """None when the kernels are loaded; else why they cannot be (a string)."""
  try:
    load()
  except (KernelUnavailableError, OSError) as e:
    return str(e)
  return None


def view_of(shape, axes) -> Tuple[int, int, int]:
  """x's shape as `(A, C, B)`, the features `C` contiguous between A and B, or None."""
  if list(axes) != list(range(axes[0], axes[-1] + 1)):
    return None
  first, last = axes[0], axes[-1] + 1
  return math.prod(shape[:first]), math.prod(shape[first:last]), math.prod(shape[last:])


def _ffi_moments(x3):
  out = jax.ShapeDtypeStruct((x3.shape[1],), jnp.float32)
  return jax.ffi.ffi_call("bnjax_moments", (out, out), vmap_method="sequential")(x3)


def _ffi_backward_sums(x3, g3, mean):
  out = jax.ShapeDtypeStruct((x3.shape[1],), jnp.float32)
  return jax.ffi.ffi_call("bnjax_backward_sums", (out, out), vmap_method="sequential")(x3, g3, mean)


def _ffi_backward(x3, g3, mean, gain, mean_coef, proj_coef, offset0, slope0):
  sums = jax.ShapeDtypeStruct((x3.shape[1],), jnp.float32)
  return jax.ffi.ffi_call(
      "bnjax_backward", (jax.ShapeDtypeStruct(x3.shape, x3.dtype), sums, sums),
      vmap_method="sequential")(x3, g3, mean, gain, mean_coef, proj_coef, offset0, slope0)


def dx_from_sums(x3, g3, mean, gain, mean_coef, proj_coef, offset0, slope0, sum_g, sum_gc):
  """The elementwise half of `bnjax_backward` in XLA, given the (synchronised) sums."""
  per_feature = lambda v: v.reshape(1, -1, 1)
  offset = per_feature(offset0 - mean_coef * sum_g)
  slope = per_feature(slope0 - proj_coef * sum_gc)
  dx = (per_feature(gain) * g3.astype(jnp.float32) + offset
        + slope * (x3.astype(jnp.float32) - per_feature(mean)))
  return dx.astype(x3.dtype)


def _layout(mesh, arg_shapes):
  """`(reduced, x_sharding, features)`: the mesh axes that split A or B (the kernels reduce over them),
  and the shardings of x-shaped and feature-shaped arrays, from x's sharding."""
  spec = (tuple(arg_shapes[0].sharding.spec) + (None,) * 3)[:3]
  reduced = []
  for entry in (spec[0], spec[2]):
    if entry is not None:
      reduced += [entry] if isinstance(entry, str) else list(entry)
  return tuple(reduced), NamedSharding(mesh, P(*spec)), NamedSharding(mesh, P(spec[1]))


# Under a sharded jit, XLA's partitioner would gather a custom call's operands onto every device. These
# rules tell it the kernels reduce over A and B: each device reduces its own shard, and the partial results
# are combined across the mesh axes that split A and B (features split over C stay split).
def _partition_moments(mesh, arg_shapes, result_shape):
  del result_shape
  reduced, x_sharding, features = _layout(mesh, arg_shapes)

  def lower(x3):
    mean, m2 = _ffi_moments(x3)
    if reduced:
      n_local = jnp.asarray(x3.shape[0] * x3.shape[2], jnp.float32)
      mean, var, count = moments_lib.combine(n_local, mean, m2, reduced, same_count=True)
      m2 = var * count
    return mean, m2

  return mesh, lower, (features, features), (x_sharding,)


def _partition_backward_sums(mesh, arg_shapes, result_shape):
  del result_shape
  reduced, x_sharding, features = _layout(mesh, arg_shapes)

  def lower(x3, g3, mean):
    return moments_lib.sync_sum(_ffi_backward_sums(x3, g3, mean), reduced or None)

  return mesh, lower, (features, features), (x_sharding, x_sharding, features)


def _partition_backward(mesh, arg_shapes, result_shape):
  del result_shape
  reduced, x_sharding, features = _layout(mesh, arg_shapes)

  def lower(x3, g3, mean, *coefficients):
    if not reduced:
      return _ffi_backward(x3, g3, mean, *coefficients)
    # The shards' sums must be added up before dx: the two halves of the kernel, with an all-reduce.
    sum_g, sum_gc = moments_lib.sync_sum(_ffi_backward_sums(x3, g3, mean), reduced)
    return dx_from_sums(x3, g3, mean, *coefficients, sum_g, sum_gc), sum_g, sum_gc

  return mesh, lower, (x_sharding, features, features), (x_sharding,) * 2 + (features,) * 6


def _infer_sums_sharding(mesh, arg_shapes, result_shape):
  del result_shape
  _, _, features = _layout(mesh, arg_shapes)
  return features, features


def _infer_backward_sharding(mesh, arg_shapes, result_shape):
  del result_shape
  _, x_sharding, features = _layout(mesh, arg_shapes)
  return x_sharding, features, features


def _kernel_call(ffi_fn, partition, infer_sharding, sharding_rule):
  """`ffi_fn` made partitionable under a sharded jit and batchable under vmap."""
  partitioned = custom_partitioning(ffi_fn)
  partitioned.def_partition(partition=partition, infer_sharding_from_operands=infer_sharding,
                            sharding_rule=sharding_rule)

  @custom_vmap
  def call(*args):
    return partitioned(*args)

  # custom_partitioning has no batching rule: under vmap each instance runs the plain call in turn.
  @call.def_vmap
  def _vmap(axis_size, in_batched, *args):
    args = [a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, batched in zip(args, in_batched)]
    out = jax.vmap(ffi_fn)(*args)
    return out, tuple(True for _ in out)

  return call


_moments = _kernel_call(_ffi_moments, _partition_moments, _infer_sums_sharding, "a c b -> c, c")
_backward_sums = _kernel_call(_ffi_backward_sums, _partition_backward_sums, _infer_sums_sharding,
                              "a c b, a c b, c -> c, c")
_backward = _kernel_call(_ffi_backward, _partition_backward, _infer_backward_sharding,
                         "a c b, a c b, c, c, c, c, c, c -> a c b, c, c")


def moments(x3) -> Tuple[jax.Array, jax.Array]:
  """`(mean, m2)` of x3 `(A, C, B)` per feature C over A and B (`m2 = sum((x - mean)^2)`): float32 `(C,)`."""
  load()
  return _moments(x3)


def backward_sums(x3, g3, mean) -> Tuple[jax.Array, jax.Array]:
  """`(sum(g), sum(g * (x - mean)))` per feature over A and B: float32 `(C,)` each."""
  load()
  return _backward_sums(x3, g3, mean.astype(jnp.float32))


def backward(x3, g3, mean, gain, mean_coef, proj_coef, offset0, slope0):
  """The whole backward of one device's batch in one call: `(dx, sum(g), sum(g * (x - mean)))`.

  `dx = gain * g + offset + slope * (x - mean)` per feature, with `offset = offset0 - mean_coef *
  sum(g)` and `slope = slope0 - proj_coef * sum(g * (x - mean))`; x3 and g3 `(A, C, B)`, the rest
  float32 `(C,)`. Under a sharded jit the shards' sums are all-reduced before dx.
  """
  load()
  f32 = lambda v: v.astype(jnp.float32)
  return _backward(x3, g3, f32(mean), f32(gain), f32(mean_coef), f32(proj_coef), f32(offset0),
                   f32(slope0))
