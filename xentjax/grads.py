"""Closed-form gradients of the cross-entropies, with respect to the first argument.

Each function has the name and arguments of the loss it differentiates and
returns :math:`\\partial \\sum \\ell / \\partial x` for the first argument
:math:`x` (the gradient of the summed per-example loss: what `jax.grad` of
``loss(...).sum()`` returns), with the shape and dtype of that argument:

===========================================  =====================================================
loss                                         gradient
===========================================  =====================================================
`softmax_cross_entropy`                      :math:`\\mathrm{softmax}(z)\\sum_k \\tilde y_k - \\tilde y
                                             + 2\\lambda \\log Z\\, \\mathrm{softmax}(z)`
`softmax_cross_entropy_with_integer_labels`  :math:`\\mathrm{softmax}(z) - \\tilde y` (no one-hot)
`sigmoid_binary_cross_entropy`               :math:`\\sigma(z) - y`
`categorical_cross_entropy`                  :math:`-p / q`
`binary_cross_entropy`                       :math:`-y/q + (1-y)/(1-q)`
`softmax_focal_loss`                         :math:`c - \\mathrm{softmax}(z) \\sum_k c_k` (see its docstring)
===========================================  =====================================================

(:math:`\\tilde y` the smoothed labels, :math:`\\lambda` the z-loss weight.)
They are what backpropagation computes, written out: use them to read the
dynamics of training (the gradient of the softmax cross-entropy is the
prediction error), to check autodiff, or to avoid a backward pass.

Edge cases follow the losses: masked entries and all-masked rows get 0, an
out-of-range integer label a NaN row, a ``-inf`` logit a finite gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xentjax import _validation as V
from xentjax._focal import softmax_focal_loss_grad as softmax_focal_loss
from xentjax._probability import binary_cross_entropy_grad as binary_cross_entropy
from xentjax._probability import categorical_cross_entropy_grad as categorical_cross_entropy
from xentjax._sigmoid import sigmoid_binary_cross_entropy_grad as sigmoid_binary_cross_entropy
from xentjax._sigmoid import sigmoid_focal_loss_grad as sigmoid_focal_loss
from xentjax._softmax import (
  Axis,
  _class_axes,
  _dense_prepare,
  _jit_public,
  _masked_log_softmax,
  _prepare_where,
  _smooth,
  _sparse_prepare,
)

__all__ = [
  "binary_cross_entropy",
  "categorical_cross_entropy",
  "kl_divergence",
  "kl_divergence_with_log_targets",
  "poly_loss_cross_entropy",
  "safe_softmax_cross_entropy",
  "sigmoid_binary_cross_entropy",
  "sigmoid_focal_loss",
  "softmax_cross_entropy",
  "softmax_cross_entropy_with_integer_labels",
  "softmax_focal_loss",
]


def _from_last(g: jax.Array, axes: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `_softmax._to_last`: unflatten the class axis and put it back."""
  ndim = len(shape)
  batch = tuple(i for i in range(ndim) if i not in axes)
  g = g.reshape(tuple(shape[i] for i in batch) + tuple(shape[i] for i in axes))
  perm = batch + tuple(axes)
  return jnp.transpose(g, tuple(int(i) for i in np.argsort(perm)))


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sum a broadcast result back to the shape of the argument (as autodiff does)."""
  if x.shape == tuple(shape):
    return x
  lead = x.ndim - len(shape)
  x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _softmax_probs(z, mask):
  """softmax over the last axis with masked entries 0 and log Z; all-masked rows give 0."""
  shifted, log_s, m = _masked_log_softmax(z, mask)
  logp = shifted - log_s
  p = jnp.exp(jnp.where(jnp.isnan(logp) & jnp.isinf(log_s), -jnp.inf, logp))
  return p, (log_s + m)[..., 0]


def _z_loss_term(p, lse, mask, z_loss):
  if mask is not None:
    lse = jnp.where(jnp.any(mask, axis=-1), lse, 0.0)
  return (2.0 * z_loss) * lse[..., None] * p


@_jit_public("axis", "label_smoothing", "z_loss")
def softmax_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
) -> jax.Array:
  r"""Gradient of `xentjax.softmax_cross_entropy` with respect to the logits.

  .. math::
    \nabla_z \ell = \operatorname{softmax}(z) \sum_k \tilde y_k - \tilde y
      + 2 \lambda \log Z \operatorname{softmax}(z),

  which is :math:`\hat y - y` for normalized labels without z-loss
  (:math:`\tilde y = (1-\varepsilon) y + \varepsilon / K`).

  Args:
    logits: ``[..., num_classes]`` (floating).
    labels: probabilities broadcastable to ``logits`` (floating).
    axis: class axis, tuple of axes or None.
    where: elements to include (input or batch shape).
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`.
    z_loss: keyword-only :math:`\lambda \ge 0`.

  Returns:
    The gradient, with the shape and dtype of ``logits``.

  Note:
    Masked entries and all-masked rows get 0; a ``-inf`` logit gets a finite
    gradient (:math:`-\tilde y_k`).
  """
  eps = V.check_label_smoothing(label_smoothing)
  lam = V.check_nonnegative("z_loss", z_loss)
  x = jnp.asarray(logits)
  z, y, mask = _dense_prepare(logits, labels, axis, where)
  if mask is not None:
    y = jnp.where(mask, y, 0.0)
  y = _smooth(y, mask, eps)
  p, lse = _softmax_probs(z, mask)
  g = p * jnp.sum(y, axis=-1, keepdims=True) - y
  if lam:
    g = g + _z_loss_term(p, lse, mask, lam)
  return _from_last(g, _class_axes(axis, x.ndim), x.shape).astype(x.dtype)


@_jit_public()
def safe_softmax_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Gradient of `xentjax.safe_softmax_cross_entropy`: :math:`\operatorname{softmax}(z)\sum_k y_k - y`.

  Args:
    logits: ``[..., num_classes]`` (floating).
    labels: probabilities broadcastable to ``logits``.

  Returns:
    The gradient with the shape and dtype of ``logits``.
  """
  return softmax_cross_entropy(logits, labels)


@_jit_public("axis", "label_smoothing", "z_loss")
def softmax_cross_entropy_with_integer_labels(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  axis: int | tuple[int, ...] = -1,
  where: jax.typing.ArrayLike | None = None,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
) -> jax.Array:
  r"""Gradient of `xentjax.softmax_cross_entropy_with_integer_labels` w.r.t. the logits.

  .. math::
    \nabla_z \ell = \operatorname{softmax}(z) - (1-\varepsilon)\,\mathrm{onehot}(c)
      - \varepsilon / K + 2\lambda \log Z \operatorname{softmax}(z).

  The one-hot is never materialized: the true class is selected by comparing
  a broadcast iota with the label, inside the expression that writes the
  output.

  Args:
    logits: ``[..., num_classes]`` (floating).
    labels: integer class indices ``[...]``.
    axis: class axis or tuple of axes.
    where: elements to include (input or batch shape).
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`.
    z_loss: keyword-only :math:`\lambda \ge 0`.

  Returns:
    The gradient with the shape and dtype of ``logits``.

  Note:
    An out-of-range label gives a row of NaN; an all-masked row gives zeros.
  """
  eps = V.check_label_smoothing(label_smoothing)
  lam = V.check_nonnegative("z_loss", z_loss)
  x = jnp.asarray(logits)
  z, labels, mask = _sparse_prepare(logits, labels, axis, where)
  k = z.shape[-1]
  p, lse = _softmax_probs(z, mask)
  g = p
  if eps:
    if mask is None:
      g = g - eps / k
    else:
      cnt = jnp.sum(mask, axis=-1, keepdims=True).astype(z.dtype)
      g = g - jnp.where(mask, eps / jnp.maximum(cnt, 1.0), 0.0)
  if lam:
    g = g + _z_loss_term(p, lse, mask, lam)
  is_label = jax.lax.broadcasted_iota(labels.dtype, z.shape, z.ndim - 1) == labels[..., None]
  g = jnp.where(is_label, g - (1.0 - eps), g)
  valid = ((labels >= 0) & (labels < k))[..., None]
  g = jnp.where(valid, g, jnp.nan)
  if mask is not None:
    g = jnp.where(jnp.any(mask, axis=-1, keepdims=True), g, 0.0)
  return _from_last(g, _class_axes(axis, x.ndim), x.shape).astype(x.dtype)


@_jit_public("axis")
def poly_loss_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike = 2.0,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Gradient of `xentjax.poly_loss_cross_entropy` with respect to the logits.

  .. math::
    \nabla_z \ell = p \sum_k y_k - y - \epsilon\, p \odot (y - \langle y, p \rangle),
    \qquad p = \operatorname{softmax}(z).

  Args:
    logits: ``[..., num_classes]`` (floating).
    labels: probabilities broadcastable to ``logits``.
    epsilon: keyword-only coefficient of the first polynomial term.
    axis: keyword-only class axis, tuple of axes or None.
    where: keyword-only elements to include.

  Returns:
    The gradient with the shape and dtype of ``logits``.
  """
  x = jnp.asarray(logits)
  z, y, mask = _dense_prepare(logits, labels, axis, where)
  if mask is not None:
    y = jnp.where(mask, y, 0.0)
  p, _ = _softmax_probs(z, mask)
  yp = jnp.sum(y * p, axis=-1, keepdims=True)
  g = p * jnp.sum(y, axis=-1, keepdims=True) - y
  g = g - jnp.asarray(epsilon, z.dtype) * p * (y - yp)
  return _from_last(g, _class_axes(axis, x.ndim), x.shape).astype(x.dtype)


