"""xentjax: cross-entropy and the information theory around it, in JAX.

`import xentjax as L` replaces `optax.losses` for the cross-entropy family
(same calls, same answers, finite where optax returns NaN) and adds PyTorch's
`cross_entropy` semantics, closed-form gradients (`xentjax.grads`),
information theory (`xentjax.info`), metrics (`xentjax.metrics`), a fused
linear cross-entropy and per-token statistics (log-probabilities, entropy,
top-k) for large vocabularies, contrastive losses (CLIP, SigLIP, NT-Xent)
without the batch × batch matrix, vocabulary-parallel
cross-entropy (`xentjax.parallel`) and exact streaming evaluation.

The public surface is `__all__`: the optax-compatible losses (softmax,
sigmoid, margin, regression and probability-space), `cross_entropy_loss` and
`check_labels` (PyTorch semantics), the fused large-vocabulary functions,
`evaluate`/`EvaluationResult` (streaming evaluation), and the submodules.
They are imported on first use (`xentjax._exports` lists where each comes
from), so that `import xentjax` alone, and the command line's `--help` and
`--version`, do not import JAX.
"""

import importlib as _importlib
import importlib.util as _importlib_util
from typing import TYPE_CHECKING as _TYPE_CHECKING

__version__ = "0.1.0"

__all__ = [  # kept sorted (ruff RUF022)
  "CrossEntropyStats",
  "DistillationComponents",
  "EvaluationResult",
  "Retrieval",
  "TokenStats",
  "binary_cross_entropy",
  "calibration",
  "categorical_cross_entropy",
  "categorical_cross_entropy_with_integer_labels",
  "categorical_focal_cross_entropy",
  "categorical_hinge_loss",
  "check_labels",
  "check_topk_teacher",
  "cli",
  "coding",
  "contrastive_loss",
  "cosine_distance",
  "cosine_similarity",
  "cross_entropy_loss",
  "datasets",
  "demos",
  "distributed",
  "evaluate",
  "evaluation",
  "grads",
  "hinge_loss",
  "info",
  "kl_divergence",
  "kl_divergence_with_log_targets",
  "linear_distillation_loss",
  "linear_row_loss",
  "linear_sequence_logprobs",
  "linear_softmax_cross_entropy",
  "linear_token_stats",
  "linear_topk_distillation_loss",
  "losses",
  "metrics",
  "multiclass_hinge_loss",
  "multiclass_perceptron_loss",
  "nll_loss",
  "ntxent",
  "parallel",
  "perceptron_loss",
  "policy",
  "poly_loss_cross_entropy",
  "preference",
  "safe_softmax_cross_entropy",
  "sigmoid_binary_cross_entropy",
  "sigmoid_contrastive_loss",
  "sigmoid_focal_loss",
  "smooth_labels",
  "softmax_cross_entropy",
  "softmax_cross_entropy_with_integer_labels",
  "softmax_focal_loss",
  "squared_error",
  "squared_hinge_loss",
  "train",
]

if _TYPE_CHECKING:  # what type checkers and editors see: every public name, eagerly
  from xentjax._exports import *


def __getattr__(name: str):
  """A public name, imported on first use (PEP 562); the others raise `AttributeError`."""
  if name in __all__ and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
    return _importlib.import_module(f"{__name__}.{name}")  # a submodule: `xentjax.info`
  if name in __all__:
    exports = _importlib.import_module(f"{__name__}._exports")
    globals().update({n: getattr(exports, n) for n in __all__})  # once: later lookups hit these
    return globals()[name]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
