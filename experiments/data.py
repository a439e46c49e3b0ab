"""Datasets and batching for the experiments: small bundled sets, an MNIST IDX loader, pure batching.

Everything here is NumPy on the host; nothing is downloaded. The datasets:

* ``"digits"`` (the default): scikit-learn's 8x8 handwritten digits, 1797 images, 10 classes, pixel values
  0..16 scaled to [0, 1].
* ``"breast_cancer"`` (569 x 30, 2 classes) and ``"wine"`` (178 x 13, 3 classes): scikit-learn's bundled
  tabular sets, raw feature values.
* ``"age_salary"``: synthetic, 4000 people x 5 features on wildly different scales (age 18-100, years of
  experience 0-82, salary 1e4-1e6, savings up to ~1e7, dependents 0-8), the example the batch-normalization
  article starts from; the binary label is a fixed nonlinear rule plus label noise.
* ``"mnist"`` and ``"fashion_mnist"``: read from ``data_dir`` holding the standard IDX files.

Splits are deterministic functions of ``seed`` and stratified by class. Batches are a pure function of
``(split, batch_size, step, seed)``, so a run resumes its data order from nothing more than a step number.

The scikit-learn sets need the ``experiments`` extra (``pip install "bnjax[experiments]"``); scikit-learn is
imported only when one of them is loaded.
"""

from __future__ import annotations

import gzip
import math
import numbers
import operator
import os
import pathlib
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

__all__ = [
  "DATASETS",
  "Dataset",
  "Split",
  "batch_at",
  "iterate_batches",
  "load_dataset",
  "read_idx",
  "standardize",
  "steps_per_epoch",
  "write_idx",
]

PathLike = str | os.PathLike


class Split(NamedTuple):
  """One split of a dataset.

  Attributes:
    x: float32 features, shape ``(N, ...features)``: ``(N, D)`` for flat data, ``(N, H, W, 1)`` for images
      loaded with ``flatten=False``.
    y: int32 class labels in ``[0, num_classes)``, shape ``(N,)``.
  """

  x: np.ndarray
  y: np.ndarray


class Dataset(NamedTuple):
  """A dataset split three ways.

  Attributes:
    name: the name it was loaded by, one of ``DATASETS``.
    train, val, test: the splits; ``val`` or ``test`` may have zero rows when its fraction is 0.
    num_classes: the number of classes, labels are ``0 .. num_classes - 1``.
    feature_names: one name per feature for tabular sets, ``None`` for images.
  """

  name: str
  train: Split
  val: Split
  test: Split
  num_classes: int
  feature_names: tuple[str, ...] | None


DATASETS = ("digits", "breast_cancer", "wine", "age_salary", "mnist", "fashion_mnist")

_SKLEARN_SETS = ("digits", "breast_cancer", "wine")
_IDX_SETS = ("mnist", "fashion_mnist")
AGE_SALARY_FEATURES = ("age", "years_experience", "salary", "savings", "dependents")
AGE_SALARY_ROWS = 4000

# IDX files: https://yann.lecun.com/exdb/mnist/ ("FILE FORMATS FOR THE MNIST DATABASE"). The third magic
# byte names the element type, the fourth the number of dimensions; sizes and data are big-endian.
_IDX_DTYPES = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}
_IDX_CODES = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"
IDX_FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "test_images": "t10k-images-idx3-ubyte",
  "test_labels": "t10k-labels-idx1-ubyte",
}

# Distinct first words of the NumPy seed sequences, so that the synthetic data, the split and the batch
# order drawn from one user seed are independent streams.
_GENERATE_STREAM = 0x5EED0001
_SPLIT_STREAM = 0x5EED0002
_BATCH_STREAM = 0x5EED0003


# ---------------------------------------------------------------------------------------------------------
# Argument checks.


