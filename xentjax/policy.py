"""Policy-gradient losses for language models, composed on per-token log-probabilities.

Reinforcement learning on a language model (PPO, GRPO and its variants) trains
the output head with a loss built from a few numbers per generated token: the
log-probability of the sampled token under the current policy, under the
policy that sampled it (``old_logprobs``) and under a frozen reference
(``ref_logprobs``). `xentjax.linear_token_stats` gives the first one (and the
entropy) at vocabulary scale without ever forming the logits; the functions
here turn those numbers into the loss. They are ordinary differentiable JAX
code, so ``jax.grad`` of the composition reaches the hidden states and the head
through the fused engine's backward pass.

==============================  =====================================================
recipe                          how to call it
==============================  =====================================================
GRPO (DeepSeekMath, 2024)       ``group_advantages(r, G)``; ``normalization="sequence"``
Dr. GRPO (Liu et al., 2025)     ``group_advantages(r, G, scale=False)``;
                                ``normalization="constant"`` with ``max_length``
DAPO (Yu et al., 2025)          ``epsilon=0.2, epsilon_high=0.28``;
                                ``normalization="token"``
KL to a reference policy        ``ref_logprobs=..., kl_coef=beta`` (k3 estimator)
gradient accumulation           ``denominator=`` the count over the whole batch
==============================  =====================================================

Shapes: ``logprobs``, ``old_logprobs``, ``ref_logprobs`` and ``where`` are
``[B, T]`` (B sequences of T tokens, padding masked out by ``where``);
``advantages`` is ``[B]`` (one per sequence, as GRPO) or ``[B, T]``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from xentjax import _core
from xentjax import _validation as V
from xentjax._api import ArrayLike, Mask, broadcast_to_first, public, where_mask

__all__ = ["group_advantages", "kl_penalty", "policy_gradient_loss"]

Normalization = Literal["sequence", "token", "constant"]
Estimator = Literal["k1", "k2", "k3"]


def _normalization(value):
  if value not in ("sequence", "token", "constant"):
    raise ValueError(
      f"`normalization` must be 'sequence' (GRPO), 'token' (DAPO) or 'constant' "
      f"(Dr. GRPO), got {value!r}."
    )
  return value


def _estimator(value):
  if value not in ("k1", "k2", "k3"):
    raise ValueError(f"`estimator` must be 'k1', 'k2' or 'k3', got {value!r}.")
  return value


def _max_length(value):
  return V.int_option("max_length", value, low=1, allow_none=True)


def _nonnegative(name):
  def check(value):
    if isinstance(value, (bool, str)):
      raise TypeError(f"`{name}` must be a number or an array, got {V.describe(value)}.")
    if isinstance(value, (int, float)):
      V.check_nonnegative(name, value)
    return value

  return check


def _denominator(value):
  """A Python number must be finite and > 0 (the fused losses' rule); arrays are traced."""
  if value is None or isinstance(value, (jax.Array, np.ndarray)):
    return value
  return V.positive_finite("denominator", value, " (the count of the whole accumulated batch)")


def _bool_option(value):
  if not isinstance(value, bool):
    raise TypeError(f"`scale` must be True or False, got {V.describe(value)}.")
  return value


def _check_group(rewards, group_size):
  if rewards.ndim != 1:
    raise ValueError(f"`rewards` must be a vector [B], got shape {rewards.shape}.")
  if rewards.shape[0] % group_size:
    raise ValueError(
      f"`rewards` holds {rewards.shape[0]} rewards, not a whole number of groups of "
      f"group_size={group_size}: completions of one prompt must sit together, "
      "G consecutive entries per prompt."
    )


@public(
  static=("group_size", "scale", "ddof"),
  validators={
    "group_size": lambda v: V.int_option("group_size", v, low=1),
    "ddof": lambda v: V.int_option("ddof", v, low=0),
    "scale": _bool_option,
    "eps": _nonnegative("eps"),
  },
)
def group_advantages(
  rewards: ArrayLike, group_size: int, *, scale: bool = True, eps: ArrayLike = 1e-4, ddof: int = 1
) -> jax.Array:
  r"""Group-relative advantages: each reward against the other completions of its prompt.

  .. math::

    A_i = \frac{r_i - \bar r_{g(i)}}{\sigma_{g(i)} + \epsilon}
    \quad (\texttt{scale=True}), \qquad
    A_i = r_i - \bar r_{g(i)} \quad (\texttt{scale=False}),

  with :math:`\bar r_g` and :math:`\sigma_g` the mean and standard deviation
  (``ddof=1``: the sample one, as ``torch.std``) of the ``group_size``
  rewards of group :math:`g`. GRPO scales by the deviation; Dr. GRPO does not
  (the scaling weights easy and hard prompts unequally).

  Args:
    rewards: ``[B]``, the completions of one prompt in ``group_size``
      consecutive entries (B a multiple of ``group_size``).
    group_size: completions per prompt, G.
    scale: divide by the group's standard deviation plus ``eps``.
    eps: added to the deviation (a group of equal rewards gets advantage 0).
    ddof: delta degrees of freedom of the deviation.

  Returns:
    ``[B]`` advantages in the rewards' floating dtype (float32 for integers).
  """
  r = jnp.asarray(rewards)
  _check_group(r, group_size)
  r = r.astype(jnp.result_type(r.dtype, jnp.float32)) if not _floating(r) else r
  g = r.reshape(-1, group_size)
  centred = g - g.mean(axis=1, keepdims=True)
  if scale:
    dof = max(group_size - ddof, 1)
    sd = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / dof)
    centred = centred / (sd + jnp.asarray(eps, r.dtype))
  return centred.reshape(r.shape)


