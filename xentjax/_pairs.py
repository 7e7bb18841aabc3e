"""The pair sweep: quantities of ``z = scale · a bᵀ + bias`` tile by tile, never the matrix.

Contrastive losses (`xentjax.contrastive_loss`, `xentjax.sigmoid_contrastive_loss`,
`xentjax.ntxent`) are functions of a ``[B, M]`` matrix of pair logits that is
the reason batches stop growing (16 GiB in float32 at B = 65,536). This module
sweeps it in ``[row chunk, column chunk]`` tiles, written once, and takes a
small kernel that says what is computed:

=================================  =================================================
``rows(n, dtype)``                 the state a pass accumulates per row (a dict)
``columns(m, dtype)``              the state it accumulates per column
``update(rows, cols, z, ra, ca)``  the states after one more tile ``z``
``finish(rows, cols)``             ``(row outputs, column outputs)``, dicts of arrays
``cotangent(z, ra, ca)``           the cotangent of the tile's logits
=================================  =================================================

``ra`` and ``ca`` are the tile's rows and columns of the per-row and
per-column inputs (masks, labels, global indices), of the outputs of the
earlier passes and, in the backward pass, of the outputs' cotangents
(``"g_" + name``). The engine does the rest:

* `recompute`: the outputs under a `jax.custom_vjp`. The forward pass runs
  one sweep per kernel (a later pass sees the earlier passes' outputs, as
  NT-Xent needs its negatives' log-sum-exp first) and keeps only the per-row
  and per-column outputs; the backward pass recomputes each tile and turns
  its logit cotangent into the gradients of ``a``, ``b``, ``scale`` and
  ``bias`` (two matmuls and two sums per tile). Temporary memory is
  O((B + M)·D + tile), never O(B·M).
* `store`: for a weighted total ``sum_i g_i loss_i`` whose weights ``g`` are
  known in the forward pass (an elementwise gradient, as the sigmoid loss
  has), one sweep forms the total and its gradients; the backward pass only
  scales them.
* The placement: on one device the sweep runs as it is. With a mesh and a
  data axis of n devices, ``a`` and ``b`` are sharded by rows; each device
  keeps its rows of ``a`` and the shards of ``b`` travel around a ring
  (`jax.lax.ppermute`), n steps, carrying their column state forward and
  their gradient backward, and come home with it. No device ever holds more
  than two shards of ``b`` (the one it works on and the one arriving), and
  nothing ``B``-sized is gathered.

Numerics: 16-bit inputs are multiplied in their dtype with float32
accumulation (``preferred_element_type``); states, logits and gradients are
float32 (the promoted dtype for float64), and the gradients are cast to the
inputs' dtypes at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from xentjax import _validation as V

__all__ = ["Sweep", "recompute", "safe_max", "store"]

# Automatic tiles: 1024 x 1024 float32 logits (4 MiB), a few alive at once.
ROW_CHUNK = 1024
COLUMN_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Static description of one sweep: tile sizes, matmul precision, placement."""

  row_chunk: int = ROW_CHUNK
  column_chunk: int = COLUMN_CHUNK
  precision: Any = None
  mesh: Any = None  # a jax.sharding.Mesh, or None for one device
  axis: Any = None  # the mesh axis (or axes) that rows of `a` and `b` are sharded over

  def ring_size(self) -> int:
    if self.mesh is None:
      return 1
    shape = dict(self.mesh.shape)
    return math.prod(shape[a] for a in V.as_sequence(self.axis))


def safe_max(m):
  """A running maximum as a finite shift (0 where it is -inf or NaN)."""
  return jnp.where(jnp.isfinite(m), m, 0.0)


def fold(total: int, chunk: int, body, carry):
  """``carry = body(carry, start, size)`` over ``[0, total)`` in chunks of ``chunk``.

  Full chunks run in a `fori_loop` (a traced ``start``); the remainder runs
  once more with its own static size, so nothing is padded.
  """
  n_full, tail = divmod(total, chunk)
  if n_full == 1:
    carry = body(carry, 0, chunk)
  elif n_full > 1:
    carry = lax.fori_loop(0, n_full, lambda i, c: body(c, i * chunk, chunk), carry)
  if tail:
    carry = body(carry, n_full * chunk, tail)
  return carry


def _slice(tree, start, size):
  return {k: lax.dynamic_slice_in_dim(v, start, size, 0) for k, v in tree.items()}


def _put(tree, part, start):
  return {k: lax.dynamic_update_slice_in_dim(tree[k], part[k], start, 0) for k in tree}


def _dot(x, y, x_axis, y_axis, cfg: Sweep, cdt):
  """``x`` contracted with ``y`` over one axis each: operands in their dtype, sums in ``cdt``."""
  op = jnp.result_type(x.dtype, y.dtype)
  dims = (((x_axis,), (y_axis,)), ((), ()))
  return lax.dot_general(
    x.astype(op), y.astype(op), dims, precision=cfg.precision, preferred_element_type=cdt
  ).astype(cdt)


# ----------------------------------------------------------------------------
# The sweep of one device: its rows of `a` against one block of `b`.


