"""Teacher-student divergences as kernels: forward/reverse KL, generalized JSD, top-k.

With ``a`` the student's tempered logits and ``b`` the teacher's (one tile of
each; `tiles.Tile`), per token:

* forward KL(p_t || p_s) = E_{p_t}[b - a] - lse(b) + lse(a): one online pass
  keeps the running maxima and sums of both heads and the running
  ``sum_j exp(b_j - m_b) (b_j - a_j)``, rescaled when ``m_b`` grows; its
  gradient with respect to ``a`` is ``p_s - p_t``;
* reverse KL(p_s || p_t): the same with the roles swapped; gradient
  ``p_s (log p_s - log p_t - KL)``;
* generalized JSD, ``0 < beta < 1``: ``log m = logaddexp(log beta + log p_t,
  log(1 - beta) + log p_s)`` needs both normalizers, so a first pass finishes
  them and a second sums ``p_t (log p_t - log m)`` and ``p_s (log p_s - log m)``;
  gradient ``(1 - beta) p_s (log p_s - log m - KL(p_s || m))``;
* top-k (a teacher saved as indices and log-probabilities): the student's
  log-normalizer and its logits at the teacher's indices, picked out of each
  tile; the divergence itself is formed outside, from them.

A class with probability 0 contributes 0 to every sum (``0 log 0 = 0``), so
``-inf`` logits of either head (a masked vocabulary) give the float64 answer.
With ``hard=True`` a kernel also returns the cross-entropy of the untempered
student logits ``z`` with ``rows["labels"]`` (``ce``). The teacher is a
constant; its cotangent (key "b") is formed only for a traced temperature,
whose gradient it is part of.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from xentjax._core import cross_entropy_from_stats
from xentjax._vocab.kernel import Finished, Kernel, LogSumExp, Rows, State, TileCotangent, grad
from xentjax._vocab.placement import vocab_sum
from xentjax._vocab.tiles import Tile, Tiling


def weighted_update(st: dict, new: dict, name: str, logits, val) -> dict:
  """The online log-sum-exp of head ``name`` and ``u``, a running ``sum exp(logits - m) val``."""
  lse, scale, e = LogSumExp.from_state(st, name).step(logits)
  new.update(lse.as_state(name), u=st["u"] * scale + jnp.sum(weighted(e, val), axis=1))
  return new


def update(st: dict, new: dict, name: str, logits) -> dict:
  """The online log-sum-exp of head ``name`` (``a``, ``b`` or ``z``) after ``logits``."""
  new.update(LogSumExp.from_state(st, name).update(logits).as_state(name))
  return new


def lse_of(st: dict, name: str, placement) -> jax.Array:
  """``log sum exp`` of head ``name`` over the whole vocabulary (``m + log s``)."""
  ms, s = LogSumExp.from_state(st, name).combine(placement)
  return ms + jnp.log(s)


def weighted(p, val):
  """``p * val`` with 0 where ``p`` is 0 (``0 * inf`` is 0 here)."""
  return jnp.where(p > 0, p * val, 0.0)


# ----------------------------------------------------------------------------
# The hard-label term, shared by both kernels.


def hard_init(n, cdt, own_z: bool) -> dict:
  st = {"zy": jnp.zeros((n,), cdt)}
  return st | LogSumExp.empty(n, cdt).as_state("z") if own_z else st


def hard_update(st, new, tile, rows, own_z: bool) -> dict:
  label = tile.col == rows["labels"][:, None]
  new["zy"] = st["zy"] + jnp.sum(jnp.where(label, tile.z, 0.0), axis=1)
  return update(st, new, "z", tile.z) if own_z else new


def hard_finish(st, out, placement, own_z: bool) -> dict:
  """`ce` (and `lse_z`, the untempered log-normalizer) from the finished state."""
  mz, sz = LogSumExp.from_state(st, "z" if own_z else "a").combine(placement)
  log_sz, zy = jnp.log(sz), vocab_sum(st["zy"], placement) - mz
  out["ce"] = cross_entropy_from_stats(log_sz, zy)
  if own_z:
    out["lse_z"] = mz + log_sz
  return out


def hard_cotangent(ct: TileCotangent, tile: Tile, r: Rows, ps, own_z: bool) -> TileCotangent:
  """`softmax(z) - onehot(y)` times the cotangent of `ce`, as the cotangent of `z`."""
  g = grad(r, "ce")[:, None]
  pz = jnp.exp(tile.z - r["lse_z"][:, None]) if own_z else ps
  ct["z"] = g * pz - jnp.where(tile.col == r["labels"][:, None], g, 0.0)
  return ct


# ----------------------------------------------------------------------------
# Full teachers.


class TeacherDivergence(Kernel):
  """A kernel of a full teacher: the row ``div``, and ``ce`` with the hard-label term.

  Both differentiable; the subclass's field ``hard`` says whether ``ce`` is formed.
  """

  hard: bool

  @property
  def outputs(self):
    return ("div",) + ("ce",) * self.hard

  @property
  def differentiable(self):
    return self.outputs


@dataclasses.dataclass(frozen=True)
class Divergence(TeacherDivergence):
  """``div``: forward KL (``beta = 0``), reverse KL (1) or the generalized JSD.

  ``own_z``: the hard term needs the untempered statistics (a temperature
  other than 1); with a traced temperature (`tiles.Tile.traced_temperature`)
  the teacher's cotangent is formed too, for its gradient; ``scaled``: the JSD divided by
  ``beta (1 - beta)`` (`scaled_ratios`), continuous at both ends.
  """

  beta: float = 0.0
  hard: bool = False
  own_z: bool = False
  scaled: bool = False

  @property
  def jsd(self) -> bool:
    return 0.0 < self.beta < 1.0

  @property
  def passes(self):
    return 2 if self.jsd else 1

  @property
  def saved(self):
    aux = ("aux", "kt") if self.jsd else ("aux",) if self.beta == 1.0 else ("div",)
    return ("lse_a", "lse_b") + aux + ("lse_z",) * self.own_z

  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt) -> State:
    zero = jnp.zeros((n,), cdt)
    if p == 1:
      return {"kt": zero, "ks": zero}, {}
    st = LogSumExp.empty(n, cdt).as_state("a") | LogSumExp.empty(n, cdt).as_state("b")
    if not self.jsd:
      st["u"] = zero
    return (hard_init(n, cdt, self.own_z) | st) if self.hard else st, {}

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    st, cols = state
    a, b = tile.a, tile.b
    assert b is not None  # a teacher head
    if p == 1:
      la, lb, rs, rt = self.ratios(tile, rows)
      kt = jnp.sum(weighted(jnp.exp(lb), rt), axis=1)
      ks = jnp.sum(weighted(jnp.exp(la), rs), axis=1)
      return {"kt": st["kt"] + kt, "ks": st["ks"] + ks}, cols
    new: dict = {}
    if self.jsd:
      update(st, update(st, new, "a", a), "b", b)
    elif self.beta == 0.0:  # forward KL: weights p_t, values b - a
      weighted_update(st, update(st, new, "a", a), "b", b, b - a)
    else:  # reverse KL: weights p_s, values a - b
      update(st, weighted_update(st, new, "a", a, a - b), "b", b)
    return (hard_update(st, new, tile, rows, self.own_z) if self.hard else new), cols

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    st, _ = state
    pl = tiling.placement
    if p == 1:
      kt, ks = vocab_sum((st["kt"], st["ks"]), pl)
      div = kt + ks if self.scaled else self.beta * kt + (1.0 - self.beta) * ks
      return {"div": div, "aux": ks, "kt": kt}, {}
    out = {}
    if self.jsd:
      out["lse_a"], out["lse_b"] = lse_of(st, "a", pl), lse_of(st, "b", pl)
    else:  # E_w[w - o] - lse_w + lse_o, the expectation under the weighted head w
      w, o = ("b", "a") if self.beta == 0.0 else ("a", "b")
      m, s, u = LogSumExp.from_state(st, w).combine(pl, st["u"])
      out["lse_" + w], out["lse_" + o] = m + jnp.log(s), lse_of(st, o, pl)
      out["div"] = u / s - out["lse_" + w] + out["lse_" + o]
      out["aux"] = out["div"]
    return (hard_finish(st, out, pl, self.own_z) if self.hard else out), {}

  def log_probs(self, tile, r):
    """`log p_s`, `log p_t` (and `log m` for the JSD) of one tile."""
    la, lb = heads_log_probs(tile, r)
    if not self.jsd:
      return la, lb, None
    lm = jnp.logaddexp(math.log(self.beta) + lb, math.log1p(-self.beta) + la)
    return la, lb, lm

  def ratios(self, tile, r):
    """`log p_s`, `log p_t` and the JSD's `log(p_s / m)`, `log(p_t / m)` of one tile.

    Scaled: `log(p_s / m) / beta` and `log(p_t / m) / (1 - beta)` (`scaled_ratios`).
    """
    if self.scaled:
      la, lb = heads_log_probs(tile, r)
      return la, lb, *scaled_ratios(la, lb, self.beta)
    la, lb, lm = self.log_probs(tile, r)
    return (la, lb, None, None) if lm is None else (la, lb, la - lm, lb - lm)

  def cotangent(self, tile: Tile, r: Rows) -> TileCotangent:
    la, lb, rs, rt = self.ratios(tile, r)
    ps, pt = jnp.exp(la), jnp.exp(lb)
    g = grad(r, "div")[:, None]
    if self.scaled:  # the JSD's, divided by beta (1 - beta)
      da = weighted(ps, rs - r["aux"][:, None])
      db = weighted(pt, rt - r["kt"][:, None])
    elif self.jsd:
      da = (1.0 - self.beta) * weighted(ps, rs - r["aux"][:, None])
      db = self.beta * weighted(pt, rt - r["kt"][:, None])
    elif self.beta == 0.0:
      da, db = ps - pt, weighted(pt, lb - la - r["div"][:, None])
    else:
      da, db = weighted(ps, la - lb - r["aux"][:, None]), pt - ps
    ct: TileCotangent = {"a": g * da}
    if tile.traced_temperature:
      ct["b"] = g * db
    return hard_cotangent(ct, tile, r, ps, self.own_z) if self.hard else ct


def heads_log_probs(tile, r):
  """`log p_s`, `log p_t` of one tile, from the finished log-normalizers."""
  return tile.a - r["lse_a"][:, None], tile.b - r["lse_b"][:, None]


def scaled_ratios(la, lb, beta: float):
  """``log(p_s / m) / beta`` and ``log(p_t / m) / (1 - beta)``, precise for any ``beta``.

  With ``d = log p_t - log p_s``, ``m / p_s = 1 - beta + beta e^d`` and
  ``m / p_t = beta + (1 - beta) e^{-d}``; their logs are formed by one
  `jnp.logaddexp` each (whose ``log1p`` keeps ``-beta + beta e^d`` to its
  relative precision), never as ``log p_s - log m``, a difference of two
  nearly equal logs whose rounding error the division by a small ``beta``
  would blow up (at ``beta = 1e-6`` in float32, by 10^6).
  """
  d = lb - la
  log_b, log_1b = math.log(beta), math.log1p(-beta)
  rs = -jnp.logaddexp(log_b + d, log_1b) / beta
  rt = -jnp.logaddexp(log_1b - d, log_b) / (1.0 - beta)
  return rs, rt


@dataclasses.dataclass(frozen=True)
class TotalVariation(TeacherDivergence):
  """``div``: the total variation distance ``1/2 sum_j |p_t,j - p_s,j|``.

  Two passes: the first finishes both log-normalizers, the second sums
  ``|p_t - p_s|`` and ``c_s = sum_j p_s,j s_j`` with ``s = sign(p_t - p_s)``
  (and ``c_t = sum_j p_t,j s_j`` for a traced temperature). The gradient with
  respect to the student's logits is ``-1/2 p_s (s - c_s)`` (with respect to
  the teacher's, ``1/2 p_t (s - c_t)``); where ``p_t = p_s`` the subgradient
  ``s = 0`` is taken. ``hard``, ``own_z``: as in `Divergence`.
  """

  hard: bool = False
  own_z: bool = False
  passes = 2

  @property
  def saved(self):
    return ("lse_a", "lse_b", "c_s", "c_t") + ("lse_z",) * self.own_z

  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt) -> State:
    zero = jnp.zeros((n,), cdt)
    if p == 1:
      return {"tv": zero, "c_s": zero, "c_t": zero}, {}
    st = LogSumExp.empty(n, cdt).as_state("a") | LogSumExp.empty(n, cdt).as_state("b")
    return (hard_init(n, cdt, self.own_z) | st) if self.hard else st, {}

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    st, cols = state
    if p == 0:
      new = update(st, update(st, {}, "a", tile.a), "b", tile.b)
      return (hard_update(st, new, tile, rows, self.own_z) if self.hard else new), cols
    ps, pt, sign = self.probs(tile, rows)
    new = {"tv": st["tv"] + jnp.sum(jnp.abs(pt - ps), axis=1)}
    new["c_s"] = st["c_s"] + jnp.sum(ps * sign, axis=1)
    new["c_t"] = st["c_t"] + jnp.sum(pt * sign, axis=1)
    return new, cols

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    st, _ = state
    pl = tiling.placement
    if p == 1:
      tv, c_s, c_t = vocab_sum((st["tv"], st["c_s"], st["c_t"]), pl)
      return {"div": 0.5 * tv, "c_s": c_s, "c_t": c_t}, {}
    out = {"lse_a": lse_of(st, "a", pl), "lse_b": lse_of(st, "b", pl)}
    return (hard_finish(st, out, pl, self.own_z) if self.hard else out), {}

  def probs(self, tile, r):
    """`p_s`, `p_t` and `sign(p_t - p_s)` of one tile."""
    la, lb = heads_log_probs(tile, r)
    ps, pt = jnp.exp(la), jnp.exp(lb)
    return ps, pt, jnp.sign(pt - ps)

  def cotangent(self, tile: Tile, r: Rows) -> TileCotangent:
    ps, pt, sign = self.probs(tile, r)
    g = 0.5 * grad(r, "div")[:, None]
    ct: TileCotangent = {"a": -g * ps * (sign - r["c_s"][:, None])}
    if tile.traced_temperature:
      ct["b"] = g * pt * (sign - r["c_t"][:, None])
    return hard_cotangent(ct, tile, r, ps, self.own_z) if self.hard else ct


# ----------------------------------------------------------------------------
# Top-k teachers.


def local_index(idx, col, size):
  """Teacher indices relative to this tile; `size` (out of bounds) outside it."""
  local = idx - col[:, :1]
  return jnp.where((local >= 0) & (local < size), local, size)


@dataclasses.dataclass(frozen=True)
class TopkLogits(Kernel):
  """``lse_a`` and ``a_idx``: the student's log-normalizer and tempered logits at
  the teacher's indices ``rows["idx"]`` ``[n, k]`` (each gathered in its tile)."""

  k: int = 1
  hard: bool = False
  own_z: bool = False

  @property
  def outputs(self):
    return ("lse_a", "a_idx") + ("ce",) * self.hard

  @property
  def differentiable(self):
    return self.outputs

  @property
  def saved(self):
    return ("lse_a",) + ("lse_z",) * self.own_z

  def init(self, p: int, n: int, n_cols: int, tiling: Tiling, cdt) -> State:
    st = LogSumExp.empty(n, cdt).as_state("a") | {"a_idx": jnp.zeros((n, self.k), cdt)}
    return (hard_init(n, cdt, self.own_z) | st) if self.hard else st, {}

  def update(self, p: int, state: State, tile: Tile, rows: Rows) -> State:
    st, cols = state
    a = tile.a
    new = update(st, {}, "a", a)
    local = local_index(rows["idx"], tile.col, a.shape[1])
    hit = local < a.shape[1]
    got = jnp.take_along_axis(a, jnp.where(hit, local, 0), axis=1)
    new["a_idx"] = st["a_idx"] + jnp.where(hit, got, 0.0)
    return (hard_update(st, new, tile, rows, self.own_z) if self.hard else new), cols

  def finish(self, p: int, state: State, rows: Rows, tiling: Tiling) -> Finished:
    st, _ = state
    pl = tiling.placement
    out = {"lse_a": lse_of(st, "a", pl), "a_idx": vocab_sum(st["a_idx"], pl)}
    return (hard_finish(st, out, pl, self.own_z) if self.hard else out), {}

  def cotangent(self, tile: Tile, r: Rows) -> TileCotangent:
    a = tile.a
    ps = jnp.exp(a - r["lse_a"][:, None])
    local = local_index(r["idx"], tile.col, a.shape[1])
    rows = lax.broadcasted_iota(jnp.int32, local.shape, 0)
    da = (grad(r, "lse_a")[:, None] * ps).at[rows, local].add(grad(r, "a_idx"), mode="drop")
    ct: TileCotangent = {"a": da}
    return hard_cotangent(ct, tile, r, ps, self.own_z) if self.hard else ct
