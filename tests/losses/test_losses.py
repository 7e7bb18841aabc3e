"""Values of the core losses against float64 NumPy/SciPy formulas, low precision, and laws."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import xentjax as L

_RNG = np.random.default_rng(42)
Z = (_RNG.normal(size=(4, 6)) * 2).astype(np.float32)
Y = _RNG.dirichlet(np.ones(6), size=4).astype(np.float32)
C = np.array([0, 5, 2, 3])
ONEHOT = np.eye(6, dtype=np.float32)[C]


def _ce64(z, y):
  z = np.asarray(z, np.float64)
  return -(y * (z - sp.logsumexp(z, axis=-1, keepdims=True))).sum(-1)


# --- the worked example --------------------------------------------------------


@pytest.mark.parametrize("q", [[0.1, 0.5, 0.1, 0.1, 0.2], [0.1, 0.6, 0.1, 0.1, 0.1]])
def test_worked_example(q):
  y = np.array([1.0, 0, 0, 0, 0], np.float32)
  q = np.array(q, np.float32)
  np.testing.assert_allclose(L.categorical_cross_entropy(q, y), 2.302585, rtol=1e-6)
  np.testing.assert_allclose(L.softmax_cross_entropy(np.log(q), y), 2.302585, rtol=1e-6)
  np.testing.assert_allclose(
    L.softmax_cross_entropy_with_integer_labels(np.log(q), 0), 2.302585, rtol=1e-6
  )


# --- values against float64 formulas -------------------------------------------


def _float64_table():
  """(name, the loss as a function of its first argument, that argument, the float64 value)."""
  z = Z.astype(np.float64)
  p = sp.softmax(z, axis=-1)
  s = sp.expit(z)
  q = p.astype(np.float32)
  t = np.sign(Y - 0.15).astype(np.float32)
  lse = sp.logsumexp(z, axis=-1)
  return [
    ("softmax_cross_entropy", lambda v: L.softmax_cross_entropy(v, Y), Z, _ce64(Z, Y)),
    (
      "softmax_cross_entropy_with_integer_labels",
      lambda v: L.softmax_cross_entropy_with_integer_labels(v, C, label_smoothing=0.1, z_loss=1e-3),
      Z,
      _ce64(Z, 0.9 * ONEHOT + 0.1 / 6) + 1e-3 * lse**2,
    ),
    (
      "poly_loss_cross_entropy",
      lambda v: L.poly_loss_cross_entropy(v, Y, epsilon=1.5),
      Z,
      _ce64(Z, Y) + 1.5 * (Y * (1 - p)).sum(-1),
    ),
    (
      "kl_divergence",
      lambda v: L.kl_divergence(v, Y),
      np.log(p).astype(np.float32),
      (Y * (np.log(Y) - np.log(p))).sum(-1),
    ),
    (
      "sigmoid_binary_cross_entropy",
      lambda v: L.sigmoid_binary_cross_entropy(v, Y),
      Z,
      -(Y * np.log(s) + (1 - Y) * np.log1p(-s)),
    ),
    (
      "categorical_cross_entropy",
      lambda v: L.categorical_cross_entropy(v, ONEHOT),
      q,
      -np.log(p[np.arange(4), C]),
    ),
    (
      "multiclass_hinge_loss",
      lambda v: L.multiclass_hinge_loss(v, C),
      Z,
      np.max(z + 1 - ONEHOT, axis=-1) - z[np.arange(4), C],
    ),
    ("hinge_loss", lambda v: L.hinge_loss(v, t), Z, np.maximum(0, 1 - z * t)),
    ("squared_error", lambda v: L.squared_error(v, ONEHOT), q, (p - ONEHOT) ** 2),
  ]


class DenseLossesInsideAndOutsideJit(chex.TestCase):
  """Each dense loss gives its float64 value called eagerly and inside a user's `jit`."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_float64_table())
  def test_value_matches_float64(self, loss, x, expected):
    got = self.variant(loss)(x)
    chex.assert_shape(got, expected.shape)
    chex.assert_trees_all_close(got, expected.astype(got.dtype), rtol=2e-5, atol=1e-6)


def test_softmax_cross_entropy_values():
  np.testing.assert_allclose(L.softmax_cross_entropy(Z, Y), _ce64(Z, Y), rtol=1e-5)
  np.testing.assert_allclose(
    L.softmax_cross_entropy_with_integer_labels(Z, C), _ce64(Z, ONEHOT), rtol=1e-5
  )


