"""Tests of `xentjax.policy` against float64 NumPy transcriptions of the recipes.

The references are written from the papers' definitions (GRPO, Dr. GRPO, DAPO,
Schulman's KL estimators), with gradients in closed form: the derivative of
``-min(r A, clip(r) A)`` in the log-probability is ``-r A`` on the unclipped
branch and 0 on the clipped one, and that of k3 is ``1 - exp(ref - lp)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax
from xentjax import policy

B, T = 6, 7


def data(seed=0, b=B, t=T):
  rng = np.random.default_rng(seed)
  lp = np.log(rng.uniform(0.05, 0.95, (b, t)))
  old = lp + rng.normal(0, 0.4, (b, t))  # ratios spread over both clip edges
  ref = lp + rng.normal(0, 0.3, (b, t))
  adv = rng.normal(size=b)
  mask = rng.uniform(size=(b, t)) < 0.75
  mask[0] = False  # one sequence with nothing counted
  mask[1, :] = True
  return lp, old, ref, adv, mask


def reference(lp, old, ref, adv, mask, *, eps=0.2, eps_high=None, beta=0.0, norm="sequence"):
  """float64: (loss, dloss/dlp) per the recipes' formulas."""
  eps_high = eps if eps_high is None else eps_high
  a = adv[:, None] if adv.ndim == 1 else adv
  r = np.exp(lp - old)
  unclipped = r * a
  clipped = np.clip(r, 1 - eps, 1 + eps_high) * a
  tok = -np.minimum(unclipped, clipped)
  # the min takes the unclipped branch where it is the smaller one; there the
  # derivative in lp is -r A, and 0 on the (constant) clipped branch.
  dtok = np.where(unclipped <= clipped, -r * a, 0.0)
  delta = ref - lp
  tok = tok + beta * (np.exp(delta) - delta - 1)
  dtok = dtok + beta * (1 - np.exp(delta))
  m = mask.astype(float)
  if norm == "sequence":
    n = m.sum(1)
    keep = n > 0
    w = np.where(keep[:, None], m / np.where(keep, n, 1)[:, None], 0) / keep.sum()
  elif norm == "token":
    w = m / m.sum()
  else:
    w = m / (lp.shape[0] * lp.shape[1])
  return (tok * w).sum(), dtok * w


