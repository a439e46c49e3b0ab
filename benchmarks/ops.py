"""Op-level benchmark: one training-mode batch norm, forward and forward+backward, bnjax against its peers.

  python -m benchmarks.ops [--quick] [--out DIR] [--only NAMES] [--shapes 4096x1024,...] [--dtypes float32]
                           [--modes fwd,fwd_bwd] [--rounds N] [--prototypes]

For every case (shape x dtype x mode) each implementation gets the same input `x` (features last; peers whose
native layout is channels-first get the same tensor transposed, outside the timed region), the same scale,
bias and running statistics, and for forward+backward the same cotangent `g`:

  fwd      y, new running statistics = BN_train(x)                       (bytes moved at least: read x, write y)
  fwd_bwd  dx, dscale, dbias = VJP(g), plus the new running statistics   (at least: read x, g; write dx)

Every implementation's output is checked against the float64 NumPy reference in `benchmarks._reference`
(tolerance by dtype) in the same run; a mismatch is printed loudly and makes the process exit with status 1
(a peer's deviation listed in KNOWN_DEVIATIONS, with its cause, is printed but does not fail the run).
Timing follows `benchmarks._harness`: warm-up, interleaved random-order rounds, medians, ratios as medians of
per-round ratios. The memory-bandwidth floor is a jitted elementwise pass over as many arrays of x's size as
the operation must touch at least (2 forward: read x, write y; 5 forward+backward, where y is not kept: read
x for the statistics, read x and g for the two backward sums, read x and g and write dx; timed as one kernel
that reads 4 arrays and writes 1).

Results: a markdown table on stdout, and results.json / results.md in --out (default benchmarks/out/ops,
ignored by git; the committed record is docs/performance.md).
"""

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _harness
from benchmarks import _reference

FULL_SHAPES = ((256, 1024), (4096, 1024), (65536, 256), (64, 32, 32, 64))
QUICK_SHAPES = ((32, 16), (4, 3, 3, 8))
DTYPES = ("float32", "bfloat16")
MODES = ("fwd", "fwd_bwd")
DECAY = 0.99
EPSILON = 1e-5
BNJAX = ("bnjax",)  # the implementations judged against the targets
BASELINE = "flax.linen"  # ratios "x flax" are against flax.linen.BatchNorm with its defaults
FLOOR = "floor"


class Case(NamedTuple):
  shape: tuple[int, ...]  # feature-last: (N, D) or (N, H, W, C)
  dtype: str  # "float32" | "bfloat16"
  mode: str  # "fwd" | "fwd_bwd"

  @property
  def label(self) -> str:
    return f"{self.mode} {self.dtype} {'x'.join(map(str, self.shape))}"


class CaseData(NamedTuple):
  """The inputs every implementation of one case receives (NumPy, feature-last)."""

  x: np.ndarray  # case dtype
  cotangent: np.ndarray  # case dtype
  scale: np.ndarray  # float32, values exact in bfloat16 so every parameter dtype sees the same numbers
  bias: np.ndarray
  mean0: np.ndarray  # initial running statistics, float32, exact in bfloat16
  var0: np.ndarray
  decay: float
  epsilon: float


@dataclasses.dataclass
class Prepared:
  """One implementation ready to run one case.

  `call()` performs one complete call and blocks until its results exist. `outputs(result)` turns the result of
  the first call into canonical (feature-last) float64 arrays named y / dx / dscale / dbias / mean / var; it is
  invoked right after that call (stateful peers read their updated buffers then). `running_rule` is the
  library's documented running-statistics update, from which the expected mean / var are computed.
  """

  call: Callable[[], Any]
  outputs: Callable[[Any], dict[str, np.ndarray]] | None
  running_rule: _reference.RunningRule | None
  compile_s: float | None = None  # lower + compile, for jitted implementations
  note: str = ""
  jitted: Any = None  # the jitted function and its arguments, for HLO inspection
  args: tuple = ()
  setup: Callable[[], Any] | None = None  # run untimed before every call (process-global settings)


@dataclasses.dataclass(frozen=True)
class Implementation:
  name: str
  build: Callable[[Case, CaseData], Prepared]
  supports: Callable[[Case], bool] = lambda case: True
  family: str = "jax"  # "jax" | "torch" | "floor"


def make_case_data(case: Case, seed: int = 0) -> CaseData:
  """x = 0.5 + 1.5 N(0, 1) and g ~ N(0, 1) rounded to the case dtype; parameters exact in bfloat16."""
  rng = np.random.default_rng(seed)
  features = case.shape[-1]
  dtype = jnp.dtype(case.dtype)

  def exact_in_bf16(values):
    return np.asarray(values, np.float32).astype(jnp.bfloat16).astype(np.float32)

  x = (0.5 + 1.5 * rng.standard_normal(case.shape, dtype=np.float32)).astype(dtype)
  g = rng.standard_normal(case.shape, dtype=np.float32).astype(dtype)
  return CaseData(
    x=x,
    cotangent=g,
    scale=exact_in_bf16(1.0 + 0.5 * rng.standard_normal(features)),
    bias=exact_in_bf16(0.3 * rng.standard_normal(features)),
    mean0=exact_in_bf16(0.2 * rng.standard_normal(features)),
    var0=exact_in_bf16(1.0 + rng.uniform(0.0, 0.5, features)),
    decay=DECAY,
    epsilon=EPSILON,
  )


