"""The fused statistics engine: per-token softmax statistics of `x @ w`, never the logits.

For a vocabulary of V words and N tokens the logits `x @ w` hold N·V numbers
(8 GiB in float32 for 8192 tokens and V = 262,144) and their gradient as many
again. Every loss of the cross-entropy family, and the information quantities
around it, need only a few numbers per token: the statistics of the one core
(``xentjax._core``), computed here tile by tile (``xentjax._tiles``) under a
`jax.custom_vjp`:

==========  ==================================================================
``m``       the row maximum of the logits (a shift without gradient)
``log_s``   ``log sum_j exp(z_j - m)``, so ``lse = m + log_s``
``zy``      ``z_y - m``, the label's logit relative to the maximum
``zu``      ``sum_j u_j (z_j - m)`` for a column weight ``u`` (label smoothing:
            ``u = 1/V``, or PyTorch's class weights ``u = c/V``)
``ent``     ``sum_j p_j (z_j - m) = E - m``, with ``E = sum_j p_j z_j``
            (the entropy is ``H = log_s - ent``)
==========  ==================================================================

plus, without gradient, the argmax, the top-k and the per-(token, vocabulary
chunk) maxima that gradient filtering decides from. The backward pass takes
the cotangents of the statistics and rebuilds, one tile at a time,

.. math::

  \\frac{\\partial}{\\partial z_j} = g_{\\log s}\\, p_j + g_{z_y} [j = y]
    + g_{zu}\\, u_j + g_{E}\\, p_j (1 + z_j - E),

times the soft cap's and the temperature's derivative. The losses
(`linear_softmax_cross_entropy`, `xentjax.linear_token_stats`) are ordinary
differentiable JAX code on the statistics: smoothing, z-loss, masking,
weights and reductions live outside the engine.

Two strategies:

* ``"recompute"`` (default): the forward pass keeps the statistics, the
  backward pass recomputes each logit tile (one matmul more than the
  materialized computation; temporary memory independent of N·V).
* ``"store"``: for a scalar loss ``sum_i f(stats_i)`` with a per-token ``f``
  known in advance, one pass over token chunks with whole vocabulary rows
  forms the statistics, ``f``'s gradient (`jax.vjp` of ``f`` on each chunk)
  and both gradients at once (as Liger-Kernel's fused linear cross-entropy
  does); the backward pass only scales them. No recomputation, at the price of
  one weight-sized float32 buffer.

A placement is part of the static configuration: on one device the kernels
run as they are; with a mesh they run under `jax.shard_map`, the statistics
are combined across vocabulary shards by all-reductions of per-token vectors
(``pmax``/``psum``; the top-k by an all-gather of ``k`` candidates per shard),
and nothing vocabulary-sized is ever gathered.

The numerics: logits accumulate in float32 (``preferred_element_type``) for
16-bit inputs, the log-sum-exp is the streaming (online) one in float32, the
gradients of ``x``, ``w`` and ``bias`` accumulate in float32 and come back in
the inputs' dtypes. As in the materialized computation, the operands of every
matmul are in the inputs' dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from typing import Any, Literal, NamedTuple, TypedDict, Unpack

import jax
import jax.numpy as jnp
from jax import lax

from xentjax import _core
from xentjax import _validation as V
from xentjax._api import where_mask
from xentjax._tiles import (
  _STORE_TILE,
  _auto_chunks,
  _Config,
  _dot_dw,
  _dot_dx,
  _explicit_layout,
  _fold,
  _logit_tile,
  _mesh_axes,
  _positive_int,
  _raw_cotangent,
  _safe,
  _sharded,
  _spec_tree,
  _vocab_offset,
  _w_chunk,
  place,
)

Strategy = Literal["recompute", "store"]
WLayout = Literal["dv", "vd"]


class HeadOptions(TypedDict, total=False):
  """The keywords of the head ``w`` that every fused function takes, declared once.

  How ``w`` is laid out (``w_layout``, ``vocab_size``), tiled
  (``token_chunk_size``, ``vocab_chunk_size``, ``precision``) and placed on
  devices (``mesh``, ``data_axis``, ``vocab_axis``): what
  `linear_softmax_cross_entropy`, `xentjax.linear_token_stats` and the
  distillation losses share. A function declares them as
  ``**head: Unpack[HeadOptions]`` (type checkers then know each keyword) and
  `takes_head_options` gives it the full signature with their defaults
  (`HEAD_DEFAULTS`), for `help()`, `inspect.signature` and the documentation.
  """

  w_layout: WLayout
  vocab_size: int | None
  token_chunk_size: int | None
  vocab_chunk_size: int | None
  precision: Any
  mesh: jax.sharding.Mesh | None
  data_axis: Any
  vocab_axis: Any


HEAD_DEFAULTS = {
  "w_layout": "dv",
  "vocab_size": None,
  "token_chunk_size": None,
  "vocab_chunk_size": None,
  "precision": None,
  "mesh": None,
  "data_axis": None,
  "vocab_axis": None,
}
if list(HEAD_DEFAULTS) != list(HeadOptions.__annotations__):  # one list of names
  raise AssertionError("HEAD_DEFAULTS must name the keywords of HeadOptions, in order.")


def _head_parameters(defaults: dict) -> list[inspect.Parameter]:
  """`HeadOptions` as keyword-only parameters, annotated as written; `defaults` override."""
  out = []
  for name, ref in HeadOptions.__annotations__.items():
    default = defaults.get(name, HEAD_DEFAULTS[name])
    annotation = getattr(ref, "__forward_arg__", ref)  # the annotation's text
    out.append(
      inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
      )
    )
  return out


def takes_head_options(**defaults):
  """Give a function declared with ``**head: Unpack[HeadOptions]`` those keywords.

  Its signature (`help()`, `inspect.signature`, Sphinx) lists each keyword of
  `HeadOptions` with its default: `HEAD_DEFAULTS`, or ``defaults`` for this
  function. Each call is bound to that signature, so the function receives
  every keyword in ``head`` (defaults filled in) and an unknown or repeated
  keyword is the usual `TypeError`.
  """
  unknown = defaults.keys() - HEAD_DEFAULTS.keys()
  if unknown:
    raise TypeError(f"not keywords of HeadOptions: {sorted(unknown)}.")

  def deco(fn):
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    full = sig.replace(parameters=own + _head_parameters(defaults))

    @functools.wraps(fn)
    def with_head(*args, **kwargs):
      try:
        bound = full.bind(*args, **kwargs)
      except TypeError as e:
        raise TypeError(f"{fn.__name__}() {e}") from None
      bound.apply_defaults()
      return fn(**bound.arguments)

    with_head.__signature__ = full
    return with_head

  return deco


def by_name(arguments: dict) -> dict:
  """The `locals()` of a `takes_head_options` function: its keywords, ``head`` spread out."""
  arguments = dict(arguments)
  return {**arguments.pop("head"), **arguments}


class Stats(NamedTuple):
  """Per-token statistics (all ``[n]``); `None` for the ones not requested."""

  m: jax.Array  # finite row max (a shift: its cotangent is ignored)
  log_s: jax.Array
  zy: jax.Array
  zu: jax.Array | None
  ent: jax.Array | None


# ----------------------------------------------------------------------------
# Accumulating the statistics over logit tiles (online, one tile at a time).


def _init_state(n: int, cfg: _Config, cdt, n_chunks: int) -> dict:
  st = {"m": jnp.full((n,), -jnp.inf, cdt), "s": jnp.zeros((n,), cdt), "zy": jnp.zeros((n,), cdt)}
  if cfg.weighted_sum:
    st["zu"] = jnp.zeros((n,), cdt)
  if cfg.entropy:
    st["t"] = jnp.zeros((n,), cdt)
  if cfg.argmax:
    st["amax"] = jnp.zeros((n,), jnp.int32)
  if cfg.top_k:
    st["topv"] = jnp.full((n, cfg.top_k), -jnp.inf, cdt)
    st["topi"] = jnp.zeros((n, cfg.top_k), jnp.int32)
  if cfg.filter_eps is not None:
    st["tmax"] = jnp.full((n, n_chunks), -jnp.inf, cdt)
  return st


def _update(st: dict, z, col, y, u_c, u_seen, chunk, cfg: _Config) -> dict:
  """The running state of a token tile after one more logit tile `z`.

  `s` is relative to the running max ``m``; so are `zu` (``sum u (z - m)``,
  re-shifted by ``u_seen``, the column weight seen so far, when ``m`` grows)
  and `t` (``sum e^{z-m} (z - m)``, re-shifted with ``s``).
  """
  zmax = jnp.max(z, axis=1)
  m_old = st["m"]
  m_new = jnp.maximum(m_old, zmax)
  ms_old, ms_new = _safe(m_old), _safe(m_new)
  scale = jnp.exp(m_old - ms_new)  # 0 while m_old is -inf
  e = jnp.exp(z - ms_new[:, None])
  new = {
    "m": m_new,
    "s": st["s"] * scale + jnp.sum(e, axis=1),
    "zy": st["zy"] + jnp.sum(jnp.where(col == y[:, None], z, 0.0), axis=1),
  }
  if "zu" in st or "t" in st:
    zr = jnp.where(jnp.isfinite(z), z - ms_new[:, None], 0.0)
  if "zu" in st:
    new["zu"] = st["zu"] - u_seen * (ms_new - ms_old) + jnp.sum(zr * u_c[None, :], axis=1)
  if "t" in st:
    new["t"] = scale * (st["t"] - (ms_new - ms_old) * st["s"]) + jnp.sum(e * zr, axis=1)
  if "amax" in st:  # strictly greater: the lowest index wins ties
    new["amax"] = jnp.where(
      zmax > m_old, col[0, 0] + jnp.argmax(z, axis=1).astype(jnp.int32), st["amax"]
    )
  if "topv" in st:
    tv, ti = lax.top_k(z, min(cfg.top_k, z.shape[1]))
    vals = jnp.concatenate([st["topv"], tv], axis=1)  # earlier (lower) columns first
    idxs = jnp.concatenate([st["topi"], col[0, 0] + ti], axis=1)
    new["topv"], pos = lax.top_k(vals, cfg.top_k)
    new["topi"] = jnp.take_along_axis(idxs, pos, axis=1)
  if "tmax" in st:
    new["tmax"] = lax.dynamic_update_slice_in_dim(st["tmax"], zmax[:, None], chunk, 1)
  return new


def _finish(st: dict, u_local, cfg: _Config):
  """`(Stats, extras)` from the local running state: combined across vocabulary shards."""
  m, s, zy = st["m"], st["s"], st["zy"]
  ms_loc = _safe(m)
  ms, zu, t = ms_loc, st.get("zu"), st.get("t")
  extras = {k: st[k] for k in ("amax", "topv", "topi", "tmax") if k in st}
  ax = cfg.vocab_axis
  if ax is not None:
    m_all = lax.pmax(m, ax)
    ms = _safe(m_all)
    scale = jnp.exp(m - ms)
    if t is not None:
      t = lax.psum(scale * (t + (ms_loc - ms) * s), ax)
    if zu is not None:
      zu = lax.psum(zu + u_local * (ms_loc - ms), ax)
    s, zy = lax.psum((s * scale, zy), ax)
    if "amax" in extras:  # the lowest global index among the shards holding the max
      big = jnp.iinfo(jnp.int32).max
      extras["amax"] = lax.pmin(jnp.where(m == m_all, extras["amax"], big), ax)
    if "topv" in extras:  # k candidates per shard, in shard (= column) order
      vals = lax.all_gather(extras["topv"], ax, axis=1, tiled=True)
      idxs = lax.all_gather(extras["topi"], ax, axis=1, tiled=True)
      extras["topv"], pos = lax.top_k(vals, cfg.top_k)
      extras["topi"] = jnp.take_along_axis(idxs, pos, axis=1)
  log_s = jnp.log(s)
  ent = None if t is None else t / s
  return Stats(ms, log_s, zy - ms, zu, ent), extras


def _rows(tree: dict, t0, size) -> dict:
  return {k: lax.dynamic_slice_in_dim(v, t0, size, 0) for k, v in tree.items()}


def _put_rows(tree: dict, rows: dict, t0) -> dict:
  return {k: lax.dynamic_update_slice_in_dim(tree[k], rows[k], t0, 0) for k in tree}


def _col_slice(a, v0, size):
  return None if a is None else lax.dynamic_slice_in_dim(a, v0, size, 0)


def _forward_local(a: dict, cfg: _Config) -> dict:
  """Statistics of this device's tokens on its vocabulary shard (recompute forward)."""
  x, w, bias, u, labels = a["x"], a["w"], a.get("bias"), a.get("u"), a["labels"]
  cdt = V.compute_dtype(x.dtype, w.dtype)
  n, n_cols = x.shape[0], w.shape[0 if cfg.vd else 1]
  offset = _vocab_offset(cfg, n_cols)

  def vocab_body(carry, v0, vsize):
    st, u_seen = carry
    w_c, b_c, u_c = (
      _w_chunk(w, v0, vsize, cfg),
      _col_slice(bias, v0, vsize),
      _col_slice(u, v0, vsize),
    )

    def token_body(st, t0, tsize):
      z, col = _logit_tile(
        lax.dynamic_slice_in_dim(x, t0, tsize, 0), w_c, offset + v0, cfg, cdt, b_c
      )
      y_t = lax.dynamic_slice_in_dim(labels, t0, tsize, 0)
      rows = _update(_rows(st, t0, tsize), z, col, y_t, u_c, u_seen, v0 // cfg.vocab_chunk, cfg)
      return _put_rows(st, rows, t0)

    st = _fold(n, cfg.token_chunk, token_body, st)
    return st, u_seen if u_c is None else u_seen + jnp.sum(u_c.astype(cdt))

  n_chunks = -(-n_cols // cfg.vocab_chunk)
  init = (_init_state(n, cfg, cdt, n_chunks), jnp.zeros((), cdt))
  st, u_local = _fold(n_cols, cfg.vocab_chunk, vocab_body, init)
  stats, extras = _finish(st, u_local, cfg)
  out = {k: v for k, v in stats._asdict().items() if v is not None}
  return {**out, **extras}


# ----------------------------------------------------------------------------
# The backward pass: logit-tile cotangents from the statistics' cotangents.


def _dz(z, col, r: dict, u_c, cfg: _Config):
  """Cotangent of the raw logits of one tile, from per-token rows `r`.

  `r` holds ``lse``, ``ms`` and ``ent`` of the forward pass and the cotangents
  ``g_logs``, ``g_zy``, ``g_zu``, ``g_ent`` of the statistics.
  """
  p = jnp.exp(z - r["lse"][:, None])
  dz = r["g_logs"][:, None] * p
  if cfg.entropy:  # d(E - m)/dz = p (1 + z - E), with z - E = (z - m) - ent
    dz = dz + (r["g_ent"][:, None] * p) * (1.0 + (z - r["ms"][:, None]) - r["ent"][:, None])
  dz = dz + jnp.where(col == r["labels"][:, None], r["g_zy"][:, None], 0.0)
  if cfg.weighted_sum:
    dz = dz + r["g_zu"][:, None] * u_c.astype(dz.dtype)[None, :]
  return _raw_cotangent(dz, z, col, cfg)


def _keep_tiles(a: dict, n_cols: int, cfg: _Config):
  """`[token tiles, vocabulary tiles]` bool: the tiles gradient filtering keeps.

  A tile is skipped when, for every token in it whose statistics carry a
  cotangent, the largest probability on the tile's columns,
  ``exp(max_j z_j - lse)`` (from the per-chunk maxima of the forward pass),
  is below ``filter_eps``, and no such token's label lies in it (so the
  one-hot term of the gradient is never dropped).
  """
  tc, vc = cfg.token_chunk, cfg.vocab_chunk
  n = a["lse"].shape[0]
  n_tt, n_vt = -(-n // tc), -(-n_cols // vc)
  live = (a["g_logs"] != 0) | (a["g_ent"] != 0) if cfg.entropy else a["g_logs"] != 0
  logp = jnp.where(live[:, None], a["tmax"] - a["lse"][:, None], -jnp.inf)
  pad = n_tt * tc - n
  logp = jnp.pad(logp, ((0, pad), (0, 0)), constant_values=-jnp.inf)
  keep = jnp.max(logp.reshape(n_tt, tc, n_vt), axis=1) >= math.log(cfg.filter_eps)
  local = a["labels"] - _vocab_offset(cfg, n_cols)
  hit = (a["g_zy"] != 0) & (local >= 0) & (local < n_cols)
  tt = jnp.arange(n) // tc
  vt = jnp.where(hit, local, 0) // vc
  return keep.astype(jnp.int32).at[tt, vt].max(hit.astype(jnp.int32)) > 0


def _backward_local(a: dict, cfg: _Config) -> dict:
  """`dx`, `dw` (and `db`) of this device for the statistics' cotangents in `a`.

  Loops over vocabulary chunks outside and token chunks inside, so the
  weight gradient of a chunk is complete (and cast) when the inner loop ends
  and only `dx` (N x D, float32) accumulates across the outer loop. For the
  "dv" layout `x` is also transposed once, to `[D, N]` in the inputs' dtype,
  so that every weight-gradient matmul is an ordinary one (see `_dot_dw`;
  about 4% of the fwd+bwd time on CPU, for one more `x`-sized buffer).
  """
  x, w, bias, u = a["x"], a["w"], a.get("bias"), a.get("u")
  cdt = V.compute_dtype(x.dtype, w.dtype)
  op_dt = jnp.result_type(x.dtype, w.dtype)
  n, n_cols = x.shape[0], w.shape[0 if cfg.vd else 1]
  offset = _vocab_offset(cfg, n_cols)
  per_token = {k: v for k, v in a.items() if k not in ("x", "w", "bias", "u", "tmax")}
  keep = None if cfg.filter_eps is None else _keep_tiles(a, n_cols, cfg)
  xT = None if cfg.vd else x.astype(op_dt).T

  def vocab_body(carry, v0, vsize):
    dx, dw, db = carry
    w_c, b_c, u_c = (
      _w_chunk(w, v0, vsize, cfg),
      _col_slice(bias, v0, vsize),
      _col_slice(u, v0, vsize),
    )

    def tile(carry, t0, tsize):
      dx, dw_c, db_c = carry
      x_t = lax.dynamic_slice_in_dim(x, t0, tsize, 0)
      z, col = _logit_tile(x_t, w_c, offset + v0, cfg, cdt, b_c)
      dz = _dz(z, col, _rows(per_token, t0, tsize), u_c, cfg)
      dx_t = lax.dynamic_slice_in_dim(dx, t0, tsize, 0) + _dot_dx(dz, w_c, op_dt, cfg, cdt)
      xT_t = None if xT is None else lax.dynamic_slice_in_dim(xT, t0, tsize, 1)
      dw_c = dw_c + _dot_dw(x_t, dz, op_dt, cfg, cdt, xT_t)
      db_c = None if db_c is None else db_c + jnp.sum(dz, axis=0)
      return lax.dynamic_update_slice_in_dim(dx, dx_t, t0, 0), dw_c, db_c

    def token_body(carry, t0, tsize):
      if keep is None:
        return tile(carry, t0, tsize)
      kept = keep[t0 // cfg.token_chunk, v0 // cfg.vocab_chunk]
      return lax.cond(kept, lambda c: tile(c, t0, tsize), lambda c: c, carry)

    dw_shape = (vsize, x.shape[1]) if cfg.vd else (x.shape[1], vsize)
    init = (dx, jnp.zeros(dw_shape, cdt), None if bias is None else jnp.zeros((vsize,), cdt))
    dx, dw_c, db_c = _fold(n, cfg.token_chunk, token_body, init)
    if cfg.data_axis is not None:  # tokens of other data shards, in float32
      dw_c, db_c = lax.psum((dw_c, db_c), cfg.data_axis)
    dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(w.dtype), v0, 0 if cfg.vd else 1)
    if db is not None:
      db = lax.dynamic_update_slice_in_dim(db, db_c.astype(bias.dtype), v0, 0)
    return dx, dw, db

  init = (
    jnp.zeros(x.shape, cdt),
    jnp.zeros(w.shape, w.dtype),
    None if bias is None else jnp.zeros(bias.shape, bias.dtype),
  )
  dx, dw, db = _fold(n_cols, cfg.vocab_chunk, vocab_body, init)
  if cfg.vocab_axis is not None:  # each shard saw part of the vocabulary
    dx = lax.psum(dx, cfg.vocab_axis)
  out = {"dx": dx.astype(x.dtype), "dw": dw}
  return out if db is None else {**out, "db": db}


# ----------------------------------------------------------------------------
# Strategy "recompute": `Stats` with a custom VJP.


def _stat_keys(cfg: _Config):
  keys = ["m", "log_s", "zy"] + ["zu"] * cfg.weighted_sum + ["ent"] * cfg.entropy
  extras = ["amax"] * cfg.argmax + ["topv", "topi"] * bool(cfg.top_k)
  return keys + extras + ["tmax"] * (cfg.filter_eps is not None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _engine(args: dict, cfg: _Config) -> dict:
  """`{name: [n] statistic}` of the flattened tokens (see the module docstring)."""
  return _engine_fwd(args, cfg)[0]


def _engine_fwd(args: dict, cfg: _Config):
  keys = _stat_keys(cfg)
  fwd = _sharded(
    functools.partial(_forward_local, cfg=cfg),
    cfg,
    (_spec_tree(args, cfg),),
    _spec_tree(dict.fromkeys(keys), cfg),
  )
  out = fwd(args)
  res = {k: v for k, v in args.items()}
  res.update(ms=out["m"], lse=out["m"] + out["log_s"])
  for k in ("ent", "tmax"):
    if k in out:
      res[k] = out[k]
  return out, res


def _engine_bwd(cfg: _Config, res: dict, cts: dict):
  a = dict(res)
  cdt = res["lse"].dtype
  for stat, name in (("log_s", "g_logs"), ("zy", "g_zy"), ("zu", "g_zu"), ("ent", "g_ent")):
    if stat in cts:
      a[name] = cts[stat].astype(cdt)
  bwd = _sharded(
    functools.partial(_backward_local, cfg=cfg),
    cfg,
    (_spec_tree(a, cfg),),
    _spec_tree(dict.fromkeys(["dx", "dw"] + ["db"] * cfg.has_bias), cfg),
  )
  g = bwd(a)
  grads = {k: None for k in res if k in ("x", "w", "bias", "u", "labels")}
  grads.update(x=g["dx"], w=g["dw"])
  if cfg.has_bias:
    grads["bias"] = g["db"]
  return ({k: grads[k] for k in _arg_keys(res)},)


def _arg_keys(res):
  return [k for k in res if k in ("x", "w", "bias", "u", "labels")]


_engine.defvjp(_engine_fwd, _engine_bwd)


# ----------------------------------------------------------------------------
# Strategy "store": a scalar sum_i f(stats_i) and its gradients in one pass.


def _store_local(a: dict, cfg: _Config, token_loss) -> dict:
  """`total = sum_i f(stats_i, aux_i)`, per-token `lse`, and the gradients of `total`."""
  x, w, bias, u, labels, aux = a["x"], a["w"], a.get("bias"), a.get("u"), a["labels"], a["aux"]
  cdt = V.compute_dtype(x.dtype, w.dtype)
  op_dt = jnp.result_type(x.dtype, w.dtype)
  n, n_cols = x.shape[0], w.shape[0 if cfg.vd else 1]
  offset = _vocab_offset(cfg, n_cols)
  u_local = None if u is None else jnp.sum(u.astype(cdt))
  xT = None if cfg.vd else x.astype(op_dt).T  # as in the recompute backward pass

  def token_body(carry, t0, tsize):
    total, lse_all, dx, dw, db = carry
    x_t, y_t = (
      lax.dynamic_slice_in_dim(x, t0, tsize, 0),
      lax.dynamic_slice_in_dim(labels, t0, tsize, 0),
    )
    aux_t = _rows(aux, t0, tsize)
    z, col = _logit_tile(x_t, w, offset, cfg, cdt, bias)
    st = _update(_init_state(tsize, cfg, cdt, 1), z, col, y_t, u, 0.0, 0, cfg)
    stats, _ = _finish(st, u_local, cfg)
    loss_t, vjp = jax.vjp(lambda s: token_loss(s, aux_t), stats)
    (g,) = vjp(jnp.ones_like(loss_t))
    lse = stats.m + stats.log_s
    r = {
      "lse": lse,
      "ms": stats.m,
      "ent": stats.ent,
      "labels": y_t,
      "g_logs": g.log_s,
      "g_zy": g.zy,
      "g_zu": g.zu,
      "g_ent": g.ent,
    }
    dz = _dz(z, col, r, u, cfg)
    xT_t = None if xT is None else lax.dynamic_slice_in_dim(xT, t0, tsize, 1)
    db = None if db is None else db + jnp.sum(dz, axis=0)
    return (
      total + jnp.sum(loss_t),
      lax.dynamic_update_slice_in_dim(lse_all, lse, t0, 0),
      lax.dynamic_update_slice_in_dim(dx, _dot_dx(dz, w, op_dt, cfg, cdt), t0, 0),
      dw + _dot_dw(x_t, dz, op_dt, cfg, cdt, xT_t),
      db,
    )

  init = (
    jnp.zeros((), cdt),
    jnp.zeros((n,), cdt),
    jnp.zeros(x.shape, cdt),
    jnp.zeros(w.shape, cdt),
    None if bias is None else jnp.zeros(bias.shape, cdt),
  )
  total, lse, dx, dw, db = _fold(n, cfg.token_chunk, token_body, init)
  if cfg.vocab_axis is not None:
    dx = lax.psum(dx, cfg.vocab_axis)
  if cfg.data_axis is not None:
    total, dw, db = lax.psum((total, dw, db), cfg.data_axis)
  out = {"total": total, "lse": lse, "dx": dx, "dw": dw}
  return out if db is None else {**out, "db": db}


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _store(args: dict, cfg: _Config, token_loss, layout):
  """`(sum_i token_loss(stats_i, aux_i), lse)`; the `lse` carries no gradient.

  `layout` (static): the argument names and the dtypes of the differentiable ones.
  """
  return _store_fwd(args, cfg, token_loss, layout)[0]


def _store_layout(args: dict):
  dtypes = tuple((k, jnp.dtype(args[k].dtype).name) for k in ("x", "w", "bias") if k in args)
  return dtypes, tuple(k for k in args if k != "aux"), tuple(args["aux"])


def _store_fwd(args: dict, cfg: _Config, token_loss, layout):
  del layout
  keys = ["total", "lse", "dx", "dw"] + ["db"] * cfg.has_bias
  fwd = _sharded(
    functools.partial(_store_local, cfg=cfg, token_loss=token_loss),
    cfg,
    (_spec_tree(args, cfg),),
    _spec_tree(dict.fromkeys(keys), cfg),
  )
  out = fwd(args)
  return (out["total"], out["lse"]), out


def _store_bwd(cfg: _Config, token_loss, layout, out, cts):
  del cfg, token_loss
  dtypes, keys, aux_keys = layout
  g = cts[0].astype(out["dx"].dtype)
  grads = dict.fromkeys(keys)
  for k, dt in dtypes:
    grads[k] = (g * out["d" + k[0]]).astype(dt)
  return ({**grads, "aux": dict.fromkeys(aux_keys)},)


_store.defvjp(_store_fwd, _store_bwd)


# ----------------------------------------------------------------------------
# Argument checks and the flattened tokens, shared by the entry points.


class _Placement(NamedTuple):
  """Where one call runs: a mesh with its token and vocabulary axes, or one device."""

  mesh: Any = None
  data_axis: Any = None
  vocab_axis: Any = None
  data_shards: int = 1
  vocab_shards: int = 1


class _Tokens(NamedTuple):
  """The validated, flattened inputs of one call and their placement."""

  x: Any  # [n, D]
  w: Any
  status: _core.LabelStatus  # each [n]
  batch_shape: tuple
  vd: bool
  n_cols: int
  vocab_size: int
  cdt: Any
  where: _Placement


def _check_head(x_name, x, w_name, w, layout_name, layout):
  """`(x, w, vd, n_cols)`: hidden states `[..., D]` and their output head, as arrays.

  The errors name the arguments (`x`, `w`, `w_layout` of every entry point; the
  distillation losses check their teacher's head under its own names).
  """
  V.check_floating(x_name, x)
  V.check_floating(w_name, w)
  if layout not in ("dv", "vd"):
    raise ValueError(
      f'`{layout_name}` must be "dv" ({w_name} is [D, V]) or "vd" ({w_name} is [V, D], a '
      f"tied embedding table), got {layout!r}."
    )
  x, w = jnp.asarray(x), jnp.asarray(w)
  vd = layout == "vd"
  if x.ndim < 1 or w.ndim != 2:
    raise ValueError(
      f"`{x_name}` must be [..., D] and `{w_name}` a matrix ([D, V], or [V, D] with "
      f'{layout_name}="vd"), got {x_name}.shape={x.shape} and {w_name}.shape={w.shape}.'
    )
  d = x.shape[-1]
  w_d, n_cols = (w.shape[1], w.shape[0]) if vd else w.shape
  if w_d != d:
    hint = (
      f' ({w_name} looks like a [V, D] embedding table: pass {layout_name}="vd")'
      if not vd and w.shape[1] == d
      else f' ({w_name} looks like [D, V]: pass {layout_name}="dv")'
      if vd and w.shape[0] == d
      else ""
    )
    raise ValueError(
      f"The hidden size of `{x_name}` and `{w_name}` must agree: {x_name}.shape={x.shape} has "
      f"D={d} but {w_name}.shape={w.shape} with {layout_name}={layout!r} has D={w_d}{hint}."
    )
  return x, w, vd, n_cols


def _check_labels(labels, x, *, optional: bool = False):
  """Integer `labels` with the token shape of `x` (None stays None when `optional`)."""
  if labels is None and optional:
    return None
  V.check_integer("labels", labels)
  labels = jnp.asarray(labels)
  if labels.shape != x.shape[:-1]:
    raise ValueError(
      f"`labels` must have the shape of `x` without its last axis, got "
      f"labels.shape={labels.shape} for x.shape={x.shape} (expected {x.shape[:-1]})."
    )
  return labels


def _check_vocab_size(vocab_size, n_cols: int) -> int:
  if vocab_size is None:
    return n_cols
  if (
    isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= n_cols
  ):
    raise ValueError(
      f"`vocab_size` must be an int in [1, {n_cols}] (the number of real classes "
      f"among the {n_cols} columns of `w`), got {vocab_size!r}."
    )
  return vocab_size


def _check_where(where, x_shape: tuple, by_x: bool):
  """`where` as an array that broadcasts to the tokens `x_shape[:-1]` (or None).

  The errors name the tokens by `labels`, or by `x` where `by_x` (the
  distillation losses, whose labels are optional).
  """
  if where is None:
    return None
  batch_shape = x_shape[:-1]
  tokens = "x without its last axis" if by_x else "labels"
  V.check_broadcastable("where", where, tokens, jax.ShapeDtypeStruct(batch_shape, bool))
  where = where_mask(where)
  if where.ndim > len(batch_shape) or jnp.broadcast_shapes(where.shape, batch_shape) != batch_shape:
    got = f"got where.shape={where.shape} and "
    target = (
      f"the token shape of `x`, {got}x.shape={x_shape} (tokens {batch_shape})"
      if by_x
      else f"the shape of `labels`, {got}labels.shape={batch_shape}"
    )
    raise ValueError(f"`where` must broadcast to {target}.")
  return where


def _placement(
  x, w, n: int, n_cols: int, vocab_size: int, vd: bool, mesh, data_axis, vocab_axis, student: bool
) -> _Placement:
  """The placement of one call, checked against the shapes (`student`: see `_prepare`)."""
  if mesh is None:
    if student:  # the distillation losses' default axes "data" and "vocab" need a mesh
      data_axis = vocab_axis = None
    elif data_axis is not None or vocab_axis is not None:
      raise ValueError("`data_axis` and `vocab_axis` need a `mesh`.")
    layout = _explicit_layout(x, w, vd)
    if layout is None:
      return _Placement()
    mesh, data_axis, vocab_axis = layout
  data_shards, vocab_shards = _mesh_axes(mesh, data_axis, vocab_axis)
  if n_cols % vocab_shards:
    padded = -(-n_cols // vocab_shards) * vocab_shards
    also = " (and the teacher's head)" if student else ""
    raise ValueError(
      f"The vocabulary of `w` (w.shape={w.shape}, V={n_cols}) is not divisible by "
      f"the {vocab_shards} devices of mesh axis {vocab_axis!r}. Pad `w`{also} with "
      f"{padded - n_cols} zero {'rows' if vd else 'columns'} to V={padded} and pass "
      f"vocab_size={vocab_size}: padding classes are then excluded exactly."
    )
  if n % data_shards:
    tokens = f"`x` (x.shape={x.shape})" if student else f"`labels` (labels.shape={x.shape[:-1]})"
    mask = "`where`" if student else "`where` (or `ignore_index`)"
    raise ValueError(
      f"The {n} tokens of {tokens} are not divisible by the {data_shards} devices of mesh "
      f"axis {data_axis!r}; pad the batch and mask the padding with {mask}."
    )
  return _Placement(mesh, data_axis, vocab_axis, data_shards, vocab_shards)


def _label_status(labels, batch_shape: tuple, vocab_size: int, ignore_index, where):
  """`_core.LabelStatus` of the tokens; without labels every token `where` keeps counts."""
  if labels is not None:
    return _core.label_status(labels, vocab_size, ignore_index=ignore_index, where=where)
  counted = jnp.ones(batch_shape, bool)
  if where is not None:
    counted = counted & jnp.broadcast_to(where.astype(bool), batch_shape)
  return _core.LabelStatus(counted, jnp.zeros(batch_shape, bool), jnp.zeros(batch_shape, jnp.int32))


def _prepare(
  x,
  w,
  labels,
  *,
  ignore_index,
  where,
  w_layout,
  vocab_size,
  mesh=None,
  data_axis=None,
  vocab_axis=None,
  student=False,
) -> _Tokens:
  """Checks the common arguments and flattens the tokens.

  `student=True` for the student's head of a distillation loss: `labels` may
  be None (then every token `where` keeps counts, with index 0), the errors
  name the tokens by `x` and ask to pad the teacher's head too, and the mesh
  axes count only with a `mesh`.
  """
  x, w, vd, n_cols = _check_head("x", x, "w", w, "w_layout", w_layout)
  labels = _check_labels(labels, x, optional=student)
  if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
    raise TypeError(f"`ignore_index` must be a Python int, got {ignore_index!r}.")
  vocab_size = _check_vocab_size(vocab_size, n_cols)
  batch_shape = x.shape[:-1]
  where = _check_where(where, x.shape, by_x=student)
  n = math.prod(batch_shape)
  placement = _placement(x, w, n, n_cols, vocab_size, vd, mesh, data_axis, vocab_axis, student)
  status = _label_status(labels, batch_shape, vocab_size, ignore_index, where)
  status = _core.LabelStatus(*(a.reshape(n) for a in status))
  return _Tokens(
    x.reshape(n, x.shape[-1]),
    w,
    status,
    batch_shape,
    vd,
    n_cols,
    vocab_size,
    V.compute_dtype(x.dtype, w.dtype),
    placement,
  )


def _check_strategy(reduction, strategy, vocab_chunk_size) -> None:
  """The reduction and the strategy of a fused loss ("store" needs a scalar and whole rows)."""
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


def _check_temperature(temperature) -> float:
  t = float(temperature)
  if not t > 0.0 or math.isinf(t):
    raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}.")
  return t


def _check_soft_cap(cap) -> float | None:
  if cap is None:
    return None
  c = float(cap)
  if not c > 0.0 or math.isinf(c):
    raise ValueError(f"`logit_soft_cap` must be None or a finite number > 0, got {cap!r}.")
  return c


def _check_top_k(top_k, vocab_size: int) -> int:
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"`top_k` must be an int >= 0, got {top_k!r}.")
  if top_k > vocab_size:
    raise ValueError(f"`top_k`={top_k} exceeds the vocabulary size V={vocab_size}.")
  return top_k


def _check_vector(name: str, v, size: int, what: str):
  """A float array of shape `[size]` (or None), with an error naming `name`."""
  if v is None:
    return None
  V.check_floating(name, v)
  v = jnp.asarray(v)
  if v.shape != (size,):
    raise ValueError(f"`{name}` must have shape ({size},) ({what}), got {name}.shape={v.shape}.")
  return v


def _check_weights(weights, batch_shape):
  if weights is None:
    return None
  V.check_floating("weights", weights)
  weights = jnp.asarray(weights)
  try:
    ok = jnp.broadcast_shapes(weights.shape, batch_shape) == batch_shape
  except ValueError:
    ok = False
  if not ok or weights.ndim > len(batch_shape):
    raise ValueError(
      f"`weights` must broadcast to the shape of `labels`, got weights.shape={weights.shape} "
      f"and labels.shape={batch_shape}."
    )
  return jnp.broadcast_to(weights, batch_shape)


def _config(
  tok: _Tokens,
  strategy,
  token_chunk_size,
  vocab_chunk_size,
  precision,
  *,
  soft_cap,
  temperature,
  has_bias,
  store_tile=_STORE_TILE,
  top_k=0,
  **stats,
) -> _Config:
  """The engine's `_Config` for `tok`: tile sizes and the statistics `stats` asks for.

  Tile sizes are the user's or automatic (`_auto_chunks`; `store_tile` sizes the
  whole-row tile of strategy "store"); `top_k` is checked against the vocabulary.
  """
  filtered = stats.get("filter_eps") is not None
  pl = tok.where
  tc, vc = _auto_chunks(
    strategy,
    tok.x.shape[0] // pl.data_shards,
    tok.n_cols // pl.vocab_shards,
    _positive_int("token_chunk_size", token_chunk_size),
    _positive_int("vocab_chunk_size", vocab_chunk_size),
    filtered=filtered,
    store_tile=store_tile,
  )
  return _Config(
    num_classes=tok.vocab_size,
    num_columns=tok.n_cols,
    soft_cap=soft_cap,
    vd=tok.vd,
    token_chunk=tc,
    vocab_chunk=vc,
    precision=precision,
    mesh=pl.mesh,
    data_axis=pl.data_axis,
    vocab_axis=pl.vocab_axis,
    temperature=temperature,
    has_bias=has_bias,
    top_k=_check_top_k(top_k, tok.vocab_size),
    **stats,
  )


def _head(
  x,
  w,
  labels,
  *,
  strategy="recompute",
  bias=None,
  logit_soft_cap=None,
  temperature=1.0,
  token_chunk_size=None,
  vocab_chunk_size=None,
  precision=None,
  store_tile=_STORE_TILE,
  stats=None,
  **tokens,
) -> tuple[_Tokens, _Config, Any]:
  """`(tok, cfg, bias)`: the checked tokens, the engine's configuration and the checked bias.

  The one preparation of every fused entry point, from the keywords they share:
  `tokens` are `_prepare`'s, `stats` the statistics `cfg` asks the engine for
  (fields of `_Config`: ``entropy=True``, ``top_k=k``, ...).
  """
  tok = _prepare(x, w, labels, **tokens)
  bias = _check_vector("bias", bias, tok.n_cols, "one per column of `w`")
  cfg = _config(
    tok,
    strategy,
    token_chunk_size,
    vocab_chunk_size,
    precision,
    soft_cap=_check_soft_cap(logit_soft_cap),
    temperature=_check_temperature(temperature),
    has_bias=bias is not None,
    store_tile=store_tile,
    **(stats or {}),
  )
  return tok, cfg, bias


def _placed(args: dict, cfg: _Config) -> dict:
  """`args` in the layout the kernels expect (unchanged on one device)."""
  if cfg.mesh is None:
    return args
  specs = _spec_tree(args, cfg)

  def go(a, s):
    return {k: go(a[k], s[k]) if isinstance(a[k], dict) else place(a[k], cfg.mesh, s[k]) for k in a}

  return go(args, specs)


def _engine_args(tok: _Tokens, bias=None, u=None, **extra) -> dict:
  args = {"x": tok.x, "w": tok.w, "labels": tok.status.index, **extra}
  if bias is not None:
    args["bias"] = bias
  if u is not None:
    args["u"] = u
  return args


def statistics(tok: _Tokens, cfg: _Config, bias=None, u=None) -> dict:
  """The engine's per-token statistics of `tok` (recompute strategy), flattened `[n]`."""
  return _engine(_placed(_engine_args(tok, bias, u), cfg), cfg)


# ----------------------------------------------------------------------------
# The cross-entropy as a composition of statistics.


@dataclasses.dataclass(frozen=True)
class _CELoss:
  """Per-token (weighted, masked) cross-entropy from `Stats` (hashable: static).

  ``coef * [(1-eps) c_y (log_s - zy) + eps (U log_s - zu) + lam lse^2]`` on
  counted tokens, 0 elsewhere; ``c_y`` the class weight of the label (1
  without class weights), ``zu = sum_j u_j (z_j - m)`` with ``u_j = c_j / V``
  and ``U = sum_j u_j`` (1 without class weights). `coef` is NaN on a bad label.
  """

  label_smoothing: float
  z_loss: float
  class_weighted: bool

  def __call__(self, s: Stats, aux: dict):
    eps, lam = self.label_smoothing, self.z_loss
    if not self.class_weighted:
      ell = _core.cross_entropy_from_stats(
        s.log_s, s.zy, s.zu, s.m, label_smoothing=eps, z_loss=lam
      )
    else:
      ell = 0.0
      if eps < 1.0:
        ell = (1.0 - eps) * aux["cwy"] * (s.log_s - s.zy)
      if eps > 0.0:
        ell = ell + eps * (aux["usum"] * s.log_s - s.zu)
      if lam:
        ell = ell + _core.cross_entropy_from_stats(
          jnp.zeros_like(s.log_s),
          jnp.zeros_like(s.zy),
          None,
          s.m + s.log_s,
          label_smoothing=0.0,
          z_loss=lam,
        )
    return jnp.where(aux["counted"], aux["coef"] * ell, 0.0)


def _ce_options(reduction, strategy, vocab_chunk_size, label_smoothing, z_loss, filter_eps):
  """`(eps, lam, filter_eps)`, checked, with the reduction and the strategy."""
  _check_strategy(reduction, strategy, vocab_chunk_size)
  eps = V.check_label_smoothing(label_smoothing)
  lam = V.check_nonnegative("z_loss", z_loss)
  if filter_eps is not None:
    f = float(filter_eps)
    if not 0.0 < f < 1.0:
      raise ValueError(f"`filter_eps` must be None or a number in (0, 1), got {filter_eps!r}.")
    if strategy == "store":
      raise ValueError(
        '`filter_eps` filters the backward pass of strategy="recompute"; strategy="store" has none.'
      )
    if eps:
      raise ValueError(
        "`filter_eps` does not combine with `label_smoothing`: the smoothing "
        "term puts gradient on every column, so no tile could be skipped."
      )
    filter_eps = f
  return eps, lam, filter_eps


def _ce_aux(tok: _Tokens, weights, class_weights, reduction, strategy, eps):
  """Per-token `aux` of `_CELoss` and the mean's denominator (None unless "mean")."""
  st, cdt = tok.status, tok.cdt
  nan_bad = jnp.where(st.bad, jnp.nan, 1.0).astype(cdt)
  w = jnp.ones(st.index.shape, cdt) if weights is None else weights.reshape(-1).astype(cdt)
  coef = jnp.where(st.counted, w, 0.0) * nan_bad
  aux = {"counted": st.counted}
  cwy = None
  if class_weights is not None:
    cwy = jnp.take(class_weights.astype(cdt), st.index) * nan_bad
    aux["cwy"] = cwy
    if eps:
      usum = jnp.sum(class_weights.astype(cdt)) / tok.vocab_size
      aux["usum"] = jnp.broadcast_to(usum, st.index.shape)
  denom = None
  if reduction == "mean":
    denom = jnp.sum(coef if cwy is None else coef * cwy)
    if strategy == "store":
      coef = coef / jnp.where(denom == 0, 1.0, denom)
  aux["coef"] = coef
  return aux, denom


def _column_weights(tok: _Tokens, class_weights, eps):
  """`u` of the statistic `zu`: ``c_j / V`` (1/V without class weights), 0 on padding."""
  if not eps:
    return None
  c = jnp.ones((tok.vocab_size,), tok.cdt) if class_weights is None else class_weights
  u = c.astype(tok.cdt) / tok.vocab_size
  return jnp.pad(u, (0, tok.n_cols - tok.vocab_size))


@takes_head_options()
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
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  logit_soft_cap: float | None = None,
  temperature: float = 1.0,
  bias: jax.typing.ArrayLike | None = None,
  filter_eps: float | None = None,
  return_lse: bool = False,
  strategy: Strategy = "recompute",
  **head: Unpack[HeadOptions],
) -> jax.Array | tuple[jax.Array, jax.Array]:
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

    \ell = (1-\varepsilon)\, c_y\, (\mathrm{lse}(z) - z_y)
           + \frac{\varepsilon}{V} \sum_{j=1}^{V} c_j\,(\mathrm{lse}(z) - z_j)
           + \lambda\, \mathrm{lse}(z)^2,
    \qquad \mathrm{lse}(z) = \log \sum_{j=1}^{V} e^{z_j},

  the cross-entropy against the smoothed target
  :math:`(1-\varepsilon)\,\mathrm{onehot}(y) + \varepsilon/V` with class
  weights :math:`c` (1 by default) plus the PaLM z-loss. With token weights
  :math:`w_i`, ``"sum"`` is :math:`\sum_i w_i \ell_i` and ``"mean"`` is
  :math:`\sum_i w_i \ell_i / \sum_i w_i c_{y_i}` over the tokens that count.
  The loss is ordinary JAX code on per-token statistics of the fused engine
  (``xentjax._fused``), which computes them in tiles of
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
      not class-weighted; no gradient flows into them.
    label_smoothing: :math:`\varepsilon \in [0, 1]`, target
      :math:`(1-\varepsilon)\,y + \varepsilon/V` (PyTorch/Keras convention).
    z_loss: :math:`\lambda \ge 0`, adds :math:`\lambda\,\mathrm{lse}^2` per token.
    logit_soft_cap: :math:`c > 0` caps the logits at :math:`c\tanh(z/c)` before
      the softmax (Gemma 2); the gradient includes its derivative.
    temperature: :math:`T > 0` divides the (capped) logits: the cap belongs
      to the model, the temperature to the distribution taken from it, so
      ``logit_soft_cap=c, temperature=T`` bounds the tempered logits by
      :math:`c/T`.
    bias: optional ``[V]`` output bias (one per column of ``w``), added
      before the cap; its gradient is returned like those of ``x`` and ``w``.
    filter_eps: opt-in gradient filtering (``"recompute"`` only, not with
      ``label_smoothing``). The backward pass skips every tile of
      ``[token_chunk_size, vocab_chunk_size]`` in which every token's largest
      probability on the tile's columns is below ``filter_eps`` and no
      token's label lies (decided from the per-tile row maxima kept by the
      forward pass; a skipped tile is neither recomputed nor multiplied, via
      `lax.cond`). The value is exact; each dropped entry of the logit
      gradient ``g (p_j - [j=y])`` is below ``|g| filter_eps``, so a token's
      logit gradient loses at most ``|g|`` times the probability mass of its
      skipped tiles (L1). Recommended: ``2**-12`` for bfloat16 training (the
      dropped entries are below bfloat16's resolution of the gradient's
      largest entries), ``2**-20`` or smaller for float32. With it the
      automatic tile is 256 tokens x 512 columns: a tile is skipped only if
      all its tokens agree, so tiles are narrow in tokens.
    return_lse: also return the per-token log-normalizer ``lse`` ``[...]``
      (of the capped, tempered logits, for every token including the ones
      that do not count).
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
    in the same dtype. Gradients of ``x``, ``w`` and ``bias`` come back in
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
    * Inside ``jit``, all options except the arrays are static.
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
  # Every argument, by name, to the implementation (`head`: the `HeadOptions`).
  return _linear_softmax_cross_entropy(**by_name(locals()))


def _linear_softmax_cross_entropy(
  x,
  w,
  labels,
  *,
  reduction,
  weights,
  class_weights,
  label_smoothing,
  z_loss,
  filter_eps,
  return_lse,
  strategy,
  vocab_chunk_size,
  **head,
):
  """`linear_softmax_cross_entropy`, its arguments by name (`head`: the keywords of `_head`)."""
  eps, lam, filter_eps = _ce_options(
    reduction, strategy, vocab_chunk_size, label_smoothing, z_loss, filter_eps
  )
  stats = {"weighted_sum": bool(eps), "filter_eps": filter_eps}
  tok, cfg, bias = _head(
    x, w, labels, strategy=strategy, vocab_chunk_size=vocab_chunk_size, stats=stats, **head
  )
  class_weights = _check_vector("class_weights", class_weights, tok.vocab_size, "one per class")
  weights = _check_weights(weights, tok.batch_shape)
  # Weights are data, not parameters: no gradient flows into them.
  weights, class_weights = lax.stop_gradient((weights, class_weights))
  token_loss = _CELoss(eps, lam, class_weights is not None)
  aux, denom = _ce_aux(tok, weights, class_weights, reduction, strategy, eps)
  u = _column_weights(tok, class_weights, eps)
  if strategy == "store":
    loss, lse = _ce_store(tok, cfg, bias, u, aux, token_loss, denom)
  else:
    loss, lse = _ce_recompute(tok, cfg, bias, u, aux, token_loss, denom, reduction)
  if return_lse:
    return loss, lse.reshape(tok.batch_shape)
  return loss


def _ce_store(tok: _Tokens, cfg: _Config, bias, u, aux, token_loss, denom):
  """`(loss, lse)` of strategy "store": the scalar and its gradients in one pass."""
  args = _placed(_engine_args(tok, bias, u, aux=aux), cfg)
  total, lse = _store(args, cfg, token_loss, _store_layout(args))
  loss = total if denom is None else jnp.where(denom == 0, jnp.nan, total)
  return loss, lax.stop_gradient(lse)


def _ce_recompute(tok: _Tokens, cfg: _Config, bias, u, aux, token_loss, denom, reduction):
  """`(loss, lse)` of strategy "recompute": the per-token loss on the engine's statistics."""
  out = statistics(tok, cfg, bias, u)
  s = Stats(lax.stop_gradient(out["m"]), out["log_s"], out["zy"], out.get("zu"), None)
  per_token = token_loss(s, aux)
  lse = s.m + s.log_s
  if reduction == "none":
    return per_token.reshape(tok.batch_shape), lse
  if reduction == "sum":
    return jnp.sum(per_token), lse
  return _core.mean_or_nan(jnp.sum(per_token), denom), lse
