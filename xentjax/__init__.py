"""xentjax: cross-entropy and the information theory around it, in JAX.

`import xentjax as L` replaces `optax.losses` for the cross-entropy family
(same calls, same answers, finite where optax returns NaN) and adds PyTorch's
`cross_entropy` semantics, closed-form gradients (`xentjax.grads`),
information theory (`xentjax.info`), metrics (`xentjax.metrics`), a fused
linear cross-entropy for large vocabularies, vocabulary-parallel
cross-entropy (`xentjax.parallel`) and exact streaming evaluation.
"""

__version__ = "0.1.0"

# --- softmax, sigmoid, margin and probability losses (optax-compatible) ---

# --- information theory and metrics (submodules) ---
from xentjax import info as info
from xentjax import metrics as metrics

# --- PyTorch-style cross-entropy with reduction; eager label check ---

# --- large vocabularies: fused linear cross-entropy ---

# --- streaming evaluation ---

# --- training demos and data ---
