"""`xentjax.grads`: closed forms against `jax.grad`, finite differences and NumPy formulas."""

import functools

import chex
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest
import scipy.special as sp
from absl.testing import parameterized

import xentjax as L
from xentjax import grads as G

_RNG = np.random.default_rng(7)
SHAPE = (3, 5)
Z = (_RNG.normal(size=SHAPE) * 2).astype(np.float32)
Y = _RNG.dirichlet(np.ones(5), size=3).astype(np.float32)
C = np.array([0, 4, 2])
MASK = _RNG.uniform(size=SHAPE) < 0.7
MASK[:, 0] = True
Z3 = (_RNG.normal(size=(2, 3, 4)) * 2).astype(np.float32)
Y3 = _RNG.dirichlet(np.ones(12), size=2).reshape(2, 3, 4).astype(np.float32)
C3 = np.array([5, 11])
Q = _RNG.uniform(0.05, 0.95, size=SHAPE).astype(np.float32)
YB = (_RNG.uniform(size=SHAPE) < 0.5).astype(np.float32)

# (name, first argument, remaining positional args, keyword args)
CASES = [
  ("softmax_cross_entropy", Z, (Y,), {}),
  ("softmax_cross_entropy", Z, (Y, 0, MASK), {"label_smoothing": 0.2, "z_loss": 1e-2}),
  ("softmax_cross_entropy", Z3, (Y3, (1, 2)), {"z_loss": 1e-3}),
  ("softmax_cross_entropy_with_integer_labels", Z, (C,), {}),
  (
    "softmax_cross_entropy_with_integer_labels",
    Z,
    (C, -1, MASK),
    {"label_smoothing": 0.1, "z_loss": 1e-2},
  ),
  ("softmax_cross_entropy_with_integer_labels", Z3, (C3, (1, 2)), {"label_smoothing": 0.3}),
  ("safe_softmax_cross_entropy", Z, (Y,), {}),
  ("poly_loss_cross_entropy", Z, (Y,), {"epsilon": 2.0, "where": MASK}),
  ("sigmoid_binary_cross_entropy", Z, (Y,), {}),
  ("sigmoid_focal_loss", Z, (YB,), {"gamma": 2.0, "alpha": 0.25}),
  ("sigmoid_focal_loss", Z, (Y,), {"gamma": 0.5}),
  ("categorical_cross_entropy", Q, (Y, -1, MASK), {}),
  ("categorical_cross_entropy", Q, (Y,), {"eps": 0.1}),
  ("binary_cross_entropy", Q, (Y,), {}),
  ("kl_divergence", Z, (Y,), {"where": MASK}),
  ("kl_divergence_with_log_targets", Z, (np.log(Y),), {}),
]
IDS = [f"{n}-{i}" for i, (n, *_) in enumerate(CASES)]


def _loss_sum(name, args, kwargs):
  return lambda x: jnp.sum(getattr(L, name)(x, *args, **kwargs))


