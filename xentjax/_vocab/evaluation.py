"""Per-token evaluation figures of a linear head, without forming the logits.

`xentjax.evaluate(batches, head=w)` streams hidden states ``[n, D]``; each
compiled step calls `evaluation_rows`, which runs the
`kernels.evaluation.EvaluationStats` kernel over ``[tokens, columns]`` tiles
of ``x @ w + b`` (the engine's forward pass) and finishes the loss, the
tie-shared top-1 and top-k credit, the confidence and the Brier score with
the same core functions as the dense rows (`xentjax._core.metrics_from_stats`).
"""

from __future__ import annotations

import jax.numpy as jnp

from xentjax import _core
from xentjax._vocab.engine import run_recompute
from xentjax._vocab.inputs import Head, prepare_call
from xentjax._vocab.kernels.evaluation import EvaluationStats, tie_shared_credit

# Columns per tile of the evaluation sweep (the engine's forward pass uses
# 1024). The kernel's top-k bookkeeping costs per row and tile (a `lax.top_k`
# over the tile's block maxima), so tiles twice as wide, with half the tokens
# (the tile keeps its 2^21 logits), halve that cost (measured against the
# fused forward pass in `benchmarks/evaluate.py --hidden`: docs/benchmarks.md).
EVALUATION_VOCAB_CHUNK = 2048


def evaluation_rows(
  x,
  w,
  status: _core.LabelStatus,
  *,
  top_k: int,
  bias=None,
  mesh=None,
  data_axis=None,
  token_chunk_size=None,
  vocab_chunk_size=None,
) -> _core.RowMetrics:
  r"""`_core.RowMetrics` (with the Brier score) of the tokens ``x`` ``[n, D]`` under ``x @ w + b``.

  ``status`` is the tokens' `_core.LabelStatus` (``[n]`` each: which count,
  which have a label outside ``[0, V)``, and the gather-safe index). ``w`` is
  ``[D, V]``; ``top_k`` is capped at ``V``. With a ``mesh`` the tokens are
  sharded over ``data_axis`` (the head is replicated). Forward only.
  """
  v = w.shape[1]
  k = max(1, min(int(top_k), v))
  head = Head(
    token_chunk_size=token_chunk_size,
    vocab_chunk_size=vocab_chunk_size or EVALUATION_VOCAB_CHUNK,
    mesh=mesh,
    data_axis=data_axis,
  )
  call = prepare_call(x, w, status.index, head, ignore_index=-1, where=status.counted, bias=bias)
  out = run_recompute(call.ops, EvaluationStats(top_k=k), call.tiling)
  log_s, zy = out["log_s"], out["zy"]
  nan = _core.nan_row(log_s, zy)
  credits = tie_shared_credit(out["topv"], out["tail"], out["zl"], k)
  credits = tuple(jnp.where(nan, jnp.nan, c) for c in credits)
  brier = _core.brier_from_stats(log_s, out["so"], out["sq"], v)
  return _core.metrics_from_stats(status, log_s, zy, credits, v, brier=brier)