def expected_outputs(
  case: Case, data: CaseData, reference: _reference.Reference, rule: _reference.RunningRule
) -> dict[str, np.ndarray]:
  mean, var = rule(reference.batch_mean, reference.batch_var, reference.count)
  if case.mode == "fwd":
    return {"y": reference.y, "mean": mean, "var": var}
  return {"dx": reference.dx, "dscale": reference.dscale, "dbias": reference.dbias, "mean": mean, "var": var}


# ---------------------------------------------------------------------------------------------------------------
# JAX implementations: each supplies a pure forward(x, params, state) -> (y, new_state); `jax_prepared` jits it
# (forward, or forward + VJP for fwd_bwd) and extracts the outputs.


def _f64(array) -> np.ndarray:
  return np.asarray(jnp.asarray(array, jnp.float32), np.float64)


def jax_prepared(
  case: Case,
  forward: Callable,
  x,
  params,
  state,
  cotangent,
  *,
  running: Callable[[Any], tuple],
  param_grads: Callable[[Any], tuple],
  to_canonical: Callable[[np.ndarray], np.ndarray] = lambda a: a,
  rule: _reference.RunningRule,
  note: str = "",
  state_in_vjp: bool = False,
) -> Prepared:
  """Jits `forward` (or its VJP) over (x, params, state[, g]) and wraps it as a Prepared.

  `state_in_vjp`: trace the state inside the VJP too (its cotangent is discarded); flax.nnx needs it because
  its variables may only be updated at the trace level they were created at.
  """
  if case.mode == "fwd":
    jitted = jax.jit(forward)
    args = (x, params, state)

    def outputs(result):
      y, new_state = result
      mean, var = running(new_state)
      return {"y": to_canonical(_f64(y)), "mean": _f64(mean).reshape(-1), "var": _f64(var).reshape(-1)}
  else:

    def forward_backward(x, params, state, g):
      if state_in_vjp:
        _, vjp, new_state = jax.vjp(forward, x, params, state, has_aux=True)
        dx, dparams, _ = vjp(g)
      else:
        _, vjp, new_state = jax.vjp(lambda x, p: forward(x, p, state), x, params, has_aux=True)
        dx, dparams = vjp(g)
      return dx, dparams, new_state

    jitted = jax.jit(forward_backward)
    args = (x, params, state, cotangent)

    def outputs(result):
      dx, dparams, new_state = result
      dscale, dbias = param_grads(dparams)
      mean, var = running(new_state)
      return {
        "dx": to_canonical(_f64(dx)),
        "dscale": _f64(dscale).reshape(-1),
        "dbias": _f64(dbias).reshape(-1),
        "mean": _f64(mean).reshape(-1),
        "var": _f64(var).reshape(-1),
      }

  compile_s = _harness.compile_seconds(jitted, *args)
  return Prepared(
    call=lambda: jax.block_until_ready(jitted(*args)),
    outputs=outputs,
    running_rule=rule,
    compile_s=compile_s,
    note=note,
    jitted=jitted,
    args=args,
  )


def _device_inputs(data: CaseData):
  return jnp.asarray(data.x), jnp.asarray(data.cotangent)


def build_bnjax(case: Case, data: CaseData) -> Prepared:
  import bnjax  # pylint: disable=g-import-not-at-top

  x, g = _device_inputs(data)
  params, stats = bnjax.init(data.scale.shape)
  params = params._replace(scale=jnp.asarray(data.scale), bias=jnp.asarray(data.bias))
  stats = stats._replace(mean=jnp.asarray(data.mean0), var=jnp.asarray(data.var0))

  def forward(x, params, stats):
    return bnjax.batch_norm(x, params, stats, train=True, axis=-1, decay=data.decay, epsilon=data.epsilon)

  return jax_prepared(
    case,
    forward,
    x,
    params,
    stats,
    g,
    running=lambda s: (s.mean, s.var),
    param_grads=lambda p: (p.scale, p.bias),
    rule=_reference.ema_rule(data.mean0, data.var0, data.decay),
  )


