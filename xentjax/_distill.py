"""Fused teacher-student distillation: KL and generalized Jensen-Shannon without the logits.

Distilling a language model compares two distributions over the whole
vocabulary for every token: the student's ``softmax(x @ w / T)`` and the
teacher's ``softmax(teacher_x @ teacher_w / T)``. Built naively that is two
``[tokens, vocab]`` logit arrays plus their softmaxes and gradients (more
than 32 GiB of float32 at 8192 tokens and V = 262,144). This module computes
the divergence per token from a handful of per-token statistics accumulated
over tiles of both heads, with the tile machinery of the fused cross-entropy
(`xentjax._fused`: `_logit_tile` inside `_fold` loops, online log-sum-exp,
`shard_map` for vocabulary parallelism), under a `jax.custom_vjp` whose
backward pass recomputes (or, with ``strategy="store"``, reuses) the tiles.

With ``a = z_s / T`` and ``b = z_t / T`` (one tile of each), per token:

* forward KL(p_t || p_s) = E_{p_t}[b - a] - lse(b) + lse(a): one online pass
  keeps the running maxima and sums of both heads and the running
  ``sum_j exp(b_j - m_b) (b_j - a_j)``, rescaled when ``m_b`` grows; its
  gradient with respect to ``a`` is ``p_s - p_t``;
* reverse KL(p_s || p_t): the same with the roles swapped; gradient
  ``p_s * (log p_s - log p_t - KL)``;
* generalized JSD, ``0 < beta < 1``: ``log m = logaddexp(log beta + log p_t,
  log(1 - beta) + log p_s)`` needs both normalizers, so a statistics pass
  comes first and a second pass sums ``p_t (log p_t - log m)`` and
  ``p_s (log p_s - log m)``; gradient
  ``(1 - beta) p_s * (log p_s - log m - KL(p_s || m))``;
* top-k (a teacher saved as indices and log-probabilities): the student's
  statistics and its logits at the teacher's indices, gathered inside each
  tile; gradient ``p_s - scatter(p_hat_t)``.

The divergence is multiplied by ``T^2``; with ``hard_weight = alpha`` the
per-token loss is ``(1 - alpha) T^2 D + alpha CE(z_s, y)``, the
cross-entropy of the untempered student logits from its own online
statistics (`xentjax._core.cross_entropy_from_stats`). The gradient of the
raw student logits is ``(1 - alpha) T dD/da + alpha (softmax(z_s) - onehot)``.
The teacher is a constant: it is wrapped in `lax.stop_gradient`, its tiles
are recomputed in the backward pass only to rebuild ``p_t``, and no
cotangent of it is ever formed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Unpack

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from xentjax import _validation as V
from xentjax._core import cross_entropy_from_stats, label_status, mean_or_nan
from xentjax._fused import (
  HeadOptions,
  Strategy,
  WLayout,
  _check_head,
  _check_strategy,
  _head,
  _Tokens,
  by_name,
  takes_head_options,
)
from xentjax._tiles import (
  _combine_lse,
  _Config,
  _dot_dw,
  _dot_dx,
  _fold,
  _logit_tile,
  _sharded,
  _vocab_offset,
  _w_chunk,
  place,
)

# The store strategy holds two whole-row logit tiles (student and teacher)
# and their softmaxes at once, so its automatic token chunk is half the fused
# cross-entropy's (32 MiB per float32 tile).
_STORE_TILE = 1 << 23


@dataclasses.dataclass(frozen=True)
class _Distill:
  """Static description of one distillation call (a hashable nondiff arg)."""

  student: _Config
  teacher: _Config | None  # None: a top-k teacher (indices and log-probabilities)
  beta: float
  temperature: float
  hard_weight: float

  @property
  def topk(self) -> bool:
    return self.teacher is None

  @property
  def jsd(self) -> bool:
    return not self.topk and 0.0 < self.beta < 1.0

  @property
  def ce(self) -> bool:  # the hard-label term is present
    return self.hard_weight > 0.0

  @property
  def own_z_stats(self) -> bool:  # the untempered lse differs from the tempered one
    return self.ce and self.temperature != 1.0

  @property
  def padded(self) -> bool:
    return self.student.num_classes < self.student.num_columns


# ----------------------------------------------------------------------------
# Per-token statistics of one tile (the same code for every strategy).


def _online(m, s, logits, u=None, val=None):
  """Online log-sum-exp step; `u` is a running `sum exp(logits - m) * val`."""
  m_new = jnp.maximum(m, jnp.max(logits, axis=1))
  m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
  scale = jnp.exp(m - m_safe)
  e = jnp.exp(logits - m_safe[:, None])
  s = s * scale + jnp.sum(e, axis=1)
  if val is not None:
    u = u * scale + jnp.sum(e * val, axis=1)
  return m_new, s, u


def _tempered(z, d: _Distill):
  return z if d.temperature == 1.0 else z * (1.0 / d.temperature)


def _real(x, col, d: _Distill, fill=0.0):
  """`x` with padding columns (past `vocab_size`) set to `fill`."""
  return jnp.where(col < d.student.num_classes, x, fill) if d.padded else x


def _tile_local_index(idx, col, size):
  """Teacher indices relative to this tile; `size` (out of bounds) outside it."""
  local = idx - col[:, :1]
  return jnp.where((local >= 0) & (local < size), local, size)


def _init_stats(n, cdt, d: _Distill):
  neg = jnp.full((n,), -jnp.inf, cdt)
  zero = jnp.zeros((n,), cdt)
  st = {"ma": neg, "sa": zero}
  if d.topk:
    st["cross"] = zero
  else:
    st["mb"], st["sb"] = neg, zero
    if not d.jsd:
      st["u"] = zero
  if d.own_z_stats:
    st["mz"], st["sz"] = neg, zero
  if d.ce:
    st["zy"] = zero
  return st


def _update_stats(st, zs, zt, col, rows, d: _Distill):
  """Statistics after one `[tokens, columns]` tile of raw logits `zs`, `zt`."""
  st = dict(st)
  a = _tempered(zs, d)
  if d.topk:
    st["ma"], st["sa"], _ = _online(st["ma"], st["sa"], a)
    local = _tile_local_index(rows["idx"], col, a.shape[1])
    hit = local < a.shape[1]
    got = jnp.take_along_axis(a, jnp.where(hit, local, 0), axis=1)
    st["cross"] = st["cross"] + jnp.sum(jnp.where(hit, rows["q"] * got, 0.0), axis=1)
  else:
    b = _tempered(zt, d)
    if d.jsd:
      st["ma"], st["sa"], _ = _online(st["ma"], st["sa"], a)
      st["mb"], st["sb"], _ = _online(st["mb"], st["sb"], b)
    elif d.beta == 0.0:  # forward KL: weights p_t, values b - a
      st["ma"], st["sa"], _ = _online(st["ma"], st["sa"], a)
      st["mb"], st["sb"], st["u"] = _online(st["mb"], st["sb"], b, st["u"], _real(b - a, col, d))
    else:  # reverse KL: weights p_s, values a - b
      st["ma"], st["sa"], st["u"] = _online(st["ma"], st["sa"], a, st["u"], _real(a - b, col, d))
      st["mb"], st["sb"], _ = _online(st["mb"], st["sb"], b)
  if d.own_z_stats:
    st["mz"], st["sz"], _ = _online(st["mz"], st["sz"], zs)
  if d.ce:
    st["zy"] = st["zy"] + jnp.sum(jnp.where(col == rows["y"][:, None], zs, 0.0), axis=1)
  return st


def _combine_weighted(m, s, u, axis):
  """`(m, s, u)` of the whole vocabulary from the shards' `(m_k, s_k, u_k)`."""
  m_all = lax.pmax(m, axis)
  m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
  scale = jnp.exp(m - m_safe)
  s, u = lax.psum((s * scale, u * scale), axis)
  return m_all, s, u


