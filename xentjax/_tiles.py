"""Tiles of `x @ w` and where they run: the low-level pieces of the fused engine.

Shared by the fused statistics engine (``xentjax._fused``) and the fused
distillation losses. Nothing here knows about a loss: a tile is a block
``[tokens, columns]`` of the (biased, soft-capped, tempered) logits, formed by
one matmul in float32 accumulation, and the two gradient matmuls that take a
tile of logit cotangents back to ``x`` and ``w``. A placement (one device, or a
mesh with tokens over a data axis and the vocabulary over a vocabulary axis) is
described by the same static `_Config`; `_sharded` runs a local kernel as it is
on one device or under `jax.shard_map` on a mesh.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from xentjax import _validation as V

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
# Gradient filtering skips a tile only when every token in it puts negligible
# mass on every column of it, so its tiles are narrow in tokens (tokens differ
# in where their mass lies; columns of a Zipf-shaped vocabulary do not, much):
# 256 tokens x 512 columns. See `xentjax.linear_softmax_cross_entropy`.
_FILTER_TOKEN_CHUNK = 256
_FILTER_VOCAB_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one fused call (hashable: a `custom_vjp` nondiff arg).

  The first fields describe the tiles and the placement; the rest say which
  per-token statistics the engine accumulates (all off by default).
  """

  num_classes: int  # the real vocabulary size V (global); later columns are padding
  num_columns: int  # global number of columns of w (>= num_classes)
  soft_cap: float | None
  vd: bool  # w is [V, D] (tied embedding) rather than [D, V]
  token_chunk: int
  vocab_chunk: int
  precision: Any
  # Parallel execution (all None on one device).
  mesh: Any = None
  data_axis: Any = None
  vocab_axis: Any = None
  # The logits are softcap(x @ w + bias) / temperature.
  temperature: float = 1.0
  has_bias: bool = False
  # Statistics beyond (m, log_s, z_y): a column-weighted logit sum, the
  # softmax-weighted logit sum (entropy), the argmax, the top-k, and the
  # per-(token, vocabulary chunk) maxima that gradient filtering decides from.
  weighted_sum: bool = False
  entropy: bool = False
  argmax: bool = False
  top_k: int = 0
  filter_eps: float | None = None
  # Loss parameters are no part of the engine (losses are code on its
  # statistics); these two are still accepted, and ignored, so configurations
  # written for the earlier loss-aware kernels keep constructing.
  label_smoothing: float = 0.0
  z_loss: float = 0.0


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


def _matmul(a, b, a_axis: int, b_axis: int, op_dt, cfg: _Config, cdt):
  """`a` contracted with `b` over one axis each: operands in `op_dt`, sums in `cdt`."""
  dims = (((a_axis,), (b_axis,)), ((), ()))
  return lax.dot_general(
    a.astype(op_dt), b.astype(op_dt), dims, precision=cfg.precision, preferred_element_type=cdt
  ).astype(cdt)


def _logit_tile(x_t, w_c, col0, cfg: _Config, cdt, bias_c=None):
  """Logits of one tile, `[tokens, columns]` in the compute dtype.

  ``z = softcap(x_t @ w_c + bias_c) / temperature``. Returns `(z, col)`: `z`
  with padding columns at -inf, `col` the global column index of each column
  (`[1, columns]`).
  """
  op_dt = jnp.result_type(x_t.dtype, w_c.dtype)
  z = _matmul(x_t, w_c, 1, 1 if cfg.vd else 0, op_dt, cfg, cdt)
  if bias_c is not None:
    z = z + bias_c.astype(cdt)[None, :]
  if cfg.soft_cap is not None:
    cap = jnp.asarray(cfg.soft_cap, cdt)
    z = cap * jnp.tanh(z / cap)
  if cfg.temperature != 1.0:
    z = z / jnp.asarray(cfg.temperature, cdt)
  col = col0 + lax.broadcasted_iota(jnp.int32, (1, z.shape[1]), 1)
  if cfg.num_classes < cfg.num_columns:
    z = jnp.where(col < cfg.num_classes, z, -jnp.inf)
  return z, col


