"""The distillation losses: a teacher-student divergence on the engine, mixed outside it.

`linear_distillation_loss` runs the `kernels.distillation.Divergence` kernel
over tiles of both heads, `linear_topk_distillation_loss` the
`kernels.distillation.TopkLogits` kernel over the student's; the mixing
``(1 - alpha) T^2 D + alpha CE``, the masks and the reduction are ordinary
JAX code (`DistillationLoss`), which strategy "store" runs inside the
engine's one-pass sweep.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xentjax import _validation as V
from xentjax._api import public
from xentjax._core import label_status
from xentjax._vocab.inputs import Call, Head, Tokens, prepare_call
from xentjax._vocab.kernels.distillation import Divergence, TopkLogits, TotalVariation
from xentjax._vocab.options import (
  HEAD_OPTIONS,
  check_denominator_use,
  check_head,
  check_strategy,
  check_unit_interval,
  check_vector,
  validators,
)
from xentjax._vocab.reduce import mean_denominators, reduce_terms, run_and_reduce
from xentjax._vocab.tiles import TEMPERATURE, traced_temperature

# The store strategy holds two whole-row logit tiles (student and teacher)
# and their softmaxes at once, so its automatic token chunk is half the fused
# cross-entropy's (32 MiB per float32 tile).
DISTILL_STORE_TILE = 1 << 23


DIVERGENCES = ("jsd", "jsd_scaled", "tvd")


class DistillationComponents(NamedTuple):
  """The two terms of a distillation loss, reduced as the loss is.

  ``soft``: :math:`T^2 D`, the divergence term; ``hard``: the cross-entropy
  with the labels (None without labels). The loss is
  ``(1 - hard_weight) * soft + hard_weight * hard``. Values for monitoring:
  they carry no gradient (differentiate the loss).
  """

  soft: jax.Array
  hard: jax.Array | None


@dataclasses.dataclass(frozen=True)
class DistillationLoss:
  """``r * ((1 - alpha) T^2 D + alpha CE)`` per token, 0 where ``r`` is 0 (static).

  ``r`` (``aux["r"]``) is the token's weight: 1 (or 1/count in "store"'s
  mean) where it counts, 0 elsewhere, NaN on a bad token. ``D`` is the
  kernel's ``div``, or for a top-k teacher ``sum q log q - sum q a_idx +
  lse_a``. A traced temperature is ``aux[tiles.TEMPERATURE]``; `differentiable`
  names the entries of ``aux`` with gradients (for strategy "store").
  """

  hard_weight: float
  temperature: float
  topk: bool = False
  differentiable: tuple = ()

  def __call__(self, out: dict, aux: dict):
    t = aux.get(TEMPERATURE, self.temperature)
    loss = ((1.0 - self.hard_weight) * t**2) * self.divergence(out, aux)
    if self.hard_weight > 0.0:
      loss = loss + self.hard_weight * out["ce"]
    r = aux["r"]
    return jnp.where(r != 0.0, r * loss, 0.0)

  def terms(self, out: dict, aux: dict) -> dict:
    """The loss as one term of coefficient ``r`` (`reduce.TokenLoss`)."""
    return {"r": self(out, aux)}

  def divergence(self, out: dict, aux: dict):
    """``D`` per token: the kernel's, or KL(q || p_s) over a top-k teacher's entries."""
    if self.topk:
      return aux["qlogq"] - jnp.sum(aux["q"] * out["a_idx"], axis=-1) + out["lse_a"]
    return out["div"]

  def components(self, out: dict, aux: dict) -> tuple:
    """Per-token ``(T^2 D, CE or None)``, each weighted by ``aux["r"]`` as the loss is."""
    t, r = aux.get(TEMPERATURE, self.temperature), aux["r"]
    terms = (t**2 * self.divergence(out, aux), out.get("ce"))
    return tuple(None if v is None else jnp.where(r != 0.0, r * v, 0.0) for v in terms)


def prepare_student(
  x,
  w,
  labels,
  head: Head,
  *,
  hard_weight,
  reduction,
  strategy,
  ignore_index,
  where,
  temperature,
  bias=None,
  keep_labels=False,
) -> tuple[Call, float]:
  """`(call, alpha)`: the student's `Call` and the checked hard-label weight.

  The checks both losses share, and `inputs.prepare_call` for the student.
  `keep_labels`: the kernel reads the labels even when ``alpha = 0``.
  """
  alpha = check_unit_interval("hard_weight", hard_weight)
  if labels is None and alpha > 0.0:
    raise ValueError(
      f"`hard_weight`={hard_weight!r} mixes in the cross-entropy with `labels`, but "
      "labels=None: pass integer labels [...] or hard_weight=0."
    )
  check_strategy(reduction, strategy, head.vocab_chunk_size)
  c = prepare_call(
    x,
    w,
    labels,
    head,
    ignore_index=ignore_index,
    where=where,
    strategy=strategy,
    temperature=temperature,
    bias=bias,
    store_tile=DISTILL_STORE_TILE,
    student=True,
  )
  if alpha == 0.0 and not keep_labels:  # the labels only carry `ignore_index`
    rows = {k: v for k, v in c.ops.rows.items() if k != "labels"}
    c = c._replace(ops=dataclasses.replace(c.ops, rows=rows))
  return c, alpha


def distill(
  call: Call,
  kernel,
  aux: dict,
  loss: DistillationLoss,
  strategy,
  reduction,
  denominator=None,
  components=False,
):
  """Runs the kernel and reduces `loss` over the tokens that count (or by `denominator`).

  `components`: also the `DistillationComponents`, reduced the same way.
  """
  tok = call.tokens
  counted, bad = tok.status.counted, tok.status.bad
  count = jnp.sum(counted).astype(tok.cdt)
  denominator = check_denominator_use(denominator, reduction, tok.cdt)
  dens = mean_denominators({"r": count}, denominator)
  t = traced_temperature(call.ops.rows)
  if t is not None:
    aux = {**aux, TEMPERATURE: t}
  aux = {**aux, "r": jnp.where(bad, jnp.nan, jnp.where(counted, 1.0, 0.0)).astype(tok.cdt)}
  keep = kernel.outputs if components else ()
  total, out = run_and_reduce(call, kernel, loss, aux, strategy, reduction, lambda: dens, keep)
  if not components:
    return total
  soft, hard = loss.components(*lax.stop_gradient((out, aux)))
  soft = reduce_terms({"r": soft}, reduction, dens, tok.batch_shape)
  hard = None if hard is None else reduce_terms({"r": hard}, reduction, dens, tok.batch_shape)
  return total, DistillationComponents(soft, hard)


def traced(call: Call) -> bool:
  """Whether the temperature of the call is traced (`tiles.traced_temperature`)."""
  return traced_temperature(call.ops.rows) is not None


@public(
  static=(
    "beta",
    "divergence",
    "return_components",
    "hard_weight",
    "ignore_index",
    "reduction",
    "strategy",
    "teacher_w_layout",
    *HEAD_OPTIONS,
  ),
  validators=validators(),
)
def linear_distillation_loss(
  x: jax.typing.ArrayLike,
  w: jax.typing.ArrayLike,
  teacher_x: jax.typing.ArrayLike,
  teacher_w: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike | None = None,
  *,
  beta: float = 0.0,
  divergence: Literal["jsd", "jsd_scaled", "tvd"] = "jsd",
  bias: jax.typing.ArrayLike | None = None,
  teacher_bias: jax.typing.ArrayLike | None = None,
  return_components: bool = False,
  temperature: float | jax.typing.ArrayLike = 1.0,
  hard_weight: float = 0.0,
  ignore_index: int = -100,
  where: jax.typing.ArrayLike | None = None,
  reduction: str = "mean",
  denominator: jax.typing.ArrayLike | None = None,
  strategy: Literal["recompute", "store"] = "recompute",
  teacher_w_layout: Literal["dv", "vd"] = "dv",
  w_layout: Literal["dv", "vd"] = "dv",
  vocab_size: int | None = None,
  token_chunk_size: int | None = None,
  vocab_chunk_size: int | None = None,
  precision: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  data_axis: Any = "data",
  vocab_axis: Any = "vocab",
) -> jax.Array:
  r"""Teacher-student divergence of the logits ``x @ w`` and ``teacher_x @ teacher_w``, fused.

  Neither logit array is ever materialized. For each token, with student
  logits :math:`z_s = x^\top w + b_s`, teacher logits :math:`z_t = x_t^\top
  w_t + b_t` (the biases optional), :math:`p_s = \mathrm{softmax}(z_s/T)` and
  :math:`p_t = \mathrm{softmax}(z_t/T)`, the divergence ``divergence="jsd"``
  (default) is

  .. math::

    D_\beta = \begin{cases}
      \mathrm{KL}(p_t \,\|\, p_s) = \sum_j p_{t,j} (\log p_{t,j} - \log p_{s,j}) & \beta = 0\\
      \beta\,\mathrm{KL}(p_t \,\|\, m) + (1-\beta)\,\mathrm{KL}(p_s \,\|\, m) & 0 < \beta < 1\\
      \mathrm{KL}(p_s \,\|\, p_t) & \beta = 1
    \end{cases}

  with :math:`m = \beta p_t + (1-\beta) p_s` (the generalized Jensen-Shannon
  divergence of Agarwal et al.), and the loss

  .. math::

    \ell = (1-\alpha)\, T^2 D + \alpha\, \mathrm{CE}(z_s, y),
    \qquad \mathrm{CE}(z_s, y) = \mathrm{lse}(z_s) - z_{s,y}

  (the factor :math:`T^2` of Hinton et al. keeps gradient scales independent
  of :math:`T`; the cross-entropy uses the untempered student logits).

  **The generalized JSD is not continuous at its ends**: it tends to 0 as
  :math:`\beta \to 0` or :math:`\beta \to 1`, so ``beta=1e-7`` gives about
  ``1e-7`` times the forward KL, not the forward KL of ``beta=0`` (a trap when
  annealing :math:`\beta`). ``divergence="jsd_scaled"`` divides it by
  :math:`\beta(1-\beta)`, which is continuous on :math:`[0, 1]`. With
  :math:`m = p_s + \beta (p_t - p_s)` and
  :math:`\log(1 + u) = u - u^2/2 + O(u^3)`,

  .. math::

    \begin{aligned}
    \mathrm{KL}(p_s \,\|\, m) &= -\sum_j p_{s,j} \log\Big(1 + \beta\,
      \frac{p_{t,j} - p_{s,j}}{p_{s,j}}\Big) \\
      &= -\beta \sum_j (p_{t,j} - p_{s,j}) + \frac{\beta^2}{2} \chi^2(p_t \,\|\, p_s)
      + O(\beta^3) = O(\beta^2),
    \end{aligned}

  (the first sum is 0) and :math:`\mathrm{KL}(p_t \,\|\, m) \to \mathrm{KL}(p_t \,\|\, p_s)`, so

  .. math::

    \begin{aligned}
    \frac{D_\beta}{\beta (1-\beta)} &= \frac{\mathrm{KL}(p_t \,\|\, m)}{1 - \beta}
      + \frac{\mathrm{KL}(p_s \,\|\, m)}{\beta} \\
      &\xrightarrow[\beta \to 0]{} \mathrm{KL}(p_t \,\|\, p_s), \qquad
      \xrightarrow[\beta \to 1]{} \mathrm{KL}(p_s \,\|\, p_t)
    \end{aligned}

  (the second limit by the same expansion with the roles of :math:`p_t` and
  :math:`p_s` and of :math:`\beta` and :math:`1 - \beta` swapped): the
  forward KL of ``beta=0`` and the reverse KL of ``beta=1``, which
  ``"jsd_scaled"`` returns at the ends exactly. Near 0 it moves away with
  slope :math:`\mathrm{KL}(p_t \,\|\, p_s) - \tfrac12 \chi^2(p_t \,\|\, p_s)`
  (near 1 the same with the roles swapped), an expansion that holds while
  :math:`\beta\, p_{t,j} / p_{s,j} \ll 1`: where the student gives a tiny
  probability to a class the teacher likes, the approach is slower. In
  between it is :math:`D_\beta / (\beta(1-\beta))`, formed without
  cancellation (each :math:`\log(p/m)` from :math:`\log p_t - \log p_s` by
  one ``logaddexp``), so it keeps float32 precision at ``beta=1e-6``.
  ``divergence="tvd"`` is the total variation distance
  :math:`D = \tfrac12 \sum_j |p_{t,j} - p_{s,j}| \in [0, 1]` (Liger's TVD
  loss; ``beta`` must stay 0), whose gradient with respect to the student's
  tempered logits is :math:`-\tfrac12\, p_s \odot (s - \sum_j p_{s,j} s_j)`
  with :math:`s = \mathrm{sign}(p_t - p_s)`, taking the subgradient
  :math:`s_j = 0` where :math:`p_{t,j} = p_{s,j}` (so identical models get a
  zero gradient). Equal, to float32 rounding, values and gradients, to

  .. code-block:: python

    a = jax.nn.log_softmax(x @ w / T)
    b = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_x @ teacher_w) / T)
    kl = (jnp.exp(b) * (b - a)).sum(-1)   # beta = 0

  followed by the mixing, masking and reduction. Gradients flow to ``x``,
  ``w`` and ``bias`` only: the teacher (``teacher_bias`` included) is a
  constant (`lax.stop_gradient`), and its tiles are recomputed only to
  rebuild :math:`p_t`; no teacher cotangent is formed.

  Args:
    x: student hidden states ``[..., D]``, any leading batch shape.
    w: student head ``[D, V]`` (or ``[V, D]`` with ``w_layout="vd"``).
    teacher_x: teacher hidden states ``[..., D_t]`` (same leading shape as
      ``x``; ``D_t`` may differ from ``D``).
    teacher_w: teacher head ``[D_t, V]`` (or ``[V, D_t]`` with
      ``teacher_w_layout="vd"``), with the same number of vocabulary columns
      as ``w``.
    labels: optional integer labels ``[...]``: the hard targets of the
      cross-entropy term (needed when ``hard_weight > 0``) and the carrier of
      ``ignore_index``. A label outside ``[0, vocab_size)`` on a token that
      counts gives NaN (``xentjax.check_labels`` checks eagerly).
    beta: :math:`\beta \in [0, 1]`: 0 forward KL (default), 1 reverse KL,
      in between the generalized JSD (scaled with ``"jsd_scaled"``).
    divergence: ``"jsd"`` (default, :math:`D_\beta` above), ``"jsd_scaled"``
      (:math:`D_\beta / (\beta(1-\beta))`, continuous in :math:`\beta`) or
      ``"tvd"`` (total variation distance).
    bias: optional student output bias ``[V]`` (one per column of ``w``),
      added to the logits before the temperature; it gets a gradient.
    teacher_bias: optional teacher output bias ``[V]``, a constant.
    return_components: also return the two terms: ``(loss,
      DistillationComponents(soft, hard))`` with ``soft`` the divergence term
      :math:`T^2 D` and ``hard`` the cross-entropy with ``labels`` (computed
      even when ``hard_weight=0``; None without labels), each reduced as the
      loss is (so ``loss = (1 - hard_weight) * soft + hard_weight * hard``).
      They are for monitoring and carry no gradient.
    temperature: :math:`T > 0` (default 1): a Python number (checked now),
      or an array, a scalar or one per token (broadcastable to
      ``x.shape[:-1]``), traced (a sweep over values compiles once) and
      differentiable (the :math:`T^2` factor and both tempered
      distributions); a traced value that is not a finite number > 0 gives
      NaN.
    hard_weight: :math:`\alpha \in [0, 1]`, the weight of the hard-label
      cross-entropy (default 0).
    ignore_index: label of tokens that do not count (applied through
      ``labels`` when given).
    where: optional boolean token mask broadcastable to ``x.shape[:-1]``.
    reduction: ``"mean"`` over the tokens that count (NaN, with a zero
      gradient, when none counts), ``"sum"``, or ``"none"`` (per token
      ``[...]``, 0 where a token does not count).
    denominator: optional divisor of ``"mean"`` in place of the number of
      tokens that count, for gradient accumulation: call each microbatch with
      the count of the whole accumulated batch and the microbatch losses add
      up to its mean. A Python number (finite, > 0) or a scalar array (traced,
      without gradient; a value that is not a finite number > 0 gives NaN);
      an error with ``"sum"``/``"none"``. As in
      `xentjax.linear_softmax_cross_entropy`.
    strategy: ``"recompute"`` (default: the forward pass keeps a few numbers
      per token and the backward pass recomputes the tiles of both heads;
      temporary memory independent of N·V) or ``"store"`` (one pass over
      whole rows forms loss and gradients; no recomputation, one float32
      ``w``-sized buffer; ``reduction`` ``"mean"`` or ``"sum"``).
    w_layout, teacher_w_layout: ``"dv"`` (``[D, V]``) or ``"vd"`` (``[V, D]``).
    vocab_size: number of real classes when both heads have padding columns at
      the end (excluded exactly). Default: all columns.
    token_chunk_size, vocab_chunk_size: tile sizes (as in
      `xentjax.linear_softmax_cross_entropy`; automatic by default).
    precision: passed to `lax.dot_general`.
    mesh, data_axis, vocab_axis: vocabulary parallelism. With a
      `jax.sharding.Mesh`, tokens are sharded over ``data_axis`` and both heads
      over their vocabulary axis along ``vocab_axis`` (as in
      `xentjax.parallel.linear_softmax_cross_entropy`); no vocabulary-sized
      array is ever gathered.

  Returns:
    A scalar for ``"mean"``/``"sum"``, ``[...]`` for ``"none"``; float32 for
    16-bit inputs (which accumulate logits, statistics and gradients in
    float32), else the promoted dtype. Gradients of ``x``, ``w`` and ``bias``
    come back in their dtypes. With ``return_components=True``, the pair
    ``(loss, DistillationComponents)``.

  Note:
    * All options other than the arrays (and an array ``temperature``) are
      static (Python numbers).
    * The forward and reverse KL need one pass over the tiles of both heads in
      the forward pass; the generalized JSD (scaled or not) and the total
      variation need two (``log m`` and ``|p_t - p_s|`` need both normalizers
      first). ``"recompute"`` then recomputes the tiles once more in the
      backward pass.
    * Inputs with `Explicit` mesh shardings run through `shard_map` with the
      layout read from ``x`` and ``w``.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> x = jnp.ones((4, 8)); w = jnp.zeros((8, 10))
    >>> float(xentjax.linear_distillation_loss(x, w, x, w))  # identical models
    0.0

  References:
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    2015. Agarwal et al., "On-Policy Distillation of Language Models: Learning
    from Self-Generated Mistakes" (generalized JSD), 2024. Hsu et al., "Liger
    Kernel", 2024 (fused linear JSD). Milakov & Gimelshein, "Online normalizer
    calculation for softmax", 2018.
  """
  head = Head(
    w_layout, vocab_size, token_chunk_size, vocab_chunk_size, precision, mesh, data_axis, vocab_axis
  )
  monitor = return_components and labels is not None  # the hard term even at alpha = 0
  call, alpha = prepare_student(
    x,
    w,
    labels,
    head,
    hard_weight=hard_weight,
    reduction=reduction,
    strategy=strategy,
    ignore_index=ignore_index,
    where=where,
    temperature=temperature,
    bias=bias,
    keep_labels=monitor,
  )
  hard = alpha > 0.0 or monitor
  call = with_teacher(call, teacher_x, teacher_w, teacher_bias, teacher_w_layout)
  kernel = divergence_kernel(divergence, beta, call, hard)
  loss = DistillationLoss(
    alpha, call.tiling.temperature, differentiable=(TEMPERATURE,) * traced(call)
  )
  return distill(call, kernel, {}, loss, strategy, reduction, denominator, return_components)


def divergence_kernel(divergence, beta, call: Call, hard: bool):
  """The kernel of `divergence` (checked, with `beta`) for the student and teacher of `call`."""
  b = check_unit_interval("beta", beta)
  if divergence not in DIVERGENCES:
    raise ValueError(
      f"`divergence` must be one of {', '.join(map(repr, DIVERGENCES))}, got "
      f"{V.describe(divergence)}."
    )
  own_z = hard and (traced(call) or call.tiling.temperature != 1.0)
  if divergence == "tvd":
    if b != 0.0:
      raise ValueError(
        f'`beta`={beta!r} weighs the Jensen-Shannon family (divergence="jsd" or '
        '"jsd_scaled"); the total variation distance (divergence="tvd") has no beta: '
        "leave beta=0."
      )
    return TotalVariation(hard=hard, own_z=own_z)
  scaled = divergence == "jsd_scaled" and 0.0 < b < 1.0
  return Divergence(beta=b, hard=hard, own_z=own_z, scaled=scaled)


def with_teacher(call: Call, teacher_x, teacher_w, teacher_bias, teacher_w_layout) -> Call:
  """`call` with the teacher's head (checked, constant) among its operands."""
  tok = call.tokens
  tx, tw, tvd = check_teacher(tok, teacher_x, teacher_w, teacher_w_layout)
  tb = check_vector("teacher_bias", teacher_bias, tok.n_cols, "one per column of `teacher_w`")
  tb = None if tb is None else lax.stop_gradient(tb)
  ops = dataclasses.replace(call.ops, teacher_x=tx, teacher_w=tw, teacher_bias=tb)
  cdt = V.compute_dtype(call.tiling.cdt, tx.dtype, tw.dtype)
  return call._replace(tiling=dataclasses.replace(call.tiling, teacher_vd=tvd, cdt=cdt), ops=ops)


