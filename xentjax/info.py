"""Information theory on probability vectors.

Surprisal, entropy, cross-entropy, Kullback-Leibler and Jensen-Shannon
divergences, in nats by default and in any other base with `base=`.

Every function here follows the same conventions, decided once:

* `0 · log 0 = 0`: a class with zero probability under `p` contributes nothing,
  whatever `q` says there (even `q = 0`).
* `q = 0` where `p > 0` gives `+inf`, never NaN (the event `p` expects is
  impossible under `q`).
* Gradients are finite wherever the function is finite: every logarithm takes
  its argument through `jnp.where`, so the untaken branch never produces the
  `0 · inf = NaN` the JAX FAQ warns about. Where a term's value is `0 · log 0`,
  its gradient is taken as 0.
* `where` (boolean, broadcastable to the probabilities) removes elements from
  the sum; a fully masked vector gives 0 with a zero gradient.
* 16-bit floats are computed in float32 and the result is float32; other
  floating dtypes are kept. Integer inputs are refused with a `TypeError`
  (they are almost always class indices passed where probabilities belong).

Every public function is `jax.jit`-compiled, with `axis` (an int or a tuple of
ints) and `base` (a Python number or None) static; argument errors are raised
while tracing, before anything is compiled.

* **Negative probabilities give NaN**, one rule for every function here: a
  negative entry of `p` or `q` (or a NaN) that `where` keeps makes the result
  of its vector NaN, in value and gradient (elementwise for `information`).
  The check reads the inputs as given, before `normalize` divides by their
  sums (``[-.5, -.5]`` is not a distribution even though its normalization
  would be). SciPy is not one rule here (``entr`` gives ``-inf``,
  ``rel_entr`` ``+inf``); NaN is what the rest of xentjax gives for input that
  is not a distribution (`xentjax.kl_divergence` with a negative target, an
  out-of-range label).

Nothing checks that the inputs are normalized: values cannot be checked
inside `jit` (use ``normalize=True`` to divide by the sums).

**Mutual information.** The variational lower bounds of Poole et al. (2019)
on :math:`I(A; B)`, as TFP's ``tfp.vi.mutual_information`` defines them:
`infonce_lower_bound` (from a contrastive loss or a critic's score matrix),
`nwj_lower_bound`, `dv_lower_bound` and `js_lower_bound` on a score matrix
``[..., B, B]`` (positives on the diagonal), and `mutual_information_bounds`,
all four from paired embeddings in one sweep of the contrastive engine,
without the ``[B, B]`` matrix.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from xentjax._api import doc_parts, public, public_like, where_mask
from xentjax._logspace import astype_exact, log_add, log_prob
from xentjax._validation import (
  broadcasts_to,
  check_broadcastable,
  check_floating,
  compute_dtype,
  log_base_scale,
  normalize_axis,
)
from xentjax._vocab.contrastive import SWEEP_OPTIONS, TILE_OPTIONS, check_scale, critic_statistics

Axis = int | tuple[int, ...]

__all__ = [
  "MutualInformationBounds",
  "cross_entropy",
  "dv_lower_bound",
  "entropy",
  "infonce_lower_bound",
  "information",
  "js_divergence",
  "js_lower_bound",
  "kl_divergence",
  "kl_divergence_from_logits",
  "mutual_information_bounds",
  "nwj_lower_bound",
]


# Argument handling (trace time: shapes, dtypes and Python numbers only).


def _as_float(name: str, x: ArrayLike) -> jax.Array:
  x = jnp.asarray(x)
  check_floating(name, x)
  return x


def _common_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array, axis: Axis):
  """Broadcast shape of `a` and `b`; the reduced axes must have equal sizes."""
  check_broadcastable(name_a, a, name_b, b)
  shape = np.broadcast_shapes(a.shape, b.shape)
  if len(shape) == 0:
    raise ValueError(
      f"`{name_a}` and `{name_b}` must have at least one dimension (the class axis), got "
      f"{name_a}.shape={a.shape} and {name_b}.shape={b.shape}."
    )
  axes = normalize_axis("axis", axis, len(shape))
  for ax in (axes,) if isinstance(axes, int) else axes:
    sizes = []
    for x in (a, b):
      k = ax - (len(shape) - x.ndim)
      sizes.append(x.shape[k] if k >= 0 else None)
    if sizes[0] is not None and sizes[1] is not None and sizes[0] != sizes[1]:
      raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same size along the reduced axis {axis}, "
        f"got {name_a}.shape={a.shape} and {name_b}.shape={b.shape}."
      )
  return tuple(shape), axes


def _mask(where: ArrayLike | None, shape: tuple[int, ...], name: str) -> jax.Array | None:
  """`where` as a boolean array of exactly `shape`, or None."""
  if where is None:
    return None
  w = where_mask(where)
  if not broadcasts_to(w.shape, shape):
    raise ValueError(
      f"`where` must broadcast to the shape of `{name}`, got where.shape={w.shape} and "
      f"{name}.shape={tuple(shape)}."
    )
  return jnp.broadcast_to(w, shape)


def _in_base(x: jax.Array, scale: float | None) -> jax.Array:
  return x if scale is None else x * jnp.asarray(scale, x.dtype)


def _not_a_distribution(axes, keep: jax.Array | None, *xs: jax.Array) -> jax.Array:
  """Where a vector along `axes` has a kept entry that is negative or NaN (-> NaN result)."""
  bad = jnp.zeros(jnp.broadcast_shapes(*(x.shape for x in xs)), bool)
  for x in xs:
    bad = bad | (x < 0) | jnp.isnan(x)
  if keep is not None:
    bad = bad & keep
  return jnp.any(bad, axis=axes)


def _poison(value: jax.Array, bad: jax.Array) -> jax.Array:
  """NaN where `bad`, in the value and in the gradient (as a bad label does)."""
  return value * jnp.where(bad, jnp.nan, 1.0).astype(value.dtype)


# Elementwise terms. Each keeps the logarithm's argument away from 0 wherever
# the term is defined to be finite, so both the value and the gradient are
# finite there; the cases that are truly infinite keep their infinite value.


def _rel_entr_terms(p: jax.Array, q: jax.Array, keep: jax.Array | None) -> jax.Array:
  """p·(log p − log q) elementwise, with 0·log 0 = 0 and p > 0, q = 0 → +inf."""
  p_pos = p > 0
  both_zero = (p == 0) & (q == 0)
  if keep is not None:
    p_pos = p_pos & keep
    q_ok = keep & ~both_zero
    p = jnp.where(keep, p, 0)
  else:
    q_ok = ~both_zero
  log_p = log_prob(jnp.where(p_pos, p, 1))
  log_q = log_prob(jnp.where(q_ok, q, 1))
  return p * (log_p - log_q)


def _cross_entropy_terms(p: jax.Array, q: jax.Array, keep: jax.Array | None) -> jax.Array:
  """−p·log q elementwise, with 0·log 0 = 0 and p > 0, q = 0 → +inf."""
  both_zero = (p == 0) & (q == 0)
  if keep is not None:
    q_ok = keep & ~both_zero
    p = jnp.where(keep, p, 0)
  else:
    q_ok = ~both_zero
  return -p * log_prob(jnp.where(q_ok, q, 1))


def _entropy_terms(p: jax.Array, keep: jax.Array | None) -> jax.Array:
  """−p·log p elementwise, with 0·log 0 = 0 (value and gradient)."""
  p_pos = p > 0
  if keep is not None:
    p_pos = p_pos & keep
    p = jnp.where(keep, p, 0)
  return -p * log_prob(jnp.where(p_pos, p, 1))


def _js_terms(p: jax.Array, q: jax.Array, keep: jax.Array | None) -> jax.Array:
  """½[p·(log p − log m) + q·(log q − log m)], m = ½(p + q), with log m in log space.

  ``m`` itself is never formed: for ``p = 0`` and ``q = 1.6e-38`` it is a
  subnormal that XLA flushes to 0, which would make the term ``+inf``.
  """
  if keep is not None:
    p, q = jnp.where(keep, p, 0), jnp.where(keep, q, 0)
  p_pos, q_pos = p > 0, q > 0
  log_p = jnp.where(p_pos, log_prob(jnp.where(p_pos, p, 1)), -jnp.inf)
  log_q = jnp.where(q_pos, log_prob(jnp.where(q_pos, q, 1)), -jnp.inf)
  any_pos = p_pos | q_pos
  log_m = jnp.where(any_pos, log_add(log_p, log_q), 0) - np.log(2.0)
  p_term = jnp.where(p_pos, p * (jnp.where(p_pos, log_p, 0) - log_m), 0)
  q_term = jnp.where(q_pos, q * (jnp.where(q_pos, log_q, 0) - log_m), 0)
  return 0.5 * (p_term + q_term)


def _normalized(x: jax.Array, axes, keep: jax.Array | None) -> jax.Array:
  """``x / sum(x)`` over `axes` (kept elements only): SciPy's ``entropy`` normalization."""
  total = jnp.sum(x if keep is None else jnp.where(keep, x, 0), axis=axes, keepdims=True)
  return x / total


