"""`linear_token_stats`: per-token log-probability, entropy, top-k of `softmax((x @ w + b) / T)`.

The information family at vocabulary scale: what a policy-gradient trainer
(PPO/GRPO-style) needs per token -- the log-probability of the sampled token
under a temperature and the entropy of the policy, both differentiable -- plus
the log-normalizer, the argmax and the top-k, from the
`kernels.softmax_stats.SoftmaxStats` kernel without ever forming the
``[tokens, vocab]`` logits.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from xentjax import _validation as V
from xentjax._api import public
from xentjax._vocab.inputs import Head, prepare_call
from xentjax._vocab.kernels.softmax_stats import (
  SoftmaxStats,
  finite_lse,
  token_entropy,
  token_logprob,
)
from xentjax._vocab.options import TOKEN_STATS_OPTIONS, check_top_k, validators
from xentjax._vocab.reduce import counted_only, run_tokens
from xentjax._vocab.tiles import tempered, tile_temperature


class TokenStats(NamedTuple):
  """Per-token statistics returned by `xentjax.linear_token_stats` (shapes ``[...]``).

  Attributes:
    logprob: ``log p(label)``; 0 for tokens that do not count, NaN for a
      label outside ``[0, vocab_size)`` on a token that counts.
    entropy: ``H(p) = lse - sum_j p_j z_j`` in nats; 0 for tokens that do not
      count.
    lse: the log-normalizer of the tempered logits (every token).
    argmax: int32, the most likely class (ties: the lowest index).
    top_k_logprobs: ``[..., k]`` log-probabilities of the ``k`` most likely
      classes, descending, or None when ``top_k=0``.
    top_k_indices: ``[..., k]`` int32 classes of those (each class once;
      ties and ``-inf`` classes in index order), or None.
    support_logprob: with ``support=``, ``z[label] - logsumexp(z[support])``:
      the log-probability renormalized over the tokens the sampler could
      draw; 0 for tokens that do not count; else None.
  """

  logprob: jax.Array
  entropy: jax.Array
  lse: jax.Array
  argmax: jax.Array
  top_k_logprobs: jax.Array | None
  top_k_indices: jax.Array | None
  support_logprob: jax.Array | None = None


@public(static=TOKEN_STATS_OPTIONS, validators=validators())
def linear_token_stats(
  x: jax.typing.ArrayLike,
  w: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  temperature: float | jax.typing.ArrayLike = 1.0,
  top_k: int = 0,
  bias: jax.typing.ArrayLike | None = None,
  ignore_index: int = -100,
  where: jax.typing.ArrayLike | None = None,
  logit_soft_cap: float | None = None,
  support: jax.typing.ArrayLike | None = None,
  w_layout: Literal["dv", "vd"] = "dv",
  vocab_size: int | None = None,
  token_chunk_size: int | None = None,
  vocab_chunk_size: int | None = None,
  precision: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  data_axis: Any = None,
  vocab_axis: Any = None,
) -> TokenStats:
  r"""Per-token log-probability, entropy, log-normalizer, argmax and top-k of ``x @ w``.

  For each token with hidden state :math:`x` and label :math:`y`, with logits
  :math:`z_j = c \tanh((x^\top w_{:,j} + b_j)/c)\,/\,T` (no cap:
  :math:`(x^\top w_{:,j} + b_j)/T`) and :math:`p = \mathrm{softmax}(z)`:

  .. math::

    \mathrm{lse} = \log \sum_j e^{z_j}, \qquad
    \log p_y = z_y - \mathrm{lse}, \qquad
    H(p) = \mathrm{lse} - \sum_j p_j z_j,

  computed by the fused engine in tiles of
  ``[token_chunk_size, vocab_chunk_size]``: the ``[..., V]`` logits are never
  formed, neither in the forward nor in the backward pass. `jax.grad` of any
  differentiable combination of ``logprob``, ``entropy`` and ``lse`` (for
  example the policy-gradient loss ``-A * logprob - beta * entropy``) with
  respect to ``x``, ``w`` and ``bias`` is exact: the backward pass rebuilds
  each tile of :math:`\partial/\partial z_j = g_{\mathrm{lse}}\, p_j +
  g_{\log p}([j=y] - p_j) - g_H\, p_j (z_j - \sum_k p_k z_k)`.
  ``argmax`` and the top-k carry no gradient.

  Args:
    x: hidden states ``[..., D]``, any float dtype.
    w: ``[D, V]`` (or ``[V, D]`` with ``w_layout="vd"``).
    labels: integer classes ``[...]`` (e.g. the sampled tokens).
    temperature: :math:`T > 0`, divides the (capped) logits. A Python number
      (checked now), or an array: a scalar or one per token (broadcastable to
      ``labels``, for batches that mix sampling temperatures), traced (a
      sweep over values compiles once) and differentiable; a traced value
      that is not a finite number > 0 gives NaN.
    top_k: ``k >= 0``; with ``k > 0`` also return the ``k`` most likely
      classes and their log-probabilities (sorted, descending; ties: lower
      index first). Each class appears once: when ``k`` exceeds the classes
      of nonzero probability (a ``-inf`` bias masks some), the ``-inf`` ones
      follow in index order.
    bias: optional ``[V]`` output bias (one per column of ``w``).
    ignore_index: label value of tokens that do not count.
    where: optional boolean token mask broadcastable to ``labels``.
    logit_soft_cap: :math:`c > 0`: logits :math:`c \tanh(z/c)` before the
      temperature. A Python number: it is static (part of the compiled
      program).
    support: optional int ``[..., K]``: per token, the classes a truncated
      sampler (top-k, top-p, min-p) could draw from, padded with -1. Adds
      ``support_logprob`` = :math:`z_y - \log\sum_{j \in \mathrm{support}}
      e^{z_j}` (same temperature, bias and soft cap), exact and
      differentiable, from a gather of the K columns of ``w`` per token (no
      second sweep; its memory is ``[..., K, D]``). The label must be in its
      token's support and an id may appear once: a counted token whose label
      is not in its support, with a repeated id, or with an id outside
      ``[-1, vocab_size)`` gets NaN (a traced check: no error under `jit`).
      Not with ``mesh=`` (a `ValueError`): the head must be whole.
    w_layout: ``"dv"`` (``w`` is ``[D, V]``) or ``"vd"`` (``[V, D]``).
    vocab_size: number of real classes (trailing padding columns excluded).
    token_chunk_size: tokens per tile (as in `xentjax.linear_softmax_cross_entropy`).
    vocab_chunk_size: vocabulary columns per tile.
    precision: passed to `lax.dot_general`.
    mesh: optional `jax.sharding.Mesh`: the vocabulary of ``w`` (and
      ``bias``) sharded over ``vocab_axis``, the tokens over ``data_axis``;
      entropy, argmax and top-k are combined across shards without
      gathering the vocabulary.
    data_axis: mesh axis (or axes) of the tokens, or None.
    vocab_axis: mesh axis (or axes) of the vocabulary, or None.

  Returns:
    `TokenStats` ``(logprob, entropy, lse, argmax, top_k_logprobs,
    top_k_indices, support_logprob)``: float32 for 16-bit inputs (else the
    promoted dtype), shapes ``[...]`` (``[..., k]`` for the top-k).

  Note:
    A token whose every logit is ``-inf`` (a ``-inf`` bias on every class)
    has no distribution: ``lse``, ``logprob`` and ``top_k_logprobs`` are
    ``-inf`` and ``entropy`` is 0 (each term :math:`0 \log 0 = 0`), all with
    a zero gradient. Tokens that do not count get 0 for ``logprob`` and
    ``entropy``.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> x = jnp.ones((2, 4)); w = jnp.zeros((4, 8)); y = jnp.array([1, 3])
    >>> s = xentjax.linear_token_stats(x, w, y)
    >>> [round(float(v), 4) for v in (s.logprob[0], s.entropy[0])]  # log(1/8), log 8
    [-2.0794, 2.0794]

  References:
    Williams, "Simple statistical gradient-following algorithms for
    connectionist reinforcement learning", 1992 (REINFORCE). Schulman et al.,
    "Proximal Policy Optimization Algorithms", 2017. Wijmans et al., "Cut Your
    Losses in Large-Vocabulary Language Models", 2024.
  """
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
    bias=bias,
    logit_soft_cap=logit_soft_cap,
    temperature=temperature,
  )
  tok = call.tokens
  k = check_top_k(top_k, tok.vocab_size)
  kernel = SoftmaxStats(entropy=True, argmax=True, top_k=k)
  out = run_tokens(call, kernel)  # the row maximum ``m`` without gradient
  lse = out["m"] + out["log_s"]
  logprob = counted_only(token_logprob(out["zy"], out["log_s"]), tok.status)
  entropy = jnp.where(tok.status.counted, token_entropy(out["log_s"], out["ent"]), 0.0)
  shape = tok.batch_shape
  top_lp = top_i = None
  if k:
    top_lp = lax.stop_gradient(out["topv"] - finite_lse(lse)[:, None]).reshape(*shape, k)
    top_i = out["topi"].reshape(*shape, k)
  sup = None if support is None else support_logprob(call, check_support(support, tok, mesh))
  return TokenStats(
    logprob.reshape(shape),
    entropy.reshape(shape),
    lse.reshape(shape),
    out["amax"].reshape(shape),
    top_lp,
    top_i,
    None if sup is None else sup.reshape(shape),
  )


def check_support(support, tok, mesh) -> jax.Array:
  """``support`` as int32 ``[n, K]`` (ids ``>= vocab_size`` become the NaN marker ``-2``)."""
  batch_shape, vocab_size = tok.batch_shape, tok.vocab_size
  if mesh is not None:
    raise ValueError(
      "`support=` gathers K columns of the head per token, which a vocabulary-sharded head "
      "(`mesh=`) does not hold in one place; call without `mesh` (on a replicated head)."
    )
  V.check_integer("support", support, "the class ids of each token's sampling support")
  ids = jnp.asarray(support)
  if ids.ndim != len(batch_shape) + 1 or ids.shape[:-1] != tuple(batch_shape):
    raise ValueError(
      f"`support` must be [..., K] with [...] the shape of `labels` {tuple(batch_shape)}, got "
      f"{ids.shape}."
    )
  ids = ids.reshape(-1, ids.shape[-1]).astype(jnp.int32)
  return jnp.where((ids < -1) | (ids >= vocab_size), -2, ids)


def gathered_logits(call, ids):
  """``c tanh((x . w[:, id] + b[id]) / c) / T`` for each token's ``K`` ids: ``[n, K]``."""
  tok, tiling, ops = call.tokens, call.tiling, call.ops
  safe = jnp.maximum(ids, 0)
  op_dt = jnp.result_type(tok.x.dtype, tok.w.dtype)
  x = tok.x.astype(op_dt)
  # The gathered head is [n, K, D] ("vd") or [D, n, K] ("dv"); tokens are the batch axis.
  dims = (((1,), (2,)), ((0,), (0,))) if tok.vd else (((1,), (0,)), ((0,), (1,)))
  w_k = jnp.take(tok.w, safe, axis=0 if tok.vd else 1).astype(op_dt)
  z = lax.dot_general(x, w_k, dims, precision=tiling.precision, preferred_element_type=tok.cdt)
  z = z.astype(tok.cdt)
  if ops.bias is not None:
    z = z + jnp.take(ops.bias, safe).astype(tok.cdt)
  dead = z == -jnp.inf  # a -inf bias: kept out of the cap and temperature (no inf * 0)
  z = jnp.where(dead, 0.0, z)
  if tiling.soft_cap is not None:
    cap = jnp.asarray(tiling.soft_cap, tok.cdt)
    z = cap * jnp.tanh(z / cap)
  return jnp.where(dead, -jnp.inf, tempered(z, tile_temperature(tiling, ops.rows, tok.cdt)))


def support_logprob(call, ids) -> jax.Array:
  """``z[label] - logsumexp(z[ids])`` per token (``[n]``), NaN where the support is not valid."""
  status = call.tokens.status
  z = gathered_logits(call, ids)
  real = ids >= 0
  is_label = real & (ids == status.index[:, None])
  z_y = jnp.sum(jnp.where(is_label, z, 0.0), axis=1)
  lse = jax.nn.logsumexp(jnp.where(real, z, -jnp.inf), axis=1)
  sorted_ids = jnp.sort(ids, axis=1)
  repeated = jnp.any((sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0), axis=1)
  invalid = ~jnp.any(is_label, axis=1) | repeated | jnp.any(ids == -2, axis=1) | status.bad
  value = jnp.where(status.counted, z_y - lse, 0.0)
  return value * jnp.where(status.counted & invalid, jnp.nan, 1.0).astype(value.dtype)
