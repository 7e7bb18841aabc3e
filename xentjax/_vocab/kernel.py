"""The kernel interface: what a quantity computes over the tiles, as a typed contract.

The engine (`xentjax._vocab.engine`) sweeps ``[tokens, columns]`` tiles of
the logits and never knows what it computes; a `Kernel` says it. A kernel is
a frozen (hashable: static) dataclass deriving from `Kernel`, with four
abstract methods the engine calls:

==============================================  ===================================
``init(p, n, n_cols, tiling, cdt) -> State``     the state pass ``p`` accumulates
``update(p, state, tile, rows) -> State``        the state after one more `tiles.Tile`
``finish(p, state, rows, tiling) -> Finished``   per-token (and per-column) rows of the
                                                 whole vocabulary, shards combined
``cotangent(tile, rows) -> TileCotangent``       the tile's logit cotangent
==============================================  ===================================

and attributes naming its rows (``outputs``, ``differentiable``, ``saved``,
their ``column_*`` counterparts, ``integer_outputs``) and its number of
forward ``passes``. In the backward pass the cotangent of a differentiable
output ``name`` is in the rows under `grad_key` ``(name)``; a kernel reads it
with `grad` ``(rows, name)``.

The online log-sum-exp, which most kernels keep for one head or another, is
one state, `LogSumExp`: `LogSumExp.update` adds a tile, `LogSumExp.combine`
combines the shards of a placement (over the vocabulary for a per-token
state, over the tokens for a per-column one).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, TypedDict

import jax
import jax.numpy as jnp

from xentjax._vocab.placement import Placement, column_max, column_sum, vocab_max, vocab_sum
from xentjax._vocab.tiles import Tile, Tiling, finite, log_shifted_sum

# Per-token (or per-column) arrays by name: leading axis the tokens (columns).
Rows = dict[str, jax.Array]
# The state of a pass: (per-token rows [n, ...], per-column rows [n_cols, ...]).
State = tuple[dict[str, Any], dict[str, Any]]
# What `Kernel.finish` returns: (new per-token rows, new per-column rows).
Finished = tuple[dict[str, Any], dict[str, Any]]


class TileCotangent(TypedDict, total=False):
  """The cotangent of one tile's logits (each optional).

  ``a``: of the tempered logits; ``z``: of the untempered ones (a hard-label
  term); ``b``: of the teacher's (needed only for a traced temperature).
  """

  a: jax.Array
  z: jax.Array
  b: jax.Array


GRAD_PREFIX = "g_"


def grad_key(name: str) -> str:
  """The row under which the backward pass passes the cotangent of output ``name``."""
  return GRAD_PREFIX + name


def grad(rows: dict, name: str) -> jax.Array:
  """The cotangent of the output ``name`` (``[n]``), as the backward pass passes it."""
  return rows[grad_key(name)]


def grads(names, values: dict, dtype=None) -> dict:
  """``{grad_key(name): values[name]}`` for ``name`` in ``names`` (cast to ``dtype``)."""
  return {grad_key(k): values[k] if dtype is None else values[k].astype(dtype) for k in names}


class Kernel(abc.ABC):
  """What a quantity computes over the tiles; the engine does the looping.

  Subclasses are frozen dataclasses (hashable, so static under `jax.jit`)
  and implement the four abstract methods. Attributes:

  * ``passes``: the number of forward sweeps (1, or 2 when the second needs
    what the first finished into).
  * ``outputs``: names of the per-token rows returned to the caller;
    ``differentiable``: those whose cotangents the kernel reads back (with
    `grad`); ``saved``: other rows the backward pass needs.
    ``column_outputs``, ``column_differentiable`` and ``column_saved``: the
    same for per-column results (read back from ``tile.cols``).
    ``integer_outputs``: the outputs of integer dtype (an argmax), so that
    strategy "store" keeps them as integers. ``tile_saved``: the saved rows
    of shape ``[tokens, vocabulary tiles]`` (each device its own tiles).

  Optionally ``filter_terms(rows)`` for gradient filtering: ``(log of the
  largest probability per [token, filter tile of columns], labels,
  label_live)``.
  """

  passes: ClassVar[int] = 1
  outputs: tuple[str, ...] = ()
  differentiable: tuple[str, ...] = ()
  saved: tuple[str, ...] = ()
  column_outputs: tuple[str, ...] = ()
  column_differentiable: tuple[str, ...] = ()
  column_saved: tuple[str, ...] = ()
  integer_outputs: tuple[str, ...] = ()
  # Saved rows of shape [tokens, vocabulary tiles] (each device its own tiles):
  # their layout, which no row's name decides (`placement.operand_specs`).
  tile_saved: tuple[str, ...] = ()

  @abc.abstractmethod
  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt: Any) -> State:
    """The state of pass ``p``: ``(per-token dict [n, ...], per-column dict [n_cols, ...])``."""

  @abc.abstractmethod
  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    """The state after one more tile.

    ``state`` and ``rows`` are the tile's slices (its tokens; its columns for
    the per-column state, whose operands are ``tile.cols``).
    """

  @abc.abstractmethod
  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    """``(new per-token rows, new per-column rows)`` of the whole vocabulary.

    The shards are combined with `LogSumExp.combine` or the collectives of
    `xentjax._vocab.placement` (``vocab_*`` for a per-token state over the
    vocabulary axis, ``column_*`` for a per-column state over the tokens).
    """

  @abc.abstractmethod
  def cotangent(self, tile: Tile, rows: Rows) -> TileCotangent:
    """The cotangent of the tile's logits from the outputs' cotangents (`grad`)."""

  def filter_terms(self, rows: Rows) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What gradient filtering decides from (a kernel that supports it says)."""
    raise NotImplementedError(f"{type(self).__name__} does not support gradient filtering.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LogSumExp:
  """The online log-sum-exp of a row (or a column) of logits, one tile at a time.

  .. math::

    \\operatorname{lse} = \\hat m + \\log s, \\qquad
    s = \\sum_j e^{z_j - \\hat m},

  with ``m`` the running maximum and ``\\hat m`` its finite shift
  (`tiles.finite`: 0 while ``m`` is ``-inf``, so a row of ``-inf`` logits
  has ``s = 0`` and ``lse = -inf``). When ``m`` grows, ``s`` is rescaled by
  ``e^{m_old - m_new}`` (Milakov & Gimelshein's online normalizer). A pytree
  of ``m`` and ``s`` (``[n]`` each), kept in a kernel's state dict as the
  entries ``"m" + name`` and ``"s" + name`` (`from_state`, `as_state`).
  """

  m: jax.Array
  s: jax.Array

  @classmethod
  def empty(cls, n: int, cdt) -> LogSumExp:
    """No logit seen yet: ``m = -inf``, ``s = 0``."""
    return cls(jnp.full((n,), -jnp.inf, cdt), jnp.zeros((n,), cdt))

  @classmethod
  def from_state(cls, state: dict, name: str = "") -> LogSumExp:
    """The state kept in a kernel's state dict under ``"m" + name``, ``"s" + name``."""
    return cls(state["m" + name], state["s" + name])

  def as_state(self, name: str = "") -> dict:
    """The entries of a kernel's state dict that hold this state (`from_state`)."""
    return {"m" + name: self.m, "s" + name: self.s}

  def step(self, z, axis: int = 1, zmax=None) -> tuple[LogSumExp, jax.Array, jax.Array]:
    """``(state, scale, e)`` after the block ``z``, reduced along ``axis``.

    ``scale = e^{m_old - \\hat m_new}`` rescales what was summed before
    and ``e = e^{z - \\hat m_new}``: a kernel that sums more than ``e``
    (weighted by ``e``) rescales its own sums with them. ``zmax``: the
    block's maximum along ``axis``, when the kernel has it already.
    """
    m_new = jnp.maximum(self.m, jnp.max(z, axis=axis) if zmax is None else zmax)
    shift = finite(m_new)
    scale = jnp.exp(self.m - shift)  # 0 while m is -inf
    e = jnp.exp(z - (shift[:, None] if axis == 1 else shift[None, :]))
    return LogSumExp(m_new, self.s * scale + jnp.sum(e, axis=axis)), scale, e

  def update(self, z, axis: int = 1) -> LogSumExp:
    """The state after one more block ``z`` (``[n, columns]`` for ``axis=1``)."""
    return self.step(z, axis)[0]

  def shift(self, placement: Placement, columns: bool = False):
    """``(m_all, \\hat m, scale)``: the maximum over every shard, its finite shift, and
    this shard's factor ``e^{m - \\hat m}`` (None when the state is not sharded).

    ``columns``: a per-column state, sharded over the tokens (`placement.column_max`);
    otherwise a per-token one, sharded over the vocabulary.
    """
    if not sharded(placement, columns):
      return self.m, finite(self.m), None
    m_all = column_max(self.m, placement) if columns else vocab_max(self.m, placement)
    ms = finite(m_all)
    return m_all, ms, jnp.exp(self.m - ms)

  def combine(self, placement: Placement, *more, columns: bool = False, shift=None) -> tuple:
    """``(\\hat m, s, *more)`` of the whole vocabulary (or every token) from each shard's.

    ``more``: other sums relative to the same running maximum (summed with
    ``e^{z - \\hat m}`` weights), rescaled and summed with ``s``. ``shift``:
    what `shift` returned, when the kernel needed it first.
    """
    _, ms, scale = self.shift(placement, columns) if shift is None else shift
    if scale is None:
      return (ms, self.s, *more)
    total = column_sum if columns else vocab_sum
    return (ms, *total(tuple(v * scale for v in (self.s, *more)), placement))

  def lse(self, placement: Placement | None = None, columns: bool = False) -> jax.Array:
    """``log sum exp`` of everything seen (on every shard of ``placement``).

    Never below the maximum (`tiles.log_shifted_sum`), so ``lse - z >= 0`` for
    every logit ``z`` seen, in floating point.
    """
    placement = Placement() if placement is None else placement
    shift = self.shift(placement, columns)
    ms, s = self.combine(placement, columns=columns, shift=shift)
    return ms + log_shifted_sum(s, shift[0])


def sharded(placement: Placement, columns: bool) -> bool:
  """Whether a per-token (per-column, with ``columns``) state has shards to combine."""
  if columns:
    return not placement.ring and placement.data_axis is not None
  return placement.vocab_axis is not None
