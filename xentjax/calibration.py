"""Calibration: temperature scaling, expected calibration error, Brier score, reliability.

A classifier is *calibrated* when, among the examples it predicts with
confidence ``c``, a fraction ``c`` is right. The functions here measure that
and fix the simplest miscalibration, a single temperature:

* `fit_temperature` finds the temperature :math:`T > 0` that minimizes the
  mean cross-entropy of ``logits / T`` (so :math:`T > 1` softens an
  over-confident model, :math:`T < 1` sharpens an under-confident one); the
  calibrated probabilities are ``softmax(logits / T)``. It solves the scalar
  problem exactly by safeguarded Newton steps in :math:`\\log T` under `jit`.
  `fit_temperature_streaming` does the same over batches larger than memory.
* `expected_calibration_error` (top-label, uniform or equal-mass bins, or
  classwise), `brier_score` and `reliability_diagram` (per-bin confidence,
  accuracy and count, drawn with matplotlib when asked).

Conventions (the same as `xentjax.evaluate` and `xentjax.metrics`):

* The confidence of a prediction is its largest softmax probability.
* Its correctness is the fractional top-1 credit of ``xentjax._core.top_k_credit``:
  with ``g`` classes strictly above the label and ``t`` tied with it (label
  included), the credit is ``clip((1 - g) / t, 0, 1)``, so a tie for the top
  among ``t`` classes counts ``1 / t`` (the expected hit under a random tie
  break), never a full hit.
* Uniform bins: bin ``b`` holds the confidences in ``[b / B, (b + 1) / B)``
  (the last bin includes 1). Quantile ("equal-mass") bins: the counted rows
  sorted by confidence (stable, so ties keep their order), the row of rank
  ``r`` among ``n`` in bin ``floor(r * B / n)``.
* ECE :math:`= \\sum_b \\frac{n_b}{N} |\\mathrm{acc}_b - \\mathrm{conf}_b|
  = \\frac1N \\sum_b |\\sum_{i \\in b} (\\mathrm{credit}_i - \\mathrm{conf}_i)|`.
* Rows whose ``where`` entry is False do not count; a label outside
  ``[0, K)`` makes the result NaN; with nothing counted every result is NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import statistics
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from xentjax import _core, metrics
from xentjax import _validation as V
from xentjax._api import doc_parts, public, public_like, where_mask
from xentjax._core import label_status, mean_or_nan, top_k_credit

__all__ = [
  "METHODS",
  "Calibrator",
  "ReliabilityDiagram",
  "SmoothCurve",
  "TemperatureStats",
  "adaptive_calibration_error",
  "bootstrap",
  "brier_score",
  "expected_calibration_error",
  "fit",
  "fit_streaming",
  "fit_temperature",
  "fit_temperature_streaming",
  "maximum_calibration_error",
  "reliability_diagram",
  "smooth_ece",
  "temperature_from_statistics",
  "temperature_grid",
  "temperature_statistics",
]

BINNINGS = ("uniform", "quantile")


# ---------------------------------------------------------------------------
# Inputs.


class _FlatRows(NamedTuple):
  """Flattened ``[n, K]`` logits with per-row label statistics."""

  z: jax.Array  # [n, K] logits (compute dtype)
  y: jax.Array  # [n, K] target probabilities (one-hot for integer labels), 0 on uncounted rows
  label: jax.Array  # [n] int32 class used for correctness (argmax of soft labels)
  counted: jax.Array  # [n] bool
  bad: jax.Array  # [n] bool: counted with an out-of-range label


def _flat_rows(logits, labels, where) -> _FlatRows:
  V.check_floating("logits", logits)
  z = jnp.asarray(logits)
  if z.ndim == 0:
    raise ValueError("`logits` must have a class axis (the last), got a scalar.")
  z = z.astype(V.compute_dtype(z.dtype))
  k = z.shape[-1]
  labels = jnp.asarray(labels)
  soft = jnp.issubdtype(labels.dtype, jnp.floating)
  row_shape = z.shape[:-1]
  if soft and labels.shape != z.shape:
    raise ValueError(
      "floating `labels` (probabilities) must have the shape of `logits`, got "
      f"logits.shape={z.shape} and labels.shape={labels.shape}."
    )
  if not soft:
    V.check_integer("labels", labels)
    if labels.shape != row_shape:
      raise ValueError(
        "integer `labels` must have the shape of `logits` without the class axis, got "
        f"logits.shape={z.shape} and labels.shape={labels.shape}."
      )
  where = where_mask(where)
  if where is not None and where.shape != row_shape:
    raise ValueError(
      f"`where` must have the shape {row_shape} of `logits` without the class axis (one "
      f"entry per row), got shape {where.shape}."
    )
  n = int(np.prod(row_shape))
  z = z.reshape(n, k)
  where = None if where is None else where.reshape(n)
  if soft:
    y = labels.astype(z.dtype).reshape(n, k)
    counted = jnp.ones((n,), bool) if where is None else where
    label, bad = jnp.argmax(y, axis=-1).astype(jnp.int32), jnp.zeros((n,), bool)
  else:
    st = label_status(labels.reshape(n), k, where=where)
    counted, bad, label = st.counted, st.bad, st.index
    y = jax.nn.one_hot(label, k, dtype=z.dtype)
  y = jnp.where(counted[:, None], y, 0.0)
  return _FlatRows(z, y, label, counted, bad)


def _arr(x):
  """Array arguments for the jitted cores: NumPy for anything `numpy.asarray` accepts."""
  return x if x is None or isinstance(x, jax.Array) else np.asarray(x)


def _poison(value, rows: _FlatRows):
  """NaN when a counted row has a bad label (the library's validity rule)."""
  return jnp.where(jnp.any(rows.bad), jnp.nan, value)


# ---------------------------------------------------------------------------
# Temperature scaling.


class TemperatureStats(NamedTuple):
  """Sums over examples of the cross-entropy of ``logits / T`` and its derivatives.

  For each grid point ``log_t[g]`` (natural log of the temperature),
  ``loss[g]`` is :math:`\\sum_i \\ell_i(T_g)`, ``d1[g]`` and ``d2[g]`` the
  sums of its first two derivatives with respect to :math:`\\log T`;
  ``count`` is the number of counted rows. Statistics of two batches on the
  same grid add (`add`), which is what makes a streaming fit exact.
  """

  # Arrays on the device, or NumPy arrays when `xentjax.evaluate` sums them on the host.
  log_t: jax.Array | np.ndarray
  loss: jax.Array
  d1: jax.Array
  d2: jax.Array
  # The field's name hides `tuple.count`, which nothing calls on this type.
  count: jax.Array | np.ndarray | int  # type: ignore[assignment]

  def add(self, other: TemperatureStats) -> TemperatureStats:
    return TemperatureStats(
      self.log_t,
      self.loss + other.loss,
      self.d1 + other.d1,
      self.d2 + other.d2,
      self.count + other.count,
    )


def _ce_derivatives(rows: _FlatRows, log_t):
  r"""Summed CE of ``z / T`` and its first two derivatives in ``s = log T``.

  With :math:`\beta = e^{-s}`, :math:`w = \sum_k y_k`, :math:`p =
  \mathrm{softmax}(\beta z)` and :math:`v = \mathrm{Var}_p[z]`:
  :math:`\ell = \sum_k y_k (\log\sum_j e^{\beta z_j} - \beta z_k)`,
  :math:`d\ell/ds = -\beta g` and :math:`d^2\ell/ds^2 = \beta^2 w v + \beta g`
  with :math:`g = \sum_k (w p_k - y_k)(z_k - \max_j z_j)` (the form without
  cancellation for confident rows: the top class's term is 0). The
  log-normalizer is ``log1p(sum of the non-top terms)``, exact when tiny.
  """
  z, y = rows.z, rows.y
  beta = jnp.exp(-log_t).astype(z.dtype)
  zmax = jnp.max(z, axis=-1, keepdims=True)
  zc = z - jnp.where(jnp.isfinite(zmax), zmax, 0.0)  # <= 0; -inf where z = -inf
  top = lax.broadcasted_iota(jnp.int32, z.shape, 1) == jnp.argmax(z, axis=-1)[:, None]
  e = jnp.exp(beta * zc)
  log_s = jnp.log1p(jnp.sum(jnp.where(top, 0.0, e), axis=-1))
  p = e / jnp.exp(log_s)[:, None]
  zf = jnp.where(p == 0, 0.0, zc)  # no 0 * inf in the moments
  w = jnp.sum(y, axis=-1)
  loss = jnp.sum(jnp.where(y == 0, 0.0, y * (log_s[:, None] - beta * zc)), axis=-1)
  g = jnp.sum((w[:, None] * p - y) * jnp.where(y == 0, zf, zc), axis=-1)
  mu = jnp.sum(p * zf, axis=-1)
  var = jnp.sum(p * jnp.square(zf - mu[:, None]), axis=-1)
  counted = rows.counted
  loss = jnp.sum(jnp.where(counted, loss, 0.0))
  d1 = jnp.sum(jnp.where(counted, -beta * g, 0.0))
  d2 = jnp.sum(jnp.where(counted, beta * beta * w * var + beta * g, 0.0))
  return loss, d1, d2


def _newton_log_t(derivs: Callable, bounds, tol: float, max_iter: int):
  """Safeguarded Newton on dF/ds = 0 in ``s = log T`` (a `lax.while_loop`).

  F(beta) is convex in beta = 1/T, so dF/ds has one sign change: each
  evaluation narrows a bracket [lo, hi]; a Newton step that leaves it (or a
  non-positive curvature) is replaced by bisection (or by a step of 2 toward
  the minimum while no bracket exists). The last iterate is returned unless
  its loss is above the loss at the start, T = 1 (then T = 1 is returned), so
  the fit never makes the loss worse. Also returns whether the loss and its
  derivatives at the start are finite (they are not when a counted row holds
  a NaN, or ``-inf`` on its label: the fit is then NaN).
  """
  lo_b, hi_b = float(np.log(bounds[0])), float(np.log(bounds[1]))
  f0, d1_0, d2_0 = derivs(jnp.zeros(()))

  def cond(st):
    return (st["it"] < max_iter) & ~st["done"]

  def body(st):
    s = st["s"]
    _, d1, d2 = derivs(s)
    lo = jnp.where(d1 < 0, s, st["lo"])
    hi = jnp.where(d1 > 0, s, st["hi"])
    nxt = _safeguarded_step(s, d1, d2, lo, hi, lo_b, hi_b)
    done = (jnp.abs(nxt - s) <= tol * (1.0 + jnp.abs(s))) | (d1 == 0) | ~jnp.isfinite(nxt)
    nxt = jnp.where(jnp.isfinite(nxt), nxt, s)
    return {"s": nxt, "lo": lo, "hi": hi, "it": st["it"] + 1, "done": done}

  zero = jnp.zeros((), f0.dtype)
  init = {"s": zero, "lo": zero - jnp.inf, "hi": zero + jnp.inf, "it": jnp.zeros((), jnp.int32)}
  init["done"] = jnp.zeros((), bool)
  st = lax.while_loop(cond, body, init)
  f, _, _ = derivs(st["s"])
  return jnp.where(f <= f0, st["s"], zero), st["it"], jnp.isfinite(f0 + d1_0 + d2_0)


def _safeguarded_step(s, d1, d2, lo, hi, lo_b, hi_b, xp=jnp):
  """Newton step ``s - d1 / d2``, limited to 2, bisecting when it leaves the bracket."""
  newton = xp.where(d2 > 0, s - d1 / xp.where(d2 > 0, d2, 1.0), s - 2.0 * xp.sign(d1))
  newton = xp.clip(newton, s - 2.0, s + 2.0)
  bracketed = xp.isfinite(lo) & xp.isfinite(hi)
  outside = (newton <= lo) | (newton >= hi)
  return xp.clip(xp.where(bracketed & outside, 0.5 * (lo + hi), newton), lo_b, hi_b)


def _check_bounds(bounds) -> tuple[float, float]:
  try:
    lo, hi = (float(b) for b in bounds)
  except (TypeError, ValueError):
    raise TypeError(f"`bounds` must be a pair of numbers (T_min, T_max), got {bounds!r}.") from None
  if not 0 < lo < 1 < hi < np.inf:
    raise ValueError(f"`bounds` must satisfy 0 < T_min < 1 < T_max < inf, got {bounds!r}.")
  return lo, hi


def _check_tol(tol) -> float:
  if not float(tol) > 0:
    raise ValueError(f"`tol` must be > 0, got {tol!r}.")
  return float(tol)


def _check_max_iter(max_iter) -> int:
  if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
    raise ValueError(f"`max_iter` must be a positive int, got {max_iter!r}.")
  return max_iter


_FIT_OPTIONS = {"bounds": _check_bounds, "tol": _check_tol, "max_iter": _check_max_iter}


def _check_fit_options(bounds, tol, max_iter):
  return _check_bounds(bounds), _check_tol(tol), _check_max_iter(max_iter)


@public(("bounds", "tol", "max_iter"), validators=_FIT_OPTIONS)
def fit_temperature(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  where: jax.typing.ArrayLike | None = None,
  bounds: tuple[float, float] = (1e-3, 1e3),
  tol: float = 1e-7,
  max_iter: int = 60,
) -> jax.Array:
  r"""The temperature that minimizes the mean cross-entropy of ``logits / T``.

  .. math::
    T^\star = \arg\min_{T > 0} \frac1N \sum_i
      \Big[\log \sum_k e^{z_{ik}/T} - z_{i y_i}/T\Big].

  The calibrated probabilities are ``softmax(logits / T)``; :math:`T > 1`
  means the model was over-confident. The objective is convex in
  :math:`1/T`, so its derivative in :math:`s = \log T` changes sign once:
  Newton steps in :math:`s` with the exact first and second derivatives,
  safeguarded by bisection on the bracket they build, converge in a few
  iterations to ``tol`` (relative, in :math:`s`), all inside one `jit`.

  Args:
    logits: ``[..., num_classes]`` (floating; 16-bit computed in float32).
    labels: integer labels ``[...]`` or target probabilities
      ``[..., num_classes]``.
    where: keyword-only row mask ``[...]`` (bool or integer 0/1): rows to use.
    bounds: keyword-only search interval ``(T_min, T_max)`` around 1; a
      minimum outside it (logits that separate the data perfectly, whose
      loss keeps falling as :math:`T \to 0`) returns the bound.
    tol: keyword-only stopping tolerance on the Newton step in :math:`\log T`.
    max_iter: keyword-only iteration limit.

  Returns:
    The scalar :math:`T` (float32, or float64 for float64 logits). The fitted
    loss is never above the loss at :math:`T = 1` (the best point visited is
    returned). NaN when no row counts, a counted label is out of range, or
    the loss at :math:`T = 1` or its derivatives are not finite (a NaN
    logit in a counted row, or ``-inf`` on a label): the same answer as
    `fit_temperature_streaming`, never a plausible temperature from bad data.

  Examples:
    >>> import jax.numpy as jnp
    >>> from xentjax import calibration
    >>> z = jnp.array([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    >>> print(f"{calibration.fit_temperature(z, jnp.array([0, 0, 0, 0])):.3f}")
    3.641

  References:
    Guo, Pleiss, Sun and Weinberger, On Calibration of Modern Neural
    Networks, ICML 2017.
  """
  rows = _flat_rows(logits, labels, where)
  s, _, finite = _newton_log_t(lambda s: _ce_derivatives(rows, s), bounds, tol, max_iter)
  n = jnp.sum(rows.counted)
  return _poison(jnp.where((n > 0) & finite, jnp.exp(s), jnp.nan), rows)


@public()
def temperature_statistics(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  log_temperatures: jax.typing.ArrayLike,
  *,
  where: jax.typing.ArrayLike | None = None,
) -> TemperatureStats:
  """`TemperatureStats` of one batch at the given log-temperatures (a 1-D grid).

  Args:
    logits: ``[..., num_classes]``.
    labels: integer labels ``[...]`` or probabilities ``[..., num_classes]``.
    log_temperatures: ``[G]`` natural logs of the temperatures.
    where: keyword-only row mask ``[...]``, bool or integer 0/1.

  Returns:
    The summed loss and its two derivatives in ``log T`` at each grid point,
    and the number of counted rows; add the statistics of several batches
    with `TemperatureStats.add`.
  """
  log_t = jnp.atleast_1d(jnp.asarray(log_temperatures, dtype=float))
  rows = _flat_rows(logits, labels, where)
  loss, d1, d2 = jax.vmap(lambda s: _ce_derivatives(rows, s))(log_t)
  nan_if_bad = jnp.where(jnp.any(rows.bad), jnp.nan, 1.0).astype(loss.dtype)
  return TemperatureStats(
    log_t, loss * nan_if_bad, d1 * nan_if_bad, d2 * nan_if_bad, jnp.sum(rows.counted)
  )


def _batches(batches) -> Callable[[], Iterable]:
  if callable(batches):
    return batches
  if iter(batches) is batches:
    raise TypeError(
      "`batches` must be re-iterable (a list, or an object whose __iter__ starts over) or a "
      "zero-argument callable returning a fresh iterator: each Newton step is one pass. "
      "A one-shot generator can only be read once."
    )
  return lambda: iter(batches)


def _split_batch(batch):
  if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
    raise TypeError("each batch must be a (logits, labels) or (logits, labels, where) tuple.")
  return batch[0], batch[1], (batch[2] if len(batch) == 3 else None)


def _pass(batches: Callable, s: float) -> TemperatureStats:
  total = None
  for batch in batches():
    z, y, w = _split_batch(batch)
    st = temperature_statistics(z, y, [s], where=w)
    total = st if total is None else total.add(st)
  if total is None:
    raise ValueError("`batches` yielded no batch.")
  return total


def fit_temperature_streaming(
  batches: Iterable | Callable[[], Iterable],
  *,
  bounds: tuple[float, float] = (1e-3, 1e3),
  tol: float = 1e-7,
  max_iter: int = 60,
) -> float:
  """`fit_temperature` over batches larger than memory: one pass per Newton step.

  The mean cross-entropy of ``logits / T`` and its first two derivatives in
  ``log T`` are sums over examples, so each Newton step accumulates them over
  all batches (`temperature_statistics`) and the result is the same
  temperature `fit_temperature` finds on the concatenated data (to float
  rounding of the sums), typically in 4-8 passes. `xentjax.evaluate` avoids
  the extra passes instead (see its ``temperature`` field).

  Args:
    batches: a re-iterable of ``(logits, labels)`` or ``(logits, labels,
      where)`` tuples, or a zero-argument callable returning a fresh iterator
      of them.
    bounds, tol, max_iter: keyword-only, as in `fit_temperature`.

  Returns:
    The temperature as a Python float (NaN if no row counts or a label is out
    of range).
  """
  (lo_t, hi_t), tol, max_iter = _check_fit_options(bounds, tol, max_iter)
  get = _batches(batches)
  s, lo, hi, f0 = 0.0, -np.inf, np.inf, None
  for _ in range(max_iter):
    st = _pass(get, s)
    f, d1, d2 = float(st.loss[0]), float(st.d1[0]), float(st.d2[0])
    if int(st.count) == 0 or not np.isfinite(f + d1 + d2):
      return float("nan")
    f0 = f if f0 is None else f0
    lo, hi = (s if d1 < 0 else lo), (s if d1 > 0 else hi)
    nxt = float(_safeguarded_step(s, d1, d2, lo, hi, np.log(lo_t), np.log(hi_t), xp=np))
    if abs(nxt - s) <= tol * (1 + abs(s)) or d1 == 0:
      break
    s = nxt
  # Never worse than T = 1, the start (where the loss was f0).
  assert f0 is not None  # the loop above ran at least once
  return float(np.exp(s)) if float(_pass(get, s).loss[0]) <= f0 else 1.0


# One pass, no second pass: the grid used by `xentjax.evaluate`.

_FINE_OFFSETS = 0.03 * np.arange(-3, 4)  # around a first estimate: +-9% in T, steps of 3%
_COARSE_LOG_T = np.log([1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0, 25.0, 100.0, 1e3])


def temperature_grid(first_estimate: float) -> np.ndarray:
  """The log-temperatures a one-pass fit accumulates (sorted, ``[20]``).

  Seven nodes 0.03 apart in ``log T`` around ``first_estimate`` (a fit on
  the first batch) and thirteen fixed nodes from ``T = 1e-3`` to ``1e3``
  (the bounds of `fit_temperature`; they include ``T = 1``), so the minimum
  is bracketed even when the first batch misjudges it.
  """
  s0 = float(np.log(first_estimate)) if np.isfinite(first_estimate) else 0.0
  edge = _FINE_OFFSETS[-1]
  s0 = float(np.clip(s0, _COARSE_LOG_T[0] + edge, _COARSE_LOG_T[-1] - edge))
  return np.sort(np.concatenate([s0 + _FINE_OFFSETS, _COARSE_LOG_T]))


def _hermite_d1(stats, s):
  """The piecewise cubic Hermite interpolant of ``d1`` (slopes ``d2``) at points ``s``."""
  x, keep = np.unique(np.asarray(stats.log_t, np.float64), return_index=True)  # sorted, no repeats
  f, g = np.asarray(stats.d1, np.float64)[keep], np.asarray(stats.d2, np.float64)[keep]
  s = np.clip(s, x[0], x[-1])
  i = np.clip(np.searchsorted(x, s, side="right") - 1, 0, len(x) - 2)
  h = x[i + 1] - x[i]
  t = (s - x[i]) / h
  h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
  h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
  return h00 * f[i] + h10 * h * g[i] + h01 * f[i + 1] + h11 * h * g[i + 1]


def temperature_from_statistics(
  stats: TemperatureStats | list[TemperatureStats],
) -> tuple[float, float]:
  """The minimizing temperature from statistics on a grid (no further pass).

  The derivative of the loss in ``s = log T`` is known exactly at every node
  (the sums of `temperature_statistics`, accumulated over all batches), with
  its own derivative. The minimum is taken as the root of the piecewise
  cubic Hermite interpolant of these values: exact at the nodes, with an
  error of order ``h**4`` for node spacing ``h`` (0.03 on the fine part of
  `temperature_grid`, where a one-pass fit agrees with the multi-pass Newton
  fit to about 1e-7 relative). Several statistics on different grids (one
  per process of a distributed evaluation, each around its own first batch)
  are combined by summing their interpolants. A minimum outside the grids
  returns the end node.

  Returns:
    ``(T, spacing)``: the temperature and the largest node spacing ``h`` in
    ``log T`` around it (a measure of how exact ``T`` is). ``(nan, nan)``
    without data.
  """
  parts = [stats] if isinstance(stats, TemperatureStats) else list(stats)
  parts = [p for p in parts if int(p.count) > 0]
  if not parts or not all(np.all(np.isfinite(np.asarray(p.d1, np.float64))) for p in parts):
    return float("nan"), float("nan")
  nodes = np.unique(np.concatenate([np.asarray(p.log_t, np.float64) for p in parts]))

  def d1(s):
    return sum(_hermite_d1(p, s) for p in parts)

  v = d1(nodes)
  cross = np.nonzero((v[:-1] < 0) & (v[1:] >= 0))[0]
  if cross.size == 0:
    return float(np.exp(nodes[0] if v[0] >= 0 else nodes[-1])), float("inf")
  lo, hi = nodes[cross[0]], nodes[cross[0] + 1]
  for _ in range(100):  # bisection on the interpolant: to float64 resolution
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if d1(mid) < 0 else (lo, mid)
  s = 0.5 * (lo + hi)
  spacing = max(_spacing_at(p, s) for p in parts)
  return float(np.exp(s)), float(spacing)


def _spacing_at(stats, s) -> float:
  x = np.unique(np.asarray(stats.log_t, np.float64))
  i = int(np.clip(np.searchsorted(x, s, side="right") - 1, 0, len(x) - 2))
  return float(x[i + 1] - x[i])


# ---------------------------------------------------------------------------
# Confidence, correctness, bins.


def _top_label(rows: _FlatRows):
  """Per-row confidence (max softmax probability) and fractional top-1 credit."""
  z = rows.z
  m = jnp.max(z, axis=-1, keepdims=True)
  conf = 1.0 / jnp.sum(jnp.exp(z - jnp.where(jnp.isfinite(m), m, 0.0)), axis=-1)
  z_y = jnp.take_along_axis(z, rows.label[:, None], axis=-1)
  credit = top_k_credit(jnp.sum(z > z_y, axis=-1), jnp.sum(z == z_y, axis=-1), 1)
  return conf, credit.astype(z.dtype)


def _bin_index(conf, counted, num_bins: int, binning: str):
  """Bin of each row: uniform ``floor(c B)`` or quantile ``floor(rank B / n)`` (rank: stable)."""
  if binning == "uniform":
    return jnp.clip(jnp.floor(conf * num_bins).astype(jnp.int32), 0, num_bins - 1)
  n = conf.shape[0]
  order = _confidence_order(conf, counted)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  total = jnp.maximum(jnp.sum(counted), 1)
  return jnp.clip((rank * num_bins) // total, 0, num_bins - 1)


def _confidence_order(conf, counted):
  """The stable ascending order of the counted confidences (``>= 0``), the others last.

  Sorted as the integers of their bit patterns with the row index beside
  them, which orders non-negative floats as the floats do: XLA's CPU sort of
  integers is several times faster than its sort of floats (`jnp.argsort`),
  whose comparator orders NaNs.
  """
  n = conf.shape[0]
  ibits = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[conf.dtype.itemsize]
  bits = lax.bitcast_convert_type(jnp.where(counted, conf, jnp.inf), ibits)
  return lax.sort((bits, jnp.arange(n, dtype=jnp.int32)), num_keys=1, is_stable=True)[1]


def _bin_sums(conf, credit, counted, num_bins: int, binning: str):
  """Per-bin (count, confidence sum, credit sum, min and max confidence)."""
  b = _bin_index(conf, counted, num_bins, binning)
  f = counted.astype(conf.dtype)
  count = jax.ops.segment_sum(f, b, num_bins)
  conf_sum = jax.ops.segment_sum(jnp.where(counted, conf, 0.0), b, num_bins)
  credit_sum = jax.ops.segment_sum(jnp.where(counted, credit, 0.0), b, num_bins)
  lo = jax.ops.segment_min(jnp.where(counted, conf, jnp.inf), b, num_bins)
  hi = jax.ops.segment_max(jnp.where(counted, conf, -jnp.inf), b, num_bins)
  return count, conf_sum, credit_sum, lo, hi


def _check_num_bins(num_bins) -> int:
  if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"`num_bins` must be a positive int, got {num_bins!r}.")
  return int(num_bins)


def _check_binning(binning) -> str:
  if binning not in BINNINGS:
    raise ValueError(f"`binning` must be one of {BINNINGS}, got {binning!r}.")
  return binning


def _check_classwise(classwise) -> bool:
  if not isinstance(classwise, bool):
    raise TypeError(f"`classwise` must be True or False, got {classwise!r}.")
  return classwise


def _check_bins(num_bins, binning):
  return _check_num_bins(num_bins), _check_binning(binning)


_BIN_OPTIONS = {"num_bins": _check_num_bins, "binning": _check_binning}


def _ece_from_sums(count, conf_sum, credit_sum):
  return mean_or_nan(jnp.sum(jnp.abs(credit_sum - conf_sum)), jnp.sum(count))


def _ece(logits, labels, where, num_bins, binning, classwise):
  rows = _flat_rows(logits, labels, where)
  if not classwise:
    conf, credit = _top_label(rows)
    count, conf_sum, credit_sum, _, _ = _bin_sums(conf, credit, rows.counted, num_bins, binning)
    return _poison(_ece_from_sums(count, conf_sum, credit_sum), rows)
  p = _core.probabilities(rows.z)
  hit = jax.nn.one_hot(rows.label, p.shape[-1], dtype=p.dtype)

  def per_class(pk, hk):
    count, conf_sum, credit_sum, _, _ = _bin_sums(pk, hk, rows.counted, num_bins, binning)
    return _ece_from_sums(count, conf_sum, credit_sum)

  return _poison(jnp.mean(jax.vmap(per_class, in_axes=1)(p, hit)), rows)


@public(
  ("num_bins", "binning", "classwise"), validators={**_BIN_OPTIONS, "classwise": _check_classwise}
)
def expected_calibration_error(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  num_bins: int = 15,
  binning: str = "uniform",
  classwise: bool = False,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Expected calibration error of softmax predictions.

  Top-label (default):

  .. math::
    \mathrm{ECE} = \sum_{b=1}^B \frac{n_b}{N}\,
      \big|\mathrm{acc}_b - \mathrm{conf}_b\big|,

  with the confidence :math:`\max_k \mathrm{softmax}(z)_k`, the accuracy the
  fractional top-1 credit (a tie for the top among :math:`t` classes counts
  :math:`1/t`; see the module docstring) and ``num_bins`` bins of equal width
  (``binning="uniform"``, the ECE `xentjax.evaluate` reports) or of equal
  mass (``"quantile"``). ``classwise=True`` gives the classwise ECE of Kull
  et al. (2019): the same sum for each class :math:`k` with confidence
  :math:`p_k` and correctness :math:`[y = k]`, averaged over the classes.

  Args:
    logits: ``[..., num_classes]`` (floating).
    labels: integer labels ``[...]`` (or probabilities ``[..., num_classes]``,
      whose argmax is the label).
    num_bins: keyword-only number of bins :math:`B`.
    binning: keyword-only "uniform" or "quantile".
    classwise: keyword-only, see above.
    where: keyword-only row mask ``[...]``, bool or integer 0/1.

  Returns:
    A scalar in ``[0, 1]`` (NaN when nothing counts or a label is out of range).

  Examples:
    >>> import jax.numpy as jnp
    >>> from xentjax import calibration
    >>> z = jnp.log(jnp.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]]))
    >>> print(f"{calibration.expected_calibration_error(z, jnp.array([0, 1, 0, 0])):.3f}")
    0.400
  """
  return _ece(logits, labels, where, num_bins, binning, classwise)


@public()
def brier_score(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Multiclass Brier score: the mean squared error of the softmax probabilities.

  .. math::
    \mathrm{BS} = \frac1N \sum_i \sum_k \big(\mathrm{softmax}(z_i)_k - y_{ik}\big)^2,

  with :math:`y_i` the one-hot label (or the given target probabilities).
  It lies in ``[0, 2]``; 0 is a perfect, certain prediction. (scikit-learn's
  binary ``brier_score_loss`` is half of this for two classes.)

  Args:
    logits: ``[..., num_classes]`` (floating).
    labels: integer labels ``[...]`` or probabilities ``[..., num_classes]``.
    where: keyword-only row mask ``[...]``, bool or integer 0/1.

  Returns:
    A scalar (NaN when nothing counts or a label is out of range).

  Examples:
    >>> import jax.numpy as jnp
    >>> from xentjax import calibration
    >>> z = jnp.log(jnp.array([[0.8, 0.2], [0.5, 0.5]]))
    >>> print(f"{calibration.brier_score(z, jnp.array([0, 1])):.3f}")
    0.290

  References:
    Brier, Verification of Forecasts Expressed in Terms of Probability, 1950.
  """
  rows = _flat_rows(logits, labels, where)
  per_row = _brier_rows(rows, jnp.issubdtype(jnp.asarray(labels).dtype, jnp.floating))
  total = jnp.sum(jnp.where(rows.counted, per_row, 0.0))
  return _poison(mean_or_nan(total, jnp.sum(rows.counted)), rows)