def _kl_grad(log_predictions, weights, axis, where, target_name):
  V.check_floating("log_predictions", log_predictions)
  V.check_floating(target_name, weights)
  lp = jnp.asarray(log_predictions)
  t = jnp.asarray(weights)
  V.check_broadcastable("log_predictions", lp, target_name, t)
  shape = np.broadcast_shapes(lp.shape, t.shape)
  dt = V.compute_dtype(lp.dtype, t.dtype)
  t = jnp.broadcast_to(t.astype(dt), shape)
  axes = _class_axes(axis, len(shape))
  mask = _prepare_where(where, shape, axis, axes)
  return t, mask, lp


@_jit_public("axis")
def kl_divergence(
  log_predictions: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Gradient of `xentjax.kl_divergence` w.r.t. the log-predictions: :math:`-t`.

  Args:
    log_predictions: ``[..., num_classes]``.
    targets: probabilities broadcastable to it.
    axis: class axis, tuple of axes or None.
    where: elements to include (masked entries get 0).

  Returns:
    The gradient with the shape and dtype of ``log_predictions``.
  """
  t, mask, lp = _kl_grad(log_predictions, targets, axis, where, "targets")
  g = -t if mask is None else jnp.where(mask, -t, 0.0)
  return _sum_to(g, lp.shape).astype(lp.dtype)


@_jit_public("axis")
def kl_divergence_with_log_targets(
  log_predictions: jax.typing.ArrayLike,
  log_targets: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Gradient of `xentjax.kl_divergence_with_log_targets`: :math:`-e^{\log t}`.

  Args:
    log_predictions: ``[..., num_classes]``.
    log_targets: log-probabilities broadcastable to it.
    axis: class axis, tuple of axes or None.
    where: elements to include (masked entries get 0).

  Returns:
    The gradient with the shape and dtype of ``log_predictions``.
  """
  lt, mask, lp = _kl_grad(log_predictions, log_targets, axis, where, "log_targets")
  g = -jnp.exp(lt) if mask is None else jnp.where(mask, -jnp.exp(lt), 0.0)
  return _sum_to(g, lp.shape).astype(lp.dtype)
