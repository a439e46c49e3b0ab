"""Tests of bnjax.training: the step on one device and its three data-parallel forms over 8 host devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax.nn
from bnjax import models
from bnjax import training

NUM_STEPS = 20
GLOBAL_BATCH = 32
NUM_CLASSES = 3
TOL = dict(rtol=1e-5, atol=1e-5)


def make_model(axis_name=None):
  # Dense (no bias) -> BatchNorm -> relu -> Dense; momentum 0.9 so the running statistics move visibly.
  return models.MLP((16, NUM_CLASSES), norm="pre", momentum=0.9, axis_name=axis_name)


TX = optax.sgd(0.05, momentum=0.9)


def batches():
  """NUM_STEPS global batches with a large mean against the spread, so that statistics matter."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(NUM_STEPS, GLOBAL_BATCH, 5)) * 3.0 + 1.0).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, size=(NUM_STEPS, GLOBAL_BATCH)).astype(np.int32)
  return x, y


def initial_state():
  x, _ = batches()
  return training.create_train_state(make_model(), TX, x[0], rng=jax.random.key(0))


def host(tree):
  """Numpy copies of every leaf (keys as their raw data), for comparisons."""

  def leaf(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    return np.asarray(a)

  return jax.tree.map(leaf, tree)


def assert_trees_close(a, b, **tol):
  a, b = host(a), host(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **(tol or TOL))


def run(parallel, model, *, sync_batch_stats=True):
  """NUM_STEPS steps of `parallel` from the same initial state; returns (one-copy state, metrics per step)."""
  mesh = training.batch_mesh() if parallel in ("jit", "shard_map") else None
  per_device = parallel == "shard_map" and not sync_batch_stats
  state = initial_state()
  if parallel == "pmap":
    state = training.replicate(state)
  elif parallel is not None:
    state = training.replicate(state, mesh, per_device_batch_stats=per_device)
  step = training.make_train_step(model, TX, parallel=parallel, mesh=mesh, sync_batch_stats=sync_batch_stats)
  xs, ys = batches()
  history = []
  for x, y in zip(xs, ys):
    batch = (x, y)
    if parallel == "pmap":
      batch = training.shard_batch(batch)
    elif parallel is not None:
      batch = training.shard_batch(batch, mesh)
    state, metrics = step(state, batch)
    history.append(host(metrics))
  return state, history


@functools.cache
def reference():
  """One device on the global batch."""
  return run(None, make_model())


def test_create_train_state():
  x, _ = batches()
  model = make_model()
  state = training.create_train_state(model, TX, x[0], rng=jax.random.key(1))
  variables = model.init(
    dict(zip(("params", "dropout"), jax.random.split(jax.random.key(1), 3)[:2])), x[0], train=False
  )
  assert isinstance(state, training.TrainState)
  assert state.step.dtype == jnp.int32 and int(state.step) == 0
  assert_trees_close(state.params, variables["params"], rtol=0, atol=0)
  assert_trees_close(state.batch_stats, variables["batch_stats"], rtol=0, atol=0)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(TX.init(variables["params"]))
  np.testing.assert_array_equal(
    jax.random.key_data(state.rng), jax.random.key_data(jax.random.split(jax.random.key(1), 3)[2])
  )
  # A raw PRNGKey works too; anything else is refused with the argument's name.
  raw = training.create_train_state(model, TX, x[0], rng=jax.random.PRNGKey(1))
  assert raw.rng.shape == (2,)
  with pytest.raises(TypeError, match="rng"):
    training.create_train_state(model, TX, x[0], rng=1)


def test_one_step_is_the_textbook_update():
  """One step = value_and_grad of the mean loss in training mode, then the Optax update, step + 1."""
  model = make_model()
  state = initial_state()
  xs, ys = batches()

  def loss(params):
    logits, mutated = model.apply(
      {"params": params, "batch_stats": state.batch_stats}, xs[0], train=True, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, ys[0]).mean(), (logits, mutated)

  (want_loss, (logits, mutated)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state.params)
  updates, want_opt = TX.update(grads, state.opt_state, state.params)
  want_params = optax.apply_updates(state.params, updates)
  want_rng = jax.random.split(state.rng)[0]

  step = training.make_train_step(model, TX, donate=False)
  new, metrics = step(state, (xs[0], ys[0]))
  assert int(new.step) == 1
  assert_trees_close(new.params, want_params)
  assert_trees_close(new.opt_state, want_opt)
  assert_trees_close(new.batch_stats, mutated["batch_stats"])
  np.testing.assert_array_equal(jax.random.key_data(new.rng), jax.random.key_data(want_rng))
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(logits, -1) == ys[0]), rtol=1e-6)
  assert set(metrics) == {"loss", "accuracy"} and all(m.shape == () for m in metrics.values())
  # The running statistics really moved (the model is in training mode), and the input state is intact.
  assert not np.allclose(new.batch_stats["BatchNorm_0"]["mean"], state.batch_stats["BatchNorm_0"]["mean"])
  assert int(state.step) == 0