def _build_flax_linen(case: Case, data: CaseData, *, fast_variance: bool) -> Prepared:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  x, g = _device_inputs(data)
  # dtype=x.dtype: with the default dtype=None a bfloat16 input would come out float32 (promoted with the
  # float32 parameters); the peers all return the input's dtype.
  module = nn.BatchNorm(
    use_running_average=False, momentum=data.decay, epsilon=data.epsilon, dtype=x.dtype, use_fast_variance=fast_variance
  )
  params = {"scale": jnp.asarray(data.scale), "bias": jnp.asarray(data.bias)}
  state = {"mean": jnp.asarray(data.mean0), "var": jnp.asarray(data.var0)}

  def forward(x, params, state):
    y, updates = module.apply({"params": params, "batch_stats": state}, x, mutable=["batch_stats"])
    return y, updates["batch_stats"]

  return jax_prepared(
    case,
    forward,
    x,
    params,
    state,
    g,
    running=lambda s: (s["mean"], s["var"]),
    param_grads=lambda p: (p["scale"], p["bias"]),
    rule=_reference.ema_rule(data.mean0, data.var0, data.decay),
  )


def build_flax_linen(case: Case, data: CaseData) -> Prepared:
  return _build_flax_linen(case, data, fast_variance=True)


def build_flax_linen_two_pass(case: Case, data: CaseData) -> Prepared:
  return _build_flax_linen(case, data, fast_variance=False)


def build_flax_nnx(case: Case, data: CaseData) -> Prepared:
  from flax import nnx  # pylint: disable=g-import-not-at-top

  x, g = _device_inputs(data)
  module = nnx.BatchNorm(
    data.scale.shape[0], momentum=data.decay, epsilon=data.epsilon, dtype=x.dtype, rngs=nnx.Rngs(0)
  )
  module.scale[...] = jnp.asarray(data.scale)
  module.bias[...] = jnp.asarray(data.bias)
  module.mean[...] = jnp.asarray(data.mean0)
  module.var[...] = jnp.asarray(data.var0)
  graphdef, params, state = nnx.split(module, nnx.Param, nnx.BatchStat)

  # The functional split/merge API under jax.jit: the fastest way to call an nnx module (nnx.jit adds a
  # Python graph traversal per call, which would measure Python rather than the op).
  def forward(x, params, state):
    model = nnx.merge(graphdef, params, state)
    y = model(x)
    _, _, new_state = nnx.split(model, nnx.Param, nnx.BatchStat)
    return y, new_state

  return jax_prepared(
    case,
    forward,
    x,
    params,
    state,
    g,
    running=lambda s: (s["mean"][...], s["var"][...]),
    param_grads=lambda p: (p["scale"][...], p["bias"][...]),
    rule=_reference.ema_rule(data.mean0, data.var0, data.decay),
    note="split/merge under jax.jit",
    state_in_vjp=True,
  )


HAIKU_COUNTER0 = 3  # steps the zero-debiased averages have already taken, so the decay is exercised


def build_haiku(case: Case, data: CaseData) -> Prepared:
  import haiku as hk  # pylint: disable=g-import-not-at-top

  x, g = _device_inputs(data)

  def apply(x):
    return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=data.decay, eps=data.epsilon)(
      x, is_training=True
    )

  transformed = hk.without_apply_rng(hk.transform_with_state(apply))
  params, state = transformed.init(None, x)
  # Haiku keeps parameters and averages in the input's dtype, shaped (1, ..., 1, C).
  broadcast = params["batch_norm"]["scale"].shape
  params = {
    "batch_norm": {
      "scale": jnp.asarray(data.scale, x.dtype).reshape(broadcast),
      "offset": jnp.asarray(data.bias, x.dtype).reshape(broadcast),
    }
  }
  hidden_mean = np.asarray(data.mean0 * (1 - data.decay**HAIKU_COUNTER0), np.float32)
  hidden_var = np.asarray(data.var0 * (1 - data.decay**HAIKU_COUNTER0), np.float32)
  ema_dtype = state["batch_norm/~/mean_ema"]["hidden"].dtype
  hidden_mean = np.asarray(jnp.asarray(hidden_mean, ema_dtype).astype(jnp.float32))
  hidden_var = np.asarray(jnp.asarray(hidden_var, ema_dtype).astype(jnp.float32))

  def ema_state(hidden):
    return {
      "average": jnp.asarray(hidden, ema_dtype).reshape(broadcast),
      "counter": jnp.asarray(HAIKU_COUNTER0, jnp.int32),
      "hidden": jnp.asarray(hidden, ema_dtype).reshape(broadcast),
    }

  state = {"batch_norm/~/mean_ema": ema_state(hidden_mean), "batch_norm/~/var_ema": ema_state(hidden_var)}

  def forward(x, params, state):
    return transformed.apply(params, state, x)

  # Haiku's moving averages round their decay to the statistics' dtype: 0.99 -> 0.98828125 in bfloat16.
  decay = float(np.asarray(jnp.asarray(data.decay, ema_dtype), np.float64))
  note = "E[x^2]-E[x]^2 in the input dtype"
  if abs(decay - data.decay) > 1e-6:
    note += f"; decay rounded to {decay:.8g}"
  return jax_prepared(
    case,
    forward,
    x,
    params,
    state,
    g,
    running=lambda s: (s["batch_norm/~/mean_ema"]["average"], s["batch_norm/~/var_ema"]["average"]),
    param_grads=lambda p: (p["batch_norm"]["scale"], p["batch_norm"]["offset"]),
    rule=_reference.debiased_ema_rule(hidden_mean, hidden_var, HAIKU_COUNTER0, decay),
    note=note,
  )