# Public functions.


@public(("base",))
def information(
  p: ArrayLike,
  where: ArrayLike | None = None,
  base: float | None = None,
) -> jax.Array:
  r"""Surprisal (self-information) of each probability, elementwise.

  .. math::

    I(p) = -\log_b p

  An event of probability 1/8 carries 3 bits; a certain event carries 0.

  Args:
    p: probabilities, any shape `[...]`, floating dtype.
    where: optional mask (bool or integer 0/1) broadcastable to `p`; masked elements give 0.
    base: logarithm base; None for nats, 2 for bits, any number > 0 and != 1.

  Returns:
    Array of `p`'s shape: float32 for 16-bit inputs, otherwise `p`'s dtype.

  Example:
    >>> import xentjax
    >>> print(round(float(xentjax.info.information(0.125, base=2)), 12))  # 3 bits
    3.0

  Note:
    `p = 0` gives `+inf` with gradient `-inf` (the true limit, not NaN); a
    negative (or NaN) `p` gives NaN; a masked element gives 0 and a zero
    gradient whatever its value.
  """
  scale = log_base_scale(base)
  p = _as_float("p", p)
  keep = _mask(where, p.shape, "p")
  p = p.astype(compute_dtype(p.dtype))
  bad = (p < 0) | jnp.isnan(p)
  if keep is None:
    out = -jnp.log(jnp.where(bad, 1, p))
  else:
    bad = bad & keep
    out = jnp.where(keep, -jnp.log(jnp.where(keep & ~bad, p, 1)), 0)
  return _in_base(_poison(out, bad), scale)