def _finish_stats(st, d: _Distill):
  """Per-token normalizers and divergence (FKL, RKL, top-k) of the whole vocabulary.

  Returns `(fin, div)`: `fin` holds `lse_a`, `lse_b` and, with the hard-label
  term, the shifted statistics `log_sz`, `zy_shift` and `lse_z` of the
  untempered logits; `div` is None for the generalized JSD (a second pass).
  """
  axis = d.student.vocab_axis
  cfg = d.student
  fin = {}
  div = None
  if not d.topk and not d.jsd:
    # The weighted head: its sum `u` is combined with the same rescaling.
    wk = ("mb", "sb") if d.beta == 0.0 else ("ma", "sa")
    m, s, u = st[wk[0]], st[wk[1]], st["u"]
    if axis is not None:
      m, s, u = _combine_weighted(m, s, u, axis)
    lse_w = jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(s)
    other = ("ma", "sa") if d.beta == 0.0 else ("mb", "sb")
    lse_o = _combine_lse(st[other[0]], st[other[1]], cfg)
    # E_w[w - o] - lse_w + lse_o, the expectation under the weighted head.
    div = u / s - lse_w + lse_o
    fin["lse_b"], fin["lse_a"] = (lse_w, lse_o) if d.beta == 0.0 else (lse_o, lse_w)
  else:
    fin["lse_a"] = _combine_lse(st["ma"], st["sa"], cfg)
    if not d.topk:
      fin["lse_b"] = _combine_lse(st["mb"], st["sb"], cfg)
  if d.topk:
    cross = st["cross"] if axis is None else lax.psum(st["cross"], axis)
    div = cross  # sum_k q_k a_{idx_k}; `_per_token_loss` finishes the KL (needs q log q)
  if d.ce:
    zy = st["zy"] if axis is None else lax.psum(st["zy"], axis)
    if d.own_z_stats:
      mz, sz = st["mz"], st["sz"]
    else:
      mz, sz = st["ma"], st["sa"]
    if axis is not None:
      mz_all = lax.pmax(mz, axis)
      mz_safe = jnp.where(jnp.isfinite(mz_all), mz_all, 0.0)
      sz = lax.psum(sz * jnp.exp(mz - mz_safe), axis)
    else:
      mz_safe = jnp.where(jnp.isfinite(mz), mz, 0.0)
    # Shifted statistics for `cross_entropy_from_stats`: log s and z_y - m.
    fin["log_sz"], fin["zy_shift"] = jnp.log(sz), zy - mz_safe
    fin["lse_z"] = mz_safe + fin["log_sz"]
  return fin, div


