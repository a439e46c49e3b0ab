#!/usr/bin/env bash
# The GPU record (docs/performance.md, "GPU"): on a machine whose jax has CUDA,
#   bash benchmarks/gpu.sh [OUT_DIR]        (default benchmarks/out/gpu)
# 1. versions and a one-call smoke test of bnjax on the GPU;
# 2. the op benchmark at GPU sizes, bnjax (its one-pass variance) against flax.linen, flax.nnx, Equinox,
#    jnp+autodiff, PyTorch on CUDA (when the installed PyTorch has CUDA), the HBM bandwidth floor and the
#    two-pass prototype (bnjax's earlier form), every output checked in float64;
# 3. the accuracy of each formulation's batch statistics on the GPU (benchmarks/prototypes.py), and the
#    optimised-HLO anatomy of the forward and forward+backward (kernels, passes over memory);
# 4. the training step on the GPU at two batch sizes, bnjax and flax.linen layers against the prototypes'
#    (the guarded one-pass layer's lax.cond is a host round trip per layer that only a whole step shows);
# 5. the training step of a small ResNet-style CNN (NHWC, batch 256), bnjax against flax.linen layers: examples
#    per second, peak device memory and compile time;
# 6. the test suite's single-device tests on the GPU (tests needing 8 devices skip themselves).
# Each step writes its log to OUT_DIR and a failed step does not stop the later ones. GPU_ONLY, GPU_SHAPES,
# HLO_SHAPE, TRAIN_BATCHES and the *_TIMEOUT variables narrow a run; JAX_PLATFORMS=cpu runs the steps on the CPU
# (slowly at the GPU sizes).
set -u
out=${1:-benchmarks/out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
python=${PYTHON:-python3}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$python" - <<'PY'
import jax, jax.numpy as jnp, bnjax
print("jax", jax.__version__, jax.devices())
params, stats = bnjax.init(8)
y, stats = jax.jit(lambda x: bnjax.batch_norm(x, params, stats, train=True))(jnp.ones((4, 8)).at[0].set(3.0))
print("bnjax smoke:", y.devices(), float(y.sum()), stats.mean[:2])
PY
} 2>&1 | tee "$out/smoke.log" || exit 1
grep -q "bnjax smoke:" "$out/smoke.log" || exit 1

timeout "${OPS_TIMEOUT:-300}" "$python" -m benchmarks.ops --out "$out/ops" --prototypes \
  --shapes "${GPU_SHAPES:-65536x1024,256x56x56x256}" \
  --only "${GPU_ONLY:-bnjax,flax.linen two-pass,flax.nnx,equinox,jnp+autodiff,torch,torch NCHW,torch channels_last,proto: two-pass vjp,proto: batch-shifted one-pass vjp,proto: guarded one-pass vjp}" \
  2>&1 | tee "$out/ops.log"

timeout 60 "$python" -m benchmarks.prototypes --shape "${HLO_SHAPE:-65536,1024}" 2>&1 | tee "$out/accuracy.log"

timeout "${HLO_TIMEOUT:-45}" "$python" -m benchmarks.hlo --prototypes --shape "${HLO_SHAPE:-65536,1024}" \
  --only "bnjax,flax.linen,flax.linen two-pass,jnp+autodiff,proto: two-pass vjp,proto: batch-shifted one-pass vjp" 2>&1 | tee "$out/hlo.log"

for batch in ${TRAIN_BATCHES:-256 4096}; do
  timeout "${TRAIN_TIMEOUT:-90}" "$python" -m benchmarks.train --platform "$JAX_PLATFORMS" --prototypes \
    --batch-size "$batch" --out "$out/train_$batch" 2>&1 | tee "$out/train_$batch.log"
done

timeout "${TRAIN_CNN_TIMEOUT:-300}" "$python" -m benchmarks.train --model cnn --platform "$JAX_PLATFORMS" \
  --batch-size 256 --out "$out/train_cnn" 2>&1 | tee "$out/train_cnn.log"

XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "${TEST_TIMEOUT:-150}" "$python" -m pytest -q -p no:cacheprovider \
  -n "${TEST_WORKERS:-8}" --continue-on-collection-errors tests --ignore tests/test_docs.py --ignore tests/test_benchmarks.py \
  --ignore tests/test_experiments.py --ignore tests/test_launch.py 2>&1 | tee "$out/tests.log" | tail -40