@pytest.mark.parametrize("eps,lam", [(0.1, 0.0), (0.0, 1e-3), (0.25, 1e-2), (1.0, 0.0)])
def test_label_smoothing_and_z_loss(eps, lam):
  lse = sp.logsumexp(Z.astype(np.float64), axis=-1)
  expected = _ce64(Z, (1 - eps) * ONEHOT + eps / 6) + lam * lse**2
  kw = {"label_smoothing": eps, "z_loss": lam}
  np.testing.assert_allclose(L.softmax_cross_entropy(Z, ONEHOT, **kw), expected, rtol=1e-5)
  np.testing.assert_allclose(
    L.softmax_cross_entropy_with_integer_labels(Z, C, **kw), expected, rtol=1e-5
  )
  # Same convention as smooth_labels.
  np.testing.assert_allclose(
    L.softmax_cross_entropy(Z, L.smooth_labels(ONEHOT, eps), z_loss=lam), expected, rtol=1e-5
  )


def test_label_smoothing_with_a_mask_uses_the_included_classes():
  mask = np.ones((4, 6), bool)
  mask[:, 4:] = False
  eps = 0.2
  ref = _ce64(Z[:, :4], (1 - eps) * np.eye(4)[[0, 3, 2, 3]] + eps / 4)
  got = L.softmax_cross_entropy_with_integer_labels(
    Z, np.array([0, 3, 2, 3]), where=mask, label_smoothing=eps
  )
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  y = np.eye(6, dtype=np.float32)[[0, 3, 2, 3]]
  np.testing.assert_allclose(
    L.softmax_cross_entropy(Z, y, where=mask, label_smoothing=eps), ref, rtol=1e-5
  )


def test_poly_and_kl_values():
  p = sp.softmax(Z.astype(np.float64), axis=-1)
  np.testing.assert_allclose(
    L.poly_loss_cross_entropy(Z, Y, epsilon=1.5),
    _ce64(Z, Y) + 1.5 * (Y * (1 - p)).sum(-1),
    rtol=1e-5,
  )
  logq = np.log(p)
  kl = (Y * (np.log(Y) - logq)).sum(-1)
  np.testing.assert_allclose(L.kl_divergence(logq.astype(np.float32), Y), kl, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(
    L.kl_divergence_with_log_targets(logq.astype(np.float32), np.log(Y)), kl, rtol=1e-4, atol=1e-6
  )


def test_sigmoid_and_focal_values():
  s = sp.expit(Z.astype(np.float64))
  bce = -(Y * np.log(s) + (1 - Y) * np.log1p(-s))
  np.testing.assert_allclose(L.sigmoid_binary_cross_entropy(Z, Y), bce, rtol=1e-5)
  pt = Y * s + (1 - Y) * (1 - s)
  for alpha, gamma in [(None, 2.0), (0.25, 0.5)]:
    a = 1.0 if alpha is None else alpha * Y + (1 - alpha) * (1 - Y)
    np.testing.assert_allclose(
      L.sigmoid_focal_loss(Z, Y, alpha=alpha, gamma=gamma), a * (1 - pt) ** gamma * bce, rtol=1e-4
    )


def test_margin_values():
  z = Z.astype(np.float64)
  zy = z[np.arange(4), C]
  np.testing.assert_allclose(
    L.multiclass_hinge_loss(Z, C), np.max(z + 1 - np.eye(6)[C], axis=-1) - zy, rtol=1e-6
  )
  np.testing.assert_allclose(L.multiclass_perceptron_loss(Z, C), z.max(-1) - zy, rtol=1e-6)
  t = np.sign(Y - 0.15).astype(np.float32)
  np.testing.assert_allclose(L.hinge_loss(Z, t), np.maximum(0, 1 - z * t), rtol=1e-6)
  np.testing.assert_allclose(L.perceptron_loss(Z, t), np.maximum(0, -z * t), rtol=1e-6)


def test_regression_values():
  p = sp.softmax(Z.astype(np.float64), axis=-1)
  np.testing.assert_allclose(
    L.squared_error(p.astype(np.float32), ONEHOT), (p - ONEHOT) ** 2, atol=1e-6
  )
  cos = (Z * Y).sum(-1) / np.linalg.norm(Z, axis=-1) / np.linalg.norm(Y, axis=-1)
  np.testing.assert_allclose(L.cosine_similarity(Z, Y), cos, rtol=1e-5)
  np.testing.assert_allclose(L.cosine_distance(Z, Y), 1 - cos, rtol=1e-5, atol=1e-6)


def test_probability_losses_no_silent_clipping_and_opt_in_eps():
  q = np.array([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]], np.float32)
  y = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
  out = L.categorical_cross_entropy(q, y)
  assert out[0] == np.inf
  np.testing.assert_allclose(out[1], -np.log(0.5), rtol=1e-6)
  eps = 1e-7  # Keras: clip to [eps, 1 - eps] before the log
  keras = -(y * np.log(np.clip(q.astype(np.float64), eps, 1 - eps))).sum(-1)
  np.testing.assert_allclose(L.categorical_cross_entropy(q, y, eps=eps), keras, rtol=1e-5)
  qb = np.array([0.0, 1.0, 0.3, 0.0], np.float32)
  yb = np.array([0.0, 1.0, 1.0, 1.0], np.float32)
  ob = L.binary_cross_entropy(qb, yb)
  np.testing.assert_allclose(ob[:3], [0.0, 0.0, -np.log(0.3)], rtol=1e-6)
  assert ob[3] == np.inf
  qc = np.clip(qb.astype(np.float64), 1e-3, 1 - 1e-3)
  np.testing.assert_allclose(
    L.binary_cross_entropy(qb, yb, eps=1e-3),
    -(yb * np.log(qc) + (1 - yb) * np.log(1 - qc)),
    rtol=1e-4,
  )