def _jsd_terms(zs, zt, col, lse_a, lse_b, d: _Distill):
  """`log p_s`, `log p_t`, `log m` of one tile (generalized JSD)."""
  la = _tempered(zs, d) - lse_a[:, None]
  lb = _tempered(zt, d) - lse_b[:, None]
  lm = jnp.logaddexp(math.log(d.beta) + lb, math.log1p(-d.beta) + la)
  return la, lb, lm


def _update_jsd(acc, zs, zt, col, rows, d: _Distill):
  """Second pass of the JSD: running `sum p_t (log p_t - log m)` and the same for p_s."""
  la, lb, lm = _jsd_terms(zs, zt, col, rows["lse_a"], rows["lse_b"], d)
  kt = jnp.sum(_real(jnp.exp(lb) * (lb - lm), col, d), axis=1)
  ks = jnp.sum(_real(jnp.exp(la) * (la - lm), col, d), axis=1)
  return {"kt": acc["kt"] + kt, "ks": acc["ks"] + ks}


def _finish_jsd(acc, d: _Distill):
  kt, ks = acc["kt"], acc["ks"]
  if d.student.vocab_axis is not None:
    kt, ks = lax.psum((kt, ks), d.student.vocab_axis)
  return d.beta * kt + (1.0 - d.beta) * ks, ks


def _per_token_loss(fin, div, per_tok, d: _Distill):
  """`(1 - alpha) T^2 D + alpha CE` per token (before masking)."""
  if d.topk:  # KL(p_hat || p_s) = sum q log q - sum q a_idx + lse_a
    div = per_tok["qlogq"] - div + fin["lse_a"]
  loss = ((1.0 - d.hard_weight) * d.temperature**2) * div
  if d.ce:
    ce = cross_entropy_from_stats(fin["log_sz"], fin["zy_shift"])
    loss = loss + d.hard_weight * ce
  return loss


def _dlogits(zs, zt, col, rows, c_div, c_ce, d: _Distill):
  """Cotangent of the raw student logits of one tile.

  ``c_div = g (1 - alpha) T`` (the ``T^2`` of the loss times the ``1/T`` of
  ``a = z/T``) multiplies the divergence's gradient with respect to ``a``;
  ``c_ce = g alpha`` the cross-entropy's ``softmax(z) - onehot(y)``.
  """
  a = _tempered(zs, d)
  la = a - rows["lse_a"][:, None]
  ps = jnp.exp(la)
  if d.topk:
    local = _tile_local_index(rows["idx"], col, a.shape[1])
    r = lax.broadcasted_iota(jnp.int32, local.shape, 0)
    dd = ps.at[r, local].add(-rows["q"], mode="drop")
  elif d.jsd:
    la, lb, lm = _jsd_terms(zs, zt, col, rows["lse_a"], rows["lse_b"], d)
    dd = (1.0 - d.beta) * ps * (la - lm - rows["aux"][:, None])
  else:
    lb = _tempered(zt, d) - rows["lse_b"][:, None]
    if d.beta == 0.0:
      dd = ps - jnp.exp(lb)
    else:
      dd = ps * (la - lb - rows["aux"][:, None])
  dz = c_div[:, None] * dd
  if d.ce:
    pz = jnp.exp(zs - rows["lse_z"][:, None]) if d.own_z_stats else ps
    dz = dz + c_ce[:, None] * pz - jnp.where(col == rows["y"][:, None], c_ce[:, None], 0.0)
  return _real(dz, col, d)


# ----------------------------------------------------------------------------
# Loops.


def _tiles(x, w, teacher, d: _Distill, cdt):
  """`(n, n_cols, tile)`: `tile(v0, t0, tsize, w_c, tw_c)` returns `(zs, zt, col)`,
  the raw logits of one tile of both heads (`zt` None for a top-k teacher)."""
  s, t = d.student, d.teacher
  n = x.shape[0]
  n_cols = w.shape[0 if s.vd else 1]
  offset = _vocab_offset(s, n_cols)

  def tile(v0, t0, tsize, w_c, tw_c):
    x_t = lax.dynamic_slice_in_dim(x, t0, tsize, 0)
    zs, col = _logit_tile(x_t, w_c, offset + v0, s, cdt)
    zt = None
    if not d.topk:
      tx_t = lax.dynamic_slice_in_dim(teacher[0], t0, tsize, 0)
      zt, _ = _logit_tile(tx_t, tw_c, offset + v0, t, cdt)
    return zs, zt, col

  return n, n_cols, tile


