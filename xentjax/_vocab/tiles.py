"""The logit tile and the matmuls around it: the lowest layer of the engine.

Nothing here knows about a loss. A tile is a block ``[tokens, columns]`` of
the logits

.. math::

  a = \\frac{c \\tanh((x w + b) / c)}{T}

formed by one matmul in float32 accumulation (`logit_tile`): the bias ``b``,
the soft cap ``c`` and the temperature ``T`` are applied here and nowhere
else, and padding columns (past ``num_classes``) are ``-inf``. `cotangent`
takes a kernel's cotangent of a tile back through the temperature and the
cap to the matmul's output (and, for a traced temperature, to ``T``), and
`dot_dx`/`dot_dw` take that to ``x`` and ``w``.

The temperature is static (a Python float in `Tiling`) or traced: a
per-token operand ``[tokens]`` (a scalar is broadcast by the entry point, so
its gradient is the sum over tokens). With ``z`` the capped logits and
``a = z / T``, ``da/dT = -a / T``, so a tile adds
``-sum_j (g_a * a + g_b * b)_j / T`` to each token's ``dL/dT`` (``b`` the
teacher's tempered logits, which depend on ``T`` too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from xentjax._vocab.placement import Placement, vocab_offset

# Automatic tile sizes, in elements of the float32 logit tile. The recompute
# tile is 2^21 elements (8 MiB): a handful of them alive at once stays far
# below 1% of the materialized logits at LLM sizes, and each matmul is still
# large. The store tile spans the whole vocabulary row, so it is larger (2^24
# elements, 64 MiB) to keep its token chunks wide (512 tokens at V = 32768):
# each tile adds its product into the weight-sized gradient accumulator, so
# fewer, wider tiles read that accumulator fewer times. The measured effect of
# these sizes is in docs/benchmarks.md (benchmarks/fused.py).
RECOMPUTE_TILE = 1 << 21
RECOMPUTE_VOCAB_CHUNK = 1024
STORE_TILE = 1 << 24
# Strategy "store" adds a tile's weight gradient `x_t^T dz` (as large as `w`)
# in column chunks of this many elements (64 MiB in float32, at least
# `RECOMPUTE_VOCAB_CHUNK` columns), so no `w`-sized product is ever held.
STORE_DW_ELEMENTS = 1 << 24
MIN_TOKEN_CHUNK = 8
# Gradient filtering skips a tile only when every token in it puts negligible
# mass on every column of it, so its tiles are narrow in tokens (tokens differ
# in where their mass lies; columns of a Zipf-shaped vocabulary do not, much):
# 256 tokens x 512 columns. See `xentjax.linear_softmax_cross_entropy`.
# The forward pass keeps its usual tiles (1024 columns) and records their
# maxima per 512 columns; a backward pass with a chunk worth filtering runs
# 512-column chunks (with the forward pass's token count in the chunks it
# runs unfiltered), and one with none runs like the unfiltered backward pass.
FILTER_TOKEN_CHUNK = 256
FILTER_VOCAB_CHUNK = 512
# In strategy "store" the filter tiles are narrower in columns (256 x 256):
# its whole-row tiles keep their width (the filter tiles only split its two
# gradient products), and a narrower tile is all-negligible, and so skipped,
# more often. Skip rates and times of both tile shapes are in
# docs/benchmarks.md (benchmarks/filtering.py).
STORE_FILTER_VOCAB_CHUNK = 256
# Filtering is adaptive: a column chunk ("recompute") or a whole-row tile of
# tokens ("store") runs its kept filter tiles only when at least this fraction
# of its tiles can be skipped; otherwise it runs like the unfiltered pass (wide
# tiles), so that a distribution with little to skip does not pay for the
# narrow tiles.
FILTER_MIN_SKIP = 0.25


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Static description of the tiles of one call (hashable: a `custom_vjp` nondiff arg)."""

  num_classes: int  # the real vocabulary size V (global); later columns are padding
  num_columns: int  # global number of columns of w (>= num_classes)
  vd: bool  # w is [V, D] (tied embedding) rather than [D, V]
  token_chunk: int
  vocab_chunk: int
  precision: Any = None
  soft_cap: float | None = None
  # A Python temperature (1.0: none). A traced one is the per-token operand
  # "temperature" of the sweep, and this field stays 1.0.
  temperature: float = 1.0
  placement: Placement = dataclasses.field(default_factory=Placement)
  teacher_vd: bool = False  # layout of the teacher's head (distillation)
  filter_eps: float | None = None  # gradient filtering (both strategies)
  # Tokens and columns per filter tile (gradient filtering only). In "recompute"
  # `token_chunk` is then the forward pass's and the unfiltered backward
  # chunks' token count, and the filter tile has `vocab_chunk` columns; in
  # "store" the filter tiles split each whole-row tile into column chunks.
  filter_token_chunk: int | None = None
  filter_vocab_chunk: int | None = None
  # The dtype the tiles are computed and accumulated in (float32 for 16-bit
  # inputs, `_validation.compute_dtype` of every head's dtypes): required.
  cdt: Any = None

  def __post_init__(self):
    if self.cdt is None:
      raise TypeError("Tiling needs its compute dtype `cdt`.")

  @property
  def padded(self) -> bool:
    return self.num_classes < self.num_columns


