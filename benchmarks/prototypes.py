"""Alternative formulations of training-mode batch norm, to measure suggestions for the core's formulation.

These are benchmark scratch code, not library code: feature-last input, no mask, no axis_name, reverse mode
only (a `custom_vjp`; the core's `custom_jvp` also serves forward mode). They plug into the op benchmark and
the HLO anatomy as extra implementations, so they are timed in the same interleaved rounds and checked against
the same float64 reference as everything else; two of them also plug into the training-step benchmark as
flax.linen layers:

  python -m benchmarks.ops --prototypes --only "bnjax,proto: guarded one-pass vjp" --dtypes float32
  python -m benchmarks.hlo --prototypes --only "bnjax,proto: guarded one-pass vjp"
  python -m benchmarks.train --prototypes --modes "1 device"

All share one closed-form backward, in which every full-size kernel is a plain affine map of its inputs:

  forward   y  = a * x + b,                       a = scale * inv_std,  b = bias - mean * a
  backward  dx = a * g + c * x + d,               c = -a * inv_std^2 * sum(g (x - mean)) / m,
                                                  d = -a * sum(g) / m - c * mean
            dscale = inv_std * sum(g (x - mean)),  dbias = sum(g)

and differ in the forward statistics:

`proto: two-pass vjp`: the core's numerics: mean = sum(x) / m, then var = sum((x - mean)^2) / m.

`proto: guarded one-pass vjp`: Flax's one-pass sums S1 = sum(x), S2 = sum(x^2), two independent plain
reductions, and var = S2 / m - (S1 / m)^2. That loses the variance's bits when mean^2 dwarfs var
(x = 1e4 + N(0, 1)), so a `lax.cond` on one scalar, "mean^2 > 2^8 var for some feature", recomputes the
variance exactly with a second pass around the mean; otherwise float32 keeps at least ~16 bits of the
variance. Under `vmap` the cond becomes a select and both branches run (three passes).

`proto: shifted guarded one-pass vjp`: as above with both sums taken around a shift K, the running mean
(`stop_gradient`, known before x is read): S1 = sum(x - K), S2 = sum((x - K)^2), mean = K + S1 / m,
var = S2 / m - (S1 / m)^2. It needs the fallback less often, but its reductions carry a broadcast operand.

`proto: batch-shifted one-pass vjp`: bnjax's own GPU/TPU statistics (`bnjax._src.moments.shifted_moments`,
with XLA:CPU's separate spelling on the CPU), timed on any backend: both sums around K = x's first row,
S1 = sum(x - K), S2 = sum((x - K)^2), with no guard; the cancellation depends on how many stds K lies from
the mean, not on the mean's size.

`proto: Chan one-pass vjp`: one variadic reduction of (count, mean, M2) whose combiner is Chan et al.'s merge
(Welford's update). One read of x on a backend that emits it as one kernel, and no cancellation; but every
merge rounds the running mean, so its error grows with |mean| / std where the two-pass form's does not.

`proto: two-pass vjp + per-use converts`: `proto: two-pass vjp` for bfloat16 inputs, with every use of x and g
converted to float32 on its own (behind an optimization barrier). A single shared `x.astype(float32)` that
feeds several reductions is written out by XLA:CPU as a full-size float32 temporary (twice x's bytes, then
read back by each reduction); separate conversions fuse into each consumer. Identical to the first for float32.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import ops
from bnjax._src import checks
from bnjax._src import fusion
from bnjax._src import moments as moments_lib

# Recompute the variance exactly when (mean - K)^2 exceeds this multiple of it: float32 then keeps at least
# 24 - log2(1 + 2^8) ~ 16 bits of the variance.
_SHIFT_TOLERANCE = 2.0**8


def _feature_sums(*arrays):
  """Per-feature sums over every axis but the last."""
  return tuple(jnp.sum(a, axis=tuple(range(a.ndim - 1))) for a in arrays)


def _converter(per_use: bool):
  """x -> float32. With `per_use`, each call converts behind its own barrier: XLA then fuses the conversion
  into each consumer instead of writing one shared full-size float32 copy of a bfloat16 input."""
  if not per_use:
    return lambda a: a.astype(jnp.float32)
  uses = itertools.count()

  def convert(a):
    if a.dtype == jnp.float32:
      return a
    return fusion.upcast(a, jnp.float32, next(uses))  # the core's per-use conversion (adopted from here)

  return convert


def _two_pass_stats(x, shift, f32):
  del shift
  (total,) = _feature_sums(f32(x))
  count = x.size // x.shape[-1]
  mean = total / count
  # The barrier keeps the division out of the next reduction's fusion (XLA:CPU would otherwise write x - mean).
  centered = f32(x) - jax.lax.optimization_barrier(mean)
  (m2,) = _feature_sums(centered * centered)
  return mean, m2 / count


def guarded_one_pass_stats(x, shift, f32):
  """Mean and variance from sum(x - K), sum((x - K)^2) (K = 0 when shift is None); an exact second pass
  only if that lost bits."""
  count = x.size // x.shape[-1]
  if shift is None:
    s1, s2 = _feature_sums(f32(x), jnp.square(f32(x)))
    shift = 0.0
  else:
    # Two spellings of x - K (one through a barrier) so that XLA does not share one full-size x - K between
    # the two reductions as a temporary, but fuses the subtraction into each.
    s1, s2 = _feature_sums(f32(x) - shift, jnp.square(f32(x) - jax.lax.optimization_barrier(shift)))
  offset = s1 / count
  mean = shift + offset
  var = jnp.maximum(s2 / count - offset * offset, 0.0)

  def exact(_):
    deviation = f32(x) - jax.lax.optimization_barrier(mean)
    (m2,) = _feature_sums(deviation * deviation)
    return m2 / count

  lost_bits = jnp.any(offset * offset > _SHIFT_TOLERANCE * var)
  return mean, jax.lax.cond(lost_bits, exact, lambda _: var, None)


def _unshifted_guarded_stats(x, shift, f32):
  del shift
  return guarded_one_pass_stats(x, None, f32)


def _batch_shifted_stats(x, shift, f32):
  """bnjax's one-pass form, spelled as the core spells it for the backend at hand."""
  del shift, f32  # the shift is x's first row; the core converts each use itself
  spec, _ = checks.spec(x, axis=-1)
  n, k, offset, m2 = moments_lib.shifted_moments(x, spec, separate_uses=jax.default_backend() == "cpu")
  return (k + offset).reshape(-1), (m2 / n).reshape(-1)