def _brier_rows(rows: _FlatRows, soft: bool):
  """Each row's Brier score ``[n]`` (``soft``: the labels are probabilities)."""
  if soft:
    p = _core.probabilities(rows.z)
    return jnp.sum(jnp.square(p - rows.y), axis=-1)
  # the core's form: no cancellation in confident rows
  st = _core.row_stats(_core.neutral_rows(rows.z, rows.counted), rows.label, brier=True)
  return _core.brier_from_stats(st.log_s, st.s_other, st.sq_other, rows.z.shape[-1])


# ---------------------------------------------------------------------------
# Reliability diagram.


@dataclasses.dataclass(frozen=True)
class ReliabilityDiagram:
  """Per-bin statistics of a reliability diagram (NumPy arrays of length ``num_bins``).

  ``lower``/``upper`` are the bin edges (uniform bins) or the smallest and
  largest confidence in the bin (quantile bins); ``confidence`` and
  ``accuracy`` are the bin means (NaN for an empty bin), ``count`` the rows
  in the bin; ``ece`` is their weighted gap. With ``smooth=True``,
  ``smooth`` holds the kernel-smoothed curve of `smooth_ece` (else None).
  """

  lower: np.ndarray
  upper: np.ndarray
  confidence: np.ndarray
  accuracy: np.ndarray
  count: np.ndarray
  ece: float
  binning: str = "uniform"
  smooth: SmoothCurve | None = None

  @classmethod
  def from_sums(cls, count, conf_sum, credit_sum, *, lower=None, upper=None, binning="uniform"):
    """Build from per-bin sums (what `xentjax.evaluate` accumulates)."""
    count = np.asarray(count, np.float64)
    conf_sum = np.asarray(conf_sum, np.float64)
    credit_sum = np.asarray(credit_sum, np.float64)
    b = count.shape[0]
    edges = np.arange(b + 1) / b
    lower = edges[:-1] if lower is None else np.asarray(lower, np.float64)
    upper = edges[1:] if upper is None else np.asarray(upper, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
      conf = np.where(count > 0, conf_sum / count, np.nan)
      acc = np.where(count > 0, credit_sum / count, np.nan)
    total = count.sum()
    ece = float(np.abs(credit_sum - conf_sum).sum() / total) if total > 0 else float("nan")
    return cls(lower, upper, conf, acc, count.astype(np.int64), ece, binning)

  def plot(self, ax: Any = None, *, title: str | None = None, label: str | None = None):
    """Draw the diagram (bars: accuracy per bin; line: perfect calibration); returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
      _, ax = plt.subplots(figsize=(4.5, 4.5))
    full = self.count > 0
    if self.binning == "uniform":
      centres, widths = 0.5 * (self.lower + self.upper), self.upper - self.lower
    else:  # equal-mass bins: a bar at each bin's mean confidence, as wide as the bin
      centres = np.where(full, self.confidence, 0.0)
      widths = np.where(full, np.maximum(np.nan_to_num(self.upper - self.lower), 0.01), 0.0)
    acc = np.where(full, self.accuracy, 0.0)
    ax.bar(centres, acc, width=widths, edgecolor="black", alpha=0.7, label=label or "accuracy")
    gap = np.where(full, self.confidence - acc, 0.0)
    ax.bar(centres, gap, bottom=acc, width=widths, color="red", alpha=0.25, label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    if self.smooth is not None:
      c = self.smooth
      ax.plot(c.confidence, c.accuracy, color="C1", lw=2, label=f"smooth (smECE {c.smece:.4f})")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.set_title(title or f"reliability (ECE {self.ece:.4f})")
    ax.legend(loc="upper left", fontsize="small")
    return ax


class SmoothCurve(NamedTuple):
  """The kernel-smoothed reliability curve of `smooth_ece` on a mesh of ``[0, 1]``.

  ``accuracy[j]`` is :math:`t_j - \\hat r(t_j)`, the smoothed accuracy at
  confidence ``confidence[j]``; ``density`` the kernel density there
  (normalized to integrate to about 1); ``smece`` and ``bandwidth`` those of
  `smooth_ece`. NumPy arrays of length 200.
  """

  confidence: np.ndarray
  accuracy: np.ndarray
  density: np.ndarray
  smece: float
  bandwidth: float


@jax.jit
def _smooth_curve_jit(logits, labels, where):
  value, sigma, s, top = _smooth_parts(logits, labels, where, None)
  t = jnp.linspace(0.0, 1.0, 200, dtype=s.f.dtype)
  num, den = _smoothed(s, sigma, t)
  den = den + _SMOOTH_EPS
  density = den / (jnp.mean(den) + 1e-30)
  return t, t - num / den, density, _finish(value, top), sigma


def _smooth_curve(logits, labels, where) -> SmoothCurve:
  t, acc, density, value, sigma = _smooth_curve_jit(logits, labels, where)
  return SmoothCurve(
    np.asarray(t), np.asarray(acc), np.asarray(density), float(value), float(sigma)
  )


@functools.partial(jax.jit, static_argnames=("num_bins", "binning"))
def _diagram_jit(logits, labels, where, num_bins, binning):
  rows = _flat_rows(logits, labels, where)
  conf, credit = _top_label(rows)
  sums = _bin_sums(conf, credit, rows.counted, num_bins, binning)
  return sums, jnp.any(rows.bad)


def reliability_diagram(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  num_bins: int = 15,
  binning: str = "uniform",
  where: jax.typing.ArrayLike | None = None,
  plot: bool = False,
  ax: Any = None,
  smooth: bool = False,
) -> ReliabilityDiagram:
  """Per-bin confidence, accuracy and count of the top-label predictions.

  The bins and the tie rule are those of `expected_calibration_error` (whose
  value is the diagram's ``ece``). With ``plot=True`` (or an ``ax``) the
  diagram is also drawn with matplotlib; `ReliabilityDiagram.plot` draws it
  later.

  Args:
    logits: ``[..., num_classes]`` (floating).
    labels: integer labels ``[...]`` or probabilities ``[..., num_classes]``.
    num_bins: keyword-only number of bins.
    binning: keyword-only "uniform" or "quantile".
    where: keyword-only row mask ``[...]``, bool or integer 0/1.
    plot: keyword-only: draw it (on ``ax``, or on a new figure).
    ax: keyword-only matplotlib Axes to draw on (implies ``plot``).
    smooth: keyword-only: also compute (and draw) the kernel-smoothed curve
      of `smooth_ece` with its fixed-point bandwidth (`SmoothCurve`), a
      reliability diagram without bins.

  Returns:
    A `ReliabilityDiagram` (host NumPy arrays).

  Raises:
    ValueError: a counted label out of range (there is no diagram to draw).
  """
  num_bins, binning = _check_bins(num_bins, binning)
  args = (_arr(logits), _arr(labels), _arr(where))
  (count, conf_sum, credit_sum, lo, hi), bad = _diagram_jit(*args, num_bins, binning)
  if bool(bad):
    raise ValueError("`labels` holds a class index outside [0, num_classes).")
  kw = {}
  if binning == "quantile":
    kw = {"lower": np.where(np.asarray(count) > 0, lo, np.nan), "upper": np.asarray(hi)}
    kw["upper"] = np.where(np.asarray(count) > 0, kw["upper"], np.nan)
  diagram = ReliabilityDiagram.from_sums(count, conf_sum, credit_sum, binning=binning, **kw)
  if smooth:
    diagram = dataclasses.replace(diagram, smooth=_smooth_curve(*args))
  if plot or ax is not None:
    diagram.plot(ax)
  return diagram


# ---------------------------------------------------------------------------
# More calibration errors: equal-mass ACE, MCE, smooth ECE.


class _TopLabel(NamedTuple):
  """Top-label confidence and correctness of the counted rows, and whether the result is NaN."""

  conf: jax.Array  # [n] max softmax probability
  credit: jax.Array  # [n] fractional top-1 credit
  counted: jax.Array  # [n] bool
  poisoned: jax.Array  # scalar bool: a counted row with a bad label or a NaN confidence


def _top_label_rows(logits, labels, where) -> _TopLabel:
  rows = _flat_rows(logits, labels, where)
  conf, credit = _top_label(rows)
  nan_row = rows.counted & (jnp.isnan(conf) | jnp.isnan(credit))
  poisoned = jnp.any(rows.bad) | jnp.any(nan_row)
  return _TopLabel(jnp.where(rows.counted, conf, 0.0), credit, rows.counted, poisoned)


def _quantile_edges(order_statistics: Callable, m, num_bins: int, dtype):
  """``numpy.quantile`` (linear) of ``m`` confidences at ``k / B``; ends set to 0 and 1.

  ``order_statistics(ranks)`` gives the values of 0-based rank ``ranks``.
  The position ``k (m - 1) / B`` of edge ``k`` among the ``m`` sorted values
  is split exactly into an integer part and a fraction (NumPy computes it in
  floating point; the two differ only when a confidence lies on an edge).
  """
  k = jnp.arange(num_bins + 1, dtype=jnp.int32)
  num = k * jnp.maximum(m - 1, 0)
  lo = num // num_bins
  t = ((num % num_bins) / num_bins).astype(dtype)
  ranks = jnp.concatenate([lo, jnp.minimum(lo + 1, m - 1)])
  a, b = jnp.split(order_statistics(jnp.clip(ranks, 0, None)), 2)
  diff = jnp.where(t > 0, b - a, 0.0)
  edges = jnp.where(t >= 0.5, b - diff * (1 - t), a + diff * t)  # NumPy's two-sided lerp
  return edges.at[0].set(0.0).at[-1].set(1.0)


def _order_statistics(x, counted, ranks):
  """The values of rank ``ranks`` (0-based) among the counted ``x >= 0``.

  Sorted as the integers of their bit patterns, which order non-negative
  floats as the floats do (uncounted rows become ``+inf``, last): XLA's CPU
  sort of integers is several times faster than its sort of floats (whose
  comparator orders NaNs), and a bootstrap sorts once per resample.
  """
  ibits = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
  bits = lax.bitcast_convert_type(jnp.where(counted, x, jnp.inf), ibits)
  return lax.bitcast_convert_type(jnp.sort(bits)[ranks], x.dtype)


def _bin_gaps(top: _TopLabel, b, num_bins: int):
  """Per-bin ``|accuracy - confidence|`` and whether the bin holds a counted row."""
  f = top.counted.astype(top.conf.dtype)
  count = jax.ops.segment_sum(f, b, num_bins)
  conf_sum = jax.ops.segment_sum(top.conf * f, b, num_bins)
  credit_sum = jax.ops.segment_sum(jnp.where(top.counted, top.credit, 0.0), b, num_bins)
  return _gaps_from_sums(count, conf_sum, credit_sum)


def _gaps_from_sums(count, conf_sum, credit_sum):
  """Per-bin ``|accuracy - confidence|`` (0 for an empty bin) and whether the bin holds rows."""
  full = count > 0
  gap = jnp.abs(credit_sum - conf_sum) / jnp.where(full, count, 1.0)
  return jnp.where(full, gap, 0.0), full


def _finish(value, top: _TopLabel):
  empty = jnp.sum(top.counted) == 0
  return jnp.where(top.poisoned | empty, jnp.nan, value)


# Docstring text that `adaptive_calibration_error`, `maximum_calibration_error`
# and `smooth_ece` share (their ``{binned_args}``, ``{nan_result}``, ``{example_rows}``).
_BINNED_ARGS = """logits: ``[..., num_classes]`` (floating).
    labels: integer labels ``[...]`` or probabilities ``[..., num_classes]``.
    num_bins: keyword-only number of bins :math:`B`.
    where: keyword-only row mask ``[...]``, bool or integer 0/1."""
_NAN_RESULT = """A scalar in ``[0, 1]``; NaN when nothing counts, a counted label is out
    of range or a counted row holds a NaN logit."""
_EXAMPLE_ROWS = """>>> import jax.numpy as jnp
    >>> from xentjax import calibration
    >>> z = jnp.log(jnp.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]]))
    >>> y = jnp.array([0, 1, 0, 0])"""


@public(("num_bins",), validators={"num_bins": _check_num_bins})
@doc_parts(binned_args=_BINNED_ARGS, example_rows=_EXAMPLE_ROWS)
def adaptive_calibration_error(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  num_bins: int = 15,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Adaptive calibration error: the unweighted mean gap over equal-mass bins.

  .. math::
    \mathrm{ACE} = \frac{1}{|\{b : n_b > 0\}|} \sum_{b : n_b > 0}
      \big|\mathrm{acc}_b - \mathrm{conf}_b\big|,

  where the bin edges :math:`e_0 = 0 < e_1 \le \dots \le e_{B-1} < e_B = 1`
  are the linear quantiles (``numpy.quantile``'s default) of the counted
  confidences at :math:`k / B`, with the first and last replaced by 0 and 1,
  and a confidence :math:`c` falls in bin ``searchsorted(e, c, "right") - 1``
  (a confidence of 1 in the last bin). This is netcal's
  ``ACE(bins=B, equal_intervals=False)``. Unlike the ECE every non-empty
  bin weighs the same, so a few confident mistakes in a sparse bin count.

  Confidence and correctness follow the module's conventions (the maximum
  softmax probability; the fractional top-1 credit, so a ``t``-way tie for
  the top counts ``1/t``, where netcal takes ``argmax``, the first of the
  tied classes; without ties the two agree).

  Args:
    {binned_args}

  Returns:
    A scalar in ``[0, 1]`` (float32, float64 for float64 logits); NaN when
    nothing counts, a counted label is out of range or a counted row holds a
    NaN logit.

  Examples:
    {example_rows}
    >>> print(f"{calibration.adaptive_calibration_error(z, y, num_bins=2):.3f}")
    0.400

  References:
    Nixon, Dusenberry, Zhang, Jerfel and Tran, Measuring Calibration in Deep
    Learning, CVPR Workshops 2019. Küppers et al., netcal (``netcal.metrics.ACE``).
  """
  top = _top_label_rows(logits, labels, where)
  m = jnp.sum(top.counted).astype(jnp.int32)

  def order_statistics(ranks):
    return _order_statistics(top.conf, top.counted, ranks)

  edges = _quantile_edges(order_statistics, m, num_bins, top.conf.dtype)
  b = jnp.clip(jnp.searchsorted(edges, top.conf, side="right") - 1, 0, num_bins - 1)
  gap, full = _bin_gaps(top, b, num_bins)
  return _finish(jnp.sum(gap) / jnp.maximum(jnp.sum(full), 1), top)


