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
GSPO (Zheng et al., 2025)       ``importance_sampling_level="sequence"``
CISPO (MiniMax-M1, 2025)        ``clip_mode="cispo"``; ``normalization="token"``
truncated importance sampling   ``behavior_logprobs=..., importance_cap=c``
packed rows                     ``segment_ids=..., num_segments=S``
==============================  =====================================================

Shapes: ``logprobs``, ``old_logprobs``, ``ref_logprobs`` and ``where`` are
``[B, T]`` (B sequences of T tokens, padding masked out by ``where``);
``advantages`` is ``[B]`` (one per sequence, as GRPO) or ``[B, T]``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xentjax import _core
from xentjax import _validation as V
from xentjax._api import ArrayLike, Mask, broadcast_to_first, public, where_mask

__all__ = ["group_advantages", "kl_penalty", "policy_gradient_loss"]

Normalization = Literal["sequence", "token", "constant"]
Estimator = Literal["k1", "k2", "k3"]
Level = Literal["token", "sequence"]
ClipMode = Literal["ppo", "cispo"]
ImportanceMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


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


def _level(value):
  if value not in ("token", "sequence"):
    raise ValueError(
      f"`importance_sampling_level` must be 'token' or 'sequence' (GSPO), got {value!r}."
    )
  return value


def _clip_mode(value):
  if value not in ("ppo", "cispo"):
    raise ValueError(f"`clip_mode` must be 'ppo' or 'cispo', got {value!r}.")
  return value


def _importance_mode(value):
  modes = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
  if value not in modes:
    raise ValueError(f"`importance_mode` must be one of {modes} (TRL's names), got {value!r}.")
  return value


def _policy_term(lp, ratio, adv, eps_low, eps_high, delta, clip_mode):
  """PPO: ``-min(min(r, delta) A, clip(r, 1 - eps_low, 1 + eps_high) A)``; CISPO:
  ``-sg(min(r, 1 + eps_high)) A log pi``."""
  if clip_mode == "cispo":
    weight = jax.lax.stop_gradient(jnp.minimum(ratio, 1.0 + eps_high))
    return -weight * adv * lp
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  unclipped = ratio if delta is None else jnp.minimum(ratio, delta)
  return -jnp.minimum(unclipped * adv, clipped * adv)


class _Sequences(NamedTuple):
  """Which sequence each token belongs to (``ids`` ``[B, T]``), how many, and the mask."""

  ids: jax.Array
  size: int
  mask: jax.Array

  def total(self, per_token):
    """Per-sequence sums ``[S]`` of the counted tokens' values."""
    vals = jnp.where(self.mask, per_token, 0.0).reshape(-1)
    return jax.ops.segment_sum(vals, self.ids.reshape(-1), self.size)

  def tokens(self, dtype):
    return self.total(jnp.ones(self.mask.shape, dtype))

  def mean(self, per_token):
    """Per-sequence means over the counted tokens (0 for a sequence with none)."""
    n = self.tokens(per_token.dtype)
    return self.total(per_token) / jnp.maximum(n, 1.0)

  def spread(self, per_sequence):
    return per_sequence[self.ids]


def _sequences(lp, mask, segment_ids, num_segments) -> _Sequences:
  if (segment_ids is None) != (num_segments is None):
    raise ValueError("Packed rows need both `segment_ids` and `num_segments`, or neither.")
  if segment_ids is None:
    ids = jnp.broadcast_to(jnp.arange(lp.shape[0], dtype=jnp.int32)[:, None], lp.shape)
    return _Sequences(ids, lp.shape[0], mask)
  V.check_integer("segment_ids", segment_ids, "the sequence of each token, [B, T]")
  ids = jnp.asarray(segment_ids)
  if ids.shape != lp.shape:
    raise ValueError(
      f"`segment_ids` must have the shape of `logprobs` {lp.shape}, got {ids.shape}."
    )
  keep = (ids >= 0) & (ids < num_segments)  # a token of no sequence (padding: -1) does not count
  return _Sequences(jnp.clip(ids, 0, num_segments - 1).astype(jnp.int32), num_segments, mask & keep)


