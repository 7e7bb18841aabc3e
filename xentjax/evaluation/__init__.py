"""Streaming evaluation: exact sums over data sets that do not fit in memory.

`evaluate` (also `xentjax.evaluate`) reads batches of logits and labels, on one
device, a mesh or several processes, and returns an `EvaluationResult` (with
per-document sums, `DocumentSums`, when the batches name documents); its
implementation (feeding, the jitted step, the exact two-float sums) is
`xentjax.evaluation._stream`.
"""

from xentjax.evaluation._stream import DocumentSums as DocumentSums
from xentjax.evaluation._stream import EvaluationResult as EvaluationResult
from xentjax.evaluation._stream import evaluate as evaluate

# `EvaluationResult` is documented once, as `xentjax.EvaluationResult`.
__all__ = ["DocumentSums", "evaluate"]