@public_like(adaptive_calibration_error, validators={"num_bins": _check_num_bins})
@doc_parts(binned_args=_BINNED_ARGS, nan_result=_NAN_RESULT, example_rows=_EXAMPLE_ROWS)
def maximum_calibration_error(logits, labels, num_bins, where) -> jax.Array:
  r"""Maximum calibration error: the largest gap over equal-width bins.

  .. math::
    \mathrm{MCE} = \max_{b} \big|\mathrm{acc}_b - \mathrm{conf}_b\big|,

  over the ``num_bins`` uniform bins of `expected_calibration_error` (bin
  ``b`` holds :math:`[b/B, (b+1)/B)`, the last includes 1); an empty bin
  counts 0. This is netcal's ``MCE(bins=B)`` (whose bin edges are
  ``linspace(0, 1, B + 1)``: a confidence lying exactly on an edge may be
  rounded into the neighbouring bin by one of the two). Confidence and
  correctness (ties) as in `adaptive_calibration_error`.

  Args:
    {binned_args}

  Returns:
    {nan_result}

  Examples:
    {example_rows}
    >>> print(f"{calibration.maximum_calibration_error(z, y, num_bins=10):.3f}")
    0.400

  References:
    Naeini, Cooper and Hauskrecht, Obtaining Well Calibrated Probabilities
    Using Bayesian Binning, AAAI 2015.
  """
  top = _top_label_rows(logits, labels, where)
  b = _bin_index(top.conf, top.counted, num_bins, "uniform")
  gap, _ = _bin_gaps(top, b, num_bins)
  return _finish(jnp.max(gap), top)


