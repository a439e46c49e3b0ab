"""Tests of experiments.checkpoint: whole-state round trips, keep-last-k, atomic saves, bit-identical resume."""

import builtins
import functools
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax.nn
import experiments.data
from bnjax import training
from experiments import checkpoint

BATCH = 32
SEED = 3


class Net(nn.Module):
  """Dense -> BatchNorm -> relu -> Dropout -> Dense: the dropout makes the result depend on the rng."""

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Dense(32, use_bias=False)(x)
    x = bnjax.nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(x))
    return nn.Dense(10)(x)


MODEL = Net()
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3))  # nested optimizer state, with a count


@pytest.fixture(scope="module")
def data():
  return experiments.data.load_dataset("digits", seed=0)


@functools.cache
def _initial_state(seed):
  return training.create_train_state(MODEL, TX, np.zeros((1, 64), np.float32), rng=jax.random.key(seed))


def fresh_state(data, seed=SEED):
  """A new state at step 0 (copies: the training step donates its input)."""
  return jax.tree.map(jnp.copy, _initial_state(seed))


@functools.cache
def step_fn():
  return training.make_train_step(MODEL, TX)


def raw(tree):
  """Every leaf as numpy, keys as their uint32 data: what must survive a round trip bit for bit."""
  return [
    np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a)
    for a in jax.tree.leaves(tree)
  ]


def assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(raw(a), raw(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def train(state, data, start, stop):
  for step in range(start, stop):
    state, _ = step_fn()(state, experiments.data.batch_at(data.train, BATCH, step, seed=SEED))
  return state


def test_round_trip_keeps_every_leaf_and_extra(data, tmp_path):
  state = train(fresh_state(data), data, 0, 3)
  path = checkpoint.save(tmp_path / "ckpt", state, step=3, extra={"data_seed": SEED, "note": "after 3"})
  assert path == (tmp_path / "ckpt" / "3").absolute() and path.is_dir()
  restored, extra = checkpoint.restore(tmp_path / "ckpt", fresh_state(data))
  assert extra == {"data_seed": SEED, "note": "after 3"}
  assert isinstance(restored, training.TrainState)
  assert jnp.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
  assert_bit_identical(restored, state)
  # The restored state is a working state: the next step runs from it.
  step_fn()(restored, experiments.data.batch_at(data.train, BATCH, 3, seed=SEED))


@pytest.mark.devices(8)
def test_restore_takes_the_targets_placement(data, tmp_path):
  state = fresh_state(data)
  checkpoint.save(tmp_path, state, step=0)
  mesh = training.batch_mesh()
  restored, extra = checkpoint.restore(tmp_path, training.replicate(state, mesh))
  assert extra == {}
  kernel = restored.params["Dense_0"]["kernel"]
  assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
  assert_bit_identical(restored, state)


def test_keeps_the_last_k_and_restores_any_kept_step(data, tmp_path):
  state = fresh_state(data)
  for step in range(5):
    checkpoint.save(tmp_path, state._replace(step=jnp.int32(step)), step=step, extra={"step": step}, keep=2)
  assert checkpoint.all_steps(tmp_path) == [3, 4]
  assert checkpoint.latest_step(tmp_path) == 4
  assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
  restored, extra = checkpoint.restore(tmp_path, state, step=3)
  assert int(restored.step) == 3 and extra == {"step": 3}
  with pytest.raises(FileNotFoundError, match="saved steps: \\[3, 4\\]"):
    checkpoint.restore(tmp_path, state, step=1)


def test_save_writes_a_temporary_folder_then_renames_it(data, tmp_path, monkeypatch):
  """Atomicity: the step folder appears by one rename of a complete temporary folder."""
  renames = []
  real_rename = os.rename

  def spy(src, dst, *args, **kwargs):
    src_path = pathlib.Path(src)
    contents = sorted(p.name for p in src_path.iterdir()) if src_path.is_dir() else None
    renames.append((src_path, pathlib.Path(dst), contents))
    return real_rename(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, "rename", spy)
  checkpoint.save(tmp_path, fresh_state(data), step=7)
  final = [r for r in renames if r[1] == tmp_path.absolute() / "7"]
  assert len(final) == 1, renames
  src, _, contents = final[0]
  assert ".orbax-checkpoint-tmp" in src.name
  assert {"state", "extra", "commit_success.txt"} <= set(contents)
  assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_an_interrupted_save_is_invisible(data, tmp_path):
  """A temporary folder left by a save that died is neither the latest step nor restorable."""
  state = fresh_state(data)
  checkpoint.save(tmp_path, state, step=1)
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "half-written").write_bytes(b"\0" * 10)
  assert checkpoint.latest_step(tmp_path) == 1
  restored, _ = checkpoint.restore(tmp_path, state)
  assert int(restored.step) == 0
  with pytest.raises(FileNotFoundError):
    checkpoint.restore(tmp_path, state, step=2)
  checkpoint.save(tmp_path, state, step=2)  # the step can still be written
  assert checkpoint.all_steps(tmp_path) == [1, 2]


def test_resume_is_bit_identical_to_an_uninterrupted_run(data, tmp_path):
  """Stop at step 6, restore into a fresh state, run to 12: the same bits as 12 steps in one go."""
  uninterrupted = train(fresh_state(data), data, 0, 12)

  first_leg = train(fresh_state(data), data, 0, 6)
  checkpoint.save(tmp_path, first_leg, step=int(first_leg.step), extra={"data_seed": SEED})
  del first_leg

  start = checkpoint.latest_step(tmp_path)
  # A different key: everything that matters must come from the checkpoint, including the rng.
  target = fresh_state(data, seed=SEED + 1)
  restored, extra = checkpoint.restore(tmp_path, target)
  assert start == 6 and int(restored.step) == 6
  resumed = train(restored, data, start, 12)
  assert_bit_identical(resumed, uninterrupted)
  # The check has teeth: the same resume with the fresh state's rng (dropout masks) ends elsewhere.
  lost_rng = train(checkpoint.restore(tmp_path, target)[0]._replace(rng=target.rng), data, start, 12)
  assert not np.array_equal(raw(lost_rng.params)[0], raw(uninterrupted.params)[0])


def test_argument_errors(data, tmp_path):
  state = fresh_state(data)
  assert checkpoint.latest_step(tmp_path / "missing") is None
  assert not (tmp_path / "missing").exists()  # asking does not create it
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.restore(tmp_path / "missing", state)
  checkpoint.save(tmp_path, state, step=0)
  with pytest.raises(FileExistsError, match="step 0 already exists"):
    checkpoint.save(tmp_path, state, step=0)
  with pytest.raises(TypeError, match="extra must be JSON-serializable"):
    checkpoint.save(tmp_path, state, step=1, extra={"array": np.zeros(2)})
  with pytest.raises(TypeError, match="extra must be a dict"):
    checkpoint.save(tmp_path, state, step=1, extra=[1])
  with pytest.raises(ValueError, match="keep must be a positive int"):
    checkpoint.save(tmp_path, state, step=1, keep=0)
  with pytest.raises(ValueError, match="step must be a non-negative int"):
    checkpoint.save(tmp_path, state, step=-1)
  other = training.create_train_state(MODEL, optax.sgd(0.1), data.train.x[:1], rng=jax.random.key(0))
  with pytest.raises(ValueError, match="does not match target_state"):
    checkpoint.restore(tmp_path, other)


def test_missing_orbax_is_a_clear_error(monkeypatch, tmp_path):
  real_import = builtins.__import__

  def no_orbax(name, *args, **kwargs):
    if name.startswith("orbax"):
      raise ImportError(f"No module named {name!r}")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_orbax)
  with pytest.raises(ImportError, match=r"pip install 'bnjax\[experiments\]'"):
    checkpoint.save(tmp_path, {"a": jnp.ones(2)}, step=0)
