"""Fused linear cross-entropy: `x @ w` and the softmax loss without the logits.

For a vocabulary of V words and N tokens the logits `x @ w` hold N·V numbers
(8 GiB in float32 for 8192 tokens and V = 262,144) and their gradient as many
again. The loss only needs three numbers per token -- the log-normalizer
``lse``, the label logit and (for label smoothing) the sum of the logits --
and the gradient can be rebuilt from ``lse`` one tile of logits at a time.
This module computes both in tiles of ``[token_chunk, vocab_chunk]`` under a
`jax.custom_vjp`, in pure JAX (`lax.fori_loop` over `lax.dynamic_slice`), so
the same code runs under `jit` on CPU, GPU and TPU and inside `shard_map`
(`xentjax.parallel` reuses the kernels below with collectives switched on).

Two strategies:

* ``"recompute"`` (default): the forward pass keeps only ``lse`` per token,
  the backward pass recomputes each logit tile (one matmul more than the
  materialized computation; temporary memory independent of N·V).
* ``"store"``: one pass over token chunks with the whole vocabulary row forms
  the loss and both gradients at once (as Liger-Kernel's fused linear
  cross-entropy does); the backward pass only scales them. No recomputation,
  at the price of one weight-sized float32 buffer.

The numerics: logits accumulate in float32 (``preferred_element_type``) for
16-bit inputs, the log-sum-exp is the streaming (online) one in float32, the
gradients of ``x`` and ``w`` accumulate in float32 and come back in the
inputs' dtypes. As in the materialized computation, the operands of every
matmul are in the inputs' dtype: for 16-bit inputs each tile of the logit
gradient is rounded to it before the two gradient matmuls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from xentjax import _validation as V

Strategy = Literal["recompute", "store"]
WLayout = Literal["dv", "vd"]

# Automatic tile sizes, in elements of the float32 logit tile. The recompute
# tile is 2^21 elements (8 MiB): a handful of them alive at once stays far
# below 1% of the materialized logits at LLM sizes while each matmul is still
# large enough to run at full speed. The store tile spans the whole vocabulary
# row, so it is larger (2^24 elements, 64 MiB) to keep token chunks wide:
# at V = 32768 that is 512 tokens, where the three matmuls of a tile run at
# the speed of the materialized ones (256-token tiles measured 7% slower on
# CPU, from re-reading the weight-sized gradient accumulator twice as often).
_RECOMPUTE_TILE = 1 << 21
_RECOMPUTE_VOCAB_CHUNK = 1024
_STORE_TILE = 1 << 24
_MIN_TOKEN_CHUNK = 8


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one fused call (hashable: a `custom_vjp` nondiff arg)."""

  num_classes: int  # the real vocabulary size V (global); later columns are padding
  num_columns: int  # global number of columns of w (>= num_classes)
  label_smoothing: float
  z_loss: float
  soft_cap: float | None
  vd: bool  # w is [V, D] (tied embedding) rather than [D, V]
  token_chunk: int
  vocab_chunk: int
  precision: Any
  # Parallel execution (all None on one device).
  mesh: Any = None
  data_axis: Any = None
  vocab_axis: Any = None


# ----------------------------------------------------------------------------
# Tiles.


def _fold(total: int, chunk: int, body, carry):
  """`carry = body(carry, start, size)` over `[0, total)` in chunks of `chunk`.

  Full chunks run in a `fori_loop` (a traced `start`); the remainder, if any,
  runs once more with its own static size, so no array is ever padded.
  """
  n_full, tail = divmod(total, chunk)
  if n_full == 1:
    carry = body(carry, 0, chunk)
  elif n_full > 1:
    carry = lax.fori_loop(0, n_full, lambda i, c: body(c, i * chunk, chunk), carry)
  if tail:
    carry = body(carry, n_full * chunk, tail)
  return carry


def _vocab_offset(cfg: _Config, local_columns: int):
  """Global index of this device's first column (0 on one device)."""
  if cfg.vocab_axis is None:
    return 0
  return lax.axis_index(cfg.vocab_axis) * local_columns


def _w_chunk(w, start, size, cfg: _Config):
  return lax.dynamic_slice_in_dim(w, start, size, axis=0 if cfg.vd else 1)


def _logit_tile(x_t, w_c, col0, cfg: _Config, cdt):
  """Logits of one tile, `[tokens, columns]` in the compute dtype.

  Returns `(z, col)`: `z` soft-capped and with padding columns at -inf, `col`
  the global column index of each column (`[1, columns]`).
  """
  op_dt = jnp.result_type(x_t.dtype, w_c.dtype)
  dims = (((1,), (1 if cfg.vd else 0,)), ((), ()))
  z = lax.dot_general(
      x_t.astype(op_dt), w_c.astype(op_dt), dims,
      precision=cfg.precision, preferred_element_type=cdt,
  ).astype(cdt)
  if cfg.soft_cap is not None:
    cap = jnp.asarray(cfg.soft_cap, cdt)
    z = cap * jnp.tanh(z / cap)
  col = col0 + lax.broadcasted_iota(jnp.int32, (1, z.shape[1]), 1)
  if cfg.num_classes < cfg.num_columns:
    z = jnp.where(col < cfg.num_classes, z, -jnp.inf)
  return z, col