# Smooth ECE (Błasiok and Nakkiran, 2023), discretized as relplot does it.

_SMOOTH_MIN_BANDWIDTH = 1.0 / 512  # the smallest bandwidth the search evaluates
_SMOOTH_GRID = 5121  # grid points at that bandwidth: max(2000, round(20 / sigma)) // 2 + 1
_SMOOTH_EVAL = 5120  # evaluation points at that bandwidth: max(round(10 / sigma), 200)
_SMOOTH_EPS = 1e-4  # added to the kernel density at each evaluation point (relplot's)
_SMOOTH_FFT = 3 * 2**13  # >= 4 * _SMOOTH_GRID - 3 (a linear convolution), and 3-smooth: fast
_SMOOTH_WIDE = 1001  # grid points of every bandwidth >= 0.01 (the common case)
_SMOOTH_WIDE_FFT = 4096  # >= 4 * _SMOOTH_WIDE - 3


class _SmoothInput(NamedTuple):
  """Points and values to smooth, with their grid's spectrum at `_SMOOTH_WIDE` points."""

  f: jax.Array  # [n] confidences in [0, 1]
  values: jax.Array  # [c, n]
  wide: jax.Array  # [c, _SMOOTH_WIDE_FFT // 2 + 1] rfft of the reflected grid


def _grid_points(sigma):
  """relplot's grid size ``max(2000, round(20 / sigma)) // 2 + 1`` for bandwidth ``sigma``."""
  return (jnp.maximum(2000.0, jnp.round(20.0 / sigma)).astype(jnp.int32) // 2) + 1


def _split_cells(f, e):
  """Each point's grid cell and its fraction past the cell's left node, on ``e`` nodes."""
  pos = f * jnp.asarray(e - 1, f.dtype)
  cell = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, e - 2)
  return cell, pos - cell.astype(f.dtype)


def _splat(values, cell, frac, g: int):
  """``values`` ``[c, n]`` split linearly onto the nodes of their cells: ``[c, g]``."""

  def one(v):
    return jax.ops.segment_sum((1 - frac) * v, cell, g) + jax.ops.segment_sum(frac * v, cell + 1, g)

  return jax.vmap(one)(values)


def _reflected_spectrum(grid, e, g: int, nfft: int):
  """The rfft of the grid's first ``e`` nodes reflected at both ends (not repeating them)."""
  q = jnp.arange(3 * g - 2)
  u = q - (e - 1)
  src = jnp.clip(jnp.where(u < 0, -u, jnp.where(u > e - 1, 2 * (e - 1) - u, u)), 0, g - 1)
  return jnp.fft.rfft(jnp.where(q < 3 * e - 2, grid[:, src], 0.0), nfft)