def _teacher_chunk(teacher, v0, vsize, d: _Distill):
  return None if d.topk else _w_chunk(teacher[1], v0, vsize, d.teacher)


def _rows(tree, t0, tsize):
  return jax.tree.map(lambda v: lax.dynamic_slice_in_dim(v, t0, tsize, 0), tree)


def _put_rows(tree, new, t0):
  return jax.tree.map(lambda v, r: lax.dynamic_update_slice_in_dim(v, r, t0, 0), tree, new)


def _sweep(x, w, teacher, per_tok, carry, update, d: _Distill, cdt):
  """`carry` (per-token arrays) updated tile by tile over the whole local vocabulary."""
  n, n_cols, tile = _tiles(x, w, teacher, d, cdt)

  def vocab_body(carry, v0, vsize):
    w_c = _w_chunk(w, v0, vsize, d.student)
    tw_c = _teacher_chunk(teacher, v0, vsize, d)

    def token_body(carry, t0, tsize):
      zs, zt, col = tile(v0, t0, tsize, w_c, tw_c)
      new = update(_rows(carry, t0, tsize), zs, zt, col, _rows(per_tok, t0, tsize), d)
      return _put_rows(carry, new, t0)

    return _fold(n, d.student.token_chunk, token_body, carry)

  return _fold(n_cols, d.student.vocab_chunk, vocab_body, carry)


def _forward_local(x, w, teacher, per_tok, d: _Distill):
  """Per-token `(loss, residuals)` for this device's tokens and vocabulary shard."""
  cdt = V.compute_dtype(x.dtype, w.dtype, *(a.dtype for a in teacher))
  st = _sweep(x, w, teacher, per_tok, _init_stats(x.shape[0], cdt, d), _update_stats, d, cdt)
  fin, div = _finish_stats(st, d)
  res = {"lse_a": fin["lse_a"]}
  if not d.topk:
    res["lse_b"] = fin["lse_b"]
  if d.own_z_stats:
    res["lse_z"] = fin["lse_z"]
  if d.jsd:
    zero = jnp.zeros((x.shape[0],), cdt)
    acc = _sweep(x, w, teacher, dict(per_tok, **res), {"kt": zero, "ks": zero}, _update_jsd, d, cdt)
    div, res["aux"] = _finish_jsd(acc, d)
  elif not d.topk and d.beta == 1.0:
    res["aux"] = div
  return _per_token_loss(fin, div, per_tok, d), res


def _coefficients(g, d: _Distill):
  return g * ((1.0 - d.hard_weight) * d.temperature), g * d.hard_weight


def _backward_local(x, w, teacher, per_tok, res, g, d: _Distill):
  """`(dx, dw)` for the per-token cotangent `g` (already masked).

  Vocabulary chunks outside, token chunks inside, as in the fused
  cross-entropy: each chunk's weight gradient is complete when the inner loop
  ends; `x` is transposed once for the weight-gradient matmuls ("dv").
  """
  s = d.student
  cdt = V.compute_dtype(x.dtype, w.dtype, *(a.dtype for a in teacher))
  op_dt = jnp.result_type(x.dtype, w.dtype)
  n, n_cols, tile = _tiles(x, w, teacher, d, cdt)
  c_div, c_ce = _coefficients(g.astype(cdt), d)
  rows_all = dict(per_tok, **res, c_div=c_div, c_ce=c_ce)
  xT = None if s.vd else x.astype(op_dt).T

  def vocab_body(carry, v0, vsize):
    dx, dw = carry
    w_c = _w_chunk(w, v0, vsize, s)
    tw_c = _teacher_chunk(teacher, v0, vsize, d)

    def token_body(carry, t0, tsize):
      dx, dw_c = carry
      zs, zt, col = tile(v0, t0, tsize, w_c, tw_c)
      rows = _rows(rows_all, t0, tsize)
      dz = _dlogits(zs, zt, col, rows, rows["c_div"], rows["c_ce"], d)
      x_t = lax.dynamic_slice_in_dim(x, t0, tsize, 0)
      dx_t = lax.dynamic_slice_in_dim(dx, t0, tsize, 0) + _dot_dx(dz, w_c, op_dt, s, cdt)
      dx = lax.dynamic_update_slice_in_dim(dx, dx_t, t0, 0)
      xT_t = None if xT is None else lax.dynamic_slice_in_dim(xT, t0, tsize, 1)
      return dx, dw_c + _dot_dw(x_t, dz, op_dt, s, cdt, xT_t)

    dw_shape = (vsize, x.shape[1]) if s.vd else (x.shape[1], vsize)
    dx, dw_c = _fold(n, s.token_chunk, token_body, (dx, jnp.zeros(dw_shape, cdt)))
    if s.data_axis is not None:
      dw_c = lax.psum(dw_c, s.data_axis)
    dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(w.dtype), v0, 0 if s.vd else 1)
    return dx, dw

  dx, dw = _fold(
    n_cols, s.vocab_chunk, vocab_body, (jnp.zeros(x.shape, cdt), jnp.zeros(w.shape, w.dtype))
  )
  if s.vocab_axis is not None:
    dx = lax.psum(dx, s.vocab_axis)
  return dx.astype(x.dtype), dw


