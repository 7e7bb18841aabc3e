"""The softmax-statistics core (`xentjax._core`) and the edge cases it fixes once.

Each regression test below is a case a probe of every path found giving a
wrong or NaN answer on some path; expected values are derived by hand or in
float64 NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax as L
from xentjax import _core, metrics

INF = np.inf
X64 = jax.config.jax_enable_x64


# --- the statistics ----------------------------------------------------------


def test_row_stats_match_numpy():
  z = np.array([[1.0, 3.0, 3.0, -2.0], [0.5, -1.0, 2.0, 2.0]], np.float32)
  y = np.array([1, 0])
  st = _core.row_stats(jnp.asarray(z), jnp.asarray(y, jnp.int32), mean=True, rank=True)
  m = z.max(-1)
  np.testing.assert_allclose(st.m, m)
  np.testing.assert_allclose(st.log_s, np.log(np.exp(z - m[:, None]).sum(-1)), rtol=1e-6)
  np.testing.assert_allclose(st.zy, z[[0, 1], y] - m)
  np.testing.assert_allclose(st.zmean, z.mean(-1) - m, rtol=1e-6)
  np.testing.assert_array_equal(st.n_greater, [0, 2])  # row 1: 2.0 and 2.0 above 0.5
  np.testing.assert_array_equal(st.n_tied, [2, 1])


@pytest.mark.parametrize("k", [7, 46341])  # one packed integer sum, and two sums past int32
def test_rank_counts_match_numpy_on_both_paths(k):
  rng = np.random.default_rng(k)
  z = rng.integers(-3, 4, (3, k)).astype(np.float32)  # integer logits: many ties
  z[2, 5] = np.nan
  y = np.array([1, 4, 5])
  st = _core.row_stats(jnp.asarray(z), jnp.asarray(y, jnp.int32), rank=True)
  zy = z[np.arange(3), y][:, None]
  np.testing.assert_array_equal(st.n_greater[:2], (z > zy).sum(-1)[:2])
  np.testing.assert_array_equal(st.n_tied[:2], (z == zy).sum(-1)[:2])
  assert np.isnan(st.n_greater[2]) and np.isnan(st.n_tied[2])


def test_row_stats_brier_terms_match_float64():
  z = np.array([[20.0, 0, -1, 3], [0.5, -1.0, 2.0, 2.0]], np.float32)
  y = np.array([0, 3])
  st = _core.row_stats(jnp.asarray(z), jnp.asarray(y, jnp.int32), brier=True)
  e = np.exp(z.astype(np.float64) - z.max(-1, keepdims=True))
  other = np.where(np.arange(4) == y[:, None], 0.0, e)
  np.testing.assert_allclose(st.s_other, other.sum(-1), rtol=1e-6)
  np.testing.assert_allclose(st.sq_other, (other**2).sum(-1), rtol=1e-6)
  p = e / e.sum(-1, keepdims=True)
  brier = ((p - np.eye(4)[y]) ** 2).sum(-1)
  np.testing.assert_allclose(
    _core.brier_from_stats(st.log_s, st.s_other, st.sq_other, 4), brier, rtol=1e-6
  )


def test_label_status_has_no_wraparound():
  for dt in (np.uint8, np.uint16):
    labels = jnp.asarray(np.array([156, 65436 % (np.iinfo(dt).max + 1), 2]).astype(dt))
    s = _core.label_status(labels, 3, ignore_index=-100)
    np.testing.assert_array_equal(s.counted, [True, True, True])  # -100 never equals them
    np.testing.assert_array_equal(s.bad, [True, True, False])
    np.testing.assert_array_equal(s.index, [0, 0, 2])
  # More classes than the dtype can hold: every label is in range.
  s = _core.label_status(jnp.asarray(np.array([255], np.uint8)), 300)
  assert not bool(s.bad[0]) and int(s.index[0]) == 255


@pytest.mark.skipif(not X64, reason="64-bit labels exist only with JAX_ENABLE_X64=1")
def test_64_bit_label_is_out_of_range_not_truncated():
  labels = jnp.asarray(np.array([2**32 + 1, 1], np.int64))
  s = _core.label_status(labels, 3)
  np.testing.assert_array_equal(s.bad, [True, False])
  z = jnp.zeros((2, 3))
  assert np.isnan(L.cross_entropy_loss(z, labels, reduction="none")[0])
  assert np.isnan(L.softmax_cross_entropy_with_integer_labels(z, labels)[0])


def test_top_k_credit_and_empty_mean():
  np.testing.assert_allclose(_core.top_k_credit(0, 10, 1), 0.1)  # constant model: k/K
  np.testing.assert_allclose(_core.top_k_credit(2, 4, 3), 0.25)
  np.testing.assert_allclose(_core.top_k_credit(0, 1, 1), 1.0)
  g = jax.grad(lambda t: _core.mean_or_nan(t, 0))(1.0)
  assert np.isnan(_core.mean_or_nan(1.0, 0)) and g == 0.0


# --- regression tests: the probes ---------------------------------------


def test_full_smoothing_on_a_minus_inf_class_is_inf_on_every_path():
  z = jnp.array([[-INF, 1.0, 2.0]])
  y = jnp.array([0])
  assert float(L.softmax_cross_entropy_with_integer_labels(z, y, label_smoothing=1.0)[0]) == INF
  assert float(L.softmax_cross_entropy(z, jnp.eye(3)[y], label_smoothing=1.0)[0]) == INF
  assert float(L.cross_entropy_loss(z, y, label_smoothing=1.0)) == INF
  assert float(L.cross_entropy_loss(z, jnp.eye(3)[y], label_smoothing=1.0)) == INF


def test_rows_that_do_not_count_have_a_zero_gradient_even_when_all_minus_inf():
  za = jnp.array([[1.0, 2.0, 3.0], [-INF, -INF, -INF]])
  p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
  want = np.stack([p - np.eye(3)[2], np.zeros(3)])
  ignored = jax.grad(lambda v: L.cross_entropy_loss(v, jnp.array([2, -100])))(za)
  np.testing.assert_allclose(ignored, want, rtol=1e-6)
  # Zero class weight on the second row's label: it counts in nothing.
  w = jnp.array([1.0, 0.0, 1.0])
  zero_w = jax.grad(lambda v: L.cross_entropy_loss(v, jnp.array([2, 1]), weight=w))(za)
  np.testing.assert_allclose(zero_w, want, rtol=1e-6)
  # An all-zero soft target.
  t = jnp.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
  soft = jax.grad(lambda v: L.cross_entropy_loss(v, t, reduction="sum"))(za)
  np.testing.assert_allclose(soft, want, rtol=1e-6)


def test_zero_class_weight_on_a_minus_inf_class_with_smoothing_is_finite():
  z = jnp.array([[-INF, 1.0, 2.0]])
  w = jnp.array([0.0, 1.0, 1.0])
  got = float(L.cross_entropy_loss(z, jnp.array([1]), weight=w, label_smoothing=0.1))
  lp = np.array([1.0, 2.0]) - np.logaddexp(1.0, 2.0)  # log softmax of the finite classes
  # (1 - eps) w_y (-lp_y) + eps/C sum_c w_c (-lp_c), with 0 * log 0 = 0 for class 0.
  want = (0.9 * -lp[0] + 0.1 / 3 * -(lp[0] + lp[1])) / 1.0
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_huge_logits_z_loss_gradient_and_smoothing_stay_finite():
  big = jnp.array([[3e38, 0.0, -3e38]])
  y = jnp.array([0])
  g = jax.grad(lambda v: L.softmax_cross_entropy_with_integer_labels(v, y, z_loss=1e-4).sum())(big)
  np.testing.assert_allclose(g, [[2e-4 * 3e38, 0.0, 0.0]], rtol=1e-6)  # 2 lam lse p
  sparse = L.softmax_cross_entropy_with_integer_labels(big, y, label_smoothing=0.1)
  dense = L.softmax_cross_entropy(big, jnp.eye(3)[y], label_smoothing=0.1)
  np.testing.assert_allclose(sparse, [3e37], rtol=1e-6)  # 0.1 (lse - mean z)
  np.testing.assert_allclose(dense, sparse, rtol=1e-6)


def test_every_counted_label_out_of_range_gives_nan_mean():
  z = jnp.zeros((2, 3))
  assert np.isnan(float(L.cross_entropy_loss(z, jnp.array([3, 3]))))
  assert np.isnan(float(L.cross_entropy_loss(z, jnp.array([3, 3]), reduction="sum")))


def test_unsigned_labels_keep_every_token():
  z = jnp.zeros((2, 3))
  for dt in (jnp.uint8, jnp.uint16):
    labels = jnp.array([1, 2], dt)
    np.testing.assert_allclose(L.cross_entropy_loss(z, labels), np.log(3), rtol=1e-6)
    np.testing.assert_allclose(metrics.cross_entropy_rate(z, labels), np.log(3), rtol=1e-6)
    r = L.evaluate([(np.zeros((2, 3), np.float32), np.array([1, 2], dt))], progress=False)
    assert r.count == 2


def test_large_logits_lose_no_precision():
  z = 1e7 + jnp.array([[0.0, 1.0, 2.0]])
  want = np.log(np.exp([-2.0, -1.0, 0.0]).sum()) + 2.0  # lse - z_0, shifted by the max
  y = jnp.array([0])
  np.testing.assert_allclose(metrics.cross_entropy_rate(z, y), want, rtol=1e-6)
  np.testing.assert_allclose(metrics.perplexity(z, y), np.exp(want), rtol=1e-6)
  np.testing.assert_allclose(L.softmax_cross_entropy_with_integer_labels(z, y), [want], rtol=1e-6)
  np.testing.assert_allclose(L.cross_entropy_loss(z, y), want, rtol=1e-6)


def test_a_nan_row_is_nan_in_metrics_as_in_evaluate():
  z = np.array([[0.0, 2.0, 1.0], [np.nan, 0.0, 0.0]], np.float32)
  y = np.array([1, 1])
  assert np.isnan(float(metrics.accuracy(z, y)))
  assert np.isnan(float(metrics.top_k_accuracy(z, y, k=2)))
  assert np.isnan(L.evaluate([(z, y)], top_k=2, progress=False).accuracy)
