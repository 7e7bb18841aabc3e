"""calibration.fit (temperature, vector, matrix, Dirichlet; ODIR) against a float64 SciPy fit.

dirichletcal does not install on Python 3.11 (its releases up to 0.3.dev4 have a
malformed ``install_requires``; 0.5.x needs Python 3.12), so besides the comparison
with dirichletcal 0.5.3 itself in its own interpreter (test_dirichletcal_peer.py), its
objective is ported below from ``dirichletcal/calib/multinomial.py`` (0.3.dev4:
``MultinomialRegression._objective`` with ``ref_row=True``; ``reg_mu`` not None is
ODIR) and minimized in float64 by SciPy's L-BFGS-B to a gradient of 1e-10, so the
check runs everywhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special as sp

from xentjax import calibration as C

X64 = jax.config.jax_enable_x64


def _classifier(n, k, seed=0, scale=4.0):
  """Over-confident logits with a per-class offset (so vector/matrix maps help)."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n)
  z = rng.normal(size=(n, k))
  z[np.arange(n), y] += 1.5
  z = z * scale + rng.normal(size=k) + 0.3 * (z @ rng.normal(size=(k, k)))
  return z.astype(np.float32), y


def _features64(z, method):
  z = np.asarray(z, np.float64)
  if method == "dirichlet":
    return np.maximum(sp.log_softmax(z, 1), np.log(np.finfo(np.float64).tiny))
  return z


def _logits64(theta, x, k, method):
  if method == "vector":
    return x * theta[:k] + np.append(theta[k:], 0.0)
  m = theta.reshape(k - 1, k + 1)
  return np.pad(x @ m[:, :-1].T + m[:, -1], ((0, 0), (0, 1)))


def _objective64(theta, x, y, k, method, odir):
  """dirichletcal's objective: mean NLL + lam * sum_{i != j} W'_ij^2 + mu * sum_i b'_i^2."""
  u = _logits64(theta, x, k, method)
  value = np.mean(sp.logsumexp(u, 1) - u[np.arange(len(y)), y])
  p = sp.softmax(u, 1)
  p[np.arange(len(y)), y] -= 1
  p /= len(y)
  if method == "vector":
    return value, np.concatenate([(p * x).sum(0), p.sum(0)[:-1]])
  grad = p[:, :-1].T @ np.concatenate([x, np.ones((len(y), 1))], 1)
  if odir is not None:
    m = theta.reshape(k - 1, k + 1)
    w = m[:, :-1].copy()
    w[np.arange(k - 1), np.arange(k - 1)] = 0.0
    value += odir[0] * np.sum(w**2) + odir[1] * np.sum(m[:, -1] ** 2)
    grad[:, :-1] += 2 * odir[0] * w
    grad[:, -1] += 2 * odir[1] * m[:, -1]
  return value, grad.ravel()


def _theta0(k, method):
  if method == "vector":
    return np.concatenate([np.ones(k), np.zeros(k - 1)])
  return np.concatenate([np.eye(k - 1, k) - np.eye(k)[-1], np.zeros((k - 1, 1))], 1).ravel()


def _fit64(z, y, method, odir=None):
  k = z.shape[1]
  x = _features64(z, method)
  res = scipy.optimize.minimize(
    _objective64,
    _theta0(k, method),
    args=(x, y, k, method, odir),
    jac=True,
    method="L-BFGS-B",
    options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-10, "maxcor": 30},
  )
  return res.x


def _theta_of(cal, method):
  w, b = np.asarray(cal.weight, np.float64), np.asarray(cal.bias, np.float64)
  if method == "vector":
    return np.concatenate([w, b[:-1]])
  return np.concatenate([w[:-1], b[:-1, None]], 1).ravel()


def _nll64(u, y):
  u = np.asarray(u, np.float64)
  return np.mean(sp.logsumexp(u, 1) - u[np.arange(len(y)), y])


_Z, _Y = _classifier(8000, 6)
Z, Y = _Z[:4000], _Y[:4000]  # fitting rows
ZT, YT = _Z[4000:], _Y[4000:]  # held-out rows of the same model


MAPS = [
  ("vector", None),
  ("matrix", None),
  ("dirichlet", None),
  ("matrix", (1e-2, 1e-2)),
  ("dirichlet", (1e-3, 1e-2)),
]


@pytest.mark.parametrize("method,odir", MAPS)
def test_fit_reaches_the_float64_optimum(method, odir):
  k = Z.shape[1]
  cal = C.fit(Z, Y, method, odir)
  ref = _fit64(Z, Y, method, odir)
  x = _features64(Z, method)
  ours, _ = _objective64(_theta_of(cal, method), x, Y, k, method, odir)
  best, _ = _objective64(ref, x, Y, k, method, odir)
  assert best - 1e-9 <= ours <= best + 1e-5  # the target is 1e-3
  # The Calibrator's logits are the map's (reference-row form), and the held-out
  # NLL is the reference fit's (the target is 1e-2).
  np.testing.assert_allclose(cal(Z), _logits64(_theta_of(cal, method), x, k, method), atol=1e-4)
  ref_test = _nll64(_logits64(ref, _features64(ZT, method), k, method), YT)
  np.testing.assert_allclose(_nll64(cal(ZT), YT), ref_test, atol=1e-3)
  assert _nll64(cal(ZT), YT) < _nll64(ZT, YT)  # it calibrates


