"""Tests for xentjax.metrics against float64 NumPy/SciPy references and optax."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from xentjax import metrics

X64 = jax.config.jax_enable_x64
RTOL = 1e-10 if X64 else 2e-5
ATOL = 1e-12 if X64 else 2e-6


def _batch(seed, n=16, k=7, scale=2.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, k)) * scale
  labels = rng.integers(0, k, size=(n,))
  return logits, labels


def _np_ce(logits, labels):
  """-log softmax(z)[y] in float64, straight from the definition."""
  lse = scipy.special.logsumexp(logits, axis=-1)
  return lse - np.take_along_axis(logits, labels[..., None], -1)[..., 0]


def _np_rank_hits(logits, labels, k):
  """Expected top-k hit under a uniformly random tie break, by counting positions.

  With g classes strictly above the label and t classes equal to it (label
  included), the label's place is uniform over g+1, ..., g+t; the credit is
  the fraction of those places that are <= k.
  """
  flat_z = logits.reshape(-1, logits.shape[-1])
  flat_y = labels.reshape(-1)
  hits = []
  for z, y in zip(flat_z, flat_y):
    g, t = int(np.sum(z > z[y])), int(np.sum(z == z[y]))
    hits.append(sum(g + j <= k for j in range(1, t + 1)) / t)
  return np.array(hits, float).reshape(labels.shape)


# accuracy and top-k.


def test_accuracy_matches_numpy_argmax():
  logits, labels = _batch(0)
  want = np.mean(np.argmax(logits, -1) == labels)
  np.testing.assert_allclose(metrics.accuracy(logits, labels), want, rtol=RTOL)
  np.testing.assert_array_equal(metrics.correct(logits, labels), np.argmax(logits, -1) == labels)


def test_accuracy_with_where_matches_boolean_indexing():
  logits, labels = _batch(1)
  keep = np.random.default_rng(1).random(16) < 0.5
  want = np.mean(np.argmax(logits[keep], -1) == labels[keep])
  np.testing.assert_allclose(metrics.accuracy(logits, labels, where=keep), want, rtol=RTOL)


def test_accuracy_shares_ties():
  logits = jnp.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
  # A t-way tie at the top is worth 1/t to each tied class, whichever index.
  np.testing.assert_allclose(metrics.correct(logits, jnp.array([1, 0])), [1 / 2, 1 / 3])
  np.testing.assert_allclose(metrics.correct(logits, jnp.array([2, 2])), [1 / 2, 1 / 3])
  np.testing.assert_array_equal(metrics.correct(logits, jnp.array([0, 1]))[0], 0.0)


def test_integer_valued_logits_match_the_counting_reference():
  rng = np.random.default_rng(12)
  logits = rng.integers(-2, 3, size=(600, 12)).astype(np.float32)
  labels = rng.integers(0, 12, size=600)
  for k in (1, 5):
    want = np.mean(_np_rank_hits(logits, labels, k))
    np.testing.assert_allclose(metrics.top_k_accuracy(logits, labels, k=k), want, rtol=1e-5)
  np.testing.assert_allclose(
    metrics.accuracy(logits, labels), np.mean(_np_rank_hits(logits, labels, 1)), rtol=1e-5
  )


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_top_k_matches_rank_rule_and_argsort(k):
  logits, labels = _batch(2, n=32)
  got = metrics.top_k_accuracy(logits, labels, k=k)
  np.testing.assert_allclose(got, np.mean(_np_rank_hits(logits, labels, k)), rtol=RTOL)
  # Continuous random logits have no ties, so the rank rule is "label in the k best".
  top = np.argsort(-logits, axis=-1)[:, :k]
  np.testing.assert_allclose(got, np.mean(np.any(top == labels[:, None], -1)), rtol=RTOL)


def test_top_k_ties_are_shared():
  logits = jnp.array([[1.0, 1.0, 1.0, 0.0]] * 4)
  labels = jnp.array([0, 2, 3, 1])
  # Three classes tied at the top: each keeps place 1 with probability 1/3.
  np.testing.assert_allclose(metrics.top_k_correct(logits, labels, k=1), [1 / 3, 1 / 3, 0, 1 / 3])
  np.testing.assert_allclose(metrics.top_k_correct(logits, labels, k=2), [2 / 3, 2 / 3, 0, 2 / 3])
  # Class 3 has three classes strictly above it: a miss at k=3, a hit at k=4.
  np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, k=3), [1, 1, 0, 1])
  np.testing.assert_array_equal(metrics.top_k_correct(logits, labels, k=4), [1, 1, 1, 1])
  # A constant model scores k/K: never a full hit for a tie.
  flat = jnp.zeros((3, 5))
  for k in (1, 2, 5):
    np.testing.assert_allclose(
      metrics.top_k_accuracy(flat, jnp.array([0, 3, 4]), k=k), k / 5, rtol=RTOL
    )
  np.testing.assert_allclose(metrics.accuracy(flat, jnp.array([0, 3, 4])), 1 / 5, rtol=RTOL)


def test_top_k_default_is_rank_5():
  logits = jnp.arange(10.0)[None, :].repeat(2, 0)
  # Label 5 has classes 6..9 above it (4 < 5): hit; label 4 has 5 above: miss.
  np.testing.assert_array_equal(metrics.top_k_correct(logits, jnp.array([5, 4])), [1, 0])


def test_top_k_works_on_extra_batch_axes():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 3, 6))
  labels = rng.integers(0, 6, size=(2, 3))
  np.testing.assert_array_equal(
    metrics.top_k_correct(logits, labels, k=2), _np_rank_hits(logits, labels, 2)
  )


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 1.0]))
def test_top1_dominates_accuracy_and_top_k_is_monotone(seed, round_to):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(8, 5))
  if round_to:  # integer logits make ties common
    logits = np.round(logits * 2)
  labels = rng.integers(0, 5, size=(8,))
  acc = float(metrics.accuracy(logits, labels))
  tops = [float(metrics.top_k_accuracy(logits, labels, k=k)) for k in range(1, 6)]
  assert tops[0] >= acc
  assert all(a <= b for a, b in itertools.pairwise(tops))
  assert tops[-1] == 1.0
  if not round_to:
    assert tops[0] == acc


# cross-entropy rate, perplexity, bits per token.


@pytest.mark.parametrize("base", [None, 2, 10, 0.5])
def test_cross_entropy_rate_matches_float64_reference_and_optax(base):
  logits, labels = _batch(4, scale=3.0)
  want = np.mean(_np_ce(logits, labels)) / (1.0 if base is None else math.log(base))
  got = metrics.cross_entropy_rate(logits, labels, base=base)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  if base is None:
    ref = optax.losses.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), labels)
    np.testing.assert_allclose(got, jnp.mean(ref), rtol=1e-5)


def test_perplexity_and_bits_per_token_identities():
  logits, labels = _batch(5, scale=3.0)
  nats = np.mean(_np_ce(logits, labels))
  ppl = metrics.perplexity(logits, labels)
  np.testing.assert_allclose(ppl, np.exp(nats), rtol=RTOL)
  bpt = metrics.bits_per_token(logits, labels)
  np.testing.assert_allclose(bpt, nats / math.log(2), rtol=RTOL)
  np.testing.assert_allclose(metrics.perplexity(logits, labels, base=2), bpt, rtol=RTOL)
  # log2(PPL) = bits per token.
  np.testing.assert_allclose(np.log2(float(ppl)), float(bpt), rtol=1e-5)


@pytest.mark.parametrize("k", [2, 10, 256])
def test_uniform_model_has_perplexity_num_classes(k):
  logits = jnp.zeros((4, k))
  labels = jnp.array([0, 1, k - 1, k // 2])
  np.testing.assert_allclose(metrics.perplexity(logits, labels), k, rtol=1e-5)
  np.testing.assert_allclose(metrics.bits_per_token(logits, labels), math.log2(k), rtol=1e-5)


def test_perplexity_where_matches_boolean_indexing():
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(3, 5, 9)) * 2
  labels = rng.integers(0, 9, size=(3, 5))
  keep = rng.random((3, 5)) < 0.6
  want = np.exp(np.mean(_np_ce(logits[keep], labels[keep])))
  np.testing.assert_allclose(metrics.perplexity(logits, labels, where=keep), want, rtol=1e-5)


def test_cross_entropy_rate_gradient_is_softmax_minus_onehot_over_n():
  logits, labels = _batch(7, n=6, k=4)
  g = jax.grad(lambda z: metrics.cross_entropy_rate(z, labels))(jnp.asarray(logits))
  sm = np.exp(logits - scipy.special.logsumexp(logits, -1, keepdims=True))
  want = (sm - np.eye(4)[labels]) / 6
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


def test_large_and_infinite_logits():
  logits = jnp.array([[1e4, 0.0, -1e4], [1e4, 0.0, -1e4], [0.0, -jnp.inf, 1.0]])
  labels = jnp.array([0, 2, 2])
  ce = [0.0, 2e4, math.log1p(math.exp(-1.0))]
  np.testing.assert_allclose(metrics.cross_entropy_rate(logits, labels), np.mean(ce), rtol=1e-6)
  g = jax.grad(lambda z: metrics.cross_entropy_rate(z, labels))(logits)
  assert np.all(np.isfinite(g))
  # -inf at the true class: the model says the label is impossible.
  inf_at_label = metrics.cross_entropy_rate(jnp.array([[0.0, -jnp.inf]]), jnp.array([1]))
  assert float(inf_at_label) == np.inf


# Edge cases decided once.


@pytest.mark.parametrize("bad", [-1, 5, 100])
def test_out_of_range_label_gives_nan(bad):
  logits = jnp.zeros((2, 5))
  labels = jnp.array([0, bad])
  for fn in (
    metrics.accuracy,
    metrics.top_k_accuracy,
    metrics.cross_entropy_rate,
    metrics.perplexity,
  ):
    assert math.isnan(float(fn(logits, labels))), fn.__name__
  assert math.isnan(float(metrics.correct(logits, labels)[1]))
  np.testing.assert_allclose(metrics.correct(logits, labels)[0], 1 / 5)  # 5-way tie


def test_masked_examples_are_never_looked_at():
  logits = jnp.array([[0.0, 2.0], [jnp.nan, jnp.nan], [1.0, 0.0]])
  labels = jnp.array([1, -100, 0])
  keep = jnp.array([True, False, True])
  assert float(metrics.accuracy(logits, labels, where=keep)) == 1.0
  want = math.log1p(math.exp(-2.0)) / 2 + math.log1p(math.exp(-1.0)) / 2
  np.testing.assert_allclose(
    metrics.cross_entropy_rate(logits, labels, where=keep), want, rtol=1e-6
  )
  g = jax.grad(lambda z: metrics.cross_entropy_rate(z, labels, where=keep))(logits)
  assert np.all(np.isfinite(g)) and np.all(g[1] == 0)


def test_all_masked_gives_nan_with_zero_gradient():
  logits, labels = _batch(8, n=4, k=3)
  keep = jnp.zeros(4, bool)
  for fn in (
    metrics.accuracy,
    metrics.top_k_accuracy,
    metrics.cross_entropy_rate,
    metrics.perplexity,
    metrics.bits_per_token,
  ):
    kwargs = {"k": 2} if fn is metrics.top_k_accuracy else {}
    assert math.isnan(float(fn(logits, labels, where=keep, **kwargs))), fn.__name__
    g = jax.grad(lambda z, f=fn, kw=kwargs: f(z, labels, where=keep, **kw))(jnp.asarray(logits))
    np.testing.assert_array_equal(g, np.zeros_like(logits))


def test_empty_batch_gives_nan():
  empty = (jnp.zeros((0, 4)), jnp.zeros((0,), jnp.int32))
  assert math.isnan(float(metrics.cross_entropy_rate(*empty)))
  assert math.isnan(float(metrics.accuracy(*empty)))


def test_non_finite_rows():
  logits = jnp.array([[0.0, 1.0, 2.0], [0.0, jnp.nan, 2.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
  labels = jnp.array([2, 0, 1])
  # A NaN logit: that example is NaN in every metric.
  for out in (metrics.correct(logits, labels), metrics.top_k_correct(logits, labels, k=2)):
    assert out[0] == 1.0 and math.isnan(out[1])
  # Every logit -inf: cross-entropy +inf, all K classes tied (credit k/K).
  np.testing.assert_allclose(metrics.correct(logits[2:], labels[2:]), [1 / 3])
  np.testing.assert_allclose(metrics.top_k_correct(logits[2:], labels[2:], k=2), [2 / 3])
  assert float(metrics.cross_entropy_rate(logits[2:], labels[2:])) == np.inf
  assert math.isnan(float(metrics.accuracy(logits, labels)))


def test_large_logits_keep_their_precision():
  z = 1e7 + np.array([[0.0, 1.0, 2.0]])
  want = float(_np_ce(np.array([[0.0, 1.0, 2.0]]), np.array([0]))[0])  # shift invariance
  np.testing.assert_allclose(metrics.cross_entropy_rate(z, jnp.array([0])), want, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_logits_compute_in_float32(dtype):
  logits, labels = _batch(9, scale=3.0)
  z = jnp.asarray(logits, dtype)
  out = metrics.cross_entropy_rate(z, labels)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np.mean(_np_ce(np.asarray(z, np.float64), labels)), rtol=1e-5)
  assert metrics.accuracy(z, labels).dtype == jnp.float32


def test_jit_and_vmap_agree_with_eager_loop():
  rng = np.random.default_rng(10)
  logits = jnp.asarray(rng.normal(size=(3, 6, 5)))
  labels = jnp.asarray(rng.integers(0, 5, size=(3, 6)))
  for fn in (metrics.accuracy, metrics.top_k_accuracy, metrics.perplexity):
    loop = jnp.stack([fn(logits[i], labels[i]) for i in range(3)])
    np.testing.assert_allclose(jax.vmap(fn)(logits, labels), loop, rtol=RTOL)
    np.testing.assert_allclose(jax.jit(fn)(logits[0], labels[0]), loop[0], rtol=RTOL)


# Errors at trace time.


def test_float_labels_rejected():
  with pytest.raises(TypeError, match="`labels` must be an integer"):
    metrics.accuracy(jnp.zeros((2, 3)), jnp.array([0.0, 1.0]))
  with pytest.raises(TypeError, match="`labels` must be an integer"):
    metrics.perplexity(jnp.zeros((2, 3)), jnp.array([[0.0, 1.0, 0.0]] * 2))


def test_integer_logits_rejected():
  with pytest.raises(TypeError, match="`logits` must be a floating-point"):
    metrics.top_k_accuracy(jnp.zeros((2, 3), jnp.int32), jnp.array([0, 1]), k=1)


def test_shape_mismatch_shows_shapes():
  with pytest.raises(ValueError, match=r"logits.shape=\(2, 3\) and labels.shape=\(3,\)"):
    metrics.cross_entropy_rate(jnp.zeros((2, 3)), jnp.array([0, 1, 2]))
  with pytest.raises(ValueError, match=r"where.shape=\(3,\)"):
    metrics.accuracy(jnp.zeros((2, 3)), jnp.array([0, 1]), where=jnp.array([True, True, False]))


@pytest.mark.parametrize("k", [0, 4, -1])
def test_bad_k_rejected(k):
  with pytest.raises(ValueError, match="`k` must"):
    metrics.top_k_accuracy(jnp.zeros((2, 3)), jnp.array([0, 1]), k=k)


@pytest.mark.parametrize("base", [0, -1, 1])
def test_bad_base_rejected(base):
  with pytest.raises(ValueError, match="base"):
    metrics.perplexity(jnp.zeros((2, 3)), jnp.array([0, 1]), base=base)
  with pytest.raises(ValueError, match="base"):
    metrics.cross_entropy_rate(jnp.zeros((2, 3)), jnp.array([0, 1]), base=base)


def test_floating_where_rejected():
  with pytest.raises(TypeError, match="boolean"):
    metrics.accuracy(jnp.zeros((2, 3)), jnp.array([0, 1]), where=jnp.array([1.0, 0.0]))