def _dlogits(z, col, labels_t, lse_t, a_t, b_t, e_t, cfg: _Config):
  """Cotangent of the raw logits `x @ w` for one tile.

  With p = softmax(z), the per-token loss
  ``lse - (1-eps) z_y - (eps/V) sum_j z_j + lam lse^2`` has derivative
  ``(1 + 2 lam lse) p_j - (1-eps) [j=y] - eps/V``; the caller folds the
  incoming cotangents into the per-token coefficients `a` (of p), `b` (of the
  one-hot) and `e` (uniform). The soft cap contributes its derivative
  ``1 - tanh^2 = 1 - (z/c)^2``; padding columns get exactly 0.
  """
  p = jnp.exp(z - lse_t[:, None])
  hit = col == labels_t[:, None]
  dz = a_t[:, None] * p - jnp.where(hit, b_t[:, None], 0.0)
  if cfg.label_smoothing:
    dz = dz - e_t[:, None]
  if cfg.soft_cap is not None:
    cap = jnp.asarray(cfg.soft_cap, z.dtype)
    dz = dz * (1.0 - jnp.square(z / cap))
  if cfg.num_classes < cfg.num_columns:
    dz = jnp.where(col < cfg.num_classes, dz, 0.0)
  return dz


def _dot_dx(dz, w_c, op_dt, cfg: _Config, cdt):
  """`dz @ w_c^T`: `[tokens, D]`, accumulated in the compute dtype.

  Like the materialized computation, the matmul operands are in the inputs'
  (promoted) dtype `op_dt`: for 16-bit inputs the logit-gradient tile is
  rounded to it, and the products are accumulated in float32.
  """
  dims = (((1,), (0 if cfg.vd else 1,)), ((), ()))
  return lax.dot_general(
      dz.astype(op_dt), w_c.astype(op_dt), dims, precision=cfg.precision,
      preferred_element_type=cdt,
  ).astype(cdt)


def _dot_dw(x_t, dz, op_dt, cfg: _Config, cdt, xT_t=None):
  """`x_t^T @ dz` as `[D, columns]` (or `[columns, D]` for the "vd" layout).

  `xT_t`, if given, is `x_t^T` already laid out as `[D, tokens]` (the "dv"
  layout only): the product is then an ordinary `[D, T] @ [T, columns]`
  matmul, which XLA's CPU backend hands to its fast matmul library, where the
  transposed-operand form falls back to a slower one.
  """
  if xT_t is not None:
    return lax.dot_general(
        xT_t.astype(op_dt), dz.astype(op_dt), (((1,), (0,)), ((), ())),
        precision=cfg.precision, preferred_element_type=cdt,
    ).astype(cdt)
  dims = (((0,), (0,)), ((), ()))
  x_t = x_t.astype(op_dt)
  a, b = (dz.astype(op_dt), x_t) if cfg.vd else (x_t, dz.astype(op_dt))
  return lax.dot_general(
      a, b, dims, precision=cfg.precision, preferred_element_type=cdt
  ).astype(cdt)


def _combine_lse(m, s, cfg: _Config):
  """Global `lse` from the local running max `m` and scaled sum `s`."""
  if cfg.vocab_axis is not None:
    m_all = lax.pmax(m, cfg.vocab_axis)
    m_all_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    s = lax.psum(s * jnp.exp(m - m_all_safe), cfg.vocab_axis)
    m = m_all
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  return m_safe + jnp.log(s)


def _per_token_loss(lse, zy, zsum, cfg: _Config):
  eps = cfg.label_smoothing
  loss = lse - (1.0 - eps) * zy
  if eps:
    loss = loss - (eps / cfg.num_classes) * zsum
  if cfg.z_loss:
    loss = loss + cfg.z_loss * jnp.square(lse)
  return loss


def _bad_labels(labels, valid, cfg: _Config):
  """Tokens that count but whose label is not a class: their loss is NaN."""
  return valid & ((labels < 0) | (labels >= cfg.num_classes))


# ----------------------------------------------------------------------------
# Strategy "recompute": forward keeps lse, backward recomputes logit tiles.


