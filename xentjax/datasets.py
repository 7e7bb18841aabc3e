"""A small real data set shipped inside the package: the 8x8 handwritten digits.

The file `xentjax/data/digits.npz` holds the UCI "Optical Recognition of
Handwritten Digits" test set in the 8x8 form distributed with scikit-learn:
1,797 images of the digits 0-9 written by 13 people, each image 64 pixel
counts in 0..16 (a 32x32 bitmap summed over non-overlapping 4x4 blocks).

Source: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten
Digits", UCI Machine Learning Repository, 1998, https://doi.org/10.24432/C50P49.
Licence: Creative Commons Attribution 4.0 International (CC BY 4.0). See
`xentjax/data/README.md` for the full statement and how the file was made.

The loader reads the shipped file; nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.resources

import numpy as np

__all__ = [
  "IMAGES_SHA256",
  "LABELS_SHA256",
  "MAX_PIXEL",
  "NUM_CLASSES",
  "NUM_EXAMPLES",
  "NUM_FEATURES",
  "load_digits",
  "load_digits_raw",
  "stratified_split",
]

NUM_EXAMPLES = 1797
NUM_FEATURES = 64
NUM_CLASSES = 10
MAX_PIXEL = 16

# SHA-256 of the raw array bytes (C order) as documented in data/README.md.
# The .npz container itself carries zip timestamps, so the arrays are hashed.
IMAGES_SHA256 = "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
LABELS_SHA256 = "8ba4f891220f5e4c9c819638d1602d74b83618f167043c6da52a2a247841ddf0"


def load_digits_raw(*, verify: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Return the shipped digits exactly as stored.

  Args:
    verify: when True, check the SHA-256 of both arrays against the
      documented values and raise `ValueError` on a mismatch.

  Returns:
    `(images, labels)`: `images` uint8 `[1797, 64]` with values in 0..16
    (row-major 8x8 images), `labels` uint8 `[1797]` with values in 0..9.
  """
  ref = importlib.resources.files("xentjax").joinpath("data", "digits.npz")
  with ref.open("rb") as f, np.load(f) as npz:
    images = np.array(npz["images"])
    labels = np.array(npz["labels"])
  if verify:
    for name, arr, want in (
      ("images", images, IMAGES_SHA256),
      ("labels", labels, LABELS_SHA256),
    ):
      got = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
      if got != want:
        raise ValueError(f"digits.npz: `{name}` checksum {got} != documented {want}.")
  return images, labels


def stratified_split(
  labels: np.ndarray, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Split example indices into train and test, class by class.

  Each class contributes `round(test_fraction * n_c)` of its `n_c` examples
  to the test set, chosen by a NumPy `Generator` seeded with `seed`, so the
  class proportions match in both parts and the split depends only on
  `(labels, test_fraction, seed)`.

  Args:
    labels: integer class labels, shape `[n]`.
    test_fraction: fraction of each class held out, in (0, 1).
    seed: seed of the permutation.

  Returns:
    `(train_idx, test_idx)`: disjoint sorted int64 index arrays covering
    `range(n)`.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    idx = idx[rng.permutation(idx.size)]
    n_test = round(test_fraction * idx.size)
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(
  *, test_fraction: float = 0.25, seed: int = 0, scale: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Load the 8x8 digits with a deterministic, stratified train/test split.

  Args:
    test_fraction: fraction of every class held out for testing, in (0, 1).
    seed: seed of the split; the same seed always gives the same split.
    scale: when True divide pixels by 16 so they lie in [0, 1]; otherwise
      keep the raw counts 0..16 (still as float32).

  Returns:
    `(x_train, y_train, x_test, y_test)`: `x_*` float32 `[n, 64]`, `y_*`
    int32 `[n]` in 0..9. With the default fraction, 1,347 train and 450 test
    examples.

  Example:
    >>> x_train, y_train, x_test, y_test = load_digits()
    >>> x_train.shape, x_test.shape
    ((1347, 64), (450, 64))
  """
  images, labels = load_digits_raw()
  train_idx, test_idx = stratified_split(labels, test_fraction=test_fraction, seed=seed)
  x = images.astype(np.float32)
  if scale:
    x = x / np.float32(MAX_PIXEL)
  y = labels.astype(np.int32)
  return x[train_idx], y[train_idx], x[test_idx], y[test_idx]
