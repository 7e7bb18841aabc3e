"""`linear_sequence_logprobs`: per-sequence sums of ``log softmax((x @ w + b) / T)[label]``.

What preference losses (DPO and its family) and sequence-level policy
gradients read: one log-probability per completion, the sum over its tokens.
The per-token log-probabilities come from the token-statistics kernel
(`kernels.softmax_stats.SoftmaxStats`, without the entropy or the argmax), so
the ``[tokens, vocab]`` logits are never formed; the sums per segment are a
masked reduction over the tokens, so packed rows (several sequences in one row, a
sequence's tokens anywhere) need no reshaping.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from xentjax import _validation as V
from xentjax._api import broadcast_to_first, public, where_mask
from xentjax._vocab.inputs import Head, prepare_call
from xentjax._vocab.kernels.softmax_stats import SoftmaxStats
from xentjax._vocab.options import SEQUENCE_OPTIONS, validators
from xentjax._vocab.reduce import counted_only, run_tokens


def check_segment_ids(segment_ids, labels_shape: tuple) -> jax.Array:
  """``segment_ids`` as int32 of the labels' shape, or a named error."""
  V.check_integer("segment_ids", segment_ids, "integer sequence ids, one per token")
  s = jnp.asarray(segment_ids)
  if s.shape != tuple(labels_shape):
    raise ValueError(
      f"`segment_ids` must have the shape of `labels` {tuple(labels_shape)} (one sequence id "
      f"per token), got {s.shape}."
    )
  return s.astype(jnp.int32)


@public(
  static=SEQUENCE_OPTIONS,
  validators={**validators(), "num_segments": lambda v: V.int_option("num_segments", v, low=1)},
)
def linear_sequence_logprobs(
  x: jax.typing.ArrayLike,
  w: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  segment_ids: jax.typing.ArrayLike,
  *,
  num_segments: int,
  where: jax.typing.ArrayLike | None = None,
  bias: jax.typing.ArrayLike | None = None,
  temperature: float | jax.typing.ArrayLike = 1.0,
  ignore_index: int = -100,
  logit_soft_cap: float | None = None,
  w_layout: Literal["dv", "vd"] = "dv",
  vocab_size: int | None = None,
  token_chunk_size: int | None = None,
  vocab_chunk_size: int | None = None,
  precision: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  data_axis: Any = None,
  vocab_axis: Any = None,
) -> tuple[jax.Array, jax.Array]:
  r"""Per-sequence sums of the tokens' log-probabilities under ``x @ w``, without the logits.

  With the logits :math:`z = c\tanh((x^\top w + b)/c)/T` of each token (as in
  `xentjax.linear_token_stats`) and :math:`\log p_y = z_y - \log\sum_j e^{z_j}`:

  .. math::

    \mathrm{sums}_s = \sum_{t:\, \mathrm{seg}_t = s,\ t \text{ counts}} \log p_{y_t}(x_t),
    \qquad \mathrm{counts}_s = \bigl|\{t : \mathrm{seg}_t = s,\ t \text{ counts}\}\bigr|.

  A token counts unless its label is ``ignore_index`` or ``where`` is False
  there. A sequence's tokens need not be contiguous (packed rows). `jax.grad`
  of any differentiable function of ``sums`` with respect to ``x``, ``w``,
  ``bias`` and a traced ``temperature`` runs through the fused engine's
  backward pass; the memory is that of a few numbers per token. The
  per-token average that IPO, SimPO and ORPO take is
  ``sums / jnp.maximum(counts, 1)`` (TRL's convention for an empty sequence).

  Args:
    x: hidden states ``[..., D]``.
    w: ``[D, V]`` (or ``[V, D]`` with ``w_layout="vd"``).
    labels: integer tokens ``[...]`` whose log-probabilities are summed.
    segment_ids: integer ``[...]`` (the shape of ``labels``): the sequence of
      each token, in ``[0, num_segments)``. A negative id marks a token of no
      sequence (padding): it does not count.
    num_segments: the number of sequences S (a Python int, static).
    where: optional boolean token mask broadcastable to ``labels``.
    bias: optional ``[V]`` output bias.
    temperature: :math:`T > 0`, as in `xentjax.linear_token_stats`.
    ignore_index: label value of tokens that do not count.
    logit_soft_cap: :math:`c > 0`, static.
    w_layout: ``"dv"`` or ``"vd"``.
    vocab_size: number of real classes (trailing padding columns excluded).
    token_chunk_size: tokens per tile.
    vocab_chunk_size: vocabulary columns per tile.
    precision: passed to `lax.dot_general`.
    mesh: optional `jax.sharding.Mesh` (vocabulary over ``vocab_axis``,
      tokens over ``data_axis``), as in `xentjax.linear_token_stats`.
    data_axis: mesh axis (or axes) of the tokens, or None.
    vocab_axis: mesh axis (or axes) of the vocabulary, or None.

  Returns:
    ``(sums, counts)``: ``sums`` ``[S]`` float32 for 16-bit inputs (else the
    promoted dtype), ``counts`` ``[S]`` int32. A sequence with no counted
    token has sum 0 and count 0 (zero gradient). A counted token with a label
    outside ``[0, vocab_size)`` makes its sequence's sum NaN; a counted token
    with a segment id ``>= num_segments`` makes every sum NaN (never silently
    dropped).

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> x = jnp.ones((4, 3)); w = jnp.zeros((3, 8)); y = jnp.array([1, 2, 3, 4])
    >>> sums, counts = xentjax.linear_sequence_logprobs(
    ...     x, w, y, jnp.array([0, 1, 0, 1]), num_segments=2)
    >>> [round(float(s), 4) for s in sums], counts.tolist()  # 2 log(1/8) each
    ([-4.1589, -4.1589], [2, 2])

  References:
    Rafailov et al., "Direct Preference Optimization", 2023 (sequence
    log-probabilities as implicit rewards). Wijmans et al., "Cut Your Losses
    in Large-Vocabulary Language Models", 2024.
  """
  head = Head(
    w_layout, vocab_size, token_chunk_size, vocab_chunk_size, precision, mesh, data_axis, vocab_axis
  )
  seg = check_segment_ids(segment_ids, jnp.shape(labels))
  keep, mask = seg >= 0, where_mask(where)
  keep = keep if mask is None else keep & broadcast_to_first("labels", seg, "where", mask)
  call = prepare_call(
    x,
    w,
    labels,
    head,
    ignore_index=ignore_index,
    where=keep,
    bias=bias,
    logit_soft_cap=logit_soft_cap,
    temperature=temperature,
  )
  tok = call.tokens
  out = run_tokens(call, SoftmaxStats())
  counted = tok.status.counted
  logprob = counted_only(out["zy"] - out["log_s"], tok.status)
  seg = seg.reshape(-1)
  # Per-segment sums as a masked reduction over the tokens rather than a scatter
  # (`segment_sum`): a reduction over tokens sharded on a mesh is a plain all-reduce,
  # and XLA fuses the [tokens, segments] mask into it.
  member = (seg[:, None] == jnp.arange(num_segments, dtype=jnp.int32)[None, :]) & counted[:, None]
  sums = jnp.sum(jnp.where(member, logprob[:, None], 0.0), axis=0)
  counts = jnp.sum(member, axis=0, dtype=jnp.int32)
  lost = jnp.any(counted & (seg >= num_segments))
  return jnp.where(lost, jnp.nan, sums), counts
