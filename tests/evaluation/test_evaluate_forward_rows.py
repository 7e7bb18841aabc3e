"""Streaming evaluation's per-row step (`_core.forward_row_metrics`) against the dense core.

`xentjax.evaluate` computes the per-row figures of integer labels without a
gradient, so it skips the dense core's neutralized copy of the logits and
takes the normalizer from the other classes' sum. Every field must equal
`_core.row_metrics(..., brier=True)`: the rank counts and credits exactly,
the loss, confidence and Brier score to float32 rounding, on rows with ties,
``-inf`` logits, NaN, ``+inf``, bad and ignored labels and uncounted
garbage rows; and the streamed totals must not change.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import xentjax
from xentjax import _core


def edge_rows():
  """Rows covering every convention of the core, with labels, a mask and an ignored label."""
  rng = np.random.default_rng(0)
  k = 6
  z = np.round(rng.standard_normal((40, k)) * 2).astype(np.float32)  # many ties
  y = rng.integers(0, k, 40)
  z[0] = -np.inf  # every logit -inf: loss +inf, all tied
  z[1, 2:] = -np.inf  # label at -inf among -inf classes
  y[1] = 3
  z[2, 1] = np.nan  # NaN row
  z[3, 4] = np.inf  # +inf on another class
  z[4, 0] = np.inf  # +inf at the label
  y[4] = 0
  z[5] = 7.0  # constant row: credit k/K
  z[6] = [80.0, 0.0, -20.0, -20.0, -40.0, -40.0]  # confident: Brier ~1e-35 relative terms
  y[6] = 0
  z[7] = [1e4, -1e4, 0.0, 3.0, 1e4, 2.0]  # huge logits, a tie at the top
  y[7] = 4
  y[8] = 9  # bad label: NaN
  y[9] = -100  # ignored
  mask = np.ones(40, bool)
  mask[10] = False  # masked garbage row
  z[10] = np.nan
  return z, y, mask


@pytest.mark.parametrize("top_k", [1, 3, 6])
def test_forward_rows_equal_the_dense_core(top_k):
  z, y, mask = edge_rows()
  status = _core.label_status(jnp.asarray(y), z.shape[1], ignore_index=-100, where=mask)
  got = _core.forward_row_metrics(jnp.asarray(z), status, top_k)
  want = _core.row_metrics(jnp.asarray(z), status, top_k, brier=True)
  assert_rows_match(got, want, rtol=1e-6, atol=0.0)  # a few float32 roundings


def assert_rows_match(got, want, *, rtol, atol):
  """Counts and credits exactly, the rest to float32 rounding; the edge rows' conventions."""
  np.testing.assert_array_equal(got.counted, want.counted)
  np.testing.assert_array_equal(got.credit, want.credit)  # rank counts: exact
  np.testing.assert_array_equal(got.credit_k, want.credit_k)
  for name in ("nll", "confidence", "brier"):
    a, b = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
  assert np.isnan(np.asarray(got.nll)[[2, 4, 8]]).all()
  assert np.asarray(got.nll)[0] == np.inf
  assert (np.asarray(got.nll)[[9, 10]] == 0).all()  # not counted: 0, whatever the row holds