def _chan_merge(a, b):
  """Chan et al.'s merge of two partial (count, mean, M2); (0, 0, 0) is its identity."""
  n_a, mean_a, m2_a = a
  n_b, mean_b, m2_b = b
  n = n_a + n_b
  weight_b = n_b.astype(mean_a.dtype) / jnp.maximum(n, 1).astype(mean_a.dtype)
  delta = mean_b - mean_a
  return n, mean_a + delta * weight_b, m2_a + m2_b + delta * delta * n_a.astype(mean_a.dtype) * weight_b


def _chan_one_pass_stats(x, shift, f32):
  """Mean and variance in one read of x: a variadic reduction of (1, x, 0) per element whose combiner is Chan's
  merge (Welford's update where one side is a single element). Stable, with no cancellation, but each merge
  rounds the running mean, so its error grows with |mean| / std (unlike the two-pass form's)."""
  del shift
  values = f32(x)
  axes = tuple(range(x.ndim - 1))
  count, mean, m2 = jax.lax.reduce(
    (jnp.ones(x.shape, jnp.int32), values, jnp.zeros_like(values)),
    (jnp.int32(0), jnp.float32(0), jnp.float32(0)),
    _chan_merge,
    axes,
  )
  return mean, m2 / count


def _make_batch_norm(stats_fn, epsilon, *, convert_per_use=False):
  """A custom_vjp batch norm over the last axis: (x, scale, bias, shift) -> (y, mean, var)."""
  f32 = _converter(convert_per_use)

  def forward(x, scale, bias, shift):
    mean, var = stats_fn(x, shift, f32)
    inv_std = jax.lax.rsqrt(var + epsilon)
    a = scale * inv_std
    y = (f32(x) * a + (bias - mean * a)).astype(x.dtype)
    return (y, mean, var), (x, mean, inv_std, scale)

  @jax.custom_vjp
  def batch_norm(x, scale, bias, shift):
    return forward(x, scale, bias, shift)[0]

  def backward(residuals, cotangents):
    x, mean, inv_std, scale = residuals
    g = cotangents[0]  # the statistics' own outputs only feed the running averages
    count = x.size // x.shape[-1]
    sum_g, sum_g_centered = _feature_sums(f32(g), f32(g) * (f32(x) - mean))
    a = scale * inv_std
    c = -a * inv_std * inv_std * sum_g_centered / count
    d = -a * sum_g / count - c * mean
    dx = (f32(g) * a + f32(x) * c + d).astype(x.dtype)
    return dx, inv_std * sum_g_centered, sum_g, jnp.zeros_like(mean)

  batch_norm.defvjp(forward, backward)
  return batch_norm


