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
``s``       ``sum_j exp(a_j - m)``
``zy``      the label's logit (exactly the tile's number; ``zl`` out, and
            ``zy`` out relative to ``m``)
``so``      ``sum_{j != y} exp(a_j - m)`` (the Brier score's other mass)
``sq``      ``sum_{j != y} exp(2 (a_j - m))``
``topv``    the ``k`` largest logits, with multiplicity, descending
``tail``    how many logits equal the ``k``-th of them (those beyond the
            ``k`` slots included)
==========  ==================================================================

and at the end: below the ``k``-th value the credit is 0; above it every
class at or above the label is among the ``k`` slots (``g`` and ``t``
counted there); at it, ``t`` is ``tail``. So the tie-shared credits are exact
from one sweep, for the cost of a per-tile `lax.top_k`, a sort of ``2k``
numbers per token and one comparison of the tile with the new ``k``-th value.
Without gradient: evaluation only (``cotangent`` raises).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from xentjax._vocab.kernel import Finished, Kernel, LogSumExp, Rows, State, TileCotangent
from xentjax._vocab.tiles import Tile, Tiling


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
    st = {**LogSumExp.empty(n, cdt).as_state(), "zy": f(0.0), "so": f(0.0), "sq": f(0.0)}
    st["topv"] = jnp.full((n, self.top_k), -jnp.inf, cdt)
    st["tail"] = jnp.zeros((n,), jnp.int32)
    return st, {}

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    """The sums are relative to the running max (rescaled when it grows)."""
    st, cols = state
    z, label = tile.a, tile.col == rows["labels"][:, None]
    lse, scale, e = LogSumExp.from_state(st).step(z)
    other = jnp.where(label, 0.0, e)
    new = {
      **lse.as_state(),
      "zy": st["zy"] + jnp.sum(jnp.where(label, z, 0.0), axis=1),
      "so": st["so"] * scale + jnp.sum(other, axis=1),
      "sq": st["sq"] * (scale * scale) + jnp.sum(other * other, axis=1),
    }
    new["topv"], new["tail"] = self.top_update(st["topv"], st["tail"], z)
    return new, cols

  def top_update(self, topv, tail, z):
    """The ``k`` largest values after one more tile, and the count at the ``k``-th."""
    k = self.top_k
    tile_top, _ = lax.top_k(z, min(k, z.shape[1]))
    merged = -lax.sort(-jnp.concatenate([topv, tile_top], axis=1), dimension=1)[:, :k]
    kth_old, kth = topv[:, k - 1], merged[:, k - 1]
    # Old logits equal to the new k-th value: all of them when it did not move
    # (`tail`), else only the old slots (anything at it is above the old k-th).
    # Empty slots hold -inf but are no logits: `tail` counts real ones only.
    count = lambda a: jnp.sum(a == kth[:, None], axis=1, dtype=jnp.int32)
    return merged, jnp.where(kth_old == kth, tail, count(topv)) + count(z)

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    st, _ = state
    if tiling.placement.vocab_axis is not None:
      raise NotImplementedError("EvaluationStats shards the tokens only, not the vocabulary.")
    ms, s = LogSumExp.from_state(st).combine(tiling.placement)
    out = {"m": ms, "log_s": jnp.log(s), "zy": st["zy"] - ms, "zl": st["zy"]}
    return out | {k: st[k] for k in ("so", "sq", "topv", "tail")}, {}

  def cotangent(self, tile: Tile, rows: Rows) -> TileCotangent:
    raise NotImplementedError("EvaluationStats is a forward-only (evaluation) kernel.")


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
