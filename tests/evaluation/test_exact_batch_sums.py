"""The in-batch sums of streaming evaluation: two-float sums from a tree of TwoSum folds.

`_exact_sum` folds the values level by level with TwoSum, whose rounding
errors are carried, exactly, into the low parts, so ``hi + lo`` must equal
the exact sum of the float values (`math.fsum`, which is exact) to about the
square of the working precision, whatever the order XLA reduces in. The
references are `math.fsum` of the same float32 or float64 values, never the
implementation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax
from xentjax.evaluation import _stream as _evaluation


def exact(values) -> float:
  return math.fsum(float(v) for v in values)


def mixed(n, seed):
  """Values over many magnitudes and both signs (the in-batch sums see only non-negative ones)."""
  rng = np.random.default_rng(seed)
  scale = rng.choice([1e-6, 1e-2, 1.0, 30.0, 1e4], n)
  return (rng.standard_normal(n) * scale).astype(jnp.zeros(()).dtype)


@pytest.mark.parametrize("n", [1, 7, 1000, 50_000, 1 << 20])
def test_hi_plus_lo_is_the_exact_sum(n):
  rows = np.stack([mixed(n, seed) for seed in range(3)])
  rows[1] = np.abs(rows[1])  # a non-negative row, like the losses
  for i in range(3):
    hi, lo = jax.jit(_evaluation._exact_sum)(jnp.asarray(rows[i]))
    want = exact(rows[i])
    got = float(hi) + float(lo)
    scale = exact(np.abs(rows[i]))
    assert abs(got - want) <= 1e-13 * scale, (i, got, want)
  # A plain float32 sum of the same values is not that close (float64's can be).
  if n >= 50_000 and rows.dtype == np.float32:
    plain = float(jnp.sum(jnp.asarray(rows[0])))
    assert abs(plain - exact(rows[0])) > 1e-13 * exact(np.abs(rows[0]))


@pytest.mark.parametrize("groups, n", [(2, 2 * 6250), (8, 8 * 300), (4, 4 * 3), (8, 8 * 256)])
def test_device_blocks_give_the_exact_sum(groups, n):
  """Rows in ``groups`` device blocks (sizes not a multiple of the extraction block too)."""
  x = np.abs(mixed(n, 11))
  hi, lo = jax.jit(_evaluation._exact_sum, static_argnums=1)(jnp.asarray(x), groups)
  assert abs(float(hi) + float(lo) - exact(x)) <= 1e-13 * exact(x)


def test_cancellation_keeps_the_small_terms():
  """Large values that cancel leave the small ones whole (a plain sum loses them)."""
  dtype = jnp.zeros(()).dtype
  rng = np.random.default_rng(5)
  big = (rng.standard_normal(5000) * 1e6).astype(dtype)
  small = (rng.standard_normal(5000) * 1e-3).astype(dtype)
  x = rng.permutation(np.concatenate([big, -big, small]))
  hi, lo = jax.jit(_evaluation._exact_sum)(jnp.asarray(x))
  want = exact(small)
  assert abs(float(hi) + float(lo) - want) <= 1e-13 * exact(np.abs(x))
  assert abs(float(hi) + float(lo) - want) <= 1e-6 * exact(np.abs(small))


def test_one_vectorized_reduction_per_level():
  """50,000 values take ceil(log4 50,000) = 8 reductions (Rump's blocks took some fifty kernels)."""
  x = jnp.zeros(50_000, jnp.zeros(()).dtype)
  hlo = jax.jit(_evaluation._exact_sum).lower(x).compile().as_text()
  reductions = hlo.count(" reduce(")
  assert 8 <= reductions <= 9, reductions  # the levels, and the last fold of the device blocks


def test_the_high_part_alone_is_the_sum_rounded_once():
  """A sum that fits the working precision comes back whole in ``hi``, with ``lo`` zero."""
  x = np.full(4096, 0.25, jnp.zeros(()).dtype)
  x[::2] = 0.5
  hi, lo = _evaluation._exact_sum(jnp.asarray(x))
  assert float(hi) == exact(x) == 1536.0
  assert float(lo) == 0.0


@pytest.mark.parametrize(
  "values, want",
  [
    ([1.0, np.inf, 2.0], np.inf),
    ([1.0, -np.inf, 2.0], -np.inf),
    ([np.inf, -np.inf], np.nan),
    ([1.0, np.nan, 2.0], np.nan),
  ],
)
def test_non_finite_values_give_the_plain_sum(values, want):
  x = np.full(1000, 0.5, jnp.zeros(()).dtype)
  x[[3, 400, 999][: len(values)]] = values  # in different blocks and the short last one
  hi, lo = _evaluation._exact_sum(jnp.asarray(x))
  np.testing.assert_array_equal(float(hi), want)
  assert float(lo) == 0.0


def test_zeros_tiny_and_huge_values():
  dtype = jnp.zeros(()).dtype
  info = np.finfo(dtype)
  zeros = _evaluation._exact_sum(jnp.zeros(10, dtype))
  assert (float(zeros[0]), float(zeros[1])) == (0.0, 0.0)
  tiny = np.array([float(info.tiny) * 3, float(info.tiny) * 5, 1e-30], dtype)
  hi, lo = _evaluation._exact_sum(jnp.asarray(tiny))
  assert float(hi) + float(lo) == pytest.approx(exact(tiny), rel=1e-6)
  huge = np.array([float(info.max) / 4, float(info.max) / 8], dtype)  # 2 b max|x| overflows
  hi, lo = _evaluation._exact_sum(jnp.asarray(huge))
  assert float(hi) == pytest.approx(exact(huge), rel=1e-6)


def test_evaluate_total_is_the_exact_sum_of_its_per_row_losses():
  """`evaluate`'s loss sum over many batches equals `fsum` of the per-row float values.

  The per-row values are the library's own (each row a document of its
  own); the total then carries no rounding beyond the final two-float
  fold, where a float32 running sum of 30,000 mixed values is off by about
  1e-6 relative.
  """
  rng = np.random.default_rng(3)
  n, c = 30_000, 16
  logits = rng.standard_normal((n, c)) * rng.choice([0.01, 1.0, 40.0], (n, 1))
  logits = logits.astype(np.float32)
  labels = rng.integers(0, c, n)
  size = 7_000
  batches = [
    {"logits": logits[i : i + size], "labels": labels[i : i + size]} for i in range(0, n, size)
  ]
  with_ids = [
    dict(b, document_ids=np.arange(i, i + len(b["labels"])))
    for i, b in zip(range(0, n, size), batches)
  ]
  each = xentjax.evaluate(with_ids, progress=False).per_document.negative_log_likelihood_sum
  want = exact(each)
  got = xentjax.evaluate(batches, progress=False).negative_log_likelihood_sum
  assert abs(got - want) <= 1e-12 * want
