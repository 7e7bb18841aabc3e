"""The tiled sweep, written once: forward passes, recompute backward, store, filtering.

The engine loops over ``[tokens, columns]`` tiles of the logits of a linear
head (`tiles.logit_tile`); a *kernel* (`Kernel`) says what is computed. The
forward pass runs ``kernel.passes`` sweeps over every tile (two where a
quantity needs the log-normalizers first, as the generalized JSD does); each
sweep accumulates the kernel's state, which ``kernel.finish`` combines across
vocabulary shards into per-token rows (and per-column rows) that later
passes, the outputs and the backward pass read. Two strategies:

* ``"recompute"`` (`recompute`): a `jax.custom_vjp` whose forward pass keeps
  the kernel's outputs and a few per-token residuals, and whose backward pass
  recomputes each tile and asks the kernel for its cotangent (vocabulary
  chunks outside, token chunks inside, so each chunk's weight gradient is
  complete when the inner loop ends). Optional gradient filtering skips tiles
  whose probabilities are all below ``filter_eps`` (`keep_tiles`), in the
  column chunks where enough of them can be skipped (`filter_plan`), and
  is the unfiltered backward pass where no chunk is (`with_plan`).
* ``"store"`` (`store`): for a scalar ``sum_i f(outputs_i, aux_i)`` with a
  per-token ``f`` known in advance, one pass over token chunks of whole
  vocabulary rows forms the outputs, ``f``'s gradient (`jax.vjp` of ``f`` on
  each chunk) and every gradient at once; the backward pass only scales them
  (each tile's weight gradient is added in column chunks, `add_dw`, so the
  only weight-sized buffer is the gradient itself). With filtering, only the
  kept filter tiles' products run (`store_filtered`).

Both run on one device or under `jax.shard_map` (`placement.sharded`), with
the kernel's own collectives in ``finish``; the vocabulary is iterated by
`over_vocabulary`: the local chunks, or, on a ring placement, every device's
shard in turn (passed around with `lax.ppermute`). `recompute_logits` runs a
kernel on logits that exist already (one tile per device, no matmul), for
`xentjax.parallel.softmax_cross_entropy_with_integer_labels`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from xentjax._vocab.kernel import Kernel, grads
from xentjax._vocab.placement import (
  Layout,
  Operands,
  anywhere,
  data_sum,
  layout_specs,
  operand_specs,
  place_tree,
  sharded,
  vocab_sum,
)
from xentjax._vocab.tiles import (
  FILTER_MIN_SKIP,
  RECOMPUTE_VOCAB_CHUNK,
  STORE_DW_ELEMENTS,
  TEMPERATURE,
  Tile,
  Tiling,
  column_offset,
  cotangent,
  dot_dw,
  dot_dx,
  fold,
  given_tile,
  head_chunk,
  logit_tile,
  put_rows,
  repeat,
  rows_of,
  traced_temperature,
)


def n_columns(ops: Operands, tiling: Tiling) -> int:
  return ops.w.shape[0 if tiling.vd else 1]


def column_side(ops: Operands) -> dict:
  """The head's columns ``w`` (and ``bias``, ``teacher_w``, ``teacher_bias``) and ``cols``."""
  heads = {"w": ops.w, "bias": ops.bias, "teacher_w": ops.teacher_w}
  heads["teacher_bias"] = ops.teacher_bias
  return {**{k: a for k, a in heads.items() if a is not None}, "cols": ops.cols}


def vocabulary_shard(ops: Operands, tiling: Tiling, **state) -> dict:
  """The vocabulary side of a sweep: what a ring placement passes around.

  The head's columns ``w`` (and ``bias``, ``teacher_w``, ``teacher_bias``), the per-column
  operands ``cols``, the global index of the first column ``offset``, and
  the per-column ``state`` (the kernel's, or the gradients of ``w``).
  """
  offset = column_offset(tiling, n_columns(ops, tiling))
  return {**column_side(ops), "offset": offset, **state}


def over_vocabulary(body, carry, shard: dict, n_cols: int, tiling: Tiling):
  """`(carry, shard) = body((carry, shard), v0, vsize)` over every column this device sees.

  On one device, or with the vocabulary sharded over ``vocab_axis``: the
  chunks of the local shard (`tiles.fold`). With a ring placement (the
  columns sharded over the data axis like the tokens): one round per device
  of the axis, after each of which the shard -- its columns, operands and
  per-column state -- moves one device on (`lax.ppermute`); after the last
  round only the per-column state moves, which brings it home complete.
  """
  pl = tiling.placement

  def local(pair):
    return fold(n_cols, tiling.vocab_chunk, body, pair)

  if not pl.ring or pl.data_shards == 1:
    return local((carry, shard))
  perm = [(i, (i + 1) % pl.data_shards) for i in range(pl.data_shards)]

  def move(shard, keys):
    return {**shard, **lax.ppermute({k: shard[k] for k in keys}, pl.data_axis, perm)}

  def round_(pair, _, __):
    carry, shard = local(pair)
    return carry, move(shard, tuple(shard))

  carry, shard = fold(pl.data_shards - 1, 1, round_, (carry, shard))
  carry, shard = local((carry, shard))
  return carry, move(shard, ("state",))


