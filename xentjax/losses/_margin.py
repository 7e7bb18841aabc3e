"""Margin losses: hinge and perceptron, binary and multiclass (optax-compatible)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xentjax import _validation as V
from xentjax._api import doc_parts, public


def _binary_prepare(predictor_outputs, targets, same_shape: bool):
  V.check_floating("predictor_outputs", predictor_outputs)
  s = jnp.asarray(predictor_outputs)
  t = jnp.asarray(targets)
  if same_shape:
    V.check_same_shape("predictor_outputs", s, "targets", t)
  else:
    V.check_broadcastable("predictor_outputs", s, "targets", t)
    shape = jnp.broadcast_shapes(s.shape, t.shape)
    s, t = jnp.broadcast_to(s, shape), jnp.broadcast_to(t, shape)
  dt = V.compute_dtype(s.dtype)  # 16-bit scores are computed, and returned, in float32
  return s.astype(dt), t.astype(dt)


@public()
def hinge_loss(predictor_outputs: jax.typing.ArrayLike, targets: jax.typing.ArrayLike) -> jax.Array:
  r"""Binary hinge loss.

  .. math::
    \ell(s, t) = \max(0,\ 1 - s\,t), \qquad t \in \{-1, +1\}.

  Args:
    predictor_outputs: scores (decision-function values) ``[...]`` (floating).
    targets: signed targets in ``{-1, +1}``, broadcastable to the scores.

  Returns:
    Element-wise loss with the broadcast shape; float32 for 16-bit scores,
    else the scores' dtype.

  Note:
    Targets are used as given; a target outside ``{-1, +1}`` is not an error.
  """
  s, t = _binary_prepare(predictor_outputs, targets, same_shape=False)
  return jnp.maximum(0, 1 - s * t)


@public()
def perceptron_loss(
  predictor_outputs: jax.typing.ArrayLike, targets: jax.typing.ArrayLike
) -> jax.Array:
  r"""Binary perceptron loss.

  .. math::
    \ell(s, t) = \max(0,\ -s\,t), \qquad t \in \{-1, +1\}.

  Args:
    predictor_outputs: scores ``[...]`` (floating).
    targets: signed targets in ``{-1, +1}`` with the same shape.

  Returns:
    Element-wise loss ``[...]``; float32 for 16-bit scores, else the scores'
    dtype.

  Note:
    The shapes must be equal (as in optax); a mismatch raises ``ValueError``.

  References:
    Rosenblatt, The Perceptron, 1958.
  """
  s, t = _binary_prepare(predictor_outputs, targets, same_shape=True)
  return jnp.maximum(0, -s * t)


@public()
def squared_hinge_loss(
  predictor_outputs: jax.typing.ArrayLike, targets: jax.typing.ArrayLike
) -> jax.Array:
  r"""Binary squared hinge loss, with targets in ``{-1, +1}`` or ``{0, 1}``.

  .. math::
    \ell(s, t) = \max(0,\ 1 - s\,t')^2, \qquad
    t' = \begin{cases} -1 & t = 0 \\ t & \text{otherwise,} \end{cases}

  Keras's convention: ``{0, 1}`` targets are read as ``{-1, +1}``. Keras's
  ``squared_hinge(y_true, y_pred)`` is this loss averaged over the last axis
  (``squared_hinge_loss(s, t).mean(-1)``); Keras maps 0 to -1 only when every
  target is 0 or 1, which gives the same values on every valid target.

  Args:
    predictor_outputs: scores ``[...]`` (floating).
    targets: targets in ``{-1, +1}`` or ``{0, 1}``, broadcastable to the scores.

  Returns:
    Element-wise loss with the broadcast shape; float32 for 16-bit scores,
    else the scores' dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import xentjax as L
    >>> print(L.squared_hinge_loss(jnp.array([0.5, 2.0, -0.5]), jnp.array([1.0, 0.0, 0.0])))
    [0.25 9.   0.25]
  """
  s, t = _binary_prepare(predictor_outputs, targets, same_shape=False)
  t = jnp.where(t == 0, -1.0, t)
  return jnp.square(jnp.maximum(0, 1 - s * t))


@public()
def categorical_hinge_loss(
  scores: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Categorical hinge loss on one-hot or multi-hot float targets (Keras).

  .. math::
    \ell(s, y) = \max\Big(0,\ 1 + \max_k\, (1 - y_k)\, s_k - \sum_k y_k s_k\Big),

  Keras's ``categorical_hinge``: the largest score of a class outside the
  target against the summed scores of the target classes. As in Keras, a
  target class contributes :math:`(1 - 1)\,s_k = 0` to the max, so for a
  one-hot target it equals `multiclass_hinge_loss` whenever some wrong class
  has a score :math:`\ge 0` (and uses 0 in place of the largest wrong score
  otherwise). An all-zero target row gives :math:`\max(0, 1 + \max_k s_k)`.

  Args:
    scores: scores ``[..., num_classes]`` (floating).
    targets: floating targets with the shape of ``scores`` (one-hot, multi-hot
      or all zero).

  Returns:
    Loss ``[...]``; float32 for 16-bit scores, else the scores' dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import xentjax as L
    >>> print(L.categorical_hinge_loss(jnp.array([[2.0, 0.5, -1.0]]), jnp.array([[1.0, 0, 0]])))
    [0.]
  """
  V.check_floating("scores", scores)
  V.check_floating("targets", targets)
  s, y = jnp.asarray(scores), jnp.asarray(targets)
  V.check_same_shape("scores", s, "targets", y)
  if s.ndim == 0:
    raise ValueError("`scores` must have a class axis (the last), got a scalar.")
  dt = V.compute_dtype(s.dtype, y.dtype)
  s, y = s.astype(dt), y.astype(dt)
  pos = jnp.sum(y * s, axis=-1)
  neg = jnp.max((1.0 - y) * s, axis=-1)
  return jnp.maximum(0.0, neg - pos + 1.0)


# The Args and Returns of the multiclass losses (their docstrings' ``{multiclass_args}``).
_MULTICLASS_ARGS = """Args:
    scores: scores ``[..., num_classes]`` (floating).
    labels: integer class indices ``[...]``.

  Returns:
    Loss ``[...]``; float32 for 16-bit scores, else the scores' dtype."""


def _multiclass_prepare(scores, labels):
  V.check_floating("scores", scores)
  V.check_integer("labels", labels)
  scores = jnp.asarray(scores)
  scores = scores.astype(V.compute_dtype(scores.dtype))  # 16-bit: float32
  labels = jnp.asarray(labels)
  if scores.ndim == 0 or tuple(labels.shape) != tuple(scores.shape[:-1]):
    raise ValueError(
      "`labels` must have the shape of `scores` without the last (class) axis: "
      f"got scores.shape={tuple(scores.shape)} and labels.shape={tuple(labels.shape)}."
    )
  k = scores.shape[-1]
  valid = (labels >= 0) & (labels < k)
  idx = jnp.where(valid, labels, 0)
  s_y = jnp.take_along_axis(scores, idx[..., None].astype(jnp.int32), axis=-1)[..., 0]
  is_label = jax.lax.broadcasted_iota(idx.dtype, scores.shape, scores.ndim - 1) == idx[..., None]
  nan_if_invalid = jnp.where(valid, 1.0, jnp.nan).astype(scores.dtype)
  return scores, s_y, is_label, nan_if_invalid


@public()
@doc_parts(multiclass_args=_MULTICLASS_ARGS)
def multiclass_hinge_loss(
  scores: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Multiclass hinge loss (Crammer-Singer).

  .. math::
    \ell(s, c) = \max_k \big(s_k + [k \ne c]\big) - s_c.

  {multiclass_args}

  Note:
    An out-of-range label gives NaN. No one-hot of the batch is built beyond a
    boolean comparison.

  References:
    Crammer and Singer, On the Algorithmic Implementation of Multiclass
    Kernel-based Vector Machines, JMLR 2001.
  """
  scores, s_y, is_label, nan_if_invalid = _multiclass_prepare(scores, labels)
  margin = jnp.max(jnp.where(is_label, scores, scores + 1.0), axis=-1)
  return (margin - s_y) * nan_if_invalid


@public()
@doc_parts(multiclass_args=_MULTICLASS_ARGS)
def multiclass_perceptron_loss(
  scores: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Multiclass perceptron loss.

  .. math::
    \ell(s, c) = \max_k s_k - s_c.

  {multiclass_args}

  Note:
    An out-of-range label gives NaN.

  References:
    Collins, Discriminative Training Methods for Hidden Markov Models: Theory
    and Experiments with Perceptron Algorithms, EMNLP 2002.
  """
  scores, s_y, _, nan_if_invalid = _multiclass_prepare(scores, labels)
  return (jnp.max(scores, axis=-1) - s_y) * nan_if_invalid
