"""The Keras 3 / PyTorch / SciPy conventions a porting user reaches for.

Keras is not installed: each Keras reference below is the documented Keras 3
formula, transcribed in float64 NumPy (the comment names the Keras function).
PyTorch and SciPy references are the libraries themselves, in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special as sp
import scipy.stats

import xentjax as L
from xentjax import info

X64 = jax.config.jax_enable_x64
RTOL = 1e-9 if X64 else 2e-5
ATOL = 1e-12 if X64 else 1e-6
KERAS_EPS = 1e-7  # keras.config.epsilon()

_RNG = np.random.default_rng(12)
Z = _RNG.normal(size=(5, 4)) * 2.0
C = np.array([0, 3, 1, 2, 3])
ONEHOT = np.eye(4)[C]
SOFT = _RNG.dirichlet(np.ones(4), size=5)
BIN_Z = _RNG.normal(size=(5, 3)) * 3.0
BIN_Y = (_RNG.random((5, 3)) < 0.4).astype(np.float64)


def _f(x):
  return np.asarray(x, np.float64 if X64 else np.float32)


def _softmax64(z):
  return np.exp(z - sp.logsumexp(z, axis=-1, keepdims=True))


# --- Keras references (float64 transcriptions of the documented formulas) ------


def _keras_categorical_focal(y_true, y_pred_probs, alpha, gamma, label_smoothing):
  """keras.losses.categorical_focal_crossentropy (from_logits=False after softmax)."""
  k = y_true.shape[-1]
  y_true = y_true * (1.0 - label_smoothing) + label_smoothing / k
  out = y_pred_probs / y_pred_probs.sum(-1, keepdims=True)
  out = np.clip(out, KERAS_EPS, 1.0 - KERAS_EPS)
  cce = -y_true * np.log(out)
  return (alpha * (1.0 - out) ** gamma * cce).sum(-1)


def _keras_bce(y_true, y_pred, label_smoothing):
  """keras.losses.binary_crossentropy, elementwise (before its mean over the last axis)."""
  y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
  p = np.clip(y_pred, KERAS_EPS, 1.0 - KERAS_EPS)
  return -(y_true * np.log(p) + (1.0 - y_true) * np.log(1.0 - p))


def _keras_binary_focal(y_true, logits, gamma, label_smoothing):
  """keras.losses.binary_focal_crossentropy(from_logits=True), elementwise, no balancing."""
  y_true = y_true * (1.0 - label_smoothing) + 0.5 * label_smoothing
  p = sp.expit(logits)
  bce = -(y_true * sp.log_expit(logits) + (1.0 - y_true) * sp.log_expit(-logits))
  p_t = y_true * p + (1.0 - y_true) * (1.0 - p)
  return (1.0 - p_t) ** gamma * bce


def _keras_squared_hinge(y_true, y_pred):
  """keras.losses.squared_hinge (with convert_binary_labels_to_hinge)."""
  if np.all((y_true == 0) | (y_true == 1)):
    y_true = 2.0 * y_true - 1.0
  return np.mean(np.square(np.maximum(1.0 - y_true * y_pred, 0.0)), axis=-1)


def _keras_categorical_hinge(y_true, y_pred):
  """keras.losses.categorical_hinge."""
  pos = np.sum(y_true * y_pred, axis=-1)
  neg = np.max((1.0 - y_true) * y_pred, axis=-1)
  return np.maximum(neg - pos + 1.0, 0.0)


def _keras_sparse_cce(labels, probs):
  """keras.losses.sparse_categorical_crossentropy(from_logits=False): clip then -log q_y."""
  q = np.clip(probs / probs.sum(-1, keepdims=True), KERAS_EPS, 1 - KERAS_EPS)
  return -np.log(np.take_along_axis(q, labels[:, None], -1)[:, 0])


# --- softmax focal loss ---------------------------------------------------------


@pytest.mark.parametrize(
  "gamma,alpha,ls",
  [(0.0, None, 0.0), (2.0, None, 0.0), (0.5, 0.25, 0.1), (2.0, "vector", 0.1), (2.0, 0.25, 0.0)],
)
def test_softmax_focal_matches_keras(gamma, alpha, ls):
  a = np.array([0.1, 0.2, 0.3, 0.4]) if alpha == "vector" else (1.0 if alpha is None else alpha)
  for y in (ONEHOT, SOFT):
    expected = _keras_categorical_focal(y, _softmax64(Z), a, gamma, ls)
    kw = {"gamma": gamma, "alpha": None if alpha is None else a, "label_smoothing": ls}
    got = L.softmax_focal_loss(_f(Z), _f(y), **kw)
    # Keras clips at 1e-7; these logits keep every probability far from it.
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    got_p = L.categorical_focal_cross_entropy(_f(_softmax64(Z)), _f(y), **kw)
    np.testing.assert_allclose(got_p, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 2.0])
def test_softmax_focal_gradient_closed_form_equals_autodiff(gamma):
  z, y = _f(Z), _f(SOFT)
  kw = {"gamma": gamma, "alpha": np.array([0.1, 0.2, 0.3, 0.4]), "label_smoothing": 0.05}
  auto = jax.grad(lambda z: L.softmax_focal_loss(z, y, **kw).sum())(z)
  np.testing.assert_allclose(L.grads.softmax_focal_loss(z, y, **kw), auto, rtol=RTOL, atol=ATOL)
  # The closed form is itself differentiated by the custom_jvp: check it
  # against central finite differences of the float64 reference.
  h = 1e-6
  fd = np.zeros_like(Z)
  for i in np.ndindex(Z.shape):
    dz = np.zeros_like(Z)
    dz[i] = h
    aw = np.array([0.1, 0.2, 0.3, 0.4])
    up = _keras_categorical_focal(SOFT, _softmax64(Z + dz), aw, gamma, 0.05).sum()
    dn = _keras_categorical_focal(SOFT, _softmax64(Z - dz), aw, gamma, 0.05).sum()
    fd[i] = (up - dn) / (2 * h)
  np.testing.assert_allclose(auto, fd, rtol=1e-4, atol=1e-6)


def test_softmax_focal_edge_cases_finite_gradient():
  z = jnp.array([[0.0, -jnp.inf, 1.0], [12.0, -12.0, 0.0], [-jnp.inf, 0.0, 2.0]])
  y = jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
  for gamma in (0.0, 0.5, 2.0):
    val = L.softmax_focal_loss(z, y, gamma=gamma)
    g = jax.grad(lambda z, gamma=gamma: L.softmax_focal_loss(z, y, gamma=gamma).sum())(z)
    assert np.isfinite(val[:2]).all() and val[2] == np.inf
    assert np.isfinite(g).all(), (gamma, g)
    # -inf on a zero-mass class changes nothing: same as dropping that class.
    np.testing.assert_allclose(
      val[0], L.softmax_focal_loss(z[0, ::2], y[0, ::2], gamma=gamma), rtol=1e-6
    )
  # A confident correct row: weight (1 - p)^2 from log1p(sum of the others), not 1 - p.
  r = np.exp(-12.0) + np.exp(-24.0)
  expected = (r / (1 + r)) ** 2 * np.log1p(r)
  np.testing.assert_allclose(L.softmax_focal_loss(z[1:2], y[1:2])[0], expected, rtol=1e-5)


def test_softmax_focal_where_axis_and_masked_rows():
  z, y = _f(Z), _f(SOFT)
  where = np.ones((5, 4), bool)
  where[0, 1] = False
  where[2] = False  # a fully masked row: 0 and a zero gradient
  got = L.softmax_focal_loss(z, y, where=where, gamma=1.5)
  assert got[2] == 0
  expected = L.softmax_focal_loss(z[0, [0, 2, 3]], y[0, [0, 2, 3]], gamma=1.5)
  np.testing.assert_allclose(got[0], expected, rtol=1e-6)
  g = jax.grad(lambda z: L.softmax_focal_loss(z, y, where=where).sum())(z)
  assert (g[2] == 0).all() and g[0, 1] == 0
  np.testing.assert_allclose(
    L.softmax_focal_loss(z.T, y.T, axis=0), L.softmax_focal_loss(z, y), rtol=1e-6
  )


# --- label smoothing, pos_weight, eps ---------------------------------------


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_binary_label_smoothing_matches_keras(ls):
  p = sp.expit(BIN_Z)
  np.testing.assert_allclose(
    L.binary_cross_entropy(_f(p), _f(BIN_Y), label_smoothing=ls, eps=KERAS_EPS),
    _keras_bce(BIN_Y, p, ls),
    rtol=RTOL,
    atol=ATOL,
  )
  # From logits: Keras's from_logits=True path uses the same smoothed targets.
  np.testing.assert_allclose(
    L.sigmoid_binary_cross_entropy(_f(BIN_Z), _f(BIN_Y), label_smoothing=ls),
    _keras_bce(BIN_Y, p, ls),
    rtol=1e-5,  # Keras's clip at 1e-7 moves the reference by up to ~1e-7
    atol=1e-6,
  )
  np.testing.assert_allclose(
    L.sigmoid_focal_loss(_f(BIN_Z), _f(BIN_Y), gamma=2.0, label_smoothing=ls),
    _keras_binary_focal(BIN_Y, BIN_Z, 2.0, ls),
    rtol=RTOL,
    atol=ATOL,
  )


def test_categorical_label_smoothing_matches_keras():
  ls = 0.1
  q = _softmax64(Z)
  y = ONEHOT * (1 - ls) + ls / 4  # keras.losses.categorical_crossentropy
  expected = -(y * np.log(np.clip(q, KERAS_EPS, 1 - KERAS_EPS))).sum(-1)
  got = L.categorical_cross_entropy(_f(q), _f(ONEHOT), label_smoothing=ls, eps=KERAS_EPS)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
  # Same convention as the logits version.
  np.testing.assert_allclose(
    got, L.softmax_cross_entropy(_f(Z), _f(ONEHOT), label_smoothing=ls), rtol=1e-5
  )


def test_sigmoid_bce_pos_weight_matches_torch():
  torch = pytest.importorskip("torch")
  pw = np.array([0.5, 3.0, 1.5])
  z_t = torch.tensor(BIN_Z, requires_grad=True)
  loss_t = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pw), reduction="none")(
    z_t, torch.tensor(BIN_Y)
  )
  (g_t,) = torch.autograd.grad(loss_t.sum(), z_t)
  got = L.sigmoid_binary_cross_entropy(_f(BIN_Z), _f(BIN_Y), pos_weight=_f(pw))
  np.testing.assert_allclose(got, loss_t.detach().numpy(), rtol=RTOL, atol=ATOL)
  g = jax.grad(lambda z: L.sigmoid_binary_cross_entropy(z, _f(BIN_Y), pos_weight=_f(pw)).sum())
  np.testing.assert_allclose(g(_f(BIN_Z)), g_t.numpy(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
    L.grads.sigmoid_binary_cross_entropy(_f(BIN_Z), _f(BIN_Y), pos_weight=_f(pw)),
    g_t.numpy(),
    rtol=RTOL,
    atol=ATOL,
  )


def test_pos_weight_shape_error_names_it():
  with pytest.raises(ValueError, match="pos_weight"):
    L.sigmoid_binary_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 3)), pos_weight=jnp.ones(2))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_bce_eps_clips_both_sides_in_every_dtype(dtype):
  q = jnp.array([1.0, 0.0], dtype)
  y = jnp.array([0.0, 1.0], dtype)
  got = L.binary_cross_entropy(q, y, eps=1e-10)
  np.testing.assert_allclose(got, [-np.log(1e-10)] * 2, rtol=1e-6)
  g = jax.grad(lambda q: L.binary_cross_entropy(q, y, eps=1e-10).sum())(q.astype(jnp.float32))
  assert (g == 0).all()  # both clips active
  np.testing.assert_array_equal(L.grads.binary_cross_entropy(q, y, eps=1e-10), [0, 0])


# --- hinge family --------------------------------------------------------------


def test_squared_hinge_matches_keras_both_target_conventions():
  s = _RNG.normal(size=(4, 6))
  t01 = (_RNG.random((4, 6)) < 0.5).astype(np.float64)
  for t in (t01, 2 * t01 - 1):
    got = L.squared_hinge_loss(_f(s), _f(t)).mean(-1)
    np.testing.assert_allclose(got, _keras_squared_hinge(t, s), rtol=RTOL, atol=ATOL)


def test_categorical_hinge_matches_keras_one_hot_multi_hot_and_zero_rows():
  s = _RNG.normal(size=(4, 5))
  y = np.array([[0, 1, 0, 0, 0], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0]])
  got = L.categorical_hinge_loss(_f(s), _f(y))
  np.testing.assert_allclose(got, _keras_categorical_hinge(y, s), rtol=RTOL, atol=ATOL)
  # With a non-negative wrong-class score it is the Crammer-Singer hinge.
  s2 = np.abs(s)
  np.testing.assert_allclose(
    L.categorical_hinge_loss(_f(s2), _f(np.eye(5)[[1, 0, 2, 4]])),
    L.multiclass_hinge_loss(_f(s2), np.array([1, 0, 2, 4])),
    rtol=1e-6,
  )


# --- integer labels on probabilities; NLL ------------------------------------------


def test_sparse_categorical_cross_entropy_matches_keras_and_refuses_to_clip():
  q = _softmax64(Z)
  got = L.categorical_cross_entropy_with_integer_labels(_f(q), C, eps=KERAS_EPS)
  np.testing.assert_allclose(got, _keras_sparse_cce(C, q), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(
    L.categorical_cross_entropy_with_integer_labels(_f(q), C),
    L.categorical_cross_entropy(_f(q), _f(ONEHOT)),
    rtol=1e-6,
  )
  q0 = jnp.array([[0.0, 1.0], [0.5, 0.5], [0.5, 0.5]])
  got = L.categorical_cross_entropy_with_integer_labels(q0, jnp.array([0, 2, 1]))
  assert got[0] == np.inf and np.isnan(got[1])  # no silent clipping; bad label is NaN
  masked = L.categorical_cross_entropy_with_integer_labels(
    q0, jnp.array([0, 2, 1]), where=jnp.array([False, False, True])
  )
  np.testing.assert_allclose(masked, [0.0, 0.0, np.log(2)], rtol=1e-6)
  np.testing.assert_allclose(
    L.categorical_cross_entropy_with_integer_labels(_f(q).T, C, axis=0),
    L.categorical_cross_entropy_with_integer_labels(_f(q), C),
    rtol=1e-6,
  )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_matches_torch(reduction, weighted):
  torch = pytest.importorskip("torch")
  x = sp.log_softmax(Z, axis=-1)
  y = np.array([0, 3, -100, 2, 3])
  w = np.array([0.5, 2.0, 1.0, 0.25]) if weighted else None
  x_t = torch.tensor(x, requires_grad=True)
  w_t = None if w is None else torch.tensor(w)
  ref = torch.nn.functional.nll_loss(x_t, torch.tensor(y), weight=w_t, reduction=reduction)
  cot = np.arange(1.0, 1.0 + ref.numel()).reshape(ref.shape)
  (g_t,) = torch.autograd.grad(ref, x_t, torch.tensor(cot))
  kw = {"weight": None if w is None else _f(w), "reduction": reduction}
  got, vjp = jax.vjp(lambda x: L.nll_loss(x, y, **kw), _f(x))
  np.testing.assert_allclose(got, ref.detach().numpy(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(vjp(jnp.asarray(cot, got.dtype))[0], g_t.numpy(), rtol=RTOL, atol=ATOL)
  # torch's layout: classes on axis 1.
  x3 = np.moveaxis(np.stack([x, x[::-1]]), -1, 1)  # [2, K, 5]
  y3 = np.stack([y, y[::-1]])
  ref3 = torch.nn.functional.nll_loss(
    torch.tensor(x3), torch.tensor(y3), weight=w_t, reduction=reduction
  )
  np.testing.assert_allclose(
    L.nll_loss(_f(x3), y3, axis=1, **kw), ref3.numpy(), rtol=RTOL, atol=ATOL
  )


def test_nll_loss_nothing_counted_and_bad_labels():
  x = jnp.log(jnp.full((2, 3), 1 / 3))
  y = jnp.array([-100, -100])
  assert np.isnan(L.nll_loss(x, y))
  np.testing.assert_array_equal(jax.grad(lambda x: L.nll_loss(x, y))(x), 0.0)
  assert L.nll_loss(x, y, reduction="sum") == 0
  assert np.isnan(L.nll_loss(x, jnp.array([3, 0]))).item()
  with pytest.raises(ValueError, match="reduction"):
    L.nll_loss(x, y, reduction="avg")


# --- SciPy's normalization -----------------------------------------------------------


@pytest.mark.parametrize("base", [None, 2])
def test_info_normalize_matches_scipy_entropy(base):
  pk = _RNG.random((3, 5)) * 4  # unnormalized, as SciPy accepts them
  qk = _RNG.random((3, 5)) * 2
  got = info.entropy(_f(pk), base=base, normalize=True)
  np.testing.assert_allclose(got, scipy.stats.entropy(pk, base=base, axis=-1), rtol=RTOL)
  got = info.kl_divergence(_f(pk), _f(qk), base=base, normalize=True)
  np.testing.assert_allclose(got, scipy.stats.entropy(pk, qk, base=base, axis=-1), rtol=RTOL)
  js = scipy.spatial.distance.jensenshannon(pk, qk, base=base, axis=-1) ** 2
  got = info.js_divergence(_f(pk), _f(qk), base=base, normalize=True)
  np.testing.assert_allclose(got, js, rtol=1e-4 if not X64 else 1e-8)
  pn, qn = pk / pk.sum(-1, keepdims=True), qk / qk.sum(-1, keepdims=True)
  ce = -(pn * np.log(qn)).sum(-1) / (1.0 if base is None else np.log(base))
  np.testing.assert_allclose(
    info.cross_entropy(_f(pk), _f(qk), base=base, normalize=True), ce, rtol=RTOL
  )
  # Default unchanged: no normalization.
  np.testing.assert_allclose(info.entropy(_f(pk)), -(pk * np.log(pk)).sum(-1), rtol=RTOL)
  with pytest.raises(TypeError, match="normalize"):
    info.entropy(_f(pk), normalize="yes")
