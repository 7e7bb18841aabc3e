"""Cross-entropy on probabilities (not logits), exactly as the derivations write it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xentjax import _validation as V
from xentjax._softmax import (
  Axis,
  _broadcast_to_first,
  _check_float_labels,
  _class_axes,
  _jit_public,
  _prepare_where,
)


def _check_eps(eps):
  if eps is None:
    return None
  e = float(eps)
  if not 0.0 < e < 0.5:
    raise ValueError(f"`eps` must be None (no clipping) or a number in (0, 0.5), got {eps!r}.")
  return e


def _prepare(probs, labels, eps):
  """Checked `(q, y, eps)` for the probability losses and their gradients.

  `labels` is broadcast to the shape of `probs` and both are promoted to the
  compute dtype (float32 for 16-bit inputs); `q` is not clipped yet.
  """
  V.check_floating("probs", probs)
  _check_float_labels("labels", labels)
  e = _check_eps(eps)
  q = jnp.asarray(probs)
  y = _broadcast_to_first("probs", q, "labels", jnp.asarray(labels))
  dt = V.compute_dtype(q.dtype, y.dtype)
  return q.astype(dt), y.astype(dt), e


def _xlogq(y, q):
  """y * log(q) with 0 * log 0 = 0.

  Only the 0 * log 0 case is guarded (a `where` inside the log, so its gradient
  is 0, not NaN); q = 0 under y > 0 keeps its true value, -inf, and gradient.
  """
  zero = (y == 0) & (q == 0)
  return y * jnp.log(jnp.where(zero, 1.0, q))


@_jit_public("axis", "eps")
def categorical_cross_entropy(
  probs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
  *,
  eps: float | None = None,
) -> jax.Array:
  r"""Cross-entropy between target probabilities and predicted probabilities.

  .. math::
    H(p, q) = -\sum_k p_k \log q_k, \qquad 0 \log 0 = 0,

  with ``labels`` holding :math:`p` and ``probs`` holding :math:`q`. No
  clipping by default: a class with :math:`p_k > 0` and :math:`q_k = 0` gives
  ``+inf``. The gradient with respect to ``probs`` is :math:`-p / q`.

  Args:
    probs: predicted probabilities ``[..., num_classes]`` (floating), used as
      given (not renormalized).
    labels: target probabilities (one-hot or soft), floating, with the shape of
      ``probs`` or broadcastable to it.
    axis: class axis, tuple of axes or None.
    where: elements to include (input shape or batch shape).
    eps: keyword-only opt-in clipping of ``probs`` to ``[eps, 1 - eps]`` before
      the log (the Keras / scikit-learn behaviour); None (default) does not
      clip.

  Returns:
    Per-example cross-entropy ``[...]`` in nats (float32 for 16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> import xentjax as L
    >>> y = jnp.array([1.0, 0.0, 0.0, 0.0, 0.0])
    >>> print(f"{L.categorical_cross_entropy(jnp.array([0.1, 0.5, 0.1, 0.1, 0.2]), y):.3f}")
    2.303

  Note:
    Integer labels raise ``TypeError`` (use one-hot labels or
    `softmax_cross_entropy_with_integer_labels` on logits). All-masked rows
    give 0 with a zero gradient. Probabilities outside ``[0, 1]`` are not
    checked; a negative one gives NaN.
  """
  q, y, e = _prepare(probs, labels, eps)
  axes = _class_axes(axis, q.ndim)
  mask = _prepare_where(where, q.shape, axis, axes)
  if e is not None:
    q = jnp.clip(q, e, 1.0 - e)
  if mask is not None:
    y = jnp.where(mask, y, 0.0)
    q = jnp.where(mask, q, 1.0)
  return 0.0 - jnp.sum(_xlogq(y, q), axis=axes)


@_jit_public("eps")
def binary_cross_entropy(
  probs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  eps: float | None = None,
) -> jax.Array:
  r"""Element-wise binary cross-entropy on probabilities.

  .. math::
    \ell(q, y) = -y \log q - (1 - y) \log(1 - q), \qquad 0 \log 0 = 0,

  with :math:`\log(1-q)` computed as ``log1p(-q)``. The gradient with respect
  to ``probs`` is :math:`-y/q + (1-y)/(1-q)`.

  Args:
    probs: predicted probabilities of the positive class ``[...]`` (floating).
    labels: labels in ``{0, 1}`` or target probabilities, floating,
      broadcastable to ``probs``.
    eps: keyword-only opt-in clipping of ``probs`` to ``[eps, 1 - eps]`` (the
      Keras / scikit-learn behaviour); None (default) does not clip.

  Returns:
    Loss with the shape of ``probs`` (float32 for 16-bit inputs).

  Note:
    No silent clipping: ``q = 0`` with ``y > 0`` (or ``q = 1`` with
    ``y < 1``) gives ``+inf``; ``q = 0`` with ``y = 0`` gives 0 with a finite
    gradient. Integer labels raise ``TypeError``.
  """
  q, y, e = _prepare(probs, labels, eps)
  if e is not None:
    q = jnp.clip(q, e, 1.0 - e)
  w = 1.0 - y
  # log(1 - q) as log1p(-q), with the 0 * log 0 case (y = 1, q = 1) guarded.
  term0 = w * jnp.log1p(-jnp.where((w == 0) & (q == 1), 0.0, q))
  term1 = _xlogq(y, q)
  return 0.0 - (term1 + term0)
