"""Closed-form gradients of the cross-entropies, with respect to the first argument.

Each function is collected here under the name of the loss it
differentiates (its own name, which stack traces and profiles show, ends in
``_grad``: ``grads.softmax_cross_entropy.__name__`` is
``"softmax_cross_entropy_grad"``), takes the arguments of that loss and
returns :math:`\\partial \\sum \\ell / \\partial x` for the first argument
:math:`x` (the gradient of the summed per-example loss: what `jax.grad` of
``loss(...).sum()`` returns), with the shape and dtype of that argument:

===========================================  =====================================================
loss                                         gradient
===========================================  =====================================================
`softmax_cross_entropy`                      :math:`\\mathrm{softmax}(z)\\sum_k \\tilde y_k - \\tilde y
                                             + 2\\lambda \\log Z\\, \\mathrm{softmax}(z)`
`softmax_cross_entropy_with_integer_labels`  :math:`\\mathrm{softmax}(z) - \\tilde y` (no one-hot)
`sigmoid_binary_cross_entropy`               :math:`\\sigma(z) - y`
`categorical_cross_entropy`                  :math:`-p / q`
`binary_cross_entropy`                       :math:`-y/q + (1-y)/(1-q)`
`softmax_focal_loss`                         :math:`c - \\mathrm{softmax}(z) \\sum_k c_k` (see its docstring)
===========================================  =====================================================

(:math:`\\tilde y` the smoothed labels, :math:`\\lambda` the z-loss weight.)
They are what backpropagation computes, written out: use them to read the
dynamics of training (the gradient of the softmax cross-entropy is the
prediction error), to check autodiff, or to avoid a backward pass.

Edge cases follow the losses: masked entries and all-masked rows get 0, an
out-of-range integer label a NaN row, a ``-inf`` logit a finite gradient.

Each closed form is written beside the loss it differentiates (in
``xentjax.losses._softmax``, ``xentjax.losses._sigmoid``, ``xentjax.losses._probability`` and
``xentjax.losses._focal``) and shares its argument handling; this module only
collects them under the loss names.
"""

from __future__ import annotations

from xentjax.losses._focal import softmax_focal_loss_grad as softmax_focal_loss
from xentjax.losses._probability import binary_cross_entropy_grad as binary_cross_entropy
from xentjax.losses._probability import categorical_cross_entropy_grad as categorical_cross_entropy
from xentjax.losses._sigmoid import (
  sigmoid_binary_cross_entropy_grad as sigmoid_binary_cross_entropy,
)
from xentjax.losses._sigmoid import sigmoid_focal_loss_grad as sigmoid_focal_loss
from xentjax.losses._softmax import kl_divergence_grad as kl_divergence
from xentjax.losses._softmax import (
  kl_divergence_with_log_targets_grad as kl_divergence_with_log_targets,
)
from xentjax.losses._softmax import poly_loss_cross_entropy_grad as poly_loss_cross_entropy
from xentjax.losses._softmax import safe_softmax_cross_entropy_grad as safe_softmax_cross_entropy
from xentjax.losses._softmax import softmax_cross_entropy_grad as softmax_cross_entropy
from xentjax.losses._softmax import (
  softmax_cross_entropy_with_integer_labels_grad as softmax_cross_entropy_with_integer_labels,
)

__all__ = [
  "binary_cross_entropy",
  "categorical_cross_entropy",
  "kl_divergence",
  "kl_divergence_with_log_targets",
  "poly_loss_cross_entropy",
  "safe_softmax_cross_entropy",
  "sigmoid_binary_cross_entropy",
  "sigmoid_focal_loss",
  "softmax_cross_entropy",
  "softmax_cross_entropy_with_integer_labels",
  "softmax_focal_loss",
]
