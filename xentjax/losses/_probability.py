"""Cross-entropy on probabilities (not logits), exactly as the derivations write it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xentjax import _validation as V
from xentjax._api import Axis, broadcast_to_first, public, public_like, where_mask
from xentjax._core import label_status
from xentjax._logspace import log_prob
from xentjax.losses._dense import (
  categorical_terms,
  clipped_log,
  clipped_log1m,
  inside_clip,
  prepare_probs,
  smooth_binary,
)


@public(("axis", "eps", "label_smoothing"))
def categorical_cross_entropy(
  probs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
  *,
  eps: float | None = None,
  label_smoothing: float = 0.0,
) -> jax.Array:
  r"""Cross-entropy between target probabilities and predicted probabilities.

  .. math::
    H(\tilde p, q) = -\sum_k \tilde p_k \log q_k, \qquad 0 \log 0 = 0,
    \qquad \tilde p = (1 - \varepsilon) p + \varepsilon / K,

  with ``labels`` holding :math:`p`, ``probs`` holding :math:`q` and
  :math:`\varepsilon` = ``label_smoothing`` (Keras's
  `CategoricalCrossentropy` convention, :math:`K` the number of unmasked
  classes). No clipping by default: a class with :math:`\tilde p_k > 0` and
  :math:`q_k = 0` gives ``+inf``. The gradient with respect to ``probs`` is
  :math:`-\tilde p / q`.

  Args:
    probs: predicted probabilities ``[..., num_classes]`` (floating), used as
      given (not renormalized; Keras divides by their sum first).
    labels: target probabilities (one-hot or soft), floating, with the shape of
      ``probs`` or broadcastable to it.
    axis: class axis, tuple of axes or None.
    where: elements to include (input shape or batch shape).
    eps: keyword-only opt-in clipping of ``probs`` to ``[eps, 1 - eps]`` before
      the log (the Keras / scikit-learn behaviour), done in log space so that
      it protects both ends in every dtype; None (default) does not clip.
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`.

  Returns:
    Per-example cross-entropy ``[...]`` in nats (float32 for 16-bit inputs).

  Examples:
    >>> import jax.numpy as jnp
    >>> import xentjax as L
    >>> y = jnp.array([1.0, 0.0, 0.0, 0.0, 0.0])
    >>> print(f"{L.categorical_cross_entropy(jnp.array([0.1, 0.5, 0.1, 0.1, 0.2]), y):.3f}")
    2.303

  Note:
    Integer labels raise ``TypeError`` (see
    `categorical_cross_entropy_with_integer_labels`). All-masked rows give 0
    with a zero gradient. Probabilities outside ``[0, 1]`` are not checked; a
    negative one gives NaN. Subnormal probabilities are exact (``1e-38`` gives
    87.50 nats, not ``+inf``, although XLA flushes subnormals to zero).
  """
  q, y, ls = prepare_probs(probs, labels, label_smoothing)
  y, _, log_q, axes, _ = categorical_terms(q, y, axis, where, eps, ls)
  return 0.0 - jnp.sum(y * log_q, axis=axes)


def _check_class_axis(axis, ndim: int) -> int:
  if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
    raise TypeError(f"`axis` must be an int (the class axis), got {axis!r}.")
  return V.normalize_axis("axis", int(axis), ndim)


@public(("axis", "eps"))
def categorical_cross_entropy_with_integer_labels(
  probs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  axis: int = -1,
  where: jax.typing.ArrayLike | None = None,
  *,
  eps: float | None = None,
) -> jax.Array:
  r"""Cross-entropy of predicted probabilities against integer class labels.

  .. math::
    \ell(q, c) = -\log q_c

  (Keras's `SparseCategoricalCrossentropy(from_logits=False)`, without its
  silent clipping). No one-hot is built; ``q_c = 0`` gives ``+inf`` unless
  ``eps`` opts into clipping ``q`` to ``[eps, 1 - eps]`` (in log space, as in
  `categorical_cross_entropy`). The gradient with respect to ``probs`` is
  :math:`-1/q_c` at the label and 0 elsewhere.

  Args:
    probs: predicted probabilities ``[..., num_classes]`` (floating), used as
      given.
    labels: integer class indices, the shape of ``probs`` without ``axis``.
    axis: the class axis (an int).
    where: rows to include, the shape of ``labels`` (bool or integer 0/1).
    eps: keyword-only opt-in clipping bound, or None (default, no clipping).

  Returns:
    Per-example loss ``[...]`` in nats (float32 for 16-bit inputs); 0 for a
    masked row.

  Examples:
    >>> import jax.numpy as jnp
    >>> import xentjax as L
    >>> q = jnp.array([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
    >>> with jnp.printoptions(precision=4):
    ...   print(L.categorical_cross_entropy_with_integer_labels(q, jnp.array([1, 0])))
    [0.6931 0.3567]

  Note:
    A label outside ``[0, num_classes)`` gives NaN (the library's validity
    rule of ``xentjax._core.label_status``); a masked row gives 0 with a zero
    gradient.
  """
  V.check_floating("probs", probs)
  V.check_integer("labels", labels)
  q = jnp.asarray(probs)
  q = q.astype(V.compute_dtype(q.dtype))
  labels = jnp.asarray(labels)
  ax = _check_class_axis(axis, q.ndim)
  q = jnp.moveaxis(q, ax, -1)
  if tuple(labels.shape) != q.shape[:-1]:
    raise ValueError(
      "`labels` must have the shape of `probs` without the class axis: expected "
      f"{q.shape[:-1]}, got labels.shape={tuple(labels.shape)}."
    )
  if where is not None:
    where = broadcast_to_first("labels", labels, "where", where_mask(where))
  st = label_status(labels, q.shape[-1], where=where)
  q_c = jnp.take_along_axis(q, st.index[..., None], axis=-1)[..., 0]
  loss = -clipped_log(jnp.where(st.counted, q_c, 1.0), eps, False)
  return jnp.where(st.bad, jnp.nan, jnp.where(st.counted, loss, 0.0))


def _binary_terms(q, y, e, ls):
  y = smooth_binary(y, ls)
  w = 1.0 - y
  log_q = clipped_log(q, e, (y == 0) & (q == 0))
  log_r = clipped_log1m(q, e, (w == 0) & (q == 1))
  return y, w, log_q, log_r


@public(("eps", "label_smoothing"))
def binary_cross_entropy(
  probs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  eps: float | None = None,
  label_smoothing: float = 0.0,
) -> jax.Array:
  r"""Element-wise binary cross-entropy on probabilities.

  .. math::
    \begin{aligned}
    \ell(q, y) &= -\tilde y \log q - (1 - \tilde y) \log(1 - q), \\
    \tilde y &= (1 - \varepsilon)\, y + \varepsilon / 2, \qquad 0 \log 0 = 0,
    \end{aligned}

  with :math:`\log(1-q)` computed as ``log1p(-q)`` and :math:`\varepsilon` =
  ``label_smoothing`` (Keras's `BinaryCrossentropy` convention). The gradient
  with respect to ``probs`` is :math:`-\tilde y/q + (1-\tilde y)/(1-q)`.

  Args:
    probs: predicted probabilities of the positive class ``[...]`` (floating).
    labels: labels in ``{0, 1}`` or target probabilities, floating,
      broadcastable to ``probs``.
    eps: keyword-only opt-in clipping of ``probs`` to ``[eps, 1 - eps]`` (the
      Keras / scikit-learn behaviour), done on both logarithms in log space so
      that both sides are protected in every dtype (``1 - eps`` is never
      formed); None (default) does not clip.
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`.

  Returns:
    Loss with the shape of ``probs`` (float32 for 16-bit inputs).

  Note:
    No silent clipping: ``q = 0`` with ``y > 0`` (or ``q = 1`` with
    ``y < 1``) gives ``+inf``; ``q = 0`` with ``y = 0`` gives 0 with a finite
    gradient. Integer labels raise ``TypeError``.
  """
  q, y, ls = prepare_probs(probs, labels, label_smoothing)
  y, w, log_q, log_r = _binary_terms(q, y, eps, ls)
  return 0.0 - (y * log_q + w * log_r)


# Closed-form gradients with respect to the probabilities (re-exported by
# `xentjax.grads` under the loss names).


def _minus_y_over_q(y, q):
  """``-y / q``, 0 where ``y = 0``; ``1 / q`` as ``exp(-log q)``, finite for subnormal ``q``."""
  return jnp.where(y == 0, 0.0, -y * jnp.exp(-log_prob(jnp.where(y == 0, 1.0, q))))


@public_like(categorical_cross_entropy)
def categorical_cross_entropy_grad(probs, labels, axis, where, eps, label_smoothing):
  r"""Gradient of `xentjax.categorical_cross_entropy` w.r.t. the probabilities: :math:`-p/q`.

  Args:
    probs: predicted probabilities :math:`q`, ``[..., num_classes]``.
    labels: target probabilities :math:`p` broadcastable to ``probs``.
    axis: class axis, tuple of axes or None.
    where: elements to include.
    eps: keyword-only clipping bound (the gradient is 0 where ``probs`` is
      clipped).
    label_smoothing: keyword-only :math:`\varepsilon` (:math:`p` is smoothed).

  Returns:
    The gradient with the shape and dtype of ``probs``: 0 where :math:`p = 0`
    (even at :math:`q = 0`), :math:`-\infty` where :math:`p > 0 = q`.
  """
  out_dtype = jnp.asarray(probs).dtype
  q, y, ls = prepare_probs(probs, labels, label_smoothing)
  y, q, _, _, mask = categorical_terms(q, y, axis, where, eps, ls)
  g = jnp.where(inside_clip(q, eps), _minus_y_over_q(y, q), 0.0)
  if mask is not None:
    g = jnp.where(mask, g, 0.0)
  return g.astype(out_dtype)


@public_like(binary_cross_entropy)
def binary_cross_entropy_grad(probs, labels, eps, label_smoothing):
  r"""Gradient of `xentjax.binary_cross_entropy`: :math:`-y/q + (1-y)/(1-q)`.

  Args:
    probs: predicted probabilities ``[...]``.
    labels: labels or target probabilities broadcastable to ``probs``.
    eps: keyword-only clipping bound (gradient 0 where clipped).
    label_smoothing: keyword-only :math:`\varepsilon` (:math:`y` is smoothed).

  Returns:
    The gradient with the shape and dtype of ``probs``; a term whose label
    weight is 0 contributes 0 (even at :math:`q \in \{0, 1\}`).
  """
  out_dtype = jnp.asarray(probs).dtype
  q, y, ls = prepare_probs(probs, labels, label_smoothing)
  y = smooth_binary(y, ls)
  w = 1.0 - y
  g = _minus_y_over_q(y, q) + jnp.where(w == 0, 0.0, w / jnp.where(w == 0, 1.0, 1.0 - q))
  return jnp.where(inside_clip(q, eps), g, 0.0).astype(out_dtype)
