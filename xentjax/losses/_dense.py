"""The dense loss helpers that several loss modules share: inputs, smoothing, clipped logs.

The softmax losses (`xentjax.losses._softmax`), the probability-space losses
(`xentjax.losses._probability`), the focal losses (`xentjax.losses._focal`) and the sigmoid
losses (`xentjax.losses._sigmoid`) prepare their inputs, smooth their labels and take
the logarithm of a probability the same way. Those shared steps live here,
under plain names, so that no loss module reaches into another's private
helpers:

* `prepare_logits` and `smooth_last_axis`: logits and probability labels
  with the class axes flattened onto the last axis (the softmax layout);
* `prepare_probs`, `smooth_classes`, `smooth_binary`, `categorical_terms`:
  probabilities and labels in the input's own layout (the probability losses);
* `clipped_log` and `clipped_log1m`: ``log q`` and ``log(1 - q)`` with the
  optional ``eps`` clip done in log space and the ``0 log 0 = 0`` guard.

Every helper returns arrays in the compute dtype of its inputs (float32 for
16-bit floats, else the promoted dtype): the Python numbers they add (``eps``,
its logarithms, ``1/K``) are weakly typed and never promote a float32 input
to float64 under ``JAX_ENABLE_X64``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from xentjax import _validation as V
from xentjax._api import broadcast_to_first, check_float_labels, class_axes, prepare_where, to_last
from xentjax._logspace import astype_exact, log_prob

# ---------------------------------------------------------------------------
# Logits and probability labels, classes on the last axis (softmax layout).
# ---------------------------------------------------------------------------


def prepare_logits(logits, labels, axis, where):
  """Checked ``(z, y, mask)`` with the classes flattened onto the last axis.

  ``labels`` (probabilities, floating) is broadcast to the shape of
  ``logits``; both are cast to the compute dtype; masked-out labels are 0.
  ``mask`` is None or a bool ``[..., K]``.
  """
  V.check_floating("logits", logits)
  check_float_labels("labels", labels)
  logits = jnp.asarray(logits)
  labels = broadcast_to_first("logits", logits, "labels", jnp.asarray(labels))
  dt = V.compute_dtype(logits.dtype, labels.dtype)
  axes = class_axes(axis, logits.ndim)
  mask = prepare_where(where, logits.shape, axis, axes)
  z = to_last(logits.astype(dt), axes)
  y = to_last(labels.astype(dt), axes)
  mask = None if mask is None else to_last(mask, axes)
  if mask is not None:
    y = jnp.where(mask, y, 0.0)
  return z, y, mask


def smooth_last_axis(y, mask, eps: float):
  """``(1 - eps) y + eps / K`` over the (unmasked) classes of the last axis."""
  if eps == 0.0:
    return y
  if mask is None:
    return (1.0 - eps) * y + eps / y.shape[-1]
  k = jnp.sum(mask, axis=-1, keepdims=True).astype(y.dtype)
  return jnp.where(mask, (1.0 - eps) * y + eps / jnp.maximum(k, 1.0), 0.0)


# ---------------------------------------------------------------------------
# Probabilities and labels in the input's layout (probability losses).
# ---------------------------------------------------------------------------


def prepare_probs(probs, labels, label_smoothing=0.0):
  """Checked ``(q, y, label_smoothing)`` for the probability losses and their gradients.

  ``labels`` is broadcast to the shape of ``probs`` and both are promoted to
  the compute dtype (float32 for 16-bit inputs); ``q`` is not clipped yet.
  """
  V.check_floating("probs", probs)
  check_float_labels("labels", labels)
  ls = V.check_label_smoothing(label_smoothing)
  q = jnp.asarray(probs)
  y = broadcast_to_first("probs", q, "labels", jnp.asarray(labels))
  dt = V.compute_dtype(q.dtype, y.dtype)
  return astype_exact(q, dt), y.astype(dt), ls


def smooth_classes(y, mask, axes, eps: float):
  """``(1 - eps) y + eps / K`` over the (unmasked) classes of ``axes`` (Keras, PyTorch)."""
  if eps == 0.0:
    return y
  if mask is None:
    return (1.0 - eps) * y + eps / math.prod(y.shape[a] for a in axes)
  k = jnp.sum(mask, axis=axes, keepdims=True).astype(y.dtype)
  return jnp.where(mask, (1.0 - eps) * y + eps / jnp.maximum(k, 1.0), 0.0)


def smooth_binary(y, eps: float):
  """``(1 - eps) y + eps / 2`` (Keras's `BinaryCrossentropy(label_smoothing=)`)."""
  return y if eps == 0.0 else (1.0 - eps) * y + 0.5 * eps


def categorical_terms(q, y, axis, where, eps, label_smoothing):
  """Smoothed, masked ``y`` and ``log q`` (clipped with ``eps``), for a loss and its gradient.

  Returns ``(y, q, log_q, axes, mask)``: masked classes get ``y = 0`` and
  ``q = 1`` (so they add nothing), ``axes`` are the class axes.
  """
  axes = class_axes(axis, q.ndim)
  mask = prepare_where(where, q.shape, axis, axes)
  y = smooth_classes(y, mask, axes, label_smoothing)
  if mask is not None:
    y = jnp.where(mask, y, 0.0)
    q = jnp.where(mask, q, 1.0)
  return y, q, clipped_log(q, eps, (y == 0) & (q == 0)), axes, mask


# ---------------------------------------------------------------------------
# The logarithms.
# ---------------------------------------------------------------------------

# Each guards its own 0 * log 0 case (`skip`: the weight is 0 and the
# probability is 0) inside the log, so the untaken branch leaves no NaN in the
# gradient; q = 0 under a positive weight keeps its true value, -inf, and
# gradient. With `eps`, the clip to [eps, 1 - eps] happens in log space:
# `1 - eps` is never formed (float32 rounds it to 1 for eps < 6e-8), so both
# ends are protected in every dtype, and the gradient is 0 where a clip is
# active. `log_prob` is exact for subnormal q (XLA flushes those to 0). The
# bounds are Python floats (`math.log`), weakly typed: they keep q's dtype.


def clipped_log(q, eps, skip):
  """``log q``; with ``eps``, clipped to ``[log eps, log(1 - eps)]``; 0 where ``skip``."""
  if eps is None:
    return log_prob(jnp.where(skip, 1.0, q))
  low = q < eps
  log_q = jnp.where(low, math.log(eps), log_prob(jnp.where(low, 1.0, q)))
  return jnp.minimum(log_q, math.log1p(-eps))


def clipped_log1m(q, eps, skip):
  """``log(1 - q)`` as ``log1p(-q)``; with ``eps``, clipped like `clipped_log`; 0 where ``skip``."""
  if eps is None:
    return jnp.log1p(-jnp.where(skip, 0.0, q))
  high = (1.0 - q) < eps  # exact: 1 - q has no rounding error for q >= 1/2
  log_r = jnp.where(high, math.log(eps), jnp.log1p(-jnp.where(high, 0.0, q)))
  return jnp.minimum(log_r, math.log1p(-eps))


def inside_clip(q, eps):
  """Where ``q`` lies inside ``[eps, 1 - eps]`` (no clip active; everywhere for None)."""
  if eps is None:
    return jnp.ones(jnp.shape(q), bool)
  lo_ok = (q >= eps) & (log_prob(q) <= math.log1p(-eps))
  hi_ok = ((1.0 - q) >= eps) & (jnp.log1p(-q) <= math.log1p(-eps))
  return lo_ok & hi_ok