def _floating(a) -> bool:
  return jnp.issubdtype(a.dtype, jnp.floating)


@public(static=("estimator",), validators={"estimator": _estimator})
def kl_penalty(
  logprobs: ArrayLike, ref_logprobs: ArrayLike, *, estimator: Estimator = "k3"
) -> jax.Array:
  r"""Per-token estimate of :math:`\mathrm{KL}(\pi \,\|\, \pi_\mathrm{ref})` from sampled tokens.

  With :math:`\delta = \log \pi_\mathrm{ref}(a) - \log \pi(a)` for a token
  :math:`a \sim \pi` (Schulman, "Approximating KL divergence", 2020):

  .. math::

    k_1 = -\delta, \qquad k_2 = \tfrac12 \delta^2, \qquad
    k_3 = e^{\delta} - \delta - 1 \;(\ge 0).

  All three have expectation KL (k1, k3 unbiased; k2 to second order); k3,
  the one GRPO uses, is never negative and has the lowest variance.

  Args:
    logprobs: ``[...]`` log-probabilities of the sampled tokens under the policy.
    ref_logprobs: the same tokens under the reference policy, same shape.
    estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

  Returns:
    ``[...]`` per-token estimates. :math:`\log \pi_\mathrm{ref}(a) = -\infty`
    (a token the reference forbids) gives ``+inf`` for k2 and k3.
  """
  lp, ref = jnp.asarray(logprobs), jnp.asarray(ref_logprobs)
  if lp.shape != ref.shape:
    raise ValueError(
      f"`ref_logprobs` must have the shape of `logprobs`, got {ref.shape} and {lp.shape}."
    )
  delta = ref - lp
  if estimator == "k1":
    return -delta
  if estimator == "k2":
    return 0.5 * delta**2
  return jnp.expm1(delta) - delta


def _per_token(lp, old, adv, eps_low, eps_high):
  """``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` with ``r = exp(lp - old)``."""
  ratio = jnp.exp(lp - old)
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  return -jnp.minimum(ratio * adv, clipped * adv)


