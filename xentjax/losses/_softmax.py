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

import jax
import jax.numpy as jnp
import numpy as np

from xentjax import _core
from xentjax import _validation as V
from xentjax._api import (
  ArrayLike,
  Axis,
  Mask,
  class_axes,
  from_last,
  gradient_doc,
  prepare_where,
  public,
  public_like,
  to_last,
)
from xentjax.losses._dense import prepare_logits, smooth_last_axis

# ---------------------------------------------------------------------------
# Softmax cross-entropy with probability (one-hot or soft) labels.
# ---------------------------------------------------------------------------


def _dense_ce(z, y, mask, label_smoothing: float, z_loss: float):
  """Per-row loss for logits/labels laid out as ``[..., K]``, from the core statistics.

  ``-sum_c ~y_c log softmax(z)_c = (1 - eps) (|y| log_s - <y, z - m>)
  + eps (log_s - mean(z) + m)``: `_core.xent` of the label part and of the
  uniform part, the same algebra as the integer-label path.
  """
  eps = label_smoothing
  shifted, m = _core.shifted_logits(z, mask)
  log_s = _core.log_sum_exp_shifted(shifted)
  loss = 0.0
  if eps < 1.0:
    dot = _core.target_dot(shifted, y)
    loss = (1.0 - eps) * _core.xent(log_s, jnp.sum(y, axis=-1), dot)
  if eps > 0.0:
    has = 1.0 if mask is None else jnp.any(mask, axis=-1)
    zmean = _core.mean_shifted(z, shifted, m, mask)
    loss = loss + eps * _core.xent(log_s, has, zmean)
  if z_loss:
    loss = loss + _core.z_loss_term(m[..., 0], log_s, z_loss)
  return loss


@public(("axis", "label_smoothing", "z_loss"))
def softmax_cross_entropy(
  logits: ArrayLike,
  labels: ArrayLike,
  axis: Axis = -1,
  where: Mask = None,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
) -> jax.Array:
  r"""Softmax cross-entropy between logits and probability labels (safe).

  A drop-in replacement for `optax.losses.softmax_cross_entropy` that is also
  safe: a class with zero target mass contributes nothing even when its logit
  is ``-inf`` (optax returns NaN there).

  .. math::
    \begin{aligned}
    \ell(z, y) &= -\sum_k \tilde y_k \log \operatorname{softmax}(z)_k
      + \lambda \big(\log \textstyle\sum_k e^{z_k}\big)^2, \\
    \tilde y &= (1 - \varepsilon)\, y + \varepsilon / K,
    \end{aligned}

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
  z, y, mask = prepare_logits(logits, labels, axis, where)
  return _dense_ce(z, y, mask, label_smoothing, z_loss)


@public()
def safe_softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
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
  axes = class_axes(axis, logits.ndim)
  batch_shape = tuple(d for i, d in enumerate(logits.shape) if i not in axes)
  if tuple(labels.shape) != batch_shape:
    raise ValueError(
      "`labels` must have the shape of `logits` without the class axes "
      f"{axes}: expected {batch_shape}, got labels.shape={tuple(labels.shape)} "
      f"(logits.shape={tuple(logits.shape)})."
    )
  mask = prepare_where(where, logits.shape, axis, axes)
  dt = V.compute_dtype(logits.dtype)
  z = to_last(logits.astype(dt), axes)
  mask = None if mask is None else to_last(mask, axes)
  return z, labels, mask


def _sparse_ce(z, labels, mask, label_smoothing: float, z_loss: float):
  """Per-row loss for logits ``[..., K]`` and labels ``[...]``, from the core statistics."""
  status = _core.label_status(labels, z.shape[-1])
  st = _core.row_stats(z, status.index, mask, mean=label_smoothing > 0)
  loss = _core.cross_entropy_from_stats(
    st.log_s, st.zy, st.zmean, st.m, label_smoothing=label_smoothing, z_loss=z_loss
  )
  # An out-of-range label poisons the row (value and gradient): never a
  # finite number. A fully masked row is ignored whatever its label.
  if mask is None:
    return loss * jnp.where(status.bad, jnp.nan, 1.0).astype(loss.dtype)
  row_has = jnp.any(mask, axis=-1)
  loss = loss * jnp.where(status.bad & row_has, jnp.nan, 1.0).astype(loss.dtype)
  return jnp.where(row_has, loss, 0.0)


@public(("axis", "label_smoothing", "z_loss"))
def softmax_cross_entropy_with_integer_labels(
  logits: ArrayLike,
  labels: ArrayLike,
  axis: int | tuple[int, ...] = -1,
  where: Mask = None,
  *,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
) -> jax.Array:
  r"""Softmax cross-entropy between logits and integer class labels.

  A drop-in replacement for
  `optax.losses.softmax_cross_entropy_with_integer_labels`. No one-hot is
  built: the loss is the log-normalizer minus the logit of the true class,

  .. math::
    \begin{aligned}
    \ell(z, c) &= (1 - \varepsilon)\,(\log Z - z_c)
      + \varepsilon\,\big(\log Z - \tfrac{1}{K}\textstyle\sum_k z_k\big)
      + \lambda (\log Z)^2, \\
    \log Z &= \log \textstyle\sum_k e^{z_k},
    \end{aligned}

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
  z, labels, mask = _sparse_prepare(logits, labels, axis, where)
  return _sparse_ce(z, labels, mask, label_smoothing, z_loss)