def _channels_first(array: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.moveaxis(array, -1, 1)) if array.ndim > 2 else array


def _channels_last(array: np.ndarray) -> np.ndarray:
  return np.moveaxis(array, 1, -1) if array.ndim > 2 else array


def build_equinox(case: Case, data: CaseData) -> Prepared:
  import equinox as eqx  # pylint: disable=g-import-not-at-top

  # Equinox's layer sees one example, channels first ((C,) or (C, H, W)), under a vmap whose axis_name it is
  # given; its state lives in a separate eqx.nn.State. mode="batch" is the usual batch norm (mode="ema"
  # normalises with the running averages in training).
  x = jnp.asarray(_channels_first(data.x))
  g = jnp.asarray(_channels_first(data.cotangent))
  model, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
    data.scale.shape[0], axis_name="batch", eps=data.epsilon, momentum=data.decay, mode="batch"
  )
  state = state.set(model.batch_state_index, (jnp.asarray(data.mean0), jnp.asarray(data.var0)))
  params = (jnp.asarray(data.scale), jnp.asarray(data.bias))

  def forward(x, params, state):
    layer = eqx.tree_at(lambda m: (m.weight, m.bias), model, params)
    y, new_state = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    return y.astype(x.dtype), new_state  # float32 parameters promote the output; cast back like the peers

  return jax_prepared(
    case,
    forward,
    x,
    params,
    state,
    g,
    running=lambda s: s.get(model.batch_state_index),
    param_grads=lambda p: p,
    to_canonical=_channels_last,
    rule=_reference.ema_rule(data.mean0, data.var0, data.decay),
    note="vmap(axis_name), channels first" if len(case.shape) > 2 else "vmap(axis_name)",
  )


def tuple_state_prepared(case: Case, data: CaseData, forward: Callable, note: str = "") -> Prepared:
  """A feature-last `forward(x, (scale, bias), (mean, var)) -> (y, (mean, var))` on the case's data, whose
  running statistics follow the EMA rule."""
  x, g = _device_inputs(data)
  params = (jnp.asarray(data.scale), jnp.asarray(data.bias))
  state = (jnp.asarray(data.mean0), jnp.asarray(data.var0))
  return jax_prepared(
    case,
    forward,
    x,
    params,
    state,
    g,
    running=lambda s: s,
    param_grads=lambda p: p,
    rule=_reference.ema_rule(data.mean0, data.var0, data.decay),
    note=note,
  )


def build_jnp(case: Case, data: CaseData) -> Prepared:
  """Plain jax.numpy, two-pass float32 statistics, gradient by autodiff: what a user would write by hand."""

  def forward(x, params, state):
    scale, bias = params
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes)
    y = (x32 - mean) * (jax.lax.rsqrt(var + data.epsilon) * scale) + bias
    running_mean, running_var = state
    new_state = (data.decay * running_mean + (1 - data.decay) * mean, data.decay * running_var + (1 - data.decay) * var)
    return y.astype(x.dtype), new_state

  return tuple_state_prepared(case, data, forward)


def build_floor(case: Case, data: CaseData) -> Prepared:
  """A jitted elementwise pass over 2 (fwd) or 5 (fwd_bwd) arrays of x's size and dtype: the bandwidth floor."""
  x, g = _device_inputs(data)
  if case.mode == "fwd":
    jitted = jax.jit(lambda x: x * 1.5 + 0.25)  # read 1, write 1
    args = (x,)
  else:
    # The fewest bytes a forward+backward must move when y is not kept: read x (statistics), read x and g
    # (the two backward sums), read x and g and write dx. As one kernel: read 4 distinct arrays, write 1.
    # (Two outputs would not do: XLA:CPU gives each its own loop, rereading the shared inputs.)
    h = jnp.asarray(data.x) + jnp.asarray(1, x.dtype)  # distinct buffers
    k = jnp.asarray(data.cotangent) + jnp.asarray(1, x.dtype)
    jitted = jax.jit(lambda x, g, h, k: x * g + h * k)  # read 4, write 1
    args = (x, g, h, k)
  compile_s = _harness.compile_seconds(jitted, *args)
  return Prepared(
    call=lambda: jax.block_until_ready(jitted(*args)),
    outputs=None,
    running_rule=None,
    compile_s=compile_s,
    note=f"{2 if case.mode == 'fwd' else 5} arrays",
    jitted=jitted,
    args=args,
  )


# ---------------------------------------------------------------------------------------------------------------
# PyTorch (CPU, eager). Modules update their running buffers in place, so outputs are read right after the
# first call, from the initial buffers.