# --- low precision -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_logits_computed_in_float32(dtype):
  z16 = jnp.asarray(Z * 20, dtype)
  z32 = z16.astype(jnp.float32)  # the same values
  cases = [
    (L.softmax_cross_entropy, (ONEHOT,), {"label_smoothing": 0.1, "z_loss": 1e-4}),
    (L.softmax_cross_entropy_with_integer_labels, (C,), {"label_smoothing": 0.1}),
    (L.sigmoid_binary_cross_entropy, (Y,), {}),
    (L.poly_loss_cross_entropy, (Y,), {}),
  ]
  for fn, args, kw in cases:
    low = fn(z16, *args, **kw)
    ref = fn(z32, *args, **kw)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, ref, rtol=1e-3)
    # And against the float64 formula on those values.
  np.testing.assert_allclose(
    L.softmax_cross_entropy_with_integer_labels(z16, C), _ce64(np.asarray(z32), ONEHOT), rtol=1e-3
  )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_rule_margin_and_regression_losses(dtype):
  """One rule for the library: 16-bit inputs are computed, and returned, in float32."""
  s16 = jnp.asarray(Z, dtype)
  s32 = s16.astype(jnp.float32)  # the same values
  t = np.sign(Y - 0.2).astype(np.float32)
  y16 = jnp.asarray(Y, dtype)
  cases = [
    (L.hinge_loss, (s16, t), (s32, t)),
    (L.perceptron_loss, (s16, t), (s32, t)),
    (L.squared_hinge_loss, (s16, t), (s32, t)),
    (L.multiclass_hinge_loss, (s16, C), (s32, C)),
    (L.multiclass_perceptron_loss, (s16, C), (s32, C)),
    (L.categorical_hinge_loss, (s16, ONEHOT), (s32, ONEHOT)),
    (L.cosine_similarity, (s16, y16), (s32, y16.astype(jnp.float32))),
    (L.squared_error, (s16, y16), (s32, y16.astype(jnp.float32))),
    (L.squared_error, (s16,), (s32,)),
  ]
  for fn, low_args, ref_args in cases:
    low, ref = fn(*low_args), fn(*ref_args)
    assert low.dtype == jnp.float32, fn.__name__
    np.testing.assert_allclose(low, ref, rtol=1e-6, err_msg=fn.__name__)
  # The float32 computation is visible: bfloat16 arithmetic would round the
  # squared error of these values.
  x = jnp.asarray([1.0078125], dtype)  # 1 + 2**-7, exact in both 16-bit types
  np.testing.assert_allclose(L.squared_error(x), 1.0078125**2, rtol=1e-7)


