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


# ---------------------------------------------------------------------------
# Rows whose every logit is -inf (an all -inf bias): loss +inf with a zero
# gradient, masked 0; log-probabilities -inf, entropy 0 (0 log 0 summed).


def all_masked_vocabulary(n=4, d=3, v=6, seed=2):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  w = rng.normal(size=(d, v)).astype(np.float32)
  return x, w, np.full(v, -np.inf, np.float32), rng.integers(0, v, size=n).astype(np.int32)


OPTIONS = {
  "plain": {},
  "class_weights": {"class_weights": np.linspace(0.5, 2.0, 6).astype(np.float32)},
  "smoothing": {"label_smoothing": 0.1},
  "z_loss": {"z_loss": 1e-4},
  "both": {"class_weights": np.ones(6, np.float32), "label_smoothing": 0.1},
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_logit_minus_inf_gives_a_zero_gradient(strategy, masked, option):
  x, w, b, y = all_masked_vocabulary()
  where = np.array([True, False, True, False]) if masked else None
  kw = {**STRATEGIES[strategy], **OPTIONS[option]}

  def f(x, w, b):
    return xentjax.linear_softmax_cross_entropy(x, w, y, bias=b, where=where, reduction="sum", **kw)

  value, grads = jax.value_and_grad(f, (0, 1, 2))(x, w, b)
  assert float(value) == np.inf
  for g in grads:
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  # The dense loss on the same logits (float64): +inf and the same zero gradient.
  z = jnp.asarray(logits64(x, w, b))
  dense = jax.grad(
    lambda z: jnp.sum(xentjax.softmax_cross_entropy_with_integer_labels(z, y, where=where))
  )(z)
  np.testing.assert_array_equal(np.asarray(dense), 0.0)
  # Masked or ignored everywhere: 0 and a zero gradient.
  none = np.zeros(4, bool)
  g0 = jax.grad(
    lambda x: xentjax.linear_softmax_cross_entropy(
      x, w, y, bias=b, where=none, reduction="sum", **kw
    )
  )(x)
  np.testing.assert_array_equal(np.asarray(g0), 0.0)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_logit_minus_inf_statistics(strategy):
  x, w, b, y = all_masked_vocabulary()
  _, stats = xentjax.linear_softmax_cross_entropy(
    x, w, y, bias=b, return_stats=True, **STRATEGIES[strategy]
  )
  np.testing.assert_array_equal(np.asarray(stats.lse), -np.inf)
  np.testing.assert_array_equal(np.asarray(stats.entropy), 0.0)
  np.testing.assert_array_equal(np.asarray(stats.argmax), 0)  # all tied: the lowest class
  np.testing.assert_allclose(np.asarray(stats.correct), 1.0 / b.size)  # all tied: 1/K


def test_every_logit_minus_inf_token_stats():
  x, w, b, y = all_masked_vocabulary()
  s = xentjax.linear_token_stats(x, w, y, bias=b, top_k=3, **STRATEGIES["recompute"])
  np.testing.assert_array_equal(np.asarray(s.logprob), -np.inf)
  np.testing.assert_array_equal(np.asarray(s.entropy), 0.0)
  np.testing.assert_array_equal(np.asarray(s.lse), -np.inf)
  np.testing.assert_array_equal(np.asarray(s.top_k_logprobs), -np.inf)
  np.testing.assert_array_equal(np.asarray(s.top_k_indices), np.tile([0, 1, 2], (4, 1)))

  def g(x, w, b):
    t = xentjax.linear_token_stats(x, w, y, bias=b, **STRATEGIES["recompute"])
    return jnp.sum(jnp.where(jnp.isfinite(t.logprob), t.logprob, 0.0)) + jnp.sum(t.entropy)

  for grad in jax.grad(g, (0, 1, 2))(x, w, b):
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
  # Each statistic's own gradient is zero too (logprob -inf is a constant there).
  dlp = jax.grad(lambda x: jnp.sum(xentjax.linear_token_stats(x, w, y, bias=b).logprob))(x)
  np.testing.assert_array_equal(np.asarray(dlp), 0.0)


def test_partly_masked_vocabulary_entropy_and_top_k_still_match_float64():
  # The fix for all -inf rows leaves rows with some finite logits as they were.
  x, w, _, y = all_masked_vocabulary()
  b = np.array([0.0, -np.inf, 0.3, -np.inf, 1.0, -np.inf], np.float32)
  y = np.array([0, 2, 4, 2], np.int32)
  s = xentjax.linear_token_stats(x, w, y, bias=b, top_k=4, **STRATEGIES["recompute"])
  z = logits64(x, w, b)
  logp = z - np.max(z, 1, keepdims=True)
  logp = logp - np.log(np.sum(np.exp(logp), 1, keepdims=True))
  p = np.exp(logp)
  ent = -np.sum(p * np.where(p > 0, logp, 0.0), axis=1)  # 0 log 0 = 0
  np.testing.assert_allclose(np.asarray(s.logprob), logp[np.arange(4), y], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s.entropy), ent, rtol=1e-5)
  np.testing.assert_allclose(
    np.asarray(s.top_k_logprobs[:, :3]), np.sort(logp, 1)[:, ::-1][:, :3], rtol=1e-5
  )
  np.testing.assert_array_equal(np.asarray(s.top_k_logprobs[:, 3]), -np.inf)


