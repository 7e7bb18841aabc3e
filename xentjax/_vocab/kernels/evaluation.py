"""What streaming evaluation needs per token, in one sweep: loss, tie-shared top-k, Brier.

`xentjax.evaluate` reports, per counted token, the loss, the top-1 and top-k
credit with ties shared (``clip((k - g) / t, 0, 1)`` with ``g`` classes
strictly above the label's logit and ``t`` tied with it), the confidence and
the Brier score. From hidden states the logits exist only a tile at a time,
and the label's logit is known only once its tile has passed, so ``g`` and
``t`` cannot be counted directly in one sweep. They are not needed in
general: the credit is 0 unless the label is among the ``k`` largest logits,
so the kernel keeps, per token and online,

==========  ==================================================================
``m``       the row maximum
``zy``      the label's logit (gathered, exactly the tile's number; ``zl``
            out, and ``zy`` out relative to ``m``)
``so``      ``sum_{j != y} exp(a_j - m)`` (the Brier score's other mass; the
            softmax's sum ``s`` is ``so + exp(zy - m)``, formed at the end)
``sq``      ``sum_{j != y} exp(2 (a_j - m))``
``topv``    the ``k`` largest logits, with multiplicity, descending
``tail``    how many logits equal the ``k``-th of them (those beyond the
            ``k`` slots included)
==========  ==================================================================

and at the end: below the ``k``-th value the credit is 0; above it every
class at or above the label is among the ``k`` slots (``g`` and ``t``
counted there); at it, ``t`` is ``tail``. So the tie-shared credits are exact
from one sweep, for the cost per tile of a `lax.top_k` over the ``k`` best
blocks' columns (`_top_candidates`) and the running ``k`` values, and one
comparison of the tile with the new ``k``-th value. The blocks' maxima also
give the row's maximum, and the label's logit is gathered: the passes over a
tile are the block maxima, the other classes' exponentials and their two
sums, and that comparison.
Without gradient: evaluation only (``cotangent`` raises).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from xentjax._vocab.kernel import Finished, Kernel, LogSumExp, Rows, State, TileCotangent
from xentjax._vocab.tiles import Tile, Tiling, finite


@dataclasses.dataclass(frozen=True)
class EvaluationStats(Kernel):
  """The statistics above for the ``top_k`` of the caller (``k >= 1``, at most V).

  Operands: ``rows["labels"]`` (int32 ``[n]``, in range). One device or a
  data-parallel placement (no vocabulary axis: the caller's mesh shards the
  tokens only).
  """

  top_k: int = 1

  outputs = ("m", "log_s", "zy", "zl", "so", "sq", "topv", "tail")

  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt) -> State:
    del p, n_cols, tiling
    f = lambda v: jnp.full((n,), v, cdt)
    st = {"m": f(-jnp.inf), "zy": f(0.0), "so": f(0.0), "sq": f(0.0)}
    st["topv"] = jnp.full((n, self.top_k), -jnp.inf, cdt)
    st["tail"] = jnp.zeros((n,), jnp.int32)
    return st, {}

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    """The sums are relative to the running max (rescaled when it grows).

    The passes over the tile: the block maxima (the row's maximum is theirs,
    and `_top_candidates` reads them), the other classes' exponentials and
    their two sums, and the count at the ``k``-th value. The label's logit
    is gathered, and the full sum ``s`` is ``so`` plus the label's term,
    added once at the end (`finish`).
    """
    st, cols = state
    z, labels = tile.a, rows["labels"]
    blocks = _blocks(z, self.top_k)
    m = jnp.maximum(st["m"], jnp.max(z if blocks is None else blocks[1], axis=1))
    shift = finite(m)
    scale = jnp.exp(st["m"] - shift)  # 0 while m was -inf
    other = jnp.where(tile.col == labels[:, None], 0.0, jnp.exp(z - shift[:, None]))
    new = {
      "m": m,
      "zy": st["zy"] + _label_logit(z, labels - tile.col[0, 0]),
      "so": st["so"] * scale + jnp.sum(other, axis=1),
      "sq": st["sq"] * (scale * scale) + jnp.sum(other * other, axis=1),
    }
    new["topv"], new["tail"] = self.top_update(st["topv"], st["tail"], z, blocks)
    return new, cols

  def top_update(self, topv, tail, z, blocks):
    """The ``k`` largest values after one more tile, and the count at the ``k``-th.

    ``blocks``: the tile's `_blocks` (None for a tile too narrow to split).
    """
    k = self.top_k
    merged = _largest(jnp.concatenate([topv, _top_candidates(z, k, blocks)], axis=1), k)
    kth_old, kth = topv[:, k - 1], merged[:, k - 1]
    # Old logits equal to the new k-th value: all of them when it did not move
    # (`tail`), else only the old slots (anything at it is above the old k-th).
    # Empty slots hold -inf but are no logits: `tail` counts real ones only.
    count = lambda a: _count(a == kth[:, None])
    return merged, jnp.where(kth_old == kth, tail, count(topv)) + count(z)

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    st, _ = state
    if tiling.placement.vocab_axis is not None:
      raise NotImplementedError("EvaluationStats shards the tokens only, not the vocabulary.")
    s = st["so"] + jnp.exp(st["zy"] - finite(st["m"]))  # the label's own term, once
    ms, s = LogSumExp(st["m"], s).combine(tiling.placement)
    out = {"m": ms, "log_s": jnp.log(s), "zy": st["zy"] - ms, "zl": st["zy"]}
    return out | {k: st[k] for k in ("so", "sq", "topv", "tail")}, {}

  def cotangent(self, tile: Tile, rows: Rows) -> TileCotangent:
    raise NotImplementedError("EvaluationStats is a forward-only (evaluation) kernel.")


# Columns per block of `_top_candidates`: a tile's k largest logits lie in its
# k blocks of largest maximum, so a top-k over k * 32 candidates replaces one
# over the tile's width (1,024 columns when measured; `xentjax.evaluate` now
# sweeps 2,048): about 2.5x less work per tile on the CPU, where `lax.top_k`
# of a [2048, 1024] tile cost half its matmul.
_TOP_BLOCK = 32


def _blocks(z, k: int):
  """``(zb, maxima)``: the tile ``z`` ``[n, c]`` as ``[n, c / b, b]`` blocks of `_TOP_BLOCK`
  columns and each block's maximum ``[n, c / b]``; None where the width is
  not a multiple of the block or the tile has fewer than ``2k`` blocks.
  """
  n, c = z.shape
  count = c // _TOP_BLOCK
  if c % _TOP_BLOCK or count < 2 * k:
    return None
  zb = z.reshape(n, count, _TOP_BLOCK)
  return zb, jnp.max(zb, axis=2)


def _top_candidates(z, k: int, blocks):
  """Logits of each row of the tile ``z`` among which its ``k`` largest are, multiplicity kept.

  The tile's columns are split into blocks of `_TOP_BLOCK` (``blocks``, from
  `_blocks`); every one of a row's ``k`` largest values (as a multiset) lies
  in the ``k`` blocks whose maxima are largest (a value in any other block
  has ``k`` block maxima at or above it, so a tie at worst), and those
  blocks' columns are returned. Without blocks (None) the tile is returned
  whole.
  """
  if blocks is None:
    return z
  zb, maxima = blocks
  n = z.shape[0]
  _, best = lax.top_k(maxima, k)
  return jnp.take_along_axis(zb, best[:, :, None], axis=1).reshape(n, k * _TOP_BLOCK)


def _label_logit(z, index):
  """``z[i, index[i]]`` where ``index[i]`` is a column of the tile ``z`` ``[n, c]``, else 0.

  A gather: the label's logit exactly as the tile holds it, without a pass
  over the tile.
  """
  c = z.shape[1]
  inside = (index >= 0) & (index < c)
  value = jnp.take_along_axis(z, jnp.clip(index, 0, c - 1)[:, None], axis=1)[:, 0]
  return jnp.where(inside, value, jnp.zeros((), z.dtype))


def _largest(a, k: int):
  """The ``k`` largest values of each row of ``a`` ``[n, c]`` (``c >= k``), descending, with multiplicity.

  ``lax.top_k(a, k)[0]`` for rows without NaN, from ``k`` rounds of a row
  maximum below the previous one and its count (cheap for the few
  candidate columns of `_top_candidates`, where `lax.top_k` and a sort
  cost more on the CPU).
  """
  values, ends = [], []
  end = jnp.zeros(a.shape[:1], jnp.int32)
  v = None
  for _ in range(k):
    below = a if v is None else jnp.where(a < v[:, None], a, -jnp.inf)
    v = jnp.max(below, axis=1)
    end = end + _count(a == v[:, None])
    values.append(v)
    ends.append(end)
  slots = []
  for s in range(k):  # slot s holds the first value whose run reaches past it
    out = values[-1]
    for v, e in zip(values[-2::-1], ends[-2::-1]):
      out = jnp.where(e > s, v, out)
    slots.append(out)
  return jnp.stack(slots, axis=1)


def _count(hits):
  """How many entries of each row of the boolean ``hits`` ``[n, c]`` are True, as int32.

  Summed as floats (exact: a row of a tile has far fewer than 2**24 entries),
  which XLA's CPU backend vectorizes; its integer sums run about twice as
  long, and the count of the tile's logits at the ``k``-th value is one more
  pass over every tile.
  """
  return jnp.sum(jnp.where(hits, 1.0, 0.0), axis=1).astype(jnp.int32)


def tie_shared_credit(topv, tail, z_label, k: int):
  """``(top-1 credit, top-k credit)`` from the kernel's ``topv``, ``tail`` and the raw label logit.

  With ``g`` logits strictly above the label's and ``t`` equal to it, the
  top-k credit is ``clip((k - g) / t, 0, 1)`` (`xentjax.metrics.top_k_accuracy`).
  """
  kth, top = topv[:, k - 1], topv[:, 0]
  zl = z_label[:, None]
  g = jnp.sum(topv > zl, axis=1)
  t = jnp.where(z_label == kth, tail, jnp.sum(topv == zl, axis=1))
  t = jnp.maximum(t, 1).astype(topv.dtype)
  credit_k = jnp.where(z_label < kth, 0.0, jnp.clip((k - g.astype(topv.dtype)) / t, 0.0, 1.0))
  t1 = jnp.where(top == kth, tail, jnp.sum(topv == top[:, None], axis=1))
  credit_1 = jnp.where(z_label == top, 1.0 / jnp.maximum(t1, 1).astype(topv.dtype), 0.0)
  return credit_1, credit_k