def _check_int(value, name: str, *, minimum: int) -> int:
  """Returns `value` as a Python int, or raises naming `name` when it is not an integer >= `minimum`."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be an integer >= {minimum}, got the bool {value!r}.")
  try:
    result = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} of type {type(value).__name__}.") from None
  if result < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {result}.")
  return result


def _check_fraction(value, name: str) -> float:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a number in [0, 1), got {value!r} of type {type(value).__name__}.")
  value = float(value)
  if not 0.0 <= value < 1.0:  # Also rejects NaN.
    raise ValueError(f"{name} must be in [0, 1), got {value}.")
  return value


def _check_split(split, name: str = "split") -> int:
  """Checks that `split` is an (x, y) pair of equal length and returns that length."""
  if not (isinstance(split, tuple) and len(split) == 2):
    raise TypeError(f"{name} must be an experiments.data.Split(x, y), got {type(split).__name__}.")
  x, y = split
  if np.ndim(x) < 1 or np.ndim(y) != 1 or np.shape(x)[0] != np.shape(y)[0]:
    raise ValueError(
      f"{name} must hold x of shape (N, ...) and y of shape (N,), got x {np.shape(x)} and y {np.shape(y)}."
    )
  return int(np.shape(y)[0])


def _check_batch_size(batch_size, num_rows: int) -> int:
  batch_size = _check_int(batch_size, "batch_size", minimum=1)
  if batch_size > num_rows:
    raise ValueError(f"batch_size must be at most the number of rows in split ({num_rows}), got {batch_size}.")
  return batch_size


# ---------------------------------------------------------------------------------------------------------
# IDX files.


def read_idx(path: PathLike) -> np.ndarray:
  """Reads an IDX file (the MNIST format), raw or gzip-compressed.

  Compression is recognised by the gzip magic bytes ``1f 8b``, not by the file name. The header is two
  zero bytes, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D``
  float32, ``0x0E`` float64), the number of dimensions ``d``, then ``d`` big-endian uint32 sizes; the
  data follow, big-endian, in C order. Reference: LeCun, Cortes & Burges, "The MNIST database", section
  "FILE FORMATS FOR THE MNIST DATABASE".

  Args:
    path: the file.

  Returns:
    A writable array in native byte order with the file's shape and element type (``(N, 28, 28)`` uint8
    for MNIST images, ``(N,)`` uint8 for labels).

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is not IDX, is truncated, has trailing bytes, or is a corrupt gzip stream.
  """
  path = pathlib.Path(path)
  raw = path.read_bytes()
  if raw[:2] == _GZIP_MAGIC:
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
      raise ValueError(f"path {str(path)!r} starts like a gzip file but does not decompress: {error}.") from None
  if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
    raise ValueError(
      f"path {str(path)!r} is not an IDX file: expected the magic bytes 00 00 <type code> <ndim> with a "
      f"type code in {sorted(hex(c) for c in _IDX_DTYPES)}, got {raw[:4].hex(' ') or 'an empty file'}."
    )
  dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
  header_size = 4 + 4 * ndim
  if len(raw) < header_size:
    raise ValueError(
      f"path {str(path)!r} is truncated: its header declares {ndim} dimensions ({header_size} header "
      f"bytes) but the file has {len(raw)} bytes."
    )
  shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
  expected = math.prod(shape) * dtype.itemsize
  found = len(raw) - header_size
  if found != expected:
    problem = "is truncated" if found < expected else "has trailing bytes"
    raise ValueError(
      f"path {str(path)!r} {problem}: shape {shape} of {dtype.name} needs {expected} data bytes, found {found}."
    )
  data = np.frombuffer(raw, dtype=dtype, offset=header_size)
  return data.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def write_idx(path: PathLike, array, *, compress: bool | None = None) -> None:
  """Writes `array` as an IDX file, the inverse of `read_idx`.

  Args:
    path: the file to write.
    array: an array of uint8, int8, int16, int32, float32 or float64, with at most 255 dimensions each
      below 2**32.
    compress: gzip the file; ``None`` (the default) compresses when `path` ends in ``.gz``.

  Raises:
    TypeError: `array` has an element type IDX cannot hold.
    ValueError: `array` has more than 255 dimensions or a dimension of 2**32 or more.
  """
  array = np.asarray(array)
  native = array.dtype.newbyteorder("=")
  if native not in _IDX_CODES:
    raise TypeError(
      f"array must have one of the IDX element types {sorted(d.name for d in _IDX_CODES)}, got {array.dtype.name}."
    )
  if array.ndim > 255 or any(s >= 2**32 for s in array.shape):
    raise ValueError(
      f"array must have at most 255 dimensions, each below 2**32, to fit an IDX header, got shape {array.shape}."
    )
  code = _IDX_CODES[native]
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
  payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
  path = pathlib.Path(path)
  if compress is None:
    compress = path.suffix == ".gz"
  if compress:
    payload = gzip.compress(payload, mtime=0)  # mtime=0: the same array gives the same bytes.
  path.write_bytes(payload)


# ---------------------------------------------------------------------------------------------------------
# Raw datasets: (x, y, num_classes, feature_names), x float32 (N, ...), y int32 (N,).


def _import_sklearn_datasets():
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
      "The datasets 'digits', 'breast_cancer' and 'wine' are read from scikit-learn, which is not "
      'installed. Install it with: pip install "bnjax[experiments]"'
    ) from error
  return datasets


def _load_sklearn(name: str, flatten: bool):
  datasets = _import_sklearn_datasets()
  if name == "digits":
    bunch = datasets.load_digits()
    x = np.asarray(bunch.data, np.float32) / np.float32(16.0)  # Pixel values are 0..16.
    if not flatten:
      x = x.reshape(-1, 8, 8, 1)
    return x, np.asarray(bunch.target, np.int32), 10, None
  loader = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine}[name]
  bunch = loader()
  feature_names = tuple(str(f) for f in bunch.feature_names)
  num_classes = len(bunch.target_names)
  return np.asarray(bunch.data, np.float32), np.asarray(bunch.target, np.int32), num_classes, feature_names


def make_age_salary(seed: int = 0, num_rows: int = AGE_SALARY_ROWS):
  """Synthetic people with features on wildly different scales, and a binary label.

  Columns (`AGE_SALARY_FEATURES`): age, uniform integer 18..100; years_experience, a Beta(2, 1.5)
  fraction of the years since 18; salary, ``10 ** clip(4.25 + 0.022 * min(experience, 40) + N(0, 0.35),
  4, 6)`` (1e4..1e6); savings, salary times a Beta(1.5, 6) saving rate times ``0.3 * experience +
  Exp(1)`` years; dependents, ``min(Poisson(1.3), 8)``. The label is ``score + Logistic(0, 0.25) > 0``
  with

      score = 1.8 (log10 salary - 4.9) + 0.9 (log10(savings + 1e3) - 5) - 0.45 (dependents - 1.3)
              - 1.2 ((age - 45) / 25)^2 + 1.7,

  then 5% of the labels are flipped; a little under half of the labels are 1. The rule is nonlinear in the raw
  features (logarithms, a quadratic in age), so a linear model on standardized features stays well below a
  small MLP on standardized features, and an MLP on the raw scales barely learns: the batch-normalization
  article's motivating example (age 1-100 next to salary 1e4-1e6).

  Args:
    seed: a non-negative integer; the same seed gives the same rows.
    num_rows: the number of people.

  Returns:
    ``(x, y)``: float32 ``(num_rows, 5)`` and int32 ``(num_rows,)``.
  """
  seed = _check_int(seed, "seed", minimum=0)
  num_rows = _check_int(num_rows, "num_rows", minimum=1)
  rng = np.random.default_rng([_GENERATE_STREAM, seed])
  age = rng.integers(18, 101, size=num_rows).astype(np.float64)
  experience = np.round((age - 18.0) * rng.beta(2.0, 1.5, size=num_rows), 1)
  log_salary = np.clip(4.25 + 0.022 * np.minimum(experience, 40.0) + rng.normal(0.0, 0.35, size=num_rows), 4.0, 6.0)
  salary = np.round(10.0**log_salary, -1)
  saving_rate = rng.beta(1.5, 6.0, size=num_rows)
  savings = np.round(salary * saving_rate * (0.3 * experience + rng.exponential(1.0, size=num_rows)), -1)
  dependents = np.minimum(rng.poisson(1.3, size=num_rows), 8).astype(np.float64)
  score = (
    1.8 * (log_salary - 4.9)
    + 0.9 * (np.log10(savings + 1e3) - 5.0)
    - 0.45 * (dependents - 1.3)
    - 1.2 * ((age - 45.0) / 25.0) ** 2
    + 1.7
  )
  label = score + rng.logistic(0.0, 0.25, size=num_rows) > 0.0
  label ^= rng.random(num_rows) < 0.05  # Label noise: no model is perfect.
  x = np.stack([age, experience, salary, savings, dependents], axis=1).astype(np.float32)
  return x, label.astype(np.int32)


def _find_idx_file(data_dir: pathlib.Path, stem: str) -> pathlib.Path | None:
  for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
    if candidate.is_file():
      return candidate
  return None


def _load_idx_set(name: str, data_dir: PathLike | None, flatten: bool):
  """Reads the four IDX files; returns ((train_x, train_y), (test_x, test_y))."""
  expected = ", ".join(f"{stem}[.gz]" for stem in IDX_FILES.values())
  if data_dir is None:
    raise ValueError(
      f"load_dataset({name!r}) reads local files and needs data_dir: a directory holding {expected}. "
      f"Nothing is downloaded."
    )
  data_dir = pathlib.Path(data_dir)
  found = {key: _find_idx_file(data_dir, stem) for key, stem in IDX_FILES.items()}
  missing = [f"{IDX_FILES[key]}[.gz]" for key, path in found.items() if path is None]
  if missing:
    raise FileNotFoundError(
      f"data_dir {str(data_dir)!r} lacks {', '.join(missing)} needed by load_dataset({name!r}); it must "
      f"hold {expected}."
    )
  parts = []
  for part in ("train", "test"):
    images, labels = read_idx(found[f"{part}_images"]), read_idx(found[f"{part}_labels"])
    if images.dtype != np.uint8 or images.ndim != 3:
      raise ValueError(
        f"{found[f'{part}_images']} must hold uint8 images of shape (N, H, W), got {images.dtype.name} {images.shape}."
      )
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
      raise ValueError(
        f"{found[f'{part}_labels']} must hold {images.shape[0]} uint8 labels, one per image, got "
        f"{labels.dtype.name} {labels.shape}."
      )
    if labels.size and labels.max() >= 10:
      raise ValueError(f"{found[f'{part}_labels']} must hold labels 0..9, got a {labels.max()}.")
    x = images.astype(np.float32) / np.float32(255.0)
    x = x.reshape(len(x), -1) if flatten else x[..., None]
    parts.append((x, labels.astype(np.int32)))
  if parts[0][0].shape[1:] != parts[1][0].shape[1:]:
    raise ValueError(
      f"data_dir {str(data_dir)!r} holds train and test images of different sizes: "
      f"{parts[0][0].shape[1:]} and {parts[1][0].shape[1:]}."
    )
  return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------------------
# Splitting and standardizing.


def _stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A permutation of the rows whose every prefix holds each class in proportion (to within one row).

  Each class is shuffled; its k-th row (0-based) of n_c gets the key ``(k + 1/2) / n_c``, so every class's
  keys spread evenly over (0, 1); sorting by key (random tie-breaks) interleaves the classes. Cutting the
  order into consecutive pieces gives splits of exact sizes, each stratified.
  """
  keys = np.empty(len(y), np.float64)
  for label in np.unique(y):
    rows = np.flatnonzero(y == label)
    keys[rng.permutation(rows)] = (np.arange(len(rows)) + 0.5) / len(rows)
  return np.lexsort((rng.random(len(y)), keys))


