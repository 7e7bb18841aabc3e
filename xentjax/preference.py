"""Preference-optimization losses (DPO and its family) on per-sequence log-probabilities.

Preference tuning scores whole completions: a pair of them, the chosen and the
rejected answer to one prompt (DPO, IPO, SimPO, CPO, ORPO), or single answers
marked desirable or not (KTO). Each loss is a few operations on one number per
completion, its log-probability :math:`\\log \\pi(y \\mid x) = \\sum_t \\log
\\pi(y_t \\mid x, y_{<t})`. `xentjax.linear_sequence_logprobs` computes those
sums from hidden states without the ``[tokens, vocabulary]`` logits; the
functions here turn them into the loss. They are ordinary differentiable JAX
code, so ``jax.grad`` of the composition goes through the fused engine.

The formulas are TRL's (version 1.16): each function equals TRL's trainer
code on the same inputs, values and gradients (``tests/training/test_preference.py``
runs TRL's own methods). Where TRL and a paper differ, TRL is followed and the
docstring says how.

==========================  ==================================================
TRL                         xentjax
==========================  ==================================================
``DPOTrainer`` loss_type    ``dpo_loss(..., loss_type=...)`` (sums; ``ipo``:
                            per-token averages)
``CPOTrainer`` "sigmoid"    ``cpo_loss`` (sums; add the NLL yourself)
``CPOTrainer`` "simpo"      ``simpo_loss`` (per-token averages)
``ORPOTrainer``             ``orpo_loss`` (per-token averages; add the NLL)
``KTOTrainer`` "kto"        ``kto_loss``
==========================  ==================================================

Every function takes ``reduction=`` (``"mean"`` over pairs, the default;
``"sum"``; ``"none"``: one loss per pair) and ``return_metrics=``: with True it
returns ``(loss, metrics)``, the quantities TRL logs, one per pair, without
gradient (`PreferenceMetrics`, or `KTOMetrics` for `kto_loss`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from xentjax import _core
from xentjax import _validation as V
from xentjax._api import ArrayLike, public

__all__ = [
  "KTOMetrics",
  "PreferenceMetrics",
  "cpo_loss",
  "dpo_loss",
  "kto_loss",
  "orpo_loss",
  "simpo_loss",
]

DPOLossType = Literal[
  "sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "apo_zero", "apo_down"
]
Reduction = Literal["mean", "sum", "none"]

_DPO_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "apo_zero", "apo_down")


class PreferenceMetrics(NamedTuple):
  """What a preference loss reports per pair (``[B]`` each, no gradient), as TRL logs it.

  Attributes:
    chosen_rewards: the implicit reward of the chosen completion (DPO:
      :math:`\\beta(\\log\\pi - \\log\\pi_\\mathrm{ref})`; SimPO, CPO, ORPO:
      :math:`\\beta \\log\\pi`).
    rejected_rewards: the same for the rejected completion.
    margins: ``chosen_rewards - rejected_rewards``.
    accuracies: 1.0 where ``chosen_rewards > rejected_rewards`` (strictly), else 0.0.
  """

  chosen_rewards: jax.Array
  rejected_rewards: jax.Array
  margins: jax.Array
  accuracies: jax.Array


class KTOMetrics(NamedTuple):
  """What `kto_loss` reports (no gradient), as TRL's KTO trainer logs it.

  Attributes:
    chosen_rewards: ``[B]``, :math:`\\beta(\\log\\pi - \\log\\pi_\\mathrm{ref})`
      at the desirable examples, NaN at the others.
    rejected_rewards: ``[B]``, the same at the undesirable examples, NaN at the others.
    margin: scalar, the mean chosen reward minus the mean rejected reward (NaN
      when either group is empty).
    kl: ``[B]``, the reference point the loss used (``kl`` broadcast).
  """

  chosen_rewards: jax.Array
  rejected_rewards: jax.Array
  margin: jax.Array
  kl: jax.Array


# ---------------------------------------------------------------------------
# Options and shared steps.
# ---------------------------------------------------------------------------


def _positive(name):
  def check(value):
    v = V.real_option(name, value)
    if not (v > 0 and v < float("inf")):
      raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return v

  return check


def _flag(name):
  def check(value):
    if not isinstance(value, bool):
      raise TypeError(f"`{name}` must be True or False, got {V.describe(value)}.")
    return value

  return check


def _smoothing(high):
  def check(value):
    v = V.real_option("label_smoothing", value, low=0.0)
    if not v < high:
      raise ValueError(f"`label_smoothing` must be in [0, {high:g}), got {value!r}.")
    return v

  return check


def _loss_type(value):
  if value not in _DPO_TYPES:
    raise ValueError(f"`loss_type` must be one of {_DPO_TYPES} (TRL's names), got {value!r}.")
  return value


def _check_dpo_smoothing(loss_type: str, label_smoothing: float) -> None:
  """TRL 1.16 reads ``label_smoothing`` in "robust" and "exo_pair" only; elsewhere it is refused."""
  if loss_type == "exo_pair" and not 0.0 < label_smoothing < 1.0:
    raise ValueError(
      "`loss_type='exo_pair'` is a KL to the smoothed labels (1 - eps, eps) and needs "
      f"0 < label_smoothing < 1 (log(eps) is taken), got {label_smoothing!r}."
    )
  if loss_type == "robust" and not label_smoothing < 0.5:
    raise ValueError(
      "`loss_type='robust'` divides by 1 - 2 * label_smoothing and needs "
      f"label_smoothing < 0.5, got {label_smoothing!r}."
    )
  if loss_type not in ("robust", "exo_pair") and label_smoothing != 0.0:
    raise ValueError(
      f"`label_smoothing` enters only loss_type 'robust' and 'exo_pair' (as in TRL), got "
      f"label_smoothing={label_smoothing!r} with loss_type={loss_type!r}: it would be ignored."
    )


def _pairs(**arrays) -> list[jax.Array]:
  """The inputs as float arrays of one shape ``[B]`` (or any common shape), or a named error."""
  out = {n: jnp.asarray(a) for n, a in arrays.items()}
  for n, a in out.items():
    V.check_floating(n, a, "a floating-point array of per-sequence log-probabilities")
  (first, a0), *rest = out.items()
  for n, a in rest:
    if a.shape != a0.shape:
      raise ValueError(f"`{n}` must have the shape of `{first}` {a0.shape}, got {a.shape}.")
  dt = jnp.result_type(*out.values(), jnp.float32)
  return [a.astype(dt) for a in out.values()]


def _reduce(per_pair, reduction: str):
  if reduction == "none":
    return per_pair
  if reduction == "sum":
    return jnp.sum(per_pair)
  return _core.mean_or_nan(jnp.sum(per_pair), per_pair.size)


def _metrics(chosen_rewards, rejected_rewards) -> PreferenceMetrics:
  c = jax.lax.stop_gradient(chosen_rewards)
  r = jax.lax.stop_gradient(rejected_rewards)
  return PreferenceMetrics(c, r, c - r, (c > r).astype(c.dtype))


def _finish(per_pair, chosen_rewards, rejected_rewards, reduction, return_metrics):
  loss = _reduce(per_pair, reduction)
  return (loss, _metrics(chosen_rewards, rejected_rewards)) if return_metrics else loss


def _smoothed_sigmoid(logits, label_smoothing: float):
  """``-(1 - eps) log sigma(u) - eps log sigma(-u)``: binary cross-entropy on soft labels."""
  return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - (
    label_smoothing * jax.nn.log_sigmoid(-logits)
  )


_VALIDATORS = {
  "beta": _positive("beta"),
  "loss_type": _loss_type,
  "label_smoothing": _smoothing(1.0),
  "return_metrics": _flag("return_metrics"),
}


def _options(*names, smoothing_high=None):
  """`public`'s arguments for options ``names`` plus ``reduction`` and ``return_metrics``."""
  static = (*names, "reduction", "return_metrics")
  checks = {n: v for n, v in _VALIDATORS.items() if n in static}
  if smoothing_high is not None:
    checks["label_smoothing"] = _smoothing(smoothing_high)
  return {"static": static, "validators": checks}


