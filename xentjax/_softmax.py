"""Softmax cross-entropy and Kullback-Leibler losses (optax-compatible, safe).

Every function here takes the same positional and keyword arguments as its
namesake in `optax.losses` and returns the same per-example values wherever
optax returns a finite number. Where optax returns NaN (a `-inf` logit on a
class with zero target mass, a zero target in `kl_divergence`), these return
the mathematically correct finite value and a finite gradient.

Layout: the class axis (or axes) is moved to the end and flattened to one axis
of size ``K`` before anything is computed, so one code path serves an int
`axis`, a tuple of axes and ``axis=None``; the result has the remaining
(batch) shape. 16-bit floating inputs are computed, and returned, in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xentjax import _validation as V

Axis = int | tuple[int, ...] | None


def _jit_public(*static_argnames: str):
  """Compile a public loss as one XLA program per input signature.

  Argument checks still run, at trace time, on shapes, dtypes and the static
  (Python) options; an eager call then costs one compilation instead of one
  per primitive. A list `axis` is turned into a tuple so it can be static.
  """

  def deco(fn):
    jitted = jax.jit(fn, static_argnames=static_argnames)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      # Nested Python sequences as array arguments become NumPy arrays (jit
      # would otherwise trace each element); `axis` stays a (hashable) tuple.
      args = list(args)
      for i in range(min(len(args), 4)):
        if i == 2:
          if isinstance(args[i], list):
            args[i] = tuple(args[i])
        elif isinstance(args[i], (list, tuple)):
          args[i] = np.asarray(args[i])
      for name, value in kwargs.items():
        if name == "axis" and isinstance(value, list):
          kwargs[name] = tuple(value)
        elif name != "axis" and isinstance(value, (list, tuple)):
          kwargs[name] = np.asarray(value)
      return jitted(*args, **kwargs)

    return wrapper

  return deco


# ---------------------------------------------------------------------------
# Layout helpers (shared with `_probability`, `_regression` and `grads`).
# ---------------------------------------------------------------------------


def _class_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
  """The class axes as a tuple of non-negative ints (None: every axis)."""
  if axis is None:
    return tuple(range(ndim))
  if isinstance(axis, (int, np.integer)):
    return (V.normalize_axis("axis", int(axis), ndim),)
  if isinstance(axis, (tuple, list)):
    axes = V.normalize_axis("axis", tuple(int(a) for a in axis), ndim)
    if len(set(axes)) != len(axes):
      raise ValueError(f"`axis`={axis} repeats an axis.")
    return axes
  raise TypeError(f"`axis` must be an int, a tuple of ints or None, got {axis!r}.")


def _to_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Move `axes` to the end (in the given order) and flatten them into one."""
  batch = tuple(i for i in range(x.ndim) if i not in axes)
  x = jnp.transpose(x, batch + axes)
  k = math.prod(x.shape[len(batch) :])
  return x.reshape(x.shape[: len(batch)] + (k,))


def _prepare_where(where, shape: tuple[int, ...], axis: Axis, axes, name="where"):
  """`where` as a bool mask of `shape` (optax: a batch-shaped mask gets the class axes)."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    where = where.astype(bool)
  if where.ndim != len(shape):
    if axis is None:
      raise ValueError(
        f"`{name}` must have the shape of the input when axis=None, got "
        f"{name}.shape={where.shape} and input shape {shape}."
      )
    where = jnp.expand_dims(where, axes)
  try:
    out = np.broadcast_shapes(where.shape, shape)
  except ValueError:
    out = None
  if out != tuple(shape):
    raise ValueError(
      f"`{name}` must broadcast to the input shape {tuple(shape)} (or to its batch "
      f"shape without the class axes), got {name}.shape={where.shape}."
    )
  return jnp.broadcast_to(where, shape)


def _broadcast_to_first(name_a, a, name_b, b) -> jax.Array:
  """Broadcast `b` to `a`'s shape, with a message naming both when impossible."""
  sa, sb = tuple(a.shape), tuple(np.shape(b))
  try:
    out = np.broadcast_shapes(sa, sb)
  except ValueError:
    out = None
  if out != sa:
    raise ValueError(
      f"`{name_b}` must have the shape of `{name_a}` (or broadcast to it), got "
      f"{name_a}.shape={sa} and {name_b}.shape={sb}."
    )
  return jnp.broadcast_to(b, sa)


def _check_float_labels(name: str, labels) -> None:
  dt = jnp.asarray(labels).dtype if not hasattr(labels, "dtype") else labels.dtype
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
      f"`{name}` must hold probabilities (a floating-point array with the shape "
      f"of the logits), got dtype {dt} with shape {np.shape(labels)}. For integer "
      "class indices use `softmax_cross_entropy_with_integer_labels`."
    )