def _train(batch_norm, x, scale, bias, running_mean, running_var, decay):
  """Training mode: y, and the running statistics moved towards the batch's by `1 - decay`."""
  y, mean, var = batch_norm(x, scale, bias, jax.lax.stop_gradient(running_mean))
  mean, var = jax.lax.stop_gradient((mean, var))
  return y, (decay * running_mean + (1 - decay) * mean, decay * running_var + (1 - decay) * var)


def _build(stats_fn, **options):
  def build(case, data):
    batch_norm = _make_batch_norm(stats_fn, data.epsilon, **options)

    def forward(x, params, state):
      return _train(batch_norm, x, *params, *state, data.decay)

    return ops.tuple_state_prepared(case, data, forward, note="prototype")

  return build


IMPLEMENTATIONS = (
  ops.Implementation("proto: two-pass vjp", _build(_two_pass_stats)),
  ops.Implementation("proto: guarded one-pass vjp", _build(_unshifted_guarded_stats)),
  ops.Implementation("proto: shifted guarded one-pass vjp", _build(guarded_one_pass_stats)),
  ops.Implementation("proto: batch-shifted one-pass vjp", _build(_batch_shifted_stats)),
  ops.Implementation("proto: Chan one-pass vjp", _build(_chan_one_pass_stats)),
  ops.Implementation("proto: two-pass vjp + per-use converts", _build(_two_pass_stats, convert_per_use=True)),
)


# ---------------------------------------------------------------------------------------------------------------
# The same formulations as flax.linen layers, for the training-step benchmark (`benchmarks.train --prototypes`):
# an op benchmark times one call in isolation, while a step shows costs that only appear between kernels, such as
# the guarded form's `lax.cond`, whose predicate an accelerator backend may copy to the host before branching.

LAYER_STATS = {"proto: two-pass": _two_pass_stats, "proto: guarded one-pass": _unshifted_guarded_stats}


def layer_classes() -> dict:
  """name -> a flax.linen batch norm class with `flax.linen.BatchNorm`'s arguments and variables (features last,
  no `axis_name`) whose training-mode statistics are the prototype's."""
  return {name: _layer_class(stats_fn) for name, stats_fn in LAYER_STATS.items()}


