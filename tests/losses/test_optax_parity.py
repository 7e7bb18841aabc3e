"""Optax's own tests for the 15 shared losses, run against xentjax.

The test modules shipped with the installed optax (`optax/losses/*_test.py`)
are read from disk and executed with their `_classification`, `_smoothing`
and `_regression` imports bound to xentjax, so every assertion optax makes
about its own functions is checked against ours. Only the test classes for
functions xentjax provides are collected. No optax test is deselected: every
input optax's tests use gives optax's answer here too (the cases where we are
deliberately different, -inf logits with zero label mass and zero KL targets,
are ones optax's tests do not exercise; `tests/losses/test_edge_cases.py` covers them).

A direct comparison on random inputs (shapes, axes, masks) follows.
"""

import functools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest

import xentjax as L

# --- optax's own tests, rebound to xentjax ----------------------------------

_OPTAX_LOSSES = os.path.join(os.path.dirname(optax.__file__), "losses")

# Test classes (by file) whose functions are in xentjax's optax-compatible set.
_CLASSES = {
  "_classification_test.py": (
    "SoftmaxCrossEntropyTest",
    "SafeSoftmaxCrossEntropyTest",
    "SoftmaxCrossEntropyWithIntegerLabelsTest",
    "SigmoidCrossEntropyTest",
    "PolyLossTest",
    "HingeTest",
    "PerceptronTest",
    "KLDivergenceTest",
    "KLDivergenceWithLogTargetsTest",
    "SigmoidFocalLossTest",
  ),
  "_smoothing_test.py": ("SmoothLabelsTest",),
  "_regression_test.py": ("SquaredErrorTest", "CosineDistanceTest"),
}

# The module names the optax test files import, mapped to xentjax's functions.
_PROXY = types.SimpleNamespace(
  **{
    name: getattr(L, name)
    for name in (
      "softmax_cross_entropy",
      "softmax_cross_entropy_with_integer_labels",
      "safe_softmax_cross_entropy",
      "sigmoid_binary_cross_entropy",
      "sigmoid_focal_loss",
      "poly_loss_cross_entropy",
      "kl_divergence",
      "kl_divergence_with_log_targets",
      "hinge_loss",
      "multiclass_hinge_loss",
      "perceptron_loss",
      "multiclass_perceptron_loss",
      "smooth_labels",
      "cosine_similarity",
      "cosine_distance",
      "squared_error",
    )
  }
)


def _load_optax_tests(filename):
  path = os.path.join(_OPTAX_LOSSES, filename)
  with open(path) as f:
    source = f.read()
  module = types.ModuleType(f"optax_parity_{filename[:-3]}")
  module.__file__ = path
  code = compile(source, path, "exec")
  exec(code, module.__dict__)
  # Rebind the optax loss modules the tests call to the xentjax proxy.
  for name in ("_classification", "_smoothing", "_regression"):
    if name in module.__dict__:
      module.__dict__[name] = _PROXY
  return module


for _filename, _names in _CLASSES.items():
  _module = _load_optax_tests(_filename)
  for _name in _names:
    _cls = getattr(_module, _name)
    assert issubclass(_cls, absltest.TestCase), _name
    globals()[f"TestOptax{_name}"] = type(f"TestOptax{_name}", (_cls,), {"__module__": __name__})
del _module, _cls, _name, _names, _filename


def test_optax_test_classes_were_collected():
  """Guard against the loader silently binding nothing (e.g. optax renamed files)."""
  ours = [k for k in globals() if k.startswith("TestOptax")]
  assert len(ours) == sum(len(v) for v in _CLASSES.values())
  mod = _load_optax_tests("_classification_test.py")
  assert mod._classification is _PROXY


# --- direct comparison with optax on random inputs ----------------------------

_RNG = np.random.default_rng(0)


def _close(a, b, rtol=2e-5, atol=2e-6):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


_SHAPES_AXES = [((4, 6), -1), ((2, 3, 5), 1), ((2, 3, 5), (2, 0))]


@pytest.mark.parametrize("shape,axis", _SHAPES_AXES)
@pytest.mark.parametrize(
  "fn",
  [
    "softmax_cross_entropy",
    "poly_loss_cross_entropy",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "cosine_similarity",
    "cosine_distance",
  ],
)
def test_dense_matches_optax(fn, shape, axis):
  axes = axis if isinstance(axis, tuple) else (axis,)
  logits = _RNG.normal(size=shape).astype(np.float32) * 3
  labels = _RNG.uniform(0.05, 1.0, size=shape).astype(np.float32)
  labels = labels / labels.sum(axis=axes, keepdims=True)
  if fn == "kl_divergence_with_log_targets":
    labels = np.log(labels)
  if fn == "kl_divergence" or fn == "kl_divergence_with_log_targets":
    logits = np.asarray(jax.nn.log_softmax(logits, axis=axes))
  kw = {"axis": axis}
  _close(getattr(L, fn)(logits, labels, **kw), getattr(optax.losses, fn)(logits, labels, **kw))
  mask = _RNG.uniform(size=shape) < 0.7
  kw["where"] = mask
  _close(getattr(L, fn)(logits, labels, **kw), getattr(optax.losses, fn)(logits, labels, **kw))