class Tile(NamedTuple):
  """One block of logits, as a kernel sees it.

  ``a`` is what the kernel's softmax is of; ``z`` the same logits before the
  temperature (``a`` itself when there is none); ``b`` the teacher's tempered
  logits (None without a teacher head); ``col`` the global column indices
  ``[1, columns]``; ``v0`` the index of its first column among this device's
  columns; ``temperature`` None, a Python float, or ``[tokens, 1]`` (traced);
  ``cols`` the per-column operands and state of these columns.
  """

  a: jax.Array
  z: jax.Array
  b: jax.Array | None
  col: jax.Array
  v0: Any
  temperature: Any
  cols: dict

  @property
  def traced_temperature(self) -> bool:
    return isinstance(self.temperature, jax.Array)


def fold(total: int, chunk: int, body, carry):
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


def repeat(count, body, carry):
  """`carry = body(i, carry)` for `i` in `[0, count)`, `count` traced (decided at run time).

  How the engine chooses between two ways of running the same products: a
  loop of 0 or more steps updates its carry in place, where a `lax.cond`
  would copy what its branches pass through. `body` must depend on `i` (or
  on the carry), or XLA hoists it out of the loop and runs it always.
  """
  return lax.fori_loop(0, count, body, carry)


def rows_of(tree, start, size, axis: int = 0):
  """The slice `[start, start + size)` of every array of `tree` along `axis`."""
  return jax.tree.map(lambda v: lax.dynamic_slice_in_dim(v, start, size, axis), tree)


def put_rows(tree, new, start, axis: int = 0):
  """`tree` with `new` written at `start` along `axis`."""
  return jax.tree.map(lambda v, r: lax.dynamic_update_slice_in_dim(v, r, start, axis), tree, new)


def head_chunk(w, start, size, vd: bool):
  """Columns `[start, start + size)` of a head (rows for the "vd" layout)."""
  return lax.dynamic_slice_in_dim(w, start, size, axis=0 if vd else 1)


def matmul(a, b, a_axis: int, b_axis: int, op_dt, precision, cdt):
  """`a` contracted with `b` over one axis each: operands in `op_dt`, sums in `cdt`."""
  dims = (((a_axis,), (b_axis,)), ((), ()))
  return lax.dot_general(
    a.astype(op_dt), b.astype(op_dt), dims, precision=precision, preferred_element_type=cdt
  ).astype(cdt)


def capped_logits(x_t, w_c, bias_c, vd: bool, tiling: Tiling, cdt):
  """``c tanh((x_t @ w_c + bias_c) / c)`` in the compute dtype (no cap: ``x_t @ w_c + b``)."""
  op_dt = jnp.result_type(x_t.dtype, w_c.dtype)
  z = matmul(x_t, w_c, 1, 1 if vd else 0, op_dt, tiling.precision, cdt)
  if bias_c is not None:
    z = z + bias_c.astype(cdt)[None, :]
  if tiling.soft_cap is not None:
    cap = jnp.asarray(tiling.soft_cap, cdt)
    z = cap * jnp.tanh(z / cap)
  return z


def tempered(z, temperature):
  """``z / T`` for a temperature that is None (1), a Python float, or `[tokens, 1]`."""
  if temperature is None:
    return z
  if isinstance(temperature, float):
    return z / jnp.asarray(temperature, z.dtype)
  return z / temperature


# The per-token operand of a traced temperature: its one representation. A
# static temperature is `Tiling.temperature`; a traced one is the operand
# `rows[TEMPERATURE]` ([n]: it gets a gradient), read with `traced_temperature`,
# and a kernel sees it as `Tile.temperature` ([tokens, 1], `Tile.traced_temperature`).
TEMPERATURE = "temperature"


def traced_temperature(rows: dict):
  """The traced temperature ``[n]`` among the per-token operands ``rows``, or None."""
  return rows.get(TEMPERATURE)


