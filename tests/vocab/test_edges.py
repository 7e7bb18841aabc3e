"""The vocabulary family at its edges: -inf logits.

A ``-inf`` bias entry is how RL and constrained decoding mask vocabulary
entries, and a teacher with ``-inf`` logits is any teacher with a masked
vocabulary. Each case is checked against the materialized computation in
float64 NumPy (0 log 0 = 0), for every strategy, with small ragged tiles so
the masked columns fall in different tiles.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax

TILES = {
  "recompute": {"token_chunk_size": 2, "vocab_chunk_size": 4},
  "store": {"token_chunk_size": 2},
}
BIAS = np.array([0.0, -np.inf, 1.0, -np.inf, 0.5, 2.0, 0.3, -np.inf, 1.5], np.float32)


def data(seed=0, n=5, d=4):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(d, BIAS.size)).astype(np.float32)
  return x, w


def log_softmax64(z):
  z = np.asarray(z, np.float64)
  m = np.max(z, axis=-1, keepdims=True)
  return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def logits64(x, w, b=BIAS):
  return np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_smoothing_with_a_masked_class_is_inf(strategy):
  # The smoothed target puts eps/V on every class, a -inf logit among them: +inf
  # (the dense loss's and PyTorch's answer), not a finite number.
  x, w = data()
  y = np.array([0, 2, 4, 5, 8 - 2], np.int32)
  got = xentjax.linear_softmax_cross_entropy(
    x, w, y, bias=BIAS, label_smoothing=0.1, strategy=strategy, **TILES[strategy]
  )
  logp = log_softmax64(logits64(x, w))
  nll = -logp[np.arange(5), y]
  smooth = -np.mean(logp, axis=-1)  # +inf: -inf entries
  want = np.mean(0.9 * nll + 0.1 * smooth)
  assert want == np.inf and float(got) == np.inf
  # Without smoothing the same batch is finite and exact.
  got = xentjax.linear_softmax_cross_entropy(
    x, w, y, bias=BIAS, strategy=strategy, **TILES[strategy]
  )
  np.testing.assert_allclose(float(got), np.mean(nll), rtol=1e-5)


def test_top_k_lists_each_class_once_masked_ones_last_in_index_order():
  x, w = data(1)
  y = np.zeros(5, np.int32)
  k = BIAS.size  # more than the 6 finite classes: the 3 masked ones come last
  s = xentjax.linear_token_stats(x, w, y, bias=BIAS, top_k=k, vocab_chunk_size=4)
  logp = log_softmax64(logits64(x, w))
  finite = np.isfinite(BIAS)
  for i in range(5):
    idx = np.asarray(s.top_k_indices[i])
    assert sorted(idx.tolist()) == list(range(k))  # each class once
    order = np.argsort(-logp[i][finite], kind="stable")
    want = np.concatenate([np.flatnonzero(finite)[order], np.flatnonzero(~finite)])
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(np.asarray(s.top_k_logprobs[i]), logp[i][want], rtol=1e-5)
  # Vocabulary tiles of one column, and fewer slots than classes: the same rule.
  s3 = xentjax.linear_token_stats(x, w, y, bias=BIAS, top_k=7, vocab_chunk_size=1)
  np.testing.assert_array_equal(np.asarray(s3.top_k_indices), np.asarray(s.top_k_indices)[:, :7])


def test_a_masked_class_leaves_token_stats_gradients_finite():
  x, w = data(2)
  y = np.array([0, 2, 4, 5, 6], np.int32)

  def fused(x, w):
    s = xentjax.linear_token_stats(x, w, y, bias=BIAS, token_chunk_size=2, vocab_chunk_size=4)
    return jnp.sum(s.logprob) - 0.1 * jnp.sum(s.entropy) + 0.5 * jnp.sum(s.lse)

  def reference(x, w):  # float64, with p log p = 0 where p = 0
    z = x @ w + jnp.where(jnp.isfinite(BIAS), BIAS, -1e30)[None, :]  # the softmax, finite
    logp = jax.nn.log_softmax(z, axis=-1)
    lp = jnp.take_along_axis(logp, jnp.asarray(y)[:, None], axis=-1)[:, 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.sum(lp) - 0.1 * jnp.sum(ent) + 0.5 * jnp.sum(jax.nn.logsumexp(z, axis=-1))

  gx, gw = jax.grad(fused, (0, 1))(x, w)
  with jax.enable_x64(True):
    rx, rw = jax.grad(reference, (0, 1))(*(jnp.asarray(a, jnp.float64) for a in (x, w)))
  for g, r in ((gx, rx), (gw, rw)):
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
  # The gradient of `lse` alone, the case with a zero entropy cotangent.
  g_lse = jax.grad(lambda w: jnp.sum(xentjax.linear_token_stats(x, w, y, bias=BIAS).lse))(w)
  assert np.all(np.isfinite(np.asarray(g_lse)))


@pytest.mark.parametrize("strategy", ["recompute", "store"])
@pytest.mark.parametrize("how", ["token_weight", "class_weight"])
def test_zero_weight_on_a_masked_label_adds_nothing(strategy, how):
  x, w = data(3)
  y = np.array([0, 1, 4, 5, 8], np.int32)  # token 1's label (class 1) has logit -inf
  tw = np.array([1.0, 0.0, 2.0, 1.0, 0.5], np.float32)
  cw = np.linspace(0.5, 1.5, BIAS.size).astype(np.float32)
  cw[1] = 0.0
  kw = {"weights": tw} if how == "token_weight" else {"class_weights": cw}

  def fused(x, w):
    return xentjax.linear_softmax_cross_entropy(
      x, w, y, bias=BIAS, strategy=strategy, **kw, **TILES[strategy]
    )

  loss, (gx, gw) = jax.value_and_grad(fused, (0, 1))(x, w)
  nll = -log_softmax64(logits64(x, w))[np.arange(5), y]
  c = tw if how == "token_weight" else cw[y]
  keep = c != 0  # 0 * inf is 0 here: the token adds nothing
  want = np.sum(c[keep] * nll[keep]) / np.sum(c)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(gx))) and np.all(np.isfinite(np.asarray(gw)))
  # The gradient is the one of the batch without that token.
  keep_idx = np.flatnonzero(keep)
  sub = dict(kw)
  if how == "token_weight":
    sub["weights"] = tw[keep_idx]

  def without(x, w):
    return xentjax.linear_softmax_cross_entropy(x[keep_idx], w, y[keep_idx], bias=BIAS, **sub)

  rx, rw = jax.grad(without, (0, 1))(x, w)  # 0 for the dropped token
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gx)[~keep], 0.0)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["recompute", "store"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_a_teacher_with_masked_classes_gives_the_float64_divergence(strategy, beta):
  # teacher_x @ teacher_w = [[0, -inf, 1, .5, -inf]] for every token: the example.
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 4)).astype(np.float32)
  w = rng.normal(size=(4, 5)).astype(np.float32)
  tx = np.ones((3, 1), np.float32)
  tw = np.array([[0.0, -np.inf, 1.0, 0.5, -np.inf]], np.float32)
  got = xentjax.linear_distillation_loss(
    x, w, tx, tw, beta=beta, reduction="none", strategy="recompute", **TILES["recompute"]
  )
  a, b = log_softmax64(x.astype(np.float64) @ w), log_softmax64(tw.astype(np.float64))
  pa, pb = np.exp(a), np.exp(b)
  with np.errstate(invalid="ignore", divide="ignore"):
    if beta == 0.0:
      want = np.sum(np.where(pb > 0, pb * (b - a), 0.0), -1)
    else:
      m = np.log(beta * pb + (1 - beta) * pa)
      kl_t = np.sum(np.where(pb > 0, pb * (b - m), 0.0), -1)
      want = beta * kl_t + (1 - beta) * np.sum(pa * (a - m), -1)
  assert np.all(np.isfinite(want))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  # The mean and its gradient, in both strategies, are finite and agree.
  f = lambda x, w: xentjax.linear_distillation_loss(
    x, w, tx, tw, beta=beta, strategy=strategy, **TILES[strategy]
  )
  loss, (gx, gw) = jax.value_and_grad(f, (0, 1))(x, w)
  np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(gx))) and np.all(np.isfinite(np.asarray(gw)))

  # d/da of the divergence, from float64 autodiff of the same formula.
  def ref(x, w):
    a = jax.nn.log_softmax(x @ w, axis=-1)
    bb = jnp.asarray(b)
    pbb = jnp.exp(bb)
    if beta == 0.0:
      d = jnp.sum(jnp.where(pbb > 0, pbb * (jnp.where(pbb > 0, bb, 0.0) - a), 0.0), -1)
    else:
      mm = jnp.log(beta * pbb + (1 - beta) * jnp.exp(a))
      kt = jnp.sum(jnp.where(pbb > 0, pbb * (jnp.where(pbb > 0, bb, 0.0) - mm), 0.0), -1)
      d = beta * kt + (1 - beta) * jnp.sum(jnp.exp(a) * (a - mm), -1)
    return jnp.mean(d)

  with jax.enable_x64(True):
    rx, rw = jax.grad(ref, (0, 1))(jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64))
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-4, atol=1e-6)