def _masked_inputs(mask, lp, old, adv, ref):
  """The inputs with 0 where `mask` is False, before any arithmetic.

  Padding may hold ``-inf`` or NaN; the `where` comes first so that the
  untaken branch is finite and a masked token adds 0 to the gradient, not NaN.
  """

  def keep(a):
    return None if a is None else jnp.where(mask, a, jnp.zeros((), a.dtype))

  return keep(lp), keep(old), keep(adv), keep(ref)


def _normalize(per_token, mask, normalization, max_length, denominator):
  """The reduction of each recipe: per sequence then over sequences, per token, or constant."""
  maskf = mask.astype(per_token.dtype)
  total_tok = jnp.sum(per_token * maskf, axis=-1)
  if normalization == "sequence":
    n_tok = jnp.sum(maskf, axis=-1)
    seq = jnp.where(n_tok > 0, total_tok / jnp.where(n_tok > 0, n_tok, 1.0), 0.0)
    total, count = jnp.sum(seq), jnp.sum(n_tok > 0)
  elif normalization == "token":
    total, count = jnp.sum(total_tok), jnp.sum(maskf)
  else:  # a constant, but over nothing counted NaN, as the other two (the empty-mean rule)
    length = per_token.shape[-1] if max_length is None else max_length
    total, count = jnp.sum(total_tok), jnp.where(jnp.any(mask), per_token.shape[0] * length, 0)
  if denominator is not None:  # a traced one that is not finite and > 0: NaN, zero gradients
    d = jax.lax.stop_gradient(jnp.asarray(denominator, per_token.dtype))
    count = jnp.where((d > 0) & (d < jnp.inf), d, 0)
  return _core.mean_or_nan(total, jnp.asarray(count, per_token.dtype))


def _check_shapes(lp, adv, others):
  if lp.ndim != 2:
    raise ValueError(f"`logprobs` must be [B, T] (sequences x tokens), got shape {lp.shape}.")
  for name, a in others.items():
    if a is not None and a.shape != lp.shape:
      raise ValueError(f"`{name}` must have the shape of `logprobs` {lp.shape}, got {a.shape}.")
  if adv.shape not in (lp.shape[:1], lp.shape):
    raise ValueError(
      f"`advantages` must be [B] (one per sequence) or [B, T], got {adv.shape} for "
      f"`logprobs` of shape {lp.shape}."
    )