@pytest.mark.parametrize("parallel,axis_name", [("jit", None), ("shard_map", "batch"), ("pmap", "batch")])
@pytest.mark.devices(8)
def test_data_parallel_matches_one_device(parallel, axis_name):
  """20 steps over 8 devices = 20 steps of one device on the global batch (params, stats, optimizer, rng)."""
  want_state, want_history = reference()
  state, history = run(parallel, make_model(axis_name))
  if parallel == "pmap":
    replicas = host(state)
    for leaf in jax.tree.leaves(replicas):  # every replica is the same
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
    state = training.unreplicate(state)
  else:
    leaf = state.params["Dense_0"]["kernel"]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
  assert_trees_close(state, want_state)
  for got, want in zip(history, want_history):
    assert_trees_close(got, want)


@pytest.mark.devices(8)
def test_per_device_statistics_differ_from_global_batch():
  """A BatchNorm without axis_name under pmap normalizes each device's 4 rows with their own statistics."""
  want_state, want_history = reference()
  state, history = run("pmap", make_model(None), sync_batch_stats=False)
  mean = np.asarray(state.batch_stats["BatchNorm_0"]["mean"])
  assert mean.shape == (8, 16)
  assert not np.allclose(mean[0], mean[1], atol=1e-3)  # each device keeps its own running statistics
  for i in range(8):
    assert not np.allclose(mean[i], want_state.batch_stats["BatchNorm_0"]["mean"], atol=1e-3)
  params = training.unreplicate(state.params)
  assert not np.allclose(params["Dense_0"]["kernel"], want_state.params["Dense_0"]["kernel"], atol=1e-3)
  assert abs(history[-1]["loss"] - want_history[-1]["loss"]) > 1e-3
  # shard_map's per-device mode (statistics stacked along the mesh axis) is the same computation.
  sm_state, sm_history = run("shard_map", make_model(None), sync_batch_stats=False)
  assert sm_state.batch_stats["BatchNorm_0"]["mean"].shape == (8, 16)
  assert_trees_close(
    sm_state,
    state._replace(
      params=params, opt_state=training.unreplicate(state.opt_state), step=state.step[0], rng=state.rng[0]
    ),
  )
  for got, want in zip(sm_history, history):
    assert_trees_close(got, want)


@pytest.mark.devices(8)
def test_sync_batch_stats_averages_per_device_running_statistics():
  """Per-device normalization with sync_batch_stats=True: the running mean is the global one after a step.

  With equal shards the mean of the 8 device means is the global batch mean, so after one step the
  running mean equals one device's; the running variance (the mean of per-device variances) is smaller.
  """
  xs, ys = batches()
  state = initial_state()
  one = training.make_train_step(make_model(), TX, donate=False)(state, (xs[0], ys[0]))[0]
  step = training.make_train_step(make_model(None), TX, parallel="pmap", sync_batch_stats=True)
  new, _ = step(training.replicate(state), training.shard_batch((xs[0], ys[0])))
  stats = host(new.batch_stats["BatchNorm_0"])
  np.testing.assert_array_equal(stats["mean"], np.broadcast_to(stats["mean"][:1], stats["mean"].shape))
  np.testing.assert_allclose(stats["mean"][0], one.batch_stats["BatchNorm_0"]["mean"], **TOL)
  assert np.all(stats["var"][0] < np.asarray(one.batch_stats["BatchNorm_0"]["var"]))