def _recompute_forward_local(x, w, labels, valid, cfg: _Config):
  """Per-token `(loss, lse)` for this device's tokens and vocabulary shard."""
  cdt = V.compute_dtype(x.dtype, w.dtype)
  n = x.shape[0]
  n_cols = w.shape[0 if cfg.vd else 1]
  offset = _vocab_offset(cfg, n_cols)

  def vocab_body(carry, v0, vsize):
    w_c = _w_chunk(w, v0, vsize, cfg)

    def token_body(carry, t0, tsize):
      m, s, zy, zsum = carry
      x_t = lax.dynamic_slice_in_dim(x, t0, tsize, 0)
      y_t = lax.dynamic_slice_in_dim(labels, t0, tsize, 0)
      z, col = _logit_tile(x_t, w_c, offset + v0, cfg, cdt)
      m_old = lax.dynamic_slice_in_dim(m, t0, tsize, 0)
      s_old = lax.dynamic_slice_in_dim(s, t0, tsize, 0)
      # Online log-sum-exp: rescale the running sum to the new running max.
      m_new = jnp.maximum(m_old, jnp.max(z, axis=1))
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      s_new = s_old * jnp.exp(m_old - m_safe) + jnp.sum(jnp.exp(z - m_safe[:, None]), axis=1)
      zy_t = jnp.sum(jnp.where(col == y_t[:, None], z, 0.0), axis=1)
      m = lax.dynamic_update_slice_in_dim(m, m_new, t0, 0)
      s = lax.dynamic_update_slice_in_dim(s, s_new, t0, 0)
      zy = lax.dynamic_update_slice_in_dim(
          zy, lax.dynamic_slice_in_dim(zy, t0, tsize, 0) + zy_t, t0, 0)
      if cfg.label_smoothing:
        zs_t = jnp.sum(jnp.where(col < cfg.num_classes, z, 0.0), axis=1)
        zsum = lax.dynamic_update_slice_in_dim(
            zsum, lax.dynamic_slice_in_dim(zsum, t0, tsize, 0) + zs_t, t0, 0)
      return m, s, zy, zsum

    return _fold(n, cfg.token_chunk, token_body, carry)

  init = (
      jnp.full((n,), -jnp.inf, cdt),
      jnp.zeros((n,), cdt),
      jnp.zeros((n,), cdt),
      jnp.zeros((n,), cdt),
  )
  m, s, zy, zsum = _fold(n_cols, cfg.vocab_chunk, vocab_body, init)
  lse = _combine_lse(m, s, cfg)
  if cfg.vocab_axis is not None:
    zy = lax.psum(zy, cfg.vocab_axis)
    if cfg.label_smoothing:
      zsum = lax.psum(zsum, cfg.vocab_axis)
  loss = _per_token_loss(lse, zy, zsum, cfg)
  loss = jnp.where(_bad_labels(labels, valid, cfg), jnp.nan, loss)
  loss = jnp.where(valid, loss, 0.0)
  return loss, lse


def _recompute_backward_local(x, w, labels, valid, lse, g_loss, g_lse, cfg: _Config):
  """`(dx, dw)` for cotangents `g_loss`, `g_lse` of the per-token outputs.

  Loops over vocabulary chunks outside and token chunks inside, so the
  weight gradient of a chunk is complete (and cast) when the inner loop ends
  and only `dx` (N x D, float32) accumulates across the outer loop. For the
  "dv" layout `x` is also transposed once, to `[D, N]` in the inputs' dtype,
  so that every weight-gradient matmul is an ordinary one (see `_dot_dw`;
  about 4% of the fwd+bwd time on CPU, for one more `x`-sized buffer).
  """
  cdt = V.compute_dtype(x.dtype, w.dtype)
  op_dt = jnp.result_type(x.dtype, w.dtype)
  n = x.shape[0]
  n_cols = w.shape[0 if cfg.vd else 1]
  offset = _vocab_offset(cfg, n_cols)
  g = jnp.where(valid, g_loss.astype(cdt), 0.0)
  g = jnp.where(_bad_labels(labels, valid, cfg), jnp.nan, g)
  eps = cfg.label_smoothing
  a = g * (1.0 + 2.0 * cfg.z_loss * lse) + g_lse.astype(cdt)
  b = g * (1.0 - eps)
  e = g * (eps / cfg.num_classes)

  xT = None if cfg.vd else x.astype(op_dt).T

  def vocab_body(carry, v0, vsize):
    dx, dw = carry
    w_c = _w_chunk(w, v0, vsize, cfg)

    def token_body(carry, t0, tsize):
      dx, dw_c = carry
      sl = lambda v: lax.dynamic_slice_in_dim(v, t0, tsize, 0)
      x_t = sl(x)
      z, col = _logit_tile(x_t, w_c, offset + v0, cfg, cdt)
      dz = _dlogits(z, col, sl(labels), sl(lse), sl(a), sl(b), sl(e), cfg)
      dx = lax.dynamic_update_slice_in_dim(dx, sl(dx) + _dot_dx(dz, w_c, op_dt, cfg, cdt), t0, 0)
      xT_t = None if xT is None else lax.dynamic_slice_in_dim(xT, t0, tsize, 1)
      return dx, dw_c + _dot_dw(x_t, dz, op_dt, cfg, cdt, xT_t)

    dw_shape = (vsize, x.shape[1]) if cfg.vd else (x.shape[1], vsize)
    dx, dw_c = _fold(n, cfg.token_chunk, token_body, (dx, jnp.zeros(dw_shape, cdt)))
    if cfg.data_axis is not None:  # tokens of other data shards, in float32
      dw_c = lax.psum(dw_c, cfg.data_axis)
    dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(w.dtype), v0, 0 if cfg.vd else 1)
    return dx, dw

  init = (jnp.zeros(x.shape, cdt), jnp.zeros(w.shape, w.dtype))
  dx, dw = _fold(n_cols, cfg.vocab_chunk, vocab_body, init)
  if cfg.vocab_axis is not None:  # each shard saw part of the vocabulary
    dx = lax.psum(dx, cfg.vocab_axis)
  return dx.astype(x.dtype), dw