def _local(kernel, cfg: Sweep, t: dict, *, state: bool, grads: bool) -> dict:
  """One block sweep: updates ``t["rows"]``, ``t["cols"]``, ``t["da"]``, ``t["db"]``, ``t["dsum"]``.

  ``t`` holds ``a``, ``b``, ``scale``, ``bias`` (compute-dtype scalars), the
  aux dicts ``ra``/``ca`` and the accumulators. Columns run in the outer loop
  (the gradient of a block of ``b`` is complete when the inner loop ends),
  rows in the inner one.
  """
  a, b, cdt = t["a"], t["b"], t["scale"].dtype

  def column_body(carry, c0, csize):
    rows, cols, da, db, dsum = carry
    b_c, ca = lax.dynamic_slice_in_dim(b, c0, csize, 0), _slice(t["ca"], c0, csize)
    cols_c = _slice(cols, c0, csize)
    db_c = jnp.zeros((csize, b.shape[1]), cdt) if grads else None

    def row_body(inner, r0, rsize):
      rows, cols_c, da, db_c, dsum = inner
      a_r, ra = lax.dynamic_slice_in_dim(a, r0, rsize, 0), _slice(t["ra"], r0, rsize)
      z = _dot(a_r, b_c, 1, 1, cfg, cdt) * t["scale"] + t["bias"]
      if state:
        rows_r, cols_c = kernel.update(_slice(rows, r0, rsize), cols_c, z, ra, ca)
        rows = _put(rows, rows_r, r0)
      if grads:
        dz = kernel.cotangent(z, ra, ca)
        da_r = lax.dynamic_slice_in_dim(da, r0, rsize, 0) + _dot(dz, b_c, 1, 0, cfg, cdt)
        da = lax.dynamic_update_slice_in_dim(da, da_r, r0, 0)
        db_c = db_c + _dot(dz, a_r, 0, 0, cfg, cdt)
        dsum = dsum + jnp.sum(dz)
      return rows, cols_c, da, db_c, dsum

    rows, cols_c, da, db_c, dsum = fold(
      a.shape[0], cfg.row_chunk, row_body, (rows, cols_c, da, db_c, dsum)
    )
    cols = _put(cols, cols_c, c0)
    if grads:
      db = lax.dynamic_update_slice_in_dim(
        db, db_c + lax.dynamic_slice_in_dim(db, c0, csize, 0), c0, 0
      )
    return rows, cols, da, db, dsum

  carry = (t["rows"], t["cols"], t["da"], t["db"], t["dsum"])
  rows, cols, da, db, dsum = fold(b.shape[0], cfg.column_chunk, column_body, carry)
  return {**t, "rows": rows, "cols": cols, "da": da, "db": db, "dsum": dsum}


def _ring(kernel, cfg: Sweep, t: dict, *, state: bool, grads: bool) -> dict:
  """`_local` against every block of ``b``: the blocks travel around the ring.

  On one device it is `_local` once. On a ring of n devices, step k works on
  the block that started k devices back; after each step the block, its
  column inputs, its column state and its gradient move one device on
  (`ppermute`). After the last step only the column state and the gradient
  move, which brings every block's results home.
  """
  n = cfg.ring_size()
  sweep = functools.partial(_local, kernel, cfg, state=state, grads=grads)
  if n == 1:
    return sweep(t)
  perm = [(i, (i + 1) % n) for i in range(n)]

  def move(t, keys):
    moved = lax.ppermute({k: t[k] for k in keys}, cfg.axis, perm)
    return {**t, **moved}

  def step(_, t):
    return move(sweep(t), ("b", "ca", "cols", "db"))

  t = lax.fori_loop(0, n - 1, step, t)
  return move(sweep(t), ("cols", "db"))


def _sweep(kernel, cfg: Sweep, arrays: dict, *, state: bool, grads: bool) -> dict:
  """Run `_ring` on `arrays` (placed on the mesh when there is one); the states and gradients.

  Returns ``rows``, ``cols`` (the kernel's states, when ``state``) and
  ``da``/``db`` (``dz @ b`` and ``dzᵀ @ a``, unscaled), ``ds`` and ``dsum``
  (the scale's and the bias's cotangent, summed over the ring), when ``grads``.
  """
  a, b = arrays["a"], arrays["b"]
  cdt = V.compute_dtype(a.dtype, b.dtype)

  def local(arrays):
    a, b = arrays["a"], arrays["b"]
    t = {
      **arrays,
      "scale": arrays["scale"].astype(cdt),
      "bias": arrays["bias"].astype(cdt),
      "rows": kernel.rows(a.shape[0], cdt) if state else {},
      "cols": kernel.columns(b.shape[0], cdt) if state else {},
      "da": jnp.zeros(a.shape, cdt) if grads else None,
      "db": jnp.zeros(b.shape, cdt) if grads else None,
      "dsum": jnp.zeros((), cdt),
    }
    t = _ring(kernel, cfg, t, state=state, grads=grads)
    out = {"rows": t["rows"], "cols": t["cols"]}
    if grads:
      ds = jnp.sum(t["da"] * a.astype(cdt))  # d(scale · a bᵀ)/d scale = a bᵀ
      ds, dsum = (ds, t["dsum"]) if cfg.mesh is None else lax.psum((ds, t["dsum"]), cfg.axis)
      out.update(da=t["da"], db=t["db"], ds=ds, dsum=dsum)
    return out

  if cfg.mesh is None:
    return local(arrays)
  by_row, scalar = P(cfg.axis), P()
  spec = {
    k: scalar if k in ("scale", "bias") else jax.tree.map(lambda _: by_row, v)
    for k, v in arrays.items()
  }
  out_spec = {"rows": by_row, "cols": by_row}
  if grads:
    out_spec.update(da=by_row, db=by_row, ds=scalar, dsum=scalar)
  return jax.shard_map(local, mesh=cfg.mesh, in_specs=(spec,), out_specs=out_spec, check_vma=False)(
    arrays
  )