@pytest.mark.parametrize("shape,axis", _SHAPES_AXES)
def test_integer_labels_match_optax(shape, axis):
  axes = axis if isinstance(axis, tuple) else (axis,)
  nd = len(shape)
  axes_n = tuple(a % nd for a in axes)
  k = int(np.prod([shape[a] for a in axes_n]))
  batch = tuple(d for i, d in enumerate(shape) if i not in axes_n)
  logits = _RNG.normal(size=shape).astype(np.float32) * 3
  labels = _RNG.integers(0, k, size=batch)
  f_ours = L.softmax_cross_entropy_with_integer_labels
  f_optax = optax.losses.softmax_cross_entropy_with_integer_labels
  _close(f_ours(logits, labels, axis), f_optax(logits, labels, axis))
  mask = _RNG.uniform(size=shape) < 0.7
  _close(f_ours(logits, labels, axis, mask), f_optax(logits, labels, axis, mask))
  if batch:  # a batch-shaped mask, expanded along the class axes
    row_mask = _RNG.uniform(size=batch) < 0.5
    _close(f_ours(logits, labels, axis, row_mask), f_optax(logits, labels, axis, row_mask))


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4)])
def test_elementwise_and_margin_match_optax(shape):
  z = (_RNG.normal(size=shape) * 4).astype(np.float32)
  soft = _RNG.uniform(size=shape).astype(np.float32)
  hard = (_RNG.uniform(size=shape) < 0.5).astype(np.float32)
  signed = 2 * hard - 1
  for y in (soft, hard):
    _close(L.sigmoid_binary_cross_entropy(z, y), optax.losses.sigmoid_binary_cross_entropy(z, y))
    for alpha, gamma in [(None, 2.0), (0.25, 0.5)]:
      _close(
        L.sigmoid_focal_loss(z, y, alpha=alpha, gamma=gamma),
        optax.losses.sigmoid_focal_loss(z, y, alpha=alpha, gamma=gamma),
      )
  _close(L.hinge_loss(z, signed), optax.losses.hinge_loss(z, signed))
  _close(L.perceptron_loss(z, signed), optax.losses.perceptron_loss(z, signed))
  _close(L.squared_error(z, soft), optax.losses.squared_error(z, soft))
  _close(L.squared_error(z), optax.losses.squared_error(z))
  for alpha in (0.0, 0.1, 1.0):
    _close(L.smooth_labels(soft, alpha), optax.losses.smooth_labels(soft, alpha))
  mask = _RNG.uniform(size=shape) < 0.7
  _close(L.smooth_labels(soft, 0.2, where=mask), optax.losses.smooth_labels(soft, 0.2, where=mask))
  labels = _RNG.integers(0, shape[-1], size=shape[:-1])
  if len(shape) > 1:
    _close(L.multiclass_hinge_loss(z, labels), optax.losses.multiclass_hinge_loss(z, labels))
    _close(
      L.multiclass_perceptron_loss(z, labels), optax.losses.multiclass_perceptron_loss(z, labels)
    )


def test_safe_softmax_cross_entropy_matches_optax_including_inf():
  logits = np.array([[3.0, -np.inf, 0.5], [-np.inf, 0.0, -np.inf], [1.0, 2.0, 3.0]], np.float32)
  labels = np.array([[0.7, 0.0, 0.3], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]], np.float32)
  ours = jax.value_and_grad(lambda z: L.safe_softmax_cross_entropy(z, labels).sum())(logits)
  theirs = jax.value_and_grad(lambda z: optax.losses.safe_softmax_cross_entropy(z, labels).sum())(
    logits
  )
  _close(ours[0], theirs[0])
  _close(ours[1], theirs[1])


@pytest.mark.parametrize("name", sorted(vars(_PROXY)))
def test_same_signature_as_optax(name):
  """Same positional and keyword parameters, in the same order, with the same defaults."""
  import inspect

  ours = inspect.signature(getattr(L, name)).parameters
  theirs = inspect.signature(getattr(optax.losses, name)).parameters
  for (n1, p1), (n2, p2) in zip(list(ours.items()), theirs.items()):
    assert (n1, p1.kind, p1.default) == (n2, p2.kind, p2.default)
  assert len(ours) >= len(theirs)
  extra = list(ours.values())[len(theirs) :]
  assert all(p.kind is p.KEYWORD_ONLY for p in extra)


def test_jit_of_every_function():
  z = jnp.asarray(_RNG.normal(size=(3, 4)), jnp.float32)
  y = jax.nn.softmax(z[::-1], axis=-1)
  f = functools.partial(L.softmax_cross_entropy, label_smoothing=0.1, z_loss=1e-3)
  _close(jax.jit(f)(z, y), f(z, y))