def chunk_heads(ops: Operands, shard: dict, v0, vsize, tiling: Tiling) -> dict:
  """The heads' columns `[v0, v0 + vsize)` of the shard: what `tiles.logit_tile` multiplies.

  With a column order (``cols["order"]``, from ``vocab_order=``), sweep
  column ``k`` is column ``order[k]`` of the heads: the chunk's columns are
  gathered (a chunk at a time, so no permuted copy of ``w`` is ever held).
  """
  order = shard["cols"].get("order")
  idx = None if order is None else lax.dynamic_slice_in_dim(order, v0, vsize, 0)

  def columns(a, vd):
    return head_chunk(a, v0, vsize, vd) if idx is None else jnp.take(a, idx, axis=0 if vd else 1)

  heads = {"x": ops.x, "w_c": columns(shard["w"], tiling.vd)}
  if "bias" in shard:
    heads["bias_c"] = columns(shard["bias"], True)
  if ops.teacher_x is not None:
    heads["teacher_x"] = ops.teacher_x
    heads["teacher_w_c"] = columns(shard["teacher_w"], tiling.teacher_vd)
    if "teacher_bias" in shard:
      heads["teacher_bias_c"] = columns(shard["teacher_bias"], True)
  return heads


def in_caller_order(grad, cols: dict, axis: int):
  """A gradient over the sweep's columns, back in the heads' own order (a gather)."""
  return grad if "inverse" not in cols else jnp.take(grad, cols["inverse"], axis=axis)


def sweep(update, state, ops: Operands, tiling: Tiling, cdt):
  """`state = update(state_tile, tile, rows_tile)` over every tile of this device.

  Vocabulary chunks outside (`over_vocabulary`), token chunks inside. `state`
  is the pair (per-token dict, per-column dict); the per-column state of a
  chunk is carried through its token loop.
  """
  n, n_cols = ops.x.shape[0], n_columns(ops, tiling)
  rows = ops.rows
  tok, col = state

  def vocab_body(pair, v0, vsize):
    tok, shard = pair
    heads = chunk_heads(ops, shard, v0, vsize, tiling)
    cols_c = rows_of(shard["cols"], v0, vsize)

    def token_body(carry, t0, tsize):
      tok, col_c = carry
      r = rows_of(rows, t0, tsize)
      tile = logit_tile(heads, t0, tsize, shard["offset"] + v0, v0, r, cols_c, tiling, cdt)
      new, col_c = update((rows_of(tok, t0, tsize), col_c), tile, r)
      return put_rows(tok, new, t0), col_c

    col_c = rows_of(shard["state"], v0, vsize)
    tok, col_c = fold(n, tiling.token_chunk, token_body, (tok, col_c))
    return tok, {**shard, "state": put_rows(shard["state"], col_c, v0)}

  tok, shard = over_vocabulary(
    vocab_body, tok, vocabulary_shard(ops, tiling, state=col), n_cols, tiling
  )
  return tok, shard["state"]


def forward_local(ops: Operands, kernel: Kernel, tiling: Tiling) -> dict:
  """Every pass of `kernel` over this device's tiles: the rows (and columns) it finished into."""
  cdt = tiling.cdt
  n, n_cols = ops.x.shape[0], n_columns(ops, tiling)
  rows, cols = dict(ops.rows), dict(ops.cols)
  for p in range(kernel.passes):
    state = kernel.init(p, n, n_cols, tiling, cdt)
    now = dataclasses.replace(ops, rows=rows, cols=cols)
    state = sweep(functools.partial(kernel.update, p), state, now, tiling, cdt)
    new_rows, new_cols = kernel.finish(p, state, rows, tiling)
    rows.update(new_rows)
    cols.update(new_cols)
  out = {k: rows[k] for k in (*kernel.outputs, *kernel.saved)}
  return {**out, "cols": {k: cols[k] for k in (*kernel.column_outputs, *kernel.column_saved)}}


# ----------------------------------------------------------------------------
# Strategy "recompute": the kernel's outputs with a custom VJP.