def test_subnormal_probabilities_are_exact_in_categorical_cross_entropy():
  # 1e-38 is subnormal in float32; XLA flushes it, so log(q) would be -inf.
  got = L.categorical_cross_entropy(jnp.array([1e-38, 1.0]), jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(got, -np.log(np.float64(np.float32(1e-38))), rtol=1e-6)  # 87.50
  got = L.categorical_cross_entropy_with_integer_labels(jnp.array([[1e-38, 1.0]]), jnp.array([0]))
  np.testing.assert_allclose(got, [87.49823], rtol=1e-6)
  got = L.binary_cross_entropy(jnp.array([1e-40]), jnp.array([1.0]))
  np.testing.assert_allclose(got, [-np.log(np.float64(np.float32(1e-40)))], rtol=1e-6)
  g = L.grads.categorical_cross_entropy(jnp.array([2e-38, 1.0]), jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(g, [-1 / 2e-38, 0.0], rtol=1e-5)  # finite, not -inf


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kl_divergence_zero_target_guard_agrees_between_value_and_gradient(dtype):
  t = jnp.array([1e-38, 1.0], dtype)  # subnormal: flushed in some XLA ops, not in others
  lp = jnp.log(jnp.array([0.5, 0.5]))
  np.testing.assert_allclose(L.kl_divergence(lp, t), np.log(2), rtol=1e-6)
  g_lp, g_t = jax.grad(L.kl_divergence, argnums=(0, 1))(lp, t)
  # The subnormal target is a zero target in value and in both gradients.
  np.testing.assert_allclose(g_lp, [0.0, -1.0], atol=1e-30)
  assert float(g_t[0]) == 0.0
  np.testing.assert_allclose(float(g_t[1]), 1.0 + np.log(2), rtol=1e-2)


# --- laws (hypothesis) ----------------------------------------------------------

# A fixed shape keeps compilation to once per test; hypothesis explores the values.
_logits = hnp.arrays(np.float32, (3, 5), elements=st.floats(-30, 30, width=32))
_SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


@_SETTINGS
@given(_logits, st.floats(-50, 50, width=32))
def test_shift_invariance(z, c):
  y = jax.nn.softmax(jnp.asarray(z[::-1]), axis=-1)
  labels = np.argmax(z, axis=-1)
  a = L.softmax_cross_entropy(z, y)
  b = L.softmax_cross_entropy(z + np.float32(c), y)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
    L.softmax_cross_entropy_with_integer_labels(z, labels),
    L.softmax_cross_entropy_with_integer_labels(z + np.float32(c), labels),
    rtol=1e-4,
    atol=1e-4,
  )


def _dense(a, b):
  return L.softmax_cross_entropy(a, b, label_smoothing=0.1, z_loss=1e-3)


def _sparse(a, b):
  return L.softmax_cross_entropy_with_integer_labels(a, b, label_smoothing=0.1)


# Built once, so every hypothesis example reuses the same compiled programs.
_TRANSFORMED = [(fn, jax.jit(fn), jax.jit(jax.vmap(fn))) for fn in (_dense, _sparse)]


@_SETTINGS
@given(_logits)
def test_vmap_equals_loop_and_jit_equals_eager(z):
  y = np.asarray(jax.nn.softmax(jnp.asarray(z[::-1]) * 0.5, axis=-1))
  labels = np.argmin(z, axis=-1)
  for (fn, jitted, vmapped), t in zip(_TRANSFORMED, (y, labels)):
    eager = fn(z, t)
    looped = np.stack([fn(z[i], t[i]) for i in range(z.shape[0])])
    np.testing.assert_allclose(vmapped(z, t), looped, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jitted(z, t), eager, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(eager, looped, rtol=1e-6, atol=1e-6)


@_SETTINGS
@given(
  hnp.arrays(np.float32, (3, 5), elements=st.sampled_from([-1e4, -1.0, 0.0, 1e4])),
  st.integers(0, 4),
)
def test_extreme_logits_finite_value_and_gradient(z, c):
  labels = np.full((3,), c)
  y = np.eye(5, dtype=np.float32)[labels]
  for fn, t in (
    (L.softmax_cross_entropy, y),
    (L.softmax_cross_entropy_with_integer_labels, labels),
    (L.sigmoid_binary_cross_entropy, y),
    (L.poly_loss_cross_entropy, y),
  ):
    value, g = jax.value_and_grad(lambda v, fn=fn, t=t: fn(v, t).sum())(z)
    assert np.isfinite(value) and np.all(np.isfinite(g))
  # And the value is right: log-sum-exp minus the true logit, in float64.
  np.testing.assert_allclose(
    L.softmax_cross_entropy_with_integer_labels(z, labels), _ce64(z, y), rtol=1e-6, atol=1e-6
  )


def test_python_sequences_are_accepted():
  z = [[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]]
  expected = _ce64(np.array(z), np.eye(3)[[0, 1]])
  np.testing.assert_allclose(
    L.softmax_cross_entropy_with_integer_labels(z, [0, 1]), expected, rtol=1e-6
  )
  np.testing.assert_allclose(
    L.softmax_cross_entropy(z, [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], axis=[-1]), expected, rtol=1e-6
  )