# ---------------------------------------------------------------------------
# DPO and its loss types.
# ---------------------------------------------------------------------------


def _dpo_per_pair(chosen, rejected, beta: float, loss_type: str, eps: float):
  """The per-pair loss of each TRL loss type from the two log-ratios (policy - reference)."""
  u = beta * (chosen - rejected)
  if loss_type == "sigmoid":
    return -jax.nn.log_sigmoid(u)
  if loss_type == "hinge":
    return jax.nn.relu(1.0 - u)
  if loss_type == "ipo":
    return jnp.square(chosen - rejected - 1.0 / (2.0 * beta))
  if loss_type == "robust":
    return (-(1.0 - eps) * jax.nn.log_sigmoid(u) + eps * jax.nn.log_sigmoid(-u)) / (1.0 - 2.0 * eps)
  if loss_type == "exo_pair":
    # KL(q || p) over {chosen, rejected}, q = (sigma(u), sigma(-u)), p = (1 - eps, eps).
    log_q_w, log_q_l = jax.nn.log_sigmoid(u), jax.nn.log_sigmoid(-u)
    return jnp.exp(log_q_w) * (log_q_w - jnp.log1p(-eps)) + jnp.exp(log_q_l) * (
      log_q_l - jnp.log(eps)
    )
  rc, rr = beta * chosen, beta * rejected
  if loss_type == "nca_pair":
    return -jax.nn.log_sigmoid(rc) - 0.5 * jax.nn.log_sigmoid(-rc) - 0.5 * jax.nn.log_sigmoid(-rr)
  if loss_type == "apo_zero":
    return jax.nn.sigmoid(-rc) + jax.nn.sigmoid(rr)  # 1 - sigma(rc) + sigma(rr)
  return jax.nn.sigmoid(rc) + jax.nn.sigmoid(-u)  # apo_down: sigma(rc) + 1 - sigma(u)


