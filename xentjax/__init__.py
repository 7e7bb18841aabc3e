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
The imports below are kept sorted (ruff).
"""

__version__ = "0.1.0"

__all__ = [  # kept sorted (ruff RUF022)
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
  "contrastive_loss",
  "cosine_distance",
  "cosine_similarity",
  "cross_entropy_loss",
  "datasets",
  "distributed",
  "evaluate",
  "grads",
  "hinge_loss",
  "info",
  "kl_divergence",
  "kl_divergence_with_log_targets",
  "linear_distillation_loss",
  "linear_softmax_cross_entropy",
  "linear_token_stats",
  "linear_topk_distillation_loss",
  "metrics",
  "multiclass_hinge_loss",
  "multiclass_perceptron_loss",
  "nll_loss",
  "ntxent",
  "parallel",
  "perceptron_loss",
  "poly_loss_cross_entropy",
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

from xentjax import calibration as calibration
from xentjax import datasets as datasets
from xentjax import distributed as distributed
from xentjax import grads as grads
from xentjax import info as info
from xentjax import metrics as metrics
from xentjax import parallel as parallel
from xentjax import train as train
from xentjax._evaluation import EvaluationResult as EvaluationResult
from xentjax._evaluation import evaluate as evaluate
from xentjax._focal import categorical_focal_cross_entropy as categorical_focal_cross_entropy
from xentjax._focal import softmax_focal_loss as softmax_focal_loss
from xentjax._margin import categorical_hinge_loss as categorical_hinge_loss
from xentjax._margin import hinge_loss as hinge_loss
from xentjax._margin import multiclass_hinge_loss as multiclass_hinge_loss
from xentjax._margin import multiclass_perceptron_loss as multiclass_perceptron_loss
from xentjax._margin import perceptron_loss as perceptron_loss
from xentjax._margin import squared_hinge_loss as squared_hinge_loss
from xentjax._nll import nll_loss as nll_loss
from xentjax._probability import binary_cross_entropy as binary_cross_entropy
from xentjax._probability import categorical_cross_entropy as categorical_cross_entropy
from xentjax._probability import (
  categorical_cross_entropy_with_integer_labels as categorical_cross_entropy_with_integer_labels,
)
from xentjax._regression import cosine_distance as cosine_distance
from xentjax._regression import cosine_similarity as cosine_similarity
from xentjax._regression import squared_error as squared_error
from xentjax._sigmoid import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from xentjax._sigmoid import sigmoid_focal_loss as sigmoid_focal_loss
from xentjax._smoothing import smooth_labels as smooth_labels
from xentjax._softmax import kl_divergence as kl_divergence
from xentjax._softmax import kl_divergence_with_log_targets as kl_divergence_with_log_targets
from xentjax._softmax import poly_loss_cross_entropy as poly_loss_cross_entropy
from xentjax._softmax import safe_softmax_cross_entropy as safe_softmax_cross_entropy
from xentjax._softmax import softmax_cross_entropy as softmax_cross_entropy
from xentjax._softmax import (
  softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from xentjax._torch_style import check_labels as check_labels
from xentjax._torch_style import cross_entropy_loss as cross_entropy_loss
from xentjax._vocab.contrastive import Retrieval as Retrieval
from xentjax._vocab.contrastive import contrastive_loss as contrastive_loss
from xentjax._vocab.contrastive import ntxent as ntxent
from xentjax._vocab.contrastive import sigmoid_contrastive_loss as sigmoid_contrastive_loss
from xentjax._vocab.cross_entropy import (
  linear_softmax_cross_entropy as linear_softmax_cross_entropy,
)
from xentjax._vocab.distillation import check_topk_teacher as check_topk_teacher
from xentjax._vocab.distillation import linear_distillation_loss as linear_distillation_loss
from xentjax._vocab.distillation import (
  linear_topk_distillation_loss as linear_topk_distillation_loss,
)
from xentjax._vocab.token_stats import TokenStats as TokenStats
from xentjax._vocab.token_stats import linear_token_stats as linear_token_stats
