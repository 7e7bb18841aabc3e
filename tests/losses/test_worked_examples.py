"""The worked examples of the classic cross-entropy derivations, reproduced.

Each expected number is the one printed in the derivation (to its printed
precision), cross-checked against Python's `math` where a closed form exists.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xentjax import info, metrics


def test_one_hot_target_three_classes():
  # True [0, 1, 0] against predicted [0.228, 0.619, 0.153]: only the true class counts.
  p = jnp.array([0.0, 1.0, 0.0])
  q = jnp.array([0.228, 0.619, 0.153])
  ce = float(info.cross_entropy(p, q))
  assert ce == pytest.approx(-math.log(0.619), rel=1e-6)
  assert ce == pytest.approx(0.479, abs=1e-3)
  # A certain target has zero entropy, so here cross-entropy and KL coincide.
  assert float(info.entropy(p)) == 0.0
  assert float(info.kl_divergence(p, q)) == pytest.approx(ce, rel=1e-6)


def test_one_hot_target_five_classes():
  # True [1, 0, 0, 0, 0] against [0.1, 0.5, 0.1, 0.1, 0.2]: -ln 0.1 = 2.303.
  p = jnp.array([1.0, 0.0, 0.0, 0.0, 0.0])
  q = jnp.array([0.1, 0.5, 0.1, 0.1, 0.2])
  ce = float(info.cross_entropy(p, q))
  assert ce == pytest.approx(math.log(10), rel=1e-6)
  assert ce == pytest.approx(2.303, abs=1e-3)
  # The same loss through the surprisal of the true class.
  assert float(info.information(q[0])) == pytest.approx(2.303, abs=1e-3)


def test_dog_cat_panda_scores():
  # Scores dog -3.44, cat 1.16, panda 3.91 -> softmax 0.0006, 0.0601, 0.9393; panda loss 0.0626.
  scores = jnp.array([-3.44, 1.16, 3.91])
  probs = jax.nn.softmax(scores)
  np.testing.assert_allclose(probs, [0.0006, 0.0601, 0.9393], atol=5e-5)
  panda = jnp.array([2])
  loss = float(metrics.cross_entropy_rate(scores[None, :], panda))
  assert loss == pytest.approx(0.0626, abs=5e-5)
  # The same number from the probability side, and as a perplexity.
  onehot = jnp.array([0.0, 0.0, 1.0])
  assert float(info.cross_entropy(onehot, probs)) == pytest.approx(loss, rel=1e-5)
  assert float(metrics.perplexity(scores[None, :], panda)) == pytest.approx(
    math.exp(loss), rel=1e-5
  )
  assert float(metrics.accuracy(scores[None, :], panda)) == 1.0


@pytest.mark.parametrize("n, bits", [(8, 3.0), (1024, 10.0)])
def test_equally_likely_outcomes(n, bits):
  # 8 equally likely fruits need 3 bits; 1024 need 10.
  uniform = jnp.full((n,), 1.0 / n)
  assert float(info.entropy(uniform, base=2)) == pytest.approx(bits, rel=1e-5)
  assert float(info.information(1.0 / n, base=2)) == pytest.approx(bits, rel=1e-6)
  # The same count in nats is bits * ln 2.
  assert float(info.entropy(uniform)) == pytest.approx(bits * math.log(2), rel=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_uniform_over_2k_classes_has_maximum_entropy_k_bits(k):
  n = 2**k
  h_uniform = float(info.entropy(jnp.full((n,), 1.0 / n), base=2))
  assert h_uniform == pytest.approx(k, rel=1e-5)
  rng = np.random.default_rng(k)
  others = rng.dirichlet(np.full(n, 0.5), size=64)
  h_others = np.asarray(info.entropy(others, base=2))
  assert np.all(h_others <= h_uniform + 1e-5)
  assert np.all(h_others < k)  # strictly below for non-uniform draws


def test_certain_outcome_has_zero_entropy():
  for n in (1, 2, 5):
    for i in range(n):
      certain = jnp.zeros((n,)).at[i].set(1.0)
      assert float(info.entropy(certain)) == 0.0
      assert float(info.entropy(certain, base=2)) == 0.0


def test_kl_is_cross_entropy_minus_entropy_and_nonnegative():
  p = jnp.array([0.1, 0.6, 0.3])
  q = jnp.array([0.228, 0.619, 0.153])
  h_pq = float(info.cross_entropy(p, q))
  h_p = float(info.entropy(p))
  kl = float(info.kl_divergence(p, q))
  want_kl = sum(pi * math.log(pi / qi) for pi, qi in zip([0.1, 0.6, 0.3], [0.228, 0.619, 0.153]))
  assert kl == pytest.approx(want_kl, rel=1e-5)
  assert kl == pytest.approx(h_pq - h_p, rel=1e-4)
  assert kl > 0.0 and h_pq > h_p
  assert float(info.kl_divergence(p, p)) == 0.0


def test_cross_entropy_of_a_fair_coin_model_is_one_bit_per_toss():
  # Coding any outcome with a fair-coin model costs exactly 1 bit, whatever the truth.
  for truth in ([1.0, 0.0], [0.5, 0.5], [0.9, 0.1]):
    assert float(
      info.cross_entropy(jnp.array(truth), jnp.array([0.5, 0.5]), base=2)
    ) == pytest.approx(1.0)