def test_temperature_is_fit_temperature():
  cal = C.fit(Z, Y)
  t = C.fit_temperature(Z, Y)
  np.testing.assert_array_equal(cal.weight, t)
  np.testing.assert_array_equal(cal(Z), Z / t)
  keep = np.arange(len(Y)) % 2 == 0
  np.testing.assert_array_equal(C.fit(Z, Y, where=keep).weight, C.fit_temperature(Z, Y, where=keep))


def test_calibrator_is_a_pytree_through_jit():
  cal = C.fit(Z, Y, "dirichlet", (1e-3, 1e-3))
  leaves, treedef = jax.tree_util.tree_flatten(cal)
  assert len(leaves) == 2
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  np.testing.assert_allclose(jax.jit(lambda c, z: c(z))(again, ZT), cal(ZT), rtol=1e-6, atol=1e-6)
  assert cal.weight.shape == (6, 6) and cal.bias.shape == (6,)
  np.testing.assert_array_equal(cal.weight[-1], 0.0)  # the reference row


def test_soft_one_hot_labels_and_where_as_indexing():
  cal = C.fit(Z, Y, "matrix")
  soft = C.fit(Z, np.eye(6, dtype=np.float32)[Y], "matrix")
  np.testing.assert_allclose(soft(ZT), cal(ZT), atol=2e-3)
  keep = np.arange(len(Y)) % 3 != 0
  np.testing.assert_allclose(
    C.fit(Z, Y, "vector", where=keep)(ZT), C.fit(Z[keep], Y[keep], "vector")(ZT), atol=2e-3
  )


def test_logits_summing_to_zero_make_matrix_scaling_flat_in_one_direction():
  zc = Z - Z.mean(1, keepdims=True)
  k = zc.shape[1]
  cal = C.fit(zc, Y, "matrix")
  ref = _fit64(zc, Y, "matrix")
  x = _features64(zc, "matrix")
  ours, _ = _objective64(_theta_of(cal, "matrix"), x, Y, k, "matrix", None)
  best, _ = _objective64(ref, x, Y, k, "matrix", None)
  assert ours <= best + 1e-5
  np.testing.assert_allclose(
    sp.softmax(np.asarray(cal(zc), np.float64), 1),
    sp.softmax(_logits64(ref, x, k, "matrix"), 1),
    atol=2e-3,
  )
  # L-BFGS (in standardized features) never moves along W -> W + c 1^T: for each
  # row, sum_j s_j^2 dW_ij stays 0, with s_j the standard deviation of logit j.
  start = _theta0(k, "matrix").reshape(k - 1, k + 1)[:, :-1]
  moved = np.asarray(cal.weight, np.float64)[:-1] - start
  s2 = zc.astype(np.float64).var(0)
  np.testing.assert_allclose(moved @ s2 / s2.sum(), 0.0, atol=1e-3)
  assert np.abs(moved.sum(1)).max() > 1e-2  # the plain row sums did move (the check can fail)
  # ODIR with lambda > 0 makes the minimizer unique: the parameters match.
  odir = (1e-2, 1e-2)
  got = _theta_of(C.fit(zc, Y, "matrix", odir), "matrix")
  np.testing.assert_allclose(got, _fit64(zc, Y, "matrix", odir), atol=2e-3)


def test_odir_pulls_off_diagonals_and_biases_to_zero():
  cal = C.fit(Z, Y, "dirichlet", (100.0, 100.0))
  w = np.asarray(cal.weight)
  assert np.abs(w - np.diag(np.diag(w))).max() < 1e-2 and np.abs(np.asarray(cal.bias)).max() < 1e-2
  free = C.fit(Z, Y, "dirichlet")
  w = np.asarray(free.weight)
  assert np.abs(w - np.diag(np.diag(w))).max() > 0.05


def test_bad_inputs_give_nan_or_errors():
  bad = Z.copy()
  bad[3, 1] = np.nan
  assert np.isnan(np.asarray(C.fit(bad, Y, "dirichlet").weight)).all()
  keep = np.arange(len(Y)) != 3
  np.testing.assert_allclose(
    C.fit(bad, Y, "vector", where=keep)(ZT), C.fit(Z[keep], Y[keep], "vector")(ZT), atol=1e-4
  )
  assert np.isnan(np.asarray(C.fit(Z, np.where(keep, Y, 9), "matrix").bias)).all()
  assert np.isnan(np.asarray(C.fit(Z, Y, "matrix", where=np.zeros(len(Y), bool)).weight)).all()
  with pytest.raises(ValueError, match="method"):
    C.fit(Z, Y, "platt")
  with pytest.raises(ValueError, match="odir"):
    C.fit(Z, Y, "vector", (0.1, 0.1))
  with pytest.raises(ValueError, match="odir"):
    C.fit(Z, Y, "matrix", (-1.0, 0.1))


def test_dtypes():
  cal = C.fit(Z.astype(np.float64), Y, "dirichlet")
  assert cal.weight.dtype == (jnp.float64 if X64 else jnp.float32)
  assert C.fit(Z.astype(jnp.bfloat16), Y, "vector").weight.dtype == jnp.float32
