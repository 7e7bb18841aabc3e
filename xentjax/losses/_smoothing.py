"""Label smoothing (optax-compatible)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from xentjax import _validation as V
from xentjax._api import ArrayLike, Axis, Mask, class_axes, prepare_where, public, real_option


def _check_alpha(alpha):
  """A Python number must lie in [0, 1]; an array is used as given (it may be traced)."""
  if isinstance(alpha, (str, bytes)) or (
    isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
  ):
    real_option("alpha", alpha, low=0.0, high=1.0)
  return alpha


@public(("axis",), validators={"alpha": _check_alpha})
def smooth_labels(
  labels: ArrayLike, alpha: ArrayLike, *, axis: Axis = -1, where: Mask = None
) -> jax.Array:
  r"""Mix probability labels with the uniform distribution over the classes.

  .. math::
    \tilde y = (1 - \alpha)\, y + \alpha / K,

  with :math:`K` the number of classes along ``axis`` (with ``where``: the
  number of included classes of each row). This is the convention of
  PyTorch's and Keras's ``label_smoothing`` and the one the
  ``label_smoothing=`` option of `softmax_cross_entropy` applies.

  Args:
    labels: one-hot or soft labels ``[..., num_classes]`` (floating).
    alpha: the smoothing factor; a Python number must lie in ``[0, 1]`` (an
      array is used as given).
    axis: keyword-only class axis, tuple of axes or None (every axis).
    where: keyword-only elements to include; :math:`K` counts them per row.
      Excluded entries are returned smoothed too (as in optax); the losses
      ignore them.

  Returns:
    Smoothed labels with the shape of ``labels`` (the promoted dtype of
    ``labels`` and ``alpha``).

  Note:
    A row with every class excluded by ``where`` has :math:`K = 0`, and its
    entries are ``inf``/NaN, as in optax.

  References:
    Szegedy et al., Rethinking the Inception Architecture for Computer Vision,
    2016. Mueller, Kornblith and Hinton, When does label smoothing help?, 2019.
  """
  V.check_floating("labels", labels)
  labels = jnp.asarray(labels)
  axes = class_axes(axis, labels.ndim)
  k: int | jax.Array
  if where is None:
    k = math.prod(labels.shape[a] for a in axes)
  else:
    mask = prepare_where(where, labels.shape, axis, axes)
    k = jnp.sum(mask, axis=axes, keepdims=True).astype(labels.dtype)
  return jnp.asarray((1.0 - alpha) * labels + alpha / k)
