"""The public names of `xentjax`, imported from the modules that define them.

`xentjax/__init__.py` loads this module on the first use of any of its names
(`xentjax.__getattr__`), so that the command line's `--help` and `--version`
answer without importing JAX. Keep the imports sorted (ruff) and the names
in `xentjax.__all__`. `name as name` marks an explicit re-export (PEP 484), which
type checkers read through `xentjax/__init__.py`'s `TYPE_CHECKING` import.
"""

from xentjax import calibration as calibration
from xentjax import cli as cli
from xentjax import coding as coding
from xentjax import datasets as datasets
from xentjax import demos as demos
from xentjax import distributed as distributed
from xentjax import evaluation as evaluation
from xentjax import grads as grads
from xentjax import info as info
from xentjax import losses as losses
from xentjax import metrics as metrics
from xentjax import parallel as parallel
from xentjax import policy as policy
from xentjax import preference as preference
from xentjax import train as train
from xentjax._vocab.contrastive import Retrieval as Retrieval
from xentjax._vocab.contrastive import contrastive_loss as contrastive_loss
from xentjax._vocab.contrastive import ntxent as ntxent
from xentjax._vocab.contrastive import sigmoid_contrastive_loss as sigmoid_contrastive_loss
from xentjax._vocab.cross_entropy import CrossEntropyStats as CrossEntropyStats
from xentjax._vocab.cross_entropy import (
  linear_softmax_cross_entropy as linear_softmax_cross_entropy,
)
from xentjax._vocab.distillation import DistillationComponents as DistillationComponents
from xentjax._vocab.distillation import check_topk_teacher as check_topk_teacher
from xentjax._vocab.distillation import linear_distillation_loss as linear_distillation_loss
from xentjax._vocab.distillation import (
  linear_topk_distillation_loss as linear_topk_distillation_loss,
)
from xentjax._vocab.rowwise import linear_row_loss as linear_row_loss
from xentjax._vocab.sequences import linear_sequence_logprobs as linear_sequence_logprobs
from xentjax._vocab.token_stats import TokenStats as TokenStats
from xentjax._vocab.token_stats import linear_token_stats as linear_token_stats
from xentjax.evaluation import EvaluationResult as EvaluationResult
from xentjax.evaluation import evaluate as evaluate
from xentjax.losses import binary_cross_entropy as binary_cross_entropy
from xentjax.losses import categorical_cross_entropy as categorical_cross_entropy
from xentjax.losses import (
  categorical_cross_entropy_with_integer_labels as categorical_cross_entropy_with_integer_labels,
)
from xentjax.losses import categorical_focal_cross_entropy as categorical_focal_cross_entropy
from xentjax.losses import categorical_hinge_loss as categorical_hinge_loss
from xentjax.losses import check_labels as check_labels
from xentjax.losses import cosine_distance as cosine_distance
from xentjax.losses import cosine_similarity as cosine_similarity
from xentjax.losses import cross_entropy_loss as cross_entropy_loss
from xentjax.losses import hinge_loss as hinge_loss
from xentjax.losses import kl_divergence as kl_divergence
from xentjax.losses import kl_divergence_with_log_targets as kl_divergence_with_log_targets
from xentjax.losses import multiclass_hinge_loss as multiclass_hinge_loss
from xentjax.losses import multiclass_perceptron_loss as multiclass_perceptron_loss
from xentjax.losses import nll_loss as nll_loss
from xentjax.losses import perceptron_loss as perceptron_loss
from xentjax.losses import poly_loss_cross_entropy as poly_loss_cross_entropy
from xentjax.losses import safe_softmax_cross_entropy as safe_softmax_cross_entropy
from xentjax.losses import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from xentjax.losses import sigmoid_focal_loss as sigmoid_focal_loss
from xentjax.losses import smooth_labels as smooth_labels
from xentjax.losses import softmax_cross_entropy as softmax_cross_entropy
from xentjax.losses import (
  softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from xentjax.losses import softmax_focal_loss as softmax_focal_loss
from xentjax.losses import squared_error as squared_error
from xentjax.losses import squared_hinge_loss as squared_hinge_loss