def keep_tiles(rows: dict, n_cols: int, kernel: Kernel, tiling: Tiling):
  """`[token tiles, vocabulary tiles]` bool: the filter tiles gradient filtering keeps.

  A tile (``tiling.filter_token_chunk`` tokens x ``tiling.filter_vocab_chunk``
  columns) is skipped when, for every token in it whose outputs carry a
  cotangent, the largest probability on the tile's columns (from the
  maxima per filter tile of columns ``rows["tmax"]``, which the kernel
  records on its way to each row's maximum) is below ``filter_eps``, and no such token's
  label lies in it (so the one-hot term of the gradient is never dropped).
  """
  tc, vc, eps = tiling.filter_token_chunk, tiling.filter_vocab_chunk, tiling.filter_eps
  assert tc is not None and vc is not None and eps is not None  # filtering is on
  logp, labels, label_live = kernel.filter_terms(rows)
  n = logp.shape[0]
  n_tt, n_vt = -(-n // tc), -(-n_cols // vc)
  logp = jnp.pad(logp, ((0, n_tt * tc - n), (0, 0)), constant_values=-jnp.inf)
  keep = jnp.max(logp.reshape(n_tt, tc, n_vt), axis=1) >= math.log(eps)
  local = labels - column_offset(tiling, n_cols)
  hit = label_live & (local >= 0) & (local < n_cols)
  tt = jnp.arange(n) // tc
  vt = jnp.where(hit, local, 0) // vc
  return keep.astype(jnp.int32).at[tt, vt].max(hit.astype(jnp.int32)) > 0


def filter_plan(rows: dict, n_cols: int, kernel: Kernel, tiling: Tiling):
  """`(keep, filtered)`: the filter tiles to keep, and the column chunks worth filtering.

  ``keep`` is `keep_tiles`; ``filtered`` (``[vocabulary tiles]`` bool) marks
  the column chunks in which at least `tiles.FILTER_MIN_SKIP` of the tiles
  can be skipped. The backward pass runs the other chunks unfiltered, so
  filtering costs no more than the per-tile tests of the chunks it thins.
  None without filtering.
  """
  if tiling.filter_eps is None:
    return None
  keep = keep_tiles(rows, n_cols, kernel, tiling)
  skipped = 1.0 - jnp.mean(keep.astype(jnp.float32), axis=0)
  return keep, skipped >= FILTER_MIN_SKIP


def token_loop(tile_grads, carry, n: int, v0, plan, tiling: Tiling):
  """`carry = tile_grads(carry, t0, tsize)` over the tokens of one column chunk.

  ``carry`` is ``(dx, dw_c, db_c, dt)``: the per-token gradients (``dx``
  ``[n, D]``, ``dt`` ``[n]`` or None) and the chunk's. Without filtering
  (``plan`` None) or in a chunk not worth filtering: wide token chunks, every
  tile. In a chunk worth filtering: the kept filter tiles only (neither
  recomputed nor multiplied otherwise), their indices compacted so that a
  loop of that many steps runs. Each choice is a loop whose length is
  decided at run time: a `lax.cond` would copy what its branches pass
  through (``dx``, once per chunk), so only a partial last tile goes through
  one, with the tile's rows alone (`tile_cond`).
  """
  tc = tiling.token_chunk
  if plan is None:
    return fold(n, tc, tile_grads, carry)
  keep, filtered = plan
  ftc, chunk = tiling.filter_token_chunk, v0 // tiling.vocab_chunk
  assert ftc is not None  # a filtering plan exists
  thin = filtered[chunk]
  n_wide, wide_tail = divmod(n, tc)
  wide = lambda i, c: tile_grads(c, i * tc, tc, tie=tc == n)
  carry = repeat(jnp.where(thin, 0, n_wide), wide, carry)
  if wide_tail:
    carry = tile_cond(~thin, tile_grads, carry, n_wide * tc, wide_tail)
  n_tiles, tail = divmod(n, ftc)
  kept = keep[:n_tiles, chunk]
  index = jnp.nonzero(kept, size=n_tiles, fill_value=0)[0]
  tile = lambda i, c: tile_grads(c, index[i] * ftc, ftc, tie=ftc == n)
  carry = repeat(jnp.where(thin, jnp.sum(kept), 0), tile, carry)
  if tail:
    carry = tile_cond(thin & keep[n_tiles, chunk], tile_grads, carry, n_tiles * ftc, tail)
  return carry


def tile_cond(pred, tile_grads, carry, t0: int, tsize: int):
  """`tile_grads` on the tile at `t0` if `pred`, through a `lax.cond` that sees only its rows."""
  dx, dw_c, db_c, dt = carry
  local = (rows_of(dx, t0, tsize), dw_c, db_c, None if dt is None else rows_of(dt, t0, tsize))
  grads = lambda s: tile_grads(s, t0, tsize, local=True)
  dx_t, dw_c, db_c, dt_t = lax.cond(pred, grads, lambda s: s, local)
  dt = None if dt is None else put_rows(dt, dt_t, t0)
  return put_rows(dx, dx_t, t0), dw_c, db_c, dt


def backward_local(a: Operands, kernel: Kernel, tiling: Tiling) -> dict:
  """Gradients of `x`, `w`, `bias` and a traced temperature from the rows of `a`.

  Vocabulary chunks outside, token chunks inside, so the weight gradient of a
  chunk is complete (and summed over data shards) when the inner loop ends.
  For the "dv" layout `x` is transposed once, to `[D, N]` in the inputs'
  dtype, so that every weight-gradient matmul is an ordinary one (see
  `tiles.dot_dw`; about 4% of the fwd+bwd time on CPU, for one more
  `x`-sized buffer).
  """
  x, w, bias, rows = a.x, a.w, a.bias, a.rows
  cdt = tiling.cdt
  op_dt = jnp.result_type(x.dtype, w.dtype)
  n, n_cols = x.shape[0], n_columns(a, tiling)
  plan = filter_plan(rows, n_cols, kernel, tiling)
  xT = None if tiling.vd else x.astype(op_dt).T
  reduce_w = not tiling.placement.ring  # on a ring each shard collects its gradient itself

  def vocab_body(pair, v0, vsize, plan, tiling):
    (dx, dt), shard = pair
    heads = chunk_heads(a, shard, v0, vsize, tiling)
    cols_c = rows_of(shard["cols"], v0, vsize)

    def tile_grads(carry, t0, tsize, local=False, tie=False):
      """The carry after tile `t0`; with `local`, its per-token parts are the tile's rows.

      `tie`: the tile's inputs are tied to the carry. In a loop of a length
      decided at run time (`token_loop`), XLA would otherwise hoist a tile as
      tall as all the tokens (its slices are the whole arrays) out of the loop,
      and always run it.
      """
      dx, dw_c, db_c, dt = carry
      x_, xT_ = x, xT
      if tie:
        x_, xT_, dx = lax.optimization_barrier((x, xT, dx))
      r = rows_of(rows, t0, tsize)
      h = {**heads, "x": x_}
      tile = logit_tile(h, t0, tsize, shard["offset"] + v0, None, r, cols_c, tiling, cdt)
      dz, dt_t = cotangent(kernel.cotangent(tile, r), tile, tiling)
      at = 0 if local else t0
      dx_t = lax.dynamic_slice_in_dim(dx, at, tsize, 0) + dot_dx(
        dz, heads["w_c"], op_dt, tiling, cdt
      )
      xT_t = None if xT_ is None else lax.dynamic_slice_in_dim(xT_, t0, tsize, 1)
      dw_c = dw_c + dot_dw(tile_x(x_, t0, tsize), dz, op_dt, tiling, cdt, xT_t)
      db_c = None if db_c is None else db_c + jnp.sum(dz, axis=0)
      dt = None if dt is None else put_rows(dt, rows_of(dt, at, tsize) + dt_t, at)
      return lax.dynamic_update_slice_in_dim(dx, dx_t, at, 0), dw_c, db_c, dt

    dw, db = shard["state"]["dw"], shard["state"].get("db")
    axis = 0 if tiling.vd else 1
    dw_c, db_c = chunk_grads(dw, db, v0, vsize, x.shape[1], reduce_w, tiling, cdt)
    dx, dw_c, db_c, dt = token_loop(tile_grads, (dx, dw_c, db_c, dt), n, v0, plan, tiling)
    if reduce_w:  # tokens of other data shards, in float32
      dw_c, db_c = data_sum((dw_c, db_c), tiling.placement)
    state = {"dw": lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), v0, axis)}
    if db is not None:
      state["db"] = lax.dynamic_update_slice_in_dim(db, db_c.astype(db.dtype), v0, 0)
    return (dx, dt), {**shard, "state": state}

  def sweep_grads(plan, tiling):
    dt = None if traced_temperature(rows) is None else jnp.zeros((n,), cdt)
    grads = {"dw": jnp.zeros(w.shape, w.dtype if reduce_w else cdt)}
    if bias is not None:
      grads["db"] = jnp.zeros(bias.shape, bias.dtype if reduce_w else cdt)
    shard = vocabulary_shard(a, tiling, state=grads)
    body = functools.partial(vocab_body, plan=plan, tiling=tiling)
    (dx, dt), shard = over_vocabulary(body, (jnp.zeros(x.shape, cdt), dt), shard, n_cols, tiling)
    return dx, dt, shard["state"]

  dx, dt, g = with_plan(sweep_grads, plan, tiling)
  dx, dt = vocab_sum((dx, dt), tiling.placement)  # each shard saw part of the vocabulary
  cols = a.cols
  db = None if bias is None else in_caller_order(g["db"], cols, 0).astype(bias.dtype)
  dw = in_caller_order(g["dw"], cols, 0 if tiling.vd else 1).astype(w.dtype)
  return {"dx": dx.astype(x.dtype), "dw": dw, "db": db, "dtemperature": dt}