def tile_temperature(tiling: Tiling, rows: dict, cdt):
  """A tile's temperature: the traced rows `[tokens, 1]`, the static float, or None."""
  t = traced_temperature(rows)
  if t is not None:
    return t.astype(cdt)[:, None]
  return None if tiling.temperature == 1.0 else tiling.temperature


def logit_tile(heads: dict, t0, tsize, col0, v0, rows: dict, cols: dict, tiling: Tiling, cdt):
  """The `Tile` of tokens `[t0, t0 + tsize)` on the columns of the chunks in `heads`.

  `heads` holds ``x``, the chunk ``w_c`` (and ``bias_c``) of the head, and
  for a teacher ``teacher_x`` and ``teacher_w_c`` (and ``teacher_bias_c``); `col0` is the global
  index of the chunk's first column, `v0` its index on this device (for the kernel's
  per-chunk state; 0 where none is kept).
  """
  temperature = tile_temperature(tiling, rows, cdt)
  x_t = lax.dynamic_slice_in_dim(heads["x"], t0, tsize, 0)
  z = capped_logits(x_t, heads["w_c"], heads.get("bias_c"), tiling.vd, tiling, cdt)
  col = col0 + lax.broadcasted_iota(jnp.int32, (1, z.shape[1]), 1)
  b = None
  if "teacher_x" in heads:
    tx_t = lax.dynamic_slice_in_dim(heads["teacher_x"], t0, tsize, 0)
    zt = capped_logits(
      tx_t, heads["teacher_w_c"], heads.get("teacher_bias_c"), tiling.teacher_vd, tiling, cdt
    )
    b = tempered(zt, temperature)
  if tiling.padded:
    real = col < tiling.num_classes
    z = jnp.where(real, z, -jnp.inf)
    b = None if b is None else jnp.where(real, b, -jnp.inf)
  a = tempered(z, temperature)
  return Tile(a, z, b, col, v0, temperature, cols)


def given_tile(z, tiling: Tiling) -> Tile:
  """Logits `[tokens, columns]` given as they are (this device's vocabulary shard) as a `Tile`."""
  col = column_offset(tiling, z.shape[1]) + lax.broadcasted_iota(jnp.int32, (1, z.shape[1]), 1)
  return Tile(z, z, None, col, 0, None, {})


def _times_logits(g, logits):
  """``g * logits``, 0 where ``g`` is 0 or the logit is ``-inf``.

  A ``-inf`` logit is ``-inf`` at every temperature: it adds nothing to the
  temperature's gradient (a label there has a finite ``g``, never ``g * -inf``).
  """
  return jnp.where((g == 0) | (logits == -jnp.inf), 0.0, g * logits)


def cotangent(ct: Mapping[str, Any], tile: Tile, tiling: Tiling):
  """`(d_raw, d_temperature)` from a kernel's cotangent `ct` of one tile.

  `ct` holds the cotangents of the tile's ``a`` (key "a"), ``z`` ("z") and
  ``b`` ("b": only used for the temperature), each optional. `d_raw` is the
  cotangent of ``x @ w + bias`` (padding columns exactly 0);
  `d_temperature` is ``[tokens]`` for a traced temperature, else None.
  """
  t = tile.temperature
  da, dz = ct.get("a"), ct.get("z")
  da_t = None if da is None else tempered(da, t)  # da / T
  d = dz if da_t is None else da_t if dz is None else da_t + dz
  d_temp = None
  if tile.traced_temperature:
    # -sum_j (da_j a_j + db_j b_j) / T; da / T is the matmuls' operand when alone, so no
    # other tile-sized buffer is kept for it.
    d_temp = -jnp.sum(_times_logits(da_t, tile.a), axis=1)
    if ct.get("b") is not None:
      d_temp = d_temp - jnp.sum(_times_logits(ct["b"], tile.b), axis=1) / t[:, 0]
  assert d is not None  # a kernel's cotangent holds "a" or "z"
  if tiling.soft_cap is not None:
    tanh = tile.z * jnp.asarray(1.0 / tiling.soft_cap, d.dtype)
    d = d * (1.0 - jnp.square(tanh))
  if tiling.padded:
    d = jnp.where(tile.col < tiling.num_classes, d, 0.0)
  return d, d_temp


def dot_dx(dz, w_c, op_dt, tiling: Tiling, cdt):
  """`dz @ w_c^T`: `[tokens, D]`, accumulated in the compute dtype.

  Like the materialized computation, the matmul operands are in the inputs'
  (promoted) dtype `op_dt`: for 16-bit inputs the logit-gradient tile is
  rounded to it, and the products are accumulated in float32.
  """
  return matmul(dz, w_c, 1, 0 if tiling.vd else 1, op_dt, tiling.precision, cdt)


