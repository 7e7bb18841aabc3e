"""`linear_softmax_cross_entropy`: the cross-entropy as a composition of softmax statistics.

The loss is ordinary differentiable JAX code on the per-token statistics of
the `kernels.softmax_stats.SoftmaxStats` kernel (levanter's design: the
custom VJP returns statistics, smoothing, z-loss, masks, weights and the
reduction live outside it). Strategy "store" runs the same per-token loss
inside the engine's one-pass sweep (`engine.run_store`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from xentjax import _core
from xentjax import _validation as V
from xentjax._api import public
from xentjax._vocab.inputs import Call, Head, Tokens, prepare_call
from xentjax._vocab.kernels.softmax_stats import SoftmaxStats, token_entropy
from xentjax._vocab.options import (
  CROSS_ENTROPY_OPTIONS,
  check_denominator_use,
  check_filter_eps,
  check_strategy,
  check_vector,
  check_weights,
  validators,
)
from xentjax._vocab.reduce import counted_only, mean_denominators, run_and_reduce


class CrossEntropyStats(NamedTuple):
  r"""Per-token statistics of `xentjax.linear_softmax_cross_entropy`'s own sweep (``[...]``).

  Returned with ``return_stats=True``, from the statistics the loss is made
  of (no second sweep, no logits), without gradient (`lax.stop_gradient`):
  they are for monitoring. The logits are those of the loss: capped,
  tempered, padding excluded.

  Attributes:
    lse: the log-normalizer :math:`\log \sum_j e^{z_j}`, every token.
    z_loss: the z-loss term :math:`\lambda\,\mathrm{lse}^2` (0 with
      ``z_loss=0``, and for tokens that do not count), before token weights.
    entropy: :math:`H(p) = \mathrm{lse} - \sum_j p_j z_j` in nats; 0 for tokens
      that do not count, and for a token whose every logit is ``-inf`` (its
      ``lse`` is ``-inf``; each term :math:`0 \log 0 = 0`).
    argmax: int32, the predicted class, every token (ties: the lowest class
      index, as `numpy.argmax`; a class index also with ``vocab_order``).
    correct: the label's top-1 credit, as `xentjax.metrics.correct`: 1 when
      the label is the only most likely class, ``1/t`` when it shares the
      maximum with ``t - 1`` others (the expected hit of a random tie break:
      ``argmax == label`` is not the rule under ties), 0 otherwise; 0 for
      tokens that do not count, NaN for a label outside ``[0, vocab_size)``
      or a NaN row. Its mean over the counted tokens is
      `xentjax.metrics.accuracy`.
  """

  lse: jax.Array
  z_loss: jax.Array
  entropy: jax.Array
  argmax: jax.Array
  correct: jax.Array


def check_z_loss_denominator(denominator, reduction, class_weights, lam, cdt):
  """`options.check_denominator_use`, and a check that one number can be the denominator.

  With class weights and a z-loss the mean has two denominators.
  """
  denominator = check_denominator_use(denominator, reduction, cdt)
  if denominator is not None and class_weights is not None and lam:
    raise ValueError(
      "`denominator` replaces the class-weighted denominator sum_i c[y_i] of the "
      "cross-entropy term, but the z-loss is averaged over the count of tokens, another "
      "number. Pass z_loss=0 and add the z-loss of the accumulated batch yourself: with "
      'return_lse=True (strategy="recompute"), z_loss * sum(lse**2 over counted tokens) / '
      "total_token_count; or pass class_weights=None."
    )
  return denominator


@dataclasses.dataclass(frozen=True)
class CrossEntropyLoss:
  """Per-token (weighted, masked) cross-entropy from the statistics (hashable: static).

  ``coef * [(1-eps) c_y (log_s - zy) + eps (U log_s - zu)] + zcoef * lam lse^2``
  on counted tokens, 0 elsewhere; ``c_y`` the class weight of the label (1
  without class weights), ``zu = sum_j u_j (z_j - m)`` with ``u_j = c_j / V``
  and ``U = sum_j u_j`` (1 without class weights). `coef` is NaN on a bad
  label. Without class weights the z-loss shares `coef` (one term); with
  them it has its own ``zcoef``, since the mean divides it by the count of
  tokens and the rest by the class-weighted one (`mean_denominators`).
  """

  label_smoothing: float
  z_loss: float
  class_weighted: bool
  differentiable = ()  # no gradient flows into its per-token operands

  def __call__(self, s: dict, aux: dict):
    terms = self.terms(s, aux)
    return terms["coef"] + terms["zcoef"] if "zcoef" in terms else terms["coef"]

  def terms(self, s: dict, aux: dict) -> dict:
    """`{coefficient name: per-token term}`: the terms each mean divides by its own denominator."""
    eps, lam = self.label_smoothing, self.z_loss
    if not self.class_weighted:
      ell = _core.cross_entropy_from_stats(
        s["log_s"], s["zy"], s.get("zu"), s["m"], label_smoothing=eps, z_loss=lam
      )
      return {"coef": weighted(ell, aux, "coef")}
    ell = 0.0  # `_core.xent`: a row whose every logit is -inf gives +inf, zero gradient
    if eps < 1.0:  # a class weight of 0 on a label of probability 0 adds 0, not 0 * inf
      cwy = aux["cwy"]
      ce = _core.xent(s["log_s"], cwy, cwy * s["zy"])
      ell = (1.0 - eps) * jnp.where(cwy != 0, ce, 0.0)
    if eps > 0.0:
      ell = ell + eps * _core.xent(s["log_s"], aux["usum"], s["zu"])
    terms = {"coef": weighted(ell, aux, "coef")}
    if lam:  # the z-loss is not class-weighted
      terms["zcoef"] = weighted(_core.z_loss_term(s["m"], s["log_s"], lam), aux, "zcoef")
    return terms


def weighted(ell, aux: dict, coef: str):
  """`aux[coef] * ell` on counted tokens; a weight of 0 adds 0 whatever `ell` (0 log 0 = 0)."""
  c = aux[coef]
  return jnp.where(aux["counted"] & (c != 0), c * ell, 0.0)


def token_loss_of(tok: Tokens, weights, class_weights, eps, lam):
  """`(CrossEntropyLoss, aux)`: the per-token loss and its `aux`.

  ``aux``: token weights (NaN on a bad label), class weights.
  """
  st, cdt = tok.status, tok.cdt
  nan_bad = jnp.where(st.bad, jnp.nan, 1.0).astype(cdt)
  w = jnp.ones(st.index.shape, cdt) if weights is None else weights.reshape(-1).astype(cdt)
  coef = jnp.where(st.counted, w, 0.0) * nan_bad
  aux = {"counted": st.counted, "coef": coef}
  if class_weights is not None:
    aux["cwy"] = jnp.take(class_weights.astype(cdt), st.index) * nan_bad
    if eps:
      usum = jnp.sum(class_weights.astype(cdt)) / tok.vocab_size
      aux["usum"] = jnp.broadcast_to(usum, st.index.shape)
    if lam:
      aux["zcoef"] = coef
  return CrossEntropyLoss(eps, lam, class_weights is not None), aux


def mean_denominators_of(aux: dict, denominator) -> dict:
  """`{coefficient name: denominator}` of ``"mean"``.

  The cross-entropy term divides by the (token-weighted) sum of the labels'
  class weights, ``sum_i w_i c_{y_i}`` (the count of tokens without weights);
  the z-loss, with class weights, by the count ``sum_i w_i`` alone
  (Liger-Kernel's rule), so that its strength does not move with the class
  weights' scale; both by the caller's `denominator` where it is given
  (`reduce.mean_denominators`).
  """
  coef = aux["coef"]
  d = {"coef": jnp.sum(coef if "cwy" not in aux else coef * aux["cwy"])}
  if "zcoef" in aux:
    d["zcoef"] = jnp.sum(coef)
  return mean_denominators(d, denominator)


def with_column_weights(call: Call, class_weights, eps, monitor: bool):
  """`(call, kernel)`: with smoothing, the column weights `u` of the statistic `zu` in the call.

  ``u_j = c_j / V`` (1/V without class weights), 0 on padding columns.
  `monitor`: the kernel also keeps what `CrossEntropyStats` reads.
  """
  fc = call.tiling.filter_vocab_chunk if call.tiling.filter_eps is not None else 0
  assert fc is not None  # filtering on sets its chunk
  kernel = SoftmaxStats(weighted_sum=bool(eps), filter_chunk=fc, monitor=monitor)
  if not eps:
    return call, kernel
  tok = call.tokens
  c = jnp.ones((tok.vocab_size,), tok.cdt) if class_weights is None else class_weights
  u = jnp.pad(c.astype(tok.cdt) / tok.vocab_size, (0, tok.n_cols - tok.vocab_size))
  u = u if call.order is None else u[call.order]  # the columns in the sweep's order
  return call._replace(ops=call.ops.with_cols(u=u)), kernel


@public(static=CROSS_ENTROPY_OPTIONS, validators=validators())
def linear_softmax_cross_entropy(
  x: jax.typing.ArrayLike,
  w: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  reduction: str = "mean",
  ignore_index: int = -100,
  where: jax.typing.ArrayLike | None = None,
  weights: jax.typing.ArrayLike | None = None,
  class_weights: jax.typing.ArrayLike | None = None,
  denominator: jax.typing.ArrayLike | None = None,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  logit_soft_cap: float | None = None,
  temperature: float | jax.typing.ArrayLike = 1.0,
  bias: jax.typing.ArrayLike | None = None,
  filter_eps: float | None = None,
  vocab_order: jax.typing.ArrayLike | None = None,
  return_lse: bool = False,
  return_stats: bool = False,
  strategy: Literal["recompute", "store"] = "recompute",
  w_layout: Literal["dv", "vd"] = "dv",
  vocab_size: int | None = None,
  token_chunk_size: int | None = None,
  vocab_chunk_size: int | None = None,
  precision: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  data_axis: Any = None,
  vocab_axis: Any = None,
) -> jax.Array | tuple:
  r"""Softmax cross-entropy of the logits ``x @ w``, without forming them.

  Equal (to float32 rounding, values and gradients) to

  .. code-block:: python

    logits = x @ w                       # [..., V], never materialized here
    optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  followed by the reduction and the options below. For each token with hidden state
  :math:`x \in \mathbb{R}^D` and label :math:`y`, the logits are
  :math:`z_j = c \tanh((x^\top w_{:,j} + b_j) / c)\,/\,T` (without a soft cap
  :math:`(x^\top w_{:,j} + b_j) / T`) and

  .. math::

    \begin{aligned}
    \ell &= (1-\varepsilon)\, c_y\, (\mathrm{lse}(z) - z_y)
      + \frac{\varepsilon}{V} \sum_{j=1}^{V} c_j\,(\mathrm{lse}(z) - z_j)
      + \lambda\, \mathrm{lse}(z)^2, \\
    \mathrm{lse}(z) &= \log \sum_{j=1}^{V} e^{z_j},
    \end{aligned}

  the cross-entropy against the smoothed target
  :math:`(1-\varepsilon)\,\mathrm{onehot}(y) + \varepsilon/V` with class
  weights :math:`c` (1 by default) plus the PaLM z-loss. With token weights
  :math:`w_i` (1 by default), ``"sum"`` is :math:`\sum_i w_i \ell_i` and
  ``"mean"``, over the tokens that count, is

  .. math::

    \frac{\sum_i w_i\, (\ell_i - \lambda\,\mathrm{lse}_i^2)}{\sum_i w_i c_{y_i}}
    + \frac{\sum_i w_i\, \lambda\,\mathrm{lse}_i^2}{\sum_i w_i},

  one mean :math:`\sum_i w_i \ell_i / \sum_i w_i` without class weights; with
  them the z-loss is averaged over the tokens, not over their class weights,
  so its strength does not move with the class weights' scale (the
  convention of Liger-Kernel). ``denominator=`` replaces the denominator for
  gradient accumulation.
  The loss is ordinary JAX code on per-token statistics of the fused engine
  (``xentjax._vocab``), which computes them in tiles of
  ``[token_chunk_size, vocab_chunk_size]`` with a streaming log-sum-exp.

  Args:
    x: hidden states ``[..., D]``, any leading batch shape, any float dtype.
    w: output projection ``[D, V]`` (a flax ``nn.Dense`` kernel). For tied
      embeddings pass the embedding table ``[V, D]`` itself with
      ``w_layout="vd"`` (not ``table.T``: that would copy it).
    labels: integer class indices ``[...]`` (the shape of ``x`` without
      ``D``), any signed or unsigned integer dtype.
    reduction: ``"mean"`` (over tokens that count: not ``ignore_index`` and
      ``where`` true), ``"sum"``, or ``"none"`` (per-token ``[...]``, times
      the token weight, 0 for tokens that do not count).
    ignore_index: label value of tokens that do not count (PyTorch's -100).
      A value the labels' dtype cannot hold (-100 for ``uint16``) matches none.
    where: optional boolean token mask broadcastable to ``labels``; tokens
      where it is False do not count.
    weights: optional float per-token weights broadcastable to ``labels``
      (sequence weights, soft masks); no gradient flows into them.
    class_weights: optional ``[vocab_size]`` float class weights with
      PyTorch's ``weight=`` semantics (the mean divides by the summed weights
      of the targets; the smoothing term weights each class). The z-loss is
      not class-weighted, and its mean divides by the (token-weighted) count
      of tokens; no gradient flows into them.
    denominator: optional divisor of ``"mean"`` for gradient accumulation
      (TRL's ``num_items_in_batch``): the loss is the sum of the counted
      per-token losses divided by it instead of by this call's own
      denominator, so the losses (and gradients) of the microbatches of one
      step, each called with the count of the whole accumulated batch, add up
      to the full batch's mean. It replaces :math:`\sum_i w_i` (the number
      of counted tokens without token weights) or, with ``class_weights``,
      :math:`\sum_i w_i c_{y_i}`, the class-weighted denominator of the
      whole batch (with ``class_weights`` and ``z_loss`` both, one number
      cannot stand for both means: an error that says what to do). A
      Python number (checked: finite, > 0) or a scalar array, traced (a new
      value does not recompile), without gradient; a traced value that is
      not a finite number > 0 gives NaN. Only with ``reduction="mean"`` (an
      error otherwise); the same rule as
      `xentjax.policy.policy_gradient_loss`'s ``denominator``.
    label_smoothing: :math:`\varepsilon \in [0, 1]`, target
      :math:`(1-\varepsilon)\,y + \varepsilon/V` (PyTorch/Keras convention).
    z_loss: :math:`\lambda \ge 0`, adds :math:`\lambda\,\mathrm{lse}^2` per token.
    logit_soft_cap: :math:`c > 0` caps the logits at :math:`c\tanh(z/c)` before
      the softmax (Gemma 2); the gradient includes its derivative. A Python
      number: it is static (part of the compiled program).
    temperature: :math:`T > 0` divides the (capped) logits: the cap belongs
      to the model, the temperature to the distribution taken from it, so
      ``logit_soft_cap=c, temperature=T`` bounds the tempered logits by
      :math:`c/T`. A Python number (checked now), or an array: a scalar or
      one per token (broadcastable to ``labels``), traced (a sweep over
      values compiles once) and differentiable (:math:`\partial\ell/\partial T`
      is returned like the other gradients); a traced value that is not a
      finite number > 0 gives NaN.
    bias: optional ``[V]`` output bias (one per column of ``w``), added
      before the cap; its gradient is returned like those of ``x`` and ``w``.
    filter_eps: opt-in gradient filtering (not with ``label_smoothing``).
      The gradient pass skips every tile of ``[token_chunk_size,
      vocab_chunk_size]`` in which every token's largest probability on the
      tile's columns is below ``filter_eps`` and no token's label lies (a
      skipped tile is neither multiplied nor, in ``"recompute"``,
      recomputed). In ``"recompute"`` the backward pass decides from the
      per-tile row maxima kept by the forward pass and loops over the kept tiles;
      in ``"store"`` each whole-row tile of tokens decides from its own
      logits and loops over its kept tiles only (a partial tile at the edge
      of the vocabulary or of a whole-row tile is never skipped), and the
      ``bias`` gradient stays exact. The value is exact; each dropped entry of the logit
      gradient ``g (p_j - [j=y])`` is below ``|g| filter_eps``, so a token's
      logit gradient loses at most ``|g|`` times the probability mass of its
      skipped tiles (L1). Recommended: ``2**-12`` for bfloat16 training (the
      dropped entries are below bfloat16's resolution of the gradient's
      largest entries), ``2**-20`` or smaller for float32. With it the
      automatic filter tile is 256 tokens x 512 columns (``"store"``: 256 x
      256): a tile is skipped only if all its tokens agree, so tiles are
      narrow in tokens. Filtering is adaptive: where fewer than a quarter of
      the tiles can be skipped (in a chunk of columns for ``"recompute"``, in
      a whole-row tile of tokens for ``"store"``), the tiles run unfiltered
      (wide products, no per-tile test); in ``"recompute"``, where no chunk
      is worth filtering, the backward pass is the unfiltered one, so
      filtering costs little where there is little to skip. ``"store"`` is
      the faster of the two where there is much to skip (two products per
      kept tile instead of three: see ``benchmarks/filtering.py``).
    vocab_order: optional integer permutation ``[vocab_size]`` of the
      classes: the tiles are swept with column ``k`` being class
      ``vocab_order[k]``. For gradient filtering: put the classes that carry
      mass together, e.g. ``np.argsort(-token_counts)`` with token counts known
      before training, so that more tiles are negligible. Values and gradients
      are those of the unsorted call (exactly without ``filter_eps``, within
      its bound with it): labels stay class indices and the gradients of
      ``w`` and ``bias`` come back in the original column order. Costs a
      gather of ``w``'s columns per pass (chunk by chunk) and one of its
      gradient (one more ``w``-sized buffer); slow on the CPU backend. To
      avoid them, store ``w`` with its columns in that order
      (``w[:, order]``) and pass positions in it as labels
      (``inverse[labels]`` with ``inverse[order] = arange(V)``). Not with a
      vocabulary sharded over a mesh.
    return_lse: also return the per-token log-normalizer ``lse`` ``[...]``
      (of the capped, tempered logits, for every token including the ones
      that do not count).
    return_stats: also return a `xentjax.CrossEntropyStats` of per-token
      statistics from the same sweep (log-normalizer, z-loss term, entropy,
      predicted token and its top-1 credit), without gradient. The default
      (False) compiles the program it compiled before: the entropy's running
      sum and the count of tied maxima are kept only when asked for.
    strategy: ``"recompute"`` (default; temporary memory independent of N·V,
      one extra matmul in the backward pass) or ``"store"`` (gradients formed in
      the forward pass and kept for the backward pass, the one of ``w`` in
      float32: for a float32 ``w`` XLA returns that buffer as the gradient,
      so beyond it only a whole-row tile is temporary; needs ``reduction``
      ``"mean"`` or ``"sum"``; its ``lse`` carries no gradient).
    w_layout: ``"dv"`` for ``w`` of shape ``[D, V]`` or ``"vd"`` for ``[V, D]``.
    vocab_size: number of real classes when ``w`` has padding columns (rows for
      ``"vd"``) at the end; those are excluded from the softmax. Default: all.
    token_chunk_size: tokens per tile. Default: 2048 for ``"recompute"``;
      for ``"store"`` as many as keep a ``[tokens, V]`` float32 tile at 64 MiB
      (at least 8); with ``filter_eps`` the filter tiles have 256 (a user's
      value sets both).
    vocab_chunk_size: vocabulary columns per tile, ``"recompute"`` only, or
      per filter tile with ``filter_eps`` (both strategies; in
      ``"recompute"`` a user's value sets both). Default 1024 (an 8 MiB
      float32 tile with the default token chunk); the filter tiles of
      ``filter_eps`` have 512 (``"store"``: 256).
    precision: passed to `lax.dot_general` (as in ``jnp.matmul``).
    mesh: optional `jax.sharding.Mesh` to place the computation on: tokens
      sharded over ``data_axis``, the vocabulary of ``w`` (and ``bias``) over
      ``vocab_axis`` (see `xentjax.parallel`). Chunk sizes then refer to one
      device's shard. Without a mesh, inputs with `Explicit` shardings are
      placed by their shardings.
    data_axis: mesh axis (or tuple of axes) of the tokens, or None.
    vocab_axis: mesh axis (or tuple of axes) of the vocabulary, or None.

  Returns:
    The loss: a scalar for ``"mean"``/``"sum"``, ``[...]`` for ``"none"``, in
    float32 for 16-bit inputs (else the promoted dtype of ``x`` and ``w``).
    With ``return_lse=True`` a pair ``(loss, lse)``, ``lse`` of shape ``[...]``
    in the same dtype; with ``return_stats=True`` ``(loss, stats)``, and
    with both ``(loss, lse, stats)``. Gradients of ``x``, ``w`` and ``bias`` come back in
    their dtypes.

  Note:
    * Nothing counted (all ignored, all masked, an empty batch, or token
      weights summing to 0): ``"mean"`` is NaN with zero gradients (the
      library's convention, as the dense losses), ``"sum"`` is 0.
    * A label outside ``[0, vocab_size)`` on a token that counts gives a NaN
      loss and NaN gradients, never a silent finite number; comparisons are
      made in the labels' own dtype (no wraparound of ``uint16`` or 64-bit
      labels).
    * ``lse - z_y`` is formed from statistics shifted by the row maximum, so
      the loss keeps its precision for logits of large magnitude.
    * ``-inf`` never occurs in the logits of finite inputs; padding columns
      (``vocab_size``) are excluded exactly (probability 0, gradient 0).
    * Inside ``jit``, all options except the arrays (and an array
      ``temperature``) are static.
    * Temporary memory of ``value_and_grad`` (default strategy, float32): a
      few tiles plus a float32 ``[N, D]`` accumulator and a transposed copy of
      ``x``, e.g. 128 MiB for N=8192, D=2048, V=262144 where the materialized
      computation needs 16 GiB. On the CPU backend XLA runs bfloat16 matmuls
      in float32 and keeps a float32 copy of ``w`` for the loop.

  Example:
    >>> import jax, jax.numpy as jnp, xentjax
    >>> x = jnp.ones((4, 8)); w = jnp.zeros((8, 10)); y = jnp.arange(4)
    >>> round(float(xentjax.linear_softmax_cross_entropy(x, w, y)), 4)  # log(10)
    2.3026

  References:
    Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024
    (Apple's Cut Cross-Entropy; gradient filtering). Hsu et al., "Liger Kernel:
    Efficient Triton Kernels for LLM Training", 2024. Milakov & Gimelshein,
    "Online normalizer calculation for softmax", 2018. Chowdhery et al.,
    "PaLM", 2022 (z-loss). Gemma Team, "Gemma 2", 2024 (logit soft-capping).
  """
  check_strategy(reduction, strategy, vocab_chunk_size, filter_eps)
  eps, lam = V.check_label_smoothing(label_smoothing), V.check_nonnegative("z_loss", z_loss)
  head = Head(
    w_layout, vocab_size, token_chunk_size, vocab_chunk_size, precision, mesh, data_axis, vocab_axis
  )
  call = prepare_call(
    x,
    w,
    labels,
    head,
    ignore_index=ignore_index,
    where=where,
    strategy=strategy,
    bias=bias,
    logit_soft_cap=logit_soft_cap,
    temperature=temperature,
    filter_eps=check_filter_eps(filter_eps, eps),
    vocab_order=vocab_order,
  )
  tok = call.tokens
  class_weights = check_vector("class_weights", class_weights, tok.vocab_size, "one per class")
  weights = check_weights(weights, tok.batch_shape)
  denominator = check_z_loss_denominator(denominator, reduction, class_weights, lam, tok.cdt)
  # Weights are data, not parameters: no gradient flows into them.
  weights, class_weights = lax.stop_gradient((weights, class_weights))
  token_loss, aux = token_loss_of(tok, weights, class_weights, eps, lam)
  call, kernel = with_column_weights(call, class_weights, eps, return_stats)
  means = functools.partial(mean_denominators_of, aux, denominator)
  keep = STATS_ROWS if return_stats else ("lse",)
  loss, rows = run_and_reduce(call, kernel, token_loss, aux, strategy, reduction, means, keep)
  return returned(loss, rows, tok, lam, return_lse, return_stats)


# The kernel rows `CrossEntropyStats` reads (strategy "store" keeps them).
STATS_ROWS = ("lse", "m", "log_s", "ent", "amax", "credit")


def returned(loss, rows: dict, tok: Tokens, lam, return_lse: bool, return_stats: bool):
  """`loss`, or the tuple ``(loss, lse?, stats?)`` that the return flags ask for.

  `rows`: the kernel's (strategy "recompute"), or those "store" kept, with ``lse``.
  """
  if "lse" not in rows:  # "recompute": the log-normalizer from the statistics
    rows = {**rows, "lse": rows["m"] + rows["log_s"]}
  out = (loss,) + (rows["lse"].reshape(tok.batch_shape),) * return_lse
  if return_stats:
    out = (*out, cross_entropy_stats(rows, tok, lam))
  return out if len(out) > 1 else loss


def cross_entropy_stats(rows: dict, tok: Tokens, lam: float) -> CrossEntropyStats:
  """The `CrossEntropyStats` of the tokens from the kernel's rows (without gradient)."""
  r = lax.stop_gradient({k: rows[k] for k in STATS_ROWS})
  counted = tok.status.counted
  zero = jnp.zeros_like(r["lse"])
  z = _core.z_loss_term(r["m"], r["log_s"], lam) if lam else zero
  stats = CrossEntropyStats(
    lse=r["lse"],
    z_loss=jnp.where(counted, z, 0.0),
    entropy=jnp.where(counted, token_entropy(r["log_s"], r["ent"]), 0.0),
    argmax=r["amax"],
    correct=counted_only(r["credit"], tok.status),
  )
  return CrossEntropyStats(*(a.reshape(tok.batch_shape) for a in stats))