@public(("axis", "base", "normalize"))
def entropy(
  p: ArrayLike,
  axis: Axis = -1,
  where: ArrayLike | None = None,
  base: float | None = None,
  *,
  normalize: bool = False,
) -> jax.Array:
  r"""Shannon entropy of probability vectors.

  .. math::

    H(p) = -\sum_i p_i \log_b p_i, \qquad 0 \log 0 = 0.

  The average surprisal of an outcome drawn from `p`. It lies in
  `[0, log_b K]` for `K` classes: 0 for a certain outcome, `log_b K` (the
  maximum) for the uniform distribution, so 8 equally likely outcomes carry
  3 bits.

  Args:
    p: probabilities `[..., num_classes]` (summing to 1 along `axis`),
      floating dtype.
    axis: the class axis (or a tuple of axes) to sum over.
    where: optional mask (bool or integer 0/1) broadcastable to `p`; masked elements are
      left out of the sum.
    base: logarithm base; None for nats, 2 for bits, any number > 0 and != 1.
    normalize: keyword-only; if True, divide `p` by their sums along `axis`
      (over the kept elements) first, as `scipy.stats.entropy` does. Default
      False: the inputs are used as given.

  Returns:
    Array of `p`'s shape without `axis`: float32 for 16-bit inputs, otherwise
    `p`'s dtype.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> print(round(float(xentjax.info.entropy(jnp.full(8, 1 / 8), base=2)), 5))
    3.0

  Note:
    A zero probability contributes 0 to the value and 0 to the gradient (the
    one-sided derivative of `-p log p` at 0 is `+inf`; we take 0 so gradients
    stay finite). A fully masked vector has entropy 0 and a zero gradient.
    A negative (or NaN) kept entry gives NaN (checked before ``normalize``:
    ``entropy([.5, -.1, .6], normalize=True)`` is NaN).

  References:
    C. E. Shannon, "A Mathematical Theory of Communication", 1948.
  """
  scale = log_base_scale(base)
  p = _as_float("p", p)
  if p.ndim == 0:
    raise ValueError(f"`p` must have at least one dimension (the class axis), got shape {p.shape}.")
  axes = normalize_axis("axis", axis, p.ndim)
  keep = _mask(where, p.shape, "p")
  p = p.astype(compute_dtype(p.dtype))
  bad = _not_a_distribution(axes, keep, p)
  if _check_normalize(normalize):
    p = _normalized(p, axes, keep)
  return _in_base(_poison(jnp.sum(_entropy_terms(p, keep), axis=axes), bad), scale)


def _check_normalize(normalize) -> bool:
  if not isinstance(normalize, (bool, np.bool_)):
    raise TypeError(f"`normalize` must be True or False, got {normalize!r}.")
  return bool(normalize)


def _pair(name_p, p, name_q, q, axis, where, normalize=False):
  p = _as_float(name_p, p)
  q = _as_float(name_q, q)
  shape, axes = _common_shape(name_p, p, name_q, q, axis)
  keep = _mask(where, shape, name_p)
  dt = compute_dtype(p.dtype, q.dtype)
  p = jnp.broadcast_to(astype_exact(p, dt), shape)
  q = jnp.broadcast_to(astype_exact(q, dt), shape)
  if _check_normalize(normalize):
    p, q = _normalized(p, axes, keep), _normalized(q, axes, keep)
  return p, q, axes, keep


def _pair_sum(terms, p, q, axis, where, base, normalize) -> jax.Array:
  """``sum(terms(p, q))`` over `axis`, in `base`: the divergences of `p` from `q` alike.

  NaN where a kept entry of `p` or `q` is negative or NaN (checked on the
  inputs as given, before `normalize`).
  """
  scale = log_base_scale(base)
  raw_p, raw_q, axes, keep = _pair("p", p, "q", q, axis, where)
  bad = _not_a_distribution(axes, keep, raw_p, raw_q)
  p, q = raw_p, raw_q
  if _check_normalize(normalize):
    p, q = _normalized(p, axes, keep), _normalized(q, axes, keep)
  return _in_base(_poison(jnp.sum(terms(p, q, keep), axis=axes), bad), scale)


# The arguments after `p` and `q`, and the result, of `cross_entropy`,
# `kl_divergence` and `js_divergence` (their docstrings' ``{pair_options}``).
_PAIR_OPTIONS = """axis: the class axis (or a tuple of axes) to sum over.
    where: optional mask (bool or integer 0/1) broadcastable to the broadcast shape of `p`
      and `q`; masked elements are left out of the sum.
    base: logarithm base; None for nats, 2 for bits, any number > 0 and != 1.
    normalize: keyword-only; if True, divide `p` and `q` by their sums along `axis`
      (over the kept elements) first, as `scipy.stats.entropy` does. Default
      False: the inputs are used as given.

  Returns:
    Array of the broadcast shape without `axis`: float32 for 16-bit inputs,
    otherwise the promoted dtype of `p` and `q`. NaN for a vector with a
    negative (or NaN) kept entry in `p` or `q` (the module's one rule)."""