def with_plan(run, plan, tiling: Tiling):
  """`run(plan, tiling)` of the backward pass, filtered or not.

  Without filtering, `run(None, tiling)`. With it, the filtered sweep runs
  on column chunks as wide as the filter tiles; where no chunk (on any
  device) is worth filtering, `run(None, tiling)` instead: the unfiltered
  program itself, on the forward pass's wider chunks. The choice is one
  `lax.cond` whose branches both compute their outputs (nothing passes
  through to copy).
  """
  if plan is None:
    return run(None, tiling)
  worth = anywhere(jnp.any(plan[1]), tiling.placement)
  assert tiling.filter_vocab_chunk is not None  # a filtering plan exists
  thin = dataclasses.replace(tiling, vocab_chunk=tiling.filter_vocab_chunk)
  return lax.cond(worth, lambda: run(plan, thin), lambda: run(None, tiling))


def chunk_grads(dw, db, v0, vsize, d: int, reduce_w: bool, tiling: Tiling, cdt):
  """`(dw_c, db_c)` at the start of a column chunk's token loop.

  Zeros when each chunk's gradient is complete after its loop (`reduce_w`);
  on a ring, the shard's gradient so far, which travels with it (in the
  compute dtype).
  """
  if reduce_w:
    dw_c = jnp.zeros((vsize, d) if tiling.vd else (d, vsize), cdt)
    return dw_c, None if db is None else jnp.zeros((vsize,), cdt)
  dw_c = lax.dynamic_slice_in_dim(dw, v0, vsize, 0 if tiling.vd else 1)
  return dw_c, None if db is None else lax.dynamic_slice_in_dim(db, v0, vsize, 0)


