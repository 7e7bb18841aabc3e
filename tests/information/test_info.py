"""Tests for xentjax.info: parity with scipy, edge conventions, laws, errors."""

import math

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from xentjax import info

X64 = jax.config.jax_enable_x64
RTOL = 1e-10 if X64 else 2e-5
ATOL = 1e-12 if X64 else 2e-6

PAIR_FNS = {
  "cross_entropy": info.cross_entropy,
  "kl_divergence": info.kl_divergence,
  "js_divergence": info.js_divergence,
  "kl_divergence_from_logits": info.kl_divergence_from_logits,
}
PROB_PAIR_FNS = ["cross_entropy", "kl_divergence", "js_divergence"]
BASES = [None, 2, 10, 0.5, math.e]


def _ln_base(base):
  return 1.0 if base is None else math.log(base)


def _dirichlet(rng, shape, zeros=0.0):
  """Random probability vectors along the last axis, some entries exactly 0."""
  x = rng.gamma(0.7, size=shape)
  if zeros:
    x = np.where(rng.random(shape) < zeros, 0.0, x)
    x[..., 0] += 1e-3  # never an all-zero row
  return x / x.sum(-1, keepdims=True)


# Reference implementations in float64 numpy/scipy, written from the formulas.


def _np_ce(p, q, axis=-1):
  return -np.sum(scipy.special.xlogy(p, q), axis=axis)


def _np_kl(p, q, axis=-1):
  return np.sum(scipy.special.rel_entr(p, q), axis=axis)


def _np_js(p, q, axis=-1):
  m = 0.5 * (p + q)
  return 0.5 * _np_kl(p, m, axis) + 0.5 * _np_kl(q, m, axis)


def _np_log_softmax(z, axis=-1):
  return z - scipy.special.logsumexp(z, axis=axis, keepdims=True)


# Parity with scipy.


@pytest.mark.parametrize("base", BASES)
def test_entropy_matches_scipy(base):
  p = _dirichlet(np.random.default_rng(0), (4, 7), zeros=0.3)
  got = info.entropy(p, base=base)
  want = scipy.stats.entropy(p, axis=-1, base=base)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("base", BASES)
def test_kl_matches_scipy_rel_entr_and_stats_entropy(base):
  rng = np.random.default_rng(1)
  p = _dirichlet(rng, (5, 6), zeros=0.3)
  q = _dirichlet(rng, (5, 6))
  got = info.kl_divergence(p, q, base=base)
  np.testing.assert_allclose(got, _np_kl(p, q) / _ln_base(base), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
    got, scipy.stats.entropy(p, q, axis=-1, base=base), rtol=RTOL, atol=ATOL
  )


