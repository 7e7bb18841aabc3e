"""The library's edges against float64 references: each case decided once (docs/conventions.md).

A wrong argmax under `vocab_order`, NaN gradients from masked padding, rows
whose every logit is ``-inf``, a ``-inf`` label with a traced temperature,
means over nothing, a contrastive scale that is not > 0, and the wording of
the errors that say so.
"""

import jax
import jax.numpy as jnp
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


# ---------------------------------------------------------------------------
# `policy.policy_gradient_loss`: masked padding is never read; nothing counted is NaN.

NORMS = ("sequence", "token", "constant")


def pg_reference64(lp, old, adv, mask, norm, eps=0.2):
  """The clipped loss and its gradient in float64 over the kept tokens only."""
  lp, old = np.asarray(lp, np.float64), np.asarray(old, np.float64)
  adv = np.broadcast_to(np.asarray(adv, np.float64)[:, None], lp.shape)
  r = np.exp(np.where(mask, lp - old, 0.0))
  unclipped = r * adv <= np.clip(r, 1 - eps, 1 + eps) * adv
  tok = np.where(mask, -np.minimum(r * adv, np.clip(r, 1 - eps, 1 + eps) * adv), 0.0)
  dtok = np.where(mask & unclipped, -r * adv, 0.0)
  if norm == "sequence":
    n = mask.sum(1)
    w = np.where(mask, 1.0 / np.maximum(n, 1)[:, None], 0.0) / np.sum(n > 0)
  elif norm == "token":
    w = mask / mask.sum()
  else:
    w = np.ones(lp.shape) / lp.size
  return np.sum(tok * w), dtok * w


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("pad", [-np.inf, np.nan, np.inf])
def test_policy_gradient_masked_padding_gives_a_zero_gradient(norm, pad):
  lp = np.array([[-0.7, -1.1, -0.3], [-2.0, -0.5, -0.9]], np.float32)
  old = np.array([[-1.2, -0.9, -0.4], [-1.9, -0.6, -1.0]], np.float32)
  adv = np.array([1.5, -0.5], np.float32)
  ref = old - 0.1
  mask = np.array([[True, True, False], [True, False, False]])
  want, dwant = pg_reference64(lp, old, adv, mask, norm)
  padded = {k: np.where(mask, a, pad).astype(np.float32) for k, a in (("lp", lp), ("old", old))}
  adv_tok = np.where(mask, adv[:, None], pad).astype(np.float32)
  ref_pad = np.where(mask, ref, pad).astype(np.float32)

  def f(v, a):
    return xentjax.policy.policy_gradient_loss(
      v, a, mask, old_logprobs=padded["old"], normalization=norm
    )

  for a in (adv, adv_tok):
    got, grad = jax.value_and_grad(f)(jnp.asarray(padded["lp"]), a)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), dwant, rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(grad)[~mask] == 0.0)
  # With a KL term, padding in `ref_logprobs` too: still finite, still 0 there.
  grad = jax.grad(
    lambda v: xentjax.policy.policy_gradient_loss(
      v,
      adv,
      mask,
      old_logprobs=padded["old"],
      ref_logprobs=ref_pad,
      kl_coef=0.1,
      normalization=norm,
    )
  )(jnp.asarray(padded["lp"]))
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~mask] == 0.0)


def test_policy_gradient_issue_example():
  grad = jax.grad(
    lambda v: xentjax.policy.policy_gradient_loss(
      v, jnp.ones(1), jnp.array([[True, False]]), old_logprobs=jnp.array([[-1.2, -jnp.inf]])
    )
  )(jnp.array([[-1.2, -1.0]]))
  np.testing.assert_array_equal(np.asarray(grad), [[-1.0, 0.0]])


@pytest.mark.parametrize("norm", NORMS)
def test_policy_gradient_nothing_counted_is_nan_in_every_normalization(norm):
  lp = jnp.array([[-0.7, -1.1], [-2.0, -0.5]])
  mask = jnp.zeros((2, 2), bool)
  f = lambda v: xentjax.policy.policy_gradient_loss(v, jnp.ones(2), mask, normalization=norm)
  value, grad = jax.value_and_grad(f)(lp)
  assert np.isnan(float(value))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  # With a denominator (a microbatch of an accumulated step) it adds 0.
  g = lambda v: xentjax.policy.policy_gradient_loss(
    v, jnp.ones(2), mask, normalization=norm, denominator=4.0
  )
  value, grad = jax.value_and_grad(g)(lp)
  assert float(value) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
