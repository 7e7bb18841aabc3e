"""Contrastive cross-entropy: CLIP/InfoNCE, SigLIP and NT-Xent without the batch × batch matrix.

Each loss is a kernel of the pair sweep (`xentjax._pairs`): what a tile of
``z = scale · a bᵀ (+ bias)`` adds to per-row and per-column states, and the
cotangent of a tile. The entry points check the inputs, build the per-row and
per-column inputs, and turn the kernels' outputs into a loss with ordinary
differentiable JAX code (labels' logits, masks, reductions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from xentjax import _core
from xentjax import _validation as V
from xentjax._api import public, where_mask
from xentjax._pairs import Sweep, recompute, safe_max, store
from xentjax._vocab.placement import place

__all__ = ["Retrieval", "contrastive_loss", "ntxent", "sigmoid_contrastive_loss"]


class Retrieval(NamedTuple):
  """Retrieval accuracy of the positives, one entry per requested k (last axis).

  ``a_to_b``: how often row i's positive column is among the top k of its row
  (``b_to_a``: row i among the top k of column ``labels[i]``'s column; None
  when ``labels`` is given). Ties get fractional credit (`xentjax.metrics`).
  """

  a_to_b: jax.Array
  b_to_a: jax.Array | None


# ----------------------------------------------------------------------------
# Kernels.


def _online(m, s, z, axis):
  """The online log-sum-exp state ``(m, s)`` after one more block ``z`` along ``axis``."""
  m_new = jnp.maximum(m, jnp.max(z, axis=axis))
  shift = safe_max(m_new)
  s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(z - jnp.expand_dims(shift, axis)), axis=axis)
  return m_new, s


def _lse(m, s):
  return safe_max(m) + jnp.log(s)


def _keep(aux, x, axis, fill):
  """``x`` where ``aux["valid"]`` (rows: ``axis=0``, columns: ``axis=1``), else ``fill``.

  Without a mask (no ``valid`` entry) every pair counts and ``x`` is returned as it is.
  """
  if "valid" not in aux:
    return x
  return jnp.where(jnp.expand_dims(aux["valid"], 1 - axis), x, fill)


def _counts(hit, tie, axis):
  return jnp.sum(hit, axis=axis, dtype=jnp.int32), jnp.sum(tie, axis=axis, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True)
class SoftmaxKernel:
  """Row (and column) log-sum-exps of the valid logits, and the ranks of the positives.

  Inputs: ``ra`` has ``valid`` and ``y`` (the positive column), ``ca`` has
  ``valid`` and ``cid`` (the global column index); with ``ranks`` also
  ``thr`` (the positive's logit: of row i in ``ra``, of column j's own row j
  in ``ca``) and ``ra["rid"]``.
  """

  by_column: bool  # also the column states (the b -> a direction)
  ranks: bool

  def rows(self, n, dt):
    st = {"m": jnp.full((n,), -jnp.inf, dt), "s": jnp.zeros((n,), dt)}
    if self.ranks:
      st.update(gt=jnp.zeros((n,), jnp.int32), tie=jnp.zeros((n,), jnp.int32))
    return st

  def columns(self, m, dt):
    return self.rows(m, dt) if self.by_column else {}

  def update(self, rows, cols, z, ra, ca):
    zr = _keep(ca, z, 1, -jnp.inf)
    rows = {**rows, **dict(zip(("m", "s"), _online(rows["m"], rows["s"], zr, 1)))}
    if self.ranks:
      other = _keep(ca, ca["cid"][None, :] != ra["y"][:, None], 1, False)
      gt, tie = _counts(other & (z > ra["thr"][:, None]), other & (z == ra["thr"][:, None]), 1)
      rows.update(gt=rows["gt"] + gt, tie=rows["tie"] + tie)
    if not self.by_column:
      return rows, cols
    zc = _keep(ra, z, 0, -jnp.inf)
    cols = {**cols, **dict(zip(("m", "s"), _online(cols["m"], cols["s"], zc, 0)))}
    if self.ranks and "thr" in ca:  # the columns' positives are known (no `labels`)
      other = _keep(ra, ra["rid"][:, None] != ca["cid"][None, :], 0, False)
      gt, tie = _counts(other & (z > ca["thr"][None, :]), other & (z == ca["thr"][None, :]), 0)
      cols.update(gt=cols["gt"] + gt, tie=cols["tie"] + tie)
    return rows, cols

  def finish(self, rows, cols):
    def out(st):
      lse = _lse(st["m"], st["s"])
      ranks = {k: st[k].astype(lse.dtype) for k in ("gt", "tie") if self.ranks}
      return {"lse": lse, **ranks}

    return out(rows), (out(cols) if self.by_column else {})

  def cotangent(self, z, ra, ca):
    zr = _keep(ca, z, 1, -jnp.inf)
    dz = ra["g_lse"][:, None] * jnp.exp(zr - safe_max(ra["lse"])[:, None])
    if self.by_column:
      zc = _keep(ra, z, 0, -jnp.inf)
      dz = dz + ca["g_lse"][None, :] * jnp.exp(zc - safe_max(ca["lse"])[None, :])
    return dz


@dataclasses.dataclass(frozen=True)
class SigmoidKernel:
  """Row sums of ``-log σ(±(z_ij))`` over the valid columns (``+`` at the positive column).

  Inputs: ``ra`` has ``y`` (the positive column) and ``g_loss`` (the row
  weights of strategy "store", or the cotangent of the row losses); ``ca``
  has ``valid`` and ``cid``. The gradient is elementwise:
  ``d loss_i / d z_ij = σ(z_ij) - [j = y_i]``.
  """

  def rows(self, n, dt):
    return {"loss": jnp.zeros((n,), dt)}

  def columns(self, m, dt):
    return {}

  def update(self, rows, cols, z, ra, ca):
    pos = ca["cid"][None, :] == ra["y"][:, None]
    terms = -jax.nn.log_sigmoid(jnp.where(pos, z, -z))
    return {"loss": rows["loss"] + jnp.sum(_keep(ca, terms, 1, 0.0), axis=1)}, cols

  def finish(self, rows, cols):
    return {"loss": rows["loss"]}, {}

  def cotangent(self, z, ra, ca):
    pos = ca["cid"][None, :] == ra["y"][:, None]
    dz = jax.nn.sigmoid(z) - pos.astype(z.dtype)
    return _keep(ca, ra["g_loss"][:, None] * dz, 1, 0.0)


@dataclasses.dataclass(frozen=True)
class NegativesKernel:
  """NT-Xent, first pass: ``neg_i``, the log-sum-exp of row i over its negatives.

  Negatives of row i are the columns with another label (``ra``/``ca``
  ``label``); the row itself and its positives are left out.
  """

  def rows(self, n, dt):
    return {"m": jnp.full((n,), -jnp.inf, dt), "s": jnp.zeros((n,), dt)}

  def columns(self, m, dt):
    return {}

  def update(self, rows, cols, z, ra, ca):
    neg = ra["label"][:, None] != ca["label"][None, :]
    m, s = _online(rows["m"], rows["s"], jnp.where(neg, z, -jnp.inf), 1)
    return {"m": m, "s": s}, cols

  def finish(self, rows, cols):
    return {"neg": _lse(rows["m"], rows["s"])}, {}


@dataclasses.dataclass(frozen=True)
class PositivesKernel:
  """NT-Xent, second pass: ``loss_i = sum_{j positive} softplus(neg_i - z_ij)``.

  Positives of row i: the other rows with its label. Each positive pair is
  one cross-entropy over the pair and the row's negatives, ``log(e^{z_ij} +
  e^{neg_i}) - z_ij``. Also ``gsum_i = sum_j σ(neg_i - z_ij)`` (the weight of
  ``neg_i`` in the gradient) and ``count_i``, the number of positives.
  """

  def rows(self, n, dt):
    return {k: jnp.zeros((n,), dt) for k in ("loss", "gsum", "count")}

  def columns(self, m, dt):
    return {}

  def _pos(self, ra, ca):
    same = ra["label"][:, None] == ca["label"][None, :]
    return same & (ra["rid"][:, None] != ca["cid"][None, :]), ~same

  def update(self, rows, cols, z, ra, ca):
    pos, _ = self._pos(ra, ca)
    gap = ra["neg"][:, None] - z
    add = {
      "loss": jnp.where(pos, jax.nn.softplus(gap), 0.0),
      "gsum": jnp.where(pos, jax.nn.sigmoid(gap), 0.0),
      "count": pos.astype(z.dtype),
    }
    return {k: rows[k] + jnp.sum(v, axis=1) for k, v in add.items()}, cols

  def finish(self, rows, cols):
    return dict(rows), {}

  def cotangent(self, z, ra, ca):
    pos, neg = self._pos(ra, ca)
    p_neg = jnp.exp(jnp.where(neg, z, -jnp.inf) - safe_max(ra["neg"])[:, None])
    d = ra["gsum"][:, None] * p_neg - jnp.where(pos, jax.nn.sigmoid(ra["neg"][:, None] - z), 0.0)
    return ra["g_loss"][:, None] * d


# ----------------------------------------------------------------------------
# Argument checks shared by the entry points.


def _positive_chunk(name: str, value) -> int | None:
  if value is None or (V.is_int(value) and value >= 1):
    return value
  raise ValueError(f"`{name}` must be None (automatic) or a positive int, got {V.describe(value)}.")


def _check_scale(value):
  """A Python number must be > 0 (a scale, not a temperature); arrays pass (they may be traced)."""
  if isinstance(value, (bool, str)):
    raise TypeError(f"`scale` must be a positive number or a scalar array, got {value!r}.")
  if V.is_real(value) and not value > 0:
    raise ValueError(
      f"`scale` must be > 0 (the logits are scale · a bᵀ; CLIP learns scale = exp(t)), got {value!r}."
    )
  return value


def _check_k(value):
  if value is None:
    return None
  ks = (value,) if V.is_int(value) else value
  if not isinstance(ks, (tuple, list)) or not ks or not all(V.is_int(k) and k >= 1 for k in ks):
    raise ValueError(
      f"`retrieval_k` must be None, a positive int or a tuple of them, got {V.describe(value)}."
    )
  return tuple(int(k) for k in ks)


def _check_pair(a, b, labels):
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


def _check_rows(name: str, x, n: int):
  if x is not None and x.shape != (n,):
    raise ValueError(f"`{name}` must have shape ({n},) (one entry per row of `a`), got {x.shape}.")
  return x


def _sweep_config(n_rows, n_cols, row_chunk, column_chunk, precision, mesh, data_axis) -> Sweep:
  """The static `Sweep` of one call; a clear error for a mesh that cannot hold it."""
  n = 1
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
    n = Sweep(mesh=mesh, axis=data_axis).ring_size()
    if n_rows % n or n_cols % n:
      raise ValueError(
        f"The data axis {data_axis!r} of `mesh` has {n} devices, which must divide the rows of "
        f"`a` ({n_rows}) and of `b` ({n_cols}); pad the batch to a multiple of {n} and mask the "
        "padding out with `where`."
      )
  return Sweep(
    row_chunk=max(1, min(row_chunk or Sweep.row_chunk, n_rows // n)),
    column_chunk=max(1, min(column_chunk or Sweep.column_chunk, n_cols // n)),
    precision=precision,
    mesh=mesh,
    axis=data_axis,
  )


def _placed(arrays: dict, cfg: Sweep) -> dict:
  """The arrays of a sweep, their rows sharded over the ring (unchanged on one device)."""
  if cfg.mesh is None:
    return arrays

  def put(x):
    return place(x, cfg.mesh, P(cfg.axis, *([None] * (x.ndim - 1))))

  return {k: v if k in ("scale", "bias") else jax.tree.map(put, v) for k, v in arrays.items()}


def _scalar(name: str, value, dtype):
  x = jnp.asarray(value)
  if x.shape != ():
    raise ValueError(f"`{name}` must be a scalar, got an array of shape {x.shape}.")
  return x.astype(dtype)


class _Pairs(NamedTuple):
  """Which pairs count: the positive column of each row, and the masks."""

  y: jax.Array  # [B] int32: the positive column of each row
  counted: jax.Array  # [B] bool: the row's loss counts
  bad: jax.Array  # [B] bool: counted, but its label is not a column (NaN)
  row_valid: jax.Array  # [B] bool: the row is a candidate (of the columns' direction)
  col_valid: jax.Array  # [M] bool: the column is a candidate


def _pairs(labels, where, n_rows: int, n_cols: int) -> _Pairs:
  where = _check_rows("where", where_mask(where), n_rows)
  ones = jnp.ones((n_rows,), bool)
  row_valid = ones if where is None else where
  if labels is None:  # the pairs (a_i, b_i): a masked pair leaves both directions
    y = jnp.arange(n_rows, dtype=jnp.int32)
    return _Pairs(y, row_valid, jnp.zeros((n_rows,), bool), row_valid, row_valid)
  V.check_integer("labels", labels)
  status = _core.label_status(
    _check_rows("labels", jnp.asarray(labels), n_rows), n_cols, where=where
  )
  return _Pairs(status.index, status.counted, status.bad, row_valid, jnp.ones((n_cols,), bool))


def _reduce(per_row, counted, reduction: str):
  """``reduction`` of per-row values over the counted rows (the mean of none is NaN)."""
  if per_row.ndim > 1:
    counted = counted[:, None]
  if reduction == "none":
    return jnp.where(counted, per_row, 0.0)
  total = jnp.sum(jnp.where(counted, per_row, 0.0), axis=0)
  if reduction == "sum":
    return total
  return _core.mean_or_nan(total, jnp.sum(counted, axis=0))


_TILES = {
  "row_chunk_size": lambda v: _positive_chunk("row_chunk_size", v),
  "column_chunk_size": lambda v: _positive_chunk("column_chunk_size", v),
}
_SWEEP_OPTIONS = ("row_chunk_size", "column_chunk_size", "precision", "mesh", "data_axis")


# ----------------------------------------------------------------------------
# CLIP / InfoNCE.


@public(
  ("symmetric", "reduction", "retrieval_k", *_SWEEP_OPTIONS),
  validators={"scale": _check_scale, "retrieval_k": _check_k, **_TILES},
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
      scalar array, differentiable; a Python number must be > 0.
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
    The positives' logits :math:`s\, a_i \cdot b_{y_i}` are a row-wise
    product (their gradient is ordinary autodiff); the ranks compare them with
    the tiles' logits. A candidate equal to the positive in exact arithmetic
    (a duplicate) ties with it up to the rounding of the two sums.

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
  a, b = _check_pair(a, b, labels)
  if labels is not None and mesh is not None:
    raise ValueError("`labels` cannot be combined with `mesh`: the ring pairs row i with row i.")
  cfg = _sweep_config(
    a.shape[0], b.shape[0], row_chunk_size, column_chunk_size, precision, mesh, data_axis
  )
  pairs = _pairs(labels, where, a.shape[0], b.shape[0])
  cdt = V.compute_dtype(a.dtype, b.dtype)
  s = _scalar("scale", scale, cdt)
  b_y = b if labels is None else jnp.take(b, pairs.y, axis=0)
  zy = s * jnp.sum(a.astype(cdt) * b_y.astype(cdt), axis=1)  # the positives' logits
  ranks, diagonal = retrieval_k is not None, labels is None
  # Masks enter the tiles only when there is one (else every tile would select).
  ra = {"y": pairs.y} | ({} if where is None else {"valid": pairs.row_valid})
  ca = {"cid": jnp.arange(b.shape[0], dtype=jnp.int32)}
  if where is not None and diagonal:  # a masked pair also leaves the columns
    ca["valid"] = pairs.col_valid
  if ranks:
    ra.update(thr=jax.lax.stop_gradient(zy), rid=jnp.arange(a.shape[0], dtype=jnp.int32))
    if diagonal:
      ca["thr"] = ra["thr"]
  kernel = SoftmaxKernel(by_column=symmetric or (ranks and diagonal), ranks=ranks)
  arrays = {"a": a, "b": b, "scale": s, "bias": jnp.zeros((), cdt), "ra": ra, "ca": ca}
  row, col = recompute((kernel,), cfg, _placed(arrays, cfg))
  per_row = row["lse"] - zy
  if symmetric:
    col_lse = col["lse"] if diagonal else jnp.take(col["lse"], pairs.y)
    per_row = 0.5 * (per_row + (col_lse - zy))
  loss = _reduce(jnp.where(pairs.bad, jnp.nan, per_row), pairs.counted, reduction)
  if not ranks:
    return loss
  credit = _credit(row, zy, retrieval_k, pairs, reduction)
  return loss, Retrieval(
    credit, _credit(col, zy, retrieval_k, pairs, reduction) if diagonal else None
  )


def _credit(st, zy, ks, pairs: _Pairs, reduction):
  """The top-k credit of each row's positive from its rank, for each k, reduced."""
  c = jnp.stack([_core.top_k_credit(st["gt"], st["tie"] + 1, k) for k in ks], axis=-1)
  nan = pairs.bad | jnp.isnan(st["lse"] - zy)
  return _reduce(jnp.where(nan[:, None], jnp.nan, c), pairs.counted, reduction)