@public(("axis", "base", "normalize"))
@doc_parts(pair_options=_PAIR_OPTIONS)
def cross_entropy(
  p: ArrayLike,
  q: ArrayLike,
  axis: Axis = -1,
  where: ArrayLike | None = None,
  base: float | None = None,
  *,
  normalize: bool = False,
) -> jax.Array:
  r"""Cross-entropy of `q` relative to `p`: the cost of coding `p` with `q`.

  .. math::

    H(p, q) = -\sum_i p_i \log_b q_i = H(p) + D_{KL}(p \,\|\, q),

  with `0 log q = 0` for every `q` (including `q = 0`). With a one-hot `p` it
  is `-log q[label]`, the classification loss: true `[0, 1, 0]` against
  predicted `[0.228, 0.619, 0.153]` gives `-ln 0.619 ≈ 0.47965`.

  Args:
    p: the true (target) distribution `[..., num_classes]`, floating dtype.
    q: the model distribution, broadcastable to `p` with the same size along
      `axis`, floating dtype.
    {pair_options}

  Example:
    >>> import xentjax
    >>> print(round(float(xentjax.info.cross_entropy([0., 1., 0.], [0.228, 0.619, 0.153])), 3))
    0.48

  Note:
    `q_i = 0` where `p_i > 0` gives `+inf`, never NaN; its gradient is the
    true limit (`-inf` in `q_i`, `+inf` in `p_i`). Where `p_i = q_i = 0` the
    term is 0 with a zero gradient. Where `p_i = 0 < q_i` the gradient in `p_i`
    is `-log q_i`, finite and exact.

  References:
    T. M. Cover and J. A. Thomas, "Elements of Information Theory", 2nd ed.,
    2006, section 2.3.
  """
  return _pair_sum(_cross_entropy_terms, p, q, axis, where, base, normalize)


@public_like(cross_entropy)  # the same arguments, so one signature
@doc_parts(pair_options=_PAIR_OPTIONS)
def kl_divergence(p, q, axis, where, base, normalize) -> jax.Array:
  r"""Kullback-Leibler divergence `D_KL(p || q)` between probability vectors.

  .. math::

    D_{KL}(p \,\|\, q) = \sum_i p_i \log_b \frac{p_i}{q_i} = H(p, q) - H(p) \ge 0,

  with `0 log(0 / q) = 0` for every `q`. The extra cost of coding samples of
  `p` with a code built for `q`; 0 exactly when `p = q` (Gibbs' inequality).
  Each term is computed as `p (log p - log q)` before summing, so nearly equal
  distributions do not lose precision to the cancellation `H(p, q) - H(p)`.

  Args:
    p: the reference distribution `[..., num_classes]`, floating dtype.
    q: the approximating distribution, broadcastable to `p` with the same size
      along `axis`, floating dtype.
    {pair_options}

  Example:
    >>> import xentjax
    >>> print(float(xentjax.info.kl_divergence([0.5, 0.5], [1.0, 0.0])))
    inf

  Note:
    `q_i = 0` where `p_i > 0` gives `+inf` (gradient: the true infinite
    limit), never NaN. A term with `p_i = 0` is 0; its gradient in `p_i` is
    `-log q_i` (0 if `q_i = 0`), i.e. the `p log p` part contributes a zero
    gradient there instead of its `-inf` one-sided derivative. Matches
    `scipy.special.rel_entr` summed over the axis.

  References:
    S. Kullback and R. A. Leibler, "On Information and Sufficiency", 1951.
  """
  return _pair_sum(_rel_entr_terms, p, q, axis, where, base, normalize)


@public_like(cross_entropy)  # the same arguments, so one signature
@doc_parts(pair_options=_PAIR_OPTIONS)
def js_divergence(p, q, axis, where, base, normalize) -> jax.Array:
  r"""Jensen-Shannon divergence: the symmetric, bounded relative of KL.

  .. math::

    JS(p, q) = \tfrac12 D_{KL}(p \,\|\, m) + \tfrac12 D_{KL}(q \,\|\, m),
    \qquad m = \tfrac12 (p + q).

  Symmetric, always finite, and in `[0, log_b 2]` (1 bit): the upper bound is
  reached by distributions with disjoint supports. It is the square of
  `scipy.spatial.distance.jensenshannon`.

  Args:
    p: a distribution `[..., num_classes]`, floating dtype.
    q: another, broadcastable to `p` with the same size along `axis`,
      floating dtype.
    {pair_options}

  Example:
    >>> import xentjax
    >>> print(float(xentjax.info.js_divergence([1.0, 0.0], [0.0, 1.0], base=2)))
    1.0

  Note:
    `m_i > 0` wherever `p_i > 0` or `q_i > 0`, so the value is never infinite;
    zero probabilities follow the `0 log 0 = 0` convention with finite
    gradients.

  References:
    J. Lin, "Divergence Measures Based on the Shannon Entropy", 1991.
  """
  return _pair_sum(_js_terms, p, q, axis, where, base, normalize)


def _log_softmax_over(z: jax.Array, axes, keep: jax.Array | None) -> jax.Array:
  """log_softmax over `axes`, masked classes at -inf, all-masked rows at -inf.

  Unlike `jax.nn.log_softmax(where=...)`, a fully masked row gives -inf (not
  NaN) and a zero gradient. A row whose kept logits are all -inf is not a
  distribution and gives NaN.
  """
  if keep is not None:
    z = jnp.where(keep, z, -jnp.inf)
  m = jnp.max(z, axis=axes, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0))
  shifted = z - m
  s = jnp.sum(jnp.exp(shifted), axis=axes, keepdims=True)
  if keep is not None:
    s = jnp.where(jnp.any(keep, axis=axes, keepdims=True), s, 1)
  return shifted - jnp.log(s)