def check_teacher(tok: Tokens, teacher_x, teacher_w, teacher_w_layout):
  """`(teacher_x [n, D_t], teacher_w, vd)`: the teacher as constants, checked against `tok`."""
  mistaken = teacher_logits_passed(tok, teacher_x, teacher_w)
  if mistaken is not None:
    raise TypeError(
      f"Teacher logits were passed {mistaken}: `teacher_w` is the teacher's output head "
      '(a [D_t, V] matrix, or [V, D_t] with teacher_w_layout="vd") that multiplies '
      "`teacher_x` (its hidden states [..., D_t]). Saved teacher outputs go to "
      "`xentjax.linear_topk_distillation_loss(x, w, teacher_indices, teacher_logits, ...)` "
      "(the top-k of each row: jax.lax.top_k(teacher_logits, k)), or compute the "
      "student's logits too and use the dense `xentjax.kl_divergence`."
    )
  tx, tw, tvd, t_cols = check_head(
    "teacher_x", teacher_x, "teacher_w", teacher_w, "teacher_w_layout", teacher_w_layout
  )
  if tx.shape[:-1] != tok.batch_shape:
    raise ValueError(
      f"`teacher_x` must have the leading (token) shape of `x`, got "
      f"teacher_x.shape={tx.shape} and x.shape={(*tok.batch_shape, tok.x.shape[1])}."
    )
  if t_cols != tok.n_cols:
    w_layout = "vd" if tok.vd else "dv"
    raise ValueError(
      f"The student and teacher vocabularies differ: `w` has V={tok.n_cols} columns "
      f"(w.shape={tok.w.shape}, w_layout={w_layout!r}) and `teacher_w` has V={t_cols} "
      f"(teacher_w.shape={tw.shape}, teacher_w_layout={teacher_w_layout!r}). Both heads must "
      "map into the same vocabulary; pad the smaller one with zero columns and pass "
      "vocab_size=... to exclude the padding."
    )
  tx = lax.stop_gradient(tx.reshape(tok.x.shape[0], tx.shape[-1]))
  return tx, lax.stop_gradient(tw), tvd