@pytest.mark.parametrize("base", BASES)
def test_cross_entropy_matches_formula(base):
  rng = np.random.default_rng(2)
  p = _dirichlet(rng, (5, 6), zeros=0.3)
  q = _dirichlet(rng, (5, 6))
  got = info.cross_entropy(p, q, base=base)
  np.testing.assert_allclose(got, _np_ce(p, q) / _ln_base(base), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("base", [None, 2])
def test_js_is_square_of_scipy_jensenshannon(base):
  rng = np.random.default_rng(3)
  p = _dirichlet(rng, (6, 5), zeros=0.3)
  q = _dirichlet(rng, (6, 5), zeros=0.3)
  got = info.js_divergence(p, q, base=base)
  want = scipy.spatial.distance.jensenshannon(p, q, axis=-1, base=base) ** 2
  np.testing.assert_allclose(got, want, rtol=10 * RTOL, atol=ATOL)


def test_information_is_surprisal():
  p = np.array([1.0, 0.5, 0.125, 1 / 1024, 0.3])
  np.testing.assert_allclose(info.information(p), -np.log(p), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(info.information(p, base=2), -np.log2(p), rtol=RTOL, atol=ATOL)
  assert float(info.information(0.0)) == np.inf
  assert float(jax.grad(info.information)(0.0)) == -np.inf


def test_information_where_masks_to_zero_with_zero_grad():
  p = jnp.array([0.5, 0.0, 0.25])
  keep = jnp.array([True, False, True])
  out = info.information(p, where=keep)
  np.testing.assert_allclose(out, [math.log(2), 0.0, math.log(4)], rtol=RTOL)
  g = jax.grad(lambda p: info.information(p, where=keep).sum())(p)
  np.testing.assert_allclose(g, [-2.0, 0.0, -4.0], rtol=RTOL)


# Conventions at the boundary of the simplex.


def test_zero_log_zero_is_zero():
  p = jnp.array([0.0, 1.0])
  assert float(info.entropy(p)) == 0.0
  assert float(info.cross_entropy(p, jnp.array([0.0, 1.0]))) == 0.0
  assert float(info.kl_divergence(p, jnp.array([0.0, 1.0]))) == 0.0
  # p = 0 ignores q entirely, so q = 0 there is fine too.
  np.testing.assert_allclose(
    info.kl_divergence(jnp.array([0.0, 0.5, 0.5]), jnp.array([0.0, 0.2, 0.8])),
    _np_kl(np.array([0.0, 0.5, 0.5]), np.array([0.0, 0.2, 0.8])),
    rtol=RTOL,
  )


@pytest.mark.parametrize("name", ["cross_entropy", "kl_divergence"])
def test_q_zero_where_p_positive_is_inf_not_nan(name):
  fn = PAIR_FNS[name]
  p = jnp.array([0.5, 0.5, 0.0])
  q = jnp.array([1.0, 0.0, 0.0])
  assert float(fn(p, q)) == np.inf
  gp, gq = jax.grad(fn, (0, 1))(p, q)
  assert not np.any(np.isnan(gp)) and not np.any(np.isnan(gq))
  # The true limits: d/dq_1 = -p_1/q_1 = -inf, d/dp_1 = -log q_1 (+1) = +inf.
  assert float(gq[1]) == -np.inf and float(gp[1]) == np.inf
  # The finite classes keep their exact gradients.
  np.testing.assert_allclose(gq[0], -0.5, rtol=RTOL)
  assert float(gq[2]) == 0.0 and float(gp[2]) == 0.0


def test_js_is_finite_at_disjoint_supports_and_bounded_by_log2():
  p = jnp.array([1.0, 0.0, 0.0])
  q = jnp.array([0.0, 0.5, 0.5])
  np.testing.assert_allclose(info.js_divergence(p, q), math.log(2), rtol=RTOL)
  np.testing.assert_allclose(info.js_divergence(p, q, base=2), 1.0, rtol=RTOL)
  gp, gq = jax.grad(info.js_divergence, (0, 1))(p, q)
  assert np.all(np.isfinite(gp)) and np.all(np.isfinite(gq))


@pytest.mark.parametrize("name", ["entropy", *PROB_PAIR_FNS])
def test_gradients_finite_at_zero_probabilities(name):
  rng = np.random.default_rng(4)
  p = jnp.asarray(_dirichlet(rng, (3, 5), zeros=0.4))
  q = jnp.asarray(_dirichlet(rng, (3, 5), zeros=0.0))
  if name == "entropy":
    grads = [jax.grad(lambda p: info.entropy(p).sum())(p)]
  else:
    fn = PAIR_FNS[name]
    # q shares p's zeros: p = q = 0 terms must stay finite too.
    q = jnp.where(p == 0, 0.0, q)
    grads = jax.grad(lambda p, q: fn(p, q).sum(), (0, 1))(p, q)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g))), g


def test_entropy_gradient_values():
  # d/dp_i of -sum p log p is -(log p_i + 1) for p_i > 0, and 0 (by convention) at p_i = 0.
  p = jnp.array([0.25, 0.75, 0.0])
  g = jax.grad(info.entropy)(p)
  np.testing.assert_allclose(g, [-(math.log(0.25) + 1), -(math.log(0.75) + 1), 0.0], rtol=RTOL)


def test_cross_entropy_gradient_in_p_at_zero_is_exact():
  # Where p_i = 0 < q_i the partial derivative in p_i is -log q_i, finite and exact.
  p = jnp.array([0.0, 1.0])
  q = jnp.array([0.25, 0.75])
  gp, gq = jax.grad(info.cross_entropy, (0, 1))(p, q)
  np.testing.assert_allclose(gp, [-math.log(0.25), -math.log(0.75)], rtol=RTOL)
  np.testing.assert_allclose(gq, [0.0, -1 / 0.75], rtol=RTOL)


