"""Tests for the shipped digits data set and its loader."""

import hashlib

import numpy as np
import pytest

from xentjax import datasets


def test_file_matches_documented_shape_range_and_checksum():
  images, labels = datasets.load_digits_raw(verify=True)
  assert images.dtype == np.uint8 and labels.dtype == np.uint8
  assert images.shape == (1797, 64) and labels.shape == (1797,)
  assert images.min() == 0 and images.max() == 16
  assert set(np.unique(labels).tolist()) == set(range(10))
  # The per-class counts stated in data/README.md.
  np.testing.assert_array_equal(
    np.bincount(labels), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
  )
  # Hash here independently of the loader's own check.
  assert hashlib.sha256(images.tobytes()).hexdigest().startswith("8f26b2bd9d13")
  assert hashlib.sha256(labels.tobytes()).hexdigest().startswith("8ba4f891220f")


def test_first_image_is_a_zero():
  # A spot check of content: the first row of the UCI file is a "0" whose
  # top row of pixels is 0 0 5 13 9 1 0 0.
  images, labels = datasets.load_digits_raw()
  assert labels[0] == 0
  np.testing.assert_array_equal(images[0, :8], [0, 0, 5, 13, 9, 1, 0, 0])


def test_split_is_deterministic_disjoint_and_complete():
  a = datasets.load_digits(seed=3)
  b = datasets.load_digits(seed=3)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  train_idx, test_idx = datasets.stratified_split(
    datasets.load_digits_raw()[1], test_fraction=0.25, seed=3
  )
  assert np.intersect1d(train_idx, test_idx).size == 0
  np.testing.assert_array_equal(np.union1d(train_idx, test_idx), np.arange(1797))
  c = datasets.load_digits(seed=4)
  assert not np.array_equal(a[3], c[3]) or not np.array_equal(a[2], c[2])


def test_loader_types_range_sizes_and_classes():
  x_train, y_train, x_test, y_test = datasets.load_digits()
  assert x_train.dtype == np.float32 and x_test.dtype == np.float32
  assert y_train.dtype == np.int32 and y_test.dtype == np.int32
  assert x_train.shape == (1347, 64) and x_test.shape == (450, 64)
  assert x_train.min() >= 0.0 and x_train.max() == 1.0
  assert set(np.unique(y_train).tolist()) == set(range(10))
  assert set(np.unique(y_test).tolist()) == set(range(10))
  # Stratified: every class holds out round(0.25 * n_c) examples.
  counts = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
  np.testing.assert_array_equal(np.bincount(y_test), np.round(0.25 * counts))
  # The split rows are the raw rows, scaled by 1/16.
  raw, _ = datasets.load_digits_raw()
  _, _, x_test_raw, _ = datasets.load_digits(scale=False)
  assert x_test_raw.max() == 16.0
  np.testing.assert_allclose(x_test_raw / 16.0, x_test)
  rows = {r.tobytes() for r in raw.astype(np.float32)}
  assert all(r.tobytes() in rows for r in x_test_raw[:20])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction_raises(fraction):
  with pytest.raises(ValueError, match="test_fraction"):
    datasets.load_digits(test_fraction=fraction)