# ---------------------------------------------------------------------------
# A label on a -inf class with a traced temperature: every gradient finite.


def tempered_reference64(x, w, b, y, t, counted):
  """Value and gradients (x, w, b, T) of the summed tempered cross-entropy in float64.

  A ``-inf`` logit is ``-inf`` at every temperature, so it adds nothing to dT.
  """
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  z = logits64(x, w, b)
  a = z / t
  m = np.max(a, 1, keepdims=True)
  p = np.exp(a - m) / np.sum(np.exp(a - m), 1, keepdims=True)
  onehot = np.eye(z.shape[1])[y]
  loss = np.where(
    counted, (m[:, 0] + np.log(np.sum(np.exp(a - m), 1))) - a[np.arange(len(y)), y], 0
  )
  da = (p - onehot) * counted[:, None]
  dz = da / t
  dt = np.sum(da * -np.where(np.isfinite(z), z, 0.0) / t**2)
  return np.sum(loss), dz @ w64.T, x64.T @ dz, dz.sum(0), dt


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_label_on_a_minus_inf_class_with_a_traced_temperature(strategy):
  x, w, _, _ = all_masked_vocabulary()
  b = np.array([0.0, -np.inf, 0.5, 0.0, 1.0, -0.5], np.float32)
  y = np.array([1, 0, 2, 5], np.int32)  # token 0's label has logit -inf
  t = np.float32(1.5)

  def f(x, w, b, t, where=None):
    return xentjax.linear_softmax_cross_entropy(
      x, w, y, bias=b, temperature=t, where=where, reduction="sum", **STRATEGIES[strategy]
    )

  value, grads = jax.value_and_grad(f, (0, 1, 2, 3))(x, w, b, jnp.float32(t))
  assert float(value) == np.inf
  _, *want = tempered_reference64(x, w, b, y, 1.5, np.ones(4, bool))
  for g, ref in zip(grads, want):
    assert np.all(np.isfinite(np.asarray(g)))
    np.testing.assert_allclose(np.asarray(g), ref, rtol=2e-5, atol=1e-6)
  # That token masked: a finite loss and the float64 gradients of the rest.
  keep = np.array([False, True, True, True])
  value, grads = jax.value_and_grad(f, (0, 1, 2, 3))(x, w, b, jnp.float32(t), keep)
  ref_value, *want = tempered_reference64(x, w, b, y, 1.5, keep)
  np.testing.assert_allclose(float(value), ref_value, rtol=1e-5)
  for g, ref in zip(grads, want):
    np.testing.assert_allclose(np.asarray(g), ref, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# The contrastive scale: one rule for CLIP and SigLIP, a traced temperature's.


def clip64(a, b, s):
  z = s * (np.asarray(a, np.float64) @ np.asarray(b, np.float64).T)
  lse_r = np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
  lse_c = np.log(np.sum(np.exp(z - z.max(0, keepdims=True)), 0)) + z.max(0)
  return np.mean(0.5 * ((lse_r - np.diag(z)) + (lse_c - np.diag(z))))


def siglip64(a, b, s, beta):
  z = s * (np.asarray(a, np.float64) @ np.asarray(b, np.float64).T) + beta
  sign = 2 * np.eye(z.shape[0]) - 1
  return np.mean(np.sum(np.logaddexp(0.0, -sign * z), axis=1))


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
def test_a_traced_scale_that_is_not_positive_and_finite_is_nan_in_both(bad):
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(2, 5, 3)).astype(np.float32)
  for fn in (
    xentjax.contrastive_loss,
    lambda a, b, scale: xentjax.sigmoid_contrastive_loss(a, b, scale=scale, bias=-1.0),
    lambda a, b, scale: xentjax.sigmoid_contrastive_loss(
      a, b, scale=scale, bias=-1.0, strategy="recompute"
    ),
  ):
    assert np.isnan(float(fn(a, b, scale=jnp.float32(bad))))
    assert np.isnan(float(jax.jit(fn)(a, b, scale=jnp.float32(bad))))
  # A positive scale gives the float64 formula (the rule does not move it).
  s = jnp.float32(0.5)
  np.testing.assert_allclose(
    float(xentjax.contrastive_loss(a, b, scale=s)), clip64(a, b, 0.5), 1e-5
  )
  np.testing.assert_allclose(
    float(xentjax.sigmoid_contrastive_loss(a, b, scale=s, bias=-1.0)),
    siglip64(a, b, 0.5, -1.0),
    1e-5,
  )


