"""Contrastive losses at any batch size: the entry points of the contrastive kernels.

`contrastive_loss` (CLIP/InfoNCE), `sigmoid_contrastive_loss` (SigLIP) and
`ntxent` (SimCLR) check their inputs, build the engine's operands (the rows
of ``a`` as tokens, the rows of ``b`` as the columns of a "vd" head, the
scale as a traced temperature ``1/scale``), run one kernel of
`xentjax._vocab.kernels.contrastive` and turn its per-row and per-column
outputs into a loss with ordinary differentiable JAX code (the positives'
logits, masks, reductions). With a mesh the columns travel around a ring of
the devices of the data axis (`xentjax._vocab.placement.Placement`,
``ring=True``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from xentjax import _core
from xentjax import _validation as V
from xentjax._api import public, where_mask
from xentjax._vocab.engine import run_recompute
from xentjax._vocab.kernels.contrastive import (
  ContrastiveSoftmax,
  CriticBounds,
  NtXent,
  SigmoidPairs,
)
from xentjax._vocab.options import check_chunk, check_temperature
from xentjax._vocab.placement import Operands, Placement, axis_size, working_mesh
from xentjax._vocab.reduce import WeightedRows, store_and_reduce
from xentjax._vocab.tiles import RECOMPUTE_TILE, TEMPERATURE, Tiling, auto_chunks

__all__ = [
  "Retrieval",
  "contrastive_loss",
  "critic_statistics",
  "ntxent",
  "sigmoid_contrastive_loss",
]

# The automatic tile of the recompute sweep: 1024 x 1024 float32 pair logits (4 MiB).
ROW_CHUNK = 1024
COLUMN_CHUNK = 1024


class Retrieval(NamedTuple):
  """Retrieval accuracy of the positives, one entry per requested k (last axis).

  ``a_to_b``: how often row i's positive column is among the top k of its row
  (``b_to_a``: row i among the top k of column ``labels[i]``'s column; None
  when ``labels`` is given). Ties get fractional credit (`xentjax.metrics`).
  """

  a_to_b: jax.Array
  b_to_a: jax.Array | None


def check_scale(value):
  """A Python number must be > 0 (a scale, not a temperature); arrays pass (they may be traced)."""
  if isinstance(value, (bool, str)):
    raise TypeError(f"`scale` must be a positive number or a scalar array, got {value!r}.")
  if V.is_real(value) and not (value > 0 and math.isfinite(value)):
    raise ValueError(
      "`scale` must be > 0 and finite (the logits are scale · a bᵀ; CLIP learns "
      f"scale = exp(t)), got {value!r}."
    )
  return value


def check_k(value):
  if value is None:
    return None
  ks = (value,) if V.is_int(value) else value
  if not isinstance(ks, (tuple, list)) or not ks or not all(V.is_int(k) and k >= 1 for k in ks):
    raise ValueError(
      f"`retrieval_k` must be None, a positive int or a tuple of them, got {V.describe(value)}."
    )
  return tuple(int(k) for k in ks)


def check_pair(a, b, labels) -> tuple[jax.Array, jax.Array]:
  """``(a, b)`` as ``[B, D]`` and ``[M, D]`` floating arrays; the errors name the argument."""
  V.check_floating("a", a)
  V.check_floating("b", b)
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.ndim != 2 or b.ndim != 2:
    raise ValueError(
      f"`a` and `b` must be matrices of embeddings [B, D] and [M, D], got a.shape={a.shape} "
      f"and b.shape={b.shape}."
    )
  if a.shape[1] != b.shape[1]:
    raise ValueError(
      f"`a` and `b` must have the same width D, got a.shape={a.shape} and b.shape={b.shape}."
    )
  if labels is None and a.shape[0] != b.shape[0]:
    raise ValueError(
      f"Without `labels`, row i of `a` pairs with row i of `b`, so they need the same length, "
      f"got a.shape={a.shape} and b.shape={b.shape}. Pass `labels` (the positive row of `b` "
      "for each row of `a`) for more candidates than queries."
    )
  return a, b


def check_rows(name: str, x, n: int):
  if x is not None and x.shape != (n,):
    raise ValueError(f"`{name}` must have shape ({n},) (one entry per row of `a`), got {x.shape}.")
  return x


def tiling_of(a, b, row_chunk, column_chunk, precision, mesh, data_axis, store=False):
  """The static `Tiling` of the rows of `a` against those of `b`; a clear error for a bad mesh.

  With a mesh the rows of ``a`` and ``b`` are sharded over ``data_axis`` and the
  columns travel around its ring (``Placement(ring=True)``), on the
  `placement.working_mesh` of `mesh` and the arrays. Strategy "store"
  sweeps whole rows, in token chunks of a recompute tile's size. The compute
  dtype is that of `a` and `b` (`b` may be `a`: one set of embeddings).
  """
  n_rows, n_cols, n = a.shape[0], b.shape[0], 1
  arrays, cdt = ((a,) if b is a else (a, b)), V.compute_dtype(a.dtype, b.dtype)
  if mesh is None and data_axis is not None:
    raise ValueError("`data_axis` names an axis of `mesh`; pass `mesh` too (or neither).")
  if mesh is not None:
    if getattr(mesh, "axis_names", None) is None:
      raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    shape = dict(mesh.shape)
    if data_axis is None or any(ax not in shape for ax in V.as_sequence(data_axis)):
      raise ValueError(
        f"`data_axis` must name an axis of the mesh (whose axes are {shape}), got {data_axis!r}."
      )
    n = axis_size(mesh, data_axis)
    if n_rows % n or n_cols % n:
      raise ValueError(
        f"The data axis {data_axis!r} of `mesh` has {n} devices, which must divide the rows of "
        f"`a` ({n_rows}) and of `b` ({n_cols}); pad the batch to a multiple of {n} and mask the "
        "padding out with `where`."
      )
  rows, cols = n_rows // n, n_cols // n
  if store:
    tc, vc, _ = auto_chunks("store", rows, cols, row_chunk, None, store_tile=RECOMPUTE_TILE)
  else:
    tc = min(row_chunk or ROW_CHUNK, max(rows, 1))
    vc = min(column_chunk or COLUMN_CHUNK, max(cols, 1))
  if mesh is None:
    placement = Placement()
  else:
    placement = Placement(working_mesh(mesh, *arrays), data_axis, None, n, 1, ring=True)
  return Tiling(n_cols, n_cols, True, tc, vc, precision, placement=placement, cdt=cdt)


def scalar(name: str, value, dtype):
  """A scalar argument (``scale``, ``bias``, ``temperature``) as a 0-d array of ``dtype``."""
  x = jnp.asarray(value)
  if x.shape != ():
    raise ValueError(f"`{name}` must be a scalar, got an array of shape {x.shape}.")
  return x.astype(dtype)


def inverse_scale(scale, dtype):
  """The engine's temperature ``1 / scale``: NaN unless ``scale`` is finite and > 0.

  One rule for CLIP and SigLIP, the rule of a traced temperature
  (`xentjax.linear_softmax_cross_entropy`): a scale of 0 (temperature
  ``inf``), a negative or a NaN one gives a NaN loss, never a formula value
  of a scale CLIP's ``exp(t)`` cannot take.
  """
  s = scalar("scale", scale, dtype)
  return 1.0 / jnp.where((s > 0) & (s < jnp.inf), s, jnp.nan)


class Pairs(NamedTuple):
  """Which pairs count: the positive column of each row, and the masks."""

  y: jax.Array  # [B] int32: the positive column of each row
  counted: jax.Array  # [B] bool: the row's loss counts
  bad: jax.Array  # [B] bool: counted, but its label is not a column (NaN)
  row_valid: jax.Array  # [B] bool: the row is a candidate (of the columns' direction)
  col_valid: jax.Array  # [M] bool: the column is a candidate


def pairs_of(labels, where, n_rows: int, n_cols: int) -> Pairs:
  """The checked ``labels`` and ``where`` as `Pairs` (the library's label and mask rules)."""
  where = check_rows("where", where_mask(where), n_rows)
  ones = jnp.ones((n_rows,), bool)
  row_valid = ones if where is None else where
  if labels is None:  # the pairs (a_i, b_i): a masked pair leaves both directions
    y = jnp.arange(n_rows, dtype=jnp.int32)
    return Pairs(y, row_valid, jnp.zeros((n_rows,), bool), row_valid, row_valid)
  V.check_integer("labels", labels)
  status = _core.label_status(
    check_rows("labels", jnp.asarray(labels), n_rows), n_cols, where=where
  )
  return Pairs(status.index, status.counted, status.bad, row_valid, jnp.ones((n_cols,), bool))


def reduce_rows(per_row, counted, reduction: str):
  """``reduction`` of per-row values over the counted rows (the mean of none is NaN)."""
  if per_row.ndim > 1:
    counted = counted[:, None]
  if reduction == "none":
    return jnp.where(counted, per_row, 0.0)
  total = jnp.sum(jnp.where(counted, per_row, 0.0), axis=0)
  if reduction == "sum":
    return total
  return _core.mean_or_nan(total, jnp.sum(counted, axis=0))


TILE_OPTIONS = {
  "row_chunk_size": lambda v: check_chunk("row_chunk_size", v),
  "column_chunk_size": lambda v: check_chunk("column_chunk_size", v),
}
SWEEP_OPTIONS = ("row_chunk_size", "column_chunk_size", "precision", "mesh", "data_axis")


# ----------------------------------------------------------------------------
# CLIP / InfoNCE.


@public(
  ("symmetric", "reduction", "retrieval_k", *SWEEP_OPTIONS),
  validators={"scale": check_scale, "retrieval_k": check_k, **TILE_OPTIONS},
)
def contrastive_loss(
  a: jax.typing.ArrayLike,
  b: jax.typing.ArrayLike,
  *,
  scale: jax.typing.ArrayLike = 1.0,
  labels: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  symmetric: bool = True,
  reduction: Literal["none", "mean", "sum"] = "mean",
  retrieval_k: int | tuple[int, ...] | None = None,
  row_chunk_size: int | None = None,
  column_chunk_size: int | None = None,
  precision: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  data_axis: Any = None,
):
  r"""The CLIP / InfoNCE loss of paired embeddings, without the ``[B, M]`` logits.

  With logits :math:`z = s\, a b^\top` and the positive column :math:`y_i` of
  row i (:math:`y_i = i` without ``labels``),

  .. math::

    L_{a \to b}(i) = \log \sum_j e^{z_{ij}} - z_{i y_i}, \qquad
    L_{b \to a}(i) = \log \sum_{i'} e^{z_{i' y_i}} - z_{i y_i},

  and the loss of row i is :math:`\tfrac12 (L_{a\to b} + L_{b\to a})` with
  ``symmetric=True`` (open_clip's ``ClipLoss``), :math:`L_{a\to b}` otherwise.
  Both directions come from one sweep over ``[row, column]`` tiles that keeps
  the row and column log-sum-exps; the backward pass recomputes the tiles
  (4 matmuls per tile pair in all, against 3 for the materialized loss), so
  temporary memory is O((B + M)·D + tile).

  Args:
    a: ``[B, D]`` embeddings (queries; e.g. images), floating.
    b: ``[B, D]`` embeddings paired row by row with ``a``, or ``[M, D]``
      candidates with ``labels``.
    scale: the inverse temperature :math:`s` (CLIP learns :math:`s = e^t`): a
      scalar array, differentiable; a Python number must be > 0 and finite,
      and an array that is not (0 included) gives a NaN loss.
    labels: optional ``[B]`` integers, the row of ``b`` that is row i's
      positive. Out of range: that row's loss is NaN (`xentjax.check_labels`
      raises eagerly). The :math:`b \to a` term of row i is then the
      cross-entropy of column :math:`y_i` over all rows.
    where: optional ``[B]`` boolean (or 0/1 integer) mask of the rows that
      count. A masked row leaves the loss and the columns' normalizers;
      without ``labels`` the pair leaves both directions (padding).
    symmetric: add the :math:`b \to a` direction (CLIP) or not (InfoNCE).
    reduction: ``"mean"`` over the counted rows (NaN if none), ``"sum"``, or
      ``"none"`` (``[B]``, 0 at masked rows).
    retrieval_k: an int or tuple of ints: also return the top-k retrieval
      accuracy of the positives, from the same sweep.
    row_chunk_size, column_chunk_size: the tile (default 1024 × 1024).
    precision: the matmuls' `jax.lax.Precision`.
    mesh, data_axis: shard the rows of ``a`` and ``b`` over ``data_axis`` of
      ``mesh``; the shards of ``b`` travel around a ring (no all-gather).
      Needs ``labels=None`` and B divisible by the axis size.

  Returns:
    The loss (float32 for 16-bit inputs, else the promoted dtype), reduced as
    asked; with ``retrieval_k``, ``(loss, Retrieval)`` whose fields end in an
    axis of ``len(k)`` and are reduced like the loss (``b_to_a`` is None with
    ``labels``). Ties get the library's fractional credit.

  Note:
    The positives' logits :math:`s\, a_i \cdot b_{y_i}` are read from the
    same tiles as the log-sum-exps, so each direction's cross-entropy is
    exactly :math:`\ge 0` in floating point (at any scale; CLIP's largest is
    100) and `xentjax.info.infonce_lower_bound` never passes :math:`\log B`.
    The ranks compare a row-wise product :math:`s\, a_i \cdot b_{y_i}` (known
    before the sweep) with the tiles' logits: a candidate equal to the
    positive in exact arithmetic (a duplicate) ties with it up to the
    rounding of the two sums.

  Example:
    >>> import jax.numpy as jnp, xentjax
    >>> a = jnp.eye(3)
    >>> print(round(float(xentjax.contrastive_loss(a, a, scale=100.0)), 6))
    0.0

  References:
    A. Radford et al., "Learning Transferable Visual Models From Natural
    Language Supervision", 2021; A. van den Oord et al., "Representation
    Learning with Contrastive Predictive Coding", 2018.
  """
  a, b = check_pair(a, b, labels)
  if labels is not None and mesh is not None:
    raise ValueError("`labels` cannot be combined with `mesh`: the ring pairs row i with row i.")
  tiling = tiling_of(a, b, row_chunk_size, column_chunk_size, precision, mesh, data_axis)
  cdt = tiling.cdt
  pairs = pairs_of(labels, where, a.shape[0], b.shape[0])
  t = inverse_scale(scale, cdt)  # the engine's temperature: its logits are z / t
  ranks, diagonal = retrieval_k is not None, labels is None
  # Masks enter the tiles only when there is one (else every tile would select).
  rows = {TEMPERATURE: jnp.broadcast_to(t, pairs.y.shape), "y": pairs.y}
  rows |= {} if where is None else {"valid": pairs.row_valid}
  cols = {"valid": pairs.col_valid} if where is not None and diagonal else {}
  if ranks:  # the threshold of the ranks, known before the sweep: a row-wise product
    b_y = b if diagonal else jnp.take(b, pairs.y, axis=0)
    thr = jnp.sum(a.astype(cdt) * b_y.astype(cdt), axis=1) / t
    rows.update(thr=jax.lax.stop_gradient(thr), rid=jnp.arange(pairs.y.shape[0], dtype=jnp.int32))
    if diagonal:
      cols["thr"] = rows["thr"]
  kernel = ContrastiveSoftmax(by_column=symmetric or (ranks and diagonal), ranks=ranks)
  row = run_recompute(Operands(x=a, w=b, rows=rows, cols=cols), kernel, tiling)
  col = row.get("cols", {})
  zy = row["zy"]  # the positives' logits, from the tiles of the log-sum-exps (so lse >= zy)
  per_row = row["lse"] - zy
  if symmetric:
    col_lse = col["lse"] if diagonal else jnp.take(col["lse"], pairs.y)
    per_row = 0.5 * (per_row + (col_lse - zy))
  loss = reduce_rows(jnp.where(pairs.bad, jnp.nan, per_row), pairs.counted, reduction)
  if not ranks:
    return loss
  a_to_b = credit(row, zy, retrieval_k, pairs, reduction)
  return loss, Retrieval(
    a_to_b, credit(col, zy, retrieval_k, pairs, reduction) if diagonal else None
  )


def credit(st, zy, ks, pairs: Pairs, reduction):
  """The top-k credit of each row's positive from its rank, for each k, reduced."""
  c = jnp.stack([_core.top_k_credit(st["gt"], st["tie"] + 1, k) for k in ks], axis=-1)
  nan = pairs.bad | jnp.isnan(st["lse"] - zy)
  return reduce_rows(jnp.where(nan[:, None], jnp.nan, c), pairs.counted, reduction)


# ----------------------------------------------------------------------------
# SigLIP.


@public(
  ("reduction", "strategy", *SWEEP_OPTIONS),
  validators={"scale": check_scale, **TILE_OPTIONS},
)
def sigmoid_contrastive_loss(
  a: jax.typing.ArrayLike,
  b: jax.typing.ArrayLike,
  *,
  scale: jax.typing.ArrayLike = 1.0,
  bias: jax.typing.ArrayLike = 0.0,
  labels: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  reduction: Literal["none", "mean", "sum"] = "mean",
  strategy: Literal["store", "recompute"] | None = None,
  row_chunk_size: int | None = None,
  column_chunk_size: int | None = None,
  precision: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  data_axis: Any = None,
):
  r"""The SigLIP loss of paired embeddings, without the ``[B, M]`` logits.

  Every pair is a binary classification: with :math:`z_{ij} = s\, a_i \cdot
  b_j + \beta` and :math:`\sigma_{ij} = +1` at the positive column
  :math:`y_i` (:math:`y_i = i` without ``labels``), :math:`-1` elsewhere,

  .. math::

    \ell_i = -\sum_j \log \sigma(\sigma_{ij} z_{ij}), \qquad
    L = \frac{1}{B} \sum_i \ell_i

  (big_vision's sigmoid loss). The gradient is elementwise,
  :math:`\partial \ell_i / \partial z_{ij} = \sigma(z_{ij}) - [j = y_i]`, so
  strategy ``"store"`` forms the gradients of the reduced loss in the forward
  sweep (3 matmuls, as many as the materialized loss); ``"recompute"``
  recomputes the tiles in the backward pass (the only one for
  ``reduction="none"``). Temporary memory is O((B + M)·D + tile) either way.

  Args:
    a: ``[B, D]`` embeddings, floating.
    b: ``[B, D]`` (or ``[M, D]`` with ``labels``), floating.
    scale: :math:`s`, a scalar array (differentiable); a Python number must be
      > 0 and finite, and an array that is not (0 included) gives a NaN loss.
    bias: :math:`\beta`, a scalar array (differentiable; SigLIP starts at -10).
    labels: optional ``[B]`` integer positive column of each row (out of
      range: NaN for that row).
    where: optional ``[B]`` boolean (or 0/1 integer) mask of the rows that
      count; without ``labels`` a masked pair also leaves the columns.
    reduction: ``"mean"`` over counted rows (NaN if none), ``"sum"`` or
      ``"none"`` (``[B]``: :math:`\ell_i`, 0 where masked).
    strategy: ``"store"`` (whole rows in chunks of ``row_chunk_size``; the
      default for ``"mean"``/``"sum"`` on one device) or ``"recompute"`` (the
      default, and the only one, for ``reduction="none"``, with ``mesh`` or
      with ``column_chunk_size``).
    row_chunk_size, column_chunk_size, precision, mesh, data_axis: as in
      `xentjax.contrastive_loss` (with a mesh, ``labels`` are allowed).

  Returns:
    The loss, float32 for 16-bit inputs, else the promoted dtype.

  References:
    X. Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023.
  """
  a, b = check_pair(a, b, labels)
  if strategy not in (None, "store", "recompute"):
    raise ValueError(f'`strategy` must be None, "store" or "recompute", got {strategy!r}.')
  if strategy == "store" and reduction == "none":
    raise ValueError('strategy="store" needs a reduced loss; use "recompute" for reduction="none".')
  strategy = strategy or (
    "recompute"
    if reduction == "none" or mesh is not None or column_chunk_size is not None
    else "store"
  )
  if strategy == "store" and (mesh is not None or column_chunk_size is not None):
    raise ValueError(
      'strategy="store" sweeps whole rows on one device; use "recompute" with `mesh` or '
      "`column_chunk_size`."
    )
  store = strategy == "store"
  tiling = tiling_of(a, b, row_chunk_size, column_chunk_size, precision, mesh, data_axis, store)
  pairs = pairs_of(labels, where, a.shape[0], b.shape[0])
  cdt = tiling.cdt
  t = inverse_scale(scale, cdt)
  # The engine's logits are (a b + bias_col) / t, so the bias enters as bias * t.
  bias_col = jnp.broadcast_to(scalar("bias", bias, cdt) * t, (b.shape[0],))
  rows = {TEMPERATURE: jnp.broadcast_to(t, pairs.y.shape), "y": pairs.y}
  cols = {"valid": pairs.col_valid} if where is not None and labels is None else {}
  ops = Operands(x=a, w=b, bias=bias_col, rows=rows, cols=cols)
  if strategy == "recompute":
    out = run_recompute(ops, SigmoidPairs(), tiling)
    return reduce_rows(jnp.where(pairs.bad, jnp.nan, out["loss"]), pairs.counted, reduction)
  w = jnp.where(pairs.bad, jnp.nan, jnp.where(pairs.counted, 1.0, 0.0)).astype(cdt)
  dens = {"weight": jnp.sum(pairs.counted).astype(cdt)} if reduction == "mean" else {}
  ops = dataclasses.replace(ops, aux={"weight": w})
  loss, _ = store_and_reduce(ops, tiling, SigmoidPairs(), WeightedRows("loss"), dens)
  return loss


# ----------------------------------------------------------------------------
# NT-Xent (SimCLR), as optax has it.


@public(SWEEP_OPTIONS, validators={"temperature": check_temperature, **TILE_OPTIONS})
def ntxent(
  embeddings: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  temperature: jax.typing.ArrayLike = 0.07,
  *,
  row_chunk_size: int | None = None,
  column_chunk_size: int | None = None,
  precision: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  data_axis: Any = None,
) -> jax.Array:
  r"""NT-Xent (SimCLR) with optax's call and answers, without the ``[N, N]`` similarities.

  With cosine similarities :math:`z_{ij} = \cos(e_i, e_j) / T`, the
  positives :math:`P_i` of row i (the other rows with its label) and its
  negatives :math:`N_i` (the rows with another label; the row itself is
  neither),

  .. math::

    L = \frac{1}{\sum_i |P_i|} \sum_i \sum_{j \in P_i}
      -\log \frac{e^{z_{ij}}}{e^{z_{ij}} + \sum_{k \in N_i} e^{z_{ik}}}.

  Two sweeps (the negatives' log-sum-exp, then the positive pairs) and a
  recomputing backward pass; memory O(N·D + tile).

  Args:
    embeddings: ``[N, D]`` floating.
    labels: ``[N]`` integers; rows with equal labels are positive pairs.
    temperature: :math:`T`, a scalar (array or number; differentiable).
    row_chunk_size, column_chunk_size, precision, mesh, data_axis: as in
      `xentjax.contrastive_loss`.

  Returns:
    A scalar, NaN when no row has a positive (as optax's 0/0).

  References:
    T. Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations", 2020.
  """
  V.check_floating("embeddings", embeddings)
  V.check_integer("labels", labels)
  e, labels = jnp.asarray(embeddings), jnp.asarray(labels)
  if e.ndim != 2 or labels.shape != e.shape[:1]:
    raise ValueError(
      "`embeddings` must be [N, D] and `labels` [N] (the same leading dimension), got "
      f"embeddings.shape={e.shape} and labels.shape={labels.shape}."
    )
  n = e.shape[0]
  tiling = tiling_of(e, e, row_chunk_size, column_chunk_size, precision, mesh, data_axis)
  cdt = tiling.cdt
  eps = jnp.finfo(e.dtype).eps  # optax's cosine similarity: norms clipped at sqrt(eps)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(e.astype(cdt)), axis=1), eps))
  u = e.astype(cdt) / norm[:, None]
  t = jnp.broadcast_to(scalar("temperature", temperature, cdt), (n,))
  rows = {TEMPERATURE: t, "label": labels, "rid": jnp.arange(n, dtype=jnp.int32)}
  out = run_recompute(Operands(x=u, w=u, rows=rows, cols={"label": labels}), NtXent(), tiling)
  return _core.mean_or_nan(jnp.sum(out["loss"]), jax.lax.stop_gradient(jnp.sum(out["count"])))


# ----------------------------------------------------------------------------
# The rows of the variational bounds on mutual information (`xentjax.info`).


def critic_statistics(
  a, b, scale, bias, *, row_chunk_size, column_chunk_size, precision, mesh, data_axis
) -> dict:
  """The rows of `CriticBounds` on the scores ``scale · a bᵀ + bias``, without forming them.

  ``{"lse", "zy", "lse_off", "sp_off"}``, each ``[B]``, differentiable with
  respect to ``a``, ``b``, ``scale`` and ``bias`` (`xentjax.info` turns them
  into bounds). Row i's positive is column i; with ``mesh`` the columns
  travel around the ring of ``data_axis``.
  """
  a, b = check_pair(a, b, None)
  n = a.shape[0]
  tiling = tiling_of(a, b, row_chunk_size, column_chunk_size, precision, mesh, data_axis)
  cdt = tiling.cdt
  t = inverse_scale(scale, cdt)  # NaN unless finite and > 0, as for CLIP and SigLIP
  # The engine's logits are (a b + bias_col) / t, so the bias enters as bias * t.
  bias_col = jnp.broadcast_to(scalar("bias", bias, cdt) * t, (n,))
  rows = {TEMPERATURE: jnp.broadcast_to(t, (n,)), "y": jnp.arange(n, dtype=jnp.int32)}
  ops = Operands(x=a, w=b, bias=bias_col, rows=rows)
  return run_recompute(ops, CriticBounds(), tiling)
