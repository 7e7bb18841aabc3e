"""From an entry point's arguments to the engine's operands: checks, flattening, tiling.

`prepare_call` is the one preparation every entry point shares: it checks
the hidden states, the head, the labels, the mask and the placement
(`options`), flattens the tokens to ``[n, D]``, chooses the tiles
(`tiles.auto_chunks`) and returns a `Call`: the flattened `Tokens`, the
static `tiles.Tiling` and the operand dict of `engine.recompute`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax.numpy as jnp

from xentjax import _core
from xentjax import _validation as V
from xentjax._vocab.options import (
  check_chunk,
  check_head,
  check_ignore_index,
  check_labels,
  check_soft_cap,
  check_temperature,
  check_vector,
  check_vocab_order,
  check_vocab_size,
  check_where,
  temperature_rows,
)
from xentjax._vocab.placement import (
  Operands,
  Placement,
  explicit_layout,
  mesh_axes,
  working_mesh,
)
from xentjax._vocab.tiles import STORE_TILE, TEMPERATURE, Tiling, auto_chunks


class Tokens(NamedTuple):
  """The validated, flattened inputs of one call and where it runs."""

  x: Any  # [n, D]
  w: Any
  status: _core.LabelStatus  # each [n]
  batch_shape: tuple
  vd: bool
  n_cols: int
  vocab_size: int
  cdt: Any
  placement: Placement


class Call(NamedTuple):
  """`Tokens`, the static `Tiling`, and the operands of the sweep (see `engine.recompute`).

  ``order`` (``[n_cols]`` int32, or None): the column order of the sweep
  (`in_vocab_order`): sweep column ``k`` is column ``order[k]`` of ``w``;
  other per-column operands (``cols``) are given in this order.
  """

  tokens: Tokens
  tiling: Tiling
  ops: Operands
  order: Any = None


def in_vocab_order(ops: Operands, tok: Tokens, order) -> tuple[Operands, Any]:
  """`(ops, full order)` to sweep the columns in `order`, with the labels remapped.

  Padding columns stay at the end. The engine gathers each chunk's columns
  (``cols["order"]``) and gathers the gradients of ``w`` and ``bias`` back
  to the heads' order at the end (``cols["inverse"]``); the labels become
  positions in the sweep, so the label logit is the same number.
  """
  full = jnp.concatenate([order, jnp.arange(tok.vocab_size, tok.n_cols, dtype=jnp.int32)])
  inverse = jnp.zeros_like(full).at[full].set(jnp.arange(full.shape[0], dtype=jnp.int32))
  labels = jnp.take(inverse, ops.rows["labels"], mode="clip")
  return ops.with_rows(labels=labels).with_cols(order=full, inverse=inverse), full


def placement_of(
  x, w, n: int, n_cols: int, vocab_size: int, vd: bool, mesh, data_axis, vocab_axis, student: bool
) -> Placement:
  """The placement of one call, checked against the shapes (`student`: see `prepare_tokens`)."""
  if mesh is None:
    if student:  # the distillation losses' default axes "data" and "vocab" need a mesh
      data_axis = vocab_axis = None
    elif data_axis is not None or vocab_axis is not None:
      raise ValueError("`data_axis` and `vocab_axis` need a `mesh`.")
    layout = explicit_layout(x, w, vd)
    if layout is None:
      return Placement()
    mesh, data_axis, vocab_axis = layout
  data_shards, vocab_shards = mesh_axes(mesh, data_axis, vocab_axis)
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
  return Placement(working_mesh(mesh, x, w), data_axis, vocab_axis, data_shards, vocab_shards)


def label_status_of(labels, batch_shape: tuple, vocab_size: int, ignore_index, where):
  """`_core.LabelStatus` of the tokens; without labels every token `where` keeps counts."""
  if labels is not None:
    return _core.label_status(labels, vocab_size, ignore_index=ignore_index, where=where)
  counted = jnp.ones(batch_shape, bool)
  if where is not None:
    counted = counted & jnp.broadcast_to(where.astype(bool), batch_shape)
  return _core.LabelStatus(counted, jnp.zeros(batch_shape, bool), jnp.zeros(batch_shape, jnp.int32))


def prepare_tokens(
  x, w, labels, *, ignore_index, where, w_layout, vocab_size, mesh, data_axis, vocab_axis, student
) -> Tokens:
  """Checks the common arguments and flattens the tokens.

  `student=True` for the student's head of a distillation loss: `labels` may
  be None (then every token `where` keeps counts, with index 0), the errors
  name the tokens by `x` and ask to pad the teacher's head too, and the mesh
  axes count only with a `mesh`.
  """
  x, w, vd, n_cols = check_head("x", x, "w", w, "w_layout", w_layout)
  labels = check_labels(labels, x, optional=student)
  ignore_index = check_ignore_index(ignore_index)
  vocab_size = check_vocab_size(vocab_size, n_cols)
  batch_shape = x.shape[:-1]
  where = check_where(where, x.shape, by_x=student)
  n = math.prod(batch_shape)
  placement = placement_of(x, w, n, n_cols, vocab_size, vd, mesh, data_axis, vocab_axis, student)
  status = label_status_of(labels, batch_shape, vocab_size, ignore_index, where)
  status = _core.LabelStatus(*(a.reshape(n) for a in status))
  cdt = V.compute_dtype(x.dtype, w.dtype)
  x2 = x.reshape(n, x.shape[-1])
  return Tokens(x2, w, status, batch_shape, vd, n_cols, vocab_size, cdt, placement)


class Head(NamedTuple):
  """The keywords every entry point shares: how `w` is laid out, tiled and placed."""

  w_layout: str = "dv"
  vocab_size: int | None = None
  token_chunk_size: int | None = None
  vocab_chunk_size: int | None = None
  precision: Any = None
  mesh: Any = None
  data_axis: Any = None
  vocab_axis: Any = None


def prepare_call(
  x,
  w,
  labels,
  head: Head,
  *,
  ignore_index,
  where,
  strategy="recompute",
  bias=None,
  logit_soft_cap=None,
  temperature=1.0,
  filter_eps=None,
  store_tile=STORE_TILE,
  student=False,
  vocab_order=None,
) -> Call:
  """The checked tokens, the tiling and the operands of one call of an entry point.

  The operands: ``x``, ``w``, ``bias`` (if any), ``rows`` with the labels
  (``labels``, int32, 0 where a token does not count) and a traced
  temperature (``temperature``, ``[n]``), and empty ``cols``. With a
  `vocab_order`, the columns come in that order (`in_vocab_order`).
  """
  tok = prepare_tokens(
    x,
    w,
    labels,
    ignore_index=ignore_index,
    where=where,
    w_layout=head.w_layout,
    vocab_size=head.vocab_size,
    mesh=head.mesh,
    data_axis=head.data_axis,
    vocab_axis=head.vocab_axis,
    student=student,
  )
  bias = check_vector("bias", bias, tok.n_cols, "one per column of `w`")
  t = check_temperature(temperature)
  static_t = t if isinstance(t, float) else 1.0
  tiling = make_tiling(
    tok, head, strategy, check_soft_cap(logit_soft_cap), static_t, filter_eps, store_tile
  )
  rows = {"labels": tok.status.index}
  if not isinstance(t, float):
    rows[TEMPERATURE] = temperature_rows(t, tok.batch_shape, tok.cdt)
  ops = Operands(x=tok.x, w=tok.w, rows=rows, bias=bias)
  order = check_vocab_order(vocab_order, tok.vocab_size, tok.placement.vocab_shards)
  if order is None:
    return Call(tok, tiling, ops)
  ops, full = in_vocab_order(ops, tok, order)
  return Call(tok, tiling, ops, full)


def make_tiling(tok: Tokens, head: Head, strategy, soft_cap, temperature, filter_eps, store_tile):
  """The static `Tiling` of a call: the user's tile sizes or automatic ones."""
  pl = tok.placement
  tc, vc, filter_tile = auto_chunks(
    strategy,
    tok.x.shape[0] // pl.data_shards,
    tok.n_cols // pl.vocab_shards,
    check_chunk("token_chunk_size", head.token_chunk_size),
    check_chunk("vocab_chunk_size", head.vocab_chunk_size),
    filtered=filter_eps is not None,
    store_tile=store_tile,
  )
  return Tiling(
    num_classes=tok.vocab_size,
    num_columns=tok.n_cols,
    vd=tok.vd,
    token_chunk=tc,
    vocab_chunk=vc,
    precision=head.precision,
    soft_cap=soft_cap,
    temperature=temperature,
    placement=pl,
    filter_eps=filter_eps,
    filter_token_chunk=None if filter_tile is None else filter_tile[0],
    filter_vocab_chunk=None if filter_tile is None else filter_tile[1],
    cdt=tok.cdt,
  )