def _masked_log_softmax(z: jax.Array, mask: jax.Array | None):
  """Shifted logits and log-normalizer over the last axis, excluding masked entries.

  Returns ``(shifted, log_s, m)`` with ``shifted = z - m`` (masked entries
  ``-inf``), ``log_s = log sum exp(shifted)`` and ``m`` the row maximum, so
  that ``log softmax(z) = shifted - log_s`` and ``logsumexp(z) = log_s + m``
  (``log_s`` and ``m`` have shape ``[..., 1]``). ``m`` is held under
  `stop_gradient`; a row with nothing to normalize (all masked or ``-inf``)
  gets ``log_s = -inf``. The log is guarded by a `where` on both sides, so no
  untaken branch can put a NaN into the gradient.
  """
  if mask is not None:
    z = jnp.where(mask, z, -jnp.inf)
  m = jnp.max(z, axis=-1, keepdims=True, initial=-jnp.inf)
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  shifted = z - m
  s = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
  empty = s == 0  # (NaN is not empty: it must reach the output)
  log_s = jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, s)))
  return shifted, log_s, m


# ---------------------------------------------------------------------------
# Softmax cross-entropy with probability (one-hot or soft) labels.
# ---------------------------------------------------------------------------


def _dense_prepare(logits, labels, axis, where):
  V.check_floating("logits", logits)
  _check_float_labels("labels", labels)
  logits = jnp.asarray(logits)
  labels = _broadcast_to_first("logits", logits, "labels", jnp.asarray(labels))
  dt = V.compute_dtype(logits.dtype, labels.dtype)
  axes = _class_axes(axis, logits.ndim)
  mask = _prepare_where(where, logits.shape, axis, axes)
  z = _to_last(logits.astype(dt), axes)
  y = _to_last(labels.astype(dt), axes)
  mask = None if mask is None else _to_last(mask, axes)
  return z, y, mask


def _smooth(y, mask, eps: float):
  """(1 - eps) * y + eps / K over the (unmasked) classes of the last axis."""
  if eps == 0.0:
    return y
  if mask is None:
    return (1.0 - eps) * y + eps / y.shape[-1]
  k = jnp.sum(mask, axis=-1, keepdims=True).astype(y.dtype)
  return jnp.where(mask, (1.0 - eps) * y + eps / jnp.maximum(k, 1.0), 0.0)


def _dense_ce(z, y, mask, label_smoothing: float, z_loss: float):
  """Per-row loss for logits/labels laid out as ``[..., K]``."""
  y = _smooth(y, mask, label_smoothing)
  shifted, log_s, m = _masked_log_softmax(z, mask)
  logp = shifted - log_s
  # 0 * log 0 = 0: a class with no target mass and probability 0 adds nothing,
  # and the where is on the inside so the untaken branch leaves no NaN.
  drop = (y == 0) & ~jnp.isfinite(logp)
  if mask is not None:
    drop = drop | ~mask
  logp = jnp.where(drop, 0.0, logp)
  loss = -jnp.sum(y * logp, axis=-1)
  if z_loss:
    lse = (log_s + m)[..., 0]
    if mask is not None:
      lse = jnp.where(jnp.any(mask, axis=-1), lse, 0.0)
    loss = loss + z_loss * jnp.square(lse)
  return loss


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
  r"""Softmax cross-entropy between logits and probability labels (safe).

  A drop-in replacement for `optax.losses.softmax_cross_entropy` that is also
  safe: a class with zero target mass contributes nothing even when its logit
  is ``-inf`` (optax returns NaN there).

  .. math::
    \ell(z, y) = -\sum_k \tilde y_k \log \operatorname{softmax}(z)_k
      + \lambda \big(\log \textstyle\sum_k e^{z_k}\big)^2,
    \qquad \tilde y = (1 - \varepsilon)\, y + \varepsilon / K,

  with :math:`0 \log 0 = 0`, :math:`K` the number of (unmasked) classes,
  :math:`\varepsilon` = ``label_smoothing`` and :math:`\lambda` = ``z_loss``.
  The gradient with respect to the logits is
  :math:`\operatorname{softmax}(z) \sum_k \tilde y_k - \tilde y
  + 2 \lambda \log Z \operatorname{softmax}(z)` (see `xentjax.grads`).

  Args:
    logits: unnormalized log-probabilities, ``[..., num_classes]`` (floating).
    labels: target probabilities (one-hot or soft), floating, with the shape of
      ``logits`` or a shape that broadcasts to it.
    axis: class axis, tuple of class axes, or None (every axis).
    where: elements to include: the shape of ``logits``, or the batch shape (it
      is then expanded along ``axis``).
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`: mix the labels
      with the uniform distribution, :math:`(1-\varepsilon) y + \varepsilon/K`
      (the PyTorch/Keras convention).
    z_loss: keyword-only :math:`\lambda \ge 0`; adds :math:`\lambda (\log Z)^2`
      per example (PaLM's z-loss).

  Returns:
    Per-example loss with the batch shape ``[...]`` (``logits`` without the
    class axes); dtype float32 for 16-bit inputs, else the promoted dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import xentjax as L
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> with jnp.printoptions(precision=4):
    ...   print(L.softmax_cross_entropy(logits, labels))
    [0.2761 2.9518]

  Note:
    ``-inf`` logit on a class with zero label mass: that class contributes 0
    and its gradient is 0. ``-inf`` logit on a class with positive mass: the
    loss is ``+inf`` (the true value) and the gradient with respect to the
    logits stays finite. A row whose classes are all masked by ``where`` gives 0
    with a zero gradient. NaN or ``+inf`` logits propagate as NaN.
    Integer ``labels`` raise ``TypeError`` (class indices belong to
    `softmax_cross_entropy_with_integer_labels`; one-hot labels must be
    floating).

  References:
    Szegedy et al., Rethinking the Inception Architecture for Computer Vision
    (label smoothing), 2016. Chowdhery et al., PaLM: Scaling Language Modeling
    with Pathways (z-loss), 2022.
  """
  eps = V.check_label_smoothing(label_smoothing)
  lam = V.check_nonnegative("z_loss", z_loss)
  z, y, mask = _dense_prepare(logits, labels, axis, where)
  return _dense_ce(z, y, mask, eps, lam)