def _importance_weights(old, behavior, seqs: _Sequences, cap, mode):
  """Truncated importance sampling: ``min(exp(old - behavior), cap)`` (or 0 above ``cap``)."""
  diff = jnp.where(seqs.mask, old - behavior, 0.0)
  if mode.startswith("sequence"):
    diff = seqs.spread(seqs.total(diff))
  rho = jnp.exp(diff)
  if cap is not None:
    rho = jnp.minimum(rho, cap) if mode.endswith("truncate") else jnp.where(rho > cap, 0.0, rho)
  return jax.lax.stop_gradient(rho)


def _masked_inputs(mask, *arrays):
  """The inputs with 0 where `mask` is False, before any arithmetic.

  Padding may hold ``-inf`` or NaN; the `where` comes first so that the
  untaken branch is finite and a masked token adds 0 to the gradient, not NaN.
  """
  return [None if a is None else jnp.where(mask, a, jnp.zeros((), a.dtype)) for a in arrays]


def _normalize(per_token, seqs: _Sequences, normalization, max_length, denominator):
  """The reduction of each recipe: per sequence then over sequences, per token, or constant."""
  total = jnp.sum(seqs.total(per_token))
  if normalization == "sequence":
    total, count = jnp.sum(seqs.mean(per_token)), jnp.sum(seqs.tokens(per_token.dtype) > 0)
  elif normalization == "token":
    count = jnp.sum(seqs.mask)
  else:  # a constant, but over nothing counted NaN, as the other two (the empty-mean rule)
    length = per_token.shape[-1] if max_length is None else max_length
    count = jnp.where(jnp.any(seqs.mask), seqs.size * length, 0)
  if denominator is not None:  # a traced one that is not finite and > 0: NaN, zero gradients
    d = jax.lax.stop_gradient(jnp.asarray(denominator, per_token.dtype))
    count = jnp.where((d > 0) & (d < jnp.inf), d, 0)
  return _core.mean_or_nan(total, jnp.asarray(count, per_token.dtype))


def _check_shapes(lp, adv, others, n_seq, packed):
  if lp.ndim != 2:
    raise ValueError(f"`logprobs` must be [B, T] (sequences x tokens), got shape {lp.shape}.")
  for name, a in others.items():
    if a is not None and a.shape != lp.shape:
      raise ValueError(f"`{name}` must have the shape of `logprobs` {lp.shape}, got {a.shape}.")
  if adv.shape not in ((n_seq,), lp.shape):
    what = "[num_segments] (one per packed sequence)" if packed else "[B] (one per sequence)"
    raise ValueError(
      f"`advantages` must be {what} or [B, T], got {adv.shape} for `logprobs` of shape {lp.shape}."
    )


def _check_combinations(clip_mode, delta, ref, kl_coef, behavior, cap, packed, norm, max_length):
  if clip_mode == "cispo" and delta is not None:
    raise ValueError(
      "`delta` caps PPO's unclipped ratio; CISPO's weight is already capped by "
      "`epsilon_high` and has no unclipped term: pass one of `delta` and clip_mode='cispo'."
    )
  if (ref is None) != (kl_coef is None):
    raise ValueError(
      "`kl_coef` weighs a KL to a reference policy: pass both `ref_logprobs` and "
      "`kl_coef`, or neither."
    )
  if cap is not None and behavior is None:
    raise ValueError(
      "`importance_cap` truncates the ratio to `behavior_logprobs` (the sampler's): pass them."
    )
  if packed and norm == "constant" and max_length is None:
    raise ValueError(
      "normalization='constant' over packed rows needs `max_length` (a row's length T "
      "is not a sequence's)."
    )


