"""Test configuration: 8 host CPU devices, set before jax is first imported.

Tests run on the CPU unless JAX_PLATFORMS says otherwise (`JAX_PLATFORMS=cuda pytest ...` runs them on a GPU).
A test that needs several devices is marked `@pytest.mark.devices(n)` and is skipped, with the reason, where
fewer exist (a single GPU, say).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)
# The tests compare float32 numerics; GPUs would otherwise run float32 matmuls in TF32 (10-bit mantissa).
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  config.addinivalue_line("markers", "devices(n): the test needs at least n devices of the default backend")


def pytest_runtest_setup(item):
  for marker in item.iter_markers(name="devices"):
    needed = marker.args[0]
    if jax.device_count() < needed:
      pytest.skip(
        f"needs {needed} devices, {jax.device_count()} {jax.default_backend()} device(s) here; "
        "on the CPU (the default) conftest.py provides 8"
      )


@pytest.fixture(params=["platform", "one-pass"])
def formulation(request, monkeypatch):
  """The exact variance as the platform lowers it, and (on the CPU) the GPU/TPU one-pass form in its place."""
  if request.param == "one-pass":
    from bnjax._src import moments  # pylint: disable=g-import-not-at-top

    two_pass = moments.two_pass_moments
    monkeypatch.setattr(
      moments,
      "two_pass_moments",
      lambda x, mask, spec: (
        two_pass(x, mask, spec) if mask is not None else moments.shifted_moments(x, spec, separate_uses=True)
      ),
    )
  return request.param
