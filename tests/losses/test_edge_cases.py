"""One edge-case checker, applied to every cross-entropy in the core set.

For each loss the same questions are asked (jaxopt's shared loss checker is
the model): is the gradient link(z) - y (or -p/q on probabilities), matching
`xentjax.grads`; are +-1e4 logits finite in value and gradient; what happens
with -inf on a wrong class (finite value and gradient) and on the true class
(+inf value, finite gradient for logit losses); does NaN propagate (and only
to its own example); does `jax.test_util.check_grads` pass. Expected values
are float64 NumPy formulas, never our own output.

Further down: the decisions xentjax makes differently from optax (finite where
optax returns NaN), all-masked rows, out-of-range labels, empty batches and
bad arguments.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest
import scipy.special as sp

import xentjax as L
from xentjax import grads as G

B, K = 3, 4
_RNG = np.random.default_rng(1234)
Z = (_RNG.normal(size=(B, K)) * 1.5).astype(np.float32)
C = np.array([0, 2, 3])  # true classes; class 1 of row 0 is a wrong class
ONEHOT = np.eye(K, dtype=np.float32)[C]
WRONG, TRUE, NAN_ROW = (0, 1), (1, 2), 2


def _softmax64(z):
  return sp.softmax(np.asarray(z, np.float64), axis=-1)


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  loss: Callable  # (x, target) -> per-example loss
  grad: Callable  # closed form from xentjax.grads
  expected_grad: Callable  # float64 numpy formula, (x, target) -> grad
  target: np.ndarray
  on_probs: bool = False  # x holds probabilities (edge value 0) instead of logits (-inf)
  elementwise: bool = False  # the loss has the shape of x

  def x(self):
    if self.on_probs:  # kept away from 0 so finite differences stay accurate
      return (0.8 * _softmax64(Z) + 0.2 / K).astype(np.float32)
    return Z.copy()

  def edge(self):
    return 0.0 if self.on_probs else -np.inf

  def rows(self, value):
    """Per-example values reduced to one entry per row (elementwise losses: any/all)."""
    return value


def _sigmoid64(z):
  return sp.expit(np.asarray(z, np.float64))


SPECS = [
  Spec(
    "softmax_cross_entropy",
    L.softmax_cross_entropy,
    G.softmax_cross_entropy,
    lambda z, y: _softmax64(z) * y.sum(-1, keepdims=True) - y,
    ONEHOT,
  ),
  Spec(
    "softmax_cross_entropy[soft labels]",
    L.softmax_cross_entropy,
    G.softmax_cross_entropy,
    lambda z, y: _softmax64(z) * y.sum(-1, keepdims=True) - y,
    # 0.7 on the true class, 0.3 on class 3 (row 2 sums to 0.7: unnormalized labels).
    np.where(ONEHOT == 1, 0.7, np.where(np.arange(K) == 3, 0.3, 0.0)).astype(np.float32),
  ),
  Spec(
    "softmax_cross_entropy_with_integer_labels",
    L.softmax_cross_entropy_with_integer_labels,
    G.softmax_cross_entropy_with_integer_labels,
    lambda z, c: _softmax64(z) - np.eye(K)[c],
    C,
  ),
  Spec(
    "safe_softmax_cross_entropy",
    L.safe_softmax_cross_entropy,
    G.safe_softmax_cross_entropy,
    lambda z, y: _softmax64(z) - y,
    ONEHOT,
  ),
  Spec(
    "poly_loss_cross_entropy[epsilon=0]",
    lambda z, y: L.poly_loss_cross_entropy(z, y, epsilon=0.0),
    lambda z, y: G.poly_loss_cross_entropy(z, y, epsilon=0.0),
    lambda z, y: _softmax64(z) - y,
    ONEHOT,
  ),
  Spec(
    "sigmoid_binary_cross_entropy",
    L.sigmoid_binary_cross_entropy,
    G.sigmoid_binary_cross_entropy,
    lambda z, y: _sigmoid64(z) - y,
    ONEHOT,
    elementwise=True,
  ),
  Spec(
    "sigmoid_focal_loss[gamma=0]",
    lambda z, y: L.sigmoid_focal_loss(z, y, gamma=0.0),
    lambda z, y: G.sigmoid_focal_loss(z, y, gamma=0.0),
    lambda z, y: _sigmoid64(z) - y,
    ONEHOT,
    elementwise=True,
  ),
  Spec(
    "categorical_cross_entropy",
    L.categorical_cross_entropy,
    G.categorical_cross_entropy,
    lambda q, y: -y / np.where(y == 0, 1.0, q),
    ONEHOT,
    on_probs=True,
  ),
  Spec(
    "binary_cross_entropy",
    L.binary_cross_entropy,
    G.binary_cross_entropy,
    lambda q, y: -y / np.where(y == 0, 1.0, q) + (1 - y) / (1 - q),
    ONEHOT,
    on_probs=True,
    elementwise=True,
  ),
]
IDS = [s.name for s in SPECS]


def _value_and_grad(spec, x):
  return jax.value_and_grad(lambda v: spec.loss(v, spec.target).sum())(jnp.asarray(x))


def _per_row(spec, value):
  value = np.asarray(value)
  return value.sum(-1) if spec.elementwise else value


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_gradient_is_link_minus_target(spec):
  x = spec.x()
  expected = spec.expected_grad(np.asarray(x, np.float64), spec.target)
  _, g = _value_and_grad(spec, x)
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(spec.grad(x, spec.target), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "spec", [s for s in SPECS if not s.on_probs], ids=[s.name for s in SPECS if not s.on_probs]
)
def test_extreme_logits_are_finite(spec):
  x = np.where(_RNG.uniform(size=(B, K)) < 0.5, 1e4, -1e4).astype(np.float32)
  x[0] = [1e4, -1e4, 1e4, -1e4]  # true class 0 at +1e4, tied with class 2
  value, g = _value_and_grad(spec, x)
  assert np.all(np.isfinite(spec.loss(x, spec.target)))
  assert np.isfinite(value) and np.all(np.isfinite(g))
  np.testing.assert_allclose(g, spec.expected_grad(x, spec.target), atol=1e-6)
  np.testing.assert_allclose(spec.grad(x, spec.target), g, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_edge_value_on_a_wrong_class(spec):
  """-inf logit (probability 0) on a class without target mass: finite value and gradient."""
  x = spec.x()
  x[WRONG] = spec.edge()
  value = _per_row(spec, spec.loss(x, spec.target))
  assert np.all(np.isfinite(value)), value
  _, g = _value_and_grad(spec, x)
  assert np.all(np.isfinite(g)), g
  expected = spec.expected_grad(np.asarray(x, np.float64), spec.target)
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(spec.grad(x, spec.target), g, rtol=1e-5, atol=1e-6)
  # The value itself, from the float64 formula with that class removed.
  if not spec.elementwise and not spec.on_probs:
    z = np.asarray(x, np.float64)[0]
    y = np.eye(K)[C[0]] if spec.target.ndim == 1 else spec.target[0]
    keep = y != 0
    ref = -np.sum(y[keep] * (z[keep] - sp.logsumexp(z)))
    np.testing.assert_allclose(value[0], ref, rtol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_edge_value_on_the_true_class(spec):
  """-inf logit (probability 0) on the true class: +inf there, other examples untouched."""
  x = spec.x()
  x[TRUE] = spec.edge()
  value = _per_row(spec, spec.loss(x, spec.target))
  assert value[TRUE[0]] == np.inf
  others = [i for i in range(B) if i != TRUE[0]]
  assert np.all(np.isfinite(value[others]))
  g = np.asarray(
    jax.grad(lambda v: spec.loss(v, spec.target)[np.array(others)].sum())(jnp.asarray(x))
  )
  assert np.all(np.isfinite(g[others]))
  if not spec.on_probs:  # logit losses: even the +inf example has a finite gradient
    _, g_all = _value_and_grad(spec, x)
    assert np.all(np.isfinite(g_all))
    np.testing.assert_allclose(
      g_all, spec.expected_grad(np.asarray(x, np.float64), spec.target), rtol=1e-5, atol=1e-6
    )
  else:  # -p/q: the true derivative at q = 0 is -inf
    assert spec.grad(x, spec.target)[TRUE] == -np.inf


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_nan_propagates_to_its_own_example_only(spec):
  x = spec.x()
  x[NAN_ROW, 0] = np.nan
  value = np.asarray(spec.loss(x, spec.target))
  if spec.elementwise:
    assert np.isnan(value[NAN_ROW, 0])
    value = np.delete(value.reshape(-1), NAN_ROW * K)
  else:
    assert np.isnan(value[NAN_ROW])
    value = value[:NAN_ROW]
  assert np.all(np.isfinite(value))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_check_grads(spec):
  x = jnp.asarray(spec.x(), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  jtu.check_grads(lambda v: spec.loss(v, spec.target), (x,), order=1, modes=("fwd", "rev"))


# --- where xentjax is right and optax returns NaN -----------------------------


def test_softmax_cross_entropy_with_minus_inf_logits_and_zero_mass():
  z = np.array([[-np.inf, 1.0, 2.0], [0.5, -np.inf, -np.inf]], np.float32)
  y = np.array([[0.0, 0.25, 0.75], [1.0, 0.0, 0.0]], np.float32)
  value, g = jax.value_and_grad(lambda v: L.softmax_cross_entropy(v, y).sum())(z)
  z64 = np.where(np.isinf(z), -np.inf, z).astype(np.float64)
  ref = [-(0.25 * (1 - sp.logsumexp([1.0, 2.0])) + 0.75 * (2 - sp.logsumexp([1.0, 2.0]))), 0.0]
  np.testing.assert_allclose(L.softmax_cross_entropy(z, y), ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(value, sum(ref), rtol=1e-6)
  np.testing.assert_allclose(g, sp.softmax(z64, axis=-1) - y, atol=1e-7)


def test_kl_divergence_with_zero_targets():
  with np.errstate(divide="ignore"):
    log_q = np.log(np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], np.float32))
  t = np.array([[0.25, 0.75, 0.0], [0.0, 0.5, 0.5]], np.float32)
  ref = [
    0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5),
    0.5 * np.log(0.5 / 0.3) + 0.5 * np.log(0.5 / 0.5),
  ]
  np.testing.assert_allclose(L.kl_divergence(log_q, t), ref, rtol=1e-5)
  g_lp, g_t = jax.grad(lambda a, b: L.kl_divergence(a, b).sum(), argnums=(0, 1))(log_q, t)
  np.testing.assert_allclose(g_lp, -t)
  assert np.all(np.isfinite(g_t))
  np.testing.assert_allclose(G.kl_divergence(log_q, t), -t)
  with np.errstate(divide="ignore"):
    lt = np.log(t)
  np.testing.assert_allclose(L.kl_divergence_with_log_targets(log_q, lt), ref, rtol=1e-5)
  g = jax.grad(lambda a: L.kl_divergence_with_log_targets(a, lt).sum())(log_q)
  np.testing.assert_allclose(g, -t)


def test_sigmoid_cross_entropy_with_infinite_logits():
  z = np.array([-np.inf, np.inf, -np.inf, np.inf], np.float32)
  y = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
  np.testing.assert_array_equal(L.sigmoid_binary_cross_entropy(z, y), [0, 0, np.inf, np.inf])
  g = jax.grad(lambda v: L.sigmoid_binary_cross_entropy(v, y).sum())(z)
  np.testing.assert_array_equal(g, [0, 0, -1, 1])


# --- masks, invalid labels, empty batches -----------------------------------


@pytest.mark.parametrize(
  "fn,target",
  [
    (L.softmax_cross_entropy, ONEHOT),
    (L.softmax_cross_entropy_with_integer_labels, np.array([0, 9, 3])),  # 9: masked anyway
    (L.poly_loss_cross_entropy, ONEHOT),
    (L.categorical_cross_entropy, ONEHOT),
  ],
  ids=["softmax", "integer", "poly", "categorical"],
)
def test_all_masked_rows_give_zero_and_zero_gradient(fn, target):
  x = _softmax64(Z).astype(np.float32) if fn is L.categorical_cross_entropy else Z
  where = np.array([True, False, True])
  kw = (
    {"label_smoothing": 0.1, "z_loss": 1e-2}
    if fn in (L.softmax_cross_entropy, L.softmax_cross_entropy_with_integer_labels)
    else {}
  )
  if fn is L.softmax_cross_entropy_with_integer_labels:
    target = np.array([0, 9, 3])
  value, g = jax.value_and_grad(lambda v: fn(v, target, where=where, **kw).sum())(x)
  out = fn(x, target, where=where, **kw)
  assert out[1] == 0.0
  assert np.all(np.isfinite(out)) and np.isfinite(value)
  np.testing.assert_array_equal(g[1], 0.0)
  assert np.any(g[0] != 0)


def test_out_of_range_integer_labels_give_nan():
  labels = np.array([0, K, -1])
  out = L.softmax_cross_entropy_with_integer_labels(Z, labels, label_smoothing=0.1)
  assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isnan(out[2])
  g = jax.grad(lambda v: L.softmax_cross_entropy_with_integer_labels(v, labels).sum())(Z)
  assert np.all(np.isfinite(g[0])) and np.all(np.isnan(g[1:]))
  gc = G.softmax_cross_entropy_with_integer_labels(Z, labels)
  assert np.all(np.isfinite(gc[0])) and np.all(np.isnan(gc[1:]))
  for fn in (L.multiclass_hinge_loss, L.multiclass_perceptron_loss):
    out = fn(Z, labels)
    assert np.isfinite(out[0]) and np.all(np.isnan(out[1:]))


@pytest.mark.parametrize(
  "fn,target,shape",
  [
    (L.softmax_cross_entropy, np.zeros((0, K), np.float32), (0,)),
    (L.softmax_cross_entropy_with_integer_labels, np.zeros((0,), np.int32), (0,)),
    (L.sigmoid_binary_cross_entropy, np.zeros((0, K), np.float32), (0, K)),
    (L.categorical_cross_entropy, np.zeros((0, K), np.float32), (0,)),
  ],
)
def test_empty_batch(fn, target, shape):
  out = fn(np.zeros((0, K), np.float32), target)
  assert out.shape == shape
  assert float(jnp.sum(out)) == 0.0


# --- bad input: a clear error at trace time ----------------------------------


def test_bad_input_errors_name_the_argument():
  z = np.zeros((2, 3), np.float32)
  y = np.full((2, 3), 1 / 3, np.float32)
  with pytest.raises(TypeError, match="logits"):
    L.softmax_cross_entropy(np.zeros((2, 3), np.int32), y)
  with pytest.raises(TypeError, match=r"labels.*integer"):
    L.softmax_cross_entropy(z, np.array([0, 1]))  # integer labels where probabilities go
  with pytest.raises(TypeError, match="labels"):
    L.softmax_cross_entropy_with_integer_labels(z, y[:, 0])  # probabilities where ints go
  with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
    L.softmax_cross_entropy(z, np.zeros((2, 4), np.float32))
  with pytest.raises(ValueError, match=r"labels.shape=\(3,\)"):
    L.softmax_cross_entropy_with_integer_labels(z, np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="label_smoothing"):
    L.softmax_cross_entropy(z, y, label_smoothing=1.5)
  with pytest.raises(ValueError, match="label_smoothing"):
    L.softmax_cross_entropy_with_integer_labels(z, np.array([0, 1]), label_smoothing=-0.1)
  with pytest.raises(ValueError, match="z_loss"):
    L.softmax_cross_entropy(z, y, z_loss=-1.0)
  with pytest.raises(ValueError, match="axis"):
    L.softmax_cross_entropy(z, y, axis=2)
  with pytest.raises(ValueError, match="where"):
    L.softmax_cross_entropy(z, y, where=np.ones((3,), bool))
  with pytest.raises(TypeError, match="probs"):
    L.categorical_cross_entropy(np.ones((2, 3), np.int32), y)
  with pytest.raises(TypeError, match="labels"):
    L.binary_cross_entropy(y, np.ones((2, 3), np.int32))
  with pytest.raises(ValueError, match="eps"):
    L.binary_cross_entropy(y, y, eps=0.7)
  with pytest.raises(ValueError, match=r"predictions.*targets"):
    L.squared_error(z, z[:, :2])
  with pytest.raises(TypeError, match="logits"):
    L.sigmoid_binary_cross_entropy(np.array([1, 2]), np.array([1.0, 0.0]))
  with pytest.raises(ValueError, match="label_smoothing"):
    G.softmax_cross_entropy(z, y, label_smoothing=2.0)
  with pytest.raises(TypeError, match="labels"):
    L.multiclass_hinge_loss(z, y[:, 0])


def test_bad_input_errors_under_jit():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="labels"):
    jax.jit(L.softmax_cross_entropy)(z, jnp.zeros((2, 4)))