def _torch_layout_supported(layout: str) -> Callable[[Case], bool]:
  return lambda case: (len(case.shape) == 2) == (layout == "nd")


def _torch_device(torch) -> str:
  """PyTorch runs where JAX runs: on CUDA when JAX's default backend is a GPU and this PyTorch build has CUDA,
  so that both libraries are timed on the same processor."""
  return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _build_torch(case: Case, data: CaseData, *, layout: str, threads: int | None = None) -> Prepared:
  """PyTorch eager; `threads` None means one intra-op thread per usable core (PyTorch's default).

  On a GPU (see `_torch_device`) the module and tensors live on CUDA, each call ends with
  `torch.cuda.synchronize()` (as JAX's calls end with `block_until_ready`) and `threads` is irrelevant.
  """
  import torch  # pylint: disable=g-import-not-at-top

  device = _torch_device(torch)
  synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  threads = threads or len(os.sched_getaffinity(0))
  setup = functools.partial(torch.set_num_threads, threads)
  setup()
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.dtype]
  features = data.scale.shape[0]
  module_cls = torch.nn.BatchNorm1d if layout == "nd" else torch.nn.BatchNorm2d
  # PyTorch's momentum is the weight of the new batch: 1 - decay.
  module = module_cls(features, eps=data.epsilon, momentum=1.0 - data.decay)
  with torch.no_grad():
    module.weight.copy_(torch.from_numpy(data.scale))
    module.bias.copy_(torch.from_numpy(data.bias))
    module.running_mean.copy_(torch.from_numpy(data.mean0))
    module.running_var.copy_(torch.from_numpy(data.var0))
  module.to(device).train()

  def to_torch(array: np.ndarray):
    tensor = torch.from_numpy(np.asarray(array, np.float32)).to(device=device, dtype=torch_dtype)
    if layout == "nchw":
      tensor = tensor.permute(0, 3, 1, 2).contiguous()
    elif layout == "channels_last":
      tensor = tensor.permute(0, 3, 1, 2)  # an NCHW view with channels-last strides: no copy
      assert tensor.is_contiguous(memory_format=torch.channels_last)
    return tensor

  def canonical(tensor) -> np.ndarray:
    if layout != "nd":
      tensor = tensor.permute(0, 2, 3, 1)
    return tensor.detach().float().cpu().numpy().astype(np.float64)

  x = to_torch(data.x)
  g = to_torch(data.cotangent)

  def running() -> dict[str, np.ndarray]:
    return {
      "mean": module.running_mean.double().cpu().numpy().copy(),
      "var": module.running_var.double().cpu().numpy().copy(),
    }

  if case.mode == "fwd":

    def call():
      with torch.no_grad():
        y = module(x)
      synchronize()
      return y

    def outputs(y):
      return {"y": canonical(y), **running()}
  else:
    x = x.detach().requires_grad_(True)

    def call():
      x.grad = module.weight.grad = module.bias.grad = None
      module(x).backward(g)
      synchronize()
      return x.grad, module.weight.grad, module.bias.grad

    def outputs(result):
      dx, dscale, dbias = result
      return {
        "dx": canonical(dx),
        "dscale": dscale.double().cpu().numpy(),
        "dbias": dbias.double().cpu().numpy(),
        **running(),
      }

  note = {"nd": "BatchNorm1d", "nchw": "BatchNorm2d NCHW", "channels_last": "BatchNorm2d channels_last"}[layout]
  return Prepared(
    call=call,
    outputs=outputs,
    running_rule=_reference.ema_rule(data.mean0, data.var0, data.decay, unbiased_var=True),
    note=(f"{note}, CUDA" if device == "cuda" else f"{note}, {threads} thread{'s' if threads > 1 else ''}"),
    setup=setup,
  )


class KnownDeviation(NamedTuple):
  """A peer's documented numerical deviation: reported on every run, but not a failure of the run.

  It covers only the named output arrays of the named implementation where `applies(case)`; any other array
  out of tolerance is still a FAIL, and a deviation that no longer occurs is reported as such. bnjax is never
  listed here.
  """

  implementation: str
  applies: Callable[[Case], bool]
  arrays: frozenset[str]
  reason: str


KNOWN_DEVIATIONS: tuple[KnownDeviation, ...] = (
  KnownDeviation(
    "haiku",
    lambda case: case.dtype == "bfloat16" and case.mode == "fwd_bwd" and len(case.shape) > 2,
    frozenset({"dscale", "dbias"}),
    "Haiku keeps scale and offset in the input dtype, so dscale and dbias are bfloat16 reductions over "
    "N*H*W; XLA:CPU lowers a bfloat16 reduction over several axes to a reduce-window tree that loses "
    "~20% here (over one axis it stays within 1%)",
  ),
)


def known_deviation(case: Case, implementation: str, failing: set[str]) -> KnownDeviation | None:
  for deviation in KNOWN_DEVIATIONS:
    if deviation.implementation == implementation and deviation.applies(case) and failing <= deviation.arrays:
      return deviation
  return None