@pytest.mark.parametrize("parallel", [None, "jit", "shard_map", "pmap"])
def test_eval_step(parallel):
  """Evaluation uses the running statistics, and every parallel form gives one device's metrics."""
  want_state, _ = reference()
  xs, ys = batches()
  logits = make_model().apply({"params": want_state.params, "batch_stats": want_state.batch_stats}, xs[1], train=False)
  want = {
    "loss": optax.softmax_cross_entropy_with_integer_labels(logits, ys[1]).mean(),
    "accuracy": np.mean(np.argmax(logits, -1) == ys[1]),
  }
  mesh = training.batch_mesh() if parallel in ("jit", "shard_map") else None
  model = make_model("batch" if parallel in ("shard_map", "pmap") else None)
  state, batch = want_state, (xs[1], ys[1])
  if parallel == "pmap":
    state, batch = training.replicate(state), training.shard_batch(batch)
  elif parallel is not None:
    state, batch = training.replicate(state, mesh), training.shard_batch(batch, mesh)
  metrics = training.make_eval_step(model, parallel=parallel, mesh=mesh)(state, batch)
  assert_trees_close(metrics, want)


def test_unjitted_step_vmaps_over_seeds():
  """jit=False gives the pure step: vmapped over 2 seeds it equals 2 separate runs."""
  xs, ys = batches()
  model = make_model()
  keys = jax.random.split(jax.random.key(7), 2)
  states = jax.jit(jax.vmap(lambda k: training.create_train_state(model, TX, xs[0], rng=k)))(keys)
  step = jax.jit(jax.vmap(training.make_train_step(model, TX, jit=False), in_axes=(0, None)))
  single = training.make_train_step(model, TX, donate=False)
  for i in range(2):
    states, metrics = step(states, (xs[i], ys[i]))
  for s, key in enumerate(keys):
    state = training.create_train_state(model, TX, xs[0], rng=key)
    for i in range(2):
      state, m = single(state, (xs[i], ys[i]))
    assert_trees_close(jax.tree.map(lambda a, s=s: a[s], states), state)
    assert_trees_close(jax.tree.map(lambda a, s=s: a[s], metrics), m)


class DropoutNet(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Dense(16)(x)
    x = bnjax.nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(NUM_CLASSES)(x)


def test_dropout_gets_a_fresh_key_every_step():
  """The state's rng feeds rngs={"dropout": ...}: the same batch twice gives two different losses."""
  xs, ys = batches()
  model = DropoutNet()
  state = training.create_train_state(model, optax.sgd(0.0), xs[0], rng=jax.random.key(0))
  step = training.make_train_step(model, optax.sgd(0.0))  # lr 0: only the dropout mask changes the loss
  state, first = step(state, (xs[0], ys[0]))
  state, second = step(state, (xs[0], ys[0]))
  assert float(first["loss"]) != float(second["loss"])
  evaluate = training.make_eval_step(model)
  np.testing.assert_array_equal(evaluate(state, (xs[0], ys[0]))["loss"], evaluate(state, (xs[0], ys[0]))["loss"])


def test_softmax_cross_entropy_and_accuracy():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
  labels = jnp.array([0, 2])
  want = -np.mean([jax.nn.log_softmax(logits[0])[0], jax.nn.log_softmax(logits[1])[2]])
  np.testing.assert_allclose(training.softmax_cross_entropy(logits, labels), want, rtol=1e-6)
  np.testing.assert_allclose(training.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 3)), want, rtol=1e-6)
  assert float(training.accuracy(logits, labels)) == 0.5
  assert training.accuracy(logits[:, :1], jnp.ones((2, 1))) is None  # regression targets: no accuracy
  with pytest.raises(ValueError, match="labels"):
    training.softmax_cross_entropy(logits, jnp.zeros((3,), jnp.int32))


@pytest.mark.devices(8)
def test_placement_helpers():
  mesh = training.batch_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  sharded = training.shard_batch(x, mesh)
  assert sharded.sharding.spec == jax.sharding.PartitionSpec("batch")
  np.testing.assert_array_equal(sharded, x)
  np.testing.assert_array_equal(training.shard_batch(x, mesh, process_local=True), x)  # one process
  stacked = training.shard_batch(x)
  assert stacked.shape == (8, 2, 3)
  np.testing.assert_array_equal(stacked.reshape(16, 3), x)
  assert training.process_batch_rows(16, mesh) == slice(0, 16)
  with pytest.raises(ValueError, match="divisible"):
    training.shard_batch(x[:12], mesh)
  with pytest.raises(ValueError, match="divisible"):
    training.shard_batch(x[:12])
  with pytest.raises(ValueError, match="divisible"):
    training.process_batch_rows(12, mesh)
  tree = {"a": jnp.ones(3)}
  assert training.replicate(tree)["a"].shape == (8, 3)
  np.testing.assert_array_equal(training.unreplicate(training.replicate(tree))["a"], tree["a"])
  with pytest.raises(ValueError, match="axis_name='model'"):
    training.replicate(tree, mesh, axis_name="model")