@public(**_options("beta", "loss_type", "label_smoothing"))
def dpo_loss(
  chosen_logps: ArrayLike,
  rejected_logps: ArrayLike,
  ref_chosen_logps: ArrayLike,
  ref_rejected_logps: ArrayLike,
  *,
  beta: float = 0.1,
  loss_type: DPOLossType = "sigmoid",
  label_smoothing: float = 0.0,
  reduction: Reduction = "mean",
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, PreferenceMetrics]:
  r"""Direct preference optimization and TRL's variants of it, from sequence log-probabilities.

  With the log-ratios :math:`\rho_w = \log\pi(y_w) - \log\pi_\mathrm{ref}(y_w)`
  (chosen) and :math:`\rho_l` (rejected), :math:`\Delta = \rho_w - \rho_l` and
  :math:`u = \beta\Delta`, the per-pair loss of each ``loss_type`` is

  .. math::

    \begin{aligned}
    \text{sigmoid} &: -\log\sigma(u) \\
    \text{hinge} &: \max(0, 1 - u) \\
    \text{ipo} &: \bigl(\Delta - \tfrac{1}{2\beta}\bigr)^2 \\
    \text{robust} &: \frac{-(1-\epsilon)\log\sigma(u) + \epsilon\log\sigma(-u)}{1 - 2\epsilon} \\
    \text{exo\_pair} &: \sum_{k \in \{w, l\}} q_k (\log q_k - \log p_k), \;
    q = (\sigma(u), \sigma(-u)),\; p = (1-\epsilon, \epsilon) \\
    \text{nca\_pair} &: -\log\sigma(\beta\rho_w) - \tfrac12\log\sigma(-\beta\rho_w)
      - \tfrac12\log\sigma(-\beta\rho_l) \\
    \text{apo\_zero} &: 1 - \sigma(\beta\rho_w) + \sigma(\beta\rho_l) \\
    \text{apo\_down} &: \sigma(\beta\rho_w) + 1 - \sigma(u)
    \end{aligned}

  with :math:`\epsilon` = ``label_smoothing``. The default, ``"sigmoid"``, is
  binary cross-entropy on the Bradley-Terry probability :math:`\sigma(u)`
  that the chosen completion is preferred; its implicit reward is
  :math:`\beta \log(\pi/\pi_\mathrm{ref})`, and the rewards reported are
  :math:`\beta\rho_w` and :math:`\beta\rho_l`.

  Args:
    chosen_logps: ``[B]`` log-probabilities of the chosen completions under
      the policy: sums over their tokens (e.g. `xentjax.linear_sequence_logprobs`),
      except for ``"ipo"``, which takes per-token averages (TRL divides each
      log-ratio by the completion's token count, at least 1, for IPO only).
    rejected_logps: ``[B]``, the rejected completions, the same way.
    ref_chosen_logps: ``[B]``, the chosen completions under the reference.
      Not detached here (TRL does not either): pass constants, or
      ``jax.lax.stop_gradient``, to keep the reference frozen.
    ref_rejected_logps: ``[B]``, the rejected completions under the reference.
    beta: :math:`\beta > 0` (IPO's :math:`\tau`).
    loss_type: one of TRL's names above.
    label_smoothing: :math:`\epsilon`, read by ``"robust"`` (``[0, 0.5)``) and
      ``"exo_pair"`` (``(0, 1)``, required) only; a nonzero value with any other
      type is a `ValueError` (it would be silently ignored).
    reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"`` (``[B]``).
    return_metrics: also return `PreferenceMetrics`.

  Returns:
    The loss (scalar, or ``[B]`` with ``reduction="none"``) in the inputs'
    floating dtype (float32 at least), and with ``return_metrics`` the
    metrics. ``"mean"`` of no pairs is NaN with a zero gradient.

  Example:
    >>> import jax.numpy as jnp
    >>> from xentjax import preference
    >>> c, r = jnp.array([-10.0]), jnp.array([-12.0])
    >>> float(preference.dpo_loss(c, r, c - 1.0, r, beta=0.5))  # -log sigmoid(0.5 * 1)
    0.4740769...

  Note:
    Equal chosen and rejected log-ratios give :math:`u = 0` (``log 2`` for
    "sigmoid"). A log-probability of ``-inf`` gives ``inf`` or 0 as the
    formula's limit; NaN inputs give NaN.

  References:
    Rafailov et al., "Direct Preference Optimization", 2023. Azar et al., "A
    General Theoretical Paradigm to Understand Learning from Human
    Preferences" (IPO), 2023. Chowdhury et al., "Provably Robust DPO", 2024.
    Ji et al., "Towards Efficient Exact Optimization of Language Model
    Alignment" (EXO), 2024. Chen et al., "Noise Contrastive Alignment" (NCA),
    2024. D'Oosterlinck et al., "Anchored Preference Optimization" (APO), 2024.
  """
  c, r, rc, rr = _pairs(
    chosen_logps=chosen_logps,
    rejected_logps=rejected_logps,
    ref_chosen_logps=ref_chosen_logps,
    ref_rejected_logps=ref_rejected_logps,
  )
  _check_dpo_smoothing(loss_type, label_smoothing)
  chosen, rejected = c - rc, r - rr
  per_pair = _dpo_per_pair(chosen, rejected, beta, loss_type, label_smoothing)
  return _finish(per_pair, beta * chosen, beta * rejected, reduction, return_metrics)