# ----------------------------------------------------------------------------
# Strategy "store": one pass over token chunks forms loss and gradients.


def _store_forward_local(x, w, labels, valid, weights, cfg: _Config):
  """`(weighted loss sum, lse, dx, dw)`; gradients of the weighted sum, float32."""
  cdt = V.compute_dtype(x.dtype, w.dtype)
  op_dt = jnp.result_type(x.dtype, w.dtype)
  n = x.shape[0]
  n_cols = w.shape[0 if cfg.vd else 1]
  offset = _vocab_offset(cfg, n_cols)
  eps = cfg.label_smoothing
  weights = jnp.where(valid, weights.astype(cdt), 0.0)
  weights = jnp.where(_bad_labels(labels, valid, cfg), jnp.nan, weights)
  # As in the recompute backward pass: `x` transposed once so every
  # weight-gradient product is an ordinary matmul (see `_dot_dw`).
  xT = None if cfg.vd else x.astype(op_dt).T

  def token_body(carry, t0, tsize):
    total, lse_all, dx, dw = carry
    sl = lambda v: lax.dynamic_slice_in_dim(v, t0, tsize, 0)
    x_t, y_t, r_t, valid_t = sl(x), sl(labels), sl(weights), sl(valid)
    xT_t = None if xT is None else lax.dynamic_slice_in_dim(xT, t0, tsize, 1)
    z, col = _logit_tile(x_t, w, offset, cfg, cdt)
    m = jnp.max(z, axis=1)
    if cfg.vocab_axis is not None:
      m = lax.pmax(m, cfg.vocab_axis)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    s = jnp.sum(jnp.exp(z - m_safe[:, None]), axis=1)
    zy = jnp.sum(jnp.where(col == y_t[:, None], z, 0.0), axis=1)
    zsum = jnp.sum(jnp.where(col < cfg.num_classes, z, 0.0), axis=1) if eps else zy
    if cfg.vocab_axis is not None:
      s, zy, zsum = lax.psum((s, zy, zsum), cfg.vocab_axis)
    lse = m_safe + jnp.log(s)
    loss = _per_token_loss(lse, zy, zsum, cfg)
    total = total + jnp.sum(jnp.where(valid_t, r_t * loss, 0.0))
    dz = _dlogits(
        z, col, y_t, lse, r_t * (1.0 + 2.0 * cfg.z_loss * lse), r_t * (1.0 - eps),
        r_t * (eps / cfg.num_classes), cfg,
    )
    lse_all = lax.dynamic_update_slice_in_dim(lse_all, lse, t0, 0)
    dx = lax.dynamic_update_slice_in_dim(dx, _dot_dx(dz, w, op_dt, cfg, cdt), t0, 0)
    return total, lse_all, dx, dw + _dot_dw(x_t, dz, op_dt, cfg, cdt, xT_t)

  init = (
      jnp.zeros((), cdt),
      jnp.zeros((n,), cdt),
      jnp.zeros(x.shape, cdt),
      jnp.zeros(w.shape, cdt),
  )
  total, lse, dx, dw = _fold(n, cfg.token_chunk, token_body, init)
  if cfg.vocab_axis is not None:
    dx = lax.psum(dx, cfg.vocab_axis)
  if cfg.data_axis is not None:
    total = lax.psum(total, cfg.data_axis)
    dw = lax.psum(dw, cfg.data_axis)
  return total, lse, dx, dw


# ----------------------------------------------------------------------------
# custom_vjp wrappers: the same kernels on one device or inside `shard_map`.


def _specs(cfg: _Config):
  """PartitionSpecs of (x, w, per-token vectors) for the parallel version."""
  tok = P(cfg.data_axis)
  xs = P(cfg.data_axis, None)
  ws = P(cfg.vocab_axis, None) if cfg.vd else P(None, cfg.vocab_axis)
  return xs, ws, tok