# ----------------------------------------------------------------------------
# SigLIP.


@public(
  ("reduction", "strategy", *_SWEEP_OPTIONS),
  validators={"scale": _check_scale, **_TILES},
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
    scale: :math:`s`, a scalar array (differentiable); a Python number must be > 0.
    bias: :math:`\beta`, a scalar array (differentiable; SigLIP starts at -10).
    labels: optional ``[B]`` integer positive column of each row (out of
      range: NaN for that row).
    where: optional ``[B]`` boolean (or 0/1 integer) mask of the rows that
      count; without ``labels`` a masked pair also leaves the columns.
    reduction: ``"mean"`` over counted rows (NaN if none), ``"sum"`` or
      ``"none"`` (``[B]``: :math:`\ell_i`, 0 where masked).
    strategy: ``"store"`` (default for ``"mean"``/``"sum"``) or
      ``"recompute"`` (default, and the only one, for ``"none"``).
    row_chunk_size, column_chunk_size, precision, mesh, data_axis: as in
      `xentjax.contrastive_loss` (with a mesh, ``labels`` are allowed).

  Returns:
    The loss, float32 for 16-bit inputs, else the promoted dtype.

  References:
    X. Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023.
  """
  a, b = _check_pair(a, b, labels)
  if strategy not in (None, "store", "recompute"):
    raise ValueError(f'`strategy` must be None, "store" or "recompute", got {strategy!r}.')
  if strategy == "store" and reduction == "none":
    raise ValueError('strategy="store" needs a reduced loss; use "recompute" for reduction="none".')
  cfg = _sweep_config(
    a.shape[0], b.shape[0], row_chunk_size, column_chunk_size, precision, mesh, data_axis
  )
  pairs = _pairs(labels, where, a.shape[0], b.shape[0])
  cdt = V.compute_dtype(a.dtype, b.dtype)
  ca = {"cid": jnp.arange(b.shape[0], dtype=jnp.int32)}
  if where is not None and labels is None:  # a masked pair also leaves the columns
    ca["valid"] = pairs.col_valid
  arrays = {
    "a": a,
    "b": b,
    "scale": _scalar("scale", scale, cdt),
    "bias": _scalar("bias", bias, cdt),
  }
  arrays.update(ra={"y": pairs.y}, ca=ca)
  if (strategy or ("recompute" if reduction == "none" else "store")) == "recompute":
    (row, _) = recompute((SigmoidKernel(),), cfg, _placed(arrays, cfg))
    return _reduce(jnp.where(pairs.bad, jnp.nan, row["loss"]), pairs.counted, reduction)
  count = jnp.sum(pairs.counted)
  weight = 1.0 / jnp.maximum(count, 1).astype(cdt) if reduction == "mean" else jnp.ones((), cdt)
  g = jnp.where(pairs.bad, jnp.nan, jnp.where(pairs.counted, weight, 0.0))
  arrays["ra"]["g_loss"] = g
  total = store(SigmoidKernel(), cfg, _placed(arrays, cfg))
  return jnp.where(count == 0, jnp.nan, total) if reduction == "mean" else total


# ----------------------------------------------------------------------------
# NT-Xent (SimCLR), as optax has it.


@public(_SWEEP_OPTIONS, validators=_TILES)
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
  cfg = _sweep_config(n, n, row_chunk_size, column_chunk_size, precision, mesh, data_axis)
  cdt = V.compute_dtype(e.dtype)
  eps = jnp.finfo(e.dtype).eps  # optax's cosine similarity: norms clipped at sqrt(eps)
  u = (
    e.astype(cdt) / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(e.astype(cdt)), axis=1), eps))[:, None]
  )
  ids = jnp.arange(n, dtype=jnp.int32)
  arrays = {"a": u, "b": u, "scale": 1.0 / _scalar("temperature", temperature, cdt)}
  arrays.update(
    bias=jnp.zeros((), cdt), ra={"label": labels, "rid": ids}, ca={"label": labels, "cid": ids}
  )
  row, _ = recompute((NegativesKernel(), PositivesKernel()), cfg, _placed(arrays, cfg))
  return _core.mean_or_nan(jnp.sum(row["loss"]), jax.lax.stop_gradient(jnp.sum(row["count"])))
