"""The softmax statistics of a head: cross-entropy and token statistics as one kernel.

Per token, with ``a`` the (capped, tempered) logits and ``m`` their maximum,
accumulated online one tile at a time:

==========  ==================================================================
``m``       the row maximum (a shift without gradient)
``log_s``   ``log sum_j exp(a_j - m)``, so ``lse = m + log_s``
``zy``      ``a_y - m``, the label's logit relative to the maximum
``zu``      ``sum_j u_j (a_j - m)`` for a column weight ``u`` (label smoothing:
            ``u = 1/V``, or PyTorch's class weights ``u = c/V``)
``ent``     ``sum_j p_j (a_j - m) = E - m``, with ``E = sum_j p_j a_j``
            (the entropy is ``H = log_s - ent``)
==========  ==================================================================

plus, without gradient, the argmax, the top-k, the maxima per token and
per ``filter_chunk`` columns that gradient filtering decides from and, for
monitoring beside a loss (``monitor``), ``credit``: the label's top-1 credit
(1 for the only maximum, ``1/t`` for a maximum shared by ``t`` classes, 0
below it, as `xentjax.metrics.correct`), from a running count of the classes
at the running maximum. The cotangent of a tile is

.. math::

  \\frac{\\partial}{\\partial a_j} = g_{\\log s}\\, p_j + g_{z_y} [j = y]
    + g_{zu}\\, u_j + g_{E}\\, p_j (1 + a_j - E).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from xentjax._vocab.kernel import Finished, Kernel, LogSumExp, Rows, State, TileCotangent, grad
from xentjax._vocab.placement import vocab_gather, vocab_min, vocab_sum
from xentjax._vocab.tiles import Tile, Tiling, finite, log_shifted_sum

# The index of a top-k slot no class has filled yet: after every real index.
NO_CLASS = jnp.iinfo(jnp.int32).max


def best_k(vals, idxs, k: int):
  """The `k` largest `vals` per row and their `idxs`; ties (``-inf`` too) by the lowest index.

  So each class appears once, and classes of probability 0 follow the others
  in index order (a slot still `NO_CLASS` sorts last).
  """
  neg, idx = lax.sort((-vals, idxs), dimension=1, num_keys=2)
  return -neg[:, :k], idx[:, :k]


@dataclasses.dataclass(frozen=True)
class SoftmaxStats(Kernel):
  """The statistics above; the flags say which beyond ``(m, log_s, zy)`` to keep.

  ``monitor`` adds ``ent`` (without gradient, unless ``entropy``), ``amax``
  and ``credit``: what a trainer reads beside the loss, from the same sweep;
  without it the kernel keeps none of their state and does none of their work.
  Operands: ``rows["labels"]`` (int32 ``[n]``) and, with ``weighted_sum``,
  ``cols["u"]`` (the column weights ``[V]``).
  """

  weighted_sum: bool = False
  entropy: bool = False
  argmax: bool = False
  top_k: int = 0
  filter_chunk: int = 0  # columns per maximum kept for gradient filtering (0: none)
  monitor: bool = False

  integer_outputs = ("amax", "topi")

  @property
  def outputs(self):
    ent = ("ent",) * (self.monitor and not self.entropy)
    extra = ["amax"] * (self.argmax or self.monitor) + ["topv", "topi"] * bool(self.top_k)
    return ("m", "log_s", "zy", *self.differentiable[2:], *ent, *extra, *["credit"] * self.monitor)

  @property
  def differentiable(self):
    return ("log_s", "zy") + ("zu",) * self.weighted_sum + ("ent",) * self.entropy

  @property
  def saved(self):
    return ("lse",) + ("m", "ent") * self.entropy + self.tile_saved

  @property
  def tile_saved(self):
    return ("tmax",) * bool(self.filter_chunk)

  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt) -> State:
    st = LogSumExp.empty(n, cdt).as_state() | {"zy": jnp.zeros((n,), cdt)}
    if self.weighted_sum:
      st["zu"] = jnp.zeros((n,), cdt)
      st["u_seen"] = jnp.zeros((n,), cdt)  # the column weight seen so far
    if self.entropy or self.monitor:
      st["t"] = jnp.zeros((n,), cdt)
    if self.argmax or self.monitor:
      st["amax"] = jnp.zeros((n,), jnp.int32)
    if self.monitor:
      st["n_top"] = jnp.zeros((n,), jnp.int32)  # classes at the running maximum
    if self.top_k:
      st["topv"] = jnp.full((n, self.top_k), -jnp.inf, cdt)
      st["topi"] = jnp.full((n, self.top_k), NO_CLASS, jnp.int32)
    if self.filter_chunk:
      st["tmax"] = jnp.full((n, -(-n_cols // self.filter_chunk)), -jnp.inf, cdt)
    return st, {}

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    """`s` is relative to the running max ``m``; so are `zu` (re-shifted by the
    column weight seen so far when ``m`` grows) and `t` (``sum e^{a-m} (a - m)``,
    re-shifted with ``s``)."""
    st, cols = state
    z, col = tile.a, tile.col
    if self.filter_chunk:  # the row maxima from the per-chunk ones: one reduction
      tmax = chunk_maxima(z, self.filter_chunk)
      zmax = jnp.max(tmax, axis=1)
    else:
      tmax, zmax = None, jnp.max(z, axis=1)
    m_old = st["m"]
    lse, scale, e = LogSumExp.from_state(st).step(z, zmax=zmax)
    ms_old, ms_new = finite(m_old), finite(lse.m)
    new = lse.as_state() | {
      "zy": st["zy"] + jnp.sum(jnp.where(col == rows["labels"][:, None], z, 0.0), axis=1),
    }
    if self.weighted_sum or self.entropy or self.monitor:
      zr = jnp.where(jnp.isfinite(z), z - ms_new[:, None], 0.0)
    if self.weighted_sum:  # a -inf logit with weight (a masked class under smoothing) is -inf
      u_c = tile.cols["u"][None, :]
      zu = jnp.sum(jnp.where(u_c > 0, u_c * (z - ms_new[:, None]), 0.0), axis=1)
      new["zu"] = st["zu"] - st["u_seen"] * (ms_new - ms_old) + zu
      new["u_seen"] = st["u_seen"] + jnp.sum(u_c.astype(z.dtype))
    if self.entropy or self.monitor:
      new["t"] = scale * (st["t"] - (ms_new - ms_old) * st["s"]) + jnp.sum(e * zr, axis=1)
    new.update(self.update_choices(st, z, col, zmax, m_old, tile.cols.get("order")))
    if tmax is not None:  # the tile's columns start at a multiple of `filter_chunk`
      new["tmax"] = lax.dynamic_update_slice_in_dim(
        st["tmax"], tmax, tile.v0 // self.filter_chunk, 1
      )
    return new, cols

  def update_choices(self, st, z, col, zmax, m_old, order=None):
    """The argmax and the top-k after one more tile.

    With a column order (``vocab_order=``), ``order`` holds the classes of
    the tile's columns: the argmax is a class, the lowest among tied ones.
    """
    new = {}
    if self.monitor:  # finite logits at the running maximum (all -inf: counted in `finish`)
      n_t = jnp.sum((z == zmax[:, None]) & jnp.isfinite(z), axis=1).astype(jnp.int32)
      grew, same = zmax > m_old, zmax == m_old
      new["n_top"] = jnp.where(grew, n_t, jnp.where(same, st["n_top"] + n_t, st["n_top"]))
    if (self.argmax or self.monitor) and order is not None:
      tied = jnp.where(z == zmax[:, None], order[None, :], NO_CLASS)
      best = jnp.min(tied, axis=1).astype(jnp.int32)  # the lowest class at the tile's max
      same = jnp.where(zmax == m_old, jnp.minimum(st["amax"], best), st["amax"])
      new["amax"] = jnp.where(zmax > m_old, best, same)
    elif self.argmax or self.monitor:  # strictly greater: the lowest index wins ties
      new["amax"] = jnp.where(
        zmax > m_old, col[0, 0] + jnp.argmax(z, axis=1).astype(jnp.int32), st["amax"]
      )
    if self.top_k:
      tv, ti = lax.top_k(z, min(self.top_k, z.shape[1]))
      vals = jnp.concatenate([st["topv"], tv], axis=1)
      idxs = jnp.concatenate([st["topi"], col[0, 0] + ti], axis=1)
      new["topv"], new["topi"] = best_k(vals, idxs, self.top_k)
    return new

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    """The statistics of the whole vocabulary, combined across its shards."""
    st, _ = state
    pl = tiling.placement
    lse = LogSumExp.from_state(st)
    m, s, zy, t, zu = lse.m, lse.s, vocab_sum(st["zy"], pl), st.get("t"), st.get("zu")
    m_all, ms, scale = shift = lse.shift(pl)
    if scale is not None:  # t and zu are relative to this shard's maximum: re-shifted to ms
      ms_loc = finite(m)
      if t is not None:
        t = vocab_sum(scale * (t + (ms_loc - ms) * s), pl)
      if zu is not None:
        zu = vocab_sum(zu + st["u_seen"] * (ms_loc - ms), pl)
      ms, s = lse.combine(pl, shift=shift)
    # A scaled tile (a temperature, a soft cap) can round the maximum's own
    # term below e^0 (`log_shifted_sum`) and its ``a - m`` above 0: log_s >= 0
    # and t <= 0 are restored, so that a log-probability is <= 0 and a
    # cross-entropy and an entropy are >= 0.
    out = {"m": ms, "log_s": log_shifted_sum(s, m_all), "zy": zy - ms}
    out["lse"] = ms + out["log_s"]
    if zu is not None:
      out["zu"] = zu
    if t is not None:  # a row with every logit -inf has t = s = 0: ent 0, not 0/0
      out["ent"] = jnp.minimum(t, 0.0) / jnp.where(s > 0, s, 1.0)
    if self.monitor:
      out["credit"] = top1_credit(st["n_top"], m, m_all, zy, tiling)
    return out | self.finish_choices(st, m, m_all, pl), {}

  def finish_choices(self, st, m, m_all, pl):
    """The argmax, the top-k and the per-chunk maxima of the whole vocabulary."""
    out = {k: st[k] for k in ("amax", "topv", "topi", "tmax") if k in st}
    if pl.vocab_axis is None:
      return out
    if self.argmax or self.monitor:  # the lowest global index among the shards holding the max
      big = jnp.iinfo(jnp.int32).max
      out["amax"] = vocab_min(jnp.where(m == m_all, st["amax"], big), pl)
    if self.top_k:  # k candidates per shard
      vals, idxs = vocab_gather(st["topv"], pl), vocab_gather(st["topi"], pl)
      out["topv"], out["topi"] = best_k(vals, idxs, self.top_k)
    return out

  def cotangent(self, tile: Tile, r: Rows) -> TileCotangent:
    z, col = tile.a, tile.col
    p = jnp.exp(z - finite_lse(r["lse"])[:, None])  # every logit -inf: p = 0, not NaN
    dz = grad(r, "log_s")[:, None] * p
    if self.entropy:  # d(E - m)/da = p (1 + a - E), with a - E = (a - m) - ent; 0 where p is
      de = (grad(r, "ent")[:, None] * p) * (1.0 + (z - r["m"][:, None]) - r["ent"][:, None])
      dz = dz + jnp.where(p > 0, de, 0.0)
    dz = dz + jnp.where(col == r["labels"][:, None], grad(r, "zy")[:, None], 0.0)
    if self.weighted_sum:
      dz = dz + grad(r, "zu")[:, None] * tile.cols["u"].astype(dz.dtype)[None, :]
    return {"a": dz}

  def filter_terms(self, r):
    live = (
      (grad(r, "log_s") != 0) | (grad(r, "ent") != 0) if self.entropy else grad(r, "log_s") != 0
    )
    logp = jnp.where(live[:, None], r["tmax"] - r["lse"][:, None], -jnp.inf)
    return logp, r["labels"], grad(r, "zy") != 0


def finite_lse(lse):
  """``lse``, with 0 for a row whose every logit is ``-inf`` (``lse = -inf``).

  So ``a - lse`` is ``-inf`` there (probability 0), never ``-inf - -inf``.
  """
  return jnp.where(lse == -jnp.inf, 0.0, lse)


def token_logprob(zy, log_s):
  """``log p_y = zy - log_s``; ``-inf`` with a zero gradient when every logit is ``-inf``."""
  empty = log_s == -jnp.inf
  return jnp.where(empty, -jnp.inf, zy - jnp.where(empty, 0.0, log_s))


def token_entropy(log_s, ent):
  """``H = log_s - ent``; 0 with a zero gradient when every logit is ``-inf``.

  Such a row is no distribution: every log-probability is ``-inf`` (the loss
  is ``+inf``), and the entropy is the sum of its terms ``0 log 0 = 0``
  (docs/conventions.md).
  """
  empty = log_s == -jnp.inf
  return jnp.where(empty, 0.0, jnp.where(empty, 0.0, log_s) - ent)


def chunk_maxima(z, chunk: int):
  """`[n, ceil(columns / chunk)]`: the maximum of each `chunk` columns of `z` (-inf padded)."""
  n, width = z.shape
  k = -(-width // chunk)
  if k * chunk != width:
    z = jnp.pad(z, ((0, 0), (0, k * chunk - width)), constant_values=-jnp.inf)
  return jnp.max(z.reshape(n, k, chunk), axis=2)


def top1_credit(n_top, m, m_all, zy, tiling):
  """The label's top-1 credit from the (local) count of classes at the maximum.

  ``zy`` is the label's logit itself (not yet shifted), ``m`` this shard's
  maximum and ``m_all`` the global one: the classes at the maximum are
  counted on the shards that hold it. A row whose every logit is ``-inf``
  ties all ``num_classes`` classes (credit ``1/V``); a NaN or ``+inf``
  maximum gives NaN.
  """
  pl = tiling.placement
  if pl.vocab_axis is not None:
    n_top = vocab_sum(jnp.where(m == m_all, n_top, 0), pl)
  n = jnp.where(m_all == -jnp.inf, tiling.num_classes, n_top).astype(zy.dtype)
  credit = jnp.where(zy == m_all, 1.0 / jnp.maximum(n, 1.0), 0.0)
  return jnp.where(jnp.isnan(m_all) | (m_all == jnp.inf), jnp.nan, credit)