IMPLEMENTATIONS: tuple[Implementation, ...] = (
  Implementation("bnjax", build_bnjax),
  Implementation("flax.linen", build_flax_linen),
  Implementation("flax.linen two-pass", build_flax_linen_two_pass),
  Implementation("flax.nnx", build_flax_nnx),
  Implementation("haiku", build_haiku),
  Implementation("equinox", build_equinox),
  Implementation("jnp+autodiff", build_jnp),
  # One intra-op thread per core is PyTorch's default and the spec; on a machine shared with other work,
  # OpenMP's all-threads barriers then wait for a descheduled thread (whole scheduler ticks), which a single
  # thread never does, so the 1-thread variants are timed too and "torch best" takes the faster.
  *(
    Implementation(
      f"torch{name}{' 1 thread' if threads == 1 else ''}",
      functools.partial(_build_torch, layout=layout, threads=threads),
      _torch_layout_supported(layout),
      family="torch",
    )
    for layout, name, threads in (
      ("nd", "", None),
      ("nd", "", 1),
      ("nchw", " NCHW", None),
      ("channels_last", " channels_last", None),
      ("nchw", " NCHW", 1),
      ("channels_last", " channels_last", 1),
    )
  ),
  Implementation(FLOOR, build_floor, family="floor"),
)


# ---------------------------------------------------------------------------------------------------------------
# Running a case and the whole benchmark.


@dataclasses.dataclass
class Row:
  """One implementation on one case: what results.json records."""

  case: str
  mode: str
  dtype: str
  shape: list[int]
  implementation: str
  family: str
  note: str
  median_ms: float | None = None
  p25_ms: float | None = None
  p75_ms: float | None = None
  rounds: int = 0
  x_flax: float | None = None
  x_torch_best: float | None = None
  torch_best: str | None = None
  x_floor: float | None = None
  faults_per_call: float | None = None
  compile_s: float | None = None
  compile_method: str | None = None
  first_call_ms: float | None = None
  load_average: float | None = None  # 1-minute load average when the case started: > cores means contention
  check: str = "n/a"  # "pass" | "FAIL" | "known deviation" (a listed peer) | "n/a" (the floor) | "ERROR"
  max_errors: dict[str, float] = dataclasses.field(default_factory=dict)
  error: str | None = None


@functools.lru_cache(maxsize=1)
def _case_inputs(shape: tuple[int, ...], dtype: str, seed: int) -> tuple[CaseData, _reference.Reference]:
  """The inputs and float64 reference of one shape and dtype, which its fwd and fwd_bwd cases share (`main`
  runs them one after the other): at GPU sizes the reference alone takes tens of seconds."""
  data = make_case_data(Case(shape, dtype, "fwd"), seed)
  return data, _reference.batch_norm_reference(data.x, data.scale, data.bias, data.cotangent, epsilon=data.epsilon)


def run_case(
  case: Case, implementations: Sequence[Implementation], *, rounds: int, warmup: int, seed: int = 0
) -> list[Row]:
  """Builds, checks and times every implementation that supports `case`; returns one Row each."""
  data, reference = _case_inputs(case.shape, case.dtype, seed)
  tolerance = _reference.TOLERANCE[case.dtype]
  load_average = os.getloadavg()[0]
  rows, calls, setups = {}, {}, {}
  for impl in implementations:
    if not impl.supports(case):
      continue
    row = Row(
      case=case.label,
      mode=case.mode,
      dtype=case.dtype,
      shape=list(case.shape),
      implementation=impl.name,
      family=impl.family,
      note="",
      load_average=load_average,
    )
    rows[impl.name] = row
    try:
      prepared = impl.build(case, data)
      row.note = prepared.note
      if prepared.setup is not None:
        prepared.setup()
      start = time.perf_counter()
      result = prepared.call()
      row.first_call_ms = (time.perf_counter() - start) * 1e3
      if prepared.outputs is not None:
        want = expected_outputs(case, data, reference, prepared.running_rule)
        ok, errors = _reference.compare(prepared.outputs(result), want, tolerance)
        row.check, row.max_errors = ("pass" if ok else "FAIL"), errors
        deviation = known_deviation(case, impl.name, {k for k, e in errors.items() if e > tolerance})
        if not ok and deviation is not None:
          row.check, row.error = "known deviation", deviation.reason
      if prepared.compile_s is not None:
        row.compile_s, row.compile_method = prepared.compile_s, "lower+compile"
      calls[impl.name] = prepared.call
      if prepared.setup is not None:
        setups[impl.name] = prepared.setup
    except Exception as error:  # pylint: disable=broad-except
      # A peer that cannot run a case is a result to report, not a reason to lose the other numbers.
      row.check, row.error = "ERROR", f"{type(error).__name__}: {error}"
  samples = _harness.round_robin(calls, rounds=rounds, warmup=warmup, seed=seed, setups=setups)
  torch_names = [name for name in samples if rows[name].family == "torch"]
  torch_best = min(torch_names, key=lambda n: samples[n].median_s) if torch_names else None
  for name, sample in samples.items():
    row = rows[name]
    row.rounds = len(sample.seconds)
    row.median_ms = sample.median_s * 1e3
    row.p25_ms, row.p75_ms = sample.quantile_s(0.25) * 1e3, sample.quantile_s(0.75) * 1e3
    row.faults_per_call = sample.faults_per_call
    if row.compile_s is None and row.first_call_ms is not None:
      row.compile_s, row.compile_method = (row.first_call_ms - row.median_ms) / 1e3, "first call - steady"
    if BASELINE in samples:
      row.x_flax = _harness.median_ratio(sample, samples[BASELINE])
    if torch_best is not None:
      row.x_torch_best, row.torch_best = _harness.median_ratio(sample, samples[torch_best]), torch_best
    if FLOOR in samples:
      row.x_floor = _harness.median_ratio(sample, samples[FLOOR])
  return list(rows.values())