@public(
  static=("normalization", "max_length"),
  validators={
    "normalization": _normalization,
    "max_length": _max_length,
    "epsilon": _nonnegative("epsilon"),
    "epsilon_high": _nonnegative("epsilon_high"),
    "kl_coef": _nonnegative("kl_coef"),
    "denominator": _denominator,
  },
)
def policy_gradient_loss(
  logprobs: ArrayLike,
  advantages: ArrayLike,
  where: Mask = None,
  *,
  old_logprobs: ArrayLike | None = None,
  ref_logprobs: ArrayLike | None = None,
  epsilon: ArrayLike = 0.2,
  epsilon_high: ArrayLike | None = None,
  kl_coef: ArrayLike | None = None,
  normalization: Normalization = "sequence",
  max_length: int | None = None,
  denominator: ArrayLike | None = None,
) -> jax.Array:
  r"""The clipped policy-gradient loss of PPO/GRPO, with each recipe's normalization.

  Per token :math:`t` of sequence :math:`i`, with
  :math:`r_{it} = \exp(\log\pi(a_{it}) - \log\pi_\mathrm{old}(a_{it}))`:

  .. math::

    \begin{aligned}
    \ell_{it} &= -\min\bigl(r_{it} A_{it},\;
       \operatorname{clip}(r_{it}, 1 - \epsilon, 1 + \epsilon_\mathrm{high})\, A_{it}\bigr)
       + \beta\, k_3(\pi, \pi_\mathrm{ref})_{it}, \\
    L_\mathrm{sequence} &= \frac{1}{|S|} \sum_{i \in S}
       \frac{1}{|o_i|} \sum_{t \in o_i} \ell_{it}, \qquad
    L_\mathrm{token} = \frac{\sum_{i} \sum_{t \in o_i} \ell_{it}}{\sum_i |o_i|}, \\
    L_\mathrm{constant} &= \frac{\sum_{i} \sum_{t \in o_i} \ell_{it}}{B\, T_\mathrm{max}},
    \end{aligned}

  where :math:`o_i` are the counted tokens of sequence :math:`i` (``where``)
  and :math:`S` the sequences with at least one. ``"sequence"`` is GRPO's
  average (a long answer's tokens weigh less), ``"token"`` DAPO's (every token
  weighs the same), ``"constant"`` Dr. GRPO's (no length bias at all).

  Without ``old_logprobs`` the update is on-policy: :math:`\pi_\mathrm{old}`
  is ``stop_gradient(logprobs)``, so :math:`r = 1` and the gradient is
  :math:`-A\, \nabla \log \pi(a)` (REINFORCE with the advantage).

  Args:
    logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the
      policy being trained (e.g. ``linear_token_stats(...).logprob``).
    advantages: ``[B]`` (per sequence) or ``[B, T]``; no gradient flows into them.
    where: ``[B, T]`` mask of the generated tokens (bool, or integer 0/1), or
      one that broadcasts to it (``[B, 1]``: whole sequences).
    old_logprobs: ``[B, T]`` under the sampling policy; None: on-policy.
    ref_logprobs: ``[B, T]`` under the reference policy, for the KL term.
    epsilon: the lower clip range (and the upper one when ``epsilon_high`` is None).
    epsilon_high: DAPO's "clip-higher" upper range.
    kl_coef: :math:`\beta`, the weight of the k3 KL estimate (`kl_penalty`);
      given together with ``ref_logprobs``.
    normalization: ``"sequence"``, ``"token"`` or ``"constant"`` (see above).
    max_length: :math:`T_\mathrm{max}` of ``"constant"`` (default ``T``).
    denominator: replaces the denominator of the chosen normalization (the
      number of counted sequences, of counted tokens, or :math:`B T_\mathrm{max}`)
      by one over the whole accumulated batch: the microbatch losses of a
      gradient-accumulation step then add up to the full batch's loss. A
      Python number must be finite and > 0 (else `ValueError`); a traced one
      that is not gives NaN with zero gradients (as the fused losses).

  Returns:
    A scalar. Nothing counted gives NaN with a zero gradient (the library's
    empty-mean rule), in all three normalizations (``"constant"`` too, unless
    a ``denominator`` is given: then 0, what the microbatch adds). Masked
    tokens are never read: ``-inf`` or NaN padding in any input adds 0 to the
    loss and the gradient.
  """
  lp = jnp.asarray(logprobs)
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, lp.dtype))
  old = None if old_logprobs is None else jnp.asarray(old_logprobs)
  ref = None if ref_logprobs is None else jnp.asarray(ref_logprobs)
  mask = where_mask(where)
  _check_shapes(lp, adv, {"old_logprobs": old, "ref_logprobs": ref})
  mask = (
    jnp.ones(lp.shape, bool) if mask is None else broadcast_to_first("logprobs", lp, "where", mask)
  )
  adv = adv if adv.ndim == 2 else adv[:, None]
  old = jax.lax.stop_gradient(lp if old is None else old.astype(lp.dtype))
  lp, old, adv, ref = _masked_inputs(mask, lp, old, adv, ref)
  eps_high = epsilon if epsilon_high is None else epsilon_high
  per_token = _per_token(lp, old, adv, epsilon, eps_high)
  if (ref is None) != (kl_coef is None):
    raise ValueError(
      "`kl_coef` weighs a KL to a reference policy: pass both `ref_logprobs` and "
      "`kl_coef`, or neither."
    )
  if ref is not None:
    per_token = per_token + kl_coef * kl_penalty(lp, jax.lax.stop_gradient(ref.astype(lp.dtype)))
  return _normalize(per_token, mask, normalization, max_length, denominator)
