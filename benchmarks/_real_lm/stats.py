"""What a reader needs to judge a distribution, in plain NumPy on the logits `x @ w + b`.

Independent of the engine: the entropy, the largest probability, the fraction
of probabilities below ``eps``, the cross-entropy of the labels, and the
fraction of ``[token_chunk, vocab_chunk]`` tiles that gradient filtering can
skip (every token's probability on every column of the tile is below ``eps``,
and no token's label lies in it: the rule of ``filter_eps``), for the
vocabulary as it is and with its columns sorted by mass.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 2.0**-12
TOKEN_CHUNKS = (128, 256, 512)
VOCAB_CHUNKS = (256, 512, 1024)


def _log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def measure(x, w, b, y, *, eps=EPS, token_chunks=TOKEN_CHUNKS, chunk=512) -> dict:
  """Per-token statistics and, per token chunk, the row maxima of log p (for the tiles).

  Returns a dict with `entropy`, `max_p`, `below_eps` (means over tokens and
  entries), `cross_entropy` (mean of -log p_y, nats), `mean_p` ([V], the mean
  probability of each column over the tokens) and `group_max` ({tc: [N/tc, V]}
  the largest log-probability of each column in each group of tc tokens).
  """
  x, w, y = np.asarray(x, np.float32), np.asarray(w, np.float32), np.asarray(y)
  n, v = x.shape[0], w.shape[1]
  b = np.zeros(v, np.float32) if b is None else np.asarray(b, np.float32)
  token_chunks = [tc for tc in token_chunks if tc <= n]
  chunk = max([chunk, *token_chunks])
  ent, pmax, below, nll = [], [], 0, []
  mean_p = np.zeros(v)
  group_max = {tc: [] for tc in token_chunks}
  for i in range(0, n, chunk):
    logp = _log_softmax((x[i : i + chunk] @ w + b).astype(np.float64))
    p = np.exp(logp)
    ent.append(-(p * logp).sum(axis=-1))
    pmax.append(p.max(axis=-1))
    below += int((logp < math.log(eps)).sum())
    nll.append(-logp[np.arange(len(logp)), y[i : i + chunk]])
    mean_p += p.sum(axis=0)
    for tc in token_chunks:
      rows = -(-len(logp) // tc) * tc
      padded = np.pad(logp, ((0, rows - len(logp)), (0, 0)), constant_values=-np.inf)
      group_max[tc].append(padded.reshape(-1, tc, v).max(axis=1))
  return {
    "n": n,
    "v": v,
    "entropy": float(np.concatenate(ent).mean()),
    "max_p": float(np.concatenate(pmax).mean()),
    "below_eps": below / (n * v),
    "cross_entropy": float(np.concatenate(nll).mean()),
    "mean_p": mean_p / n,
    "group_max": {tc: np.concatenate(g) for tc, g in group_max.items()},
    "labels": y,
    "eps": eps,
  }


def skippable(m: dict, tc: int, vc: int, order=None, *, labels=True) -> float:
  """Fraction of `[tc, vc]` tiles filtering skips, with the columns in `order` (default: as is).

  `labels=False` counts the tiles whose every probability is below eps, whether
  or not a label lies in them (the engine keeps those: their gradient has the -1).
  """
  g = m["group_max"][tc]
  v = g.shape[1]
  order = np.arange(v) if order is None else np.asarray(order)
  position = np.empty(v, np.int64)
  position[order] = np.arange(v)
  cols = -(-v // vc) * vc
  g = np.pad(g[:, order], ((0, 0), (0, cols - v)), constant_values=-np.inf)
  keep = g.reshape(g.shape[0], -1, vc).max(axis=2) >= math.log(m["eps"])
  if labels:
    y = m["labels"]
    keep[np.arange(len(y)) // tc, position[y] // vc] = True  # a tile holding a label is kept
  return 1.0 - float(keep.mean())


def by_mass(weights) -> np.ndarray:
  """The column order that puts the heaviest columns first (stable for ties)."""
  return np.argsort(-np.asarray(weights, np.float64), kind="stable")