def _store_local(x, w, teacher, per_tok, weights, d: _Distill):
  """`(weighted loss sum, dx, dw)` in one pass over token chunks of whole rows."""
  s = d.student
  cdt = V.compute_dtype(x.dtype, w.dtype, *(a.dtype for a in teacher))
  op_dt = jnp.result_type(x.dtype, w.dtype)
  n, _n_cols, tile = _tiles(x, w, teacher, d, cdt)
  xT = None if s.vd else x.astype(op_dt).T
  tw = None if d.topk else teacher[1]

  def token_body(carry, t0, tsize):
    total, dx, dw = carry
    zs, zt, col = tile(0, t0, tsize, w, tw)
    rows = _rows(dict(per_tok, r=weights), t0, tsize)
    st = _update_stats(_init_stats(tsize, cdt, d), zs, zt, col, rows, d)
    fin, div = _finish_stats(st, d)
    rows.update(fin)
    if d.jsd:
      zero = jnp.zeros((tsize,), cdt)
      acc = _update_jsd({"kt": zero, "ks": zero}, zs, zt, col, rows, d)
      div, rows["aux"] = _finish_jsd(acc, d)
    elif not d.topk and d.beta == 1.0:
      rows["aux"] = div
    loss = _per_token_loss(fin, div, rows, d)
    r = rows["r"]
    total = total + jnp.sum(jnp.where(r != 0.0, r * loss, 0.0))
    c_div, c_ce = _coefficients(r, d)
    dz = _dlogits(zs, zt, col, rows, c_div, c_ce, d)
    dx = lax.dynamic_update_slice_in_dim(dx, _dot_dx(dz, w, op_dt, s, cdt), t0, 0)
    x_t = lax.dynamic_slice_in_dim(x, t0, tsize, 0)
    xT_t = None if xT is None else lax.dynamic_slice_in_dim(xT, t0, tsize, 1)
    return total, dx, dw + _dot_dw(x_t, dz, op_dt, s, cdt, xT_t)

  init = (jnp.zeros((), cdt), jnp.zeros(x.shape, cdt), jnp.zeros(w.shape, cdt))
  total, dx, dw = _fold(n, s.token_chunk, token_body, init)
  if s.vocab_axis is not None:
    dx = lax.psum(dx, s.vocab_axis)
  if s.data_axis is not None:
    total = lax.psum(total, s.data_axis)
    dw = lax.psum(dw, s.data_axis)
  return total, dx, dw


# ----------------------------------------------------------------------------
# custom_vjp wrappers: the same kernels on one device or inside `shard_map`.


def _specs(d: _Distill, teacher):
  s = d.student
  tok = P(s.data_axis)
  rows2 = P(s.data_axis, None)
  ws = P(s.vocab_axis, None) if s.vd else P(None, s.vocab_axis)
  if d.topk:
    ts = tuple(rows2 if a.ndim == 2 else tok for a in teacher)
  else:
    tws = P(s.vocab_axis, None) if d.teacher.vd else P(None, s.vocab_axis)
    ts = (rows2, tws)
  return rows2, ws, ts, tok


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _recompute(x, w, teacher, per_tok, counted, bad, d: _Distill):
  return _recompute_fwd(x, w, teacher, per_tok, counted, bad, d)[0]


def _mask_loss(loss, counted, bad):
  return jnp.where(bad, jnp.nan, jnp.where(counted, loss, 0.0))


def _recompute_fwd(x, w, teacher, per_tok, counted, bad, d: _Distill):
  xs, ws, ts, tok = _specs(d, teacher)
  fwd = _sharded(functools.partial(_forward_local, d=d), d.student, (xs, ws, ts, tok), (tok, tok))
  loss, res = fwd(x, w, teacher, per_tok)
  return _mask_loss(loss, counted, bad), (x, w, teacher, per_tok, counted, bad, res)