def teacher_logits_passed(tok: Tokens, teacher_x, teacher_w) -> str | None:
  """Where a call put teacher logits ``[..., V]`` instead of the teacher's head (or None).

  Two mistakes read the same signature: ``(x, w, teacher_logits, labels)``
  puts the logits in `teacher_x` and integer labels in `teacher_w`;
  ``(x, w, teacher_x, teacher_logits, labels)`` puts the logits (one row per
  token, V columns) where the head goes.
  """
  logits_shape = (*tok.batch_shape, tok.n_cols)
  tx_shape, tw_shape = np.shape(teacher_x), np.shape(teacher_w)
  tw_float = jnp.issubdtype(jnp.result_type(teacher_w), jnp.floating)
  if tuple(tx_shape) == logits_shape and (not tw_float or len(tw_shape) != 2):
    return "as `teacher_x` (and the labels as `teacher_w`, where the teacher's head goes)"
  heads = {(tx_shape[-1:] or (None,))[0]}
  if tuple(tw_shape) == logits_shape and len(tw_shape) == 2 and tw_shape[0] not in heads:
    return "as `teacher_w`, where the teacher's head goes"
  return None


# ----------------------------------------------------------------------------
# Top-k teachers.


def topk_teacher(idx, logprobs, temperature, vocab_size, cdt):
  """`q = softmax(logprobs / T)` over the k entries, `sum q log q`, and which rows are bad.

  A row is bad when an index is outside ``[0, vocab_size)`` or appears twice,
  a log-probability is positive or NaN, or every log-probability is ``-inf``
  (no distribution). Bad rows get a harmless uniform ``q`` (their loss is NaN
  anyway). `temperature`: a Python float or per-token rows ``[n]``.
  """
  status = label_status(idx, vocab_size)
  lp = logprobs.astype(cdt)
  bad_entry = status.bad | (lp > 0.0) | jnp.isnan(lp)
  bad = jnp.any(bad_entry, axis=-1) | jnp.all(lp == -jnp.inf, axis=-1) | repeats(idx)
  t = temperature if isinstance(temperature, float) else temperature[:, None]
  scaled = jnp.where(bad[..., None], 0.0, lp / t)
  logq = jax.nn.log_softmax(scaled, axis=-1)
  q = jnp.exp(logq)
  qlogq = jnp.sum(jnp.where(q > 0.0, q * logq, 0.0), axis=-1)
  return status.index, q, qlogq, bad


