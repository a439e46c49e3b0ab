"""Tests for experiments.data: datasets, splits, standardization, IDX files, batching."""

import gzip
import itertools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import data

BUNDLED = ("digits", "breast_cancer", "wine", "age_salary")
# name: (rows, features, classes)
SIZES = {
  "digits": (1797, 64, 10),
  "breast_cancer": (569, 30, 2),
  "wine": (178, 13, 3),
  "age_salary": (4000, 5, 2),
}


def _all_rows(dataset):
  return (
    np.concatenate([dataset.train.x, dataset.val.x, dataset.test.x]),
    np.concatenate([dataset.train.y, dataset.val.y, dataset.test.y]),
  )


def _row_ids(split):
  """Splits whose x is arange(N)[:, None] name each row by its value."""
  return split.x[:, 0].astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Datasets.


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_dataset_shapes_dtypes_ranges(name):
  num_rows, num_features, num_classes = SIZES[name]
  dataset = data.load_dataset(name)
  assert isinstance(dataset, data.Dataset) and dataset.name == name
  assert dataset.num_classes == num_classes
  for split in (dataset.train, dataset.val, dataset.test):
    assert isinstance(split, data.Split)
    assert split.x.dtype == np.float32 and split.y.dtype == np.int32
    assert split.x.ndim == 2 and split.x.shape[1] == num_features
    assert split.y.shape == (split.x.shape[0],)
    assert np.isfinite(split.x).all()
  sizes = [len(s.y) for s in (dataset.train, dataset.val, dataset.test)]
  assert sum(sizes) == num_rows
  assert sizes[1] == round(0.15 * num_rows) and sizes[2] == round(0.15 * num_rows)
  _, y = _all_rows(dataset)
  assert set(np.unique(y)) == set(range(num_classes))
  if name == "digits":
    assert dataset.feature_names is None
  else:
    assert len(dataset.feature_names) == num_features
    assert all(isinstance(f, str) for f in dataset.feature_names)


def test_digits_pixels_scaled_to_unit_interval_and_unflattened_is_nhwc():
  flat = data.load_dataset("digits")
  x, _ = _all_rows(flat)
  assert x.min() == 0.0 and x.max() == 1.0
  # Raw pixels are integers 0..16, so 16 * x is integral.
  np.testing.assert_array_equal(16 * x, np.round(16 * x))
  images = data.load_dataset("digits", flatten=False)
  assert images.train.x.shape == (len(flat.train.y), 8, 8, 1)
  np.testing.assert_array_equal(images.train.x.reshape(len(images.train.y), -1), flat.train.x)
  np.testing.assert_array_equal(images.train.y, flat.train.y)


def test_unknown_name_lists_datasets():
  with pytest.raises(ValueError, match="name") as info:
    data.load_dataset("cifar10")
  assert all(known in str(info.value) for known in data.DATASETS)
  assert "digits" in data.DATASETS and "mnist" in data.DATASETS


