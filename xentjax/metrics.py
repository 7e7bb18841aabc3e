"""Classification and language-model metrics on logits and integer labels.

Accuracy, top-k accuracy, cross-entropy rate, perplexity and bits per token.
All take `logits` `[..., num_classes]` (floating; 16-bit computed in float32)
and integer `labels` `[...]`, and average over the examples kept by the
optional `where` mask `[...]` (boolean, or integer 0/1).

Every number comes from the one softmax-statistics core (``xentjax._core``), so
these functions, the losses and `xentjax.evaluate` agree on the same rows.
Conventions (the README's conventions table):

* The class axis is the last one.
* Ties: a label tied with ``t - 1`` other classes at its rank gets
  fractional credit, ``clip((k - g) / t, 0, 1)`` for top-k with ``g``
  classes strictly above it: the expected hit when ties are broken at
  random. A constant model scores exactly ``k / K``; without ties this is
  the usual 0/1 hit.
* A label outside `[0, num_classes)` makes that example NaN, so the mean is
  NaN: a silent finite number would hide a data bug. Masked examples
  (`where` False) are never looked at, so padding labels such as -1 or -100
  are fine there.
* Non-finite rows: a NaN logit makes its example NaN in every metric (so the
  mean is NaN); a row whose logits are all ``-inf`` has cross-entropy
  ``+inf`` and, all classes being tied, top-k credit ``k / K``.
* No kept example: every mean is NaN (there is no data), with a zero
  gradient, and so is the perplexity.
* Results are float32 (float64 for float64 logits).
* Every public function is compiled with ``xentjax._api.public`` (`k` and
  `base` static); argument errors are raised before tracing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from xentjax import _core
from xentjax._api import doc_parts, public, where_mask
from xentjax._validation import (
  broadcasts_to,
  check_floating,
  check_integer,
  compute_dtype,
  log_base_scale,
)

__all__ = [
  "accuracy",
  "bits_per_token",
  "correct",
  "cross_entropy_rate",
  "perplexity",
  "top_k_accuracy",
  "top_k_correct",
]


def _check_shapes(logits, labels):
  check_floating("logits", logits)
  check_integer("labels", labels)
  if logits.ndim == 0 or logits.shape[:-1] != labels.shape:
    raise ValueError(
      "`logits` must have shape labels.shape + (num_classes,), got "
      f"logits.shape={logits.shape} and labels.shape={labels.shape}."
    )
  if logits.shape[-1] == 0:
    raise ValueError(f"`logits` needs at least one class, got logits.shape={logits.shape}.")


def _keep(where, shape):
  keep = where_mask(where)
  if keep is None:
    return None
  if not broadcasts_to(keep.shape, shape):
    raise ValueError(
      f"`where` must broadcast to the shape of `labels`, got where.shape={keep.shape} and "
      f"labels.shape={shape}."
    )
  return jnp.broadcast_to(keep, shape)


def _checked_row_metrics(
  logits: ArrayLike, labels: ArrayLike, where, k: int = 1
) -> _core.RowMetrics:
  """Per-example loss, credit and confidence from the core (`_core.row_metrics`).

  Examples that are not kept are neutralized before anything is computed, so
  whatever they hold reaches neither the value nor the gradient.
  """
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  _check_shapes(logits, labels)
  status = _core.label_status(labels, logits.shape[-1], where=_keep(where, labels.shape))
  z = logits.astype(compute_dtype(logits.dtype))
  return _core.row_metrics(z, status, _check_k(k, logits.shape[-1]))


def _mean(values, rows: _core.RowMetrics):
  """Mean over the kept examples; NaN (zero gradient) when none is kept."""
  return _core.mean_or_nan(jnp.sum(values), jnp.sum(rows.counted))


def _check_k(k: int, num_classes: int) -> int:
  if not 1 <= k <= num_classes:
    raise ValueError(f"`k` must lie in [1, num_classes={num_classes}], got k={k}.")
  return k


# Accuracy.


@public()
def correct(logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
  r"""Per-example top-1 credit: 1 for a hit, 0 for a miss, ``1/t`` for a t-way tie at the top.

  .. math::

    \begin{aligned}
    c_n &= \operatorname{clip}\Big(\frac{1 - g_n}{t_n}, 0, 1\Big),\\
    g_n &= |\{i : z_{n,i} > z_{n,y_n}\}|,\\
    t_n &= |\{i : z_{n,i} = z_{n,y_n}\}|
    \end{aligned}

  the expected hit of an argmax whose ties are broken at random.

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    where: optional mask `[...]` (broadcastable); masked examples give 0.

  Returns:
    `[...]` in [0, 1], float32 (float64 for float64 logits).

  Note:
    An out-of-range label or a NaN logit gives NaN.
  """
  return _checked_row_metrics(logits, labels, where).credit


@public()
def accuracy(logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
  r"""Top-1 accuracy: the mean top-1 credit of the kept examples (`correct`).

  .. math::

    \mathrm{acc} = \frac{1}{|W|} \sum_{n \in W} c_n

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    where: optional mask `[...]` (broadcastable); examples to count.

  Returns:
    Scalar, float32 (float64 for float64 logits).

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> logits = jnp.array([[0.1, 0.9], [0.8, 0.2], [0.5, 0.5]])
    >>> print(float(xentjax.metrics.accuracy(logits, jnp.array([1, 1, 1]))))
    0.5

  Note:
    A tie at the top is worth ``1/t`` (the third example above: 1/2), so a
    constant model scores ``1/K``; equal to `top_k_accuracy` with ``k=1``.
    An out-of-range label or a NaN logit gives NaN; no kept example gives
    NaN.
  """
  rows = _checked_row_metrics(logits, labels, where)
  return _mean(rows.credit, rows)


@public(("k",))
def top_k_correct(
  logits: ArrayLike, labels: ArrayLike, k: int = 5, *, where: ArrayLike | None = None
) -> jax.Array:
  r"""Per-example top-k credit: 1 when fewer than `k` classes can outrank the label.

  .. math::

    \begin{aligned}
    c_n &= \operatorname{clip}\Big(\frac{k - g_n}{t_n}, 0, 1\Big),\\
    g_n &= |\{i : z_{n,i} > z_{n,y_n}\}|,\\
    t_n &= |\{i : z_{n,i} = z_{n,y_n}\}|
    \end{aligned}

  The rank-k measure of the ImageNet challenge, with ties shared: when the
  label is tied with others across the k-th place, it gets the probability
  that a random tie break keeps it in the top k. Without ties it is the 0/1
  hit ``g_n < k``.

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    k: Python int in `[1, num_classes]`.
    where: optional mask `[...]` (broadcastable); masked examples give 0.

  Returns:
    `[...]` in [0, 1], float32 (float64 for float64 logits).

  Note:
    An out-of-range label or a NaN logit gives NaN.
  """
  return _checked_row_metrics(logits, labels, where, k).credit_k


@public(("k",))
def top_k_accuracy(
  logits: ArrayLike, labels: ArrayLike, k: int = 5, *, where: ArrayLike | None = None
) -> jax.Array:
  r"""Top-k accuracy: the mean top-k credit of the kept examples (`top_k_correct`).

  .. math::

    \mathrm{acc}_k = \frac{1}{|W|} \sum_{n \in W}
      \operatorname{clip}\Big(\frac{k - g_n}{t_n}, 0, 1\Big)

  The ImageNet rank-5 measure for `k=5`; ties are shared, so a constant
  model scores ``k / K``.

  Args:
    logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    k: Python int in `[1, num_classes]` (static).
    where: optional mask `[...]` (broadcastable); examples to count.

  Returns:
    Scalar, float32 (float64 for float64 logits).

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> logits = jnp.array([[3.0, 2.0, 1.0, 0.0]])
    >>> print(float(xentjax.metrics.top_k_accuracy(logits, jnp.array([2]), k=2)))
    0.0
    >>> print(float(xentjax.metrics.top_k_accuracy(jnp.zeros((1, 4)), jnp.array([2]), k=2)))
    0.5

  Note:
    `k > num_classes` or `k < 1` is a `ValueError`. An out-of-range label
    or a NaN logit gives NaN; no kept example gives NaN.

  References:
    O. Russakovsky et al., "ImageNet Large Scale Visual Recognition
    Challenge", 2015 (top-5 error).
  """
  rows = _checked_row_metrics(logits, labels, where, k)
  return _mean(rows.credit_k, rows)


# Cross-entropy rate, perplexity, bits per token.

# The arguments that `cross_entropy_rate`, `perplexity` and `bits_per_token`
# share (their docstrings' ``{token_args}``).
_TOKEN_ARGS = """logits: `[..., num_classes]`, floating dtype.
    labels: `[...]`, integer class indices.
    where: optional mask `[...]` (broadcastable), e.g. the non-padding
      tokens."""


@public(("base",))
@doc_parts(token_args=_TOKEN_ARGS)
def cross_entropy_rate(
  logits: ArrayLike,
  labels: ArrayLike,
  *,
  where: ArrayLike | None = None,
  base: float | None = None,
) -> jax.Array:
  r"""Mean cross-entropy per kept example (per token), in units of `base`.

  .. math::

    \begin{aligned}
    \bar H &= \frac{1}{|W|} \sum_{n \in W} \frac{h_n}{\ln b},\\
    h_n &= \operatorname{logsumexp}(z_n) - z_{n,y_n}
    \end{aligned}

  Args:
    {token_args}
    base: None for nats, 2 for bits, any number > 0 and != 1.

  Returns:
    Scalar, float32 (float64 for float64 logits).

  Note:
    An out-of-range label or a NaN logit gives NaN; a `-inf` logit at the
    label (or every logit `-inf`) gives `+inf`; no kept example gives NaN
    with a zero gradient. Computed as ``log sum exp(z - m) - (z_y - m)``
    with ``m`` the row maximum, so large logits lose no precision.
  """
  scale = log_base_scale(base)
  rows = _checked_row_metrics(logits, labels, where)
  rate = _mean(rows.nll, rows)
  return rate if scale is None else rate * jnp.asarray(scale, rate.dtype)


@public(("base",))
@doc_parts(token_args=_TOKEN_ARGS)
def perplexity(
  logits: ArrayLike,
  labels: ArrayLike,
  *,
  where: ArrayLike | None = None,
  base: float | None = None,
) -> jax.Array:
  r"""Perplexity `exp(mean cross-entropy)`, or its logarithm in base `base`.

  .. math::

    \begin{aligned}
    \mathrm{PPL} &= \exp\Big(\frac{1}{|W|} \sum_{n \in W} \ell_n\Big),\\
    \log_b \mathrm{PPL} &= \frac{1}{|W|} \sum_{n \in W} \frac{\ell_n}{\ln b},\\
    \ell_n &= -\log p_\theta(y_n \mid z_n).
    \end{aligned}

  The effective number of equally likely choices the model hesitates between:
  a uniform model over `K` classes has perplexity `K`.

  * `base=None` returns the perplexity itself, `exp` of the mean
    cross-entropy in nats.
  * `base=b` returns `log_b(PPL)`, which is the mean cross-entropy in base-`b`
    units. With `base=2` that is **bits per token**: `log2(PPL) = bits per
    token` (see `bits_per_token`).

  Args:
    {token_args}
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
    An out-of-range label gives NaN. No kept example gives NaN (there is no
    data), with a zero gradient.

  References:
    F. Jelinek, R. L. Mercer, L. R. Bahl and J. K. Baker, "Perplexity: a
    Measure of the Difficulty of Speech Recognition Tasks", 1977.
  """
  rate = cross_entropy_rate(logits, labels, where=where, base=base)
  return jnp.exp(rate) if base is None else rate


@public()
@doc_parts(token_args=_TOKEN_ARGS)
def bits_per_token(
  logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  r"""Mean cross-entropy in bits per kept token: `log2(perplexity)`.

  .. math::

    \begin{aligned}
    \mathrm{bpt} &= \frac{1}{|W|} \sum_{n \in W} -\log_2 p_\theta(y_n \mid z_n)\\
    &= \log_2 \mathrm{PPL}
    \end{aligned}

  Args:
    {token_args}

  Returns:
    Scalar, float32 (float64 for float64 logits).

  Note:
    Same as `cross_entropy_rate(..., base=2)` and `perplexity(..., base=2)`.
  """
  return cross_entropy_rate(logits, labels, where=where, base=2)