@public(("axis", "base"))
def kl_divergence_from_logits(
  p_logits: ArrayLike,
  q_logits: ArrayLike,
  axis: Axis = -1,
  where: ArrayLike | None = None,
  base: float | None = None,
) -> jax.Array:
  r"""KL divergence between the softmax distributions of two sets of logits.

  .. math::

    \begin{aligned}
    D_{KL}(\mathrm{softmax}(a) \,\|\, \mathrm{softmax}(b))
      &= \sum_i p_i (\log p_i - \log q_i), \\
    \log p = a - \operatorname{logsumexp}(a), &\quad
    \log q = b - \operatorname{logsumexp}(b).
    \end{aligned}

  Works entirely in log space (no `log(softmax(.))`), so it is stable for
  logits of any magnitude (±1e4 included): the distillation loss with `a` the
  teacher's and `b` the student's logits (Hinton et al., "Distilling the
  Knowledge in a Neural Network", 2015).

  Args:
    p_logits: logits of the reference distribution `[..., num_classes]`,
      floating dtype.
    q_logits: logits of the approximating distribution, broadcastable to
      `p_logits` with the same size along `axis`, floating dtype.
    axis: the class axis (or a tuple of axes) the softmax runs over.
    where: optional mask (bool or integer 0/1) broadcastable to the broadcast shape; masked
      classes are removed from both distributions (both softmaxes renormalize
      over the kept classes), e.g. the padding of a vocabulary.
    base: logarithm base; None for nats, 2 for bits, any number > 0 and != 1.

  Returns:
    Array of the broadcast shape without `axis`: float32 for 16-bit inputs,
    otherwise the promoted dtype of the logits.

  Example:
    >>> import xentjax
    >>> print(float(xentjax.info.kl_divergence_from_logits([1e4, 0.], [1e4, 0.])))
    0.0

  Note:
    A class with logit `-inf` in `p_logits` has `p_i = 0` and contributes 0
    (value and gradient), whatever `q_logits` holds there, `-inf` included.
    A class with finite `p_logits` but `-inf` in `q_logits` gives `+inf`
    (`q` puts no mass where `p` does), never NaN; its gradient in `q_logits`
    is still the exact `softmax(q_logits) - softmax(p_logits)`, and the
    infinite term contributes nothing to the gradient in `p_logits` (so no
    NaN there either). This holds even where `p_i` underflows to 0 from a
    finite logit. A fully masked row gives 0 with a zero gradient; `+inf`
    logits, and a row of `-inf` logits that is not masked, give NaN (neither
    is a distribution).

  References:
    G. Hinton, O. Vinyals and J. Dean, "Distilling the Knowledge in a Neural
    Network", 2015.
  """
  scale = log_base_scale(base)
  a, b, axes, keep = _pair("p_logits", p_logits, "q_logits", q_logits, axis, where)
  log_p = _log_softmax_over(a, axes, keep)
  log_q = _log_softmax_over(b, axes, keep)
  p = jnp.exp(log_p)
  pos = p > 0
  q_fin = log_q > -jnp.inf
  finite = p * (jnp.where(pos, log_p, 0) - jnp.where(pos & q_fin, log_q, 0))
  # Where p has mass and q has none the term is +inf. Its value comes from
  # -p log q with p held constant: the gradient in q_logits stays the exact
  # (finite) q - p, and no inf reaches the softmax of p_logits, where it would
  # turn into inf - inf = NaN.
  infinite = -jax.lax.stop_gradient(p) * jnp.where(pos & ~q_fin, log_q, 0)
  term = jnp.where(q_fin, finite, infinite)
  # p may underflow to 0 while its log is finite; if q has no mass there the
  # true term is still +inf.
  lost = (p == 0) & (log_p > -jnp.inf) & ~q_fin
  term = jnp.where(lost, jnp.inf, term)
  return _in_base(jnp.sum(term, axis=axes), scale)


# ----------------------------------------------------------------------------
# Variational lower bounds on mutual information (Poole et al., 2019).
#
# Each takes the critic's scores S [..., B, B] (row i the sample a_i, column j
# the sample b_j, the positives on the diagonal) or, in
# `mutual_information_bounds`, the embeddings whose scores they are. Both go
# through the same four rows per i: lse_i = log sum_j e^{S_ij}, zy_i = S_ii,
# lse_off_i = log sum_{j != i} e^{S_ij} and sp_off_i = sum_{j != i} softplus(S_ij),
# and one function turns rows into bounds (`_bounds_from_rows`).


class MutualInformationBounds(NamedTuple):
  """The four variational lower bounds on :math:`I(A; B)` of one batch of critic scores.

  ``infonce`` (van den Oord et al.), ``nwj`` (Nguyen, Wainwright and Jordan),
  ``dv`` (Donsker and Varadhan; MINE) and ``js`` (the Jensen-Shannon
  estimator of Deep InfoMax, without TFP's ``+ log 4``), each of the shape
  of the scores without their last two axes, in the requested base. See
  `infonce_lower_bound`, `nwj_lower_bound`, `dv_lower_bound` and
  `js_lower_bound`.
  """

  infonce: jax.Array
  nwj: jax.Array
  dv: jax.Array
  js: jax.Array


def _check_batch_size(value):
  """A batch size must be >= 1 (checked unless traced; a traced one gives NaN below 1)."""
  if value is None or isinstance(value, jax.core.Tracer):
    return value
  if isinstance(value, (bool, np.bool_, str)) or not np.issubdtype(
    np.asarray(value).dtype, np.number
  ):
    raise TypeError(f"`batch_size` must be a number of candidates >= 1, got {value!r}.")
  arr = np.asarray(value)
  if not np.all(np.isfinite(arr) & (arr >= 1)):
    raise ValueError(
      "`batch_size` must be >= 1 (the number of candidates each positive competed with, "
      f"itself included), got {value!r}."
    )
  return value


def _loss_as_float(value):
  """An integer loss (``0``, ``np.int32(2)``) is a number of nats: read as float."""
  if value is None or isinstance(value, (bool, np.bool_)):
    return value
  arr = value if isinstance(value, jax.Array) else np.asarray(value)
  if jnp.issubdtype(arr.dtype, jnp.integer):
    return jnp.asarray(arr, jnp.result_type(float))
  return value


