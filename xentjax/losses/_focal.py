"""Categorical (softmax) focal loss, from logits and from probabilities (Keras-compatible).

The focal loss of Lin et al. scales each class's cross-entropy term by
:math:`(1 - p_k)^\\gamma`, so well-classified examples count less. From
logits, everything is computed from the shifted row statistics in log space:
with ``m`` the row maximum (first index on ties), ``e_k = exp(z_k - m)`` and
``r = sum_{k != argmax} e_k``,

* ``log Z - m = log1p(r)`` (the maximum's own term is exactly 1),
* ``log(1 - p_k) = log r - log1p(r)`` for the maximum and ``log1p(-p_k)``
  for every other class (there ``p_k <= 1/2``, so ``log1p`` is accurate),

so a confident correct prediction gets an exact small weight instead of the
rounding error of ``1 - 0.9999999``. The closed-form gradient (a
`custom_jvp`, also `xentjax.grads.softmax_focal_loss`) is finite wherever the
loss is, including a ``-inf`` logit on a target class and ``gamma < 1``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from xentjax import _validation as V
from xentjax._api import Axis, class_axes, closed_form_jvp, from_last, public, public_like
from xentjax.losses._dense import (
  categorical_terms,
  clipped_log1m,
  prepare_logits,
  prepare_probs,
  smooth_last_axis,
)


def _class_weights(alpha, k: int, dtype):
  """`alpha` as None, a scalar or a ``[K]`` vector in `dtype`."""
  if alpha is None:
    return None
  a = jnp.asarray(alpha)
  if not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)):
    raise TypeError(f"`alpha` must be None, a number or a [num_classes] array, got {alpha!r}.")
  if a.ndim > 1 or (a.ndim == 1 and a.shape[0] != k):
    raise ValueError(
      f"`alpha` must be a scalar or have shape (num_classes,) = ({k},), got alpha.shape={a.shape}."
    )
  return a.astype(dtype)


def _weights(logits, labels, axis, where, alpha, label_smoothing):
  """``(z, a)`` laid out ``[..., K]``: logits and the per-class weights ``a = alpha * y~``."""
  eps = V.check_label_smoothing(label_smoothing)
  z, y, mask = prepare_logits(logits, labels, axis, where)
  a = smooth_last_axis(y, mask, eps)
  w = _class_weights(alpha, z.shape[-1], z.dtype)
  if w is not None:
    a = a * jnp.broadcast_to(w, a.shape)
  if mask is not None:
    z = jnp.where(mask, z, -jnp.inf)
  return z, a


class _Stats:
  """Row statistics of `softmax_focal_loss`: log p, log(1 - p), -log p (all ``[..., K]``)."""

  def __init__(self, z):
    m_raw = jnp.max(z, axis=-1, keepdims=True)
    m = lax.stop_gradient(jnp.where(jnp.isfinite(m_raw), m_raw, 0.0))
    shifted = z - m
    is_max = lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == jnp.argmax(
      shifted, axis=-1, keepdims=True
    )
    e = jnp.exp(shifted)
    rest = jnp.sum(jnp.where(is_max, 0.0, e), axis=-1, keepdims=True)
    log_s = jnp.log1p(rest)
    self.logp = shifted - log_s
    self.p = jnp.exp(self.logp)
    log_rest = jnp.log(jnp.where(rest > 0, rest, 1.0))
    log_u_max = jnp.where(rest > 0, log_rest - log_s, -jnp.inf)
    self.log_u = jnp.where(is_max, log_u_max, jnp.log1p(-jnp.where(is_max, 0.0, self.p)))
    # -log p, for the maximum as log1p(rest) (exact for tiny `rest`).
    self.neg_logp = jnp.where(is_max, log_s, -self.logp)
    # A row of -inf logits is no distribution: every log p is -inf (a target
    # class gives +inf), every 1 - p is 1.
    empty = m_raw == -jnp.inf
    self.logp = jnp.where(empty, -jnp.inf, self.logp)
    self.p = jnp.where(empty, 0.0, self.p)
    self.log_u = jnp.where(empty, 0.0, self.log_u)
    self.neg_logp = jnp.where(empty, jnp.inf, self.neg_logp)


def _pow_u(log_u, gamma):
  """(1 - p)^gamma = exp(gamma log(1 - p)), with 0^0 = 1 and a NaN-free gradient."""
  zero_u = log_u == -jnp.inf
  g_log_u = jnp.where(
    zero_u, jnp.where(gamma == 0, 0.0, -jnp.inf), gamma * jnp.where(zero_u, 0.0, log_u)
  )
  return jnp.exp(g_log_u)


def _focal_value(z, a, gamma):
  st = _Stats(z)
  w = _pow_u(st.log_u, gamma)
  # 0 * inf = 0: no weight (a = 0) or a zero focal factor on an impossible class.
  drop = (a == 0) | (w == 0)
  term = a * w * jnp.where(drop, 0.0, st.neg_logp)
  return jnp.sum(jnp.where(drop, 0.0, term), axis=-1)


def _focal_grad(z, a, gamma):
  """g_j = c_j - p_j sum_k c_k with c_k = -a_k [gamma u_k^(gamma-1) p_k (-log p_k) + u_k^gamma]."""
  st = _Stats(z)
  w = _pow_u(st.log_u, gamma)
  # t = u^(gamma-1) p (-log p) in log space; 0 where u = 0 (p = 1) or p = 0.
  ok = (st.log_u > -jnp.inf) & (st.logp > -jnp.inf) & (st.neg_logp > 0)
  log_t = (gamma - 1.0) * jnp.where(ok, st.log_u, 0.0) + jnp.where(ok, st.logp, 0.0)
  log_t = log_t + jnp.log(jnp.where(ok, st.neg_logp, 1.0))
  t = jnp.where(ok, jnp.exp(log_t), 0.0)
  c = -a * (jnp.where(gamma == 0, 0.0, gamma * t) + w)
  return c - st.p * jnp.sum(c, axis=-1, keepdims=True)


# The loss over the class axis, with the closed-form gradient as its logit derivative.
_focal = closed_form_jvp(_focal_value, _focal_grad, lambda g, dz: jnp.sum(g * dz, axis=-1))


@public(("axis", "label_smoothing"))
def softmax_focal_loss(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
  *,
  gamma: jax.typing.ArrayLike = 2.0,
  alpha: jax.typing.ArrayLike | None = None,
  label_smoothing: float = 0.0,
) -> jax.Array:
  r"""Categorical focal loss from logits, with one-hot or soft labels.

  .. math::
    \begin{aligned}
    \ell(z, y) &= -\sum_k \alpha_k\, (1 - p_k)^\gamma\, \tilde y_k \log p_k, \\
    p &= \operatorname{softmax}(z), \qquad \tilde y = (1 - \varepsilon)\, y + \varepsilon / K,
    \end{aligned}

  Keras's ``CategoricalFocalCrossentropy(from_logits=True)`` (which reduces
  the same per-class sum), with :math:`\alpha` = ``alpha`` (1 when None),
  :math:`\gamma` = ``gamma``, :math:`\varepsilon` = ``label_smoothing`` and
  :math:`K` the number of unmasked classes. ``gamma=0`` and ``alpha=None``
  give `softmax_cross_entropy`.

  Args:
    logits: ``[..., num_classes]`` (floating).
    labels: target probabilities (one-hot or soft), floating, broadcastable to
      ``logits``.
    axis: class axis, tuple of axes or None.
    where: elements to include (input shape or batch shape); a masked class
      is removed from the softmax.
    gamma: keyword-only focusing exponent :math:`\gamma \ge 0` (Keras: 2.0).
    alpha: keyword-only class weight: None (1), a scalar (Keras's default is
      0.25) or a ``[num_classes]`` vector (for several class axes, the
      flattened classes in row-major order).
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`.

  Returns:
    Per-example loss ``[...]`` (float32 for 16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> import xentjax as L
    >>> z, y = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[1.0, 0.0, 0.0]])
    >>> with jnp.printoptions(precision=4):
    ...   print(L.softmax_focal_loss(z, y), L.softmax_focal_loss(z, y, gamma=0.0))
    [0.0041] [0.1698]

  Note:
    The gradient is the closed form (`xentjax.grads.softmax_focal_loss`),
    finite wherever the loss is finite and also for a ``-inf`` logit on a
    target class (where the loss is ``+inf``); ``-inf`` on a zero-mass class
    contributes 0. All-masked rows give 0 with a zero gradient.

  References:
    Lin, Goyal, Girshick, He and Dollár, Focal Loss for Dense Object
    Detection, ICCV 2017.
  """
  z, a = _weights(logits, labels, axis, where, alpha, label_smoothing)
  return _focal(z, a, jnp.asarray(gamma, z.dtype))


@public_like(softmax_focal_loss)
def softmax_focal_loss_grad(logits, labels, axis, where, gamma, alpha, label_smoothing):
  r"""Gradient of `xentjax.softmax_focal_loss` with respect to the logits.

  With :math:`a_k = \alpha_k \tilde y_k`, :math:`u_k = 1 - p_k` and
  :math:`c_k = -a_k\,[\gamma\, u_k^{\gamma-1} p_k (-\log p_k) + u_k^\gamma]`,

  .. math::
    \nabla_{z_j} \ell = c_j - p_j \sum_k c_k,

  which is :math:`p \sum_k \tilde y_k - \tilde y` for :math:`\gamma = 0`. The
  factor :math:`u^{\gamma-1} p \log p` is formed in log space (finite for
  :math:`\gamma < 1` as :math:`p \to 1`).

  Args:
    logits: ``[..., num_classes]`` (floating).
    labels: target probabilities broadcastable to ``logits``.
    axis: class axis, tuple of axes or None.
    where: elements to include (masked entries get 0).
    gamma: keyword-only focusing exponent.
    alpha: keyword-only class weight (None, scalar or ``[num_classes]``).
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`.

  Returns:
    The gradient with the shape and dtype of ``logits``.
  """
  x = jnp.asarray(logits)
  z, a = _weights(logits, labels, axis, where, alpha, label_smoothing)
  g = _focal_grad(z, a, jnp.asarray(gamma, z.dtype))
  return from_last(g, class_axes(axis, x.ndim), x.shape).astype(x.dtype)


@public(("axis", "eps", "label_smoothing"))
def categorical_focal_cross_entropy(
  probs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
  *,
  gamma: jax.typing.ArrayLike = 2.0,
  alpha: jax.typing.ArrayLike | None = None,
  label_smoothing: float = 0.0,
  eps: float | None = None,
) -> jax.Array:
  r"""Categorical focal loss on probabilities (Keras, ``from_logits=False``).

  .. math::
    \ell(q, y) = -\sum_k \alpha_k\, (1 - q_k)^\gamma\, \tilde y_k \log q_k,
    \qquad \tilde y = (1 - \varepsilon)\, y + \varepsilon / K.

  Like `categorical_cross_entropy`: ``probs`` are used as given (Keras
  divides them by their sum first), no clipping unless ``eps`` opts in (then
  ``q`` is clipped to ``[eps, 1 - eps]`` in both factors, in log space),
  :math:`0 \log 0 = 0`, ``q_k = 0`` under ``y_k > 0`` gives ``+inf``.

  Args:
    probs: predicted probabilities ``[..., num_classes]`` (floating).
    labels: target probabilities broadcastable to ``probs``.
    axis: class axis, tuple of axes or None.
    where: elements to include (input shape or batch shape).
    gamma: keyword-only focusing exponent :math:`\gamma \ge 0`.
    alpha: keyword-only class weight: None, a scalar or a ``[num_classes]``
      vector (single class axis).
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`.
    eps: keyword-only clipping bound, or None (default).

  Returns:
    Per-example loss ``[...]`` (float32 for 16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> import xentjax as L
    >>> q, y = jnp.array([0.8, 0.15, 0.05]), jnp.array([1.0, 0.0, 0.0])
    >>> print(f"{L.categorical_focal_cross_entropy(q, y):.5f}")
    0.00893
  """
  q, y, ls = prepare_probs(probs, labels, label_smoothing)
  y, q, log_q, axes, _ = categorical_terms(q, y, axis, where, eps, ls)
  one = q == 1
  log_r = jnp.where(one, -jnp.inf, clipped_log1m(jnp.where(one, 0.0, q), eps, False))
  if eps is not None:
    log_r = jnp.where(one, math.log(eps), log_r)
  w = _pow_u(log_r, jnp.asarray(gamma, q.dtype))
  a = y
  if alpha is not None:
    if len(axes) != 1:
      raise ValueError("`alpha` as a vector needs a single class `axis`.")
    aw = _class_weights(alpha, q.shape[axes[0]], q.dtype)
    shape = [1] * q.ndim
    shape[axes[0]] = -1
    a = a * jnp.broadcast_to(aw.reshape(shape) if aw.ndim else aw, a.shape)
  return 0.0 - jnp.sum(a * w * log_q, axis=axes)
