"""The whole-row adapter: a quantity as one function of a row of logits, differentiated by JAX.

Most kernels accumulate a statistic over vocabulary tiles and write its
tile cotangent by hand. A quantity that is easier to write as a function of
the whole row of logits (a squared error of the softmax, a margin, a
truncated distribution) can instead be given as that function: `RowFunction`
applies it to each token's row of a whole-row tile (the tiles of strategy
"store", ``[tokens, V]``) and takes the tile's cotangent from `jax.vjp` of
it, as Liger Kernel's chunked losses do. The engine does the rest: the
chunking over tokens, the matmuls into the gradients of ``x``, ``w`` and
``bias``, and the placement; no more than a chunk of rows of the logits
exists at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from xentjax._vocab.kernel import Finished, Kernel, Rows, State, TileCotangent, grad
from xentjax._vocab.tiles import Tile, Tiling

# The rows of the function's operands are kept under this prefix, apart from the
# per-token operands the engine itself reads (a traced temperature).
OPERAND_PREFIX = "operand:"


def operand_key(name: str) -> str:
  """The per-token row under which operand ``name`` of a `RowFunction` travels."""
  return OPERAND_PREFIX + name


@dataclasses.dataclass(frozen=True)
class RowFunction(Kernel):
  """``value_i = fn(a_i, **operands_i)``: one function of each token's whole row of logits.

  .. math::

    v_i = f(a_{i,1:V}, o_i), \\qquad
    \\frac{\\partial L}{\\partial a_{ij}} = g_i \\frac{\\partial f}{\\partial a_{ij}}
    \\ \\text{(by `jax.vjp`; 0 where } g_i = 0),

  with ``g_i`` the cotangent of ``value_i``.

  Attributes:
    fn: ``fn(logits [V], **operands) -> scalar``, in the compute dtype; traced
      under `jax.vmap` over the rows of a tile. Static: it must be hashable,
      and a new function object (a lambda made per call) compiles anew.
    operands: names of the per-token operands (``rows[operand_key(name)]``,
      ``[n, ...]``), passed to ``fn`` by name, one row each. They carry no
      gradient.
    num_classes: the real classes; ``fn`` sees only the first
      ``num_classes`` logits (padding columns get a zero cotangent). None:
      every column.

  Edge cases: a row whose value has a zero cotangent (masked, ignored) gets
  an exactly zero logit cotangent, even where ``fn``'s own gradient is not
  finite there. The tiles must hold whole rows on one device's columns: a
  vocabulary-sharded placement or a column chunk narrower than the row is an
  error (the tokens may be sharded).
  """

  fn: Callable[..., Any]
  operands: tuple[str, ...] = ()
  num_classes: int | None = None

  outputs = ("value",)
  differentiable = ("value",)

  def values(self, a: jax.Array, rows: Rows) -> jax.Array:
    """``fn`` on each row of the tile ``a`` ``[tokens, columns]``: ``[tokens]``."""
    real = a if self.num_classes is None else a[:, : self.num_classes]
    out = jax.vmap(self.fn)(real, **{k: rows[operand_key(k)] for k in self.operands})
    if jnp.shape(out) != a.shape[:1]:
      raise ValueError(
        f"The row function must return a scalar per row; on {a.shape[0]} rows it "
        f"returned shape {jnp.shape(out)}."
      )
    return jnp.asarray(out).astype(a.dtype)

  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt) -> State:
    del p
    if tiling.placement.column_axis is not None:
      raise NotImplementedError(
        "A row function needs each token's whole row on one device: the vocabulary "
        "cannot be sharded (shard the tokens only)."
      )
    if tiling.vocab_chunk < n_cols:
      raise ValueError(
        f"A row function needs whole-row tiles: the column chunk ({tiling.vocab_chunk}) is "
        f"narrower than the {n_cols} columns."
      )
    return {"value": jnp.zeros((n,), cdt)}, {}

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    """A tile holds whole rows: its values are final."""
    del p
    return {"value": self.values(tile.a, rows)}, state[1]

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    del p, rows, tiling
    return {"value": state[0]["value"]}, {}

  def cotangent(self, tile: Tile, rows: Rows) -> TileCotangent:
    g = grad(rows, "value").astype(tile.a.dtype)
    _, vjp = jax.vjp(lambda a: self.values(a, rows), tile.a)
    (da,) = vjp(g)
    return {"a": jnp.where(g[:, None] != 0, da, 0.0)}