def _recompute_bwd(d: _Distill, saved, g):
  x, w, teacher, per_tok, counted, bad, res = saved
  g = jnp.where(bad, jnp.nan, jnp.where(counted, g, 0.0))
  xs, ws, ts, tok = _specs(d, teacher)
  bwd = _sharded(
    functools.partial(_backward_local, d=d), d.student, (xs, ws, ts, tok, tok, tok), (xs, ws)
  )
  dx, dw = bwd(x, w, teacher, per_tok, res, g)
  nones = lambda tree: jax.tree.map(lambda _: None, tree)
  return dx, dw, nones(teacher), nones(per_tok), None, None


_recompute.defvjp(_recompute_fwd, _recompute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _store(x, w, teacher, per_tok, weights, d: _Distill, dtypes):
  return _store_fwd(x, w, teacher, per_tok, weights, d, dtypes)[0]


def _store_fwd(x, w, teacher, per_tok, weights, d: _Distill, dtypes):
  del dtypes
  xs, ws, ts, tok = _specs(d, teacher)
  fwd = _sharded(
    functools.partial(_store_local, d=d), d.student, (xs, ws, ts, tok, tok), (P(), xs, ws)
  )
  total, dx, dw = fwd(x, w, teacher, per_tok, weights)
  return total, (dx, dw, teacher, per_tok)


def _store_bwd(d: _Distill, dtypes, saved, g):
  del d
  dx, dw, teacher, per_tok = saved
  x_dtype, w_dtype = dtypes
  g = g.astype(dx.dtype)
  nones = lambda tree: jax.tree.map(lambda _: None, tree)
  return (g * dx).astype(x_dtype), (g * dw).astype(w_dtype), nones(teacher), nones(per_tok), None


_store.defvjp(_store_fwd, _store_bwd)


# ----------------------------------------------------------------------------
# Argument checks and the shared entry point.


def _unit_interval(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
    raise TypeError(f"`{name}` must be a Python number in [0, 1], got {value!r}.")
  value = float(value)
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"`{name}` must be in [0, 1], got {value!r}.")
  return value


def _check_temperature(temperature):
  if isinstance(temperature, bool) or not isinstance(
    temperature, (int, float, np.floating, np.integer)
  ):
    raise TypeError(f"`temperature` must be a Python number > 0, got {temperature!r}.")
  t = float(temperature)
  if not (t > 0.0 and math.isfinite(t)):
    raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}.")
  return t


def _student(
  x, w, labels, *, hard_weight, temperature, reduction, strategy, vocab_chunk_size, **head
) -> tuple[_Tokens, _Distill]:
  """`(tok, d)`: the student's tokens, and the call's `_Distill` with a top-k teacher.

  The checks both losses share; `head` are the keywords of `xentjax._fused._head`
  (the tokens, tile sizes, precision and placement). `linear_distillation_loss`
  puts its teacher's head and `beta` into `d`.
  """
  alpha = _unit_interval("hard_weight", hard_weight)
  t = _check_temperature(temperature)
  if labels is None and alpha > 0.0:
    raise ValueError(
      f"`hard_weight`={hard_weight!r} mixes in the cross-entropy with `labels`, but "
      "labels=None: pass integer labels [...] or hard_weight=0."
    )
  _check_strategy(reduction, strategy, vocab_chunk_size)
  tok, cfg, _ = _head(
    x,
    w,
    labels,
    strategy=strategy,
    vocab_chunk_size=vocab_chunk_size,
    store_tile=_STORE_TILE,
    student=True,
    **head,
  )
  return tok, _Distill(student=cfg, teacher=None, beta=0.0, temperature=t, hard_weight=alpha)


def _run(tok: _Tokens, teacher, per_tok, d: _Distill, strategy, reduction):
  """Places the arrays, runs the kernel and reduces."""
  dtypes = (tok.x.dtype, tok.w.dtype, *(a.dtype for a in teacher))
  cdt = V.compute_dtype(*dtypes)
  x2, w, counted, bad = tok.x, tok.w, tok.status.counted, tok.status.bad
  mesh, data_axis = d.student.mesh, d.student.data_axis
  if mesh is not None:
    xs, ws, ts, tok_spec = _specs(d, teacher)
    x2, w = place(x2, mesh, xs), place(w, mesh, ws)
    teacher = tuple(place(a, mesh, s) for a, s in zip(teacher, ts))
    per_tok = {
      k: place(v, mesh, P(data_axis, *([None] * (v.ndim - 1)))) for k, v in per_tok.items()
    }
    counted, bad = place(counted, mesh, tok_spec), place(bad, mesh, tok_spec)
  count = jnp.sum(counted).astype(cdt)
  if strategy == "store":
    weights = jnp.where(counted, 1.0, 0.0).astype(cdt)
    if reduction == "mean":
      weights = weights / jnp.maximum(count, 1.0)
    weights = jnp.where(bad, jnp.nan, weights)
    if mesh is not None:
      weights = place(weights, mesh, P(data_axis))
    total = _store(x2, w, teacher, per_tok, weights, d, dtypes[:2])
    return jnp.where(count == 0, jnp.nan, total) if reduction == "mean" else total
  per_token = _recompute(x2, w, teacher, per_tok, counted, bad, d)
  if reduction == "none":
    return per_token.reshape(tok.batch_shape)
  if reduction == "sum":
    return jnp.sum(per_token)
  return mean_or_nan(jnp.sum(per_token), count)