def test_missing_scikit_learn_points_to_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` now raises ImportError.
  with pytest.raises(ImportError, match=r"bnjax\[experiments\]"):
    data.load_dataset("digits")
  assert data.load_dataset("age_salary").num_classes == 2  # Synthetic data needs no scikit-learn.


def test_importing_data_does_not_import_scikit_learn():
  code = "import sys, experiments.data; assert 'sklearn' not in sys.modules, 'sklearn imported eagerly'"
  subprocess.run(
    [sys.executable, "-c", code],
    check=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    cwd=pathlib.Path(__file__).resolve().parents[1],
  )  # the repository root, where experiments is


# ---------------------------------------------------------------------------------------------------------
# age_salary.


def test_age_salary_features_span_the_advertised_scales():
  dataset = data.load_dataset("age_salary")
  assert dataset.feature_names == ("age", "years_experience", "salary", "savings", "dependents")
  x, y = _all_rows(dataset)
  age, experience, salary, savings, dependents = x.T
  assert age.min() >= 18 and age.max() <= 100 and age.min() <= 20 and age.max() >= 98
  np.testing.assert_array_equal(age, np.round(age))
  assert (experience >= 0).all() and (experience <= age - 18 + 1e-3).all() and experience.max() > 50
  assert salary.min() >= 1e4 and salary.max() <= 1e6 and salary.min() < 2e4 and salary.max() > 5e5
  assert (savings >= 0).all() and savings.max() > 1e6
  np.testing.assert_array_equal(dependents, np.round(dependents))
  assert dependents.min() == 0 and dependents.max() <= 8
  # Scales differ by orders of magnitude: the point of the dataset.
  assert salary.std() / age.std() > 1e3
  assert 0.3 < y.mean() < 0.7  # Both classes well represented.


def test_age_salary_label_needs_more_than_one_feature():
  x, y = data.make_age_salary(seed=0)
  # No single threshold on one feature predicts the label well: the rule mixes features.
  for column in x.T:
    order = np.argsort(column, kind="stable")
    positives_below = np.concatenate([[0], np.cumsum(y[order])])
    below = np.arange(len(y) + 1)
    accuracy = (below - positives_below + (y.sum() - positives_below)) / len(y)
    assert max(accuracy.max(), 1 - accuracy.min()) < 0.8


def test_age_salary_is_deterministic_from_seed():
  a, b, c = (data.make_age_salary(seed=s) for s in (3, 3, 4))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


# ---------------------------------------------------------------------------------------------------------
# Splits.


@pytest.mark.parametrize("name", ["breast_cancer", "age_salary", "digits"])
def test_splits_are_deterministic_disjoint_and_cover_the_data(name):
  first, again, other = (data.load_dataset(name, seed=s) for s in (0, 0, 1))
  for part in ("train", "val", "test"):
    np.testing.assert_array_equal(getattr(first, part).x, getattr(again, part).x)
    np.testing.assert_array_equal(getattr(first, part).y, getattr(again, part).y)
  assert not np.array_equal(first.test.x, other.test.x)
  # The rows of these sets are distinct, so disjoint splits hold as many distinct rows as there are rows.
  x, _ = _all_rows(first)
  assert len(np.unique(x, axis=0)) == len(x) == SIZES[name][0]
  if name != "age_salary":  # Fixed data: another seed reshuffles the same rows. (age_salary is redrawn.)
    np.testing.assert_array_equal(np.unique(x, axis=0), np.unique(_all_rows(other)[0], axis=0))


def test_split_partition_by_row_identity():
  x = np.arange(1000, dtype=np.float32)[:, None]
  y = (np.arange(1000) % 7 == 0).astype(np.int32)
  train, val, test = data._split_three_ways(x, y, seed=5, val_fraction=0.2, test_fraction=0.1)
  ids = [_row_ids(s) for s in (train, val, test)]
  assert [len(i) for i in ids] == [700, 200, 100]
  np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(1000))
  for split, rows in zip((train, val, test), ids):
    np.testing.assert_array_equal(split.y, y[rows])


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine"])
def test_splits_are_stratified(name):
  dataset = data.load_dataset(name, seed=7, val_fraction=0.2, test_fraction=0.25)
  _, y = _all_rows(dataset)
  share = np.bincount(y) / len(y)
  for split in (dataset.train, dataset.val, dataset.test):
    counts = np.bincount(split.y, minlength=dataset.num_classes)
    np.testing.assert_array_less(np.abs(counts - share * len(split.y)), 2.0)


def test_zero_fractions_give_empty_splits_of_the_right_shape():
  dataset = data.load_dataset("wine", val_fraction=0.0, test_fraction=0.0)
  assert len(dataset.train.y) == 178
  assert dataset.val.x.shape == (0, 13) and dataset.test.y.shape == (0,)
  assert dataset.val.x.dtype == np.float32 and dataset.test.y.dtype == np.int32


@pytest.mark.parametrize(
  "kwargs, argument",
  [
    (dict(val_fraction=-0.1), "val_fraction"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(test_fraction=float("nan")), "test_fraction"),
    (dict(test_fraction="0.1"), "test_fraction"),
    (dict(val_fraction=0.5, test_fraction=0.5), "val_fraction \\+ test_fraction"),
    (dict(seed=-1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
  ],
)
def test_load_dataset_argument_errors_name_the_argument(kwargs, argument):
  with pytest.raises((ValueError, TypeError), match=argument):
    data.load_dataset("wine", **kwargs)


def test_fractions_leaving_no_training_rows_is_an_error():
  # 178 rows: round(89.0) + round(88.98) = 178 rows held out, although the fractions sum below 1.
  with pytest.raises(ValueError, match="no training rows"):
    data.load_dataset("wine", val_fraction=0.5, test_fraction=0.4999)


# ---------------------------------------------------------------------------------------------------------
# Standardization.


def test_standardize_is_fitted_on_train_only():
  rng = np.random.default_rng(0)
  train = rng.normal([5.0, -3.0, 1e4], [2.0, 0.1, 1e3], size=(500, 3)).astype(np.float32)
  held_out = rng.normal([9.0, 0.0, 2e4], [1.0, 1.0, 1.0], size=(50, 3)).astype(np.float32)
  train_s, held_out_s = data.standardize(train, held_out)
  assert train_s.dtype == np.float32 and held_out_s.dtype == np.float32
  np.testing.assert_allclose(train_s.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(train_s.std(0), 1.0, rtol=1e-5)
  mean, std = train.astype(np.float64).mean(0), train.astype(np.float64).std(0)
  np.testing.assert_allclose(held_out_s, (held_out - mean) / std, rtol=1e-5, atol=1e-5)
  # Fitted on train: the held-out rows are not centred.
  assert np.abs(held_out_s.mean(0)).min() > 1.0


def test_standardize_constant_features_become_zero():
  train = np.stack([np.full(10, 7.0), np.arange(10.0)], 1)
  other = np.array([[7.0, 3.0], [8.0, 3.0]])
  train_s, other_s = data.standardize(train, other)
  assert np.isfinite(train_s).all() and np.isfinite(other_s).all()
  np.testing.assert_array_equal(train_s[:, 0], 0.0)
  np.testing.assert_allclose(other_s[:, 0], [0.0, 1.0])


def test_standardize_works_per_pixel_on_images_and_checks_shapes():
  images = np.random.default_rng(1).random((20, 4, 4, 1))
  (out,) = data.standardize(images)
  assert out.shape == images.shape
  np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match=r"others\[1\]"):
    data.standardize(images, images[:3], images[:, :2])
  with pytest.raises(ValueError, match="train_x"):
    data.standardize(np.zeros((0, 3)))


def test_load_dataset_standardize_uses_train_statistics():
  raw = data.load_dataset("age_salary", seed=2)
  standardized = data.load_dataset("age_salary", seed=2, standardize=True)
  expected = data.standardize(raw.train.x, raw.val.x, raw.test.x)
  for split, want in zip((standardized.train, standardized.val, standardized.test), expected):
    np.testing.assert_array_equal(split.x, want)
  np.testing.assert_allclose(standardized.train.x.mean(0), 0.0, atol=1e-4)
  np.testing.assert_array_equal(standardized.test.y, raw.test.y)


# ---------------------------------------------------------------------------------------------------------
# IDX files.

IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("dtype", IDX_DTYPES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
  rng = np.random.default_rng(0)
  for shape in [(7, 5, 3), (11,), (2, 3, 4, 2)]:
    if np.issubdtype(dtype, np.integer):
      info = np.iinfo(dtype)
      array = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
      array = rng.normal(size=shape).astype(dtype)
    path = tmp_path / f"array-{len(shape)}{suffix}"
    data.write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = data.read_idx(str(path))
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # Writable, not a view of the file's bytes.


def test_read_idx_follows_the_byte_layout_of_the_format(tmp_path):
  # Written by hand from the format description: 00 00 0C 02, sizes 2 and 3, big-endian int32 data.
  raw = bytes([0, 0, 0x0C, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
  raw += b"".join(v.to_bytes(4, "big", signed=True) for v in [1, -2, 3, 256, 70000, -1])
  path = tmp_path / "hand.idx"
  path.write_bytes(raw)
  np.testing.assert_array_equal(data.read_idx(path), [[1, -2, 3], [256, 70000, -1]])
  data.write_idx(tmp_path / "again.idx", np.array([[1, -2, 3], [256, 70000, -1]], np.int32))
  assert (tmp_path / "again.idx").read_bytes() == raw


def test_read_idx_detects_gzip_by_magic_bytes_not_suffix(tmp_path):
  labels = np.arange(10, dtype=np.uint8)
  data.write_idx(tmp_path / "labels-without-suffix", labels, compress=True)
  data.write_idx(tmp_path / "raw-despite-suffix.gz", labels, compress=False)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "labels-without-suffix"), labels)
  np.testing.assert_array_equal(data.read_idx(tmp_path / "raw-despite-suffix.gz"), labels)


def _corruptions(valid: bytes):
  compressed = gzip.compress(valid)
  return {
    "truncated data": (valid[:-5], "truncated"),
    "truncated header": (valid[:6], "truncated"),
    "trailing bytes": (valid + b"\x00", "trailing"),
    "bad magic": (b"\x01\x02" + valid[2:], "not an IDX file"),
    "unknown type code": (valid[:2] + b"\x07" + valid[3:], "not an IDX file"),
    "empty": (b"", "not an IDX file"),
    "truncated gzip": (compressed[: len(compressed) // 2], "gzip"),
    "corrupt gzip": (compressed[:10] + b"\xff" * 20 + compressed[30:], "gzip"),
    "gzip of truncated data": (gzip.compress(valid[:-1]), "truncated"),
  }


@pytest.mark.parametrize("case", list(_corruptions(b"")))
def test_corrupt_idx_gives_a_clear_error(tmp_path, case):
  valid_path = tmp_path / "valid"
  data.write_idx(valid_path, np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
  content, message = _corruptions(valid_path.read_bytes())[case]
  path = tmp_path / "broken"
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message) as info:
    data.read_idx(path)
  assert "path" in str(info.value) and str(path) in str(info.value)


def test_write_idx_rejects_types_idx_cannot_hold(tmp_path):
  with pytest.raises(TypeError, match="array"):
    data.write_idx(tmp_path / "x", np.zeros(3, np.int64))
  with pytest.raises(FileNotFoundError):
    data.read_idx(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------
# MNIST-style loading.


def _write_mnist_dir(directory: pathlib.Path, *, num_train=60, num_test=20, gz=("train-images-idx3-ubyte",)):
  rng = np.random.default_rng(0)
  arrays = {
    "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
    "train-labels-idx1-ubyte": (np.arange(num_train) % 10).astype(np.uint8),
    "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
    "t10k-labels-idx1-ubyte": rng.permutation(np.arange(num_test) % 10).astype(np.uint8),
  }
  arrays["train-images-idx3-ubyte"][0] = 255  # Full range present.
  arrays["train-images-idx3-ubyte"][1] = 0
  directory.mkdir(parents=True, exist_ok=True)
  for stem, array in arrays.items():
    data.write_idx(directory / (stem + (".gz" if stem in gz else "")), array)
  return arrays


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_loads_from_idx_files(tmp_path, name):
  arrays = _write_mnist_dir(tmp_path)
  dataset = data.load_dataset(name, data_dir=tmp_path, val_fraction=0.2, seed=3)
  assert dataset.num_classes == 10 and dataset.feature_names is None
  assert dataset.train.x.shape == (48, 784) and dataset.val.x.shape == (12, 784)
  assert dataset.train.x.dtype == np.float32 and dataset.train.y.dtype == np.int32
  # t10k is the test split, in file order, pixels scaled to [0, 1].
  np.testing.assert_allclose(dataset.test.x, arrays["t10k-images-idx3-ubyte"].reshape(20, 784) / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(dataset.test.y, arrays["t10k-labels-idx1-ubyte"])
  assert dataset.train.x.min() == 0.0 and dataset.train.x.max() == 1.0
  # Val comes from train: together they are the training file's rows, stratified (6 per class, 1-2 in val).
  train_pixels = (arrays["train-images-idx3-ubyte"].reshape(60, 784) / 255.0).astype(np.float32)
  got = np.concatenate([dataset.train.x, dataset.val.x])
  np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(train_pixels, axis=0))
  assert set(np.bincount(dataset.val.y, minlength=10)) <= {1, 2}
  images = data.load_dataset(name, data_dir=tmp_path, val_fraction=0.2, seed=3, flatten=False)
  assert images.train.x.shape == (48, 28, 28, 1)
  np.testing.assert_array_equal(images.train.x.reshape(48, -1), dataset.train.x)


def test_mnist_without_data_dir_names_data_dir_and_files():
  with pytest.raises(ValueError, match="data_dir") as info:
    data.load_dataset("mnist")
  for stem in (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
  ):
    assert stem in str(info.value)


def test_mnist_with_missing_files_names_data_dir_and_the_missing_file(tmp_path):
  _write_mnist_dir(tmp_path)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match="data_dir") as info:
    data.load_dataset("mnist", data_dir=tmp_path)
  assert "t10k-labels-idx1-ubyte" in str(info.value) and str(tmp_path) in str(info.value)
  with pytest.raises(FileNotFoundError, match="data_dir"):
    data.load_dataset("mnist", data_dir=tmp_path / "nowhere")


def test_mnist_with_mismatched_labels_is_an_error(tmp_path):
  _write_mnist_dir(tmp_path)
  data.write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(59, np.uint8))
  with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
    data.load_dataset("mnist", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Batching.


def _indexed_split(num_rows: int) -> data.Split:
  return data.Split(np.arange(num_rows, dtype=np.float32)[:, None], np.arange(num_rows, dtype=np.int32) % 3)


def test_batch_at_is_deterministic_and_shaped():
  split = _indexed_split(50)
  x, y = data.batch_at(split, 8, 13, seed=4)
  assert x.shape == (8, 1) and y.shape == (8,) and x.dtype == np.float32 and y.dtype == np.int32
  x_again, y_again = data.batch_at(split, 8, 13, seed=4)
  np.testing.assert_array_equal(x, x_again)
  np.testing.assert_array_equal(y, y_again)
  np.testing.assert_array_equal(y, split.y[_row_ids(data.Split(x, y))])  # Rows stay paired with labels.
  assert not np.array_equal(x, data.batch_at(split, 8, 13, seed=5)[0])


@pytest.mark.parametrize("num_rows, batch_size", [(48, 8), (50, 8), (7, 7), (10, 1)])
def test_every_row_at_most_once_per_epoch_and_all_when_divisible(num_rows, batch_size):
  split = _indexed_split(num_rows)
  per_epoch = data.steps_per_epoch(split, batch_size)
  assert per_epoch == num_rows // batch_size
  epochs = []
  for epoch in range(3):
    batches = [data.batch_at(split, batch_size, epoch * per_epoch + i, seed=0) for i in range(per_epoch)]
    rows = np.concatenate([_row_ids(data.Split(*batch)) for batch in batches])
    assert len(rows) == per_epoch * batch_size and len(np.unique(rows)) == len(rows)
    if num_rows % batch_size == 0:
      np.testing.assert_array_equal(np.sort(rows), np.arange(num_rows))
    epochs.append(rows)
  if num_rows > 1:
    assert not np.array_equal(epochs[0], epochs[1])  # A fresh permutation every epoch.


def test_iterate_batches_equals_batch_at_and_resumes_from_any_step():
  split = _indexed_split(45)  # 5 steps per epoch at batch size 9: runs cross epoch boundaries.
  full = list(data.iterate_batches(split, 9, seed=2, num_steps=17))
  assert len(full) == 17
  for step, (x, y) in enumerate(full):
    want_x, want_y = data.batch_at(split, 9, step, seed=2)
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)
  for k in (1, 5, 7, 12):
    resumed = list(data.iterate_batches(split, 9, seed=2, start_step=k, num_steps=17 - k))
    for (x, y), (want_x, want_y) in zip(resumed, full[k:], strict=True):
      np.testing.assert_array_equal(x, want_x)
      np.testing.assert_array_equal(y, want_y)


def test_iterate_batches_without_num_steps_is_endless():
  split = _indexed_split(10)
  batches = list(itertools.islice(data.iterate_batches(split, 4, seed=0), 25))
  assert len(batches) == 25
  assert list(data.iterate_batches(split, 4, seed=0, num_steps=0)) == []


def test_batch_at_accepts_numpy_integer_steps():
  split = _indexed_split(20)
  np.testing.assert_array_equal(
    data.batch_at(split, 4, np.int64(9), seed=np.uint32(1))[0], data.batch_at(split, 4, 9, seed=1)[0]
  )


@pytest.mark.parametrize(
  "call, argument",
  [
    (lambda s: data.batch_at(s, 0, 0, seed=0), "batch_size"),
    (lambda s: data.batch_at(s, 11, 0, seed=0), "batch_size"),
    (lambda s: data.batch_at(s, 2.0, 0, seed=0), "batch_size"),
    (lambda s: data.batch_at(s, 2, -1, seed=0), "step"),
    (lambda s: data.batch_at(s, 2, 0, seed=-3), "seed"),
    (lambda s: data.batch_at(s, 2, True, seed=0), "step"),
    (lambda s: data.batch_at(data.Split(s.x, s.y[:5]), 2, 0, seed=0), "split"),
    (lambda s: data.batch_at(s.x, 2, 0, seed=0), "split"),
    (lambda s: data.steps_per_epoch(s, 0), "batch_size"),
    (lambda s: data.iterate_batches(s, 20, seed=0), "batch_size"),
    (lambda s: data.iterate_batches(s, 2, seed=0, start_step=-1), "start_step"),
    (lambda s: data.iterate_batches(s, 2, seed=0, num_steps=-1), "num_steps"),
    (lambda s: data.iterate_batches(s, 2, seed=None), "seed"),
  ],
)
def test_batching_errors_name_the_argument(call, argument):
  # iterate_batches checks its arguments when called, before the first next().
  with pytest.raises((ValueError, TypeError), match=argument):
    call(_indexed_split(10))