def dot_dw(x_t, dz, op_dt, tiling: Tiling, cdt, xT_t=None):
  """`x_t^T @ dz` as `[D, columns]` (or `[columns, D]` for the "vd" layout).

  `xT_t`, if given, is `x_t^T` already laid out as `[D, tokens]` (the "dv"
  layout only): the product is then an ordinary `[D, T] @ [T, columns]`
  matmul, which XLA's CPU backend hands to its fast matmul library, where the
  transposed-operand form falls back to a slower one.
  """
  if xT_t is not None:
    return matmul(xT_t, dz, 1, 0, op_dt, tiling.precision, cdt)
  a, b = (dz, x_t) if tiling.vd else (x_t, dz)
  return matmul(a, b, 0, 0, op_dt, tiling.precision, cdt)


def finite(m):
  """A running maximum as a finite shift (0 where it is -inf or NaN)."""
  return jnp.where(jnp.isfinite(m), m, 0.0)


def log_shifted_sum(s, m):
  """``log s`` for ``s = sum_j e^{a_j - m}`` with ``m = max_j a_j``: at least 0 where ``m`` is finite.

  The maximum's own term is ``e^0 = 1``, so ``s >= 1``, and ``lse = m + log s
  >= m >= a_j`` for every logit, exactly (a cross-entropy ``lse - a_y`` is never
  negative). Where a tile is scaled (``a = z / T``, formed as ``z · (1/T)``,
  or a soft cap ``c tanh(·)``), XLA forms the product again inside each fusion
  that reads it, and the compiler may contract it with the subtraction of
  ``m`` into one fused multiply-add: the exponent of the maximum is then the
  product's rounding error, about half an ulp of ``a`` rather than 0 (at
  ``a = 100``, ``e^{-4e-6}``), and ``s`` can fall just below 1. Such an ``s``
  is 1 up to that rounding, and is taken as 1. A row with no finite maximum
  (every logit ``-inf``: ``s = 0``; NaN) keeps its ``s``.
  """
  return jnp.log(jnp.where(jnp.isfinite(m) & (s < 1.0), 1.0, s))


def column_offset(tiling: Tiling, local_columns: int):
  """Global index of this device's first column."""
  return vocab_offset(tiling.placement, local_columns)


def auto_chunks(
  strategy, n_tokens, n_cols, token_chunk, vocab_chunk, *, filtered=False, store_tile=STORE_TILE
):
  """`(token_chunk, vocab_chunk, filter_tile)`: the user's, or automatic tile sizes.

  The automatic tiles keep a float32 logit tile at 8-64 MiB. With gradient
  filtering the automatic filter tile is 256 tokens x 512 columns (see
  `FILTER_TOKEN_CHUNK`): in "recompute" the forward pass (and an unfiltered
  backward pass) keeps its usual tiles, whose maxima it records per 512
  columns, a filtered backward pass runs 512-column chunks, a user's
  `vocab_chunk` sets the columns of all of them and a user's `token_chunk`
  both token counts; in "store" the
  whole-row tiles (of the usual size, or a user's `token_chunk` tokens) are
  split into filter tiles of at most 256 tokens and 256 columns (a user's
  `vocab_chunk`). `filter_tile`, the pair `(tokens, columns)`, is None
  without filtering. `store_tile`: the elements of the automatic whole-row
  tile of strategy "store" (smaller where a kernel holds several such
  tiles).
  """
  cap = lambda tc: min(tc, max(n_tokens, 1))
  if strategy == "recompute":
    vc = min(vocab_chunk or RECOMPUTE_VOCAB_CHUNK, max(n_cols, 1))
    tc = token_chunk or max(MIN_TOKEN_CHUNK, RECOMPUTE_TILE // vc)
    if not filtered:
      return cap(tc), vc, None
    # A multiple of the filter tile's columns (or all of them): the forward
    # pass's tiles start at a filter tile.
    fvc = min(vocab_chunk or FILTER_VOCAB_CHUNK, max(n_cols, 1))
    return cap(tc), vc, (cap(token_chunk or FILTER_TOKEN_CHUNK), fvc)
  vc = max(n_cols, 1)
  tc = cap(token_chunk or max(MIN_TOKEN_CHUNK, store_tile // max(n_cols, 1)))
  if filtered:
    ftc, fvc = token_chunk or FILTER_TOKEN_CHUNK, vocab_chunk or STORE_FILTER_VOCAB_CHUNK
    return tc, vc, (min(ftc, tc), min(fvc, vc))
  return tc, vc, None
