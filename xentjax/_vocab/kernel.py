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
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar, TypedDict

import jax

from xentjax._vocab.tiles import Tile, Tiling

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
    strategy "store" keeps them as integers.

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

    The shards are combined with the collectives of
    `xentjax._vocab.placement` (``vocab_*`` for a per-token state over the
    vocabulary axis, ``column_*`` for a per-column state over the tokens).
    """

  @abc.abstractmethod
  def cotangent(self, tile: Tile, rows: Rows) -> TileCotangent:
    """The cotangent of the tile's logits from the outputs' cotangents (`grad`)."""

  def filter_terms(self, rows: Rows) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What gradient filtering decides from (a kernel that supports it says)."""
    raise NotImplementedError(f"{type(self).__name__} does not support gradient filtering.")