def _scores(scores: ArrayLike) -> jax.Array:
  s = _as_float("scores", scores)
  if s.ndim < 2 or s.shape[-1] != s.shape[-2] or s.shape[-1] == 0:
    raise ValueError(
      "`scores` must be a (batch of) square critic matrix [..., B, B] with B >= 1 (row i the "
      f"sample a_i, column j the sample b_j, the positives on the diagonal), got {s.shape}."
    )
  return s.astype(compute_dtype(s.dtype))


def _score_rows(s: jax.Array) -> dict:
  """The four rows of the bounds from a score matrix ``[..., B, B]``."""
  n = s.shape[-1]
  off = ~jnp.eye(n, dtype=bool)
  return {
    "lse": jax.nn.logsumexp(s, axis=-1),
    "zy": jnp.diagonal(s, axis1=-2, axis2=-1),
    "lse_off": jax.nn.logsumexp(jnp.where(off, s, -jnp.inf), axis=-1),
    "sp_off": jnp.sum(jnp.where(off, jax.nn.softplus(s), 0.0), axis=-1),
  }


def _row_cross_entropy(lse, zy):
  r"""``lse - zy`` per row: ``+inf`` where the positive is ``-inf``, never below 0.

  ``lse >= zy`` holds in exact arithmetic; rounded, XLA's fusion of the
  scores' own product into the log-sum-exp (a fused multiply-add) can put it
  an ulp below. Such a difference is taken as 0 (its gradient stays the
  row's), so that the InfoNCE bound never passes :math:`\log B`.
  """
  ce = jnp.where(zy == -jnp.inf, jnp.inf, lse - zy)
  return ce + jax.lax.stop_gradient(jnp.where(ce < 0, -ce, jnp.zeros_like(ce)))


def _bounds_from_rows(rows: dict, n: int, scale) -> MutualInformationBounds:
  """The four bounds from the rows of `_score_rows` (or the engine's), in the base ``scale``."""
  lse, zy = rows["lse"], rows["zy"]
  dt = zy.dtype
  infonce = math.log(n) - jnp.mean(_row_cross_entropy(lse, zy), axis=-1)
  joint = jnp.mean(zy, axis=-1)
  if n < 2:  # no pair off the diagonal: the mean of nothing (NaN, zero gradient)
    nan = jnp.full(joint.shape, jnp.nan, dt)
    others = (nan, nan, nan)
  else:
    pairs = float(n) * (n - 1)  # a Python float: past B = 46341 it overflows an int32
    log_mean_off = jax.nn.logsumexp(rows["lse_off"], axis=-1) - math.log(pairs)
    nwj = joint - jnp.exp(log_mean_off - 1.0)
    dv = joint - log_mean_off
    js = -jnp.mean(jax.nn.softplus(-zy), axis=-1) - jnp.sum(rows["sp_off"], axis=-1) / pairs
    others = (nwj, dv, js)
  return MutualInformationBounds(*(_in_base(v.astype(dt), scale) for v in (infonce, *others)))


# The docstrings' ``{vacuous}``: what every bound shares.
_VACUOUS = r"""The bounds of Poole et al. hold for any critic, so of two critics the one
  with the higher bound is the better; a bound is not an estimate of
  :math:`I` itself. Early in training, or with a poor critic, a bound can
  be negative: it then says nothing (it is vacuous), as :math:`I \ge 0`
  always holds."""


@public(("base",), validators={"loss": _loss_as_float, "batch_size": _check_batch_size})
def infonce_lower_bound(
  loss: ArrayLike | None = None,
  batch_size: ArrayLike | None = None,
  base: float | None = None,
  *,
  scores: ArrayLike | None = None,
) -> jax.Array:
  r"""The InfoNCE lower bound on mutual information, :math:`I(A; B) \ge \log B - L`.

  From a contrastive (InfoNCE) loss :math:`L` in nats, the mean over a batch
  of :math:`B` positive pairs of the cross-entropy of each positive among the
  :math:`B` candidates of its row (`xentjax.contrastive_loss` with
  ``symmetric=False``, or the symmetric loss, whose two directions each give
  the bound), or from the critic's scores :math:`S` (``scores=``, as
  ``tfp.vi.mutual_information.lower_bound_info_nce``):

  .. math::

    I(A; B) \;\ge\; \log B - L
      = \frac{1}{B} \sum_i S_{ii}
        - \frac{1}{B} \sum_i \log \sum_j e^{S_{ij}} + \log B.

  **Ceiling, bias, variance.** The bound never exceeds :math:`\log B` (the
  loss is a cross-entropy, never negative; in float32 too), so measuring a
  mutual information of :math:`I` nats needs :math:`B \ge e^I` pairs per
  batch (McAllester and Stratos, 2020). It is tight when the critic equals
  :math:`\log p(b \mid a) / p(b)` up to a function of :math:`a` and
  :math:`I \ll \log B`; otherwise it is biased low, with low variance
  (Poole et al., 2019). **Vacuous when negative:** a loss above
  :math:`\log B` (a critic worse than guessing, as at the start of
  training) gives a negative value, which bounds nothing.

  Args:
    loss: the contrastive loss in nats (any shape; e.g. per batch). An
      integer is read as a number of nats.
    batch_size: :math:`B`, the number of candidates each positive competed
      with (its own included), >= 1; a number or an array broadcastable to
      ``loss`` (a traced value below 1 gives NaN).
    base: None for nats, 2 for bits, any number > 0 and != 1.
    scores: instead of ``loss`` and ``batch_size``: the critic's scores
      ``[..., B, B]``, :math:`S_{ij} = f(a_i, b_j)`, positives on the diagonal.

  Returns:
    The bound in the chosen base, float (float32 for 16-bit input): the
    shape of ``loss`` (broadcast with ``batch_size``), or of ``scores``
    without its last two axes.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> print(round(float(xentjax.info.infonce_lower_bound(0.0, 8, base=2)), 6))
    3.0
    >>> print(round(float(xentjax.info.infonce_lower_bound(scores=10 * jnp.eye(4))), 4))
    1.3862

  Note:
    With ``scores``: B = 1 gives 0; a positive score of ``-inf`` makes its
    row's cross-entropy ``+inf`` (the bound ``-inf``), its whole row ``-inf``
    included; a NaN score gives NaN.

  References:
    A. van den Oord et al., "Representation Learning with Contrastive
    Predictive Coding", 2018; B. Poole et al., "On Variational Bounds of
    Mutual Information", 2019; D. McAllester and K. Stratos, "Formal
    Limitations on the Measurement of Mutual Information", 2020.
  """
  scale = log_base_scale(base)
  if scores is not None:
    if loss is not None or batch_size is not None:
      raise ValueError("Pass either `loss` and `batch_size`, or `scores`, not both.")
    s = _scores(scores)
    return _bounds_from_rows(_score_rows(s), s.shape[-1], scale).infonce
  if loss is None or batch_size is None:
    raise ValueError("`infonce_lower_bound` needs `loss` and `batch_size` (or `scores=`).")
  loss = _as_float("loss", loss)
  n = jnp.asarray(batch_size)
  dt = compute_dtype(loss.dtype)
  log_n = jnp.log(jnp.where(n >= 1, n, jnp.nan).astype(dt))
  return _in_base(log_n - loss.astype(dt), scale)