@takes_head_options(data_axis="data", vocab_axis="vocab")
def linear_distillation_loss(
  x: jax.typing.ArrayLike,
  w: jax.typing.ArrayLike,
  teacher_x: jax.typing.ArrayLike,
  teacher_w: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike | None = None,
  *,
  beta: float = 0.0,
  temperature: float = 1.0,
  hard_weight: float = 0.0,
  ignore_index: int = -100,
  where: jax.typing.ArrayLike | None = None,
  reduction: str = "mean",
  strategy: Strategy = "recompute",
  teacher_w_layout: WLayout = "dv",
  **head: Unpack[HeadOptions],
) -> jax.Array:
  r"""Teacher-student divergence of the logits ``x @ w`` and ``teacher_x @ teacher_w``, fused.

  Neither logit array is ever materialized. For each token, with student
  logits :math:`z_s = x^\top w`, teacher logits :math:`z_t = x_t^\top w_t`,
  :math:`p_s = \mathrm{softmax}(z_s/T)` and :math:`p_t = \mathrm{softmax}(z_t/T)`:

  .. math::

    D_\beta = \begin{cases}
      \mathrm{KL}(p_t \,\|\, p_s) = \sum_j p_{t,j} (\log p_{t,j} - \log p_{s,j}) & \beta = 0\\
      \beta\,\mathrm{KL}(p_t \,\|\, m) + (1-\beta)\,\mathrm{KL}(p_s \,\|\, m),
        \quad m = \beta p_t + (1-\beta) p_s & 0 < \beta < 1\\
      \mathrm{KL}(p_s \,\|\, p_t) & \beta = 1
    \end{cases}

    \ell = (1-\alpha)\, T^2 D_\beta + \alpha\, \mathrm{CE}(z_s, y),
    \qquad \mathrm{CE}(z_s, y) = \mathrm{lse}(z_s) - z_{s,y}

  (the generalized Jensen-Shannon divergence of Agarwal et al.; the factor
  :math:`T^2` of Hinton et al. keeps gradient scales independent of
  :math:`T`; the cross-entropy uses the untempered student logits). Equal, to
  float32 rounding, values and gradients, to

  .. code-block:: python

    a = jax.nn.log_softmax(x @ w / T)
    b = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_x @ teacher_w) / T)
    kl = (jnp.exp(b) * (b - a)).sum(-1)   # beta = 0

  followed by the mixing, masking and reduction. Gradients flow to ``x`` and
  ``w`` only: the teacher is a constant (`lax.stop_gradient`), and its tiles
  are recomputed only to rebuild :math:`p_t`; no teacher cotangent is formed.

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
      in between the generalized JSD.
    temperature: :math:`T > 0` (default 1).
    hard_weight: :math:`\alpha \in [0, 1]`, the weight of the hard-label
      cross-entropy (default 0).
    ignore_index: label of tokens that do not count (applied through
      ``labels`` when given).
    where: optional boolean token mask broadcastable to ``x.shape[:-1]``.
    reduction: ``"mean"`` over the tokens that count (NaN, with a zero
      gradient, when none counts), ``"sum"``, or ``"none"`` (per token
      ``[...]``, 0 where a token does not count).
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
    float32), else the promoted dtype. Gradients of ``x`` and ``w`` come back
    in their dtypes.

  Note:
    * All options other than the arrays are static (Python numbers).
    * The forward and reverse KL need one pass over the tiles of both heads in
      the forward pass; the generalized JSD needs two (``log m`` needs both
      normalizers first). ``"recompute"`` then recomputes the tiles once more
      in the backward pass.
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
  # Every argument, by name, to the implementation (`head`: the `HeadOptions`).
  return _linear_distillation_loss(**by_name(locals()))


def _linear_distillation_loss(
  x, w, teacher_x, teacher_w, labels, *, beta, teacher_w_layout, reduction, strategy, **student
):
  """`linear_distillation_loss`, its arguments by name (`student`: the keywords of `_student`)."""
  tok, d = _student(x, w, labels, reduction=reduction, strategy=strategy, **student)
  b = _unit_interval("beta", beta)
  teacher, tvd = _full_teacher(tok, teacher_x, teacher_w, teacher_w_layout)
  d = dataclasses.replace(d, teacher=dataclasses.replace(d.student, vd=tvd), beta=b)
  per_tok = {"y": tok.status.index} if d.ce else {}
  return _run(tok, teacher, per_tok, d, strategy, reduction)


def _full_teacher(tok: _Tokens, teacher_x, teacher_w, teacher_w_layout):
  """`((teacher_x [n, D_t], teacher_w), vd)`: the teacher as constants, checked against `tok`."""
  tx, tw, tvd, t_cols = _check_head(
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
  teacher = (lax.stop_gradient(tx.reshape(tok.x.shape[0], tx.shape[-1])), lax.stop_gradient(tw))
  return teacher, tvd


# ----------------------------------------------------------------------------
# Top-k teachers.


def _topk_teacher(idx, logprobs, temperature, vocab_size, cdt):
  """`q = softmax(logprobs / T)` over the k entries, `sum q log q`, and which rows are bad.

  A row is bad when an index is outside ``[0, vocab_size)``, a log-probability
  is positive or NaN, or every log-probability is ``-inf`` (no distribution).
  Bad rows get a harmless uniform ``q`` (their loss is NaN anyway).
  """
  status = label_status(idx, vocab_size)
  lp = logprobs.astype(cdt)
  bad_entry = status.bad | (lp > 0.0) | jnp.isnan(lp)
  bad = jnp.any(bad_entry, axis=-1) | jnp.all(lp == -jnp.inf, axis=-1)
  scaled = jnp.where(bad[..., None], 0.0, lp / temperature)
  logq = jax.nn.log_softmax(scaled, axis=-1)
  q = jnp.exp(logq)
  qlogq = jnp.sum(jnp.where(q > 0.0, q * logq, 0.0), axis=-1)
  return status.index, q, qlogq, bad


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
  Checks: ``teacher_indices`` integer, in ``[0, vocab_size)``;
  ``teacher_logprobs`` float, of the same shape, no NaN, no positive value,
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


@takes_head_options(data_axis="data", vocab_axis="vocab")
def linear_topk_distillation_loss(
  x: jax.typing.ArrayLike,
  w: jax.typing.ArrayLike,
  teacher_indices: jax.typing.ArrayLike,
  teacher_logprobs: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike | None = None,
  *,
  temperature: float = 1.0,
  hard_weight: float = 0.0,
  ignore_index: int = -100,
  where: jax.typing.ArrayLike | None = None,
  reduction: str = "mean",
  strategy: Strategy = "recompute",
  **head: Unpack[HeadOptions],
) -> jax.Array:
  r"""Offline distillation from a saved top-k teacher, without the student's logits.

  The teacher was run ahead of time and kept, per token, its ``k`` most likely
  tokens ``teacher_indices`` and their log-probabilities ``teacher_logprobs``.
  With :math:`\hat p_t` the teacher renormalized over those ``k`` tokens and
  :math:`p_s = \mathrm{softmax}(z_s / T)` the student's full-vocabulary
  distribution (:math:`z_s = x^\top w`):

  .. math::

    \hat p_{t,i} = \frac{e^{\ell_i / T}}{\sum_{i'=1}^{k} e^{\ell_{i'} / T}}, \qquad
    D = \sum_{i=1}^{k} \hat p_{t,i} \big(\log \hat p_{t,i} - \log p_{s, j_i}\big),
    \qquad \ell = (1-\alpha)\, T^2 D + \alpha\, \mathrm{CE}(z_s, y),

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
    ignore_index, where, reduction, strategy: likewise.
    w_layout, vocab_size, token_chunk_size, vocab_chunk_size: likewise.
    precision, mesh, data_axis, vocab_axis: likewise.

  Returns:
    As `xentjax.linear_distillation_loss`.

  Note:
    Inside `jit` values cannot raise: a token that counts and whose saved
    indices fall outside ``[0, vocab_size)``, or whose log-probabilities are
    positive, NaN or all ``-inf``, gets a NaN loss (and NaN gradients).
    `xentjax.check_topk_teacher` checks the saved arrays eagerly.

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
  # Every argument, by name, to the implementation (`head`: the `HeadOptions`).
  return _linear_topk_distillation_loss(**by_name(locals()))


def _linear_topk_distillation_loss(
  x, w, teacher_indices, teacher_logprobs, labels, *, reduction, strategy, **student
):
  """`linear_topk_distillation_loss`, its arguments by name (`student`: see `_student`)."""
  tok, d = _student(x, w, labels, reduction=reduction, strategy=strategy, **student)
  idx, lp = _check_topk_shapes(tok, teacher_indices, teacher_logprobs)
  idx, q, qlogq, bad_t = _topk_teacher(
    idx, lax.stop_gradient(lp), d.temperature, tok.vocab_size, tok.cdt
  )
  st = tok.status  # a token that counts with a bad teacher entry is a bad token
  tok = tok._replace(status=st._replace(bad=st.bad | (st.counted & bad_t)))
  per_tok = {"idx": idx, "q": q, "qlogq": qlogq}
  if d.ce:
    per_tok["y"] = tok.status.index
  return _run(tok, (), per_tok, d, strategy, reduction)


def _check_topk_shapes(tok: _Tokens, teacher_indices, teacher_logprobs):
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