def test_check_grads_interior():
  rng = np.random.default_rng(5)
  p = jnp.asarray(_dirichlet(rng, (2, 4)), jnp.float64 if X64 else jnp.float32)
  q = jnp.asarray(_dirichlet(rng, (2, 4)), p.dtype)
  eps = 1e-4 if X64 else 1e-3
  tol = 1e-4 if X64 else 5e-2
  jax.test_util.check_grads(
    jax.jit(info.entropy), (p,), order=1, modes=("rev",), eps=eps, atol=tol, rtol=tol
  )
  for name in [*PROB_PAIR_FNS, "kl_divergence_from_logits"]:
    fn = jax.jit(PAIR_FNS[name])
    jax.test_util.check_grads(fn, (p, q), order=1, modes=("rev",), eps=eps, atol=tol, rtol=tol)


# where, axis, broadcasting, dtypes.


@pytest.mark.parametrize("name", ["entropy", *PROB_PAIR_FNS])
def test_where_equals_boolean_indexing(name):
  rng = np.random.default_rng(6)
  p = _dirichlet(rng, (4, 6), zeros=0.2)
  q = _dirichlet(rng, (4, 6))
  keep = rng.random((4, 6)) < 0.6
  keep[0] = False  # one fully masked row
  if name == "entropy":
    got = info.entropy(p, where=keep)
    # A plain sum of the kept terms (no renormalization, unlike scipy.stats.entropy).
    want = [-np.sum(scipy.special.xlogy(p[i][keep[i]], p[i][keep[i]])) for i in range(4)]
  else:
    ref = {"cross_entropy": _np_ce, "kl_divergence": _np_kl, "js_divergence": _np_js}[name]
    got = PAIR_FNS[name](p, q, where=keep)
    want = [ref(p[i][keep[i]], q[i][keep[i]]) for i in range(4)]
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  assert float(got[0]) == 0.0