def _raw_cotangent(dz, z, col, cfg: _Config):
  """Cotangent of `x @ w + bias` from the cotangent `dz` of the tile's logits `z`.

  The soft cap contributes ``1 - tanh^2 = 1 - (T z / c)^2`` and the
  temperature ``1/T``; padding columns get exactly 0.
  """
  t = cfg.temperature
  if cfg.soft_cap is not None:
    tanh = z * jnp.asarray(t / cfg.soft_cap, z.dtype)
    dz = dz * ((1.0 - jnp.square(tanh)) / jnp.asarray(t, z.dtype))
  elif t != 1.0:
    dz = dz / jnp.asarray(t, z.dtype)
  if cfg.num_classes < cfg.num_columns:
    dz = jnp.where(col < cfg.num_classes, dz, 0.0)
  return dz


def _dot_dx(dz, w_c, op_dt, cfg: _Config, cdt):
  """`dz @ w_c^T`: `[tokens, D]`, accumulated in the compute dtype.

  Like the materialized computation, the matmul operands are in the inputs'
  (promoted) dtype `op_dt`: for 16-bit inputs the logit-gradient tile is
  rounded to it, and the products are accumulated in float32.
  """
  return _matmul(dz, w_c, 1, 0 if cfg.vd else 1, op_dt, cfg, cdt)


def _dot_dw(x_t, dz, op_dt, cfg: _Config, cdt, xT_t=None):
  """`x_t^T @ dz` as `[D, columns]` (or `[columns, D]` for the "vd" layout).

  `xT_t`, if given, is `x_t^T` already laid out as `[D, tokens]` (the "dv"
  layout only): the product is then an ordinary `[D, T] @ [T, columns]`
  matmul, which XLA's CPU backend hands to its fast matmul library, where the
  transposed-operand form falls back to a slower one.
  """
  if xT_t is not None:
    return _matmul(xT_t, dz, 1, 0, op_dt, cfg, cdt)
  a, b = (dz, x_t) if cfg.vd else (x_t, dz)
  return _matmul(a, b, 0, 0, op_dt, cfg, cdt)


def _safe(m):
  """A running maximum as a finite shift (0 where it is -inf or NaN)."""
  return jnp.where(jnp.isfinite(m), m, 0.0)


def _combine_lse(m, s, cfg: _Config):
  """Global `lse` from the local running max `m` and scaled sum `s`."""
  if cfg.vocab_axis is not None:
    m_all = lax.pmax(m, cfg.vocab_axis)
    s = lax.psum(s * jnp.exp(m - _safe(m_all)), cfg.vocab_axis)
    m = m_all
  return _safe(m) + jnp.log(s)


# ----------------------------------------------------------------------------
# Placement: one device, or a mesh with tokens and vocabulary sharded.


def _specs(cfg: _Config):
  """PartitionSpecs of (x, w, per-token vectors) for the parallel version."""
  tok = P(cfg.data_axis)
  xs = P(cfg.data_axis, None)
  ws = P(cfg.vocab_axis, None) if cfg.vd else P(None, cfg.vocab_axis)
  return xs, ws, tok


def _spec_tree(tree, cfg: _Config):
  """PartitionSpecs for a dict of named engine arrays (see `_ROLE`)."""
  xs, ws, tok = _specs(cfg)
  by_role = {
    "x": xs,
    "w": ws,
    "col": P(cfg.vocab_axis),
    "tile": P(cfg.data_axis, cfg.vocab_axis),
    "rowk": P(cfg.data_axis, None),
    "scalar": P(),
    "tok": tok,
  }
  return {
    k: _spec_tree(v, cfg) if isinstance(v, dict) else by_role[_ROLE.get(k, "tok")]
    for k, v in tree.items()
  }


