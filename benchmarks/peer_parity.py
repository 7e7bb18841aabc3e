"""Measured agreement of the ported losses and the calibration tools with their references.

    python benchmarks/peer_parity.py            # float32 (x64 off)
    JAX_ENABLE_X64=1 python benchmarks/peer_parity.py

Prints, for each function, the maximum absolute and relative error against an
independent float64 reference: PyTorch (`BCEWithLogitsLoss(pos_weight=)`,
`F.nll_loss`, values and gradients), SciPy (`scipy.stats.entropy`,
`jensenshannon`, `minimize_scalar` for the temperature) and the documented
Keras 3 formulas transcribed in NumPy (Keras is not needed). Inputs are random
(seeded), 512 rows; the tests in `tests/losses/test_keras_parity.py` and
`tests/information/test_calibration.py` assert the same agreements on smaller inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import scipy.spatial.distance
import scipy.special as sp
import scipy.stats

import xentjax as L
from xentjax import calibration, info

X64 = jax.config.jax_enable_x64
DT = np.float64 if X64 else np.float32
EPS = 1e-7  # keras.config.epsilon()
RNG = np.random.default_rng(2026)
N, K = 512, 10


def err(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  abs_err = np.abs(got - ref)
  rel = abs_err / np.maximum(np.abs(ref), 1e-30)
  return float(abs_err.max()), float(rel[np.abs(ref) > 1e-12].max(initial=0.0))


def softmax(z):
  return np.exp(z - sp.logsumexp(z, -1, keepdims=True))


def rows():
  z = RNG.normal(size=(N, K)) * 2.0
  y = RNG.integers(0, K, N)
  onehot = np.eye(K)[y]
  soft = RNG.dirichlet(np.ones(K), N)
  bz = RNG.normal(size=(N, K)) * 3.0
  by = (RNG.random((N, K)) < 0.3).astype(np.float64)
  return z, y, onehot, soft, bz, by


def keras_cases(z, y, onehot, soft, bz, by):
  out = {}
  a = np.linspace(0.1, 1.0, K)
  for name, lab in (("one-hot", onehot), ("soft", soft)):
    ys = lab * 0.9 + 0.1 / K
    q = np.clip(softmax(z), EPS, 1 - EPS)
    ref = (a * (1 - q) ** 2 * -ys * np.log(q)).sum(-1)  # categorical_focal_crossentropy
    got = L.softmax_focal_loss(z.astype(DT), lab.astype(DT), alpha=a, label_smoothing=0.1)
    out[f"softmax_focal_loss ({name}, alpha [K], ls 0.1) vs Keras"] = err(got, ref)
  p = sp.expit(bz).astype(DT).astype(np.float64)  # the reference sees the same inputs
  yb = by * 0.8 + 0.1
  pc = np.clip(p, EPS, 1 - EPS)
  ref = -(yb * np.log(pc) + (1 - yb) * np.log(1 - pc))  # binary_crossentropy, ls 0.2
  got = L.binary_cross_entropy(p.astype(DT), by.astype(DT), label_smoothing=0.2, eps=EPS)
  out["binary_cross_entropy (ls 0.2, eps 1e-7) vs Keras"] = err(got, ref)
  qq = np.clip(softmax(z), EPS, 1 - EPS)
  got = L.categorical_cross_entropy_with_integer_labels(softmax(z).astype(DT), y, eps=EPS)
  out["categorical_cross_entropy_with_integer_labels (eps) vs Keras sparse CCE"] = err(
    got, -np.log(qq[np.arange(N), y])
  )
  t = 2 * by - 1
  ref = np.mean(np.maximum(1 - t * bz, 0) ** 2, -1)  # squared_hinge
  out["squared_hinge_loss ({0,1} targets).mean(-1) vs Keras"] = err(
    L.squared_hinge_loss(bz.astype(DT), by.astype(DT)).mean(-1), ref
  )
  ref = np.maximum(np.max((1 - by) * bz, -1) - np.sum(by * bz, -1) + 1, 0)  # categorical_hinge
  out["categorical_hinge_loss (multi-hot) vs Keras"] = err(
    L.categorical_hinge_loss(bz.astype(DT), by.astype(DT)), ref
  )
  return out


def torch_cases(z, y, bz, by):
  import torch

  out = {}
  pw = np.linspace(0.5, 4.0, K)
  zt = torch.tensor(bz, requires_grad=True)
  ref = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pw), reduction="none")(
    zt, torch.tensor(by)
  )
  (g,) = torch.autograd.grad(ref.sum(), zt)
  got = L.sigmoid_binary_cross_entropy(bz.astype(DT), by.astype(DT), pos_weight=pw.astype(DT))
  out["sigmoid_binary_cross_entropy(pos_weight=) vs torch"] = err(got, ref.detach())
  out["grads.sigmoid_binary_cross_entropy(pos_weight=) vs torch autograd"] = err(
    L.grads.sigmoid_binary_cross_entropy(bz.astype(DT), by.astype(DT), pos_weight=pw.astype(DT)),
    g,
  )
  x = sp.log_softmax(z, -1)
  yy = y.copy()
  yy[::7] = -100
  w = np.linspace(0.2, 2.0, K)
  xt = torch.tensor(x, requires_grad=True)
  ref = torch.nn.functional.nll_loss(xt, torch.tensor(yy), weight=torch.tensor(w))
  (g,) = torch.autograd.grad(ref, xt)

  def f(x):
    return L.nll_loss(x, yy, weight=w.astype(DT))

  got, grad = jax.value_and_grad(f)(x.astype(DT))
  out["nll_loss (weight, ignore_index, mean) vs torch"] = err(got, ref.detach())
  out["jax.grad(nll_loss) vs torch autograd"] = err(grad, g)
  return out


def scipy_cases(z, y):
  out = {}
  pk, qk = RNG.random((N, K)) * 3, RNG.random((N, K))
  out["info.entropy(normalize=True) vs scipy.stats.entropy"] = err(
    info.entropy(pk.astype(DT), normalize=True), scipy.stats.entropy(pk, axis=-1)
  )
  out["info.kl_divergence(normalize=True) vs scipy.stats.entropy(pk, qk)"] = err(
    info.kl_divergence(pk.astype(DT), qk.astype(DT), normalize=True),
    scipy.stats.entropy(pk, qk, axis=-1),
  )
  out["info.js_divergence(normalize=True) vs jensenshannon**2"] = err(
    info.js_divergence(pk.astype(DT), qk.astype(DT), normalize=True),
    scipy.spatial.distance.jensenshannon(pk, qk, axis=-1) ** 2,
  )
  zc = (z + 2.0 * np.eye(K)[y]) * 3.0  # informative but over-confident logits

  def mean_ce(s):
    zt = zc / np.exp(s)
    return np.mean(sp.logsumexp(zt, -1) - zt[np.arange(N), y])

  res = scipy.optimize.minimize_scalar(
    mean_ce, bounds=(-5, 5), method="bounded", options={"xatol": 1e-12}
  )
  t_ref = np.exp(res.x)
  out["calibration.fit_temperature vs scipy minimize_scalar"] = err(
    calibration.fit_temperature(zc.astype(DT), y), t_ref
  )
  batches = [(zc[i : i + 100].astype(DT), y[i : i + 100]) for i in range(0, N, 100)]
  out["calibration.fit_temperature_streaming vs scipy"] = err(
    calibration.fit_temperature_streaming(batches), t_ref
  )
  p = softmax(zc)
  conf, hit = p.max(-1), (p.argmax(-1) == y).astype(float)
  b = np.clip(np.floor(conf * 15).astype(int), 0, 14)
  ece = sum(abs(hit[b == i].sum() - conf[b == i].sum()) for i in range(15)) / N
  out["calibration.expected_calibration_error vs NumPy"] = err(
    calibration.expected_calibration_error(zc.astype(DT), y), ece
  )
  brier = ((p - np.eye(K)[y]) ** 2).sum(-1).mean()
  out["calibration.brier_score vs NumPy"] = err(calibration.brier_score(zc.astype(DT), y), brier)
  return out


def main():
  z, y, onehot, soft, bz, by = rows()
  results = {}
  results.update(keras_cases(z, y, onehot, soft, bz, by))
  results.update(torch_cases(z, y, bz, by))
  results.update(scipy_cases(z, y))
  print(f"x64={X64}, {N} rows x {K} classes, jax {jax.__version__} ({jnp.zeros(()).dtype})")
  print(f"{'function vs reference':78s} {'max abs':>9s} {'max rel':>9s}")
  for name, (a, r) in results.items():
    print(f"{name:78s} {a:9.1e} {r:9.1e}")


if __name__ == "__main__":
  main()