def repeats(idx):
  """`[n]` bool: a row of `idx` `[n, k]` holds some index twice (k is small: sort and compare)."""
  if idx.shape[-1] < 2:
    return jnp.zeros(idx.shape[:-1], bool)
  s = jnp.sort(idx, axis=-1)
  return jnp.any(s[..., 1:] == s[..., :-1], axis=-1)


def check_topk_teacher(
  teacher_indices: jax.typing.ArrayLike,
  teacher_logprobs: jax.typing.ArrayLike,
  vocab_size: int,
  *,
  atol: float = 1e-2,
) -> None:
  """Eagerly checks a saved top-k teacher; raises `ValueError` naming the bad argument.

  Inside `jit` a token with a bad teacher entry gets a NaN loss (nothing can
  raise there); call this on the saved arrays before training to find them.
  Checks: ``teacher_indices`` integer, in ``[0, vocab_size)``, each class at
  most once per row (a repeated class is a bug of the teacher dump: merging
  its entries would hide it); ``teacher_logprobs`` float, of the same shape, no NaN, no positive value,
  not all ``-inf`` in a row, and probabilities summing to at most
  ``1 + atol`` per row (they are a part of one distribution).

  Example:
    >>> import numpy as np, xentjax
    >>> xentjax.check_topk_teacher(np.array([[3, 1]]), np.log([[0.6, 0.3]]), 10)
  """
  V.check_integer("teacher_indices", teacher_indices)
  V.check_floating("teacher_logprobs", teacher_logprobs)
  idx = np.asarray(teacher_indices)
  lp = np.asarray(teacher_logprobs, np.float64)
  V.check_same_shape("teacher_indices", idx, "teacher_logprobs", lp)
  if idx.ndim < 1 or idx.shape[-1] < 1:
    raise ValueError(f"`teacher_indices` must be [..., k] with k >= 1, got shape {idx.shape}.")
  out = (idx < 0) | (idx >= vocab_size)
  if out.any():
    pos = tuple(int(i) for i in np.argwhere(out)[0])
    raise ValueError(
      f"`teacher_indices` has {int(out.sum())} entries outside [0, {vocab_size}), e.g. "
      f"{idx[pos]} at {pos}."
    )
  s = np.sort(idx, axis=-1)
  dup = s[..., 1:] == s[..., :-1]
  if dup.any():
    pos = tuple(int(i) for i in np.argwhere(dup)[0])
    rows = int(np.any(dup, axis=-1).sum())
    raise ValueError(
      f"`teacher_indices` repeats class {s[pos]} in row {pos[:-1]} ({rows} rows repeat a "
      "class): each saved class must appear once per row (a top-k has distinct indices); "
      "check how the teacher's top-k was saved."
    )
  for what, badv in (("NaN", np.isnan(lp)), ("positive (not a log-probability)", lp > 0.0)):
    if badv.any():
      pos = tuple(int(i) for i in np.argwhere(badv)[0])
      raise ValueError(
        f"`teacher_logprobs` has {int(badv.sum())} {what} entries, e.g. {lp[pos]!r} at {pos}."
      )
  dead = np.all(lp == -np.inf, axis=-1)
  if dead.any():
    pos = tuple(int(i) for i in np.argwhere(dead)[0])
    raise ValueError(f"`teacher_logprobs` is -inf in every entry of row {pos}: no distribution.")
  mass = np.exp(lp).sum(-1)
  over = mass > 1.0 + atol
  if over.any():
    pos = tuple(int(i) for i in np.argwhere(over)[0])
    raise ValueError(
      f"`teacher_logprobs` are not log-probabilities of one distribution: row {pos} sums "
      f"to probability {mass[pos]:.4f} > 1 + {atol:g}."
    )