# The layout of each named array the engine passes through `shard_map`;
# everything else is a per-token vector.
_ROLE = {
  "x": "x",
  "dx": "x",
  "w": "w",
  "dw": "w",
  "bias": "col",
  "db": "col",
  "u": "col",
  "tmax": "tile",
  "topv": "rowk",
  "topi": "rowk",
  "total": "scalar",
}


def _sharded(fn, cfg: _Config, in_specs, out_specs):
  """`fn` itself on one device; `shard_map(fn)` over `cfg.mesh` otherwise.

  The collectives inside the kernels are explicit and nothing is
  differentiated through `shard_map` (the `custom_vjp` sits outside it), so the
  replication checker is not needed.
  """
  if cfg.mesh is None:
    return fn
  return jax.shard_map(fn, mesh=cfg.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


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
    if (
      m is None
      or getattr(m, "empty", True)
      or not any(t == explicit for t in getattr(m, "axis_types", ()))
    ):
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
  if (
    vocab_axis is not None
    and data_axis is not None
    and (set(V.as_sequence(vocab_axis)) & set(V.as_sequence(data_axis)))
  ):
    vocab_axis = None
  return getattr(mesh, "abstract_mesh", mesh), data_axis, vocab_axis


def _axis_size(mesh, axis) -> int:
  if axis is None:
    return 1
  return math.prod(dict(mesh.shape)[a] for a in V.as_sequence(axis))


def _mesh_axes(mesh, data_axis, vocab_axis) -> tuple[int, int]:
  """Sizes of the two mesh axes; a clear error when the mesh lacks them."""
  if getattr(mesh, "axis_names", None) is None:
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  shape = dict(mesh.shape)
  for arg, axis in (("vocab_axis", vocab_axis), ("data_axis", data_axis)):
    for a in () if axis is None else V.as_sequence(axis):
      if a not in shape:
        raise ValueError(
          f"`{arg}`={axis!r} is not an axis of the mesh, whose axes are "
          f"{dict(shape)}. Pass the name of an existing mesh axis."
        )
  if (
    data_axis is not None
    and vocab_axis is not None
    and (set(V.as_sequence(data_axis)) & set(V.as_sequence(vocab_axis)))
  ):
    raise ValueError(f"`data_axis`={data_axis!r} and `vocab_axis`={vocab_axis!r} must differ.")
  return _axis_size(mesh, data_axis), _axis_size(mesh, vocab_axis)


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


# ----------------------------------------------------------------------------
# Tile sizes.


def _positive_int(name: str, value) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"`{name}` must be None (automatic) or a positive int, got {value!r}.")
  return value


def _auto_chunks(
  strategy, n_tokens, n_cols, token_chunk, vocab_chunk, *, filtered=False, store_tile=_STORE_TILE
):
  """Tile sizes: the user's, or ones that keep a float32 logit tile at 8-64 MiB.

  With gradient filtering the automatic tile is 256 tokens x 512 columns (see
  `_FILTER_TOKEN_CHUNK`). `store_tile`: the elements of the automatic whole-row
  tile of strategy "store" (smaller where a kernel holds several such tiles).
  """
  if strategy == "recompute":
    vc = vocab_chunk or (_FILTER_VOCAB_CHUNK if filtered else _RECOMPUTE_VOCAB_CHUNK)
    vc = min(vc, max(n_cols, 1))
    auto_tc = _FILTER_TOKEN_CHUNK if filtered else max(_MIN_TOKEN_CHUNK, _RECOMPUTE_TILE // vc)
    tc = token_chunk or auto_tc
  else:
    vc = max(n_cols, 1)
    tc = token_chunk or max(_MIN_TOKEN_CHUNK, store_tile // max(n_cols, 1))
  return min(tc, max(n_tokens, 1)), vc