# ---------------------------------------------------------------------------
# Reference-free losses: SimPO, CPO, ORPO.
# ---------------------------------------------------------------------------


@public(**_options("beta", "gamma", "label_smoothing", smoothing_high=0.5))
def simpo_loss(
  chosen_logps: ArrayLike,
  rejected_logps: ArrayLike,
  *,
  beta: float = 2.0,
  gamma: float = 0.5,
  label_smoothing: float = 0.0,
  reduction: Reduction = "mean",
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, PreferenceMetrics]:
  r"""SimPO: a length-normalized, reference-free DPO with a target margin.

  With :math:`\bar c, \bar r` the per-token average log-probabilities of the
  chosen and rejected completions and :math:`u = \beta(\bar c - \bar r) - \gamma`:

  .. math::

    \ell = -(1 - \epsilon)\log\sigma(u) - \epsilon\log\sigma(-u).

  :math:`\gamma` is the absolute margin, as TRL's ``simpo_gamma`` and Liger's
  ``gamma`` are; the SimPO paper writes :math:`\sigma(\beta(\bar c - \bar r)
  - \gamma)` too but tunes :math:`\gamma/\beta`: pass ``gamma=beta * ratio``
  for the paper's ratio.

  Args:
    chosen_logps: ``[B]`` per-token average log-probabilities of the chosen completions.
    rejected_logps: ``[B]``, the rejected ones.
    beta: :math:`\beta > 0`.
    gamma: the target margin :math:`\gamma` (any real number).
    label_smoothing: :math:`\epsilon \in [0, 0.5)` (conservative labels).
    reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"``.
    return_metrics: also return `PreferenceMetrics` (rewards :math:`\beta\bar c`, :math:`\beta\bar r`).

  Returns:
    The loss (scalar, or ``[B]``), and with ``return_metrics`` the metrics.

  Example:
    >>> import jax.numpy as jnp
    >>> from xentjax import preference
    >>> round(float(preference.simpo_loss(jnp.array([-1.0]), jnp.array([-1.25]))), 6)  # u = 0
    0.693147

  References:
    Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", 2024.
  """
  c, r = _pairs(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
  per_pair = _smoothed_sigmoid(beta * (c - r) - gamma, label_smoothing)
  return _finish(per_pair, beta * c, beta * r, reduction, return_metrics)


@public(**_options("beta", "label_smoothing", smoothing_high=0.5))
def cpo_loss(
  chosen_logps: ArrayLike,
  rejected_logps: ArrayLike,
  *,
  beta: float = 0.1,
  label_smoothing: float = 0.0,
  reduction: Reduction = "mean",
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, PreferenceMetrics]:
  r"""The preference term of contrastive preference optimization (CPO), without a reference.

  .. math::

    \ell = -(1 - \epsilon)\log\sigma(\beta(c - r)) - \epsilon\log\sigma(-\beta(c - r))

  for the sequence log-probabilities :math:`c` (chosen) and :math:`r`
  (rejected). CPO's full objective adds the negative log-likelihood of the
  chosen completions, which is the caller's (for example
  `xentjax.linear_softmax_cross_entropy` on the chosen tokens): TRL's
  ``CPOTrainer`` with ``loss_type="sigmoid"`` and ``cpo_alpha`` is
  ``cpo_loss(...) + cpo_alpha * nll``.

  Args:
    chosen_logps: ``[B]`` log-probabilities (sums over tokens) of the chosen completions.
    rejected_logps: ``[B]``, the rejected ones.
    beta: :math:`\beta > 0`.
    label_smoothing: :math:`\epsilon \in [0, 0.5)`.
    reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"``.
    return_metrics: also return `PreferenceMetrics` (rewards :math:`\beta c`, :math:`\beta r`).

  Returns:
    The loss (scalar, or ``[B]``), and with ``return_metrics`` the metrics.

  Example:
    >>> import jax.numpy as jnp
    >>> from xentjax import preference
    >>> round(float(preference.cpo_loss(jnp.array([-3.0]), jnp.array([-3.0]))), 6)
    0.693147

  References:
    Xu et al., "Contrastive Preference Optimization: Pushing the Boundaries of
    LLM Performance in Machine Translation", 2024.
  """
  c, r = _pairs(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
  per_pair = _smoothed_sigmoid(beta * (c - r), label_smoothing)
  return _finish(per_pair, beta * c, beta * r, reduction, return_metrics)


def _log1mexp(a):
  """``log(1 - e^a)`` for ``a <= 0``, accurate on both sides of ``-log 2``."""
  near = a > -0.6931471805599453
  return jnp.where(
    near,
    jnp.log(-jnp.expm1(jnp.where(near, a, -1.0))),
    jnp.log1p(-jnp.exp(jnp.where(near, -1.0, a))),
  )


@jax.custom_jvp
def _odds_ratio_term(c, r):
  """``softplus(g(r) - g(c))``, ``g(a) = a - log(1 - e^a)`` the log odds of ``e^a``."""
  return jax.nn.softplus((r - c) - _log1mexp(r) + _log1mexp(c))


@_odds_ratio_term.defjvp
def _odds_ratio_term_jvp(primals, tangents):
  # With D = p_r (1 - p_c) + p_c (1 - p_r): d/dc = -p_r / D and d/dr = p_r (1 - p_c) /
  # ((1 - p_r) D), in logs relative to r (e = log D - r, so large |c|, |r| lose nothing).
  # Finite at p_c = 1 (log odds +inf: -odds_r and 0), where the chain rule through g
  # would give 0 * inf.
  c, r = primals
  dc, dr = tangents
  l1c, l1r = _log1mexp(c), _log1mexp(r)
  both = (c == 0) & (r == 0)  # both odds infinite: NaN, with a zero gradient
  e = jnp.where(both, 0.0, jnp.logaddexp(l1c, (c - r) + l1r))
  grad_c = jnp.where(both, 0.0, -jnp.exp(-e))
  grad_r = jnp.where(both, 0.0, jnp.exp(l1c - jnp.where(both, 0.0, l1r) - e))
  return _odds_ratio_term(c, r), grad_c * dc + grad_r * dr


@public(**_options("beta"))
def orpo_loss(
  chosen_logps: ArrayLike,
  rejected_logps: ArrayLike,
  *,
  beta: float = 0.1,
  reduction: Reduction = "mean",
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, PreferenceMetrics]:
  r"""The odds-ratio term of ORPO, added to the NLL of the chosen completions.

  With :math:`c, r` the per-token average log-probabilities of the chosen and
  rejected completions and the log odds ratio

  .. math::

    \begin{aligned}
    \lambda &= \log\frac{\mathrm{odds}(e^c)}{\mathrm{odds}(e^r)}
            = (c - r) - \bigl(\log(1 - e^c) - \log(1 - e^r)\bigr), \\
    \ell &= -\beta \log\sigma(\lambda).
    \end{aligned}

  :math:`\log(1 - e^a)` is computed as ``log(-expm1(a))`` near 0 and
  ``log1p(-exp(a))`` below :math:`-\log 2`, and the gradient by its closed
  form :math:`\partial\ell/\partial c = -\beta e^r / D`,
  :math:`\partial\ell/\partial r = \beta e^r (1 - e^c) / ((1 - e^r) D)` with
  :math:`D = e^r(1 - e^c) + e^c(1 - e^r)`, so a chosen log-probability of
  exactly 0 (odds :math:`+\infty`) gives loss 0 and a finite gradient.
  TRL's ``odds_ratio_loss`` returns :math:`\beta\log\sigma(\lambda)` and
  subtracts it from the NLL; this function returns the term to add.

  Args:
    chosen_logps: ``[B]`` per-token average log-probabilities (``<= 0``) of
      the chosen completions.
    rejected_logps: ``[B]``, the rejected ones.
    beta: :math:`\beta > 0` (ORPO's :math:`\lambda` weight).
    reduction: ``"mean"`` over pairs, ``"sum"``, or ``"none"``.
    return_metrics: also return `PreferenceMetrics` (rewards :math:`\beta c`, :math:`\beta r`).

  Returns:
    The loss (scalar, or ``[B]``), computed in float32 at least (TRL casts to
    float32), and with ``return_metrics`` the metrics.

  Example:
    >>> import jax.numpy as jnp
    >>> from xentjax import preference
    >>> c, r = jnp.log(jnp.array([0.5])), jnp.log(jnp.array([0.2]))  # odds 1 and 1/4
    >>> round(float(preference.orpo_loss(c, r, beta=1.0)), 6)  # -log sigmoid(log 4)
    0.223144

  Note:
    A rejected log-probability of 0 gives ``inf``; both at 0 (two infinite
    odds) give NaN with a zero gradient; a log-probability above 0 (not a
    probability) gives NaN.

  References:
    Hong, Lee and Thorne, "ORPO: Monolithic Preference Optimization without
    Reference Model", 2024.
  """
  c, r = _pairs(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
  per_pair = beta * _odds_ratio_term(c, r)
  return _finish(per_pair, beta * c, beta * r, reduction, return_metrics)


# ---------------------------------------------------------------------------
# KTO: unpaired examples.
# ---------------------------------------------------------------------------


@public(
  static=("beta", "desirable_weight", "undesirable_weight", "reduction", "return_metrics"),
  validators={
    "beta": _positive("beta"),
    "desirable_weight": lambda v: V.check_nonnegative("desirable_weight", v),
    "undesirable_weight": lambda v: V.check_nonnegative("undesirable_weight", v),
    "return_metrics": _flag("return_metrics"),
  },
)
def kto_loss(
  policy_logps: ArrayLike,
  ref_logps: ArrayLike,
  desirable: ArrayLike,
  *,
  kl: ArrayLike,
  beta: float = 0.1,
  desirable_weight: float = 1.0,
  undesirable_weight: float = 1.0,
  reduction: Reduction = "mean",
  return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, KTOMetrics]:
  r"""Kahneman-Tversky optimization: unpaired desirable and undesirable completions.

  With :math:`\rho_i = \log\pi(y_i) - \log\pi_\mathrm{ref}(y_i)` and the
  reference point :math:`z` (``kl``, detached):

  .. math::

    \ell_i = \begin{cases}
      w_d\,\bigl(1 - \sigma(\beta(\rho_i - z))\bigr) & y_i \text{ desirable} \\
      w_u\,\bigl(1 - \sigma(\beta(z - \rho_i))\bigr) & \text{otherwise,}
    \end{cases}
    \qquad L = \frac{1}{B}\sum_i \ell_i .

  The mean is over all examples (TRL's ``nanmean`` of the concatenated
  losses), not a mean weighted by :math:`w`. TRL estimates :math:`z` as
  ``max(mean(log pi(y') - log pi_ref(y')), 0)`` over mismatched
  prompt-completion pairs :math:`y'` (0 with ``calculate_KL=False``); that
  estimate is the caller's, and its gradient is exactly 0 here.

  Args:
    policy_logps: ``[B]`` sequence log-probabilities under the policy.
    ref_logps: ``[B]`` under the reference (not detached: pass constants).
    desirable: ``[B]`` bool (or 0/1): which examples are desirable.
    kl: the reference point :math:`z`, a scalar or ``[B]``.
    beta: :math:`\beta > 0`.
    desirable_weight: :math:`w_d \ge 0`.
    undesirable_weight: :math:`w_u \ge 0`.
    reduction: ``"mean"`` over examples, ``"sum"``, or ``"none"`` (``[B]``, in input order).
    return_metrics: also return `KTOMetrics`.

  Returns:
    The loss (scalar, or ``[B]``), and with ``return_metrics`` the metrics.
    ``"mean"`` of no examples is NaN with a zero gradient.

  Example:
    >>> import jax.numpy as jnp
    >>> from xentjax import preference
    >>> lp, ref = jnp.array([-5.0, -6.0]), jnp.array([-5.0, -6.0])
    >>> float(preference.kto_loss(lp, ref, jnp.array([True, False]), kl=0.0))  # 1 - sigmoid(0)
    0.5

  References:
    Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic
    Optimization", 2024.
  """
  lp, ref = _pairs(policy_logps=policy_logps, ref_logps=ref_logps)
  good = _desirable(desirable, lp.shape)
  z = jax.lax.stop_gradient(jnp.broadcast_to(jnp.asarray(kl, lp.dtype), lp.shape))
  rho = lp - ref
  sign = jnp.where(good, 1.0, -1.0).astype(lp.dtype)
  weight = jnp.where(good, desirable_weight, undesirable_weight).astype(lp.dtype)
  per_example = weight * jax.nn.sigmoid(-beta * sign * (rho - z))
  loss = _reduce(per_example, reduction)
  return (loss, _kto_metrics(beta * rho, good, z)) if return_metrics else loss


def _desirable(desirable, shape):
  d = jnp.asarray(desirable)
  if not (d.dtype == jnp.bool_ or jnp.issubdtype(d.dtype, jnp.integer)):
    raise TypeError(f"`desirable` must be a boolean (or 0/1 integer) array, got dtype {d.dtype}.")
  if d.shape != shape:
    raise ValueError(f"`desirable` must have the shape of `policy_logps` {shape}, got {d.shape}.")
  return d != 0


def _kto_metrics(rewards, good, z) -> KTOMetrics:
  rewards = jax.lax.stop_gradient(rewards)
  chosen = jnp.where(good, rewards, jnp.nan)
  rejected = jnp.where(good, jnp.nan, rewards)
  mean_c = _core.mean_or_nan(jnp.sum(jnp.where(good, rewards, 0.0)), jnp.sum(good))
  mean_r = _core.mean_or_nan(jnp.sum(jnp.where(good, 0.0, rewards)), jnp.sum(~good))
  return KTOMetrics(chosen, rejected, mean_c - mean_r, z)