def _take(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> Split:
  rows = np.sort(rows)  # Source order within a split; batching shuffles.
  return Split(x[rows], y[rows])


def _split_three_ways(x, y, *, seed: int, val_fraction: float, test_fraction: float):
  order = _stratified_order(y, np.random.default_rng([_SPLIT_STREAM, seed]))
  num_test = int(round(len(y) * test_fraction))
  num_val = int(round(len(y) * val_fraction))
  test, val, train = np.split(order, [num_test, num_test + num_val])
  return _take(x, y, train), _take(x, y, val), _take(x, y, test)


def standardize(train_x, *others) -> tuple[np.ndarray, ...]:
  """Standardizes features with statistics fitted on `train_x` only.

  ``x' = (x - mean) / std`` with ``mean`` and ``std`` (population, ddof=0) taken per feature over axis 0
  of `train_x`, accumulated in float64; a feature constant on the training rows (std 0) gets std 1, so it
  maps to 0 there instead of NaN. The same shift and scale apply to every array in `others`: held-out data
  must not leak into the statistics.

  Args:
    train_x: ``(N, ...features)`` with N >= 1.
    *others: arrays ``(M, ...features)`` with `train_x`'s feature shape.

  Returns:
    ``(train_x', *others')``, float32, same shapes.
  """
  return _standardize(train_x, others)


def _standardize(train_x, others) -> tuple[np.ndarray, ...]:
  train_x = np.asarray(train_x)
  if train_x.ndim < 1 or train_x.shape[0] < 1:
    raise ValueError(f"train_x must have shape (N, ...features) with N >= 1, got {train_x.shape}.")
  others = tuple(np.asarray(o) for o in others)
  for i, other in enumerate(others):
    if other.ndim != train_x.ndim or other.shape[1:] != train_x.shape[1:]:
      raise ValueError(
        f"others[{i}] must have train_x's feature shape (M, {', '.join(map(str, train_x.shape[1:]))}), "
        f"got {other.shape}."
      )
  mean = train_x.mean(axis=0, dtype=np.float64)
  std = np.sqrt(((train_x - mean) ** 2).mean(axis=0))
  std = np.where(std > 1e-12 * np.maximum(np.abs(mean), 1.0), std, 1.0)
  return tuple(((a - mean) / std).astype(np.float32) for a in (train_x,) + others)


# ---------------------------------------------------------------------------------------------------------
# Loading.


def load_dataset(
  name: str = "digits",
  *,
  data_dir: PathLike | None = None,
  seed: int = 0,
  val_fraction: float = 0.15,
  test_fraction: float = 0.15,
  standardize: bool = False,  # pylint: disable=redefined-outer-name
  flatten: bool = True,
) -> Dataset:
  """Loads a dataset and splits it into train, validation and test.

  The split is stratified by class and a deterministic function of `seed`: ``round(N * test_fraction)``
  rows go to test, ``round(N * val_fraction)`` to val, the rest to train. MNIST and Fashion-MNIST keep
  their own test set (the ``t10k`` files) and take val from the training files, so `test_fraction` does
  not apply to them. Within a split rows keep their source order.

  Args:
    name: one of `DATASETS`.
    data_dir: for ``"mnist"`` / ``"fashion_mnist"``, a directory holding ``train-images-idx3-ubyte``,
      ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each raw or
      with ``.gz``. Unused by the other sets.
    seed: non-negative integer; drives the split (and, for ``"age_salary"``, the data).
    val_fraction, test_fraction: each in [0, 1), their sum below 1.
    standardize: standardize x per feature with statistics of the train split only (see `standardize`).
    flatten: images as ``(N, H*W)``; ``False`` gives ``(N, H, W, 1)`` (NHWC). No effect on tabular sets.

  Returns:
    A `Dataset`: x float32, y int32; image pixels in [0, 1] unless standardized.
  """
  if not isinstance(name, str) or name not in DATASETS:
    raise ValueError(f"name must be one of {DATASETS}, got {name!r}.")
  seed = _check_int(seed, "seed", minimum=0)
  val_fraction = _check_fraction(val_fraction, "val_fraction")
  test_fraction = _check_fraction(test_fraction, "test_fraction")
  if val_fraction + test_fraction >= 1.0:
    raise ValueError(
      f"val_fraction + test_fraction must be below 1 to leave rows for training, got {val_fraction} + "
      f"{test_fraction} = {val_fraction + test_fraction}."
    )

  if name in _IDX_SETS:
    (train_x, train_y), (test_x, test_y) = _load_idx_set(name, data_dir, flatten)
    train, val, _ = _split_three_ways(train_x, train_y, seed=seed, val_fraction=val_fraction, test_fraction=0.0)
    test = Split(test_x, test_y)
    num_classes, feature_names = 10, None
  else:
    if name == "age_salary":
      x, y = make_age_salary(seed)
      num_classes, feature_names = 2, AGE_SALARY_FEATURES
    else:
      x, y, num_classes, feature_names = _load_sklearn(name, flatten)
    train, val, test = _split_three_ways(x, y, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
  if len(train.y) == 0:
    raise ValueError(
      f"val_fraction={val_fraction} and test_fraction={test_fraction} leave no training rows of {name!r}; lower them."
    )

  if standardize:
    train_x, val_x, test_x = _standardize(train.x, (val.x, test.x))
    train, val, test = train._replace(x=train_x), val._replace(x=val_x), test._replace(x=test_x)
  return Dataset(name, train, val, test, num_classes, feature_names)


# ---------------------------------------------------------------------------------------------------------
# Batching.


def steps_per_epoch(split: Split, batch_size: int) -> int:
  """The number of full batches in one pass over `split`: ``N // batch_size`` (the remainder is dropped)."""
  num_rows = _check_split(split)
  return num_rows // _check_batch_size(batch_size, num_rows)


def _epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([_BATCH_STREAM, seed, epoch]).permutation(num_rows)


def batch_at(split: Split, batch_size: int, step: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The batch at global step `step`, a pure function of its arguments.

  With ``S = N // batch_size`` steps per epoch, step ``t`` is in epoch ``e = t // S`` at position ``i = t %
  S``; epoch ``e`` visits the rows in a permutation drawn from ``(seed, e)`` (a NumPy Generator) and the
  batch is rows ``perm[i * batch_size : (i + 1) * batch_size]``. The last ``N % batch_size`` rows of each
  permutation are dropped, so every batch has the same shape, and each row appears at most once per epoch.
  A run restarted from a checkpoint resumes its data order from the step number alone.

  Args:
    split: the `Split` to draw from, N rows.
    batch_size: rows per batch, 1 <= batch_size <= N.
    step: the global step, >= 0.
    seed: non-negative integer.

  Returns:
    ``(x, y)`` of shapes ``(batch_size, ...features)`` and ``(batch_size,)``.
  """
  num_rows = _check_split(split)
  batch_size = _check_batch_size(batch_size, num_rows)
  step = _check_int(step, "step", minimum=0)
  seed = _check_int(seed, "seed", minimum=0)
  epoch, position = divmod(step, num_rows // batch_size)
  rows = _epoch_permutation(num_rows, seed, epoch)[position * batch_size : (position + 1) * batch_size]
  return split.x[rows], split.y[rows]


def iterate_batches(
  split: Split, batch_size: int, *, seed: int, start_step: int = 0, num_steps: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields ``batch_at(split, batch_size, step, seed=seed)`` for step = start_step, start_step + 1, ...

  Each epoch's permutation is drawn once, not once per batch; the batches equal `batch_at`'s. Arguments
  are checked when this is called, not at the first ``next``.

  Args:
    split, batch_size, seed: as for `batch_at`.
    start_step: the first global step, >= 0 (a resumed run passes its checkpoint's step).
    num_steps: how many batches to yield, >= 0; ``None`` yields forever.
  """
  num_rows = _check_split(split)
  batch_size = _check_batch_size(batch_size, num_rows)
  seed = _check_int(seed, "seed", minimum=0)
  start_step = _check_int(start_step, "start_step", minimum=0)
  if num_steps is not None:
    num_steps = _check_int(num_steps, "num_steps", minimum=0)
  return _batches(split, batch_size, seed, start_step, num_steps)


def _batches(split: Split, batch_size: int, seed: int, start_step: int, num_steps: int | None):
  num_rows = len(split.y)
  batches_per_epoch = num_rows // batch_size
  step, end = start_step, None if num_steps is None else start_step + num_steps
  epoch, permutation = None, None
  while end is None or step < end:
    step_epoch, position = divmod(step, batches_per_epoch)
    if step_epoch != epoch:
      epoch, permutation = step_epoch, _epoch_permutation(num_rows, seed, step_epoch)
    rows = permutation[position * batch_size : (position + 1) * batch_size]
    yield split.x[rows], split.y[rows]
    step += 1
