"""Sigmoid (independent binary) cross-entropy and focal loss (optax-compatible, safe)."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from xentjax import _validation as V
from xentjax._api import closed_form_jvp, public, public_like
from xentjax._logspace import log_add
from xentjax.losses._dense import smooth_binary


def _sigmoid_inputs(logits, labels, label_smoothing=0.0):
  """Checked `(z, y)` in the compute dtype, ``y`` broadcast to ``z`` and smoothed."""
  V.check_floating("logits", logits)
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  V.check_broadcastable("logits", logits, "labels", labels)
  if labels.ndim > logits.ndim:
    raise ValueError(
      f"`labels` must broadcast to the shape of `logits`, got "
      f"logits.shape={logits.shape} and labels.shape={labels.shape}."
    )
  dt = V.compute_dtype(logits.dtype)
  z = logits.astype(dt)
  y = jnp.broadcast_to(labels.astype(dt), jnp.broadcast_shapes(z.shape, labels.shape))
  if y.shape != z.shape:
    z = jnp.broadcast_to(z, y.shape)
  return z, smooth_binary(y, V.check_label_smoothing(label_smoothing))


def _prepare_pos_weight(pos_weight, z):
  """`pos_weight` as an array broadcastable to the logits (PyTorch's convention)."""
  if pos_weight is None:
    return None
  V.check_floating("pos_weight", pos_weight, "a floating-point array (weights of the positives)")
  w = jnp.asarray(pos_weight)
  if not V.broadcasts_to(w.shape, z.shape):
    raise ValueError(
      "`pos_weight` must broadcast to the shape of `logits` (e.g. one weight per "
      f"class on the last axis), got pos_weight.shape={w.shape} and logits.shape={z.shape}."
    )
  return jnp.broadcast_to(w.astype(z.dtype), z.shape)


def _bce(z, y, pos_weight):
  """-w y log sigma(z) - (1 - y) log sigma(-z) with 0 * log 0 = 0."""
  pos = _safe_term(y, jax.nn.log_sigmoid(z))
  if pos_weight is not None:
    pos = pos_weight * pos
  return -pos - _safe_term(1.0 - y, jax.nn.log_sigmoid(-z))


def _bce_grad(z, y, pos_weight):
  """sigma(z) (w y + 1 - y) - w y: the closed form of `_bce`'s logit derivative."""
  if pos_weight is None:
    return jax.nn.sigmoid(z) - y
  wy = pos_weight * y
  return jax.nn.sigmoid(z) * (wy + 1.0 - y) - wy


def _safe_term(weight, log_prob):
  """weight * log_prob with 0 * (-inf) = 0, NaN-free in the gradient."""
  drop = (weight == 0) & ~jnp.isfinite(log_prob)
  return weight * jnp.where(drop, 0.0, log_prob)


@public(("label_smoothing",))
def sigmoid_binary_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  label_smoothing: float = 0.0,
  pos_weight: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Element-wise sigmoid (binary) cross-entropy from logits.

  .. math::
    \ell(z, y) = -w\, \tilde y \log \sigma(z) - (1 - \tilde y) \log \sigma(-z),
    \qquad \tilde y = (1 - \varepsilon)\, y + \varepsilon / 2,

  computed with ``log_sigmoid`` (never ``log(sigmoid(z))``), with
  :math:`w` = ``pos_weight`` (1 when None) and :math:`\varepsilon` =
  ``label_smoothing``. The gradient with respect to ``z`` is
  :math:`\sigma(z)(w \tilde y + 1 - \tilde y) - w \tilde y`, which is
  :math:`\sigma(z) - y` without the options.

  Args:
    logits: logits of the positive class, any shape ``[...]`` (floating).
    labels: binary labels in ``{0, 1}`` or target probabilities in ``[0, 1]``,
      broadcastable to ``logits``.
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`, Keras's
      binary convention (``BinaryCrossentropy(label_smoothing=)``: the
      labels move towards 1/2).
    pos_weight: keyword-only weight of the positive term, broadcastable to
      ``logits`` (e.g. one per class ``[num_classes]``): PyTorch's
      ``BCEWithLogitsLoss(pos_weight=)``, the usual answer to class imbalance
      (``num_negatives / num_positives`` per class).

  Returns:
    The loss of each binary prediction with the shape of ``logits``; float32
    for 16-bit logits, else the logits dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import xentjax as L
    >>> with jnp.printoptions(precision=4):
    ...   print(L.sigmoid_binary_cross_entropy(jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0])))
    [0.6931 2.1269]

  Note:
    Infinite logits are exact: ``z = -inf`` with ``y = 0`` (or ``+inf`` with
    ``y = 1``) gives 0 with a zero gradient, the opposite label gives
    ``+inf`` with a finite gradient (optax returns NaN for the first case).
  """
  z, y = _sigmoid_inputs(logits, labels, label_smoothing)
  return _bce(z, y, _prepare_pos_weight(pos_weight, z))


def _log_one_minus_pt(z, y):
  """log(1 - p_t) = log((1 - y) sigma(z) + y sigma(-z)), in log space."""
  log_p = jax.nn.log_sigmoid(z)
  log_q = jax.nn.log_sigmoid(-z)
  a = _safe_log(1.0 - y) + log_p
  b = _safe_log(y) + log_q
  return log_add(a, b)


def _safe_log(x):
  pos = x > 0
  return jnp.where(pos, jnp.log(jnp.where(pos, x, 1.0)), jnp.where(x == 0, -jnp.inf, jnp.nan))


@public(("label_smoothing",))
def sigmoid_focal_loss(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  alpha: jax.typing.ArrayLike | None = None,
  gamma: jax.typing.ArrayLike = 2.0,
  label_smoothing: float = 0.0,
) -> jax.Array:
  r"""Sigmoid focal loss: binary cross-entropy scaled by :math:`(1 - p_t)^\gamma`.

  .. math::
    \ell(z, y) = \alpha_t\, (1 - p_t)^\gamma\,
      \big[-y \log \sigma(z) - (1-y) \log \sigma(-z)\big],

  with :math:`1 - p_t = (1-y)\,\sigma(z) + y\,\sigma(-z)` (the probability given
  to the wrong outcome; for binary labels :math:`p_t` is the probability of
  the true one) and :math:`\alpha_t = \alpha y + (1-\alpha)(1-y)`
  (:math:`\alpha_t = 1` when ``alpha`` is None); with ``label_smoothing``
  :math:`\varepsilon`, :math:`y` is first replaced by
  :math:`(1-\varepsilon) y + \varepsilon/2` everywhere (Keras's
  ``BinaryFocalCrossentropy`` convention). The weight is computed as
  :math:`\exp(\gamma \log(1 - p_t))` from log-sigmoids, so it stays finite, with
  finite first and second derivatives, for extreme logits and :math:`\gamma < 1`.

  Args:
    logits: logits ``[...]`` (floating).
    labels: labels in ``{0, 1}`` or soft labels in ``[0, 1]``, broadcastable
      to ``logits``.
    alpha: keyword-only weight of the positive class in ``(0, 1)``, or None.
    gamma: keyword-only focusing exponent :math:`\gamma \ge 0`; 0 gives the
      (alpha-weighted) binary cross-entropy.
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`.

  Returns:
    Loss with the shape of ``logits`` (float32 for 16-bit logits).

  Note:
    Same infinite-logit behaviour as `sigmoid_binary_cross_entropy`.

  References:
    Lin et al., Focal Loss for Dense Object Detection, ICCV 2017.
  """
  z, y = _sigmoid_inputs(logits, labels, label_smoothing)
  loss = _focal(z, y, jnp.asarray(gamma, z.dtype))
  if alpha is None:
    return loss
  return (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss


def _focal_value(z, y, gamma):
  ce = _bce(z, y, None)
  log_u = _log_one_minus_pt(z, y)
  # (1 - p_t)^gamma = exp(gamma log(1 - p_t)), with 0^0 = 1 and a NaN-free gradient.
  zero_u = log_u == -jnp.inf
  g_log_u = gamma * jnp.where(zero_u, 0.0, log_u)
  g_log_u = jnp.where(zero_u, jnp.where(gamma == 0, 0.0, -jnp.inf), g_log_u)
  weight = jnp.exp(g_log_u)
  # 0 * inf = 0: a zero weight on an infinite cross-entropy (an impossible
  # label under infinite confidence) has no loss.
  return jnp.where(weight == 0, 0.0, ce * jnp.where(weight == 0, 1.0, weight))


def _focal_grad_z(z, y, gamma):
  """d focal / dz without alpha: gamma u^(gamma-1) (1-2y) s(z)s(-z) ce + u^gamma (s(z) - y)."""
  log_p, log_q = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
  ce = -_safe_term(y, log_p) - _safe_term(1.0 - y, log_q)
  log_u = _log_one_minus_pt(z, y)
  finite = jnp.isfinite(z) & jnp.isfinite(log_u)
  # u^(gamma-1) s(z) s(-z) in log space: finite for gamma < 1 and extreme logits.
  e1 = jnp.exp(
    jnp.where(finite, (gamma - 1.0) * jnp.where(finite, log_u, 0.0) + log_p + log_q, -jnp.inf)
  )
  first = jnp.where(
    (gamma == 0) | (e1 == 0), 0.0, gamma * e1 * (1.0 - 2.0 * y) * jnp.where(e1 == 0, 0.0, ce)
  )
  zero_u = log_u == -jnp.inf
  weight = jnp.exp(
    jnp.where(zero_u, jnp.where(gamma == 0, 0.0, -jnp.inf), gamma * jnp.where(zero_u, 0.0, log_u))
  )
  return first + weight * (jax.nn.sigmoid(z) - y)


# The closed-form logit derivative stays finite on an infinite loss (-inf logit
# on the true class), where the product rule would give inf * 0 = NaN.
_focal = closed_form_jvp(_focal_value, _focal_grad_z, operator.mul)


# Closed-form gradients (re-exported by `xentjax.grads` under the loss names).


def _sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sum a gradient over the dimensions the labels broadcast (as autodiff does)."""
  if g.shape == tuple(shape):
    return g
  g = jnp.sum(g, axis=tuple(range(g.ndim - len(shape))))
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
  return jnp.sum(g, axis=axes, keepdims=True)


@public_like(sigmoid_binary_cross_entropy)
def sigmoid_binary_cross_entropy_grad(logits, labels, label_smoothing, pos_weight):
  r"""Gradient of `xentjax.sigmoid_binary_cross_entropy`: :math:`\sigma(z) - y`.

  With the options, :math:`\sigma(z)(w \tilde y + 1 - \tilde y) - w \tilde y`
  (:math:`w` = ``pos_weight``, :math:`\tilde y` the smoothed labels).

  Args:
    logits: ``[...]`` (floating).
    labels: labels or probabilities broadcastable to ``logits``.
    label_smoothing: keyword-only :math:`\varepsilon` (labels move to 1/2).
    pos_weight: keyword-only weight of the positive term, or None.

  Returns:
    The gradient with the shape and dtype of ``logits`` (summed over any
    broadcast dimensions, as autodiff does).
  """
  x = jnp.asarray(logits)
  z, y = _sigmoid_inputs(logits, labels, label_smoothing)
  g = _bce_grad(z, y, _prepare_pos_weight(pos_weight, z))
  return _sum_to_shape(g, x.shape).astype(x.dtype)


@public_like(sigmoid_focal_loss)
def sigmoid_focal_loss_grad(logits, labels, alpha, gamma, label_smoothing):
  r"""Gradient of `xentjax.sigmoid_focal_loss` with respect to the logits.

  With :math:`u = 1 - p_t = y + (1 - 2y)\sigma(z)` and :math:`c` the binary
  cross-entropy,

  .. math::
    \nabla_z \ell = \alpha_t \big[\gamma\, u^{\gamma-1} (1-2y)\,
      \sigma(z)\sigma(-z)\, c + u^\gamma (\sigma(z) - y)\big],

  where :math:`u^{\gamma-1}\sigma(z)\sigma(-z)` is evaluated in log space (it
  stays finite for :math:`\gamma < 1` and extreme logits); :math:`y` is the
  smoothed label with ``label_smoothing``.

  Args:
    logits: ``[...]`` (floating).
    labels: labels in ``{0, 1}`` or ``[0, 1]``, broadcastable to ``logits``.
    alpha: keyword-only positive-class weight or None.
    gamma: keyword-only focusing exponent.
    label_smoothing: keyword-only :math:`\varepsilon \in [0, 1]`.

  Returns:
    The gradient with the shape and dtype of ``logits``.
  """
  x = jnp.asarray(logits)
  z, y = _sigmoid_inputs(logits, labels, label_smoothing)
  g = _focal_grad_z(z, y, jnp.asarray(gamma, z.dtype))
  if alpha is not None:
    g = (alpha * y + (1.0 - alpha) * (1.0 - y)) * g
  return _sum_to_shape(g, x.shape).astype(x.dtype)