def cases_for(shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str], modes: Sequence[str]) -> list[Case]:
  return [Case(tuple(shape), dtype, mode) for mode in modes for dtype in dtypes for shape in shapes]


HEADERS = (
  "case",
  "implementation",
  "ms (median)",
  "p25-p75",
  "x flax.linen",
  "x torch best",
  "x floor",
  "faults/call",
  "compile s",
  "check (max rel err)",
)


def _row_cells(row: Row) -> list[str]:
  spread = "-" if row.p25_ms is None else f"{_harness.fmt_ms(row.p25_ms / 1e3)}-{_harness.fmt_ms(row.p75_ms / 1e3)}"
  worst = max(row.max_errors.values()) if row.max_errors else None
  check = row.check if worst is None else f"{row.check} ({worst:.1e})"
  if row.check == "ERROR":
    check = f"ERROR: {row.error[:80]}"
  name = row.implementation + (f" ({row.note})" if row.note else "")
  return [
    row.case,
    name,
    _harness.fmt_ms(None if row.median_ms is None else row.median_ms / 1e3),
    spread,
    _harness.fmt_ratio(row.x_flax),
    _harness.fmt_ratio(row.x_torch_best),
    _harness.fmt_ratio(row.x_floor),
    "-" if row.faults_per_call is None else f"{row.faults_per_call:.0f}",
    "-" if row.compile_s is None else f"{row.compile_s:.2f}",
    check,
  ]


TARGETS = (  # (mode, column, bound, description, backends or None for all), judged in float32 and bfloat16
  ("fwd", "x_flax", 1.0, "fwd <= 1.0 x flax.linen (one-pass variance)", None),
  ("fwd_bwd", "x_flax", 0.9, "fwd+bwd <= 0.9 x flax.linen", None),
  ("fwd_bwd", "x_torch_best", 1.0, "fwd+bwd <= 1.0 x torch best layout", None),
  ("fwd_bwd", "x_floor", 1.2, "fwd+bwd <= 1.2 x the HBM floor", ("gpu",)),
)
TARGET_DTYPES = ("float32", "bfloat16")


def targets(rows: Sequence[Row], backend: str | None = None) -> list[dict[str, Any]]:
  """The project's targets for bnjax, judged per shape and dtype on `backend` (default: JAX's default backend)."""
  if backend is None:
    import jax  # pylint: disable=g-import-not-at-top

    backend = jax.default_backend()
  verdicts = []
  for mode, column, bound, description, backends in TARGETS:
    if backends is not None and backend not in backends:
      continue
    for row in rows:
      if row.implementation not in BNJAX or row.mode != mode or row.dtype not in TARGET_DTYPES:
        continue
      value = getattr(row, column)
      verdicts.append(
        {
          "target": description,
          "implementation": row.implementation,
          "shape": row.shape,
          "dtype": row.dtype,
          "ratio": value,
          "bound": bound,
          "met": None if value is None else value <= bound,
        }
      )
  return verdicts