def _convolved_at(spectrum, e, g: int, nfft: int, sigma, t):
  """The reflected grid convolved with the Gaussian sampled on it, interpolated at ``t``."""
  dt = t.dtype
  e1 = jnp.asarray(e - 1, dt)
  m = jnp.arange(g)
  ker = jnp.exp(-jnp.square(m.astype(dt) / e1 - 0.5) / (2 * sigma**2)) / (
    np.sqrt(2 * np.pi) * sigma
  )
  ker = jnp.where(m < e, ker, 0.0).astype(dt)
  full = jnp.fft.irfft(spectrum * jnp.fft.rfft(ker, nfft)[None, :], nfft).astype(dt)
  smoothed = full[:, m + e // 2 + e - 1]  # np.convolve(ext, ker, "valid")[e // 2:][:e]
  inds = jnp.clip(jnp.floor(t * e1).astype(jnp.int32), 0, e - 2)
  r = ((t - inds.astype(dt) / e1) * e1)[None, :]
  return smoothed[:, inds] * (1 - r) + smoothed[:, inds + 1] * r


def _reflected_smooth(f, values, sigma, t):
  r"""Kernel sums :math:`\sum_i v_i K_\sigma(t, f_i)` at points ``t``, as relplot computes them.

  The points ``f`` in ``[0, 1]`` are split linearly onto a grid of ``E``
  points (``E`` from ``sigma``); the grid is reflected at both ends (without
  repeating them) and convolved with a Gaussian sampled on the grid over
  :math:`[-\tfrac12, \tfrac12]` (by FFT, in fixed-size arrays so that
  ``sigma`` may be traced); the result is linearly interpolated at ``t``.
  ``values`` is ``[c, n]``; returns ``[c, len(t)]``.
  """
  e = _grid_points(sigma)
  cell, frac = _split_cells(f, e)
  grid = _splat(values, cell, frac, _SMOOTH_GRID)
  spectrum = _reflected_spectrum(grid, e, _SMOOTH_GRID, _SMOOTH_FFT)
  return _convolved_at(spectrum, e, _SMOOTH_GRID, _SMOOTH_FFT, sigma, t)


def _smooth_input(f, values, cells=None) -> _SmoothInput:
  """`_SmoothInput`; ``cells``: the points' `_split_cells` at `_SMOOTH_WIDE` nodes, if known."""
  cell, frac = _split_cells(f, _SMOOTH_WIDE) if cells is None else cells
  grid = _splat(values, cell, frac, _SMOOTH_WIDE)
  wide = _reflected_spectrum(grid, _SMOOTH_WIDE, _SMOOTH_WIDE, _SMOOTH_WIDE_FFT)
  return _SmoothInput(f, values, wide)


def _smoothed(s: _SmoothInput, sigma, t):
  """`_reflected_smooth` of ``s``: from its grid at `_SMOOTH_WIDE` nodes when ``sigma`` uses them.

  The grid and its spectrum do not depend on ``sigma`` (only the number of
  nodes does), so the bandwidth search computes them once for every
  ``sigma >= 0.01``, with a 6 times shorter FFT; smaller bandwidths take
  the general path.
  """

  def wide():
    return _convolved_at(s.wide, _SMOOTH_WIDE, _SMOOTH_WIDE, _SMOOTH_WIDE_FFT, sigma, t)

  return lax.cond(
    _grid_points(sigma) == _SMOOTH_WIDE, wide, lambda: _reflected_smooth(s.f, s.values, sigma, t)
  )


def _smooth_ece_at(s: _SmoothInput, sigma):
  """relplot's ``smooth_ece(f, y, sigma)``, the values being residual times weight and weight."""
  dt = s.f.dtype
  n_eval = jnp.maximum(jnp.round(10.0 / sigma), 200.0).astype(jnp.int32)
  j = jnp.arange(_SMOOTH_EVAL)
  t = jnp.minimum(j.astype(dt) / (n_eval - 1).astype(dt), 1.0)
  num, den = _smoothed(s, sigma, t)
  keep = j < n_eval
  return jnp.sum(jnp.where(keep, jnp.abs(num), 0.0)) / jnp.sum(
    jnp.where(keep, den + _SMOOTH_EPS, 0.0)
  )


def _smooth_bandwidth(s: _SmoothInput):
  """relplot's bandwidth search: sigma = 1 if 1 < smECE(1), else 10 bisection steps on [0, 1].

  A step at ``s`` moves the upper end down when ``s >= smECE(s)`` (and ``s
  >= 0.001``), the lower end up otherwise; the result is the last upper end
  (a multiple of 1/1024, at least 1/512) and the smECE there.
  """
  dt = s.f.dtype
  at1 = _smooth_ece_at(s, jnp.ones((), dt))

  def step(_, carry):
    hi, lo, value = carry
    mid = 0.5 * (hi + lo)
    v = _smooth_ece_at(s, jnp.maximum(mid, _SMOOTH_MIN_BANDWIDTH))
    too_small = (mid < 1e-3) | (mid < v)
    return (
      jnp.where(too_small, hi, mid),
      jnp.where(too_small, mid, lo),
      jnp.where(too_small, value, v),
    )

  one, zero = jnp.ones((), dt), jnp.zeros((), dt)
  hi, _, value = lax.fori_loop(0, 10, step, (one, zero, at1))
  big = at1 > 1.0
  return jnp.where(big, one, hi), jnp.where(big, at1, value)


def _smooth_value(s: _SmoothInput, bandwidth):
  """(smECE, bandwidth): at the fixed point when ``bandwidth`` is None."""
  if bandwidth is None:
    sigma, value = _smooth_bandwidth(s)
    return value, sigma
  sigma = jnp.asarray(bandwidth, s.f.dtype)
  return _smooth_ece_at(s, sigma), sigma


def _check_bandwidth(bandwidth):
  if bandwidth is None:
    return None
  v = V.real_option("bandwidth", bandwidth)
  if not _SMOOTH_MIN_BANDWIDTH <= v < np.inf:
    raise ValueError(
      f"`bandwidth` must be None (the fixed point) or a number >= 1/512, got {bandwidth!r}."
    )
  return v


def _smooth_rows(top: _TopLabel):
  """Confidences clipped to [0, 1] and the values to smooth: residual times weight, weight."""
  w = top.counted.astype(top.conf.dtype)
  f = jnp.clip(top.conf, 0.0, 1.0)
  resid = jnp.where(top.counted, f - top.credit, 0.0)
  return f, jnp.stack([resid * w, w])


def _smooth_parts(logits, labels, where, bandwidth):
  """(smECE, bandwidth, smoothing input, top-label rows)."""
  top = _top_label_rows(logits, labels, where)
  s = _smooth_input(*_smooth_rows(top))
  value, sigma = _smooth_value(s, bandwidth)
  return value, sigma, s, top


@public(("bandwidth",), validators={"bandwidth": _check_bandwidth})
@doc_parts(nan_result=_NAN_RESULT, example_rows=_EXAMPLE_ROWS)
def smooth_ece(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  bandwidth: float | None = None,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Smooth ECE: the calibration error of a kernel-smoothed reliability curve, without bins.

  With confidences :math:`f_i`, correctness :math:`y_i` and residuals
  :math:`r_i = f_i - y_i`, smooth them with a Gaussian kernel of width
  :math:`\sigma` reflected at 0 and 1:

  .. math::
    \hat r(t) = \frac{\sum_i r_i K_\sigma(t, f_i)}{\sum_i K_\sigma(t, f_i)},\qquad
    \mathrm{smECE}_\sigma = \frac{\int |\hat r(t)|\, \hat\delta(t)\, dt}{\int \hat\delta(t)\, dt},

  with :math:`\hat\delta(t) = \sum_i K_\sigma(t, f_i)` the kernel density
  and :math:`K_\sigma(t, f) = \sum_{f' \in \{f, -f, 2 - f\}} \phi_\sigma(t - f')`.
  The bandwidth is the fixed point :math:`\sigma = \mathrm{smECE}_\sigma`,
  which makes the measure consistent and free of tuning. Everything follows
  relplot's ``smECE`` (1.0.3) step by step, so the two agree to about
  :math:`10^{-5}`: the points are split linearly onto a grid of
  ``max(2000, round(20/σ)) // 2 + 1`` points, convolved with the kernel
  sampled on the grid over :math:`[-\frac12, \frac12]`, the integrals are
  sums over ``max(round(10/σ), 200)`` evaluation points (with 1e-4 added to
  the density at each), and the fixed point is found by relplot's search:
  :math:`\sigma = 1` when :math:`\mathrm{smECE}_1 > 1`, else 10 bisection
  steps on :math:`[0, 1]` that keep the smallest :math:`\sigma \ge
  \mathrm{smECE}_\sigma` seen (so :math:`\sigma` is a multiple of 1/1024,
  at least 1/512). All of it runs under `jit` and `vmap` (see `bootstrap`).

  Confidence and correctness as in `adaptive_calibration_error` (a tie for
  the top among ``t`` classes counts ``1/t``; relplot's
  ``multiclass_logits_to_confidences`` takes ``argmax``).

  Args:
    logits: ``[..., num_classes]`` (floating).
    labels: integer labels ``[...]`` or probabilities ``[..., num_classes]``.
    bandwidth: keyword-only: None (the fixed point above), or a fixed
      :math:`\sigma \ge 1/512` (relplot's ``smECE_sigma``).
    where: keyword-only row mask ``[...]``, bool or integer 0/1.

  Returns:
    {nan_result}

  Examples:
    {example_rows}
    >>> print(f"{calibration.smooth_ece(z, y):.3f}")
    0.205

  References:
    Błasiok and Nakkiran, Smooth ECE: Principled Reliability Diagrams via
    Kernel Smoothing, ICLR 2024 (arXiv:2309.12236, 2023); relplot (Apple).
  """
  value, _, _, top = _smooth_parts(logits, labels, where, bandwidth)
  return _finish(value, top)


# ---------------------------------------------------------------------------
# Bootstrap intervals.


def _check_metric(metric):
  if not callable(metric):
    raise TypeError(
      f"`metric` must be a callable metric(logits, labels, where=...), got {metric!r}."
    )
  try:
    hash(metric)
  except TypeError:
    raise TypeError("`metric` is a compile-time option and must be hashable.") from None
  return metric


def _check_level(level):
  v = V.real_option("level", level)
  if not 0 < v < 1:
    raise ValueError(f"`level` must lie in (0, 1), got {level!r}.")
  return v


def _resample_rows(key, order, m):
  """Row indices drawn with replacement from the counted rows, and which draws are real.

  ``order`` lists the counted rows first (``m`` of them); ``m`` counted rows
  give ``m`` draws (the first ``m`` of the ``n_rows`` returned; the rest are
  masked), so a resample has the size of the data.
  """
  n_rows = order.shape[0]
  pick = jax.random.randint(key, (n_rows,), 0, jnp.maximum(m, 1))
  return order[pick], jnp.arange(n_rows) < m


def _bc_interval(estimate, reps, level: float):
  """Efron's bias-corrected (BC) percentile interval, widened to contain the estimate."""
  n = reps.shape[0]
  below = jnp.mean((reps < estimate).astype(reps.dtype))
  tied = jnp.mean((reps == estimate).astype(reps.dtype))
  p = jnp.clip(below + 0.5 * tied, 0.5 / n, 1 - 0.5 / n)
  z0 = jax.scipy.special.ndtri(p)
  za = statistics.NormalDist().inv_cdf((1 - level) / 2)
  qs = jax.scipy.special.ndtr(jnp.stack([2 * z0 + za, 2 * z0 - za]))
  low, high = jnp.quantile(reps, qs)
  ok = jnp.isfinite(estimate) & jnp.all(~jnp.isnan(reps))
  low = jnp.where(ok, jnp.minimum(low, estimate), jnp.nan)
  high = jnp.where(ok, jnp.maximum(high, estimate), jnp.nan)
  return low, high


# A bootstrap of the library's metrics by row weights: a resample is the number of times
# each row was drawn, and the metric a weighted reduction of per-row statistics computed
# once (never the resample's gathered logits).


class _SortedRows(NamedTuple):
  """Per-row statistics sorted by confidence (stable), the uncounted rows last."""

  conf: jax.Array  # [n] ascending; 1 on the uncounted rows (which weigh 0)
  credit: jax.Array  # [n] fractional top-1 credit; 0 on the uncounted rows
  value: jax.Array  # [n] the metric's per-row value (NLL, Brier), 0 if none or uncounted
  perm: jax.Array  # [n] int32: the flat row at each sorted position


def _sorted_rows(top: _TopLabel, value) -> _SortedRows:
  perm = _confidence_order(top.conf, top.counted)
  keep = top.counted[perm]
  return _SortedRows(
    jnp.where(keep, top.conf[perm], 1.0),
    jnp.where(keep, top.credit[perm], 0.0),
    jnp.where(keep, value[perm], 0.0),
    perm,
  )


class _Prefix(NamedTuple):
  """Running sums over the sorted rows of a resample, ``[n + 1]`` each, starting at 0."""

  draws: jax.Array  # int32
  conf: jax.Array  # draws times confidence
  credit: jax.Array  # draws times credit


def _prefix(w, s: _SortedRows) -> _Prefix:
  def run(v):
    return jnp.concatenate([jnp.zeros((1,), v.dtype), jnp.cumsum(v)])

  wf = w.astype(s.conf.dtype)
  return _Prefix(run(w), run(wf * s.conf), run(wf * s.credit))


def _range_sums(p: _Prefix, starts):
  """Per-bin (count, confidence sum, credit sum) of the bins of sorted rows ``[starts[b], starts[b + 1])``.

  Differences of running sums: in float32 each carries a rounding error of
  about one ulp of the total, ``1e-7`` of it, which no bootstrap interval
  resolves.
  """
  return (
    jnp.diff(p.draws[starts]).astype(p.conf.dtype),
    jnp.diff(p.conf[starts]),
    jnp.diff(p.credit[starts]),
  )


def _rank_bin_sums(p: _Prefix, m, s: _SortedRows, num_bins: int):
  """Confidence and credit sums over equal-mass bins: the draw of rank ``r`` in ``floor(r B / m)``.

  A row drawn ``w`` times holds the ranks ``[W - w, W)`` of the resample
  (``W`` the running count), so the sum of a value over the ranks below
  ``L`` is the running sum before the row holding rank ``L`` plus that
  row's value times its draws below ``L``; bin ``b`` is
  ``[ceil(b m / B), ceil((b + 1) m / B))``.
  """
  bound = (jnp.arange(num_bins + 1, dtype=jnp.int32) * m + num_bins - 1) // num_bins
  row = jnp.searchsorted(p.draws[1:], bound, side="right")  # the row holding rank L (n: none)
  below = (bound - p.draws[row]).astype(p.conf.dtype)

  def upto(run, v):
    return jnp.diff(run[row] + below * jnp.pad(v, (0, 1))[row])

  return upto(p.conf, s.conf), upto(p.credit, s.credit)


def _ace_weighted(w, m, s: _SortedRows, num_bins: int):
  """`adaptive_calibration_error` of the rows drawn ``w`` times: edges from weighted ranks."""
  n = w.shape[0]
  p = _prefix(w, s)

  def order_statistics(ranks):
    return s.conf[jnp.clip(jnp.searchsorted(p.draws[1:], ranks, side="right"), 0, n - 1)]

  edges = _quantile_edges(order_statistics, m, num_bins, s.conf.dtype)
  inner = jnp.searchsorted(s.conf, edges[1:-1], side="left")  # first row of bins 1 .. B - 1
  starts = jnp.concatenate([jnp.zeros((1,), inner.dtype), inner, jnp.full((1,), n, inner.dtype)])
  gap, full = _gaps_from_sums(*_range_sums(p, starts))
  return jnp.sum(gap) / jnp.maximum(jnp.sum(full), 1)


def _weighted_value(name: str, opts: dict, s: _SortedRows, fixed, w, m):
  """The metric ``name`` (options ``opts``) of the rows drawn ``w`` (``[n]``, sorted) times.

  ``fixed``: the uniform bins' first rows (ECE, MCE), or the confidences'
  cells on the smoothing grid (smooth ECE), which no resample changes.
  """
  dt = s.conf.dtype
  if name in ("nll", "brier"):
    return mean_or_nan(jnp.sum(jnp.where(w > 0, w.astype(dt) * s.value, 0.0)), m)
  if name == "smooth":
    f = jnp.clip(s.conf, 0.0, 1.0)
    values = jnp.stack([(f - s.credit) * w.astype(dt), w.astype(dt)])
    return _smooth_value(_smooth_input(f, values, fixed), opts["bandwidth"])[0]
  if name == "ace":
    return _ace_weighted(w, m, s, opts["num_bins"])
  p = _prefix(w, s)
  if name == "ece" and opts["binning"] == "quantile":
    conf_sum, credit_sum = _rank_bin_sums(p, m, s, opts["num_bins"])
    return mean_or_nan(jnp.sum(jnp.abs(credit_sum - conf_sum)), m)
  count, conf_sum, credit_sum = _range_sums(p, fixed)
  if name == "ece":
    return _ece_from_sums(count, conf_sum, credit_sum)
  return jnp.max(_gaps_from_sums(count, conf_sum, credit_sum)[0])  # "mce"


def _weighted_metric(metric) -> tuple[str, dict] | None:
  """``(name, options)`` when ``metric`` is one the weighted bootstrap knows, else None.

  Known: `expected_calibration_error` (not classwise), `adaptive_calibration_error`,
  `maximum_calibration_error`, `smooth_ece`, `brier_score` and
  `xentjax.metrics.cross_entropy_rate`, or a `functools.partial` of one of them
  with keyword options only (not ``where``).
  """
  func, kw = metric, {}
  if isinstance(metric, functools.partial):
    if metric.args:
      return None
    func, kw = metric.func, dict(metric.keywords)
  known: dict[Callable, tuple[str, dict, dict]] = {
    expected_calibration_error: ("ece", _BIN_OPTIONS, {"classwise": False}),
    adaptive_calibration_error: ("ace", {"num_bins": _check_num_bins}, {}),
    maximum_calibration_error: ("mce", {"num_bins": _check_num_bins}, {}),
    smooth_ece: ("smooth", {"bandwidth": _check_bandwidth}, {}),
    brier_score: ("brier", {}, {}),
    metrics.cross_entropy_rate: ("nll", {"base": V.log_base_scale}, {}),
  }
  if func not in known:
    return None
  name, checks, required = known[func]
  defaults = {
    k: p.default
    for k, p in inspect.signature(func).parameters.items()
    if p.kind is p.KEYWORD_ONLY and k != "where"
  }
  if not set(kw) <= set(defaults) or any(kw.get(k, v) != v for k, v in required.items()):
    return None
  opts = {**defaults, **kw}
  return name, {k: checks[k](v) if k in checks else v for k, v in opts.items()}


def _per_row_value(name: str, opts: dict, rows: _FlatRows, soft: bool):
  """The per-row statistic a weighted mean averages: NLL (in ``base``) or Brier; else 0."""
  if name == "brier":
    return _brier_rows(rows, soft)
  if name != "nll":
    return jnp.zeros(rows.z.shape[:1], rows.z.dtype)
  lse = jax.nn.logsumexp(rows.z, axis=-1, keepdims=True)
  nll = jnp.sum(jnp.where(rows.y == 0, 0.0, rows.y * (lse - rows.z)), axis=-1)
  return nll if opts["base"] is None else nll * jnp.asarray(opts["base"], nll.dtype)


def _weighted_replicates(name: str, opts: dict, z, y, counted, order, m, keys):
  """The metric on each resample (drawn as `_resample_rows` draws), from row weights."""
  n_rows = z.shape[0]
  rows = _flat_rows(z, y, counted)
  conf, credit = _top_label(rows)
  top = _TopLabel(jnp.where(rows.counted, conf, 0.0), credit, rows.counted, jnp.zeros((), bool))
  s = _sorted_rows(top, _per_row_value(name, opts, rows, y.ndim == z.ndim))
  fixed = None
  if name == "smooth":
    fixed = _split_cells(jnp.clip(s.conf, 0.0, 1.0), _SMOOTH_WIDE)
  elif name in ("ece", "mce"):
    b = _bin_index(s.conf, jnp.ones((n_rows,), bool), opts["num_bins"], "uniform")
    fixed = jnp.searchsorted(b, jnp.arange(opts["num_bins"] + 1), side="left")
  inverse = jnp.zeros((n_rows,), jnp.int32).at[s.perm].set(jnp.arange(n_rows, dtype=jnp.int32))
  dest = inverse[order]  # the sorted position of each counted-first row

  def one(key):
    idx, real = _resample_rows(key, dest, m)
    w = jax.ops.segment_sum(real.astype(jnp.int32), idx, n_rows)
    return _weighted_value(name, opts, s, fixed, w, m)

  # smooth ECE: one resample at a time, so that its grid-size branch stays a branch.
  chunk = None if name == "smooth" else max(1, min(keys.shape[0], (1 << 21) // max(1, n_rows)))
  return lax.map(one, keys, batch_size=chunk)


@public(("metric", "n", "level"), validators={"metric": _check_metric, "level": _check_level})
def bootstrap(
  metric: Callable,
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  n: int = 1000,
  key: jax.typing.ArrayLike,
  where: jax.typing.ArrayLike | None = None,
  level: float = 0.95,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""A metric on all rows and its bias-corrected bootstrap interval.

  The rows (the counted ones, when ``where`` is given) are resampled with
  replacement ``n`` times; ``metric`` is evaluated on each resample, all of
  them in one compiled program, vectorized over resamples (`jax.lax.map` in
  chunks; the smooth ECE one resample at a time, so that its bandwidth
  search keeps its branch). The library's metrics (`expected_calibration_error` but
  classwise, `adaptive_calibration_error`, `maximum_calibration_error`,
  `smooth_ece`, `brier_score`, `xentjax.metrics.cross_entropy_rate`, or a
  `functools.partial` of one of them with keyword options) are evaluated
  from row weights: a resample is the number of times each row was drawn,
  and the metric a weighted reduction of the per-row confidence, credit
  and loss, computed once with the rows sorted by confidence once (bins of
  equal mass and quantile edges come from running sums of the weights), so
  no resample gathers or re-evaluates logits. The draws are those of the
  gathering bootstrap, so each replicate is the metric of the gathered
  resample up to float rounding (about 1e-7 of the total in float32),
  except that in bins of equal mass rows of exactly equal confidence keep
  their order in the data rather than in the draw. Any other callable is
  evaluated on the gathered rows of each resample (in chunks that keep
  them near 256 MiB). With :math:`p` the
  fraction of replicates below the estimate :math:`\hat\theta` (ties count
  half), the interval is Efron's bias-corrected (BC) percentile interval:

  .. math::
    z_0 = \Phi^{-1}(p),\qquad
    [\theta^*_{(\alpha_1)}, \theta^*_{(\alpha_2)}],\quad
    \alpha_{1,2} = \Phi\big(2 z_0 \mp z_{1 - (1 - \mathrm{level})/2}\big),

  with :math:`\theta^*_{(\alpha)}` the :math:`\alpha` quantile of the
  replicates (linear) and :math:`p` clipped to :math:`[\frac{1}{2n}, 1 -
  \frac{1}{2n}]`. It corrects the percentile interval for the bootstrap's
  median bias, which for a binned calibration error is upward (noise adds
  error). The BC interval contains :math:`\hat\theta` exactly when
  :math:`|z_0| \le z_{1-(1-\mathrm{level})/2}`; when the estimate lies
  further out (a many-bin ECE of a calibrated model, whose replicates all
  lie above it) the nearer end is moved to the estimate, so
  ``low <= estimate <= high`` always holds.

  Args:
    metric: a hashable callable ``metric(logits, labels)`` (and ``where=``
      when ``where`` is given) returning a scalar, e.g.
      ``calibration.expected_calibration_error`` or
      ``functools.partial(calibration.adaptive_calibration_error, num_bins=10)``
      (a compile-time option: keep one object to reuse the compiled program).
    logits: ``[..., num_classes]``; rows are resampled over all leading axes.
    labels: integer labels ``[...]`` or probabilities ``[..., num_classes]``.
    n: keyword-only number of resamples.
    key: keyword-only `jax.random` key; the same key gives the same result.
    where: keyword-only row mask ``[...]``: only counted rows are drawn.
    level: keyword-only coverage of the interval.

  Returns:
    ``(estimate, low, high)``, scalars; all NaN when the estimate or a
    replicate is NaN.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from xentjax import calibration
    >>> z = jax.random.normal(jax.random.key(0), (500, 4)) * 3
    >>> y = jax.random.randint(jax.random.key(1), (500,), 0, 4)
    >>> est, low, high = calibration.bootstrap(
    ...   calibration.expected_calibration_error, z, y, n=200, key=jax.random.key(2))
    >>> bool(low <= est <= high)
    True

  References:
    Efron, Nonparametric Standard Errors and Confidence Intervals, Canadian
    Journal of Statistics, 1981; Efron and Tibshirani, An Introduction to
    the Bootstrap, 1993 (chapter 14).
  """
  z = jnp.asarray(logits)
  k = z.shape[-1]
  labels = jnp.asarray(labels)
  soft = labels.ndim == z.ndim and jnp.issubdtype(labels.dtype, jnp.floating)
  z = z.reshape(-1, k)
  y = labels.reshape((-1, k) if soft else (-1,))
  n_rows = z.shape[0]
  counted = jnp.ones((n_rows,), bool) if where is None else where_mask(where).reshape(-1)
  kw = {} if where is None else {"where": counted}
  estimate = metric(z, y, **kw)

  order = jnp.argsort(~counted, stable=True)  # counted rows first (once, not per resample)
  m = jnp.sum(counted).astype(jnp.int32)
  keys = jax.random.split(key, n)
  weighted = _weighted_metric(metric)
  if weighted is not None:
    reps = _weighted_replicates(*weighted, z, y, counted, order, m, keys)
  else:

    def one(key):
      idx, real = _resample_rows(key, order, m)
      return metric(z[idx], y[idx], **({} if where is None else {"where": real}))

    chunk = max(1, min(n, (1 << 26) // max(1, n_rows * k)))
    reps = lax.map(one, keys, batch_size=chunk)
  low, high = _bc_interval(estimate, reps, level)
  nan = ~jnp.isfinite(low)
  return jnp.where(nan, jnp.nan, estimate), low, high


# ---------------------------------------------------------------------------
# Calibration maps: temperature, vector, matrix and Dirichlet scaling.

#: The maps `fit` knows: one temperature, a scale and bias per class, an affine map of
#: the logits, an affine map of the log-probabilities (Dirichlet calibration).
METHODS = ("temperature", "vector", "matrix", "dirichlet")


def _log_probabilities(z):
  """Dirichlet calibration's features: log-softmax, floored at log(tiny) as dirichletcal clips."""
  return jnp.maximum(jax.nn.log_softmax(z, axis=-1), float(np.log(jnp.finfo(z.dtype).tiny)))


@dataclasses.dataclass(frozen=True)
class Calibrator:
  r"""A fitted calibration map: a pytree of arrays, callable on logits.

  ``calibrator(logits)`` returns calibrated logits ``[..., num_classes]``
  (softmax them for probabilities; every function of this module takes
  them as ``logits``):

  * ``"temperature"``: :math:`z / T` (``weight`` is the scalar :math:`T`);
  * ``"vector"``: :math:`a \odot z + b` (``weight`` :math:`a`, ``[K]``);
  * ``"matrix"``: :math:`W z + b` (``weight`` :math:`W`, ``[K, K]``);
  * ``"dirichlet"``: :math:`W \log \mathrm{softmax}(z) + b`, the log-probabilities
    floored at the dtype's ``log(tiny)`` (dirichletcal's clip).

  ``bias`` is :math:`b` (``[K]``; a scalar 0 for "temperature"). The maps
  of the last three are reported in the reference-row form (dirichletcal's
  ``ref_row=True``): the last row of :math:`[W \mid b]` (and the last
  :math:`b` of "vector") is 0, which changes no probability. ``method`` is
  static (pytree metadata), so a `Calibrator` passes through `jit`.
  """

  method: str
  weight: jax.Array
  bias: jax.Array

  def __call__(self, logits: jax.typing.ArrayLike) -> jax.Array:
    V.check_floating("logits", logits)
    z = jnp.asarray(logits)
    z = z.astype(jnp.result_type(V.compute_dtype(z.dtype), self.weight.dtype))
    if self.method == "temperature":
      return z / self.weight
    bias = _along_last(self.bias, z.ndim)
    if self.method == "vector":
      return z * _along_last(self.weight, z.ndim) + bias
    x = _log_probabilities(z) if self.method == "dirichlet" else z
    return jnp.einsum("...k,jk->...j", x, self.weight) + bias


def _along_last(v, ndim: int):
  """A ``[K]`` vector shaped to broadcast along the last axis of an ``ndim`` array."""
  return jnp.reshape(v, (1,) * (ndim - 1) + v.shape)


jax.tree_util.register_dataclass(Calibrator, data_fields=["weight", "bias"], meta_fields=["method"])


def _features(rows: _FlatRows, method: str):
  """The map's input per row (0 on uncounted rows, so a NaN there is never read)."""
  x = _log_probabilities(rows.z) if method == "dirichlet" else rows.z
  return jnp.where(rows.counted[:, None], x, 0.0)


def _map_logits(theta, x, method: str):
  """Calibrated logits ``[n, K]`` from the free parameters (the last class's row is 0)."""
  if method == "vector":
    a, b = theta
    return x * a[None, :] + jnp.pad(b, (0, 1))[None, :]
  u = x @ theta[:, :-1].T + theta[None, :, -1]  # [n, K - 1]
  return jnp.pad(u, ((0, 0), (0, 1)))


def _odir_penalty(theta, odir):
  """dirichletcal's ODIR term: lambda * sum of squared off-diagonal W' + mu * sum of squared b'."""
  if odir is None:
    return 0.0
  lam, mu = odir
  w, b = theta[:, :-1], theta[:, -1]
  off = jnp.where(jnp.eye(w.shape[0], w.shape[1], dtype=bool), 0.0, w)
  return lam * jnp.sum(jnp.square(off)) + mu * jnp.sum(jnp.square(b))


def _summed_nll(theta, x, rows: _FlatRows, method: str):
  """Summed cross-entropy of the mapped logits over the counted rows."""
  u = _map_logits(theta, x, method)
  lse = jax.nn.logsumexp(u, axis=-1, keepdims=True)
  per_row = jnp.sum(jnp.where(rows.y == 0, 0.0, rows.y * (lse - u)), axis=-1)
  return jnp.sum(jnp.where(rows.counted, per_row, 0.0))


def _map_objective(theta, x, rows: _FlatRows, method: str, odir):
  """Mean cross-entropy of the mapped logits over the counted rows, plus the ODIR term."""
  total = _summed_nll(theta, x, rows, method)
  n = jnp.maximum(jnp.sum(rows.counted), 1).astype(total.dtype)
  return total / n + _odir_penalty(theta, odir)


def _identity_params(k: int, method: str, dtype):
  """The map that changes nothing (dirichletcal's "identity" start)."""
  if method == "vector":
    return jnp.ones((k,), dtype), jnp.zeros((k - 1,), dtype)
  eye = jnp.eye(k - 1, k, dtype=dtype) - jnp.eye(k, dtype=dtype)[None, -1]  # rows e_i - e_K
  return jnp.concatenate([eye, jnp.zeros((k - 1, 1), dtype)], axis=1)


_STALL = 10  # L-BFGS stops when the objective fell by at most `ftol` over this many steps


def _lbfgs(fun, x0, max_iter: int, tol: float):
  """Minimize ``fun`` by optax's L-BFGS (zoom line search).

  Stops when the gradient's norm is at most ``tol``, or when the objective
  fell by at most its dtype's resolution (``4 eps (1 + |f|)``) over the last
  10 steps (in float32 the rounding of a mean over many rows leaves a
  gradient that ``tol`` may not reach), or after ``max_iter`` steps.
  """
  opt = optax.lbfgs(memory_size=30)
  value_and_grad = optax.value_and_grad_from_state(fun)
  dtype = jax.tree_util.tree_leaves(x0)[0].dtype
  ftol = 4 * float(jnp.finfo(dtype).eps)

  def step(carry):
    x, state, hist = carry
    value, grad = value_and_grad(x, state=state)
    updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=fun)
    hist = jnp.roll(hist, 1).at[0].set(value)
    return optax.apply_updates(x, updates), state, hist

  def going(carry):
    _, state, hist = carry
    count = optax.tree_utils.tree_get(state, "count")
    norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
    stalled = hist[-1] - hist[0] <= ftol * (1 + jnp.abs(hist[0]))
    return (count == 0) | ((count < max_iter) & (norm > tol) & jnp.isfinite(norm) & ~stalled)

  hist = jnp.full((_STALL,), jnp.inf, dtype)
  x, state, _ = lax.while_loop(going, step, (x0, opt.init(x0), hist))
  return x, optax.tree_utils.tree_get(state, "count")


def _full_map(theta, method: str, k: int) -> tuple[jax.Array, jax.Array]:
  """(weight, bias) of the `Calibrator` in the reference-row form."""
  if method == "vector":
    a, b = theta
    return a, jnp.pad(b, (0, 1))
  padded = jnp.pad(theta, ((0, 1), (0, 0)))
  return padded[:, :k], padded[:, k]


@functools.partial(jax.jit, static_argnames=("method", "odir", "max_iter", "tol"))
def _fit_map(logits, labels, where, method, odir, max_iter, tol):
  rows = _flat_rows(logits, labels, where)
  k = rows.z.shape[-1]
  x = _features(rows, method)
  theta0 = _identity_params(k, method, rows.z.dtype)
  if method == "vector":

    def fun(theta):
      return _map_objective(theta, x, rows, method, odir)

    theta, iters = _lbfgs(fun, theta0, max_iter, tol)
  else:  # the same objective in standardized features: far better conditioned for L-BFGS
    shift, scale = _feature_moments(x, rows.counted)
    xs = jnp.where(rows.counted[:, None], (x - shift[None, :]) / scale[None, :], 0.0)

    def fun(theta_s):
      theta = _unstandardize(theta_s, shift, scale)
      return _map_objective(theta_s, xs, rows, method, None) + _odir_penalty(theta, odir)

    theta_s, iters = _lbfgs(fun, _standardize(theta0, shift, scale), max_iter, tol)
    theta = _unstandardize(theta_s, shift, scale)
  ok = jnp.isfinite(_map_objective(theta0, x, rows, method, odir))
  ok = ok & (jnp.sum(rows.counted) > 0) & ~jnp.any(rows.bad)
  weight, bias = _full_map(theta, method, k)
  nan_unless_ok = jnp.where(ok, 1.0, jnp.nan).astype(weight.dtype)
  return weight * nan_unless_ok, bias * nan_unless_ok, iters


def _feature_moments(x, counted):
  """Mean and standard deviation (1 where it is 0) of each feature over the counted rows."""
  w = counted.astype(x.dtype)[:, None]
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(w * x, axis=0) / n
  std = jnp.sqrt(jnp.sum(w * jnp.square(x - mean[None, :]), axis=0) / n)
  return mean, jnp.where(std > 0, std, 1.0)


def _standardize(theta, shift, scale):
  """``[W | b]`` on features ``x`` -> the same map on ``(x - shift) / scale``."""
  w, b = theta[:, :-1], theta[:, -1]
  return jnp.concatenate([w * scale[None, :], (b + w @ shift)[:, None]], axis=1)


def _unstandardize(theta_s, shift, scale):
  """The inverse of `_standardize`."""
  w = theta_s[:, :-1] / scale[None, :]
  return jnp.concatenate([w, (theta_s[:, -1] - w @ shift)[:, None]], axis=1)


def _check_method(method) -> str:
  if method not in METHODS:
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
  return method


def _check_odir(odir, method: str):
  if odir is None:
    return None
  if method not in ("matrix", "dirichlet"):
    raise ValueError(f"`odir` applies to the 'matrix' and 'dirichlet' maps, not to {method!r}.")
  try:
    lam, mu = (float(v) for v in odir)
  except (TypeError, ValueError):
    raise TypeError(f"`odir` must be None or a pair (lambda, mu), got {odir!r}.") from None
  if not (0 <= lam < np.inf and 0 <= mu < np.inf):
    raise ValueError(f"`odir` = (lambda, mu) must be finite and >= 0, got {odir!r}.")
  return lam, mu


def fit(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  method: str = "temperature",
  odir: tuple[float, float] | None = None,
  *,
  where: jax.typing.ArrayLike | None = None,
  max_iter: int | None = None,
  tol: float | None = None,
) -> Calibrator:
  r"""Fit a calibration map on held-out logits: temperature, vector, matrix or Dirichlet scaling.

  Each map is fitted by exact minimization of the mean cross-entropy of its
  output on the counted rows (plus, with ``odir``, dirichletcal's ODIR
  term), in one compiled program:

  .. math::
    \begin{aligned}
    \min_{W, b}\ & \frac1N \sum_i \Big[\log \sum_k e^{u_{ik}} - u_{i y_i}\Big]
      + \lambda \sum_{i \ne j} W'^2_{ij} + \mu \sum_i b'^2_i,\\
    & u_i = W x_i + b,
    \end{aligned}

  with :math:`x_i` the logits (``"vector"``: :math:`W` diagonal;
  ``"matrix"``) or the log-probabilities (``"dirichlet"``), and
  :math:`[W' \mid b']` the matrix :math:`[W \mid b]` with its last row
  subtracted from every row (softmax is unchanged by that, so the fit
  keeps the last row at 0). The maps are dirichletcal's
  (``VectorScaling(logit_input=True)``, ``MatrixScaling(logit_input=True)``,
  ``FullDirichletCalibrator``), and ``odir=(λ, μ)`` is its
  ``reg_lambda=λ, reg_mu=μ``: that form omits the paper's normalization
  :math:`1/(K(K-1))` of :math:`\lambda` and :math:`1/K` of :math:`\mu`
  (pass ``λ / (K (K - 1))`` and ``μ / K`` for the paper's). The objective
  is convex; it is minimized from the identity map by optax's L-BFGS with
  a zoom line search (in the features standardized over the rows, for
  "matrix" and "dirichlet": the same objective, better conditioned) until
  the gradient's norm is at most ``tol`` or the objective stops falling
  (by more than 4 ulp over 10 steps). ``"temperature"`` is
  `fit_temperature` itself (the same numbers).

  Logits that sum to zero in every row (centred logits) make matrix
  scaling's :math:`W` ill-posed: adding :math:`c_i` to every entry of row
  :math:`i` changes no prediction on such data. The fit still reaches the
  optimum's loss and probabilities on them, but which minimizer it returns
  is the solver's (the gradient is orthogonal to those directions, so
  L-BFGS keeps the identity start's component along them: for each row,
  :math:`\sum_j s_j^2 \Delta W_{ij} = 0`, with :math:`s_j` the standard
  deviation of logit :math:`j`), and it predicts differently on logits that
  do not sum to zero. ``odir`` with :math:`\lambda > 0` makes the minimizer
  unique. The Dirichlet map has no such direction.

  Args:
    logits: ``[..., num_classes]`` held-out logits (floating; 16-bit in float32).
    labels: integer labels ``[...]`` or target probabilities ``[..., num_classes]``.
    method: "temperature", "vector", "matrix" or "dirichlet".
    odir: None, or ``(λ, μ)`` (``"matrix"`` and ``"dirichlet"`` only).
    where: keyword-only row mask ``[...]``: rows to fit on.
    max_iter: keyword-only iteration limit (default 60 Newton steps for
      "temperature", 500 L-BFGS steps otherwise).
    tol: keyword-only stopping tolerance (default `fit_temperature`'s, and
      1e-6 on the gradient's norm for the L-BFGS fits in float64, 1e-5 in
      float32, where rounding of the mean makes smaller norms unreachable).

  Returns:
    A `Calibrator`. Its arrays are NaN when no row counts, a counted label
    is out of range, or the loss at the identity is not finite (a NaN
    logit, or a ``-inf`` logit in "vector"/"matrix"), as `fit_temperature`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from xentjax import calibration
    >>> y = jax.random.randint(jax.random.key(0), (2000,), 0, 3)
    >>> z = 4.0 * (jax.nn.one_hot(y, 3) + jax.random.normal(jax.random.key(1), (2000, 3)))
    >>> cal = calibration.fit(z, y, "dirichlet", odir=(1e-3, 1e-3))
    >>> before = calibration.expected_calibration_error(z, y)
    >>> bool(calibration.expected_calibration_error(cal(z), y) < before)
    True

  References:
    Guo, Pleiss, Sun and Weinberger, On Calibration of Modern Neural
    Networks, ICML 2017. Kull, Perello-Nieto, Kängsepp, Silva Filho, Song
    and Flach, Beyond temperature scaling: Obtaining well-calibrated
    multiclass probabilities with Dirichlet calibration, NeurIPS 2019.
  """
  method = _check_method(method)
  odir = _check_odir(odir, method)
  if method == "temperature":
    kw: dict[str, Any] = {} if max_iter is None else {"max_iter": max_iter}
    kw.update({} if tol is None else {"tol": tol})
    t = fit_temperature(logits, labels, where=where, **kw)
    return Calibrator("temperature", t, jnp.zeros((), t.dtype))
  max_iter = _check_max_iter(500 if max_iter is None else max_iter)
  if tol is None:
    tol = 1e-6 if jax.config.read("jax_enable_x64") and _is_64(logits) else 1e-5
  args = (_arr(logits), _arr(labels), _arr(where))
  weight, bias, _ = _fit_map(*args, method, odir, max_iter, _check_tol(tol))
  return Calibrator(method, weight, bias)


def _is_64(x) -> bool:
  return np.dtype(getattr(x, "dtype", np.asarray(x).dtype)) == np.float64


# ---------------------------------------------------------------------------
# Streaming fits of the maps: the objective and its gradient are sums over rows.

_HOST_MEMORY = 30  # L-BFGS pairs kept, as `_lbfgs` keeps them
_ARMIJO = 1e-4  # sufficient decrease of a backtracking step
_MAX_HALVINGS = 30  # a step halved this often without decrease: the objective is at its floor


@functools.partial(jax.jit, static_argnames=("method",))
def _moment_sums(logits, labels, where, shift, method):
  """One batch's sums over the counted rows of ``x - shift`` and its square, the count, a bad label."""
  rows = _flat_rows(logits, labels, where)
  d = jnp.where(rows.counted[:, None], _features(rows, method) - shift[None, :], 0.0)
  return jnp.sum(d, axis=0), jnp.sum(d * d, axis=0), jnp.sum(rows.counted), jnp.any(rows.bad)


@functools.partial(jax.jit, static_argnames=("method",))
def _batch_nll(theta, logits, labels, where, shift, scale, method):
  """One batch's summed cross-entropy of the map and its gradient (features as `_fit_map`'s)."""
  rows = _flat_rows(logits, labels, where)
  x = _features(rows, method)
  if method != "vector":
    x = jnp.where(rows.counted[:, None], (x - shift[None, :]) / scale[None, :], 0.0)
  return jax.value_and_grad(_summed_nll)(theta, x, rows, method)


@functools.partial(jax.jit, static_argnames=("odir",))
def _penalty_and_grad(theta_s, shift, scale, odir):
  return jax.value_and_grad(lambda t: _odir_penalty(_unstandardize(t, shift, scale), odir))(theta_s)


def _moment_pass(get: Callable, method: str, shift):
  """`_moment_sums` over all batches (float64); ``shift`` None: zeros, of the data's dtype."""
  total: list | None = None
  for batch in get():
    z, y, w = _split_batch(batch)
    if shift is None:
      shift = jnp.zeros((np.shape(z)[-1],), _batch_dtype(z))
    part = [
      np.asarray(p, np.float64) for p in _moment_sums(_arr(z), _arr(y), _arr(w), shift, method)
    ]
    total = part if total is None else [a + b for a, b in zip(total, part, strict=True)]
  if total is None:
    raise ValueError("`batches` yielded no batch.")
  return total, shift


def _stream_moments(get: Callable, method: str):
  """Mean and standard deviation of the features (two passes, as `_feature_moments`), count, bad."""
  first, zeros = _moment_pass(get, method, None)
  n = max(float(first[2]), 1.0)
  shift = jnp.asarray(first[0] / n, zeros.dtype)
  if method == "vector":  # fitted on the raw logits: no second pass
    scale = jnp.ones_like(shift)
  else:
    second, _ = _moment_pass(get, method, shift)
    std = np.sqrt(second[1] / n)
    scale = jnp.asarray(np.where(std > 0, std, 1.0), shift.dtype)
  return shift, scale, int(first[2]), bool(first[3])


def _batch_dtype(z):
  """The dtype `fit` computes in for logits ``z`` (16-bit in float32; float64 only under x64)."""
  dtype = getattr(z, "dtype", None) or np.asarray(z).dtype
  return V.compute_dtype(jax.dtypes.canonicalize_dtype(dtype))


def _two_loop(g, pairs):
  """The L-BFGS direction ``-H g`` from the stored ``(s, y, 1 / y.s)`` pairs (newest last)."""
  q, alphas = g.copy(), []
  for s, y, rho in reversed(pairs):
    a = rho * (s @ q)
    q -= a * y
    alphas.append(a)
  if pairs:
    s, y, _ = pairs[-1]
    q *= (s @ y) / (y @ y)
  for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
    q += (a - rho * (y @ q)) * s
  return -q


def _host_lbfgs(value_and_grad: Callable, x0, max_iter: int, tol: float, ftol: float):
  """L-BFGS on the host with a backtracking line search: each evaluation is one pass.

  Stops when the gradient's norm is at most ``tol``, or after ``max_iter``
  steps, or when no step along the direction lowers the objective, or on a
  stall: the objective fell by at most ``ftol (1 + |f|)`` over the last 10
  steps (as in `_lbfgs`) while the gradient's norm did not halve (the
  gradient, summed in float64, stays informative where the rounding of the
  objective hides its decrease).
  """
  x = x0
  f, g = value_and_grad(x)
  pairs: list = []
  seen = [(f, float(np.linalg.norm(g)))]
  for _ in range(max_iter):
    if not np.linalg.norm(g) > tol:  # converged, or NaN
      break
    d = _two_loop(g, pairs)
    slope = g @ d
    if not slope < 0:
      d, slope = -g, -(g @ g)
    t = 1.0 if pairs else min(1.0, 1.0 / float(np.sum(np.abs(g))))
    for _ in range(_MAX_HALVINGS):
      f_new, g_new = value_and_grad(x + t * d)
      # Sufficient decrease, or (the objective being convex) a slope still downhill at the
      # new point, which proves a decrease that the rounding of ``f`` near the optimum hides.
      if f_new <= f + _ARMIJO * t * slope or g_new @ d <= 0:
        break
      t *= 0.5
    else:
      break
    s, y = t * d, g_new - g
    if s @ y > 0:
      pairs = [*pairs, (s, y, 1.0 / (s @ y))][-_HOST_MEMORY:]
    x, f, g = x + s, f_new, g_new
    seen.append((f, float(np.linalg.norm(g))))
    if len(seen) >= _STALL:
      (f_old, g_old), g_min = seen[-_STALL], min(v[1] for v in seen[-_STALL + 1 :])
      if f_old - f <= ftol * (1 + abs(f_old)) and g_min > 0.5 * g_old:
        break
  return x


def _stream_map(get: Callable, method: str, odir, max_iter: int, tol: float, moments):
  """The fitted map's (weight, bias) arrays, from passes over the batches."""
  shift, scale, n, _ = moments
  dtype, k = shift.dtype, shift.shape[0]
  theta0 = _identity_params(k, method, dtype)
  if method != "vector":
    theta0 = _standardize(theta0, shift, scale)
  flat0, unravel = ravel_pytree(theta0)

  def value_and_grad(v):
    theta = unravel(jnp.asarray(v, dtype))
    f, g = 0.0, np.zeros_like(v)
    for batch in get():
      z, y, w = _split_batch(batch)
      fb, gb = _batch_nll(theta, _arr(z), _arr(y), _arr(w), shift, scale, method)
      f, g = f + float(fb), g + np.asarray(ravel_pytree(gb)[0], np.float64)
    f, g = f / n, g / n
    if odir is not None:
      pb, pg = _penalty_and_grad(theta, shift, scale, odir)
      f, g = f + float(pb), g + np.asarray(pg, np.float64).ravel()
    return f, g

  ftol = 4 * float(jnp.finfo(dtype).eps)
  flat0_64 = np.asarray(flat0, np.float64)
  ok = np.isfinite(value_and_grad(flat0_64)[0])
  theta = unravel(jnp.asarray(_host_lbfgs(value_and_grad, flat0_64, max_iter, tol, ftol), dtype))
  if method != "vector":
    theta = _unstandardize(theta, shift, scale)
  weight, bias = _full_map(theta, method, k)
  return weight, bias, ok


def fit_streaming(
  batches: Iterable | Callable[[], Iterable],
  method: str = "temperature",
  odir: tuple[float, float] | None = None,
  *,
  max_iter: int | None = None,
  tol: float | None = None,
) -> Calibrator:
  r"""`fit` over batches larger than memory: one pass per evaluation of the objective.

  The objective of `fit` (the mean cross-entropy of the mapped logits, plus
  the ODIR term) and its gradient are sums over rows, so each evaluation
  accumulates them over all batches, in float64 on the host:

  .. math::
    \begin{aligned}
    F(\theta) &= \frac1N \sum_{b} \sum_{i \in b} \ell_i(\theta) + \Omega(\theta),\\
    \nabla F(\theta) &= \frac1N \sum_{b} \sum_{i \in b} \nabla \ell_i(\theta)
      + \nabla\Omega(\theta),
    \end{aligned}

  over the batches :math:`b`, with :math:`\Omega` the ODIR term.

  ``"temperature"`` is `fit_temperature_streaming` (Newton steps in
  :math:`\log T`, 4-8 passes). The other maps are fitted as `fit` fits them
  (the same objective, from the identity map, in the features standardized
  by their mean and standard deviation over all counted rows for "matrix"
  and "dirichlet": two passes first), by L-BFGS (30 pairs) with a
  backtracking (Armijo) line search run on the host, where each trial step
  is one pass; the stopping rules are `fit`'s (the gradient's norm at most
  ``tol``, or a stall of the objective over 10 steps). Expect about as many
  passes as `fit` takes L-BFGS steps (tens to a few hundred): the solver's
  iterates differ from `fit`'s, but both end at the same minimum, so the
  maps agree to the tolerance of the fit (the evaluation guide's calibration
  section gives the figures, from ``tests/information/test_calibration_streaming.py``).

  Args:
    batches: a re-iterable of ``(logits, labels)`` or ``(logits, labels,
      where)`` tuples (``logits`` ``[..., num_classes]``, the same number of
      classes in every batch), or a zero-argument callable returning a fresh
      iterator of them.
    method: "temperature", "vector", "matrix" or "dirichlet", as in `fit`.
    odir: None, or ``(λ, μ)`` (``"matrix"`` and ``"dirichlet"`` only), as in `fit`.
    max_iter: keyword-only iteration limit (`fit`'s defaults).
    tol: keyword-only stopping tolerance (`fit`'s defaults).

  Returns:
    A `Calibrator` (float32, or float64 for float64 logits under x64), NaN
    where `fit` gives NaN: no counted row, a counted label out of range, or
    a loss at the identity that is not finite.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from xentjax import calibration
    >>> y = jax.random.randint(jax.random.key(0), (2000,), 0, 3)
    >>> z = 4.0 * (jax.nn.one_hot(y, 3) + jax.random.normal(jax.random.key(1), (2000, 3)))
    >>> batches = [(z[i : i + 500], y[i : i + 500]) for i in range(0, 2000, 500)]
    >>> cal = calibration.fit_streaming(batches, "vector")
    >>> ref = calibration.fit(z, y, "vector")
    >>> bool(jnp.max(jnp.abs(jax.nn.softmax(cal(z)) - jax.nn.softmax(ref(z)))) < 1e-3)
    True
  """
  method = _check_method(method)
  odir = _check_odir(odir, method)
  get = _batches(batches)
  if method == "temperature":
    kw: dict[str, Any] = {} if max_iter is None else {"max_iter": max_iter}
    kw.update({} if tol is None else {"tol": tol})
    t = fit_temperature_streaming(get, **kw)
    first = _split_batch(next(iter(get())))[0]
    dtype = _batch_dtype(first)
    return Calibrator("temperature", jnp.asarray(t, dtype), jnp.zeros((), dtype))
  max_iter = _check_max_iter(500 if max_iter is None else max_iter)
  moments = _stream_moments(get, method)
  if tol is None:
    tol = 1e-6 if moments[0].dtype == jnp.float64 else 1e-5
  tol = _check_tol(tol)
  if moments[2] == 0 or moments[3]:  # no counted row, or a bad label: NaN, without fitting
    shift = moments[0]
    theta0 = _identity_params(shift.shape[0], method, shift.dtype)
    weight, bias, ok = (*_full_map(theta0, method, shift.shape[0]), False)
  else:
    weight, bias, ok = _stream_map(get, method, odir, max_iter, tol, moments)
  nan_unless_ok = jnp.asarray(1.0 if ok else np.nan, weight.dtype)
  return Calibrator(method, weight * nan_unless_ok, bias * nan_unless_ok)
