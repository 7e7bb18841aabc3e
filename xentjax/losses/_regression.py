"""Regression-style losses used alongside cross-entropy: squared error and cosine."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xentjax import _validation as V
from xentjax._api import Axis, class_axes, prepare_where, public, public_like


@public()
def squared_error(
  predictions: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Element-wise squared error (optax-compatible).

  .. math::
    \ell(x, t) = (x - t)^2.

  The Brier score of a classifier is ``squared_error(softmax(z), onehot).sum(-1)``.

  Args:
    predictions: predictions of any shape ``[...]`` (floating).
    targets: targets with the same shape, or None for zeros.

  Returns:
    Element-wise squared differences with the shape of ``predictions``;
    float32 for 16-bit inputs, else the promoted dtype.

  Note:
    Shapes must match exactly (no broadcasting), as in optax: a mismatch raises
    ``ValueError`` naming both shapes.
  """
  V.check_floating("predictions", predictions)
  x = jnp.asarray(predictions)
  if targets is None:
    return jnp.square(x.astype(V.compute_dtype(x.dtype)))
  t = jnp.asarray(targets)
  V.check_same_shape("predictions", x, "targets", t)
  dt = V.compute_dtype(x.dtype, t.dtype)  # 16-bit inputs: float32
  return jnp.square(x.astype(dt) - t.astype(dt))


@public(("axis",))
def cosine_similarity(
  predictions: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike = 0.0,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Cosine similarity between predictions and targets along ``axis``.

  .. math::
    \cos(a, b) = \frac{\sum_k a_k b_k}
      {\sqrt{\max(\|a\|^2, \epsilon)}\ \sqrt{\max(\|b\|^2, \epsilon)}}.

  Args:
    predictions: vectors ``[..., dim]`` (floating).
    targets: vectors with the same shape (floating).
    epsilon: keyword-only lower bound on each squared norm (as in optax).
    axis: keyword-only axis, tuple of axes or None.
    where: keyword-only elements to include (input shape or batch shape).

  Returns:
    Similarities ``[...]`` in ``[-1, 1]``; float32 for 16-bit inputs.

  Note:
    With ``epsilon=0`` a zero vector gives NaN (0/0), as in optax; pass a small
    ``epsilon`` to get 0 instead.
  """
  V.check_floating("predictions", predictions)
  V.check_floating("targets", targets)
  a = jnp.asarray(predictions)
  b = jnp.asarray(targets)
  V.check_same_shape("predictions", a, "targets", b)
  dt = V.compute_dtype(a.dtype, b.dtype)  # 16-bit inputs: float32
  a, b = a.astype(dt), b.astype(dt)
  axes = class_axes(axis, a.ndim)
  mask = prepare_where(where, a.shape, axis, axes)
  a_norm = jnp.sqrt(jnp.square(a).sum(axis=axes, where=mask, keepdims=True).clip(epsilon))
  b_norm = jnp.sqrt(jnp.square(b).sum(axis=axes, where=mask, keepdims=True).clip(epsilon))
  return ((a / a_norm) * (b / b_norm)).sum(axis=axes, where=mask)


@public_like(cosine_similarity)  # the same arguments, so one signature
def cosine_distance(predictions, targets, epsilon, axis, where) -> jax.Array:
  r"""Cosine distance, :math:`1 - \cos(a, b)` (see `cosine_similarity`).

  Args:
    predictions: vectors ``[..., dim]`` (floating).
    targets: vectors with the same shape (floating).
    epsilon: keyword-only lower bound on each squared norm.
    axis: keyword-only axis, tuple of axes or None.
    where: keyword-only elements to include.

  Returns:
    Distances ``[...]`` in ``[0, 2]``.

  Note:
    NaN for a zero vector with ``epsilon=0``, as in `cosine_similarity`.
  """
  return 1.0 - cosine_similarity(predictions, targets, epsilon=epsilon, axis=axis, where=where)
