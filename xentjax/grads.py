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
===========================================  =====================================================

(:math:`\\tilde y` the smoothed labels, :math:`\\lambda` the z-loss weight.)
They are what backpropagation computes, written out: use them to read the
dynamics of training (the gradient of the softmax cross-entropy is the
prediction error), to check autodiff, or to avoid a backward pass.

Edge cases follow the losses: masked entries and all-masked rows get 0, an
out-of-range integer label a NaN row, a ``-inf`` logit a finite gradient.

Each closed form is written beside the loss it differentiates (the softmax
family in ``xentjax._softmax``, declared with ``xentjax._api.gradient_of``, which
gives it the loss's signature, options and argument handling); this module
only collects them under the loss names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xentjax._probability import _prepare as _prepare_probs
from xentjax._sigmoid import _focal_grad_z
from xentjax._sigmoid import _prepare as _sigmoid_prepare
from xentjax._softmax import Axis, _class_axes, _jit_public, _prepare_where, _sum_to
from xentjax._softmax import kl_divergence_grad as kl_divergence
from xentjax._softmax import kl_divergence_with_log_targets_grad as kl_divergence_with_log_targets
from xentjax._softmax import poly_loss_cross_entropy_grad as poly_loss_cross_entropy
from xentjax._softmax import safe_softmax_cross_entropy_grad as safe_softmax_cross_entropy
from xentjax._softmax import softmax_cross_entropy_grad as softmax_cross_entropy
from xentjax._softmax import (
  softmax_cross_entropy_with_integer_labels_grad as softmax_cross_entropy_with_integer_labels,
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
]


@_jit_public()
def sigmoid_binary_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Gradient of `xentjax.sigmoid_binary_cross_entropy`: :math:`\sigma(z) - y`.

  Args:
    logits: ``[...]`` (floating).
    labels: labels or probabilities broadcastable to ``logits``.

  Returns:
    The gradient with the shape and dtype of ``logits`` (summed over any
    broadcast dimensions, as autodiff does).
  """
  x = jnp.asarray(logits)
  z, y = _sigmoid_prepare(logits, labels)
  return _sum_to(jax.nn.sigmoid(z) - y, x.shape).astype(x.dtype)


@_jit_public()
def sigmoid_focal_loss(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  alpha: jax.typing.ArrayLike | None = None,
  gamma: jax.typing.ArrayLike = 2.0,
) -> jax.Array:
  r"""Gradient of `xentjax.sigmoid_focal_loss` with respect to the logits.

  With :math:`u = 1 - p_t = y + (1 - 2y)\sigma(z)` and :math:`c` the binary
  cross-entropy,

  .. math::
    \nabla_z \ell = \alpha_t \big[\gamma\, u^{\gamma-1} (1-2y)\,
      \sigma(z)\sigma(-z)\, c + u^\gamma (\sigma(z) - y)\big],

  where :math:`u^{\gamma-1}\sigma(z)\sigma(-z)` is evaluated in log space (it
  stays finite for :math:`\gamma < 1` and extreme logits).

  Args:
    logits: ``[...]`` (floating).
    labels: labels in ``{0, 1}`` or ``[0, 1]``, broadcastable to ``logits``.
    alpha: keyword-only positive-class weight or None.
    gamma: keyword-only focusing exponent.

  Returns:
    The gradient with the shape and dtype of ``logits``.
  """
  x = jnp.asarray(logits)
  z, y = _sigmoid_prepare(logits, labels)
  g = _focal_grad_z(z, y, jnp.asarray(gamma, z.dtype))
  if alpha is not None:
    g = (alpha * y + (1.0 - alpha) * (1.0 - y)) * g
  return _sum_to(g, x.shape).astype(x.dtype)


@_jit_public("axis", "eps")
def categorical_cross_entropy(
  probs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
  *,
  eps: float | None = None,
) -> jax.Array:
  r"""Gradient of `xentjax.categorical_cross_entropy` w.r.t. the probabilities: :math:`-p/q`.

  Args:
    probs: predicted probabilities :math:`q`, ``[..., num_classes]``.
    labels: target probabilities :math:`p` broadcastable to ``probs``.
    axis: class axis, tuple of axes or None.
    where: elements to include.
    eps: keyword-only clipping bound (the gradient is 0 where ``probs`` is
      clipped).

  Returns:
    The gradient with the shape and dtype of ``probs``: 0 where :math:`p = 0`
    (even at :math:`q = 0`), :math:`-\infty` where :math:`p > 0 = q`.
  """
  out_dtype = jnp.asarray(probs).dtype
  q, y, e = _prepare_probs(probs, labels, eps)
  axes = _class_axes(axis, q.ndim)
  mask = _prepare_where(where, q.shape, axis, axes)
  inside = None
  if e is not None:
    inside = (q >= e) & (q <= 1.0 - e)
    q = jnp.clip(q, e, 1.0 - e)
  g = jnp.where(y == 0, 0.0, -y / jnp.where(y == 0, 1.0, q))
  if inside is not None:
    g = jnp.where(inside, g, 0.0)
  if mask is not None:
    g = jnp.where(mask, g, 0.0)
  return g.astype(out_dtype)


@_jit_public("eps")
def binary_cross_entropy(
  probs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  eps: float | None = None,
) -> jax.Array:
  r"""Gradient of `xentjax.binary_cross_entropy`: :math:`-y/q + (1-y)/(1-q)`.

  Args:
    probs: predicted probabilities ``[...]``.
    labels: labels or target probabilities broadcastable to ``probs``.
    eps: keyword-only clipping bound (gradient 0 where clipped).

  Returns:
    The gradient with the shape and dtype of ``probs``; a term whose label
    weight is 0 contributes 0 (even at :math:`q \in \{0, 1\}`).
  """
  out_dtype = jnp.asarray(probs).dtype
  q, y, e = _prepare_probs(probs, labels, eps)
  inside = None
  if e is not None:
    inside = (q >= e) & (q <= 1.0 - e)
    q = jnp.clip(q, e, 1.0 - e)
  w = 1.0 - y
  g = jnp.where(y == 0, 0.0, -y / jnp.where(y == 0, 1.0, q))
  g = g + jnp.where(w == 0, 0.0, w / jnp.where(w == 0, 1.0, 1.0 - q))
  if inside is not None:
    g = jnp.where(inside, g, 0.0)
  return g.astype(out_dtype)