@pytest.mark.parametrize("norm", ["sequence", "token", "constant"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_clipped_loss_and_gradient_match_float64(norm, eps_high):
  lp, old, ref, adv, mask = data()
  want, dwant = reference(lp, old, ref, adv, mask, eps_high=eps_high, beta=0.04, norm=norm)

  def f(lp32):
    return policy.policy_gradient_loss(
      lp32,
      adv,
      mask,
      old_logprobs=old,
      ref_logprobs=ref,
      kl_coef=0.04,
      epsilon_high=eps_high,
      normalization=norm,
    )

  got, grad = jax.value_and_grad(f)(jnp.asarray(lp, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(grad, dwant, rtol=2e-5, atol=1e-7)
  assert np.any(dwant == 0) and np.any(dwant != 0)  # both branches of the clip were taken


def test_on_policy_is_reinforce():
  lp, _, _, adv, mask = data(1)
  grad = jax.grad(lambda v: policy.policy_gradient_loss(v, adv, mask, normalization="token"))(
    jnp.asarray(lp, jnp.float32)
  )
  np.testing.assert_allclose(grad, -adv[:, None] * mask / mask.sum(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("norm", ["sequence", "token", "constant"])
def test_accumulated_microbatches_equal_the_full_batch(norm):
  lp, old, _, adv, mask = data(2, b=8)
  full = lambda v: policy.policy_gradient_loss(v, adv, mask, old_logprobs=old, normalization=norm)
  m = mask.astype(float)
  denom = {
    "sequence": (m.sum(1) > 0).sum(),
    "token": m.sum(),
    "constant": m.size,
  }[norm]

  def micro(v, s):
    return policy.policy_gradient_loss(
      v[s],
      adv[s],
      mask[s],
      old_logprobs=old[s],
      normalization=norm,
      denominator=denom,
      max_length=T if norm == "constant" else None,
    )

  v = jnp.asarray(lp, jnp.float32)
  halves = (slice(0, 3), slice(3, 8))
  total = sum(micro(v, s) for s in halves)
  grad = sum(jax.grad(micro)(v, s) for s in halves)
  np.testing.assert_allclose(total, full(v), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(grad, jax.grad(full)(v), rtol=1e-5, atol=1e-9)


def test_nothing_counted_is_nan_with_zero_gradient():
  lp, _, _, adv, _ = data()
  mask = np.zeros(lp.shape, bool)
  for norm in ("sequence", "token"):
    f = lambda v: policy.policy_gradient_loss(v, adv, mask, normalization=norm)  # noqa: B023
    value, grad = jax.value_and_grad(f)(jnp.asarray(lp, jnp.float32))
    assert np.isnan(value)
    np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_match_float64(scale):
  rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0])
  g = rewards.reshape(-1, 4)
  want = g - g.mean(1, keepdims=True)
  if scale:
    want = want / (g.std(1, ddof=1, keepdims=True) + 1e-4)
  got = policy.group_advantages(rewards.astype(np.float32), 4, scale=scale)
  np.testing.assert_allclose(got, want.reshape(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[4:8], 0.0)  # a group of equal rewards teaches nothing


def test_group_advantages_refuse_a_partial_group():
  with pytest.raises(ValueError, match="group_size=4"):
    policy.group_advantages(np.ones(10), 4)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_float64(estimator):
  lp, _, ref, _, _ = data(3)
  d = ref - lp
  want = {"k1": -d, "k2": 0.5 * d**2, "k3": np.exp(d) - d - 1}[estimator]
  got = policy.kl_penalty(lp.astype(np.float32), ref.astype(np.float32), estimator=estimator)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_k3_estimates_the_kl_of_two_distributions():
  # Sampling a ~ p, the mean of k3 converges to KL(p || q) (Schulman 2020).
  p = np.array([0.5, 0.3, 0.2])
  q = np.array([0.2, 0.5, 0.3])
  a = np.random.default_rng(0).choice(3, size=200_000, p=p)
  k3 = policy.kl_penalty(np.log(p[a]), np.log(q[a]))
  kl = float(np.sum(p * np.log(p / q)))
  assert abs(float(jnp.mean(k3)) - kl) < 0.01 * kl + 2e-3


def reference_recipe(x, w, actions, adv, mask, temperature):
  """float64 GRPO recipe on materialized logits: loss and d loss / d w."""
  z = (x.astype(np.float64) @ w.astype(np.float64)) / temperature
  logp = z - (
    z.max(-1, keepdims=True) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  )
  lp = np.take_along_axis(logp, actions[:, None], -1)[:, 0].reshape(mask.shape)
  loss, dlp = reference(lp, lp, lp, adv, mask, norm="token")
  onehot = np.eye(w.shape[1])[actions]
  dz = dlp.reshape(-1, 1) * (onehot - np.exp(logp)) / temperature
  return loss, x.astype(np.float64).T @ dz


def test_recipe_on_fused_token_stats_matches_the_materialized_float64():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(B * T, 16)).astype(np.float32)
  w = (0.3 * rng.normal(size=(16, 50))).astype(np.float32)
  actions = rng.integers(0, 50, B * T)
  adv = rng.normal(size=B)
  mask = rng.uniform(size=(B, T)) < 0.8

  def loss(w):
    stats = xentjax.linear_token_stats(x, w, actions, temperature=0.7, vocab_chunk_size=16)
    lp = stats.logprob.reshape(B, T)
    return policy.policy_gradient_loss(lp, adv, mask, normalization="token")

  want, dwant = reference_recipe(x, w, actions, adv, mask, 0.7)
  got, dgot = jax.value_and_grad(loss)(w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(dgot, dwant, rtol=1e-4, atol=1e-6)


def test_bad_inputs_name_the_argument():
  lp, old, _, adv, mask = data()
  with pytest.raises(ValueError, match="normalization"):
    policy.policy_gradient_loss(lp, adv, normalization="batch")
  with pytest.raises(ValueError, match="advantages"):
    policy.policy_gradient_loss(lp, adv[:3])
  with pytest.raises(ValueError, match="old_logprobs"):
    policy.policy_gradient_loss(lp, adv, old_logprobs=old[:, :3])
  with pytest.raises(ValueError, match="ref_logprobs"):
    policy.policy_gradient_loss(lp, adv, kl_coef=0.1)
  with pytest.raises(ValueError, match="epsilon"):
    policy.policy_gradient_loss(lp, adv, epsilon=-0.1)
  with pytest.raises(TypeError, match="where"):
    policy.policy_gradient_loss(lp, adv, mask.astype(np.float32))
