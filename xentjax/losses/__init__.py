"""The dense losses: one private module per family, every public name re-exported here.

* `_softmax`: softmax cross-entropy (probability and integer labels), KL
  divergence, the poly-1 loss;
* `_sigmoid`: sigmoid binary cross-entropy and the sigmoid focal loss;
* `_focal`: the softmax focal losses;
* `_margin`: hinge, squared hinge, perceptron and their multiclass forms;
* `_regression`: squared error and cosine similarity/distance;
* `_probability`: the cross-entropies of probabilities (Keras semantics);
* `_smoothing`: label smoothing;
* `_nll`: the negative log-likelihood of log-probabilities (`nll_loss`);
* `_torch_style`: PyTorch's `cross_entropy` in one call;
* `_dense`: the input handling and clipped logarithms the families share.

Every name here is also a top-level name of `xentjax` (`xentjax.softmax_cross_entropy`),
which is how the documentation and the examples call them.
"""

from xentjax.losses._focal import categorical_focal_cross_entropy as categorical_focal_cross_entropy
from xentjax.losses._focal import softmax_focal_loss as softmax_focal_loss
from xentjax.losses._margin import categorical_hinge_loss as categorical_hinge_loss
from xentjax.losses._margin import hinge_loss as hinge_loss
from xentjax.losses._margin import multiclass_hinge_loss as multiclass_hinge_loss
from xentjax.losses._margin import multiclass_perceptron_loss as multiclass_perceptron_loss
from xentjax.losses._margin import perceptron_loss as perceptron_loss
from xentjax.losses._margin import squared_hinge_loss as squared_hinge_loss
from xentjax.losses._nll import nll_loss as nll_loss
from xentjax.losses._probability import binary_cross_entropy as binary_cross_entropy
from xentjax.losses._probability import categorical_cross_entropy as categorical_cross_entropy
from xentjax.losses._probability import (
  categorical_cross_entropy_with_integer_labels as categorical_cross_entropy_with_integer_labels,
)
from xentjax.losses._regression import cosine_distance as cosine_distance
from xentjax.losses._regression import cosine_similarity as cosine_similarity
from xentjax.losses._regression import squared_error as squared_error
from xentjax.losses._sigmoid import sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy
from xentjax.losses._sigmoid import sigmoid_focal_loss as sigmoid_focal_loss
from xentjax.losses._smoothing import smooth_labels as smooth_labels
from xentjax.losses._softmax import kl_divergence as kl_divergence
from xentjax.losses._softmax import kl_divergence_with_log_targets as kl_divergence_with_log_targets
from xentjax.losses._softmax import poly_loss_cross_entropy as poly_loss_cross_entropy
from xentjax.losses._softmax import safe_softmax_cross_entropy as safe_softmax_cross_entropy
from xentjax.losses._softmax import softmax_cross_entropy as softmax_cross_entropy
from xentjax.losses._softmax import (
  softmax_cross_entropy_with_integer_labels as softmax_cross_entropy_with_integer_labels,
)
from xentjax.losses._torch_style import check_labels as check_labels
from xentjax.losses._torch_style import cross_entropy_loss as cross_entropy_loss

__all__ = [  # kept sorted (ruff RUF022)
  "binary_cross_entropy",
  "categorical_cross_entropy",
  "categorical_focal_cross_entropy",
  "categorical_hinge_loss",
  "check_labels",
  "cosine_distance",
  "cosine_similarity",
  "cross_entropy_loss",
  "hinge_loss",
  "kl_divergence",
  "kl_divergence_with_log_targets",
  "multiclass_hinge_loss",
  "multiclass_perceptron_loss",
  "nll_loss",
  "perceptron_loss",
  "poly_loss_cross_entropy",
  "safe_softmax_cross_entropy",
  "sigmoid_binary_cross_entropy",
  "sigmoid_focal_loss",
  "smooth_labels",
  "softmax_cross_entropy",
  "softmax_focal_loss",
  "squared_error",
  "squared_hinge_loss",
]