_NONNEGATIVE = (
  "epsilon",
  "epsilon_high",
  "delta",
  "importance_cap",
  "kl_coef",
)


@public(
  static=(
    "normalization",
    "max_length",
    "importance_sampling_level",
    "clip_mode",
    "importance_mode",
    "num_segments",
  ),
  validators={
    "normalization": _normalization,
    "max_length": _max_length,
    "importance_sampling_level": _level,
    "clip_mode": _clip_mode,
    "importance_mode": _importance_mode,
    "num_segments": lambda v: V.int_option("num_segments", v, low=1, allow_none=True),
    **{name: _nonnegative(name) for name in _NONNEGATIVE},
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
  behavior_logprobs: ArrayLike | None = None,
  epsilon: ArrayLike = 0.2,
  epsilon_high: ArrayLike | None = None,
  delta: ArrayLike | None = None,
  importance_cap: ArrayLike | None = None,
  importance_mode: ImportanceMode = "token_truncate",
  kl_coef: ArrayLike | None = None,
  clip_mode: ClipMode = "ppo",
  importance_sampling_level: Level = "token",
  normalization: Normalization = "sequence",
  max_length: int | None = None,
  denominator: ArrayLike | None = None,
  segment_ids: ArrayLike | None = None,
  num_segments: int | None = None,
) -> jax.Array:
  r"""The clipped policy-gradient loss of PPO/GRPO and its variants, with each recipe's normalization.

  Per token :math:`t` of sequence :math:`i`, with the importance ratio
  :math:`r_{it} = \exp(\log\pi(a_{it}) - \log\pi_\mathrm{old}(a_{it}))`
  (``importance_sampling_level="token"``) or, for GSPO (``"sequence"``), one
  ratio per sequence given to each of its counted tokens,
  :math:`r_{it} = s_i = \exp\bigl(\frac{1}{|o_i|}\sum_{t \in o_i}
  (\log\pi(a_{it}) - \log\pi_\mathrm{old}(a_{it}))\bigr)`:

  .. math::

    \begin{aligned}
    \ell_{it} &= \rho_{it}\, p_{it} + \beta\, k_3(\pi, \pi_\mathrm{ref})_{it}, \\
    p_{it} &= -\min\bigl(\min(r_{it}, \delta)\, A_{it},\;
       \operatorname{clip}(r_{it}, 1 - \epsilon, 1 + \epsilon_\mathrm{high})\, A_{it}\bigr) \\
       &\qquad (\texttt{clip\_mode="ppo"}), \\
    p_{it} &= -\operatorname{sg}\bigl(\min(r_{it}, 1 + \epsilon_\mathrm{high})\bigr)\,
       A_{it} \log\pi(a_{it}) \\
       &\qquad (\texttt{clip\_mode="cispo"}), \\
    L_\mathrm{sequence} &= \frac{1}{|S|} \sum_{i \in S}
       \frac{1}{|o_i|} \sum_{t \in o_i} \ell_{it}, \\
    L_\mathrm{token} &= \frac{\sum_{i} \sum_{t \in o_i} \ell_{it}}{\sum_i |o_i|}, \\
    L_\mathrm{constant} &= \frac{\sum_{i} \sum_{t \in o_i} \ell_{it}}{B\, T_\mathrm{max}},
    \end{aligned}

  where :math:`o_i` are the counted tokens of sequence :math:`i` (``where``),
  :math:`S` the sequences with at least one, :math:`\delta` = ``delta``
  (:math:`+\infty` when None; INTELLECT-2's cap of the unclipped term),
  ``sg`` stop-gradient, and :math:`\rho` the truncated importance weight
  towards the sampler (1 without ``behavior_logprobs``):
  :math:`\rho_{it} = \min(\exp(\log\pi_\mathrm{old} - \log\pi_\mathrm{behavior}),
  c)`, detached, with :math:`c` = ``importance_cap``. :math:`\rho` weighs the
  policy term only, not the KL. ``"sequence"`` is GRPO's average (a long
  answer's tokens weigh less), ``"token"`` DAPO's, ``"constant"`` Dr. GRPO's.

  Without ``old_logprobs`` the update is on-policy: :math:`\pi_\mathrm{old}`
  is ``stop_gradient(logprobs)``, so :math:`r = 1` and the gradient is
  :math:`-A\, \nabla \log \pi(a)` (REINFORCE with the advantage).

  TRL's ``GRPOTrainer`` and Liger's ``LigerFusedLinearGRPOLoss`` name these
  recipes by ``loss_type``; the same losses here:

  =================================================  ==========================================
  TRL / Liger                                        xentjax
  =================================================  ==========================================
  ``loss_type="grpo"``                               ``normalization="sequence"``
  ``loss_type="bnpo"``                               ``normalization="token"``
  ``loss_type="dapo"``                               ``normalization="token"``, ``denominator=``
                                                     the whole batch's token count
  ``loss_type="dr_grpo"``                            ``normalization="constant"``, ``max_length=``
  ``loss_type="cispo"``, ``epsilon_high=5.0``        ``clip_mode="cispo"``, ``epsilon_high=4.0``,
                                                     ``normalization="token"``
  ``importance_sampling_level="sequence"``           the same (GSPO)
  ``delta``, ``epsilon``, ``epsilon_high``           the same names
  ``beta``, ``use_bias_correction_kl=False``         ``ref_logprobs=``, ``kl_coef=`` (k3)
  ``vllm_importance_sampling_correction=True``       ``behavior_logprobs=`` (the sampler's)
  ``vllm_importance_sampling_cap``                   ``importance_cap=``
  ``vllm_importance_sampling_mode``                  ``importance_mode=``
  =================================================  ==========================================

  TRL's CISPO caps the ratio at ``epsilon_high`` itself; here every upper
  bound is ``1 + epsilon_high``, so TRL's 5.0 is 4.0.

  Args:
    logprobs: ``[B, T]`` log-probabilities of the sampled tokens under the
      policy being trained (e.g. ``linear_token_stats(...).logprob``).
    advantages: ``[B]`` (per sequence; ``[num_segments]`` with packed rows)
      or ``[B, T]``; no gradient flows into them.
    where: ``[B, T]`` mask of the generated tokens (bool, or integer 0/1), or
      one that broadcasts to it (``[B, 1]``: whole sequences).
    old_logprobs: ``[B, T]`` under the policy of the ratio; None: on-policy.
    ref_logprobs: ``[B, T]`` under the reference policy, for the KL term.
    behavior_logprobs: ``[B, T]`` under the sampler (e.g. the inference
      engine's log-probabilities): the truncated importance weight
      :math:`\rho` corrects for its difference from :math:`\pi_\mathrm{old}`.
    epsilon: the lower clip range (and the upper one when ``epsilon_high`` is None).
    epsilon_high: DAPO's "clip-higher" upper range (CISPO: the cap is
      ``1 + epsilon_high``).
    delta: :math:`\delta`, the cap of PPO's unclipped ratio; refused with CISPO.
    importance_cap: :math:`c`, the truncation of :math:`\rho` (None: no cap).
    importance_mode: ``"token_truncate"`` (above), ``"token_mask"``
      (:math:`\rho = 0` where it exceeds :math:`c`), ``"sequence_truncate"`` and
      ``"sequence_mask"`` (one :math:`\rho` per sequence from the sum of its
      tokens' differences), as TRL's modes.
    kl_coef: :math:`\beta`, the weight of the k3 KL estimate (`kl_penalty`);
      given together with ``ref_logprobs``.
    clip_mode: ``"ppo"`` or ``"cispo"`` (MiniMax-M1).
    importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
    normalization: ``"sequence"``, ``"token"`` or ``"constant"`` (see above).
    max_length: :math:`T_\mathrm{max}` of ``"constant"`` (default ``T``;
      required with packed rows).
    denominator: replaces the denominator of the chosen normalization (the
      number of counted sequences, of counted tokens, or :math:`B T_\mathrm{max}`)
      by one over the whole accumulated batch: the microbatch losses of a
      gradient-accumulation step then add up to the full batch's loss. A
      Python number must be finite and > 0 (else `ValueError`); a traced one
      that is not gives NaN with zero gradients (as the fused losses).
    segment_ids: ``[B, T]`` integer: packed rows, the sequence of each token
      in ``[0, num_segments)`` (a negative id, or one beyond, is padding and
      does not count). Every per-sequence quantity (the GSPO ratio, the
      sequence-level :math:`\rho`, the ``"sequence"`` mean, :math:`B` of
      ``"constant"``) is then per segment.
    num_segments: the number of packed sequences (static), with ``segment_ids``.

  Returns:
    A scalar. Nothing counted gives NaN with a zero gradient (the library's
    empty-mean rule), in all three normalizations (``"constant"`` too, unless
    a ``denominator`` is given: then 0, what the microbatch adds). Masked
    tokens are never read: ``-inf`` or NaN padding in any input adds 0 to the
    loss and the gradient.

  Example:
    >>> import jax.numpy as jnp
    >>> from xentjax import policy
    >>> lp = jnp.log(jnp.array([[0.5, 0.25]]))
    >>> float(policy.policy_gradient_loss(lp, jnp.array([1.0])))  # on-policy: -A
    -1.0

  References:
    Schulman et al., "Proximal Policy Optimization Algorithms", 2017. Shao et
    al., "DeepSeekMath" (GRPO), 2024. Zheng et al., "Group Sequence Policy
    Optimization" (GSPO), 2025. MiniMax, "MiniMax-M1" (CISPO), 2025. Prime
    Intellect, "INTELLECT-2" (``delta``), 2025. Yao et al., "Your Efficient RL
    Framework Secretly Brings You Off-Policy RL Training" (truncated
    importance sampling), 2025.
  """
  lp = jnp.asarray(logprobs)
  adv = jax.lax.stop_gradient(jnp.asarray(advantages, lp.dtype))
  old, ref, behavior = (
    None if a is None else jnp.asarray(a).astype(lp.dtype)
    for a in (old_logprobs, ref_logprobs, behavior_logprobs)
  )
  packed = segment_ids is not None
  n_seq = num_segments if packed else (lp.shape[0] if lp.ndim else None)
  _check_shapes(
    lp,
    adv,
    {"old_logprobs": old, "ref_logprobs": ref, "behavior_logprobs": behavior},
    n_seq,
    packed,
  )
  _check_combinations(
    clip_mode, delta, ref, kl_coef, behavior, importance_cap, packed, normalization, max_length
  )
  mask = where_mask(where)
  mask = (
    jnp.ones(lp.shape, bool) if mask is None else broadcast_to_first("logprobs", lp, "where", mask)
  )
  seqs = _sequences(lp, mask, segment_ids, num_segments)
  adv = adv if adv.ndim == 2 else seqs.spread(adv)
  old = jax.lax.stop_gradient(lp if old is None else old)
  lp, old, adv, ref, behavior = _masked_inputs(seqs.mask, lp, old, adv, ref, behavior)
  log_ratio = lp - old
  if importance_sampling_level == "sequence":
    log_ratio = seqs.spread(seqs.mean(log_ratio))
  eps_high = epsilon if epsilon_high is None else epsilon_high
  per_token = _policy_term(lp, jnp.exp(log_ratio), adv, epsilon, eps_high, delta, clip_mode)
  if behavior is not None:
    per_token = per_token * _importance_weights(
      old, behavior, seqs, importance_cap, importance_mode
    )
  if ref is not None:
    per_token = per_token + kl_coef * kl_penalty(lp, jax.lax.stop_gradient(ref))
  return _normalize(per_token, seqs, normalization, max_length, denominator)
