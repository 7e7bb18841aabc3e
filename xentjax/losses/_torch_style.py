"""Cross-entropy with PyTorch's semantics, and an eager label-range check.

`cross_entropy_loss` reproduces `torch.nn.functional.cross_entropy` (values
and gradients) for integer and probability targets, class weights,
`ignore_index`, label smoothing and the three reductions, with the class axis
at `axis` (default -1) instead of torch's axis 1. Its numbers come from the
one softmax-statistics core (`xentjax._core`): a "mean" over nothing (every
target ignored) is NaN, as in torch, but with a zero gradient.

Label ranges cannot be checked inside `jit` (values are not known at trace
time), so an out-of-range label makes the loss NaN; `check_labels` raises
eagerly for callers who prefer an exception.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from xentjax import _core
from xentjax import _validation as V
from xentjax._api import int_option, public


def _check_targets(logits: jax.Array, targets: jax.Array, axis: int) -> bool:
  """Validate `targets` against `logits`; return True for integer class indices."""
  dt = targets.dtype
  batch_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
  if jnp.issubdtype(dt, jnp.integer):
    if targets.shape != batch_shape:
      hint = (
        " Integer targets are class indices; probability targets must have a floating dtype."
        if targets.shape == logits.shape
        else ""
      )
      raise ValueError(
        "`targets` of integer dtype (class indices) must have the shape of "
        f"`logits` without the class axis {axis}: expected {batch_shape}, got "
        f"targets.shape={targets.shape} (logits.shape={logits.shape}).{hint}"
      )
    return True
  if jnp.issubdtype(dt, jnp.floating):
    if targets.shape != logits.shape:
      hint = (
        " Floating targets are probabilities over the classes; for class "
        "indices use an integer dtype."
        if targets.shape == batch_shape
        else ""
      )
      raise ValueError(
        "`targets` of floating dtype (class probabilities) must have the shape "
        f"of `logits`: expected {logits.shape}, got targets.shape={targets.shape}."
        f"{hint}"
      )
    return False
  raise TypeError(
    "`targets` must be integer class indices or floating-point class "
    f"probabilities, got dtype {dt} with shape {targets.shape}."
  )


def _check_weight(weight, num_classes: int) -> jax.Array:
  weight = jnp.asarray(weight)
  if not jnp.issubdtype(weight.dtype, jnp.floating):
    raise TypeError(
      "`weight` must be a floating-point array of per-class weights, got dtype "
      f"{weight.dtype} with shape {weight.shape}."
    )
  if weight.shape != (num_classes,):
    raise ValueError(
      f"`weight` must have shape (num_classes,) = ({num_classes},), got "
      f"weight.shape={weight.shape}."
    )
  return weight


@public(
  ("ignore_index", "reduction", "label_smoothing", "axis"),
  validators={"axis": lambda v: int_option("axis", v)},
)
def cross_entropy_loss(
  logits: ArrayLike,
  targets: ArrayLike,
  *,
  weight: ArrayLike | None = None,
  ignore_index: int | None = -100,
  reduction: str = "mean",
  label_smoothing: float = 0.0,
  axis: int = -1,
) -> jax.Array:
  r"""Cross-entropy with the semantics of `torch.nn.functional.cross_entropy`.

  With :math:`\ell = \log\mathrm{softmax}(z)` over the class axis, :math:`C`
  classes, class weights :math:`w` (all ones when `weight` is None) and label
  smoothing :math:`\varepsilon`:

  Integer targets :math:`y_i` (class indices); example :math:`i` is kept unless
  :math:`y_i` equals `ignore_index`:

  .. math::

    L_i = (1 - \varepsilon)\, w_{y_i} (-\ell_{i, y_i})
      + \frac{\varepsilon}{C} \sum_c w_c (-\ell_{i, c}),
    \qquad
    \text{mean} = \frac{\sum_{i\,\text{kept}} L_i}{\sum_{i\,\text{kept}} w_{y_i}}

  Probability targets :math:`t_i` (same shape as the logits), smoothed to
  :math:`t' = (1 - \varepsilon)\, t + \varepsilon / C`:

  .. math::

    L_i = -\sum_c w_c\, t'_{i, c}\, \ell_{i, c},
    \qquad
    \text{mean} = \frac{1}{N} \sum_i L_i

  where :math:`N` is the number of examples (all batch positions; weights do
  not enter the denominator). "sum" is :math:`\sum_i L_i` (ignored examples
  contribute 0) and "none" returns :math:`L_i` (0 at ignored positions).

  Args:
    logits: unnormalized scores ``[..., num_classes, ...]`` with the classes on
      `axis`; floating dtype.
    targets: either integer class indices with the shape of `logits` minus the
      class axis, or floating class probabilities with the shape of `logits`.
      The dtype decides which.
    weight: optional per-class weights ``[num_classes]`` (floating).
    ignore_index: integer targets equal to this value are ignored (their loss
      and gradient are 0 and they leave the "mean" denominator), also when it
      names a valid class. None ignores nothing. Probability targets accept
      only the default -100 or None (torch raises for anything else too).
    reduction: "mean", "sum" or "none".
    label_smoothing: :math:`\varepsilon \in [0, 1]`.
    axis: the class axis of `logits` (torch uses 1; here the default is -1).

  Returns:
    A scalar for "mean" and "sum"; for "none" the per-example losses with the
    shape of `logits` minus the class axis. The dtype is float32 for 16-bit
    inputs (computed in float32), else the promoted floating dtype of `logits`,
    floating `targets` and `weight`.

  Raises:
    TypeError: non-floating `logits` or `weight`; `targets` neither integer nor
      floating.
    ValueError: shapes that do not fit (the message shows them), an unknown
      `reduction`, `label_smoothing` outside [0, 1], `axis` out of range.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> logits = jnp.array([[-3.44, 1.16, 3.91]])
    >>> print(f"{xentjax.cross_entropy_loss(logits, jnp.array([2])):.4f}")
    0.0626

  Note:
    * An integer target outside ``[0, num_classes)`` that is not
      `ignore_index` makes its loss NaN (and so the "mean"/"sum" and the
      gradient NaN), where torch raises; nothing can raise inside `jit`. Use
      `xentjax.check_labels` to raise eagerly.
    * When the "mean" denominator is 0 (every target ignored, an empty batch,
      or zero weight on every present class) the result is NaN, as in torch,
      with a zero gradient (nothing was counted).
    * A probability target or class weight of exactly 0 contributes 0 even
      where the logit is -inf (0·log 0 = 0); torch returns NaN there. A row
      whose logits are all -inf has loss +inf (zero gradient); ignored, it
      contributes 0 and a zero gradient.
  """
  z, targets, w, is_index = _torch_inputs(logits, targets, weight, ignore_index, axis)
  if is_index:
    loss, denom = _index_losses(z, targets, w, ignore_index, label_smoothing)
  else:
    loss, denom = _probability_losses(z, targets, w, label_smoothing)
  if reduction == "none":
    return loss
  total = jnp.sum(loss)
  return total if reduction == "sum" else _core.mean_or_nan(total, denom)


def _torch_inputs(logits, targets, weight, ignore_index, axis):
  """Checked ``(z [..., C] in the compute dtype, targets, weight or None, is_index)``."""
  V.check_floating("logits", logits)
  logits = jnp.asarray(logits)
  targets = jnp.asarray(targets)
  if logits.ndim == 0:
    raise ValueError(
      "`logits` needs a class axis, got a scalar (logits.shape=()). Pass "
      "shape [num_classes] or [..., num_classes]."
    )
  axis = V.normalize_axis("axis", axis, logits.ndim)
  is_index = _check_targets(logits, targets, axis)
  if not is_index and ignore_index not in (None, -100):
    raise ValueError(
      f"`ignore_index`={ignore_index} applies only to integer class-index targets; "
      f"got probability targets (dtype {targets.dtype}, shape {targets.shape}). "
      "Leave it at the default -100 (or None), as torch requires."
    )
  dtypes = [logits.dtype]
  if weight is not None:
    weight = _check_weight(weight, logits.shape[axis])
    dtypes.append(weight.dtype)
  if not is_index:
    dtypes.append(targets.dtype)
    targets = jnp.moveaxis(targets, axis, -1)
  dt = V.compute_dtype(*dtypes)
  z = jnp.moveaxis(logits.astype(dt), axis, -1)
  w = None if weight is None else weight.astype(dt)
  return z, targets, w, is_index


def _uniform_part(z, shifted, m, log_s, w):
  r"""``-(1/C) sum_c w_c log softmax(z)_c`` (``w = 1`` when None): the smoothing term."""
  c = z.shape[-1]
  if w is None:
    return _core.xent(log_s, 1.0, _core.mean_shifted(z, shifted, m, None))
  return _core.xent(
    log_s, jnp.sum(w) / c, _core.target_dot(shifted, jnp.broadcast_to(w / c, z.shape))
  )


def _index_losses(z, labels, w, ignore_index, eps):
  """Per-row losses and the "mean" denominator (sum of the counted rows' ``w_y``)."""
  status = _core.label_status(labels, z.shape[-1], ignore_index=ignore_index)
  z = _core.neutral_rows(z, status.counted)  # ignored rows: exactly 0, zero gradient
  st = _core.row_stats(z, status.index)
  w_y = jnp.ones(labels.shape, z.dtype) if w is None else w[status.index]
  # w_y * (log_s - zy) with 0 * inf = 0: a zero-weight class adds nothing.
  label_part = _core.xent(st.log_s, 1.0, st.zy)
  label_part = jnp.where(w_y == 0, 0.0, w_y * jnp.where(w_y == 0, 0.0, label_part))
  loss = _mix(label_part, eps, lambda: _uniform_part(z, *_core.shifted_logits(z), st.log_s, w))
  # A bad label is NaN in its value, the reductions and the gradient.
  loss = loss * jnp.where(status.bad, jnp.nan, 1.0).astype(loss.dtype)
  loss = jnp.where(status.counted, loss, jnp.zeros((), loss.dtype))
  w_y = jnp.where(status.bad, jnp.nan, w_y)
  return loss, jnp.sum(jnp.where(status.counted, w_y, jnp.zeros((), w_y.dtype)))


def _probability_losses(z, t, w, eps):
  """Per-row losses ``-sum_c w_c t'_c log softmax(z)_c`` and the denominator N (rows)."""
  t = t.astype(z.dtype)
  shifted, m = _core.shifted_logits(z)
  log_s = _core.log_sum_exp_shifted(shifted)
  tw = t if w is None else t * jnp.broadcast_to(w, t.shape)
  loss = _core.xent(log_s, jnp.sum(tw, axis=-1), _core.target_dot(shifted, tw))
  loss = _mix(loss, eps, lambda: _uniform_part(z, shifted, m, log_s, w))
  return loss, jnp.asarray(loss.size, z.dtype)


def _mix(target_part, eps: float, uniform_part):
  """``(1 - eps) target + eps uniform``, leaving out a term whose weight is 0 (no 0 * inf)."""
  if eps == 0.0:
    return target_part
  if eps == 1.0:
    return uniform_part()
  return (1.0 - eps) * target_part + eps * uniform_part()


def check_labels(
  labels: ArrayLike, num_classes: int, *, ignore_index: int | None = None
) -> ArrayLike:
  """Raise eagerly unless every label lies in ``[0, num_classes)``.

  The losses cannot raise inside `jit` and give NaN for an out-of-range label;
  call this on concrete labels (outside `jit`, e.g. in the data pipeline)
  to get an exception that names the first offending position instead.

  Args:
    labels: integer class indices, any shape; must be concrete (not traced).
    num_classes: the number of classes, a positive int.
    ignore_index: a value that is allowed besides the valid classes (such as
      torch's -100); None allows nothing else.

  Returns:
    `labels`, unchanged (the same object), so the call can be inlined.

  Raises:
    TypeError: `labels` not of integer dtype, or traced inside `jit`/`grad`.
    ValueError: a label out of range; the message gives its index, its value
      and how many labels are out of range in total.

  Example:
    >>> import numpy as np, xentjax
    >>> xentjax.check_labels(np.array([0, 2, -100]), 3, ignore_index=-100)
    array([   0,    2, -100])
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
    raise TypeError(f"`num_classes` must be a positive int, got {num_classes!r}.")
  if num_classes < 1:
    raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}.")
  if isinstance(labels, jax.core.Tracer):
    raise TypeError(
      "check_labels needs concrete labels but got a traced value (inside jit, "
      "grad or vmap). Call it outside the transformed function; inside, an "
      "out-of-range label makes the loss NaN."
    )
  arr = np.asarray(labels)
  V.check_integer("labels", arr)
  bad = (arr < 0) | (arr >= num_classes)
  if ignore_index is not None:
    bad &= arr != ignore_index
  if np.any(bad):
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f"labels[{', '.join(map(str, first))}]" if first else "labels"
    allowed = f"0..{num_classes - 1}"
    if ignore_index is not None:
      allowed += f" or ignore_index={ignore_index}"
    raise ValueError(
      f"{where} = {int(arr[first])} is out of range for num_classes="
      f"{num_classes} (allowed: {allowed}); {int(np.sum(bad))} of {arr.size} "
      "labels are out of range."
    )
  return labels