@_jit_public()
def safe_softmax_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Softmax cross-entropy with :math:`0 \log 0 = 0` (optax's safe variant).

  Kept for compatibility with `optax.losses.safe_softmax_cross_entropy`; in
  xentjax `softmax_cross_entropy` is already safe and this is the same function
  over the last axis.

  .. math::
    \ell(z, y) = -\sum_k y_k \log \operatorname{softmax}(z)_k,
    \quad 0 \cdot \log 0 = 0.

  Args:
    logits: unnormalized log-probabilities, ``[..., num_classes]``.
    labels: target probabilities broadcastable to ``[..., num_classes]``.

  Returns:
    Per-example loss ``[...]`` (float32 for 16-bit inputs).

  Note:
    Same edge cases as `softmax_cross_entropy`: ``-inf`` logits on zero-mass
    classes give a finite value and gradient; on a class with mass, ``+inf``.
  """
  return softmax_cross_entropy(logits, labels)


# ---------------------------------------------------------------------------
# Softmax cross-entropy with integer labels (no one-hot).
# ---------------------------------------------------------------------------


def _sparse_prepare(logits, labels, axis, where):
  V.check_floating("logits", logits)
  V.check_integer("labels", labels)
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if axis is None:
    raise TypeError("`axis` must be an int or a tuple of ints for integer labels, got None.")
  axes = _class_axes(axis, logits.ndim)
  batch_shape = tuple(d for i, d in enumerate(logits.shape) if i not in axes)
  if tuple(labels.shape) != batch_shape:
    raise ValueError(
      "`labels` must have the shape of `logits` without the class axes "
      f"{axes}: expected {batch_shape}, got labels.shape={tuple(labels.shape)} "
      f"(logits.shape={tuple(logits.shape)})."
    )
  mask = _prepare_where(where, logits.shape, axis, axes)
  dt = V.compute_dtype(logits.dtype)
  z = _to_last(logits.astype(dt), axes)
  mask = None if mask is None else _to_last(mask, axes)
  return z, labels, mask


def _sparse_ce(z, labels, mask, label_smoothing: float, z_loss: float):
  """Per-row loss for logits ``[..., K]`` and labels ``[...]``."""
  k = z.shape[-1]
  valid = (labels >= 0) & (labels < k)
  idx = jnp.where(valid, labels, 0)
  z_y = jnp.take_along_axis(z, idx[..., None].astype(jnp.int32), axis=-1)[..., 0]
  _, log_s, m = _masked_log_softmax(z, mask)
  log_s, m = log_s[..., 0], m[..., 0]
  lse = log_s + m
  # log Z - z_y computed as log(sum exp(z - m)) - (z_y - m): the same arithmetic
  # as the dense path, so integer and one-hot labels agree to the last bit.
  loss = log_s - (z_y - m)
  if label_smoothing:
    if mask is None:
      mean_z = jnp.mean(z, axis=-1)
    else:
      cnt = jnp.sum(mask, axis=-1).astype(z.dtype)
      mean_z = jnp.sum(jnp.where(mask, z, 0.0), axis=-1) / jnp.maximum(cnt, 1.0)
    uniform = lse - mean_z
    loss = (1.0 - label_smoothing) * loss + label_smoothing * uniform
  if z_loss:
    lz = lse
    if mask is not None:
      lz = jnp.where(jnp.any(mask, axis=-1), lz, 0.0)
    loss = loss + z_loss * jnp.square(lz)
  # Out-of-range labels poison the row (value and gradient), never a finite
  # number; a fully masked row is ignored whatever its label.
  if mask is None:
    return loss * jnp.where(valid, 1.0, jnp.nan).astype(loss.dtype)
  row_has = jnp.any(mask, axis=-1)
  loss = loss * jnp.where(valid | ~row_has, 1.0, jnp.nan).astype(loss.dtype)
  return jnp.where(row_has, loss, 0.0)


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
  r"""Softmax cross-entropy between logits and integer class labels.

  A drop-in replacement for
  `optax.losses.softmax_cross_entropy_with_integer_labels`. No one-hot is
  built: the loss is the log-normalizer minus the logit of the true class,

  .. math::
    \ell(z, c) = (1 - \varepsilon)\,(\log Z - z_c)
      + \varepsilon\,\big(\log Z - \tfrac{1}{K}\textstyle\sum_k z_k\big)
      + \lambda (\log Z)^2,
    \qquad \log Z = \log \textstyle\sum_k e^{z_k},

  which equals `softmax_cross_entropy` with the smoothed one-hot target
  :math:`(1-\varepsilon)\,\mathrm{onehot}(c) + \varepsilon/K`.

  Args:
    logits: unnormalized log-probabilities ``[..., num_classes]`` (floating).
    labels: integer class indices with the shape of ``logits`` without the
      class axes (``[...]``). With a tuple ``axis`` a label is a flat
      (row-major) index into the slice ``logits[axis]``.
    axis: class axis or tuple of class axes.
    where: elements to include: the shape of ``logits`` or the batch shape.
      The true-class logit is read even when it is masked (as in optax).
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]` (PyTorch and
      Keras convention), applied without building a one-hot.
    z_loss: keyword-only :math:`\lambda \ge 0` (PaLM's z-loss).

  Returns:
    Per-example loss ``[...]``; float32 for 16-bit logits, else the logits
    dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import xentjax as L
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> with jnp.printoptions(precision=4):
    ...   print(L.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])))
    [0.2761 2.9518]

  Note:
    A label outside ``[0, num_classes)`` (negative included) makes that
    example's value and gradient NaN, never a silently finite number; use
    `xentjax.check_labels` for an eager error. A row whose classes are all
    masked by ``where`` gives 0 with a zero gradient (even with an invalid
    label: it is ignored). ``-inf`` on a wrong class is fine (finite value and
    gradient); ``-inf`` on the true class gives ``+inf`` with a finite
    gradient.
  """
  eps = V.check_label_smoothing(label_smoothing)
  lam = V.check_nonnegative("z_loss", z_loss)
  z, labels, mask = _sparse_prepare(logits, labels, axis, where)
  return _sparse_ce(z, labels, mask, eps, lam)


@_jit_public("axis")
def poly_loss_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  epsilon: jax.typing.ArrayLike = 2.0,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Poly-1 loss: cross-entropy plus :math:`\epsilon` times the first Taylor term.

  .. math::
    \ell(z, y) = -\sum_k y_k \log p_k + \epsilon \sum_k y_k (1 - p_k),
    \qquad p = \operatorname{softmax}(z).

  For one-hot labels the second term is :math:`\epsilon (1 - p_t)`.

  Args:
    logits: unnormalized log-probabilities ``[..., num_classes]``.
    labels: target probabilities, floating, broadcastable to ``logits``.
    epsilon: coefficient of the first polynomial term (2.0 in the paper for
      ImageNet, -1.0 for detection).
    axis: class axis, tuple of axes or None.
    where: elements to include (the shape of ``logits`` or the batch shape).

  Returns:
    Per-example loss ``[...]`` (float32 for 16-bit inputs).

  Note:
    Safe like `softmax_cross_entropy`: ``-inf`` logits on zero-mass classes
    contribute 0 to both terms; all-masked rows give 0 with a zero gradient.

  References:
    Leng et al., PolyLoss: A Polynomial Expansion Perspective of Classification
    Loss Functions, ICLR 2022.
  """
  z, y, mask = _dense_prepare(logits, labels, axis, where)
  ce = _dense_ce(z, y, mask, 0.0, 0.0)
  shifted, log_s, _ = _masked_log_softmax(z, mask)
  logp = shifted - log_s
  keep = jnp.isfinite(logp) if mask is None else (jnp.isfinite(logp) & mask)
  p = jnp.exp(jnp.where(keep, logp, -jnp.inf))
  y = y if mask is None else jnp.where(mask, y, 0.0)
  one_minus_pt = jnp.sum(y * (1.0 - p), axis=-1)
  return ce + jnp.asarray(epsilon, ce.dtype) * one_minus_pt


# ---------------------------------------------------------------------------
# Kullback-Leibler divergence.
# ---------------------------------------------------------------------------


def _kl_prepare(log_predictions, targets, axis, where, target_name):
  V.check_floating("log_predictions", log_predictions)
  V.check_floating(target_name, targets)
  lp = jnp.asarray(log_predictions)
  t = jnp.asarray(targets)
  V.check_broadcastable("log_predictions", lp, target_name, t)
  shape = np.broadcast_shapes(lp.shape, t.shape)
  dt = V.compute_dtype(lp.dtype, t.dtype)
  lp = jnp.broadcast_to(lp.astype(dt), shape)
  t = jnp.broadcast_to(t.astype(dt), shape)
  axes = _class_axes(axis, len(shape))
  mask = _prepare_where(where, shape, axis, axes)
  return lp, t, mask, axes


@_jit_public("axis")
def kl_divergence(
  log_predictions: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Kullback-Leibler divergence of predictions from targets, safe at zero targets.

  .. math::
    D_{\mathrm{KL}}(t \,\|\, q) = \sum_k t_k (\log t_k - \log q_k),
    \qquad 0 \cdot (\log 0 - \log q) = 0 \text{ for every } q,

  where ``log_predictions`` holds :math:`\log q`.

  Args:
    log_predictions: log-probabilities of the predicted distribution
      ``[..., num_classes]``.
    targets: probabilities of the target distribution, same (broadcastable)
      shape.
    axis: class axis, tuple of axes or None.
    where: elements to include (the input shape or the batch shape).

  Returns:
    Per-example divergence ``[...]`` in nats (float32 for 16-bit inputs).

  Note:
    A zero target contributes 0 to the value and to both gradients, even when
    the prediction is ``-inf`` (optax returns NaN there). A positive target
    whose prediction is ``-inf`` gives ``+inf``. Negative targets give NaN.
  """
  lp, t, mask, axes = _kl_prepare(log_predictions, targets, axis, where, "targets")
  # A subnormal target counts as 0 (its term is below 1e-36): XLA flushes it in
  # some ops and not others, so `t == 0` alone disagreed between value and gradient.
  zero = (t >= 0) & (t < jnp.finfo(t.dtype).tiny)
  if mask is not None:
    zero = zero | ~mask
  t_safe = jnp.where(zero, 1.0, t)
  lp_safe = jnp.where(zero, 0.0, lp)
  term = jnp.where(zero, 0.0, t_safe * (jnp.log(t_safe) - lp_safe))
  return jnp.sum(term, axis=axes)


@_jit_public("axis")
def kl_divergence_with_log_targets(
  log_predictions: jax.typing.ArrayLike,
  log_targets: jax.typing.ArrayLike,
  axis: Axis = -1,
  where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Kullback-Leibler divergence with the targets given as log-probabilities.

  .. math::
    D_{\mathrm{KL}}(t \,\|\, q) = \sum_k e^{\log t_k} (\log t_k - \log q_k).

  Args:
    log_predictions: log-probabilities of the prediction ``[..., num_classes]``.
    log_targets: log-probabilities of the target, same (broadcastable) shape.
    axis: class axis, tuple of axes or None.
    where: elements to include (the input shape or the batch shape).

  Returns:
    Per-example divergence ``[...]`` in nats (float32 for 16-bit inputs).

  Note:
    A target with ``log_targets = -inf`` (probability 0) contributes 0 to the
    value and gradients, even where ``log_predictions`` is ``-inf``.
  """
  lp, lt, mask, axes = _kl_prepare(log_predictions, log_targets, axis, where, "log_targets")
  zero = lt == -jnp.inf
  if mask is not None:
    zero = zero | ~mask
  lt_safe = jnp.where(zero, 0.0, lt)
  lp_safe = jnp.where(zero, 0.0, lp)
  term = jnp.where(zero, 0.0, jnp.exp(lt_safe) * (lt_safe - lp_safe))
  return jnp.sum(term, axis=axes)