def tile_x(x, t0, tsize):
  return lax.dynamic_slice_in_dim(x, t0, tsize, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def recompute(ops: Operands, kernel: Kernel, tiling: Tiling) -> dict:
  """`{name: [n, ...]}`: the kernel's outputs over every tile (strategy "recompute").

  `ops` (`Operands`) holds ``x`` ``[n, D]``, ``w``, optionally ``bias``,
  ``teacher_x``, ``teacher_w`` and ``teacher_bias`` (a constant), ``rows``
  (per-token operands, ``temperature`` among them when it is traced) and
  ``cols`` (per-column operands). Gradients flow to ``x``, ``w``, ``bias``
  and ``rows[TEMPERATURE]``. The per-column outputs, if the
  kernel has any, are under ``"cols"``.
  """
  return recompute_fwd(ops, kernel, tiling)[0]


def specs_of(tiling: Tiling) -> Layout:
  return layout_specs(tiling.placement, tiling.vd, tiling.teacher_vd)


def sweep_specs(ops: Operands, kernel: Kernel, tiling: Tiling) -> tuple:
  """The specs of a sweep's operands (with the kernel's rows as it sees them)."""
  pl, tile_rows = tiling.placement, kernel.tile_saved
  return (operand_specs(ops, pl, tiling.vd, tiling.teacher_vd, tile_rows),)


def row_specs(names, kernel: Kernel, s: Layout) -> dict:
  """Per-token rows: ``[tokens, ...]``, or ``[tokens, vocabulary tiles]`` (``tile_saved``)."""
  return {k: s.tile if k in kernel.tile_saved else s.tokens for k in names}


def recompute_fwd(ops: Operands, kernel: Kernel, tiling: Tiling):
  s = specs_of(tiling)
  out_specs = row_specs((*kernel.outputs, *kernel.saved), kernel, s)
  out_specs["cols"] = dict.fromkeys((*kernel.column_outputs, *kernel.column_saved), s.cols)
  fwd = sharded(
    functools.partial(forward_local, kernel=kernel, tiling=tiling),
    tiling.placement,
    sweep_specs(ops, kernel, tiling),
    out_specs,
  )
  out = fwd(ops)
  outputs = {k: out[k] for k in kernel.outputs}
  if kernel.column_outputs:
    outputs["cols"] = {k: out["cols"][k] for k in kernel.column_outputs}
  saved = {k: out[k] for k in kernel.saved}
  return outputs, (ops, saved, {k: out["cols"][k] for k in kernel.column_saved})


def recompute_bwd(kernel: Kernel, tiling: Tiling, res, cts: dict):
  ops, saved, col_saved = res
  cdt = tiling.cdt
  g = grads(kernel.differentiable, cts, cdt)
  g_cols = grads(kernel.column_differentiable, cts.get("cols", {}), cdt)
  a = ops.with_rows(**saved, **g).with_cols(**col_saved, **g_cols)
  s = specs_of(tiling)
  bwd = sharded(
    functools.partial(backward_local, kernel=kernel, tiling=tiling),
    tiling.placement,
    sweep_specs(a, kernel, tiling),
    {"dx": s.x, "dw": s.w, "db": s.cols, "dtemperature": s.tokens},
  )
  return (cotangents_of(ops, bwd(a)),)


def cotangents_of(ops: Operands, grads: dict) -> Operands:
  """The cotangent tree of `ops`: the gradients in `grads`, None for constants."""
  ct = jax.tree.map(lambda _: None, ops)
  bias = None if ops.bias is None else grads["db"]
  ct = dataclasses.replace(ct, x=grads["dx"], w=grads["dw"], bias=bias)
  t = traced_temperature(ops.rows)
  if t is not None:
    ct = ct.with_rows(**{TEMPERATURE: grads["dtemperature"].astype(t.dtype)})
  return ct


recompute.defvjp(recompute_fwd, recompute_bwd)


def run_recompute(ops: Operands, kernel: Kernel, tiling: Tiling) -> dict:
  """`recompute` on `ops` placed in the layout the sweep expects."""
  return recompute(place_tree(ops, tiling.placement, tiling.vd, tiling.teacher_vd), kernel, tiling)


# ----------------------------------------------------------------------------
# Logits given as they are, sharded over the vocabulary: one tile per device.


def logits_forward_local(logits, rows: dict, kernel: Kernel, tiling: Tiling) -> dict:
  tile = given_tile(logits.astype(tiling.cdt), tiling)
  rows = finish_tile(kernel, tile, rows, tiling, tile.a.dtype)
  return {k: rows[k] for k in (*kernel.outputs, *kernel.saved)}


def logits_backward_local(logits, rows: dict, kernel: Kernel, tiling: Tiling):
  tile = given_tile(logits.astype(tiling.cdt), tiling)
  return kernel.cotangent(tile, rows)["a"].astype(logits.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def recompute_logits(logits, rows: dict, kernel: Kernel, tiling: Tiling) -> dict:
  """The kernel's outputs for logits `[n, V]` that exist already (`xentjax.parallel`).

  No matmul and no loop: each device's vocabulary shard is one tile; the
  kernel's ``finish`` combines the shards, and the backward pass forms the
  logits' cotangent shard by shard (gradients flow to ``logits`` only).
  """
  return recompute_logits_fwd(logits, rows, kernel, tiling)[0]


def recompute_logits_fwd(logits, rows: dict, kernel: Kernel, tiling: Tiling):
  s = specs_of(tiling)
  fwd = sharded(
    functools.partial(logits_forward_local, kernel=kernel, tiling=tiling),
    tiling.placement,
    (s.tile, row_specs(rows, kernel, s)),
    row_specs((*kernel.outputs, *kernel.saved), kernel, s),
  )
  out = fwd(logits, rows)
  return {k: out[k] for k in kernel.outputs}, (logits, rows, {k: out[k] for k in kernel.saved})


def recompute_logits_bwd(kernel: Kernel, tiling: Tiling, res, cts: dict):
  logits, rows, saved = res
  g = grads(kernel.differentiable, cts, tiling.cdt)
  a = {**rows, **saved, **g}
  s = specs_of(tiling)
  bwd = sharded(
    functools.partial(logits_backward_local, kernel=kernel, tiling=tiling),
    tiling.placement,
    (s.tile, row_specs(a, kernel, s)),
    s.tile,
  )
  return bwd(logits, a), jax.tree.map(lambda _: None, rows)


recompute_logits.defvjp(recompute_logits_fwd, recompute_logits_bwd)


# ----------------------------------------------------------------------------
# Strategy "store": a scalar sum_i f(outputs_i, aux_i) and its gradients in one pass.


def finish_tile(kernel: Kernel, tile: Tile, rows: dict, tiling: Tiling, cdt) -> dict:
  """Every pass of `kernel` over one whole-row tile: the rows it finished into."""
  rows = dict(rows)
  n = tile.a.shape[0]
  for p in range(kernel.passes):
    state = kernel.init(p, n, tile.a.shape[1], tiling, cdt)
    state = kernel.update(p, state, tile, rows)
    rows.update(kernel.finish(p, state, rows, tiling)[0])
  return rows


def store_tile_grads(kernel: Kernel, token_loss, tile: Tile, rows: dict, aux: dict, tiling, cdt):
  """`(loss rows, finished rows, d_raw, d_temperature, d_aux)` of one whole-row tile."""
  rows = finish_tile(kernel, tile, rows, tiling, cdt)
  outs = {k: rows[k] for k in kernel.outputs if jnp.issubdtype(rows[k].dtype, jnp.floating)}
  wrt = {k: aux[k] for k in token_loss.differentiable}
  loss, vjp = jax.vjp(lambda o, d: token_loss(o, {**aux, **d}), outs, wrt)
  g_out, g_aux = vjp(jnp.ones_like(loss))
  g = grads(kernel.differentiable, g_out)
  rows = {**rows, **g}
  dz, dt = cotangent(kernel.cotangent(tile, rows), tile, tiling)
  return loss, rows, dz, dt, g_aux


def store_local(a: Operands, kernel: Kernel, tiling: Tiling, token_loss, keep: tuple) -> dict:
  """`total = sum_i f(outputs_i, aux_i)`, the rows in `keep`, and every gradient of `total`."""
  x, w, bias, rows, aux = a.x, a.w, a.bias, a.rows, a.aux
  cdt = tiling.cdt
  op_dt = jnp.result_type(x.dtype, w.dtype)
  n, n_cols = x.shape[0], w.shape[0 if tiling.vd else 1]
  heads = chunk_heads(a, column_side(a), 0, n_cols, tiling)
  offset = column_offset(tiling, n_cols)
  xT = None if tiling.vd else x.astype(op_dt).T  # as in the recompute backward pass

  def token_body(carry, t0, tsize):
    total, kept, dx, dw, db, d_rows = carry
    r, aux_t = rows_of(rows, t0, tsize), rows_of(aux, t0, tsize)
    tile = logit_tile(heads, t0, tsize, offset, 0, r, a.cols, tiling, cdt)
    loss, r, dz, dt, g_aux = store_tile_grads(kernel, token_loss, tile, r, aux_t, tiling, cdt)
    if dt is not None:
      g_aux = {**g_aux, TEMPERATURE: g_aux.get(TEMPERATURE, 0.0) + dt}
    xT_t = None if xT is None else lax.dynamic_slice_in_dim(xT, t0, tsize, 1)
    x_t, w_c = tile_x(x, t0, tsize), heads["w_c"]
    if tiling.filter_eps is None:
      dx_t, dw = dot_dx(dz, w_c, op_dt, tiling, cdt), add_dw(dw, x_t, dz, op_dt, tiling, cdt, xT_t)
    else:
      keep_t = keep_tiles(r, n_cols, kernel, tiling)  # from the tile's own per-chunk maxima
      dx_t, dw = store_filtered(keep_t, dz, w_c, x_t, xT_t, dw, op_dt, tiling, cdt)
    return (
      total + jnp.sum(loss),
      put_rows(kept, {k: r[k] for k in keep}, t0),
      lax.dynamic_update_slice_in_dim(dx, dx_t, t0, 0),
      dw,
      None if db is None else db + jnp.sum(dz, axis=0),
      put_rows(d_rows, {k: g_aux[k].astype(cdt) for k in d_rows}, t0),
    )

  d_names = store_gradient_names(a, token_loss)
  init = (
    jnp.zeros((), cdt),
    {k: jnp.zeros((n,), jnp.int32 if k in kernel.integer_outputs else cdt) for k in keep},
    jnp.zeros(x.shape, cdt),
    jnp.zeros(w.shape, cdt),
    None if bias is None else jnp.zeros(bias.shape, cdt),
    {k: jnp.zeros((n, *(aux[k] if k in aux else rows[k]).shape[1:]), cdt) for k in d_names},
  )
  total, kept, dx, dw, db, d_rows = fold(n, tiling.token_chunk, token_body, init)
  dx = vocab_sum(dx, tiling.placement)
  total, dw, db = data_sum((total, dw, db), tiling.placement)
  dw = in_caller_order(dw, a.cols, 0 if tiling.vd else 1)
  db = None if db is None else in_caller_order(db, a.cols, 0)
  return {"total": total, "rows": kept, "dx": dx, "dw": dw, "dbias": db, "d_rows": d_rows}


def store_filtered(keep, dz, w_c, x_t, xT_t, dw, op_dt, tiling: Tiling, cdt):
  """`(dz @ w_c^T, dw + x_t^T dz)` for a whole-row tile, filtered.

  Over the whole filter tiles (``filter_token_chunk`` rows x
  ``filter_vocab_chunk`` columns): where at least `tiles.FILTER_MIN_SKIP` of
  them can be skipped, the kept ones only, their indices compacted so that a
  loop of that many steps runs and nothing is tested per tile: first the
  columns of tiles that every token tile keeps, each as one product over
  all the rows (taller products run faster: on CPU, tiles of 256 x 256 took
  about 1.4x the time of 512 x 256 for the same products), then the other
  kept tiles one by one. Otherwise one product for ``dx`` and wide column
  blocks for ``dw``, as unfiltered.
  Then the partial tiles at the edges, unfiltered. The choice for ``dw`` is
  made by loops whose length is decided at run time (`tiles.repeat`): a
  `lax.cond` would copy ``dw`` (as large as ``w``) through its branches.
  ``dx`` comes out of a `lax.cond` as a fresh output (nothing to copy).
  """
  ftc, vc, vd = tiling.filter_token_chunk, tiling.filter_vocab_chunk, tiling.vd
  assert ftc is not None and vc is not None  # a filtering plan exists
  (n, n_cols), axis = dz.shape, 0 if vd else 1
  n_tt, n_vt = n // ftc, n_cols // vc  # the whole filter tiles
  rows, cols = n_tt * ftc, n_vt * vc

  def products(c, t0, tsize, v0, vsize):
    """`c` plus the products of rows `[t0, t0 + tsize)` and columns `[v0, v0 + vsize)`."""
    dx_t, dw = c
    dz_s = lax.dynamic_slice(dz, (t0, v0), (tsize, vsize))
    dx_s = rows_of(dx_t, t0, tsize) + dot_dx(
      dz_s, head_chunk(w_c, v0, vsize, vd), op_dt, tiling, cdt
    )
    xT_s = None if xT_t is None else lax.dynamic_slice_in_dim(xT_t, t0, tsize, 1)
    dw_s = lax.dynamic_slice_in_dim(dw, v0, vsize, axis)
    dw_s = dw_s + dot_dw(tile_x(x_t, t0, tsize), dz_s, op_dt, tiling, cdt, xT_s)
    return put_rows(dx_t, dx_s, t0), lax.dynamic_update_slice_in_dim(dw, dw_s, v0, axis)

  worth = (1.0 - jnp.mean(keep.astype(jnp.float32))) >= FILTER_MIN_SKIP
  kept = keep[:n_tt, :n_vt]
  whole = jnp.all(kept, axis=0)  # columns kept by every token tile: one product each
  column_index = jnp.nonzero(whole, size=n_vt, fill_value=0)[0]
  kept = (kept & ~whole[None, :]).reshape(-1)
  index = jnp.nonzero(kept, size=kept.size, fill_value=0)[0]

  def column(i, c):
    return products(c, 0, rows, column_index[i] * vc, vc)

  def tile(i, c):
    tt, vt = jnp.divmod(index[i], n_vt)
    return products(c, tt * ftc, ftc, vt * vc, vc)

  # Unfiltered: `dx` in one product (a fresh output of the cond: nothing is
  # copied), `dw` in blocks of whole filter chunks, as wide as `add_dw`'s (a
  # divisor of n_vt).
  per_block = max(1, STORE_DW_ELEMENTS // (vc * max(x_t.shape[1], 1)))
  per_block = max(k for k in range(1, min(per_block, max(n_vt, 1)) + 1) if n_vt % k == 0)
  width = per_block * vc

  def block(i, dw):
    dz_s = lax.dynamic_slice(dz, (0, i * width), (rows, width))
    xT_s = None if xT_t is None else xT_t[:, :rows]
    part = dot_dw(x_t[:rows], dz_s, op_dt, tiling, cdt, xT_s)
    part = lax.dynamic_slice_in_dim(dw, i * width, width, axis) + part
    return lax.dynamic_update_slice_in_dim(dw, part, i * width, axis)

  def dense_dx(_):
    return (
      jnp.zeros((n, x_t.shape[1]), cdt)
      .at[:rows]
      .set(dot_dx(dz[:rows, :cols], head_chunk(w_c, 0, cols, vd), op_dt, tiling, cdt))
    )

  c = (jnp.zeros((n, x_t.shape[1]), cdt), dw)
  if rows and cols:
    dx_t = lax.cond(worth, lambda _: c[0], dense_dx, None)
    c = (dx_t, repeat(jnp.where(worth, 0, n_vt // per_block), block, dw))
    c = repeat(jnp.where(worth, jnp.sum(whole), 0), column, c)
    c = repeat(jnp.where(worth, jnp.sum(kept), 0), tile, c)
  if rows < n and cols:  # the last rows
    c = products(c, rows, n - rows, 0, cols)
  if cols < n_cols:  # the last columns
    c = products(c, 0, n, cols, n_cols - cols)
  return c


def add_dw(dw, x_t, dz, op_dt, tiling: Tiling, cdt, xT_t=None):
  """`dw + x_t^T dz` for a whole-row tile `dz`, in column chunks of `tiles.STORE_DW_ELEMENTS`.

  The product of a whole-row tile is as large as `w`; added chunk by chunk,
  only a chunk of it exists at a time (on CPU XLA does not accumulate a
  matmul into its addend, so one product would cost a `w`-sized buffer).
  """
  axis = 0 if tiling.vd else 1
  chunk = max(RECOMPUTE_VOCAB_CHUNK, STORE_DW_ELEMENTS // x_t.shape[1])

  def body(dw, v0, vsize):
    part = dot_dw(x_t, lax.dynamic_slice_in_dim(dz, v0, vsize, 1), op_dt, tiling, cdt, xT_t)
    part = lax.dynamic_slice_in_dim(dw, v0, vsize, axis) + part
    return lax.dynamic_update_slice_in_dim(dw, part, v0, axis)

  return fold(dz.shape[1], chunk, body, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def store(ops: Operands, kernel: Kernel, tiling: Tiling, token_loss, keep: tuple, layout: tuple):
  """`(sum_i token_loss(outputs_i, aux_i), {name: rows for name in keep})` (strategy "store").

  `ops` is `recompute`'s plus ``aux``, the per-token operands of
  ``token_loss``; the entries of ``aux`` named in ``token_loss.differentiable``
  get gradients, as do ``x``, ``w``, ``bias`` and a traced temperature. The
  rows in `keep` carry no gradient. `layout` (static, from `run_store`): the
  tree of `ops` and the dtypes of its differentiable leaves.
  """
  return store_fwd(ops, kernel, tiling, token_loss, keep, layout)[0]


def store_gradient_names(ops: Operands, token_loss) -> tuple:
  """The per-token operands whose gradients the store pass accumulates."""
  return tuple(
    dict.fromkeys(
      (*token_loss.differentiable, *[TEMPERATURE] * (traced_temperature(ops.rows) is not None))
    )
  )


def store_fwd(
  ops: Operands, kernel: Kernel, tiling: Tiling, token_loss, keep: tuple, layout: tuple
):
  del layout
  s = specs_of(tiling)
  out_specs = {"total": s.scalar, "rows": dict.fromkeys(keep, s.tokens), "dx": s.x, "dw": s.w}
  out_specs["dbias"] = s.cols
  out_specs["d_rows"] = dict.fromkeys(store_gradient_names(ops, token_loss), s.tokens)
  fwd = sharded(
    functools.partial(store_local, kernel=kernel, tiling=tiling, token_loss=token_loss, keep=keep),
    tiling.placement,
    sweep_specs(ops, kernel, tiling),
    out_specs,
  )
  out = fwd(ops)
  return (out["total"], out["rows"]), {k: out[k] for k in ("dx", "dw", "dbias", "d_rows")}


def store_bwd(kernel: Kernel, tiling, token_loss, keep, layout, grads, cts):
  del kernel, tiling, token_loss, keep
  treedef, dtypes = layout
  g = cts[0].astype(grads["dx"].dtype)
  ct = jax.tree.unflatten(treedef, [None] * treedef.num_leaves)
  fields: dict[str, Any] = {}
  for (group, name), dt in dtypes:
    if group is None:
      fields[name] = (g * grads["d" + name]).astype(dt)
    else:
      rows = fields.get(group, getattr(ct, group))
      fields[group] = {**rows, name: (g * grads["d_rows"][name]).astype(dt)}
  return (dataclasses.replace(ct, **fields),)


store.defvjp(store_fwd, store_bwd)


def run_store(ops: Operands, kernel: Kernel, tiling: Tiling, token_loss, keep: tuple = ()):
  """`store` on `ops` placed in the layout the sweep expects."""
  ops = place_tree(ops, tiling.placement, tiling.vd, tiling.teacher_vd)
  dtypes: list[tuple[tuple[str | None, str], Any]]
  heads = {"x": ops.x, "w": ops.w, "bias": ops.bias}
  dtypes = [((None, k), a.dtype) for k, a in heads.items() if a is not None]
  for k in store_gradient_names(ops, token_loss):
    group = "rows" if k == TEMPERATURE and traced_temperature(ops.rows) is not None else "aux"
    dtypes.append(((group, k), getattr(ops, group)[k].dtype))
  layout = (jax.tree.structure(ops), tuple((key, jnp.dtype(dt).name) for key, dt in dtypes))
  return store(ops, kernel, tiling, token_loss, keep, layout)