@public(("base",))
@doc_parts(vacuous=_VACUOUS)
def nwj_lower_bound(scores: ArrayLike, base: float | None = None) -> jax.Array:
  r"""The NWJ lower bound on mutual information (Nguyen, Wainwright and Jordan; f-GAN KL).

  From the critic's scores :math:`S` ``[..., B, B]`` (positives on the
  diagonal), with :math:`L` the log of the mean of :math:`e^{S_{ij}}` over
  the :math:`B(B-1)` pairs off the diagonal (as
  ``tfp.vi.mutual_information.lower_bound_nguyen_wainwright_jordan``):

  .. math::

    I_{\mathrm{NWJ}} = \frac{1}{B} \sum_i S_{ii} - e^{L - 1}, \qquad
    L = \log \frac{1}{B(B-1)} \sum_{i \ne j} e^{S_{ij}}.

  **Bias, variance, ceiling.** Unbiased as an estimate of its own
  expectation, which equals :math:`I` for the critic :math:`1 + \log p(b
  \mid a)/p(b)`; no ceiling such as :math:`\log B`, but its variance grows
  like :math:`e^{I}` (the exponential of the scores), so large mutual
  information is estimated with large variance (Poole et al., 2019; Song
  and Ermon, 2020).

  {vacuous}

  Args:
    scores: critic scores ``[..., B, B]``, :math:`S_{ij} = f(a_i, b_j)`, floating.
    base: None for nats, 2 for bits, any number > 0 and != 1.

  Returns:
    The bound, of the shape of ``scores`` without its last two axes (float32
    for 16-bit input). B = 1 (no pair off the diagonal) gives NaN with a
    zero gradient; a NaN score gives NaN.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> print(round(float(xentjax.info.nwj_lower_bound(jnp.eye(4))), 4))
    0.6321

  References:
    X. Nguyen, M. J. Wainwright and M. I. Jordan, "Estimating divergence
    functionals and the likelihood ratio by convex risk minimization", 2010;
    B. Poole et al., "On Variational Bounds of Mutual Information", 2019.
  """
  s = _scores(scores)
  return _bounds_from_rows(_score_rows(s), s.shape[-1], log_base_scale(base)).nwj


@public(("base",))
@doc_parts(vacuous=_VACUOUS)
def dv_lower_bound(scores: ArrayLike, base: float | None = None) -> jax.Array:
  r"""The Donsker-Varadhan lower bound on mutual information (MINE).

  From the critic's scores :math:`S` ``[..., B, B]`` (positives on the
  diagonal), with :math:`L` as in `nwj_lower_bound` (Poole et al.'s code;
  TFP has no DV bound):

  .. math::

    I_{\mathrm{DV}} = \frac{1}{B} \sum_i S_{ii} - L, \qquad
    L = \log \frac{1}{B(B-1)} \sum_{i \ne j} e^{S_{ij}}.

  **Bias, variance, ceiling.** Tighter than NWJ for the same critic
  (:math:`I_{\mathrm{DV}} \ge I_{\mathrm{NWJ}}`, since :math:`e^{L-1} \ge
  L`), but the log of a batch mean makes it a biased estimate of its own
  value: it is a lower bound only in expectation over a large batch, and
  its batch estimate, and MINE's gradient, are biased (Belghazi et al.,
  2018); high variance, like NWJ's; no ceiling.

  {vacuous}

  Args:
    scores: critic scores ``[..., B, B]``, floating.
    base: None for nats, 2 for bits, any number > 0 and != 1.

  Returns:
    The bound, of the shape of ``scores`` without its last two axes. B = 1
    gives NaN with a zero gradient; a NaN score gives NaN.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> print(round(float(xentjax.info.dv_lower_bound(jnp.eye(4))), 4))
    1.0

  References:
    M. D. Donsker and S. R. S. Varadhan, "Asymptotic evaluation of certain
    Markov process expectations for large time", 1983; M. I. Belghazi et
    al., "Mutual Information Neural Estimation", 2018; B. Poole et al., "On
    Variational Bounds of Mutual Information", 2019.
  """
  s = _scores(scores)
  return _bounds_from_rows(_score_rows(s), s.shape[-1], log_base_scale(base)).dv


