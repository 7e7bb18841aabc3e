"""One home for the options of the vocabulary family (`xentjax/_vocab/options.py`).

Every entry point refuses a bool or a string where a number goes with a
`TypeError`, and an out-of-range number with a `ValueError`, each naming the
argument, before anything is traced.
"""

import numpy as np
import pytest

import xentjax

X = np.ones((2, 3), np.float32)
W = np.zeros((3, 5), np.float32)
Y = np.array([1, 4], np.int32)
IDX, LP = np.zeros((2, 1), np.int32), np.zeros((2, 1), np.float32)

CALLS = {
  "linear_softmax_cross_entropy": lambda **kw: xentjax.linear_softmax_cross_entropy(X, W, Y, **kw),
  "linear_token_stats": lambda **kw: xentjax.linear_token_stats(X, W, Y, **kw),
  "linear_distillation_loss": lambda **kw: xentjax.linear_distillation_loss(X, W, X, W, Y, **kw),
  "linear_topk_distillation_loss": lambda **kw: xentjax.linear_topk_distillation_loss(
    X, W, IDX, LP, Y, **kw
  ),
}
SHARED = ["temperature", "vocab_size", "token_chunk_size", "vocab_chunk_size", "ignore_index"]
OWN = {
  "linear_softmax_cross_entropy": ["label_smoothing", "z_loss", "logit_soft_cap", "filter_eps"],
  "linear_token_stats": ["top_k", "logit_soft_cap"],
  "linear_distillation_loss": ["beta", "hard_weight"],
  "linear_topk_distillation_loss": ["hard_weight"],
}
CASES = [(name, option) for name in CALLS for option in SHARED + OWN[name]]


@pytest.mark.parametrize("bad", [True, "1"])
@pytest.mark.parametrize("name, option", CASES)
def test_bools_and_strings_are_type_errors_naming_the_option(name, option, bad):
  with pytest.raises(TypeError, match=f"`{option}`"):
    CALLS[name](**{option: bad})


@pytest.mark.parametrize(
  "name, option, value",
  [
    ("linear_softmax_cross_entropy", "vocab_size", 6),
    ("linear_softmax_cross_entropy", "token_chunk_size", 0),
    ("linear_softmax_cross_entropy", "label_smoothing", 1.5),
    ("linear_softmax_cross_entropy", "logit_soft_cap", -1.0),
    ("linear_token_stats", "top_k", 6),
    ("linear_token_stats", "temperature", -0.5),
    ("linear_distillation_loss", "beta", 1.5),
    ("linear_distillation_loss", "temperature", 0),
    ("linear_topk_distillation_loss", "hard_weight", -0.1),
  ],
)
def test_out_of_range_numbers_are_value_errors_naming_the_option(name, option, value):
  with pytest.raises(ValueError, match=f"`{option}`"):
    CALLS[name](**{option: value})