def _sharded(fn, cfg: _Config, in_specs, out_specs):
  """`fn` itself on one device; `shard_map(fn)` over `cfg.mesh` otherwise.

  The collectives inside the kernels are explicit and nothing is
  differentiated through `shard_map` (the `custom_vjp` sits outside it), so the
  replication checker is not needed.
  """
  if cfg.mesh is None:
    return fn
  return jax.shard_map(
      fn, mesh=cfg.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
  )


def _explicit_layout(x, w, vd: bool):
  """`(mesh, data_axis, vocab_axis)` read from `Explicit` shardings, or None.

  With `Explicit` mesh axes the sharding is part of an array's type and the
  single-device kernels cannot mix sharded slices with unsharded carries, so a
  call on such arrays runs through `shard_map` instead: tokens stay sharded
  over the axes of the leading axis of `x`, and the vocabulary over the axes
  of the vocabulary axis of `w` (when they differ from the tokens' axes).
  """
  mesh = None
  specs = []
  for a in (x, w):
    sharding = getattr(jax.typeof(a), "sharding", None)
    m = getattr(sharding, "mesh", None)
    explicit = jax.sharding.AxisType.Explicit
    if m is None or getattr(m, "empty", True) or not any(
        t == explicit for t in getattr(m, "axis_types", ())):
      specs.append(())
      continue
    mesh = mesh or m
    specs.append(tuple(sharding.spec))
  if mesh is None:
    return None
  sx, sw = specs
  data_axis = sx[0] if sx else None
  vdim = 0 if vd else 1
  vocab_axis = sw[vdim] if len(sw) > vdim else None
  if vocab_axis is not None and data_axis is not None and (
      set(V.as_sequence(vocab_axis)) & set(V.as_sequence(data_axis))):
    vocab_axis = None
  return getattr(mesh, "abstract_mesh", mesh), data_axis, vocab_axis


def _axis_size(mesh, axis) -> int:
  if axis is None:
    return 1
  return math.prod(dict(mesh.shape)[a] for a in V.as_sequence(axis))