@public(("base",))
def js_lower_bound(scores: ArrayLike, base: float | None = None) -> jax.Array:
  r"""The Jensen-Shannon mutual-information estimator of Deep InfoMax (as TFP has it).

  From the critic's scores :math:`S` ``[..., B, B]`` (positives on the
  diagonal), as ``tfp.vi.mutual_information.lower_bound_jensen_shannon``:

  .. math::

    I_{\mathrm{JS}} = -\frac{1}{B} \sum_i \operatorname{softplus}(-S_{ii})
      - \frac{1}{B(B-1)} \sum_{i \ne j} \operatorname{softplus}(S_{ij}).

  This is the variational lower bound on the Jensen-Shannon divergence
  between :math:`p(a, b)` and :math:`p(a)p(b)` minus :math:`\log 4`, which,
  like TFP, is not added back: the value is at most 0 (a classifier's
  negative log-likelihoods), and it is not a bound on :math:`I` in nats
  itself. Its critic is trained with low variance and its optimum is
  :math:`\log p(b \mid a)/p(b)`, which the other bounds can then evaluate
  (Poole et al., 2019; Hjelm et al., 2019).

  Like the bounds, it can be negative early in training; being at most 0,
  its value is read against the other bounds, or against itself over
  training, not as nats of information.

  Args:
    scores: critic scores ``[..., B, B]``, floating.
    base: None for nats, 2 for bits, any number > 0 and != 1.

  Returns:
    The estimate (<= 0), of the shape of ``scores`` without its last two
    axes. B = 1 gives NaN with a zero gradient; a NaN score gives NaN.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> print(round(float(xentjax.info.js_lower_bound(jnp.zeros((3, 3)))), 4))
    -1.3863

  References:
    R. D. Hjelm et al., "Learning deep representations by mutual information
    estimation and maximization", 2019; S. Nowozin et al., "f-GAN", 2016;
    B. Poole et al., "On Variational Bounds of Mutual Information", 2019.
  """
  s = _scores(scores)
  return _bounds_from_rows(_score_rows(s), s.shape[-1], log_base_scale(base)).js


@public(("base", *SWEEP_OPTIONS), validators={"scale": check_scale, **TILE_OPTIONS})
def mutual_information_bounds(
  a: ArrayLike,
  b: ArrayLike,
  *,
  scale: ArrayLike = 1.0,
  bias: ArrayLike = 0.0,
  base: float | None = None,
  row_chunk_size: int | None = None,
  column_chunk_size: int | None = None,
  precision: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  data_axis: Any = None,
) -> MutualInformationBounds:
  r"""All four variational bounds on :math:`I(A; B)` from paired embeddings, in one sweep.

  The critic is the bilinear score of a contrastive model,

  .. math::

    S_{ij} = s\, a_i \cdot b_j + \beta,

  and the result equals `infonce_lower_bound` (``scores=S``),
  `nwj_lower_bound`, `dv_lower_bound` and `js_lower_bound` on that matrix,
  but :math:`S` is never formed: one sweep of the contrastive engine over
  ``[row, column]`` tiles keeps four numbers per row (the row's log-sum-exp,
  its positive, the log-sum-exp and the softplus sum of its other columns),
  and the backward pass recomputes the tiles. Temporary memory is
  O(B·D + tile); with ``mesh`` the rows are sharded over ``data_axis`` and
  ``b`` travels around a ring of the devices, as in
  `xentjax.contrastive_loss`.

  Args:
    a: ``[B, D]`` embeddings of the first variable (row i pairs with ``b[i]``).
    b: ``[B, D]`` embeddings of the second.
    scale: :math:`s`, a scalar (array: differentiable, may be traced; a
      Python number must be > 0; a traced one that is not finite and > 0
      gives NaN, as in `xentjax.contrastive_loss`).
    bias: :math:`\beta`, a scalar (array: differentiable). It cancels in
      InfoNCE and moves the other three.
    base: None for nats, 2 for bits, any number > 0 and != 1.
    row_chunk_size, column_chunk_size, precision, mesh, data_axis: as in
      `xentjax.contrastive_loss`.

  Returns:
    `MutualInformationBounds` ``(infonce, nwj, dv, js)``, scalars (float32
    for 16-bit inputs, else the promoted dtype), differentiable with respect
    to ``a``, ``b``, ``scale`` and ``bias``. B = 1 gives InfoNCE 0 and NaN
    for the other three.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> bounds = xentjax.info.mutual_information_bounds(jnp.eye(4), jnp.eye(4), scale=10.0)
    >>> print(round(float(bounds.infonce), 4), round(float(bounds.dv), 4))
    1.3862 10.0

  References:
    B. Poole et al., "On Variational Bounds of Mutual Information", 2019.
  """
  rows = critic_statistics(
    a,
    b,
    scale,
    bias,
    row_chunk_size=row_chunk_size,
    column_chunk_size=column_chunk_size,
    precision=precision,
    mesh=mesh,
    data_axis=data_axis,
  )
  return _bounds_from_rows(rows, rows["zy"].shape[0], log_base_scale(base))