class ClosedFormMatchesAutodiff(chex.TestCase):
  """Each closed form equals `jax.grad` of its loss, called eagerly and inside a user's `jit`."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(i, *case) for i, case in zip(IDS, CASES, strict=True)])
  def test_closed_form_matches_autodiff(self, name, x, args, kwargs):
    expected = self.variant(jax.grad(_loss_sum(name, args, kwargs)))(x)
    got = self.variant(lambda v: getattr(G, name)(v, *args, **kwargs))(x)
    chex.assert_shape(got, x.shape)
    chex.assert_type(got, x.dtype)
    chex.assert_trees_all_close(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name,x,args,kwargs", CASES[::2], ids=IDS[::2])
def test_loss_passes_finite_difference_check(name, x, args, kwargs):
  x64 = jax.config.jax_enable_x64
  x = jnp.asarray(x, jnp.float64 if x64 else jnp.float32)
  # Central differences: rounding error ~ eps_mach |f| / h, truncation ~ h^2,
  # so the step is about eps_mach ** (1/3) (jax's default 1e-4 suits float64
  # only: in float32 its rounding error alone is ~1e-2 of a loss of size 10).
  step = None if x64 else 5e-3
  jtu.check_grads(_loss_sum(name, args, kwargs), (x,), order=1, modes=("rev",), eps=step)


def test_every_grads_function_has_a_loss_with_the_same_signature():
  import inspect

  for name in G.__all__:
    assert inspect.signature(getattr(G, name)) == inspect.signature(getattr(L, name)), name


# --- against the textbook formulas, in float64 NumPy ---------------------------


def test_softmax_gradient_is_prediction_minus_target():
  p = sp.softmax(Z.astype(np.float64), axis=-1)
  np.testing.assert_allclose(G.softmax_cross_entropy(Z, Y), p - Y, atol=1e-6)
  np.testing.assert_allclose(
    G.softmax_cross_entropy_with_integer_labels(Z, C), p - np.eye(5)[C], atol=1e-6
  )
  # Unnormalized labels: softmax(z) * sum(y) - y.
  np.testing.assert_allclose(G.softmax_cross_entropy(Z, 2 * Y), 2 * p - 2 * Y, atol=1e-6)


def test_smoothing_and_z_loss_formulas():
  eps, lam = 0.1, 1e-2
  z = Z.astype(np.float64)
  p = sp.softmax(z, axis=-1)
  lse = sp.logsumexp(z, axis=-1, keepdims=True)
  y_s = (1 - eps) * np.eye(5)[C] + eps / 5
  expected = p - y_s + 2 * lam * lse * p
  np.testing.assert_allclose(
    G.softmax_cross_entropy_with_integer_labels(Z, C, label_smoothing=eps, z_loss=lam),
    expected,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    G.softmax_cross_entropy(Z, np.eye(5, dtype=np.float32)[C], label_smoothing=eps, z_loss=lam),
    expected,
    atol=1e-6,
  )


def test_sigmoid_and_probability_formulas():
  np.testing.assert_allclose(
    G.sigmoid_binary_cross_entropy(Z, Y), sp.expit(Z.astype(np.float64)) - Y, atol=1e-6
  )
  np.testing.assert_allclose(G.categorical_cross_entropy(Q, Y), -Y / Q, rtol=1e-6)
  np.testing.assert_allclose(G.binary_cross_entropy(Q, Y), -Y / Q + (1 - Y) / (1 - Q), rtol=1e-5)


def test_worked_example_same_loss_different_gradients():
  """True class 0; predictions [.1,.5,.1,.1,.2] and [.1,.6,.1,.1,.1]: same loss, other gradients."""
  y = np.array([1.0, 0, 0, 0, 0], np.float32)
  qa = np.array([0.1, 0.5, 0.1, 0.1, 0.2], np.float32)
  qb = np.array([0.1, 0.6, 0.1, 0.1, 0.1], np.float32)
  for q in (qa, qb):
    np.testing.assert_allclose(L.softmax_cross_entropy(np.log(q), y), np.log(10), rtol=1e-6)
  ga = G.softmax_cross_entropy(np.log(qa), y)
  gb = G.softmax_cross_entropy(np.log(qb), y)
  np.testing.assert_allclose(ga, qa - y, atol=1e-6)  # q - y
  np.testing.assert_allclose(gb, qb - y, atol=1e-6)
  assert not np.allclose(ga, gb)
  np.testing.assert_allclose(
    ga, jax.grad(lambda z: L.softmax_cross_entropy(z, y))(np.log(qa)), atol=1e-6
  )
  # With respect to the probabilities both gradients are -p/q = [-10, 0, 0, 0, 0].
  np.testing.assert_allclose(G.categorical_cross_entropy(qa, y), [-10, 0, 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(G.categorical_cross_entropy(qb, y), [-10, 0, 0, 0, 0], rtol=1e-6)


def test_bf16_gradient_dtype_and_value():
  zb = jnp.asarray(Z, jnp.bfloat16)
  g = G.softmax_cross_entropy_with_integer_labels(zb, C)
  assert g.dtype == jnp.bfloat16
  ad = jax.grad(lambda z: L.softmax_cross_entropy_with_integer_labels(z, C).sum())(zb)
  assert ad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ad, np.float32), atol=1e-2)


def test_integer_gradient_uses_no_one_hot_or_scatter():
  """The true class is selected by an iota comparison fused into the output, not a one-hot."""
  jaxpr = jax.make_jaxpr(functools.partial(G.softmax_cross_entropy_with_integer_labels))(Z, C)
  text = str(jaxpr)
  assert "one_hot" not in text and "scatter" not in text