@pytest.mark.parametrize("name", ["entropy", *PROB_PAIR_FNS, "kl_divergence_from_logits"])
def test_all_masked_gives_zero_and_zero_gradient(name):
  p = jnp.array([[0.0, 0.3, 0.7], [0.2, 0.3, 0.5]])
  q = jnp.array([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
  keep = jnp.zeros((2, 3), bool)
  if name == "entropy":
    f = lambda p, q: info.entropy(p, where=keep).sum()
  else:
    f = lambda p, q: PAIR_FNS[name](p, q, where=keep).sum()
  assert float(f(p, q)) == 0.0
  for g in jax.grad(f, (0, 1))(p, q):
    np.testing.assert_array_equal(g, np.zeros((2, 3)))


@pytest.mark.parametrize("name", ["entropy", *PROB_PAIR_FNS, "kl_divergence_from_logits"])
def test_axis_matches_moveaxis(name):
  rng = np.random.default_rng(7)
  p = _dirichlet(rng, (3, 2, 5))
  q = _dirichlet(rng, (3, 2, 5))
  p1, q1 = np.moveaxis(p, -1, 0), np.moveaxis(q, -1, 0)
  if name == "entropy":
    got, want = info.entropy(p1, axis=0), info.entropy(p)
  else:
    fn = PAIR_FNS[name]
    got, want = fn(p1, q1, axis=0), fn(p, q)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_tuple_axis_treats_joint_distribution():
  rng = np.random.default_rng(8)
  p = _dirichlet(rng, (2, 12)).reshape(2, 3, 4)
  q = _dirichlet(rng, (2, 12)).reshape(2, 3, 4)
  np.testing.assert_allclose(
    info.kl_divergence(p, q, axis=(1, 2)), _np_kl(p.reshape(2, 12), q.reshape(2, 12)), rtol=RTOL
  )
  np.testing.assert_allclose(
    info.entropy(p, axis=(-2, -1)), scipy.stats.entropy(p.reshape(2, 12), axis=-1), rtol=RTOL
  )


def test_q_broadcasts_against_a_batch_of_p():
  rng = np.random.default_rng(9)
  p = _dirichlet(rng, (4, 5))
  q = _dirichlet(rng, (5,))
  np.testing.assert_allclose(
    info.cross_entropy(p, q), _np_ce(p, np.broadcast_to(q, (4, 5))), rtol=RTOL
  )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_inputs_compute_in_float32(dtype):
  rng = np.random.default_rng(10)
  p = jnp.asarray(_dirichlet(rng, (3, 6)), dtype)
  q = jnp.asarray(_dirichlet(rng, (3, 6)), dtype)
  p64, q64 = np.asarray(p, np.float64), np.asarray(q, np.float64)
  out = info.kl_divergence(p, q)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _np_kl(p64, q64), rtol=1e-5, atol=1e-6)
  assert info.entropy(p).dtype == jnp.float32
  assert info.information(p).dtype == jnp.float32
  assert info.kl_divergence_from_logits(p, q).dtype == jnp.float32


def test_float64_is_kept_under_x64():
  p = np.array([0.25, 0.75])
  assert info.entropy(p).dtype == (jnp.float64 if X64 else jnp.float32)


def test_kl_precision_for_nearly_equal_distributions():
  # Each term is p (log p - log q); H(p, q) - H(p) would cancel catastrophically.
  p = np.array([0.5, 0.5])
  d = 1e-3
  q = np.array([0.5 + d, 0.5 - d])
  want = _np_kl(p, q)  # ~ 2 d^2
  np.testing.assert_allclose(info.kl_divergence(p, q), want, rtol=5e-3 if not X64 else 1e-9)


# kl_divergence_from_logits.


def test_kl_from_logits_matches_float64_reference():
  rng = np.random.default_rng(11)
  a = rng.normal(size=(4, 7)) * 3
  b = rng.normal(size=(4, 7)) * 3
  want = _np_kl(np.exp(_np_log_softmax(a)), np.exp(_np_log_softmax(b)))
  np.testing.assert_allclose(info.kl_divergence_from_logits(a, b), want, rtol=10 * RTOL, atol=ATOL)
  np.testing.assert_allclose(
    info.kl_divergence_from_logits(a, b, base=2), want / math.log(2), rtol=10 * RTOL, atol=ATOL
  )


def test_kl_from_logits_stable_at_large_logits():
  a = jnp.array([1e4, 0.0, -1e4])
  b = jnp.array([-1e4, 0.0, 1e4])
  # p = (1, 0, 0) to working precision; log q_0 = -2e4 => KL = 2e4.
  np.testing.assert_allclose(info.kl_divergence_from_logits(a, b), 2e4, rtol=1e-6)
  assert float(info.kl_divergence_from_logits(a, a)) == 0.0
  ga, gb = jax.grad(info.kl_divergence_from_logits, (0, 1))(a, b)
  assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
  # d KL / d b = softmax(b) - softmax(a).
  np.testing.assert_allclose(gb, [-1.0, 0.0, 1.0], atol=1e-6)


def test_kl_from_logits_gradient_in_q_is_q_minus_p():
  rng = np.random.default_rng(12)
  a = rng.normal(size=(3, 5))
  b = rng.normal(size=(3, 5))
  gb = jax.grad(lambda b: info.kl_divergence_from_logits(a, b).sum())(jnp.asarray(b))
  want = np.exp(_np_log_softmax(b)) - np.exp(_np_log_softmax(a))
  np.testing.assert_allclose(gb, want, rtol=1e-4, atol=1e-6)


def test_kl_from_logits_neg_inf_classes():
  ninf = -np.inf
  # p = q = 0 on class 2 contributes nothing; p = 0 alone contributes nothing either.
  a = jnp.array([1.0, 2.0, ninf, ninf])
  b = jnp.array([0.5, -1.0, ninf, 3.0])
  pa = np.exp(_np_log_softmax(np.array([1.0, 2.0])))
  qb = np.exp(_np_log_softmax(np.array([0.5, -1.0, 3.0])))
  want = _np_kl(pa, qb[:2])
  np.testing.assert_allclose(info.kl_divergence_from_logits(a, b), want, rtol=10 * RTOL)
  ga, gb = jax.grad(info.kl_divergence_from_logits, (0, 1))(a, b)
  assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
  # Finite p, -inf q: +inf, and the q-gradient is still the exact softmax(b) - softmax(a).
  a2 = jnp.array([1.0, 2.0, 0.0])
  b2 = jnp.array([0.0, ninf, 1.0])
  assert float(info.kl_divergence_from_logits(a2, b2)) == np.inf
  ga, gb = jax.grad(info.kl_divergence_from_logits, (0, 1))(a2, b2)
  assert not np.any(np.isnan(ga))
  want_gb = np.exp(_np_log_softmax(np.array([0.0, ninf, 1.0]))) - np.exp(
    _np_log_softmax(np.array([1.0, 2.0, 0.0]))
  )
  np.testing.assert_allclose(gb, want_gb, rtol=1e-5, atol=1e-7)


def test_kl_from_logits_underflowing_p_against_impossible_q_is_inf():
  # p_1 = exp(-2e4) underflows to 0, yet p puts mass where q puts none: +inf.
  a = jnp.array([1e4, -1e4])
  b = jnp.array([0.0, -jnp.inf])
  assert float(info.kl_divergence_from_logits(a, b)) == np.inf
  ga, gb = jax.grad(info.kl_divergence_from_logits, (0, 1))(a, b)
  assert not np.any(np.isnan(ga)) and not np.any(np.isnan(gb))


def test_kl_from_logits_non_distributions_give_nan():
  ninf = -jnp.inf
  assert math.isnan(float(info.kl_divergence_from_logits(jnp.array([ninf, ninf]), jnp.zeros(2))))
  assert math.isnan(float(info.kl_divergence_from_logits(jnp.array([jnp.inf, 0.0]), jnp.zeros(2))))
  # The same row fully masked is 0, not NaN.
  keep = jnp.zeros(2, bool)
  assert (
    float(info.kl_divergence_from_logits(jnp.array([ninf, ninf]), jnp.zeros(2), where=keep)) == 0
  )


def test_kl_from_logits_where_renormalizes_over_kept_classes():
  rng = np.random.default_rng(13)
  a = rng.normal(size=(2, 6))
  b = rng.normal(size=(2, 6))
  keep = np.array([[1, 1, 0, 1, 0, 1], [1, 0, 1, 1, 1, 1]], bool)
  got = info.kl_divergence_from_logits(a, b, where=keep)
  want = [
    _np_kl(np.exp(_np_log_softmax(a[i][keep[i]])), np.exp(_np_log_softmax(b[i][keep[i]])))
    for i in range(2)
  ]
  np.testing.assert_allclose(got, want, rtol=10 * RTOL, atol=ATOL)


def test_kl_from_logits_shift_invariance():
  rng = np.random.default_rng(14)
  a = rng.normal(size=(5,))
  b = rng.normal(size=(5,))
  np.testing.assert_allclose(
    info.kl_divergence_from_logits(a + 100.0, b - 50.0),
    info.kl_divergence_from_logits(a, b),
    rtol=1e-4,
    atol=1e-5,
  )


# Errors at trace time.


@pytest.mark.parametrize("name", [*PROB_PAIR_FNS, "kl_divergence_from_logits"])
def test_shape_mismatch_names_arguments_and_shapes(name):
  with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
    PAIR_FNS[name](jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="broadcastable"):
    PAIR_FNS[name](jnp.ones((2, 3)), jnp.ones((4, 3)))


def test_class_axis_must_not_broadcast():
  with pytest.raises(ValueError, match="same size along the reduced axis"):
    info.cross_entropy(jnp.ones((2, 1)), jnp.ones((2, 3)))


@pytest.mark.parametrize("name", ["information", "entropy", *PROB_PAIR_FNS])
def test_integer_probabilities_rejected(name):
  with pytest.raises(TypeError, match="`p` must be a floating-point"):
    if name in ("information", "entropy"):
      getattr(info, name)(jnp.array([0, 1, 0]))
    else:
      PAIR_FNS[name](jnp.array([0, 1, 0]), jnp.array([0.2, 0.5, 0.3]))
  if name in PROB_PAIR_FNS:
    with pytest.raises(TypeError, match="`q` must be a floating-point"):
      PAIR_FNS[name](jnp.array([0.2, 0.5, 0.3]), jnp.array([0, 1, 0]))


@pytest.mark.parametrize("base", [0, -2, 1, 1.0, float("inf")])
def test_bad_base_rejected(base):
  p = jnp.array([0.5, 0.5])
  for fn in (lambda: info.entropy(p, base=base), lambda: info.kl_divergence(p, p, base=base)):
    with pytest.raises(ValueError, match="base"):
      fn()
  with pytest.raises(ValueError, match="base"):
    info.information(p, base=base)


def test_bad_where_and_axis_rejected():
  p = jnp.array([[0.5, 0.5]])
  # An integer 0/1 mask is a mask (the library's one `where` rule), a float is not.
  np.testing.assert_array_equal(
    info.entropy(p, where=jnp.array([1, 0])), info.entropy(p, where=jnp.array([True, False]))
  )
  with pytest.raises(TypeError, match=r"boolean mask.*weight"):
    info.entropy(p, where=jnp.array([1.0, 0.0]))
  with pytest.raises(ValueError, match=r"where.shape=\(3,\)"):
    info.entropy(p, where=jnp.array([True, False, True]))
  with pytest.raises(ValueError, match="axis"):
    info.entropy(p, axis=2)
  with pytest.raises(ValueError, match="at least one dimension"):
    info.entropy(jnp.array(0.5))


def test_errors_raise_under_jit():
  with pytest.raises(ValueError, match=r"p.shape=\(2, 3\) and q.shape=\(2, 4\)"):
    jax.jit(info.kl_divergence)(jnp.ones((2, 3)) / 3, jnp.ones((2, 4)) / 4)


# Laws, with hypothesis.

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


@st.composite
def _prob_pairs(draw, zeros=True):
  k = draw(st.sampled_from([1, 2, 5]))  # few shapes: each new one recompiles
  seed = draw(st.integers(0, 2**32 - 1))
  rng = np.random.default_rng(seed)
  frac = draw(st.sampled_from([0.0, 0.3])) if zeros else 0.0
  return _dirichlet(rng, (3, k), zeros=frac), _dirichlet(rng, (3, k))


@SETTINGS
@given(_prob_pairs())
def test_gibbs_inequality(pq):
  p, q = pq
  kl = np.asarray(info.kl_divergence(p, q))
  assert np.all(kl >= -ATOL)
  ce, h = np.asarray(info.cross_entropy(p, q)), np.asarray(info.entropy(p))
  assert np.all(ce >= h - 10 * ATOL)
  np.testing.assert_allclose(kl, ce - h, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(info.kl_divergence(p, p), 0.0, atol=ATOL)


@SETTINGS
@given(_prob_pairs())
def test_entropy_bounds(pq):
  p, _ = pq
  k = p.shape[-1]
  h = np.asarray(info.entropy(p))
  assert np.all(h >= 0.0) and np.all(h <= math.log(k) + 1e-5)


@SETTINGS
@given(_prob_pairs(), st.sampled_from([2, 10, 0.5, 3.7]))
def test_change_of_base(pq, base):
  p, q = pq
  for fn in (
    lambda **kw: info.entropy(p, **kw),
    lambda **kw: info.cross_entropy(p, q, **kw),
    lambda **kw: info.kl_divergence(p, q, **kw),
    lambda **kw: info.js_divergence(p, q, **kw),
  ):
    np.testing.assert_allclose(fn(base=base), fn() / math.log(base), rtol=RTOL, atol=ATOL)


@SETTINGS
@given(_prob_pairs())
def test_js_symmetric_and_bounded(pq):
  p, q = pq
  js = np.asarray(info.js_divergence(p, q))
  np.testing.assert_allclose(js, info.js_divergence(q, p), rtol=RTOL, atol=ATOL)
  assert np.all(js >= -ATOL) and np.all(js <= math.log(2) + 1e-6)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(_prob_pairs())
def test_vmap_equals_loop_and_jit_equals_eager(pq):
  p, q = (jnp.asarray(x) for x in pq)
  for fn in (info.cross_entropy, info.kl_divergence, info.js_divergence):
    loop = jnp.stack([fn(p[i], q[i]) for i in range(p.shape[0])])
    np.testing.assert_allclose(jax.vmap(fn)(p, q), loop, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(jax.jit(fn)(p, q), fn(p, q), rtol=RTOL, atol=ATOL)
  loop = jnp.stack([info.entropy(p[i]) for i in range(p.shape[0])])
  np.testing.assert_allclose(jax.vmap(info.entropy)(p), loop, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(jax.jit(info.entropy)(p), info.entropy(p), rtol=RTOL, atol=ATOL)


# Subnormal probabilities (XLA flushes them to zero on CPU).


def test_js_divergence_with_a_subnormal_midpoint_is_finite_and_tiny():
  q = jax.nn.softmax(jnp.array([0.0, -87.0]))  # q[1] ≈ 1.6e-38, so m[1] is subnormal
  got = info.js_divergence(jnp.array([1.0, 0.0]), q)
  ref = scipy.spatial.distance.jensenshannon([1.0, 0.0], np.asarray(q, np.float64)) ** 2
  assert np.isfinite(got) and got <= math.log(2)
  np.testing.assert_allclose(got, ref, atol=1e-38)  # 5.7e-39, itself subnormal


def test_cross_entropy_and_kl_of_a_subnormal_q_are_exact():
  q = jnp.array([1e-45, 1.0], jnp.float32)  # 2**-149
  expected = -math.log(float(np.float32(1e-45)))  # 103.28
  np.testing.assert_allclose(info.cross_entropy(jnp.array([1.0, 0.0]), q), expected, rtol=1e-6)
  np.testing.assert_allclose(info.kl_divergence(jnp.array([1.0, 0.0]), q), expected, rtol=1e-6)
  g = jax.grad(info.cross_entropy, argnums=1)(jnp.array([0.5, 0.5]), jnp.array([2e-38, 1.0]))
  np.testing.assert_allclose(g[0], -0.5 / 2e-38, rtol=1e-5)  # -p / q, finite


# Negative probabilities: one rule for every function.

NEGATIVE_CASES = {
  "entropy": lambda p, q, **kw: info.entropy(p, **kw),
  "cross_entropy": info.cross_entropy,
  "kl_divergence": info.kl_divergence,
  "js_divergence": info.js_divergence,
}


def test_entropy_of_a_negative_probability_is_nan_even_normalized():
  # The case: 0.653 before (the negative entry was silently dropped).
  assert np.isnan(info.entropy([0.5, -0.1, 0.6], normalize=True))
  assert np.isnan(info.entropy([0.5, -0.1, 0.6]))
  # [-.5, -.5] normalizes to [.5, .5], but it is not a distribution.
  assert np.isnan(info.entropy([-0.5, -0.5], normalize=True))
  out = np.asarray(info.information(np.array([-0.1, 0.25, np.nan])))
  assert np.isnan(out[0]) and np.isnan(out[2])
  np.testing.assert_allclose(out[1], np.log(4.0), rtol=RTOL)


@pytest.mark.parametrize("name", sorted(NEGATIVE_CASES))
@pytest.mark.parametrize("normalize", [False, True])
def test_negative_or_nan_probabilities_give_nan_in_every_function(name, normalize):
  fn = NEGATIVE_CASES[name]
  rng = np.random.default_rng(11)
  p, q = _dirichlet(rng, (4, 5)), _dirichlet(rng, (4, 5))
  p[1, 2], q[2, 3], p[3, 0] = -0.1, -0.2, np.nan  # rows 1-3 are not distributions
  if name == "entropy":
    q[2, 3], p[2, 3] = q[2, 3], -0.2
  out = np.asarray(fn(p, q, normalize=normalize))
  assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1:])), out
  # Value and gradient: the gradient of a NaN row is NaN too, the others finite.
  g = jax.grad(lambda a: jnp.sum(fn(a, q, normalize=normalize)[:1]))(jnp.asarray(p))
  assert np.all(np.isfinite(g[0]))
  # A masked-out negative entry is not read: boolean indexing of the rest.
  keep = np.ones((4, 5), bool)
  keep[1, 2] = keep[2, 3] = keep[3, 0] = False
  masked = np.asarray(fn(p, q, where=keep, normalize=normalize))
  for i in range(4):
    pi, qi = p[i][keep[i]], q[i][keep[i]]
    if normalize:
      pi, qi = pi / pi.sum(), qi / qi.sum()
    want = {
      "entropy": -np.sum(scipy.special.xlogy(pi, pi)),
      "cross_entropy": _np_ce(pi, qi),
      "kl_divergence": _np_kl(pi, qi),
      "js_divergence": _np_js(pi, qi),
    }[name]
    np.testing.assert_allclose(masked[i], want, rtol=RTOL, atol=ATOL)
