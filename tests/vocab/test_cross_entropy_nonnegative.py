"""No cross-entropy of the library is negative, even where logits are large (float32).

A cross-entropy ``lse(z) - z_y`` is a difference of two numbers of the size of
the logits. Formed from one set of logits (the positive read from the tile
whose log-sum-exp is taken) it is exactly ``>= 0`` in floating point; formed
from two computations of the same logit it can round one ulp below 0, and
the InfoNCE bound ``log B - loss`` then passes its ceiling ``log B``. The
references are float64 NumPy; "a few ulp" is measured in ulps of the largest
logit, the size of the two numbers whose difference the loss is.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

import xentjax

SCALE = 100.0  # CLIP's largest learned scale


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def easy_pairs(seed, n=96, d=32, noise=0.01):
  """Unit-norm embeddings whose positives are far more similar than anything else."""
  rng = np.random.default_rng(seed)
  a = unit(rng.normal(size=(n, d)))
  b = unit(a + noise * rng.normal(size=(n, d)))
  return a.astype(np.float32), b.astype(np.float32)


def clip_rows64(a, b, scale, labels=None):
  """float64 per-row CE of both directions (columns' direction at the positive column)."""
  z = scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
  y = np.arange(z.shape[0]) if labels is None else np.asarray(labels)
  zy = z[np.arange(z.shape[0]), y]
  return logsumexp(z, axis=1) - zy, logsumexp(z, axis=0)[y] - zy, np.abs(z).max()


def few_ulp(largest):
  return 4 * float(np.spacing(np.float32(largest)))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tiles", [{}, {"row_chunk_size": 16, "column_chunk_size": 24}])
def test_clip_at_scale_100_is_nonnegative_and_within_a_few_ulp(seed, tiles):
  a, b = easy_pairs(seed)
  r64, c64, largest = clip_rows64(a, b, SCALE)
  one_way = xentjax.contrastive_loss(a, b, scale=SCALE, symmetric=False, reduction="none", **tiles)
  both = xentjax.contrastive_loss(a, b, scale=SCALE, reduction="none", **tiles)
  mean = xentjax.contrastive_loss(a, b, scale=SCALE, **tiles)
  for got in (one_way, both, mean):
    assert np.all(np.asarray(got) >= 0.0)
  np.testing.assert_allclose(one_way, r64, rtol=0, atol=few_ulp(largest))
  np.testing.assert_allclose(both, 0.5 * (r64 + c64), rtol=0, atol=few_ulp(largest))


def test_clip_with_labels_and_a_traced_scale_is_nonnegative():
  a, b = easy_pairs(7, n=64)
  perm = np.random.default_rng(1).permutation(64)
  b, labels = b[perm], np.argsort(perm)  # row i's positive is b[labels[i]]
  r64, c64, largest = clip_rows64(a, b, SCALE, labels)
  got = jax.jit(lambda s: xentjax.contrastive_loss(a, b, scale=s, labels=labels, reduction="none"))(
    jnp.float32(SCALE)
  )
  assert np.all(np.asarray(got) >= 0.0)
  np.testing.assert_allclose(got, 0.5 * (r64 + c64), rtol=0, atol=few_ulp(largest))


def test_infonce_bound_never_passes_log_b_at_scale_100():
  for seed in range(4):
    a, b = easy_pairs(seed)
    loss = xentjax.contrastive_loss(a, b, scale=SCALE)
    bound = xentjax.info.infonce_lower_bound(loss, a.shape[0])
    assert float(bound) <= float(np.float32(np.log(a.shape[0])))


def test_clip_gradient_is_unchanged_by_reading_the_positive_from_the_tile():
  """The positive's one-hot term goes through the tile: the gradient still matches float64."""
  a, b = easy_pairs(3, n=24, d=8, noise=0.3)
  scale = 4.0

  def ref(a, b, s):
    z = s * a @ b.T
    return np.mean(0.5 * (logsumexp(z, axis=1) + logsumexp(z, axis=0)) - np.diag(z))

  f = lambda a, b, s: xentjax.contrastive_loss(a, b, scale=s, row_chunk_size=8, column_chunk_size=8)
  ga, gb, gs = jax.grad(f, (0, 1, 2))(jnp.asarray(a), jnp.asarray(b), jnp.float32(scale))
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  z = scale * a64 @ b64.T
  p_row = np.exp(z - logsumexp(z, axis=1, keepdims=True))
  p_col = np.exp(z - logsumexp(z, axis=0, keepdims=True))
  dz = (0.5 * (p_row + p_col) - np.eye(len(a))) / len(a)
  np.testing.assert_allclose(ga, scale * dz @ b64, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gb, scale * dz.T @ a64, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gs, np.sum(dz * (a64 @ b64.T)), rtol=1e-4, atol=1e-6)
  assert np.isclose(float(f(a, b, scale)), ref(a64, b64, scale), rtol=1e-5)


# ----------------------------------------------------------------------------
# The fused cross-entropy, token statistics and distillation's hard term read
# the label's logit from the tile of their log-sum-exp already: these pin it.


def large_logit_head(seed, n=128, d=32, v=384):
  """Tokens whose label logit is about 100, far above the rest."""
  rng = np.random.default_rng(seed)
  w = unit(rng.normal(size=(v, d))).T  # [D, V], unit columns
  y = rng.integers(0, v, size=n)
  x = SCALE * w[:, y].T + 0.01 * rng.normal(size=(n, d))
  return x.astype(np.float32), w.astype(np.float32), y.astype(np.int32)


def dense_ce64(x, w, y):
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  return logsumexp(z, axis=1) - z[np.arange(len(y)), y], np.abs(z).max()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("chunks", [{}, {"token_chunk_size": 40, "vocab_chunk_size": 96}])
def test_fused_cross_entropy_and_token_stats_at_large_logits(seed, chunks):
  x, w, y = large_logit_head(seed)
  ce64, largest = dense_ce64(x, w, y)
  ce = xentjax.linear_softmax_cross_entropy(x, w, y, reduction="none", **chunks)
  stats = xentjax.linear_token_stats(x, w, y, **chunks)
  assert np.all(np.asarray(ce) >= 0.0)
  assert np.all(np.asarray(stats.logprob) <= 0.0)
  assert np.all(np.asarray(stats.entropy) >= 0.0)
  np.testing.assert_allclose(ce, ce64, rtol=0, atol=few_ulp(largest))
  np.testing.assert_allclose(-np.asarray(stats.logprob), ce64, rtol=0, atol=few_ulp(largest))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_hard_term_at_large_logits(temperature):
  x, w, y = large_logit_head(5)
  ce64, largest = dense_ce64(x, w, y)
  # With the student as its own teacher every divergence is 0, so the loss is the hard term.
  got = xentjax.linear_distillation_loss(
    x, w, x, w, y, hard_weight=1.0, temperature=temperature, reduction="none"
  )
  assert np.all(np.asarray(got) >= 0.0)
  np.testing.assert_allclose(got, ce64, rtol=0, atol=few_ulp(largest))


def tempered_ref(x, w, y, temperature=1.0, logit_soft_cap=None):
  """float64 ``-log p_y`` and ``H(p)`` of ``softmax(c tanh(x w / c) / T)``."""
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  if logit_soft_cap is not None:
    z = logit_soft_cap * np.tanh(z / logit_soft_cap)
  a = z / temperature
  logp = a - logsumexp(a, axis=1, keepdims=True)
  ent = -np.sum(np.where(logp > -np.inf, np.exp(logp) * logp, 0.0), axis=1)
  return -logp[np.arange(len(y)), y], ent, np.abs(a).max()


@pytest.mark.parametrize(
  "options",
  [
    {"temperature": 0.7},
    {"temperature": 0.3},
    {"logit_soft_cap": 150.0},
    {"temperature": 0.6, "logit_soft_cap": 90.0},
  ],
)
def test_token_stats_with_a_scaled_tile_keep_their_signs(options):
  """A temperature or soft cap is a product XLA may fuse into a multiply-add with the shift."""
  worst_lp, worst_h = -np.inf, np.inf
  for seed in range(4):
    x, w, y = large_logit_head(seed)
    x = x * options.get("temperature", 1.0)  # tempered logits of about 100
    nll64, h64, largest = tempered_ref(x, w, y, **options)
    stats = xentjax.linear_token_stats(x, w, y, **options)
    ce = xentjax.linear_softmax_cross_entropy(x, w, y, reduction="none", **options)
    worst_lp = max(worst_lp, float(np.max(stats.logprob)))
    worst_h = min(worst_h, float(np.min(stats.entropy)), float(np.min(ce)))
    np.testing.assert_allclose(-np.asarray(stats.logprob), nll64, rtol=0, atol=few_ulp(largest))
    np.testing.assert_allclose(stats.entropy, h64, rtol=0, atol=few_ulp(largest))
  assert worst_lp <= 0.0
  assert worst_h >= 0.0
