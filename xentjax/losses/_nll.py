"""Negative log-likelihood on log-probabilities, with PyTorch's `F.nll_loss` semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xentjax import _validation as V
from xentjax._api import public, where_mask
from xentjax._core import label_status, mean_or_nan


def _check_weight(weight, num_classes: int, dtype):
  if weight is None:
    return None
  V.check_floating("weight", weight, "a floating-point array (one weight per class)")
  w = jnp.asarray(weight)
  if w.shape != (num_classes,):
    raise ValueError(
      f"`weight` must have shape (num_classes,) = ({num_classes},), got weight.shape={w.shape}."
    )
  return w.astype(dtype)


def _check_ignore_index(ignore_index):
  if ignore_index is None:
    return None
  if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
    raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")
  return int(ignore_index)


@public(("ignore_index", "reduction", "axis"))
def nll_loss(
  log_probs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  weight: jax.typing.ArrayLike | None = None,
  ignore_index: int | None = -100,
  reduction: str = "mean",
  axis: int = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Negative log-likelihood of integer labels under given log-probabilities.

  PyTorch's ``torch.nn.functional.nll_loss`` with the classes on ``axis``
  (default -1; torch uses 1). With :math:`x` = ``log_probs`` and class weights
  :math:`w` (all ones when ``weight`` is None):

  .. math::
    L_i = -w_{y_i}\, x_{i, y_i}, \qquad
    \text{mean} = \frac{\sum_{i\ \text{counted}} L_i}{\sum_{i\ \text{counted}} w_{y_i}},

  where row :math:`i` counts unless its label equals ``ignore_index`` or its
  ``where`` entry is False. ``log_probs`` are used as given (typically
  ``jax.nn.log_softmax`` output; `softmax_cross_entropy_with_integer_labels`
  fuses the two).

  Args:
    log_probs: log-probabilities ``[..., num_classes]`` (floating).
    labels: integer class indices, the shape of ``log_probs`` without ``axis``.
    weight: keyword-only per-class weights ``[num_classes]`` (floating).
    ignore_index: keyword-only label value that does not count (-100, as in
      torch); None ignores nothing.
    reduction: keyword-only "mean", "sum" or "none".
    axis: keyword-only class axis of ``log_probs``.
    where: keyword-only mask (bool or integer 0/1) of the shape of ``labels``: rows to count.

  Returns:
    A scalar for "mean"/"sum"; for "none" the per-row losses (0 where a row
    does not count). Float32 for 16-bit inputs.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import xentjax as L
    >>> x = jax.nn.log_softmax(jnp.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]]))
    >>> print(f"{L.nll_loss(x, jnp.array([2, 0])):.4f}")
    0.4795

  Note:
    A counted label outside ``[0, num_classes)`` gives NaN (torch raises;
    `xentjax.check_labels` raises eagerly). When nothing counts, "mean" is NaN
    with a zero gradient (torch: NaN) and "sum" is 0.
  """
  V.check_floating("log_probs", log_probs)
  V.check_integer("labels", labels)
  reduction = V.check_reduction(reduction)
  ignore = _check_ignore_index(ignore_index)
  x = jnp.asarray(log_probs)
  x = jnp.moveaxis(x.astype(V.compute_dtype(x.dtype)), V.normalize_axis("axis", axis, x.ndim), -1)
  labels = jnp.asarray(labels)
  if tuple(labels.shape) != x.shape[:-1]:
    raise ValueError(
      "`labels` must have the shape of `log_probs` without the class axis: expected "
      f"{x.shape[:-1]}, got labels.shape={tuple(labels.shape)}."
    )
  if where is not None:
    where = jnp.broadcast_to(where_mask(where), labels.shape)
  st = label_status(labels, x.shape[-1], ignore_index=ignore, where=where)
  w = _check_weight(weight, x.shape[-1], x.dtype)
  w_y = jnp.ones(labels.shape, x.dtype) if w is None else w[st.index]
  w_y = jnp.where(st.counted, w_y, 0.0)
  x_y = jnp.take_along_axis(x, st.index[..., None], axis=-1)[..., 0]
  # 0 * log 0 = 0: a zero class weight on a -inf log-probability adds nothing.
  take = st.counted & (w_y != 0)
  loss = jnp.where(take, -w_y * jnp.where(take, x_y, 0.0), 0.0)
  loss = jnp.where(st.bad, jnp.nan, loss)
  if reduction == "none":
    return loss
  if reduction == "sum":
    return jnp.sum(loss)
  return mean_or_nan(jnp.sum(loss), jnp.sum(w_y))