def _layer_class(stats_fn):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class BatchNorm(nn.Module):  # named like flax's, so that its variables get the same paths
    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x):
      if self.axis_name is not None:
        raise ValueError(
          f"a prototype layer reduces over one device's batch and takes no axis_name, got axis_name={self.axis_name!r}"
        )
      features = (x.shape[-1],)
      scale = self.param("scale", nn.initializers.ones, features)
      bias = self.param("bias", nn.initializers.zeros, features)
      running_mean = self.variable("batch_stats", "mean", jnp.zeros, features)
      running_var = self.variable("batch_stats", "var", jnp.ones, features)
      if self.use_running_average:
        a = scale * jax.lax.rsqrt(running_var.value + self.epsilon)
        return (x * a + (bias - running_mean.value * a)).astype(x.dtype)
      batch_norm = _make_batch_norm(stats_fn, self.epsilon)
      y, (new_mean, new_var) = _train(batch_norm, x, scale, bias, running_mean.value, running_var.value, self.momentum)
      if not self.is_initializing():  # as flax.linen.BatchNorm: initialising leaves the statistics at 0 and 1
        running_mean.value, running_var.value = new_mean, new_var
      return y

  return BatchNorm


# ---------------------------------------------------------------------------------------------------------------
# Accuracy of each formulation's statistics on the backend at hand (reductions differ in order per backend).

ACCURACY_LOCATIONS = (0.0, 30.0, 1e4)  # x = location + N(0, 1): |mean| / std from 0 to where one pass fails


def accuracy(shape=(65536, 1024), locations=ACCURACY_LOCATIONS, seed=0) -> list[dict]:
  """Worst feature's mean error (in units of the std) and variance relative error, against float64, for bnjax's
  `moments`, Flax's one-pass formula and every prototype's statistics, at x = location + N(0, 1) in float32."""
  import bnjax  # pylint: disable=g-import-not-at-top

  def flax_one_pass(x, shift, f32):
    del shift
    count = x.size // x.shape[-1]
    s1, s2 = _feature_sums(f32(x), jnp.square(f32(x)))
    mean = s1 / count
    return mean, jnp.maximum(s2 / count - mean * mean, 0.0)

  formulations = {
    "bnjax.moments": lambda x, shift, f32: bnjax.moments(x),
    "flax one-pass E[x^2]-E[x]^2": flax_one_pass,
    "proto: two-pass": _two_pass_stats,
    "proto: guarded one-pass": _unshifted_guarded_stats,
    "bnjax one-pass (GPU/TPU form)": _batch_shifted_stats,
    "proto: Chan one-pass": _chan_one_pass_stats,
  }
  rows = []
  for location in locations:
    x = (location + np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)).astype(np.float32)
    x64 = x.astype(np.float64)
    axes = tuple(range(x.ndim - 1))
    want_mean, want_var = x64.mean(axis=axes), x64.var(axis=axes)
    x_device = jnp.asarray(x)
    for name, stats in formulations.items():
      mean, var = jax.jit(lambda x, stats=stats: stats(x, None, lambda a: a))(x_device)
      rows.append(
        {
          "formulation": name,
          "location": location,
          "backend": jax.default_backend(),
          "mean_error_in_std": float(np.max(np.abs(np.asarray(mean, np.float64) - want_mean) / np.sqrt(want_var))),
          "var_relative_error": float(np.max(np.abs(np.asarray(var, np.float64) / want_var - 1.0))),
        }
      )
  return rows


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.prototypes",
    description="accuracy of each formulation's batch statistics, against float64",
  )
  parser.add_argument("--shape", default="65536,1024")
  args = parser.parse_args(argv)
  rows = accuracy(tuple(int(d) for d in args.shape.split(",")))
  print(f"x = location + N(0, 1), float32, shape {args.shape}, on {jax.devices()[0].device_kind}; worst feature")
  from benchmarks import _harness  # pylint: disable=g-import-not-at-top

  print(
    _harness.markdown_table(
      ("formulation", "|mean| / std", "mean error / std", "var relative error"),
      [
        (r["formulation"], f"{r['location']:g}", f"{r['mean_error_in_std']:.1e}", f"{r['var_relative_error']:.1e}")
        for r in rows
      ],
    )
  )
  return 0


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top

  sys.exit(main())