@public(
  static=("hard_weight", "ignore_index", "reduction", "strategy", *HEAD_OPTIONS),
  validators=validators(),
)
def linear_topk_distillation_loss(
  x: jax.typing.ArrayLike,
  w: jax.typing.ArrayLike,
  teacher_indices: jax.typing.ArrayLike,
  teacher_logprobs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike | None = None,
  *,
  temperature: float | jax.typing.ArrayLike = 1.0,
  hard_weight: float = 0.0,
  ignore_index: int = -100,
  where: jax.typing.ArrayLike | None = None,
  reduction: str = "mean",
  denominator: jax.typing.ArrayLike | None = None,
  strategy: Literal["recompute", "store"] = "recompute",
  w_layout: Literal["dv", "vd"] = "dv",
  vocab_size: int | None = None,
  token_chunk_size: int | None = None,
  vocab_chunk_size: int | None = None,
  precision: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  data_axis: Any = "data",
  vocab_axis: Any = "vocab",
) -> jax.Array:
  r"""Offline distillation from a saved top-k teacher, without the student's logits.

  The teacher was run ahead of time and kept, per token, its ``k`` most likely
  tokens ``teacher_indices`` and their log-probabilities ``teacher_logprobs``.
  With :math:`\hat p_t` the teacher renormalized over those ``k`` tokens and
  :math:`p_s = \mathrm{softmax}(z_s / T)` the student's full-vocabulary
  distribution (:math:`z_s = x^\top w`):

  .. math::

    \begin{aligned}
    \hat p_{t,i} &= \frac{e^{\ell_i / T}}{\sum_{i'=1}^{k} e^{\ell_{i'} / T}}, \qquad
    D = \sum_{i=1}^{k} \hat p_{t,i} \big(\log \hat p_{t,i} - \log p_{s, j_i}\big), \\
    \ell &= (1-\alpha)\, T^2 D + \alpha\, \mathrm{CE}(z_s, y),
    \end{aligned}

  with :math:`j_i` the saved indices and :math:`\ell_i` their log-probabilities.
  :math:`\log p_{s,j} = z_{s,j}/T - \mathrm{lse}(z_s/T)` is exact: the
  log-normalizer comes from the full vocabulary (streamed over tiles, as in
  `xentjax.linear_softmax_cross_entropy`), and the logits at the saved indices
  are picked out of the same tiles, so no ``[N, k, D]`` gather of ``w`` is
  formed. The gradient with respect to the student logits is
  :math:`(1-\alpha)\,T\,(p_s - \mathrm{scatter}(\hat p_t)) + \alpha\,(\mathrm{softmax}(z_s) - \mathrm{onehot}(y))`.

  Why renormalize: the saved probabilities sum to less than 1 (the tail is
  lost), so they are not a distribution, and a temperature cannot be applied
  to them otherwise (``softmax(log p / T)`` over the saved tokens is exactly
  the tempered teacher restricted to them). What it loses: the teacher's tail
  mass and its shape. :math:`D \ge -\log \sum_i p_{s,j_i} \ge 0`, and it is 0
  only when the student puts all its mass on the saved tokens in the teacher's
  proportions: the student is pushed to concentrate on the top-k, it learns
  nothing about the ranking of the other tokens, and with small ``k`` it
  becomes more confident than the teacher was.

  Args:
    x: student hidden states ``[..., D]``.
    w: student head ``[D, V]`` (or ``[V, D]`` with ``w_layout="vd"``).
    teacher_indices: integer ``[..., k]``, the teacher's top-k token ids.
    teacher_logprobs: float ``[..., k]``, their log-probabilities (``<= 0``;
      ``-inf`` allowed for probability 0).
    labels, temperature, hard_weight: as in `xentjax.linear_distillation_loss`.
    ignore_index, where, reduction, denominator, strategy: likewise.
    w_layout, vocab_size, token_chunk_size, vocab_chunk_size: likewise.
    precision, mesh, data_axis, vocab_axis: likewise.

  Returns:
    As `xentjax.linear_distillation_loss`.

  Note:
    Inside `jit` values cannot raise: a token that counts and whose saved
    indices fall outside ``[0, vocab_size)`` or repeat a class, or whose
    log-probabilities are positive, NaN or all ``-inf``, gets a NaN loss (and
    NaN gradients). `xentjax.check_topk_teacher` checks the saved arrays
    eagerly and names the row. A repeated class is not merged: with two
    entries on one class :math:`D` is no longer a divergence (it can be
    negative), and a top-k never repeats a class, so the dump is wrong.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> x = jnp.ones((2, 4)); w = jnp.zeros((4, 10))
    >>> idx = jnp.array([[0, 1], [2, 3]]); lp = jnp.log(jnp.full((2, 2), 0.4))
    >>> round(float(xentjax.linear_topk_distillation_loss(x, w, idx, lp)), 4)  # log(10/2)
    1.6094

  References:
    Hinton, Vinyals & Dean, 2015. Raman et al., "For Distillation, Tokens Are
    Not All You Need", 2023 (top-k logit distillation).
  """
  head = Head(
    w_layout, vocab_size, token_chunk_size, vocab_chunk_size, precision, mesh, data_axis, vocab_axis
  )
  call, alpha = prepare_student(
    x,
    w,
    labels,
    head,
    hard_weight=hard_weight,
    reduction=reduction,
    strategy=strategy,
    ignore_index=ignore_index,
    where=where,
    temperature=temperature,
  )
  tok, t = call.tokens, call.tiling.temperature
  idx, lp = check_topk_shapes(tok, teacher_indices, teacher_logprobs)
  traced_t = traced_temperature(call.ops.rows)
  idx, q, qlogq, bad_t = topk_teacher(
    idx, lax.stop_gradient(lp), t if traced_t is None else traced_t, tok.vocab_size, tok.cdt
  )
  st = tok.status  # a token that counts with a bad teacher entry is a bad token
  tok = tok._replace(status=st._replace(bad=st.bad | (st.counted & bad_t)))
  call = call._replace(tokens=tok, ops=call.ops.with_rows(idx=idx))
  own_z = alpha > 0.0 and (traced(call) or t != 1.0)
  kernel = TopkLogits(k=idx.shape[1], hard=alpha > 0.0, own_z=own_z)
  grads = ("q", "qlogq", TEMPERATURE) if traced(call) else ()
  loss = DistillationLoss(alpha, t, topk=True, differentiable=grads)
  aux = {"q": q, "qlogq": qlogq}
  return distill(call, kernel, aux, loss, strategy, reduction, denominator)


def check_topk_shapes(tok: Tokens, teacher_indices, teacher_logprobs):
  """The saved teacher's `(indices, logprobs)`, each flattened to `[n, k]`."""
  V.check_integer("teacher_indices", teacher_indices)
  V.check_floating("teacher_logprobs", teacher_logprobs)
  idx, lp = jnp.asarray(teacher_indices), jnp.asarray(teacher_logprobs)
  V.check_same_shape("teacher_indices", idx, "teacher_logprobs", lp)
  k = idx.shape[-1] if idx.ndim else 0
  if idx.shape[:-1] != tok.batch_shape or k < 1:
    raise ValueError(
      f"`teacher_indices` and `teacher_logprobs` must be [..., k] (k >= 1) with the token "
      f"shape of `x` {tok.batch_shape}, got teacher_indices.shape={idx.shape}."
    )
  if k > tok.vocab_size:
    raise ValueError(
      f"`teacher_indices` has k={k} entries per token, more than the vocabulary ({tok.vocab_size})."
    )
  n = tok.x.shape[0]
  return idx.reshape(n, k), lp.reshape(n, k)
