"""`linear_token_stats(..., support=)`: the log-probability renormalized over a sampler's support,
against a dense float64 log-softmax restricted to the support, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax

N, D, V, K = 9, 5, 17, 6


def data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, D)).astype(np.float32)
  w = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
  w[:, 4] = w[:, 3]  # a tie: classes 3 and 4 have equal logits
  b = (rng.normal(size=V) * 0.3).astype(np.float32)
  b[7] = -np.inf  # a class no token can draw
  y = rng.integers(0, V - 1, N)
  y[y == 7] = 8
  support = np.full((N, K), -1)
  for i in range(N):
    k = rng.integers(1, K + 1)
    others = rng.permutation(np.setdiff1d(np.arange(V), [y[i]]))[: k - 1]
    row = rng.permutation(np.concatenate([[y[i]], others]))
    support[i, :k] = row
  support[0, :4] = [3, 4, y[0], 7] if y[0] not in (3, 4) else [y[0], 3 if y[0] == 4 else 4, 7, -1]
  support[0, 4:] = -1
  return x, w, b, y, support


def dense(x, w, b, y, support, t, cap=None):
  """float64: z[y] - logsumexp(z[support]) from the materialized logits."""
  dead = jnp.isneginf(b)[None, :]  # a -inf bias stays -inf (no inf * 0 in d/dT)
  z = x @ w + jnp.where(dead, 0.0, b[None, :])
  if cap is not None:
    z = cap * jnp.tanh(z / cap)
  z = jnp.where(dead, -jnp.inf, z / t)
  zs = jnp.take_along_axis(z, jnp.maximum(support, 0), axis=1)
  lse = jax.nn.logsumexp(jnp.where(support >= 0, zs, -jnp.inf), axis=1)
  return jnp.take_along_axis(z, y[:, None], axis=1)[:, 0] - lse


@pytest.mark.parametrize("opts", [{}, {"logit_soft_cap": 2.0, "w_layout": "vd"}])
def test_support_logprob_and_gradients_equal_dense_float64(opts):
  x, w, b, y, support = data()
  coef = np.random.default_rng(1).normal(size=N)
  cap = opts.get("logit_soft_cap")
  w_in = w.T.copy() if opts.get("w_layout") == "vd" else w

  def ours(x, w_in, b, t):
    s = xentjax.linear_token_stats(x, w_in, y, bias=b, temperature=t, support=support, **opts)
    return jnp.sum(s.support_logprob * coef), s

  grads, s = jax.grad(ours, argnums=(0, 1, 2, 3), has_aux=True)(x, w_in, b, jnp.float32(0.8))
  with jax.enable_x64(True):

    def ref(x, w, b, t):
      v = dense(x, w, b, jnp.asarray(y), jnp.asarray(support), t, cap)
      return jnp.sum(v * coef), v

    args = (jnp.asarray(a, jnp.float64) for a in (x, w, b, 0.8))
    want_g, want = jax.grad(ref, argnums=(0, 1, 2, 3), has_aux=True)(*args)
  np.testing.assert_allclose(s.support_logprob, want, rtol=2e-5, atol=2e-6)
  assert np.isfinite(s.support_logprob).all()
  assert (np.asarray(s.support_logprob) >= np.asarray(s.logprob) - 1e-5).all()  # renormalized up
  gw = np.asarray(grads[1]).T if opts.get("w_layout") == "vd" else grads[1]
  for g, wg in zip((grads[0], gw, grads[2], grads[3]), want_g, strict=True):
    np.testing.assert_allclose(g, wg, rtol=2e-4, atol=2e-6)


def test_full_support_equals_logprob_and_single_support_is_zero():
  x, w, _, y, _ = data(2)
  full = np.tile(np.arange(V), (N, 1))
  s = xentjax.linear_token_stats(x, w, y, support=full)
  np.testing.assert_allclose(s.support_logprob, s.logprob, rtol=1e-5, atol=1e-6)
  single = np.full((N, 3), -1)
  single[:, 1] = y
  s = xentjax.linear_token_stats(x, w, y, support=single)
  np.testing.assert_array_equal(s.support_logprob, np.zeros(N))


def test_invalid_supports_give_nan_and_masked_tokens_zero():
  x, w, _, y, support = data(3)
  bad = support.copy()
  bad[1] = np.where(bad[1] == y[1], -1, bad[1])  # label not in its support
  bad[2, -1] = bad[2, 0] if bad[2, 0] >= 0 else y[2]  # a repeated id
  bad[2, -2] = -1
  bad[3, -1] = V + 2  # beyond the vocabulary
  keep = np.ones(N, bool)
  keep[4] = False
  s = xentjax.linear_token_stats(x, w, y, where=keep, support=bad)
  v = np.asarray(s.support_logprob)
  assert np.isnan(v[1:4]).all()
  assert v[4] == 0.0
  assert np.isfinite(np.delete(v, [1, 2, 3])).all()
  assert s.support_logprob is not None
  assert xentjax.linear_token_stats(x, w, y).support_logprob is None


def test_support_shape_and_dtype_are_checked():
  x, w, _, y, support = data(4)
  with pytest.raises(ValueError, match=r"`support` must be \[..., K\]"):
    xentjax.linear_token_stats(x, w, y, support=support[:-1])
  with pytest.raises(TypeError, match="support"):
    xentjax.linear_token_stats(x, w, y, support=support.astype(np.float32))
  mesh = jax.make_mesh((1,), ("vocab",))
  with pytest.raises(ValueError, match="vocabulary-sharded head"):
    xentjax.parallel.linear_token_stats(x, w, y, support=support, mesh=mesh, data_axis=None)


def test_batched_tokens():
  x, w, b, y, support = data(5)
  s1 = xentjax.linear_token_stats(x, w, y, bias=b, support=support)
  s2 = xentjax.linear_token_stats(
    x.reshape(3, 3, D), w, y.reshape(3, 3), bias=b, support=support.reshape(3, 3, K)
  )
  np.testing.assert_allclose(s2.support_logprob.reshape(-1), s1.support_logprob, rtol=1e-6)