# ---------------------------------------------------------------------------
# Error wording: one rule per argument, said once, and said right.


def x_w_y():
  return np.ones((2, 3), np.float32), np.ones((3, 5), np.float32), np.array([0, 1], np.int32)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_denominator_has_one_rule_and_one_message(bad):
  x, w, y = x_w_y()
  msg = r"`denominator` must be a finite number > 0"
  with pytest.raises(ValueError, match=msg):
    xentjax.linear_softmax_cross_entropy(x, w, y, denominator=bad)
  with pytest.raises(ValueError, match=msg):
    xentjax.policy.policy_gradient_loss(np.zeros((2, 2), np.float32), np.ones(2), denominator=bad)


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_a_traced_denominator_that_is_not_positive_is_nan_in_both(bad):
  x, w, y = x_w_y()
  lp = jnp.array([[-0.5, -1.0], [-2.0, -0.1]])
  d = jnp.float32(bad)
  fused, dw = jax.value_and_grad(
    lambda w: xentjax.linear_softmax_cross_entropy(x, w, y, denominator=d)
  )(w)
  pg, dlp = jax.value_and_grad(
    lambda v: xentjax.policy.policy_gradient_loss(v, jnp.ones(2), denominator=d)
  )(lp)
  assert np.isnan(float(fused)) and np.isnan(float(pg))
  np.testing.assert_array_equal(np.asarray(dw), 0.0)
  np.testing.assert_array_equal(np.asarray(dlp), 0.0)
  # A positive traced one divides: the float64 sum over it.
  lp64 = np.asarray(lp, np.float64)
  got = xentjax.policy.policy_gradient_loss(
    lp, jnp.ones(2), normalization="token", denominator=jnp.float32(8.0)
  )
  np.testing.assert_allclose(float(got), -np.sum(np.exp(lp64 - lp64)) / 8.0, rtol=1e-6)


@pytest.mark.parametrize("bad", [-0.1, 0.0, float("nan")])
def test_ntxent_temperature_error_says_the_rule(bad):
  e, labels = np.ones((4, 3), np.float32), np.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0, got"):
    xentjax.ntxent(e, labels, temperature=bad)


def test_vocab_order_dtype_hint_is_a_sentence():
  x, w, y = x_w_y()
  with pytest.raises(TypeError) as err:
    xentjax.linear_softmax_cross_entropy(x, w, y, vocab_order=np.arange(5.0))
  assert "shape (5,). It must be an integer permutation" in str(err.value)


@pytest.mark.parametrize(
  "call, what",
  [
    (lambda x, w, y: xentjax.linear_softmax_cross_entropy(x, w, y, bias=np.arange(5)), "bias"),
    (
      lambda x, w, y: xentjax.linear_softmax_cross_entropy(x, w, y, weights=np.array([1, 2])),
      "weights",
    ),
    (
      lambda x, w, y: xentjax.linear_softmax_cross_entropy(x, w, y, class_weights=np.ones(5, int)),
      "class_weights",
    ),
    (
      lambda x, w, y: xentjax.cross_entropy_loss(x, y, weight=np.ones(3, int)),
      "weight",
    ),
  ],
)
def test_integer_bias_and_weights_are_not_called_logits(call, what):
  x, w, y = x_w_y()
  with pytest.raises(TypeError, match=f"`{what}` must be a floating-point array") as err:
    call(x, w, y)
  assert "logits or probabilities" not in str(err.value)


@pytest.mark.parametrize(
  "call",
  [
    lambda x, w, y: xentjax.linear_softmax_cross_entropy(x, w, y),
    lambda x, w, y: xentjax.linear_token_stats(x, w, y),
    lambda x, w, y: xentjax.softmax_cross_entropy_with_integer_labels(x, y),
  ],
)
def test_boolean_labels_get_a_hint_about_booleans(call):
  x, w, _ = x_w_y()
  with pytest.raises(TypeError, match="Booleans are not class indices") as err:
    call(x, w, np.array([True, False]))
  assert "stored as floats" not in str(err.value)
  # Float labels keep the hint about floats.
  with pytest.raises(TypeError, match="stored as floats"):
    xentjax.linear_softmax_cross_entropy(x, w, np.array([0.0, 1.0]))


def test_linear_token_stats_docstring_sentences_are_separate():
  doc = xentjax.linear_token_stats.__doc__
  assert "temperature A Python" not in doc
  assert "before the\n      temperature. A Python number" in doc