def render(rows: Sequence[Row], verdicts: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
  lines = [f"Machine: {_harness.machine_line(info)}", f"Command: `{info['command']}`", ""]
  lines.append(_harness.markdown_table(HEADERS, [_row_cells(row) for row in rows]))
  if verdicts:
    lines += [
      "",
      _harness.markdown_table(
        ("target", "implementation", "shape", "dtype", "ratio", "met"),
        [
          (
            v["target"],
            v["implementation"],
            "x".join(map(str, v["shape"])),
            v["dtype"],
            _harness.fmt_ratio(v["ratio"]),
            {True: "yes", False: "NO", None: "-"}[v["met"]],
          )
          for v in verdicts
        ],
      ),
    ]
  failures = [row for row in rows if row.check in ("FAIL", "ERROR")]
  if failures:
    lines += ["", "CORRECTNESS FAILURES:"]
    lines += [f"  {row.case} {row.implementation}: {row.error or row.max_errors}" for row in failures]
  deviations = [row for row in rows if row.check == "known deviation"]
  if deviations:
    lines += ["", "Known deviations of peers from the float64 reference (beyond tolerance, not a run failure):"]
    lines += [f"  {row.case} {row.implementation}: {_worst(row)}; {row.error}" for row in deviations]
  return "\n".join(lines)


def _worst(row: Row) -> str:
  return ", ".join(
    f"{name} {error:.1e}" for name, error in row.max_errors.items() if error > _reference.TOLERANCE[row.dtype]
  )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.split("\n")[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="tiny shapes and few rounds: checks correctness in seconds, says nothing about speed",
  )
  parser.add_argument(
    "--out", default=os.path.join("benchmarks", "out", "ops"), help="directory for results.json and results.md"
  )
  parser.add_argument(
    "--only", default="", help="comma-separated implementation names to run (the floor and flax.linen are kept)"
  )
  parser.add_argument("--rounds", type=int, default=None, help="timed calls per implementation (default 31)")
  parser.add_argument(
    "--shapes", default="", help="comma-separated shapes like 4096x1024,64x32x32x64 (default: the full or quick set)"
  )
  parser.add_argument("--dtypes", default=",".join(DTYPES))
  parser.add_argument("--modes", default=",".join(MODES))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--prototypes", action="store_true", help="also run the alternative formulations in benchmarks/prototypes.py"
  )
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, implementations: Sequence[Implementation] = IMPLEMENTATIONS) -> int:
  """Runs the benchmark; returns 0, or 1 if any implementation failed its correctness check."""
  args = parse_args(argv)
  if args.prototypes:
    from benchmarks import prototypes  # pylint: disable=g-import-not-at-top

    implementations = tuple(implementations) + prototypes.IMPLEMENTATIONS
  if args.only:
    wanted = set(args.only.split(",")) | {BASELINE, FLOOR}
    unknown = wanted - {impl.name for impl in implementations}
    if unknown:
      raise ValueError(
        f"--only: unknown implementations {sorted(unknown)}; expected names from "
        f"{[impl.name for impl in implementations]}"
      )
    implementations = [impl for impl in implementations if impl.name in wanted]
  shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
  if args.shapes:
    shapes = [tuple(int(d) for d in shape.split("x")) for shape in args.shapes.split(",")]
  rounds = args.rounds or (3 if args.quick else 31)
  warmup = 1 if args.quick else 3
  info = _harness.machine_info()
  info["backend"] = jax.default_backend()
  rows = []
  cases = cases_for(shapes, args.dtypes.split(","), args.modes.split(","))
  # Run the cases of one shape and dtype together, so that they share one reference; report in `cases` order.
  for case in sorted(cases, key=lambda case: (case.shape, case.dtype)):
    case_rows = run_case(case, implementations, rounds=rounds, warmup=warmup, seed=args.seed)
    for row in case_rows:
      if row.check in ("FAIL", "ERROR"):
        print(
          f"!!! CORRECTNESS {row.check}: {case.label} {row.implementation}: {row.error or row.max_errors}",
          file=sys.stderr,
          flush=True,
        )
      elif row.check == "known deviation":
        print(
          f"!!! known deviation: {case.label} {row.implementation}: {_worst(row)} ({row.error})",
          file=sys.stderr,
          flush=True,
        )
    for deviation in KNOWN_DEVIATIONS:
      if deviation.applies(case) and any(
        r.implementation == deviation.implementation and r.check == "pass" for r in case_rows
      ):
        print(
          f"note: the known deviation of {deviation.implementation} did not occur in {case.label}; "
          "it may have been fixed",
          file=sys.stderr,
          flush=True,
        )
    rows += case_rows
    # Progress on stderr, each case's rows included, so a run stopped part-way still leaves its numbers.
    print(
      f"done: {case.label}\n{_harness.markdown_table(HEADERS, [_row_cells(r) for r in case_rows])}",
      file=sys.stderr,
      flush=True,
    )
  order = {case.label: index for index, case in enumerate(cases)}
  rows.sort(key=lambda row: order[row.case])
  verdicts = targets(rows, info["backend"])
  info["load_average_end"] = os.getloadavg()
  markdown = render(rows, verdicts, info)
  print(markdown)
  failed = any(row.check in ("FAIL", "ERROR") for row in rows)
  payload = {
    "benchmark": "ops",
    "quick": args.quick,
    "rounds": rounds,
    "warmup": warmup,
    "machine": info,
    "tolerance": _reference.TOLERANCE,
    "rows": [dataclasses.asdict(row) for row in rows],
    "targets": verdicts,
    "all_checks_passed": not failed,
  }
  _harness.write_results(args.out, payload, markdown)
  if failed:
    print("!!! at least one implementation disagrees with the float64 reference (see above)", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