def place(a, mesh, spec):
  """Put `a` in the layout `spec` of `mesh` (a no-op when it is there already).

  With `Explicit` mesh axes (the default of `jax.make_mesh`) the layout is part
  of the type and `shard_map` only accepts matching arguments, so this is
  `jax.reshard`; with `Auto` axes it is a sharding constraint. Both are
  differentiable: the cotangent goes back to the caller's layout.
  """
  sharding = jax.sharding.NamedSharding(mesh, spec)
  explicit = jax.sharding.AxisType.Explicit
  if any(t == explicit for t in getattr(mesh, "axis_types", ())):
    return jax.reshard(a, sharding)
  return lax.with_sharding_constraint(a, sharding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _recompute(x, w, labels, valid, cfg: _Config):
  return _recompute_fwd(x, w, labels, valid, cfg)[0]


def _recompute_fwd(x, w, labels, valid, cfg: _Config):
  xs, ws, tok = _specs(cfg)
  fwd = _sharded(
      functools.partial(_recompute_forward_local, cfg=cfg), cfg, (xs, ws, tok, tok), (tok, tok)
  )
  loss, lse = fwd(x, w, labels, valid)
  return (loss, lse), (x, w, labels, valid, lse)


def _recompute_bwd(cfg: _Config, res, cts):
  x, w, labels, valid, lse = res
  g_loss, g_lse = cts
  xs, ws, tok = _specs(cfg)
  bwd = _sharded(
      functools.partial(_recompute_backward_local, cfg=cfg),
      cfg, (xs, ws, tok, tok, tok, tok, tok), (xs, ws),
  )
  dx, dw = bwd(x, w, labels, valid, lse, g_loss, g_lse)
  return dx, dw, None, None


_recompute.defvjp(_recompute_fwd, _recompute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _store(x, w, labels, valid, weights, cfg: _Config, dtypes):
  return _store_fwd(x, w, labels, valid, weights, cfg, dtypes)[0]


def _store_fwd(x, w, labels, valid, weights, cfg: _Config, dtypes):
  del dtypes
  xs, ws, tok = _specs(cfg)
  fwd = _sharded(
      functools.partial(_store_forward_local, cfg=cfg),
      cfg, (xs, ws, tok, tok, tok), (P(), tok, xs, ws),
  )
  total, lse, dx, dw = fwd(x, w, labels, valid, weights)
  return (total, lse), (dx, dw)


def _store_bwd(cfg: _Config, dtypes, res, cts):
  del cfg
  dx, dw = res
  g, _ = cts  # the returned lse is wrapped in stop_gradient by the caller
  x_dtype, w_dtype = dtypes
  g = g.astype(dx.dtype)
  return (g * dx).astype(x_dtype), (g * dw).astype(w_dtype), None, None, None


_store.defvjp(_store_fwd, _store_bwd)


# ----------------------------------------------------------------------------
# Argument checks and the shared entry point.


def _positive_int(name: str, value) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"`{name}` must be None (automatic) or a positive int, got {value!r}.")
  return value


def _auto_chunks(strategy, n_tokens, n_cols, token_chunk, vocab_chunk):
  """Tile sizes: the user's, or ones that keep a float32 logit tile at 8-64 MiB."""
  if strategy == "recompute":
    vc = vocab_chunk or _RECOMPUTE_VOCAB_CHUNK
    vc = min(vc, max(n_cols, 1))
    tc = token_chunk or max(_MIN_TOKEN_CHUNK, _RECOMPUTE_TILE // vc)
  else:
    vc = max(n_cols, 1)
    tc = token_chunk or max(_MIN_TOKEN_CHUNK, _STORE_TILE // max(n_cols, 1))
  return min(tc, max(n_tokens, 1)), vc


def linear_ce_impl(
    x, w, labels, *, reduction, ignore_index, where, label_smoothing, z_loss,
    logit_soft_cap, return_lse, strategy, w_layout, vocab_size, token_chunk_size,
    vocab_chunk_size, precision, mesh=None, data_axis=None, vocab_axis=None,
    vocab_shards=1, data_shards=1,
):
  """Checks arguments, flattens the tokens and dispatches to a kernel.

  Shared by `linear_softmax_cross_entropy` and
  `xentjax.parallel.linear_softmax_cross_entropy` (which passes a mesh, its
  axis names and their sizes after checking them).
  """
  V.check_floating("x", x)
  V.check_floating("w", w)
  V.check_integer("labels", labels)
  x = jnp.asarray(x)
  w = jnp.asarray(w)
  labels = jnp.asarray(labels)
  if w_layout not in ("dv", "vd"):
    raise ValueError(
        f'`w_layout` must be "dv" (w is [D, V]) or "vd" (w is [V, D], a tied '
        f"embedding table), got {w_layout!r}."
    )
  vd = w_layout == "vd"
  if x.ndim < 1 or w.ndim != 2:
    raise ValueError(
        f"`x` must be [..., D] and `w` a matrix ([D, V], or [V, D] with "
        f'w_layout="vd"), got x.shape={x.shape} and w.shape={w.shape}.'
    )
  d = x.shape[-1]
  w_d, n_cols = (w.shape[1], w.shape[0]) if vd else w.shape
  if w_d != d:
    hint = (
        ' (w looks like a [V, D] embedding table: pass w_layout="vd")'
        if not vd and w.shape[1] == d else
        ' (w looks like [D, V]: pass w_layout="dv")' if vd and w.shape[0] == d else ""
    )
    raise ValueError(
        f"The hidden size of `x` and `w` must agree: x.shape={x.shape} has D={d} but "
        f"w.shape={w.shape} with w_layout={w_layout!r} has D={w_d}{hint}."
    )
  if labels.shape != x.shape[:-1]:
    raise ValueError(
        f"`labels` must have the shape of `x` without its last axis, got "
        f"labels.shape={labels.shape} for x.shape={x.shape} (expected {x.shape[:-1]})."
    )
  V.check_reduction(reduction)
  if strategy not in ("recompute", "store"):
    raise ValueError(f'`strategy` must be "recompute" or "store", got {strategy!r}.')
  if strategy == "store" and reduction == "none":
    raise ValueError(
        'strategy="store" forms the weight gradient in the forward pass, which needs a '
        'scalar loss: use reduction="mean" or "sum", or strategy="recompute" for '
        'reduction="none".'
    )
  if strategy == "store" and vocab_chunk_size is not None:
    raise ValueError(
        'strategy="store" works on whole vocabulary rows; `vocab_chunk_size` only applies '
        'to strategy="recompute".'
    )
  eps = V.check_label_smoothing(label_smoothing)
  lam = V.check_nonnegative("z_loss", z_loss)
  if logit_soft_cap is not None:
    cap = float(logit_soft_cap)
    if not cap > 0.0 or math.isinf(cap):
      raise ValueError(f"`logit_soft_cap` must be None or a finite number > 0, got {logit_soft_cap!r}.")
    logit_soft_cap = cap
  if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
    raise TypeError(f"`ignore_index` must be a Python int, got {ignore_index!r}.")
  token_chunk_size = _positive_int("token_chunk_size", token_chunk_size)
  vocab_chunk_size = _positive_int("vocab_chunk_size", vocab_chunk_size)
  total_cols = n_cols  # w is the global array, also in the parallel version
  if vocab_size is None:
    vocab_size = total_cols
  elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= total_cols:
    raise ValueError(
        f"`vocab_size` must be an int in [1, {total_cols}] (the number of real classes "
        f"among the {total_cols} columns of `w`), got {vocab_size!r}."
    )

  batch_shape = labels.shape
  n = math.prod(batch_shape)
  if mesh is None:
    layout = _explicit_layout(x, w, vd)
    if layout is not None:
      mesh, data_axis, vocab_axis = layout
      data_shards, vocab_shards = _axis_size(mesh, data_axis), _axis_size(mesh, vocab_axis)
  if mesh is not None:
    if total_cols % vocab_shards:
      padded = -(-total_cols // vocab_shards) * vocab_shards
      raise ValueError(
          f"The vocabulary of `w` (w.shape={w.shape}, V={total_cols}) is not divisible by "
          f"the {vocab_shards} devices of mesh axis {vocab_axis!r}. Pad `w` with "
          f"{padded - total_cols} zero {'rows' if vd else 'columns'} to V={padded} and pass "
          f"vocab_size={vocab_size}: padding classes are then excluded exactly."
      )
    if n % data_shards:
      raise ValueError(
          f"The {n} tokens of `labels` (labels.shape={batch_shape}) are not divisible by the "
          f"{data_shards} devices of mesh axis {data_axis!r}; pad the batch and mask the "
          "padding with `where` (or `ignore_index`)."
      )
  valid = labels != ignore_index
  if where is not None:
    V.check_broadcastable("where", where, "labels", labels)
    where = jnp.asarray(where)
    if where.ndim > labels.ndim or jnp.broadcast_shapes(where.shape, batch_shape) != batch_shape:
      raise ValueError(
          f"`where` must broadcast to the shape of `labels`, got where.shape={where.shape} "
          f"and labels.shape={batch_shape}."
      )
    valid = valid & jnp.broadcast_to(where.astype(bool), batch_shape)
  x2 = x.reshape(n, d)
  y = labels.reshape(n).astype(jnp.int32)
  valid = valid.reshape(n)

  n_local = n // data_shards
  tc, vc = _auto_chunks(strategy, n_local, total_cols // vocab_shards, token_chunk_size,
                        vocab_chunk_size)
  cfg = _Config(
      num_classes=vocab_size, num_columns=total_cols, label_smoothing=eps, z_loss=lam,
      soft_cap=logit_soft_cap, vd=vd, token_chunk=tc, vocab_chunk=vc, precision=precision,
      mesh=mesh, data_axis=data_axis, vocab_axis=vocab_axis,
  )
  cdt = V.compute_dtype(x.dtype, w.dtype)
  count = jnp.sum(valid).astype(cdt)
  if mesh is not None:
    xs, ws, tok = _specs(cfg)
    x2, w, y, valid = (place(a, mesh, s) for a, s in ((x2, xs), (w, ws), (y, tok), (valid, tok)))

  if strategy == "store":
    weights = jnp.ones((n,), cdt)
    if reduction == "mean":
      weights = weights / jnp.maximum(count, 1.0)
    if mesh is not None:
      weights = place(weights, mesh, tok)
    loss, lse = _store(x2, w, y, valid, weights, cfg, (x.dtype, w.dtype))
    lse = lax.stop_gradient(lse)
  else:
    per_token, lse = _recompute(x2, w, y, valid, cfg)
    if reduction == "none":
      loss = per_token.reshape(batch_shape)
    elif reduction == "sum":
      loss = jnp.sum(per_token)
    else:
      loss = jnp.sum(per_token) / jnp.maximum(count, 1.0)
  if return_lse:
    return loss, lse.reshape(batch_shape)
  return loss


def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    reduction: str = "mean",
    ignore_index: int = -100,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_soft_cap: float | None = None,
    return_lse: bool = False,
    strategy: Strategy = "recompute",
    w_layout: WLayout = "dv",
    vocab_size: int | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    precision: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Softmax cross-entropy of the logits ``x @ w``, without forming them.

  Equal (to float32 rounding, values and gradients) to

  .. code-block:: python

    logits = x @ w                       # [..., V], never materialized here
    optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  followed by the reduction and the options below. For each token with hidden state
  :math:`x \in \mathbb{R}^D` and label :math:`y`, the logits are
  :math:`z_j = c \tanh((x^\top w_{:,j}) / c)` (or :math:`x^\top w_{:,j}`
  without a soft cap) and

  .. math::

    \ell = \mathrm{lse}(z) - (1-\varepsilon)\, z_y
           - \frac{\varepsilon}{V} \sum_{j=1}^{V} z_j + \lambda\, \mathrm{lse}(z)^2,
    \qquad \mathrm{lse}(z) = \log \sum_{j=1}^{V} e^{z_j},

  the cross-entropy against the smoothed target
  :math:`(1-\varepsilon)\,\mathrm{onehot}(y) + \varepsilon/V` plus the PaLM
  z-loss. The logits are computed in tiles of
  ``[token_chunk_size, vocab_chunk_size]`` with a streaming log-sum-exp; see
  the module docstring for the two strategies.

  Args:
    x: hidden states ``[..., D]``, any leading batch shape, any float dtype.
    w: output projection ``[D, V]`` (a flax ``nn.Dense`` kernel). For tied
      embeddings pass the embedding table ``[V, D]`` itself with
      ``w_layout="vd"`` (not ``table.T``: that would copy it).
    labels: integer class indices ``[...]`` (the shape of ``x`` without ``D``).
    reduction: ``"mean"`` (over tokens that count: not ``ignore_index`` and
      ``where`` true), ``"sum"``, or ``"none"`` (per-token ``[...]``, 0 for
      tokens that do not count).
    ignore_index: label value of tokens that do not count (PyTorch's -100).
    where: optional boolean token mask broadcastable to ``labels``; tokens
      where it is False do not count.
    label_smoothing: :math:`\varepsilon \in [0, 1]`, target
      :math:`(1-\varepsilon)\,y + \varepsilon/V` (PyTorch/Keras convention).
    z_loss: :math:`\lambda \ge 0`, adds :math:`\lambda\,\mathrm{lse}^2` per token.
    logit_soft_cap: :math:`c > 0` caps the logits at :math:`c\tanh(z/c)` before
      the softmax (Gemma 2); the gradient includes its derivative.
    return_lse: also return the per-token log-normalizer ``lse`` ``[...]``
      (of the capped logits, for every token including the ones that do not
      count).
    strategy: ``"recompute"`` (default; temporary memory independent of N·V,
      one extra matmul in the backward pass) or ``"store"`` (gradients formed in
      the forward pass, one float32 ``w``-sized buffer kept for the backward
      pass; needs ``reduction`` ``"mean"`` or ``"sum"``; its ``lse`` carries no
      gradient).
    w_layout: ``"dv"`` for ``w`` of shape ``[D, V]`` or ``"vd"`` for ``[V, D]``.
    vocab_size: number of real classes when ``w`` has padding columns (rows for
      ``"vd"``) at the end; those are excluded from the softmax. Default: all.
    token_chunk_size: tokens per tile. Default: 2048 for ``"recompute"``;
      for ``"store"`` as many as keep a ``[tokens, V]`` float32 tile at 64 MiB
      (at least 8).
    vocab_chunk_size: vocabulary columns per tile, ``"recompute"`` only.
      Default 1024 (an 8 MiB float32 tile with the default token chunk).
    precision: passed to `lax.dot_general` (as in ``jnp.matmul``).

  Returns:
    The loss: a scalar for ``"mean"``/``"sum"``, ``[...]`` for ``"none"``, in
    float32 for 16-bit inputs (else the promoted dtype of ``x`` and ``w``).
    With ``return_lse=True`` a pair ``(loss, lse)``, ``lse`` of shape ``[...]``
    in the same dtype. Gradients of ``x`` and ``w`` come back in their dtypes.

  Note:
    * All-ignored or empty batches: the loss is 0 and its gradients are 0
      ("mean" divides by ``max(count, 1)``).
    * A label outside ``[0, vocab_size)`` on a token that counts gives a NaN
      loss and NaN gradients, never a silent finite number.
    * ``-inf`` never occurs in the logits of finite inputs; padding columns
      (``vocab_size``) are excluded exactly (probability 0, gradient 0).
    * Inside ``jit``, all options except the arrays are static.
    * Temporary memory of ``value_and_grad`` (default strategy, float32): a
      few tiles plus a float32 ``[N, D]`` accumulator and a transposed copy of
      ``x``, e.g. 128 MiB for N=8192, D=2048, V=262144 where the materialized
      computation needs 16 GiB. On the
      CPU backend XLA runs bfloat16 matmuls in float32 and keeps a float32
      copy of ``w`` for the loop (2 GiB at that size).
    * Inputs with `Explicit` mesh shardings (``jax.make_mesh``'s default) run
      through `shard_map` with the tokens' sharding kept (data parallelism);
      for a ``w`` sharded over its vocabulary use `xentjax.parallel`.

  Example:
    >>> import jax, jax.numpy as jnp, xentjax
    >>> x = jnp.ones((4, 8)); w = jnp.zeros((8, 10)); y = jnp.arange(4)
    >>> round(float(xentjax.linear_softmax_cross_entropy(x, w, y)), 4)  # log(10)
    2.3026

  References:
    Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024
    (Apple's Cut Cross-Entropy). Hsu et al., "Liger Kernel: Efficient Triton
    Kernels for LLM Training", 2024. Milakov & Gimelshein, "Online normalizer
    calculation for softmax", 2018. Chowdhery et al., "PaLM", 2022 (z-loss).
    Gemma Team, "Gemma 2", 2024 (logit soft-capping).
  """
  return linear_ce_impl(
      x, w, labels, reduction=reduction, ignore_index=ignore_index, where=where,
      label_smoothing=label_smoothing, z_loss=z_loss, logit_soft_cap=logit_soft_cap,
      return_lse=return_lse, strategy=strategy, w_layout=w_layout, vocab_size=vocab_size,
      token_chunk_size=token_chunk_size, vocab_chunk_size=vocab_chunk_size,
      precision=precision,
  )