# ----------------------------------------------------------------------------
# Strategy "recompute": the kernels' outputs, with a recomputing backward pass.


def _passes(kernels, cfg: Sweep, arrays: dict):
  """Run the kernels in order; each one's outputs join the aux of the next."""
  ra, ca = dict(arrays["ra"]), dict(arrays["ca"])
  for kernel in kernels:
    out = _sweep(kernel, cfg, {**arrays, "ra": ra, "ca": ca}, state=True, grads=False)
    row_out, col_out = kernel.finish(out["rows"], out["cols"])
    ra.update(row_out)
    ca.update(col_out)
  return (row_out, col_out), (ra, ca)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def recompute(kernels: tuple, cfg: Sweep, arrays: dict):
  """``(row outputs, column outputs)`` of the last of ``kernels``; see the module docstring.

  ``arrays``: ``a`` ``[B, D]``, ``b`` ``[M, D]``, ``scale`` and ``bias``
  (scalars), ``ra`` (dict of ``[B, ...]``) and ``ca`` (dict of ``[M, ...]``).
  Gradients flow to ``a``, ``b``, ``scale`` and ``bias``, through the last
  kernel's `cotangent` (which must account for the earlier passes).
  """
  return _recompute_fwd(kernels, cfg, arrays)[0]


def _recompute_fwd(kernels, cfg, arrays):
  out, (ra, ca) = _passes(kernels, cfg, arrays)
  return out, (arrays, ra, ca)


def _recompute_bwd(kernels, cfg, res, cts):
  arrays, ra, ca = res
  cdt = V.compute_dtype(arrays["a"].dtype, arrays["b"].dtype)
  row_ct, col_ct = cts
  ra = {**ra, **{"g_" + k: v.astype(cdt) for k, v in row_ct.items()}}
  ca = {**ca, **{"g_" + k: v.astype(cdt) for k, v in col_ct.items()}}
  g = _sweep(kernels[-1], cfg, {**arrays, "ra": ra, "ca": ca}, state=False, grads=True)
  return (_gradients(arrays, g),)


def _gradients(arrays: dict, g: dict, factor=1.0) -> dict:
  """The cotangents of ``arrays`` from the sweep's unscaled ``da``, ``db``, ``ds``, ``dsum``."""
  scale = arrays["scale"].astype(g["da"].dtype) * factor
  return {
    "a": (g["da"] * scale).astype(arrays["a"].dtype),
    "b": (g["db"] * scale).astype(arrays["b"].dtype),
    "scale": (g["ds"] * factor).astype(arrays["scale"].dtype),
    "bias": (g["dsum"] * factor).astype(arrays["bias"].dtype),
    "ra": jax.tree.map(lambda _: None, arrays["ra"]),
    "ca": jax.tree.map(lambda _: None, arrays["ca"]),
  }


recompute.defvjp(_recompute_fwd, _recompute_bwd)


# ----------------------------------------------------------------------------
# Strategy "store": a weighted total and its gradients in one sweep.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def store(kernel, cfg: Sweep, arrays: dict):
  """``sum_i g_i loss_i`` with ``g = ra["g_loss"]`` (no gradient) and the kernel's row ``loss``.

  One sweep runs the kernel's `update` and `cotangent` on each tile, so the
  gradients of the total are formed in the forward pass; the backward pass
  scales them by the total's cotangent. A row with ``g_i = 0`` contributes 0
  whatever its loss (no ``0 · inf``).
  """
  return _store_fwd(kernel, cfg, arrays)[0]


def _store_fwd(kernel, cfg, arrays):
  out = _sweep(kernel, cfg, arrays, state=True, grads=True)
  loss = kernel.finish(out["rows"], out["cols"])[0]["loss"]
  g = arrays["ra"]["g_loss"].astype(loss.dtype)
  total = jnp.sum(jnp.where(g != 0, g * loss, 0.0))
  return total, (arrays, out)


def _store_bwd(kernel, cfg, res, ct):
  del kernel, cfg
  arrays, out = res
  return (_gradients(arrays, out, ct.astype(out["da"].dtype)),)


store.defvjp(_store_fwd, _store_bwd)