@public(("axis",))
def poly_loss_cross_entropy(
  logits: ArrayLike,
  labels: ArrayLike,
  *,
  epsilon: ArrayLike = 2.0,
  axis: Axis = -1,
  where: Mask = None,
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
  z, y, mask = prepare_logits(logits, labels, axis, where)
  ce = _dense_ce(z, y, mask, 0.0, 0.0)
  p = _softmax_probs(z, mask)[0]
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
  axes = class_axes(axis, len(shape))
  mask = prepare_where(where, shape, axis, axes)
  return lp, t, mask, axes


def _kl_terms(lp, t, mask, *, log_targets: bool):
  """``t (log t - lp)`` per element, 0 where the target is 0 (or masked).

  Returns ``(terms, zero, t)`` with ``t`` the target probabilities (``exp``
  of the log-targets) and ``zero`` the elements that contribute nothing; the
  gradient uses the same ``zero``, so value and gradient agree on it.
  """
  # A subnormal target counts as 0 (its term is below 1e-36): XLA flushes it in
  # some ops and not others, so `t == 0` alone disagreed between value and gradient.
  zero = (t == -jnp.inf) if log_targets else ((t >= 0) & (t < jnp.finfo(t.dtype).tiny))
  if mask is not None:
    zero = zero | ~mask
  lp_safe = jnp.where(zero, 0.0, lp)
  if log_targets:
    log_t = jnp.where(zero, 0.0, t)
    prob = jnp.exp(log_t)
  else:
    prob = jnp.where(zero, 1.0, t)
    log_t = jnp.log(prob)
  terms = jnp.where(zero, 0.0, prob * (log_t - lp_safe))
  return terms, zero, prob


@public(("axis",))
def kl_divergence(
  log_predictions: ArrayLike, targets: ArrayLike, axis: Axis = -1, where: Mask = None
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
  return jnp.sum(_kl_terms(lp, t, mask, log_targets=False)[0], axis=axes)


@public(("axis",))
def kl_divergence_with_log_targets(
  log_predictions: ArrayLike, log_targets: ArrayLike, axis: Axis = -1, where: Mask = None
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
  return jnp.sum(_kl_terms(lp, lt, mask, log_targets=True)[0], axis=axes)


# ---------------------------------------------------------------------------
# Closed-form gradients (re-exported by `xentjax.grads` under the loss names).
# ---------------------------------------------------------------------------


def _softmax_probs(z, mask):
  """softmax over the last axis (masked classes 0) and ``log Z``; empty rows give 0."""
  shifted, m = _core.shifted_logits(z, mask)
  log_s = _core.log_sum_exp_shifted(shifted)
  empty = (log_s == -jnp.inf)[..., None]
  p = jnp.where(empty, 0.0, jnp.exp(shifted - jnp.where(empty, 0.0, log_s[..., None])))
  return p, m[..., 0], log_s


def _z_loss_grad(p, m, log_s, z_loss):
  """``2 lam lse p``; 0 for rows with nothing to normalize (as `_core.z_loss_term`)."""
  lse = jnp.where(log_s == -jnp.inf, 0.0, m + log_s)
  return (2.0 * z_loss) * lse[..., None] * p


def _back(g, logits, axis):
  x = jnp.asarray(logits)
  return from_last(g, class_axes(axis, x.ndim), x.shape).astype(x.dtype)


@public_like(softmax_cross_entropy)
@gradient_doc(
  softmax_cross_entropy,
  wrt="logits",
  formula=r"\nabla_z \ell = \operatorname{softmax}(z) \sum_k \tilde y_k - \tilde y"
  r" + 2 \lambda \log Z \operatorname{softmax}(z)",
  note="Masked entries and all-masked rows get 0; a ``-inf`` logit gets a finite gradient.",
)
def softmax_cross_entropy_grad(logits, labels, axis, where, label_smoothing, z_loss):
  z, y, mask = prepare_logits(logits, labels, axis, where)
  y = smooth_last_axis(y, mask, label_smoothing)
  p, m, log_s = _softmax_probs(z, mask)
  g = p * jnp.sum(y, axis=-1, keepdims=True) - y
  if z_loss:
    g = g + _z_loss_grad(p, m, log_s, z_loss)
  return _back(g, logits, axis)


@public_like(safe_softmax_cross_entropy)
@gradient_doc(
  safe_softmax_cross_entropy,
  wrt="logits",
  formula=r"\nabla_z \ell = \operatorname{softmax}(z) \sum_k y_k - y",
)
def safe_softmax_cross_entropy_grad(logits, labels):
  return softmax_cross_entropy_grad(logits, labels)


@public_like(softmax_cross_entropy_with_integer_labels)
@gradient_doc(
  softmax_cross_entropy_with_integer_labels,
  wrt="logits",
  formula=r"\nabla_z \ell = \operatorname{softmax}(z) - (1-\varepsilon)\,\mathrm{onehot}(c)"
  r" - \varepsilon / K + 2\lambda \log Z \operatorname{softmax}(z)",
  note="No one-hot is built. An out-of-range label gives a row of NaN; an all-masked row zeros.",
)
def softmax_cross_entropy_with_integer_labels_grad(
  logits, labels, axis, where, label_smoothing, z_loss
):
  z, labels, mask = _sparse_prepare(logits, labels, axis, where)
  eps, k = label_smoothing, z.shape[-1]
  status = _core.label_status(labels, k)
  p, m, log_s = _softmax_probs(z, mask)
  g = p
  if eps:
    uniform = 1.0 / k if mask is None else mask / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1)
    g = g - eps * uniform
  if z_loss:
    g = g + _z_loss_grad(p, m, log_s, z_loss)
  is_label = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == status.index[..., None]
  g = jnp.where(is_label, g - (1.0 - eps), g)
  g = jnp.where(status.bad[..., None], jnp.nan, g)
  if mask is not None:
    g = jnp.where(jnp.any(mask, axis=-1, keepdims=True), g, 0.0)
  return _back(g, logits, axis)


@public_like(poly_loss_cross_entropy)
@gradient_doc(
  poly_loss_cross_entropy,
  wrt="logits",
  formula=r"\nabla_z \ell = p \sum_k y_k - y - \epsilon\, p \odot (y - \langle y, p \rangle),"
  r" \qquad p = \operatorname{softmax}(z)",
)
def poly_loss_cross_entropy_grad(logits, labels, epsilon, axis, where):
  z, y, mask = prepare_logits(logits, labels, axis, where)
  p, _, _ = _softmax_probs(z, mask)
  yp = jnp.sum(y * p, axis=-1, keepdims=True)
  g = p * jnp.sum(y, axis=-1, keepdims=True) - y
  g = g - jnp.asarray(epsilon, z.dtype) * p * (y - yp)
  return _back(g, logits, axis)


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sum a broadcast result back to the shape of the argument (as autodiff does)."""
  if x.shape == tuple(shape):
    return x
  lead = x.ndim - len(shape)
  x = jnp.sum(x, axis=tuple(range(lead))) if lead else x
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _kl_grad(log_predictions, targets, axis, where, *, log_targets):
  name = "log_targets" if log_targets else "targets"
  lp, t, mask, _ = _kl_prepare(log_predictions, targets, axis, where, name)
  _, zero, prob = _kl_terms(lp, t, mask, log_targets=log_targets)
  shape = jnp.shape(log_predictions)
  g = _sum_to(jnp.where(zero, 0.0, -prob), shape)
  return g.astype(jnp.asarray(log_predictions).dtype)


@public_like(kl_divergence)
@gradient_doc(
  kl_divergence,
  wrt="log_predictions",
  formula=r"\nabla_{\log q} D = -t",
  note="0 where the target is 0 or masked (the same test as the value).",
)
def kl_divergence_grad(log_predictions, targets, axis, where):
  return _kl_grad(log_predictions, targets, axis, where, log_targets=False)


@public_like(kl_divergence_with_log_targets)
@gradient_doc(
  kl_divergence_with_log_targets,
  wrt="log_predictions",
  formula=r"\nabla_{\log q} D = -e^{\log t}",
  note="0 where the log-target is ``-inf`` or masked.",
)
def kl_divergence_with_log_targets_grad(log_predictions, log_targets, axis, where):
  return _kl_grad(log_predictions, log_targets, axis, where, log_targets=True)
