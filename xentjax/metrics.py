"""Classification and language-model metrics on logits and integer labels.

Accuracy, top-k accuracy, cross-entropy rate, perplexity and bits per token.
All take `logits` `[..., num_classes]` (floating; 16-bit computed in float32)
and integer `labels` `[...]`, and average over the examples kept by the
optional boolean `where` `[...]`.

Conventions, decided once for the whole module:

* The class axis is the last one.
* A label outside `[0, num_classes)` makes that example NaN, so the mean is
  NaN: a silent finite number would hide a data bug. Masked examples (`where`
  False) are never looked at, so padding labels such as -1 or -100 are fine
  there.
* A batch with no kept example has mean 0 (with a zero gradient), hence
  perplexity `exp(0) = 1`; never NaN.
* Results are float32 (float64 for float64 logits).
* Every public function is `jax.jit`-compiled (`k` and `base` static); argument
  errors are raised while tracing.

The cross-entropy is computed here as `logsumexp(z) - z[label]` in float32, so
this module depends on nothing else in the package.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from xentjax._validation import check_floating, check_integer, compute_dtype, log_base_scale

__all__ = [
  "accuracy",
  "bits_per_token",
  "correct",
  "cross_entropy_rate",
  "perplexity",
  "top_k_accuracy",
  "top_k_correct",
]


def _prepare(logits: ArrayLike, labels: ArrayLike, where: ArrayLike | None):
  """Validated float logits, int labels, and a boolean mask (or None)."""
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  check_floating("logits", logits)
  check_integer("labels", labels)
  if logits.ndim == 0 or logits.shape[:-1] != labels.shape:
    raise ValueError(
      "`logits` must have shape labels.shape + (num_classes,), got "
      f"logits.shape={logits.shape} and labels.shape={labels.shape}."
    )
  if logits.shape[-1] == 0:
    raise ValueError(f"`logits` needs at least one class, got logits.shape={logits.shape}.")
  keep = None
  if where is not None:
    w = jnp.asarray(where)
    if w.dtype != jnp.bool_:
      raise TypeError(f"`where` must be a boolean mask, got dtype {w.dtype} with shape {w.shape}.")
    try:
      ok = np.broadcast_shapes(w.shape, labels.shape) == labels.shape
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(
        f"`where` must broadcast to the shape of `labels`, got where.shape={w.shape} and "
        f"labels.shape={labels.shape}."
      )
    keep = jnp.broadcast_to(w, labels.shape)
    # Masked examples are never looked at: neutral logits and label 0.
    logits = jnp.where(keep[..., None], logits, 0)
    labels = jnp.where(keep, labels, 0)
  logits = logits.astype(compute_dtype(logits.dtype))
  return logits, labels, keep


def _label_ok(labels: jax.Array, num_classes: int) -> jax.Array:
  return (labels >= 0) & (labels < num_classes)


def _picked(logits: jax.Array, labels: jax.Array) -> jax.Array:
  idx = jnp.clip(labels, 0, logits.shape[-1] - 1)
  return jnp.take_along_axis(logits, idx[..., None], axis=-1)[..., 0]


def _mean(values: jax.Array, keep: jax.Array | None) -> jax.Array:
  """Mean over kept examples; 0 (zero gradient) when none is kept."""
  if keep is None:
    if values.size == 0:
      return jnp.zeros((), values.dtype)
    return jnp.mean(values)
  total = jnp.sum(jnp.where(keep, values, 0))
  count = jnp.sum(keep).astype(values.dtype)
  return total / jnp.maximum(count, 1)


def _check_k(k, num_classes: int) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f"`k` must be a Python int, got {k!r}.")
  if not 1 <= k <= num_classes:
    raise ValueError(f"`k` must lie in [1, num_classes={num_classes}], got k={k}.")
  return int(k)


# Accuracy.


@jax.jit
def correct(logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
  r"""Per-example top-1 hit: 1 where `argmax(logits) == label`, else 0.

  .. math::

    c_n = [\arg\max_i z_{n,i} = y_n]

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    where: optional boolean `[...]` (broadcastable); masked examples give 0.

  Returns:
    `[...]` of 0.0/1.0, float32 (float64 for float64 logits).

  Note:
    Ties go to the lowest class index (`jnp.argmax`, as NumPy and PyTorch).
    An out-of-range label gives NaN.
  """
  z, y, keep = _prepare(logits, labels, where)
  hit = (jnp.argmax(z, axis=-1) == y).astype(z.dtype)
  hit = jnp.where(_label_ok(y, z.shape[-1]), hit, jnp.nan)
  return hit if keep is None else jnp.where(keep, hit, 0)


@jax.jit
def accuracy(logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
  r"""Top-1 accuracy: the fraction of kept examples whose argmax is the label.

  .. math::

    \mathrm{acc} = \frac{1}{|W|} \sum_{n \in W} [\arg\max_i z_{n,i} = y_n]

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    where: optional boolean `[...]` (broadcastable); examples to count.

  Returns:
    Scalar, float32 (float64 for float64 logits).

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> logits = jnp.array([[0.1, 0.9], [0.8, 0.2]])
    >>> print(float(xentjax.metrics.accuracy(logits, jnp.array([1, 1]))))
    0.5

  Note:
    Ties go to the lowest class index, so `top_k_accuracy(k=1)`, which counts
    ties as hits, is never below `accuracy` and equals it when no example has
    a tie at the top. An out-of-range label gives NaN; no kept example gives 0.
  """
  z, y, keep = _prepare(logits, labels, where)
  return _mean(correct(z, y), keep)


@functools.partial(jax.jit, static_argnames=("k",))
def top_k_correct(
  logits: ArrayLike, labels: ArrayLike, k: int = 5, *, where: ArrayLike | None = None
) -> jax.Array:
  r"""Per-example top-k hit: 1 when fewer than `k` classes score strictly higher.

  .. math::

    c_n = \Big[\, \big|\{ i : z_{n,i} > z_{n,y_n} \}\big| < k \,\Big]

  This is the rank-k measure of the ImageNet challenge. Defining it through a
  count rather than a sort makes ties explicit: a class tied with the label
  does not push the label out, so ties favour a hit (all-equal logits are a
  hit for every `k`).

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    k: Python int in `[1, num_classes]`.
    where: optional boolean `[...]` (broadcastable); masked examples give 0.

  Returns:
    `[...]` of 0.0/1.0, float32 (float64 for float64 logits).

  Note:
    An out-of-range label, or a NaN logit at the label, gives NaN.
  """
  z, y, keep = _prepare(logits, labels, where)
  k = _check_k(k, z.shape[-1])
  z_y = _picked(z, y)
  higher = jnp.sum(z > z_y[..., None], axis=-1)
  hit = (higher < k).astype(z.dtype)
  hit = jnp.where(_label_ok(y, z.shape[-1]) & ~jnp.isnan(z_y), hit, jnp.nan)
  return hit if keep is None else jnp.where(keep, hit, 0)


@functools.partial(jax.jit, static_argnames=("k",))
def top_k_accuracy(
  logits: ArrayLike, labels: ArrayLike, k: int = 5, *, where: ArrayLike | None = None
) -> jax.Array:
  r"""Top-k accuracy: the fraction of kept examples whose label ranks in the top k.

  .. math::

    \mathrm{acc}_k = \frac{1}{|W|} \sum_{n \in W}
      \Big[\, \big|\{ i : z_{n,i} > z_{n,y_n} \}\big| < k \,\Big]

  A hit when fewer than `k` classes score strictly higher than the label (the
  ImageNet rank-5 measure for `k=5`); ties favour a hit.

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    k: Python int in `[1, num_classes]` (static).
    where: optional boolean `[...]` (broadcastable); examples to count.

  Returns:
    Scalar, float32 (float64 for float64 logits).

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> logits = jnp.array([[3.0, 2.0, 1.0, 0.0]])
    >>> print(float(xentjax.metrics.top_k_accuracy(logits, jnp.array([2]), k=2)))
    0.0

  Note:
    `k > num_classes` or `k < 1` is a `ValueError`. An out-of-range label
    gives NaN; no kept example gives 0.

  References:
    O. Russakovsky et al., "ImageNet Large Scale Visual Recognition
    Challenge", 2015 (top-5 error).
  """
  z, y, keep = _prepare(logits, labels, where)
  return _mean(top_k_correct(z, y, k), keep)


# Cross-entropy rate, perplexity, bits per token.


def _per_example_ce(z: jax.Array, y: jax.Array) -> jax.Array:
  """-log softmax(z)[y] = logsumexp(z) - z[y], NaN for out-of-range labels."""
  ce = jax.nn.logsumexp(z, axis=-1) - _picked(z, y)
  return jnp.where(_label_ok(y, z.shape[-1]), ce, jnp.nan)


@functools.partial(jax.jit, static_argnames=("base",))
def cross_entropy_rate(
  logits: ArrayLike,
  labels: ArrayLike,
  *,
  where: ArrayLike | None = None,
  base: float | None = None,
) -> jax.Array:
  r"""Mean cross-entropy per kept example (per token), in units of `base`.

  .. math::

    \bar H = \frac{1}{|W|} \sum_{n \in W}
      \frac{\operatorname{logsumexp}(z_n) - z_{n,y_n}}{\ln b}

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    where: optional boolean `[...]` (broadcastable), e.g. the non-padding
      tokens.
    base: None for nats, 2 for bits, any number > 0 and != 1.

  Returns:
    Scalar, float32 (float64 for float64 logits).

  Note:
    An out-of-range label gives NaN; a `-inf` logit at the label gives `+inf`;
    no kept example gives 0 with a zero gradient.
  """
  scale = log_base_scale(base)
  z, y, keep = _prepare(logits, labels, where)
  rate = _mean(_per_example_ce(z, y), keep)
  return rate if scale is None else rate * jnp.asarray(scale, rate.dtype)


@functools.partial(jax.jit, static_argnames=("base",))
def perplexity(
  logits: ArrayLike,
  labels: ArrayLike,
  *,
  where: ArrayLike | None = None,
  base: float | None = None,
) -> jax.Array:
  r"""Perplexity `exp(mean cross-entropy)`, or its logarithm in base `base`.

  .. math::

    \mathrm{PPL} = \exp\Big(\frac{1}{|W|} \sum_{n \in W} -\log p_\theta(y_n \mid z_n)\Big),
    \qquad \log_b \mathrm{PPL} = \frac{1}{|W|} \sum_{n \in W} -\log_b p_\theta(y_n \mid z_n).

  The effective number of equally likely choices the model hesitates between:
  a uniform model over `K` classes has perplexity `K`.

  * `base=None` returns the perplexity itself, `exp` of the mean
    cross-entropy in nats.
  * `base=b` returns `log_b(PPL)`, which is the mean cross-entropy in base-`b`
    units. With `base=2` that is **bits per token**: `log2(PPL) = bits per
    token` (see `bits_per_token`).

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    where: optional boolean `[...]` (broadcastable), e.g. the non-padding
      tokens.
    base: None for the perplexity; a number > 0 and != 1 for its logarithm in
      that base.

  Returns:
    Scalar, float32 (float64 for float64 logits).

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> logits, labels = jnp.zeros((3, 8)), jnp.array([0, 5, 7])
    >>> print(round(float(xentjax.metrics.perplexity(logits, labels)), 4))
    8.0
    >>> print(round(float(xentjax.metrics.perplexity(logits, labels, base=2)), 4))
    3.0

  Note:
    An out-of-range label gives NaN. No kept example gives mean cross-entropy
    0, hence perplexity 1 (and 0 with `base`).

  References:
    F. Jelinek, R. L. Mercer, L. R. Bahl and J. K. Baker, "Perplexity: a
    Measure of the Difficulty of Speech Recognition Tasks", 1977.
  """
  rate = cross_entropy_rate(logits, labels, where=where, base=base)
  return jnp.exp(rate) if base is None else rate


@jax.jit
def bits_per_token(
  logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  r"""Mean cross-entropy in bits per kept token: `log2(perplexity)`.

  .. math::

    \mathrm{bpt} = \frac{1}{|W|} \sum_{n \in W} -\log_2 p_\theta(y_n \mid z_n) = \log_2 \mathrm{PPL}

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    where: optional boolean `[...]` (broadcastable), e.g. the non-padding
      tokens.

  Returns:
    Scalar, float32 (float64 for float64 logits).

  Note:
    Same as `cross_entropy_rate(..., base=2)` and `perplexity(..., base=2)`.
  """
  return cross_entropy_rate(logits, labels, where=where, base=2)
