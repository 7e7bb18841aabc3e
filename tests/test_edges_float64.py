"""The library's edges against float64 references: each case decided once (docs/conventions.md).

A wrong argmax under `vocab_order`, NaN gradients from masked padding, rows
whose every logit is ``-inf``, a ``-inf`` label with a traced temperature,
means over nothing, a contrastive scale that is not > 0, and the wording of
the errors that say so.
"""

import numpy as np
import pytest

import xentjax

STRATEGIES = {
  "recompute": {"token_chunk_size": 2, "vocab_chunk_size": 4},
  "store": {"strategy": "store", "token_chunk_size": 2},
}


def logits64(x, w, b=None):
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  return z if b is None else z + np.asarray(b, np.float64)


def lowest_argmax64(z):
  """The lowest class index at each row's maximum (NumPy's tie rule), in float64."""
  return np.argmax(np.asarray(z, np.float64), axis=-1)


# ---------------------------------------------------------------------------
# `vocab_order`: the argmax is a class, ties to the lowest class.


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_argmax_under_vocab_order_is_the_lowest_class(strategy):
  rng = np.random.default_rng(0)
  v = 10
  x = rng.normal(size=(7, 4)).astype(np.float32)
  w = rng.normal(size=(4, v)).astype(np.float32)
  w[:, 7] = w[:, 2] = 3.0 * np.abs(w[:, 2])  # classes 2 and 7 tie, and often win
  x[0] = np.abs(x[0])
  order = np.array([7, 9, 8, 0, 1, 2, 3, 4, 5, 6], np.int32)  # 7 is swept before 2
  y = np.zeros(7, np.int32)
  want = lowest_argmax64(logits64(x, w))
  assert 2 in want and np.all(want != 7)  # the tie occurs in the data
  for chunks in (STRATEGIES[strategy], {"strategy": strategy}):
    _, stats = xentjax.linear_softmax_cross_entropy(
      x, w, y, return_stats=True, vocab_order=order, **chunks
    )
    np.testing.assert_array_equal(np.asarray(stats.argmax), want)
    # The predicted classes as labels score 1 (ties share the credit: 1/2 at a tie).
    _, own = xentjax.linear_softmax_cross_entropy(
      x, w, stats.argmax, return_stats=True, vocab_order=order, **chunks
    )
    z = logits64(x, w)
    ties = np.sum(z == z.max(axis=1, keepdims=True), axis=1)
    np.testing.assert_allclose(np.asarray(own.correct), 1.0 / ties)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_argmax_under_vocab_order_matches_the_unsorted_call(strategy):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(9, 5)).astype(np.float32)
  w = rng.normal(size=(5, 13)).astype(np.float32)
  order = rng.permutation(13).astype(np.int32)
  y = rng.integers(0, 13, size=9).astype(np.int32)
  kw = STRATEGIES[strategy]
  _, plain = xentjax.linear_softmax_cross_entropy(x, w, y, return_stats=True, **kw)
  _, sorted_ = xentjax.linear_softmax_cross_entropy(
    x, w, y, return_stats=True, vocab_order=order, **kw
  )
  np.testing.assert_array_equal(np.asarray(sorted_.argmax), lowest_argmax64(logits64(x, w)))
  np.testing.assert_array_equal(np.asarray(sorted_.argmax), np.asarray(plain.argmax))