def test_forward_rows_keep_a_confident_brier_score_relative():
  """The other classes' sums are never a difference: a 1e-17 Brier score keeps its digits."""
  z = np.array([[40.0, 0.0, -3.0, 1.5]], np.float32)
  status = _core.label_status(jnp.asarray([0]), 4)
  got = float(_core.forward_row_metrics(jnp.asarray(z), status, 1).brier[0])
  zz = z[0].astype(np.float64)
  e = np.exp(zz - zz.max())
  p = e / e.sum()
  want = (e[1:].sum() / e.sum()) ** 2 + (p[1:] ** 2).sum()  # 1 - p_y without a difference
  assert 0 < want < 1e-30
  np.testing.assert_allclose(
    float(_core.row_metrics(jnp.asarray(z), status, 1, brier=True).brier[0]), want, rtol=1e-5
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_streamed_totals_match_the_dense_core_per_row_sums():
  """`evaluate` over several batches gives the sums of the dense core's rows (float64)."""
  z, y, mask = edge_rows()
  keep = mask & (y != -100)
  finite = keep & np.isin(np.arange(40), [0, 2, 3, 4, 8], invert=True)  # a finite total
  rows = _core.row_metrics(
    jnp.asarray(z), _core.label_status(jnp.asarray(y), 6, where=finite), 3, brier=True
  )
  batches = [(z[i : i + 16], y[i : i + 16], finite[i : i + 16]) for i in range(0, 40, 16)]
  got = xentjax.evaluate(batches, top_k=3, progress=False)
  n = finite.sum()
  assert got.count == n
  for field, name in (("nll", "cross_entropy"), ("credit", "accuracy"),
                      ("credit_k", "top_k_accuracy"), ("brier", "brier_score")):  # fmt: skip
    want = np.asarray(getattr(rows, field), np.float64).sum() / n
    np.testing.assert_allclose(getattr(got, name), want, rtol=2e-7, err_msg=name)


def wide_edge_rows(k: int):
  """`edge_rows` over ``k`` classes (a multiple of 16), for the folded passes."""
  rng = np.random.default_rng(1)
  z = np.round(rng.standard_normal((60, k)) * 2).astype(np.float32)  # many ties
  y = rng.integers(0, k, 60)
  z[0] = -np.inf
  z[1, 2:] = -np.inf
  y[1] = k - 1  # label at -inf among -inf classes, in the last block
  z[2, k - 3] = np.nan
  z[3, 17] = np.inf
  z[4, 0] = np.inf
  y[4] = 0
  z[5] = 7.0
  z[6] = -40.0
  z[6, :4] = [80.0, 0.0, -20.0, -20.0]
  y[6] = 0
  z[7, :6] = [1e4, -1e4, 0.0, 3.0, 1e4, 2.0]
  y[7] = 4
  z[11, 16:32] = 9.0  # a tie across a whole block, label inside it
  y[11] = 20
  y[8] = k + 3  # bad label
  y[9] = -100
  mask = np.ones(60, bool)
  mask[10] = False
  z[10] = np.nan
  return z, y, mask


# 4096 classes: the rank code is summed in int32 (float32 would round it).
@pytest.mark.parametrize("k, width", [(64, 16), (32, 16), (48, 8), (128, 16), (4096, 256)])
@pytest.mark.parametrize("top_k", [1, 5])
def test_folded_forward_rows_equal_the_dense_core(k, width, top_k):
  # `_core.forward_row_stats_folded` (what `evaluate` reads short rows with
  # where `_WHOLE_BATCH_MAX` holds) sums the same terms in another order.
  z, y, mask = wide_edge_rows(k)
  status = _core.label_status(jnp.asarray(y), k, ignore_index=-100, where=mask)
  stats = _core.forward_row_stats_folded(jnp.asarray(z), status.index, width)
  got = _core.forward_metrics_from_stats(stats, status, top_k, k)
  want = _core.row_metrics(jnp.asarray(z), status, top_k, brier=True)
  # Float32 roundings of terms near 1 (a loss of 0.05 is a difference of two such).
  assert_rows_match(got, want, rtol=2e-6, atol=3e-7)
  assert np.asarray(got.credit)[11] == pytest.approx(1 / 16)  # a 16-way tie at the top


def test_folded_rows_keep_a_confident_brier_score_relative():
  z = np.full((1, 64), -30.0, np.float32)
  z[0, :4] = [40.0, 0.0, -3.0, 1.5]
  status = _core.label_status(jnp.asarray([0]), 64)
  stats = _core.forward_row_stats_folded(jnp.asarray(z), status.index)
  got = float(_core.forward_metrics_from_stats(stats, status, 1, 64).brier[0])
  zz = z[0].astype(np.float64)
  e = np.exp(zz - zz.max())
  p = e / e.sum()
  want = (e[1:].sum() / e.sum()) ** 2 + (p[1:] ** 2).sum()
  assert 0 < want < 1e-30
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_folded_rows_need_a_multiple_of_the_width_and_a_code_that_fits():
  with pytest.raises(ValueError, match="multiple of 16"):
    _core.forward_row_stats_folded(jnp.zeros((3, 40)), jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="too many for one rank code"):
    _core.forward_row_stats_folded(jnp.zeros((1, 46352)), jnp.zeros(1, jnp.int32))