def test_replicated_state_survives_donation():
  """The placed copy is donated by the step; the state it was made from stays usable."""
  mesh = training.batch_mesh()
  state = initial_state()
  xs, ys = batches()
  step = training.make_train_step(make_model(), TX, parallel="jit", mesh=mesh)
  placed = training.replicate(state, mesh)
  step(placed, training.shard_batch((xs[0], ys[0]), mesh))
  assert all(a.is_deleted() for a in jax.tree.leaves(placed))
  assert not any(a.is_deleted() for a in jax.tree.leaves(state))


def test_argument_errors():
  model = make_model()
  with pytest.raises(ValueError, match="parallel must be one of"):
    training.make_train_step(model, TX, parallel="dp")
  with pytest.raises(ValueError, match="model.axis_name='batch' but parallel='jit'"):
    training.make_train_step(make_model("batch"), TX, parallel="jit")
  with pytest.raises(ValueError, match="must match the step's axis_name='data'"):
    training.make_train_step(make_model("batch"), TX, parallel="pmap", axis_name="data")
  with pytest.raises(ValueError, match="jit=False"):
    training.make_train_step(model, TX, parallel="pmap", jit=False)
  with pytest.raises(ValueError, match="axis_name='data'"):
    training.make_train_step(model, TX, parallel="jit", mesh=training.batch_mesh(), axis_name="data")
  with pytest.raises(TypeError, match="tx must be"):
    training.create_train_state(model, "sgd", np.ones((2, 5), np.float32), rng=jax.random.key(0))
  xs, ys = batches()
  step = training.make_train_step(model, TX, loss_fn=lambda logits, labels: jnp.zeros(3), donate=False)
  with pytest.raises(ValueError, match="scalar"):
    step(initial_state(), (xs[0], ys[0]))


GROUP_SIZE = 4  # two groups of 4 of the 8 devices


def run_grouped(parallel, num_steps=NUM_STEPS):
  """`run` on a 2-D mesh ("group", "batch"): BatchNorm statistics per group of GROUP_SIZE devices."""
  mesh = training.batch_mesh(group_size=GROUP_SIZE)
  model = make_model("batch" if parallel == "shard_map" else None)
  step = training.make_train_step(model, TX, parallel=parallel, mesh=mesh, group_axis="group")
  state = training.replicate(initial_state(), mesh)
  xs, ys = batches()
  for x, y in zip(xs[:num_steps], ys[:num_steps]):
    state, _ = step(state, training.shard_batch((x, y), mesh, axis_name=("group", "batch")))
  return state


def test_group_statistics_one_step_is_the_mean_of_each_group_alone():
  """One step with per-group statistics = the mean of one-device steps on each group's rows (SGD is linear)."""
  xs, ys = batches()
  step = training.make_train_step(make_model(), TX, donate=False)
  rows = GLOBAL_BATCH // 2
  alone = [
    step(initial_state(), (xs[0][g * rows : (g + 1) * rows], ys[0][g * rows : (g + 1) * rows]))[0] for g in (0, 1)
  ]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, alone[0]._replace(rng=None), alone[1]._replace(rng=None))
  for parallel in ("jit", "shard_map"):
    assert_trees_close(run_grouped(parallel, num_steps=1)._replace(rng=None), expected)


def test_group_statistics_agree_under_jit_and_shard_map():
  """20 steps: the vmapped sharded-jit step and shard_map's BatchNorm psum over "batch" agree, and differ
  from statistics over the whole batch."""
  by_jit, by_shard_map = run_grouped("jit"), run_grouped("shard_map")
  assert_trees_close(by_jit, by_shard_map)
  global_stats, _ = reference()
  moved = host(by_jit.batch_stats)["BatchNorm_0"]["mean"] - host(global_stats.batch_stats)["BatchNorm_0"]["mean"]
  assert np.abs(moved).max() > 1e-4


def test_group_axis_errors():
  mesh = training.batch_mesh(group_size=GROUP_SIZE)
  with pytest.raises(ValueError, match="group_axis='group' needs parallel='jit' or 'shard_map'"):
    training.make_train_step(make_model(), TX, parallel="pmap", group_axis="group")
  with pytest.raises(ValueError, match="group_axis='rows' must name a mesh axis"):
    training.make_train_step(make_model(), TX, parallel="jit", mesh=mesh, group_axis="rows")
  with pytest.raises(ValueError, match="group_size must be a positive divisor of the 8 devices, got 3"):
    training.batch_mesh(group_size=3)
