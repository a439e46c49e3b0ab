"""Each bad input raises an error that names the argument, what it got and what was expected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax


@pytest.fixture
def variables():
  return bnjax.init(4)


X = np.ones((8, 4), np.float32)


def test_params_feature_shape_mismatch(variables):
  _, stats = variables
  params, _ = bnjax.init(3)
  with pytest.raises(ValueError, match=r"`params.scale` has shape \(3,\).*feature shape \(4,\)"):
    bnjax.batch_norm(X, params, stats, train=True)


def test_stats_feature_shape_mismatch(variables):
  params, _ = variables
  _, stats = bnjax.init(5)
  with pytest.raises(ValueError, match=r"`stats.mean` has shape \(5,\).*bnjax.init\(\(4,\)\)"):
    bnjax.batch_norm(X, params, stats, train=False)


@pytest.mark.parametrize(
  "axis,match",
  [
    (2, r"`axis`=2 is out of range.*rank 2"),
    (-3, r"`axis`=-3 is out of range"),
    ((1, -1), r"`axis`=\(1, -1\) repeats an axis"),
    ((0, 1), r"`params.scale` has shape \(4,\).*feature shape \(8, 4\)"),
    (1.5, r"`axis` must be"),
  ],
)
def test_bad_axis(variables, axis, match):
  params, stats = variables
  with pytest.raises((ValueError, TypeError), match=match):
    bnjax.batch_norm(X, params, stats, train=True, axis=axis)


def test_batch_of_one_in_training(variables):
  params, stats = variables
  with pytest.raises(ValueError, match=r"1 value per feature.*train=False"):
    bnjax.batch_norm(X[:1], params, stats, train=True)
  y, _ = bnjax.batch_norm(X[:1], params, stats, train=False)  # inference is fine
  assert y.shape == (1, 4)


def test_batch_of_one_counted_across_the_mapped_axis(variables):
  params, stats = variables
  fn = jax.vmap(lambda x: bnjax.batch_norm(x, params, stats, train=True, axis_name="i")[0], axis_name="i")
  assert fn(np.ones((2, 1, 4), np.float32)).shape == (2, 1, 4)  # 2 rows in all: fine
  with pytest.raises(ValueError, match=r"1 value per feature.*across the 1 devices|1 value"):
    fn(np.ones((1, 1, 4), np.float32))


def test_non_floating_x(variables):
  params, stats = variables
  with pytest.raises(TypeError, match=r"`x` must have a floating or complex dtype.*int32"):
    bnjax.batch_norm(X.astype(np.int32), params, stats, train=True)


def test_mask_wrong_shape(variables):
  params, stats = variables
  with pytest.raises(ValueError, match=r"`mask` has shape \(3,\).*expected.*\(8,\).*broadcastable"):
    bnjax.batch_norm(X, params, stats, train=True, mask=np.ones(3, bool))


def test_mask_wrong_dtype(variables):
  params, stats = variables
  with pytest.raises(TypeError, match=r"`mask` must be a boolean array.*float32"):
    bnjax.batch_norm(X, params, stats, train=True, mask=np.ones(8, np.float32))


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_decay_out_of_range(variables, decay):
  params, stats = variables
  with pytest.raises(ValueError, match=r"`decay` must be in \[0, 1\]"):
    bnjax.batch_norm(X, params, stats, train=True, decay=decay)


def test_unbound_axis_name(variables):
  params, stats = variables
  with pytest.raises(NameError, match=r"`axis_name`='devices'.*not bound.*pmap.*shard_map.*vmap"):
    jax.jit(lambda x: bnjax.batch_norm(x, params, stats, train=True, axis_name="devices"))(X)


def test_bad_axis_index_groups(variables):
  params, stats = variables
  fn = lambda groups: jax.vmap(
    lambda x: bnjax.batch_norm(x, params, stats, train=True, axis_name="i", axis_index_groups=groups)[0], axis_name="i"
  )(np.ones((4, 2, 4)))
  with pytest.raises(ValueError, match=r"`axis_index_groups`.*cover each of the 4"):
    fn([[0, 1], [1, 2]])


def test_virtual_batch_size_must_divide_the_batch(variables):
  params, stats = variables
  with pytest.raises(ValueError, match=r"`virtual_batch_size`=3 does not divide.*8"):
    bnjax.batch_norm(X, params, stats, train=True, virtual_batch_size=3)


def test_running_rule(variables):
  params, stats = variables
  with pytest.raises(ValueError, match=r"`running` must be one of"):
    bnjax.batch_norm(X, params, stats, train=True, running="median")
  with pytest.raises(ValueError, match=r"`running`='cumulative' needs `stats.count`"):
    bnjax.batch_norm(X, params, stats._replace(count=None), train=True, running="cumulative")


def test_train_must_be_a_python_bool(variables):
  params, stats = variables
  with pytest.raises(TypeError, match=r"`train` must be a Python bool"):
    jax.jit(lambda t: bnjax.batch_norm(X, params, stats, train=t))(True)


def test_init_arguments():
  with pytest.raises(ValueError, match=r"`feature_shape`"):
    bnjax.init(0)
  with pytest.raises(TypeError, match=r"`dtype` must be a floating dtype"):
    bnjax.init(3, dtype=jnp.int32)


def test_normalize_statistics_shape():
  with pytest.raises(ValueError, match=r"`var` has shape \(3,\)"):
    bnjax.normalize(X, np.zeros(4), np.ones(3))


@pytest.mark.parametrize("epsilon", [0.0, -1e-5, jnp.float32(-1.0), np.float64(0.0), float("nan"), float("inf")])
def test_concrete_array_epsilon_is_checked(variables, epsilon):
  params, stats = variables
  with pytest.raises(ValueError, match=r"`epsilon` must be a finite float > 0"):
    bnjax.batch_norm(X, params, stats, train=True, epsilon=epsilon)


def test_traced_epsilon_is_refused(variables):
  params, stats = variables
  with pytest.raises(TypeError, match=r"`epsilon` must be a concrete float"):
    jax.jit(lambda e: bnjax.batch_norm(X, params, stats, train=True, epsilon=e))(1e-5)


@pytest.mark.parametrize("decay", [jnp.float32(1.5), np.float64(-0.5), "0.9", None])
def test_decay_values_and_types(variables, decay):
  params, stats = variables
  with pytest.raises((ValueError, TypeError), match=r"`decay` must be"):
    bnjax.batch_norm(X, params, stats, train=True, decay=decay)


def test_list_mask_is_named(variables):
  params, stats = variables
  with pytest.raises(TypeError, match=r"`mask` must be a boolean array.*int"):
    bnjax.batch_norm(X, params, stats, train=True, mask=[1, 0, 1, 1, 1, 1, 1, 1])
  y, _ = bnjax.batch_norm(X, params, stats, train=True, mask=[True] * 4 + [False] * 4)  # a bool list is fine
  assert y.shape == X.shape


@pytest.mark.parametrize("feature_shape", [np.int64(4), (np.int32(2), 2), [4]])
def test_init_takes_numpy_ints_and_lists(feature_shape):
  params, stats = bnjax.init(feature_shape)
  assert params.scale.size == 4 and stats.var.size == 4


@pytest.mark.parametrize("feature_shape", [True, 2.0, (), (2, -1), "4", None])
def test_init_refuses_other_shapes(feature_shape):
  with pytest.raises(ValueError, match=r"`feature_shape` must be a positive int"):
    bnjax.init(feature_shape)


def test_moments_of_no_values_are_nan():
  mean, var = bnjax.moments(X, mask=np.zeros(8, bool))
  assert np.all(np.isnan(mean)) and np.all(np.isnan(var))
  mean, var = bnjax.moments(np.ones((0, 4), np.float32))
  assert np.all(np.isnan(mean)) and np.all(np.isnan(var))


def test_one_true_row_has_zero_variance(variables):
  params, stats = variables
  mask = np.zeros(8, bool)
  mask[3] = True
  y, new_stats = bnjax.batch_norm(X * np.arange(8)[:, None], params, stats, train=True, mask=mask, decay=0.5)
  np.testing.assert_allclose(new_stats.var, 0.5)  # the running variance moves toward the batch's 0
  np.testing.assert_allclose(new_stats.mean, 1.5)
  assert np.all(np.isfinite(y))


def test_an_empty_batch_is_refused_even_when_one_is_allowed(variables):
  params, stats = variables
  with pytest.raises(ValueError, match=r"got 0 value per feature"):
    bnjax.batch_norm(np.ones((0, 4), np.float32), params, stats, train=True, allow_batch_of_one=True)
