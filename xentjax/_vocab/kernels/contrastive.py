"""Contrastive losses as kernels: CLIP/InfoNCE, SigLIP and NT-Xent over pair logits.

The head is the second modality: ``x = a`` (``[B, D]``, the rows) and ``w =
b`` in the "vd" layout (``[M, D]``, the columns), so a tile is a block of
``a bᵀ``; the scale is a traced temperature ``T = 1/scale`` (the tile's
``a`` are the pair logits ``scale · a_i·b_j``, plus ``bias`` for SigLIP).
Per-token operands (``rows``): ``y`` (the positive column of each row),
``rid`` (the row's global index), ``valid`` (a row mask, present only when
there is one), ``thr`` (the positive's logit, for ranks), ``label`` (NT-Xent
groups). Per-column operands (``tile.cols``): ``valid``, ``thr``, ``label``.

=======================  ==================================================
`ContrastiveSoftmax`     row and column log-sum-exps (CLIP's two
                         directions) and the ranks of the positives
`SigmoidPairs`           SigLIP's row sums of ``-log σ(±z)``
`NtXent`                 two passes: each row's negatives' log-sum-exp,
                         then the cross-entropy of each positive pair
`CriticBounds`           the row statistics of the variational bounds on
                         mutual information (InfoNCE, NWJ, DV, JS)
=======================  ==================================================
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from xentjax._vocab.kernel import Finished, Kernel, LogSumExp, Rows, State, TileCotangent, grad
from xentjax._vocab.placement import column_sum
from xentjax._vocab.tiles import Tile, Tiling, finite


def keep(operands: dict, x, axis: int, fill):
  """``x`` where ``operands["valid"]`` (rows: ``axis=0``, columns: ``axis=1``), else ``fill``.

  Without a mask (no ``valid`` operand) every pair counts and ``x`` is returned as it is.
  """
  if "valid" not in operands:
    return x
  return jnp.where(jnp.expand_dims(operands["valid"], 1 - axis), x, fill)


def counts(hit, tie, axis):
  return jnp.sum(hit, axis=axis, dtype=jnp.int32), jnp.sum(tie, axis=axis, dtype=jnp.int32)


def online(st: dict, z, axis: int, name: str = "") -> dict:
  """``st`` with its log-sum-exp (``"m" + name``, ``"s" + name``) after one more block ``z``."""
  return {**st, **LogSumExp.from_state(st, name).update(z, axis).as_state(name)}


@dataclasses.dataclass(frozen=True)
class ContrastiveSoftmax(Kernel):
  """Row (and column) log-sum-exps of the valid pair logits, the positives' logits and ranks.

  ``lse`` per row and ``zy``, the positive's logit ``z_{i y_i}`` picked out of
  the same tile (``L_{a→b} = lse - zy``), and, with ``by_column``, ``lse``
  per column (``L_{b→a}``); with ``ranks`` the counts of logits above
  (``gt``) and tied with (``tie``) the positive's, the positive itself left
  out, per row and, when ``cols["thr"]`` is given (no labels), per column.
  The cotangent is ``g_row p_row + g_col p_col + g_zy [j = y_i]``.

  Every cross-entropy is exactly ``>= 0`` in floating point: ``zy`` is a
  maximum over the tile's own logits (a maximum, so no addition can absorb
  the tile's product into a fused multiply-add), hence at most the row's
  maximum, which ``lse`` never falls below (`LogSumExp.lse`). A positive's logit
  formed by other arithmetic (a row-wise product) can round an ulp above the
  maximum: at a scale of 100, a loss of ``-4e-6``.
  """

  by_column: bool = True
  ranks: bool = False

  @property
  def outputs(self):
    return ("lse", "zy") + ("gt", "tie") * self.ranks

  differentiable = ("lse", "zy")
  saved = ("lse",)

  @property
  def column_outputs(self):
    return (("lse",) + ("gt", "tie") * self.ranks) if self.by_column else ()

  @property
  def column_differentiable(self):
    return ("lse",) if self.by_column else ()

  @property
  def column_saved(self):
    return ("lse",) if self.by_column else ()

  def state(self, n, cdt):
    st = LogSumExp.empty(n, cdt).as_state()
    if self.ranks:
      st.update(gt=jnp.zeros((n,), jnp.int32), tie=jnp.zeros((n,), jnp.int32))
    return st

  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt) -> State:
    tok = {**self.state(n, cdt), "zy": jnp.full((n,), -jnp.inf, cdt)}
    return tok, (self.state(n_cols, cdt) if self.by_column else {})

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    tok, col = state
    z, cols = tile.a, tile.cols
    tok = {
      **online(tok, keep(cols, z, 1, -jnp.inf), 1),
      "zy": jnp.maximum(
        tok["zy"], jnp.max(jnp.where(tile.col == rows["y"][:, None], z, -jnp.inf), 1)
      ),
    }
    if self.ranks:
      other = keep(cols, tile.col != rows["y"][:, None], 1, False)
      thr = rows["thr"][:, None]
      gt, tie = counts(other & (z > thr), other & (z == thr), 1)
      tok.update(gt=tok["gt"] + gt, tie=tok["tie"] + tie)
    if not self.by_column:
      return tok, col
    col = online(col, keep(rows, z, 0, -jnp.inf), 0)
    if self.ranks and "thr" in cols:  # the columns' positives are known (no labels)
      other = keep(rows, rows["rid"][:, None] != tile.col, 0, False)
      thr = cols["thr"][None, :]
      gt, tie = counts(other & (z > thr), other & (z == thr), 0)
      col.update(gt=col["gt"] + gt, tie=col["tie"] + tie)
    return tok, col

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    tok, col = state
    pl = tiling.placement

    def out(st, columns: bool):
      o = {"lse": LogSumExp.from_state(st).lse(pl, columns=columns)}
      for k in ("gt", "tie") if self.ranks else ():
        o[k] = column_sum(st[k], pl) if columns else st[k]
        o[k] = o[k].astype(o["lse"].dtype)
      return o

    return {**out(tok, False), "zy": tok["zy"]}, (out(col, True) if self.by_column else {})

  def cotangent(self, tile: Tile, r: Rows) -> TileCotangent:
    z, cols = tile.a, tile.cols
    dz = grad(r, "lse")[:, None] * jnp.exp(keep(cols, z, 1, -jnp.inf) - finite(r["lse"])[:, None])
    dz = dz + jnp.where(tile.col == r["y"][:, None], grad(r, "zy")[:, None], 0.0)
    if self.by_column:
      p_col = jnp.exp(keep(r, z, 0, -jnp.inf) - finite(cols["lse"])[None, :])
      dz = dz + grad(cols, "lse")[None, :] * p_col
    return {"a": dz}


@dataclasses.dataclass(frozen=True)
class SigmoidPairs(Kernel):
  """SigLIP: ``loss_i = -sum_j log σ(±z_ij)`` over the valid columns, ``+`` at column ``y_i``.

  The gradient is elementwise, ``d loss_i / d z_ij = σ(z_ij) - [j = y_i]``,
  which strategy "store" forms in the forward pass.
  """

  outputs = ("loss",)
  differentiable = ("loss",)

  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt) -> State:
    return {"loss": jnp.zeros((n,), cdt)}, {}

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    tok, col = state
    z = tile.a
    terms = -jax.nn.log_sigmoid(jnp.where(tile.col == rows["y"][:, None], z, -z))
    return {"loss": tok["loss"] + jnp.sum(keep(tile.cols, terms, 1, 0.0), axis=1)}, col

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    return {"loss": state[0]["loss"]}, {}

  def cotangent(self, tile: Tile, r: Rows) -> TileCotangent:
    z = tile.a
    dz = jax.nn.sigmoid(z) - (tile.col == r["y"][:, None]).astype(z.dtype)
    return {"a": keep(tile.cols, grad(r, "loss")[:, None] * dz, 1, 0.0)}


@dataclasses.dataclass(frozen=True)
class NtXent(Kernel):
  """NT-Xent (SimCLR) in two passes over the same tiles.

  Negatives of row i: the columns with another ``label``; positives: the
  other columns with its label (the row itself is neither). Pass 0 finishes
  ``neg_i``, the log-sum-exp over the negatives; pass 1 sums, over the
  positives, ``softplus(neg_i - z_ij) = log(e^{z_ij} + e^{neg_i}) - z_ij``
  (``loss``), ``σ(neg_i - z_ij)`` (``gsum``, the weight of ``neg_i`` in the
  gradient) and 1 (``count``).
  """

  passes = 2
  outputs = ("loss", "count")
  differentiable = ("loss",)
  saved = ("neg", "gsum")

  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt) -> State:
    if p == 0:
      return LogSumExp.empty(n, cdt).as_state(), {}
    return {k: jnp.zeros((n,), cdt) for k in ("loss", "gsum", "count")}, {}

  def pairs(self, tile, rows):
    same = rows["label"][:, None] == tile.cols["label"][None, :]
    return same & (rows["rid"][:, None] != tile.col), ~same

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    tok, col = state
    z = tile.a
    pos, neg = self.pairs(tile, rows)
    if p == 0:
      return LogSumExp.from_state(tok).update(jnp.where(neg, z, -jnp.inf)).as_state(), col
    gap = rows["neg"][:, None] - z
    add = {
      "loss": jnp.where(pos, jax.nn.softplus(gap), 0.0),
      "gsum": jnp.where(pos, jax.nn.sigmoid(gap), 0.0),
      "count": pos.astype(z.dtype),
    }
    return {k: tok[k] + jnp.sum(v, axis=1) for k, v in add.items()}, col

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    tok = state[0]
    return ({"neg": LogSumExp.from_state(tok).lse()} if p == 0 else dict(tok)), {}

  def cotangent(self, tile: Tile, r: Rows) -> TileCotangent:
    z = tile.a
    pos, neg = self.pairs(tile, r)
    p_neg = jnp.exp(jnp.where(neg, z, -jnp.inf) - finite(r["neg"])[:, None])
    d = r["gsum"][:, None] * p_neg - jnp.where(pos, jax.nn.sigmoid(r["neg"][:, None] - z), 0.0)
    return {"a": grad(r, "loss")[:, None] * d}


@dataclasses.dataclass(frozen=True)
class CriticBounds(Kernel):
  """The row statistics of the variational bounds on mutual information, in one sweep.

  The tile is a block of the critic's scores ``S_ij = scale a_i·b_j + bias``;
  the positive of row i is column ``y_i`` (``rows["y"]``, the diagonal).
  Per row: ``lse`` over every column (InfoNCE), ``zy = S_{i y_i}`` read from
  the same tile (so ``lse - zy >= 0`` exactly, as in `ContrastiveSoftmax`),
  ``lse_off`` over the other columns (NWJ and Donsker-Varadhan) and
  ``sp_off = sum_{j != y_i} softplus(S_ij)`` (Jensen-Shannon). The bounds
  themselves are formed outside, from these rows. The cotangent is

  ``g_lse p_ij + g_zy [j = y_i] + [j != y_i] (g_off e^{S_ij - lse_off} + g_sp σ(S_ij))``.
  """

  outputs = ("lse", "zy", "lse_off", "sp_off")
  differentiable = ("lse", "zy", "lse_off", "sp_off")
  saved = ("lse", "lse_off")

  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt) -> State:
    neg, zero = jnp.full((n,), -jnp.inf, cdt), jnp.zeros((n,), cdt)
    empty = LogSumExp.empty(n, cdt)
    return {**empty.as_state(), **empty.as_state("_off"), "zy": neg, "sp_off": zero}, {}

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    st, col = state
    z, pos = tile.a, tile.col == rows["y"][:, None]
    new = {
      **LogSumExp.from_state(st).update(z).as_state(),
      **LogSumExp.from_state(st, "_off").update(jnp.where(pos, -jnp.inf, z)).as_state("_off"),
      "zy": jnp.maximum(st["zy"], jnp.max(jnp.where(pos, z, -jnp.inf), axis=1)),
      "sp_off": st["sp_off"] + jnp.sum(jnp.where(pos, 0.0, jax.nn.softplus(z)), axis=1),
    }
    return new, col

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    st = state[0]
    return {
      "lse": LogSumExp.from_state(st).lse(),
      "zy": st["zy"],
      "lse_off": LogSumExp.from_state(st, "_off").lse(),
      "sp_off": st["sp_off"],
    }, {}

  def cotangent(self, tile: Tile, r: Rows) -> TileCotangent:
    z, pos = tile.a, tile.col == r["y"][:, None]
    g = lambda name: grad(r, name)[:, None]
    dz = g("lse") * jnp.exp(z - finite(r["lse"])[:, None])
    off = g("lse_off") * jnp.exp(z - finite(r["lse_off"])[:, None])
    off = off + g("sp_off") * jax.nn.sigmoid(z)
    return {"a": dz + jnp.where(pos, g("zy"), off)}
