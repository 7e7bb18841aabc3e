"""Tests for `xentjax.cross_entropy_loss` (PyTorch semantics) and `check_labels`.

Expected values come from `torch.nn.functional.cross_entropy` in float64 (when
torch is installed) and from an independent float64 NumPy transcription of the
formulas (always), never from our own output.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax

NUM_CLASSES = 5
REDUCTIONS = ("none", "mean", "sum")

# Named layouts: (logits shape, class axis). "kdim_axis1" is torch's own layout.
SHAPES = {
  "batch": ((6, NUM_CLASSES), -1),
  "unbatched": ((NUM_CLASSES,), -1),
  "kdim_last": ((3, 2, 4, NUM_CLASSES), -1),
  "kdim_axis1": ((3, NUM_CLASSES, 2, 4), 1),
}

# The shared parameter table: target kind x weight x ignore_index x smoothing.
# ignore_index only exists for integer targets (torch refuses a non-default
# one with probabilities; see test_ignore_index_with_probabilities_rejected).
CASES = [
  pytest.param(kind, weighted, ignore, eps, id=f"{kind}-w{int(weighted)}-ig{ignore}-ls{eps}")
  for kind, weighted, ignore, eps in itertools.product(
    ("int", "prob"), (False, True), (-100, 1), (0.0, 0.15)
  )
  if kind == "int" or ignore == -100
]


def _make_inputs(shape, axis, kind, ignore, seed=0):
  rng = np.random.default_rng(seed)
  logits = (2.0 * rng.standard_normal(shape)).astype(np.float32)
  batch = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
  if kind == "int":
    targets = rng.integers(0, NUM_CLASSES, size=batch)
    if ignore == -100 and targets.size > 1:
      flat = targets.reshape(-1)
      flat[::3] = -100  # some ignored positions (the view writes through)
    return logits, targets
  p = rng.dirichlet(np.ones(NUM_CLASSES), size=batch).astype(np.float32)
  return logits, np.moveaxis(p, -1, axis % len(shape))


def _weight(weighted):
  return np.linspace(0.5, 2.5, NUM_CLASSES).astype(np.float32) if weighted else None


def _loss_and_grad(logits, targets, cotangent, **kw):
  """Loss value and the gradient of <loss, cotangent> w.r.t. logits."""

  def f(z):
    return xentjax.cross_entropy_loss(z, targets, **kw)

  value, vjp = jax.vjp(f, jnp.asarray(logits))
  (grad,) = vjp(jnp.asarray(cotangent, value.dtype))
  return np.asarray(value), np.asarray(grad)


# ----------------------------------------------------------------------------
# Parity with torch (values and gradients).


# Every case of the table on the plain batch layout; the other layouts on the
# cases that exercise everything at once (weights, smoothing, ignore_index).
TORCH_CASES = [pytest.param("batch", *case.values, id=f"batch-{case.id}") for case in CASES] + [
  pytest.param(shape_name, kind, True, ignore, 0.15, id=f"{shape_name}-{kind}-ig{ignore}")
  for shape_name in ("unbatched", "kdim_last", "kdim_axis1")
  for kind, ignore in (("int", -100), ("int", 1), ("prob", -100))
]


@pytest.mark.parametrize("shape_name,kind,weighted,ignore,eps", TORCH_CASES)
def test_matches_torch(shape_name, kind, weighted, ignore, eps):
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  shape, axis = SHAPES[shape_name]
  logits, targets = _make_inputs(shape, axis, kind, ignore)
  weight = _weight(weighted)
  ndim = len(shape)
  # torch wants classes on axis 1 (axis 0 when unbatched).
  t_axis = 0 if ndim == 1 else 1
  z_t = torch.tensor(np.moveaxis(logits, axis, t_axis), dtype=torch.float64, requires_grad=True)
  if kind == "int":
    y_t = torch.tensor(targets, dtype=torch.int64)
  else:
    y_t = torch.tensor(np.moveaxis(targets, axis, t_axis), dtype=torch.float64)
  w_t = None if weight is None else torch.tensor(weight, dtype=torch.float64)
  rng = np.random.default_rng(1)
  for reduction in REDUCTIONS:
    expected = F.cross_entropy(
      z_t, y_t, weight=w_t, ignore_index=ignore, reduction=reduction, label_smoothing=eps
    )
    cot = rng.standard_normal(expected.shape)
    (g_t,) = torch.autograd.grad(expected, z_t, torch.tensor(cot, dtype=torch.float64))
    expected_grad = np.moveaxis(g_t.numpy(), t_axis, axis)
    value, grad = _loss_and_grad(
      logits,
      targets,
      cot,
      weight=weight,
      ignore_index=ignore,
      reduction=reduction,
      label_smoothing=eps,
      axis=axis,
    )
    assert value.shape == tuple(expected.shape), reduction
    np.testing.assert_allclose(
      value, expected.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=reduction
    )
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6, err_msg=reduction)


def test_ignore_index_with_probabilities_rejected_like_torch():
  torch = pytest.importorskip("torch")
  logits = np.zeros((2, 3), np.float32)
  probs = np.full((2, 3), 1 / 3, np.float32)
  with pytest.raises(RuntimeError, match="ignore_index"):
    torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(probs), ignore_index=1)
  with pytest.raises(ValueError, match="`ignore_index`=1"):
    xentjax.cross_entropy_loss(logits, probs, ignore_index=1)


def test_all_ignored_mean_is_nan_as_in_torch():
  torch = pytest.importorskip("torch")
  logits = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
  labels = np.full((4,), -100)
  expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels))
  assert torch.isnan(expected)  # torch: 0/0
  assert np.isnan(float(xentjax.cross_entropy_loss(logits, labels)))  # the same (zero gradient)


def test_torch_raises_where_xentjax_returns_nan():
  torch = pytest.importorskip("torch")
  logits = np.zeros((2, 3), np.float32)
  labels = np.array([0, 3])
  with pytest.raises((IndexError, RuntimeError)):
    torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels))
  assert np.isnan(xentjax.cross_entropy_loss(logits, labels))


# ----------------------------------------------------------------------------
# Torch-free checks against a float64 NumPy transcription of the formulas.


def _np_log_softmax(z):
  z = z.astype(np.float64)
  m = z.max(axis=-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _np_reference(logits, targets, weight, ignore, eps, reduction):
  """Classes on the last axis; written from the docstring's formulas."""
  lp = _np_log_softmax(logits)
  c = lp.shape[-1]
  w = np.ones(c) if weight is None else weight.astype(np.float64)
  if np.issubdtype(targets.dtype, np.integer):
    losses, weights_y = [], []
    for row, y in zip(lp.reshape(-1, c), targets.reshape(-1)):
      if y == ignore:
        losses.append(0.0)
        continue
      nll = -w[y] * row[y]
      smooth = -(w * row).sum()
      losses.append((1 - eps) * nll + eps / c * smooth)
      weights_y.append(w[y])
    losses = np.array(losses).reshape(targets.shape)
    denom = sum(weights_y)
  else:
    t = (1 - eps) * targets.astype(np.float64) + eps / c
    losses = -(w * t * lp).sum(axis=-1)
    denom = losses.size
  if reduction == "none":
    return losses
  if reduction == "sum":
    return losses.sum()
  return losses.sum() / denom


@pytest.mark.parametrize("kind,weighted,ignore,eps", CASES)
def test_matches_numpy_formula(kind, weighted, ignore, eps):
  logits, targets = _make_inputs((3, 4, NUM_CLASSES), -1, kind, ignore, seed=3)
  weight = _weight(weighted)
  for reduction in REDUCTIONS:
    got = xentjax.cross_entropy_loss(
      logits,
      targets,
      weight=weight,
      ignore_index=ignore,
      reduction=reduction,
      label_smoothing=eps,
    )
    want = _np_reference(logits, targets, weight, ignore, eps, reduction)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6, err_msg=reduction)


def test_integer_gradient_is_softmax_minus_onehot_over_count():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((5, 4)).astype(np.float32)
  labels = np.array([0, 3, -100, 2, 1])
  grad = jax.grad(xentjax.cross_entropy_loss)(jnp.asarray(logits), labels)
  p = np.exp(_np_log_softmax(logits))
  onehot = np.eye(4)[np.where(labels < 0, 0, labels)]
  keep = (labels != -100)[:, None]
  want = np.where(keep, p - onehot, 0.0) / keep.sum()
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_integer_labels_equal_onehot_probabilities(eps, reduction):
  # For "none"/"sum" the two target kinds agree even with weights and
  # smoothing (only the "mean" denominators differ, as in torch).
  rng = np.random.default_rng(5)
  logits = rng.standard_normal((7, NUM_CLASSES)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=7)
  onehot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
  kw = {"weight": _weight(True), "label_smoothing": eps, "reduction": reduction}
  a = xentjax.cross_entropy_loss(logits, labels, **kw)
  b = xentjax.cross_entropy_loss(logits, onehot, **kw)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_mean_divides_by_target_weights_for_int_and_by_n_for_prob():
  logits = np.zeros((2, 2), np.float32)  # every -log p = ln 2
  w = np.array([1.0, 3.0], np.float32)
  labels = np.array([1, 1])
  # int: sum = 2 * 3 ln 2, divided by w[1] + w[1] = 6 -> ln 2.
  np.testing.assert_allclose(
    xentjax.cross_entropy_loss(logits, labels, weight=w), np.log(2), rtol=1e-6
  )
  # prob: same sum 6 ln 2, divided by N = 2 -> 3 ln 2.
  onehot = np.eye(2, dtype=np.float32)[labels]
  np.testing.assert_allclose(
    xentjax.cross_entropy_loss(logits, onehot, weight=w), 3 * np.log(2), rtol=1e-6
  )


def test_ignore_index_naming_a_valid_class():
  logits = np.random.default_rng(6).standard_normal((4, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 1])
  got = xentjax.cross_entropy_loss(logits, labels, ignore_index=1, reduction="none")
  lp = _np_log_softmax(logits)
  want = np.array([-lp[0, 0], 0.0, -lp[2, 2], 0.0])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
  # With probability targets the default -100 and None both ignore nothing.
  probs = np.eye(3, dtype=np.float32)[labels]
  for ignore in (-100, None):
    full = xentjax.cross_entropy_loss(logits, probs, ignore_index=ignore, reduction="none")
    np.testing.assert_allclose(np.asarray(full), -lp[np.arange(4), labels], rtol=1e-6)
  with pytest.raises(ValueError, match="`ignore_index`"):
    xentjax.cross_entropy_loss(logits, probs, ignore_index=1)


# ----------------------------------------------------------------------------
# Edge cases.


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_all_ignored_gives_nan_mean_zero_sum_and_zero_gradient(weighted, eps):
  logits = jnp.asarray(np.random.default_rng(7).standard_normal((3, 4)), jnp.float32)
  labels = np.full((3,), -100)
  kw = {
    "weight": _weight(False) if not weighted else np.ones(4, np.float32),
    "label_smoothing": eps,
  }
  for reduction in REDUCTIONS:
    value = xentjax.cross_entropy_loss(logits, labels, reduction=reduction, **kw)
    # The mean over nothing is NaN (no data); "sum" and "none" are 0.
    want = np.nan if reduction == "mean" else 0.0
    np.testing.assert_array_equal(np.asarray(value), want)
  for reduction in REDUCTIONS:
    loss = lambda z, r=reduction: jnp.sum(xentjax.cross_entropy_loss(z, labels, reduction=r, **kw))
    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(logits)), 0.0)


def test_empty_batch_mean_is_nan_sum_is_zero():
  for targets in (np.zeros((0,), np.int32), np.zeros((0, 3), np.float32)):
    logits = jnp.zeros((0, 3), jnp.float32)
    assert np.isnan(float(xentjax.cross_entropy_loss(logits, targets)))
    assert float(xentjax.cross_entropy_loss(logits, targets, reduction="sum")) == 0.0
    grad = jax.grad(lambda z, t=targets: xentjax.cross_entropy_loss(z, t))(logits)
    assert grad.shape == (0, 3)


@pytest.mark.parametrize("bad_label", [3, 7, -1, -99])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_out_of_range_label_gives_nan(bad_label, eps):
  logits = jnp.asarray(np.random.default_rng(8).standard_normal((3, 3)), jnp.float32)
  labels = jnp.array([0, bad_label, 2])
  f = jax.jit(lambda z, y: xentjax.cross_entropy_loss(z, y, reduction="none", label_smoothing=eps))
  per_example = np.asarray(f(logits, labels))
  assert np.isnan(per_example[1])
  assert np.all(np.isfinite(per_example[[0, 2]]))
  for reduction in ("mean", "sum"):
    assert np.isnan(
      xentjax.cross_entropy_loss(logits, labels, reduction=reduction, label_smoothing=eps)
    )
  grad = jax.grad(lambda z: xentjax.cross_entropy_loss(z, labels, label_smoothing=eps))(logits)
  assert np.isnan(np.asarray(grad)).any()  # never a silently finite update


def test_narrow_integer_label_dtypes_do_not_wrap():
  # uint8 156 must not match ignore_index=-100; int8 100 is valid for 300 classes.
  logits = jnp.zeros((2, 300), jnp.float32)
  for labels in (np.array([156, 2], np.uint8), np.array([100, 2], np.int8)):
    value = xentjax.cross_entropy_loss(logits, labels, reduction="none")
    np.testing.assert_allclose(np.asarray(value), np.log(300.0), rtol=1e-6)
  bad = np.array([-3, 2], np.int8)
  assert np.isnan(xentjax.cross_entropy_loss(logits, bad, reduction="none")[0])


def test_zero_probability_on_minus_inf_logit_is_finite():
  logits = jnp.array([[0.0, 1.0, -jnp.inf]], jnp.float32)
  probs = jnp.array([[0.25, 0.75, 0.0]], jnp.float32)
  value = xentjax.cross_entropy_loss(logits, probs)
  lp = _np_log_softmax(np.array([[0.0, 1.0]]))[0]
  np.testing.assert_allclose(float(value), -(0.25 * lp[0] + 0.75 * lp[1]), rtol=1e-6)
  grad = jax.grad(xentjax.cross_entropy_loss)(logits, probs)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_ignored_row_with_minus_inf_logits_is_zero():
  logits = jnp.array([[0.0, -jnp.inf], [1.0, 2.0]], jnp.float32)
  labels = jnp.array([-100, 1])
  value = xentjax.cross_entropy_loss(logits, labels, reduction="none", label_smoothing=0.1)
  assert float(value[0]) == 0.0
  grad = jax.grad(lambda z: xentjax.cross_entropy_loss(z, labels, label_smoothing=0.1))(logits)
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_logits_computed_and_returned_in_float32(dtype):
  rng = np.random.default_rng(9)
  logits = jnp.asarray(rng.standard_normal((4, 6)), dtype)
  labels = jnp.array([0, 5, 2, 3])
  value = xentjax.cross_entropy_loss(logits, labels, label_smoothing=0.1)
  assert value.dtype == jnp.float32
  up = np.asarray(logits.astype(jnp.float32))
  want = _np_reference(up, np.asarray(labels), None, -100, 0.1, "mean")
  np.testing.assert_allclose(float(value), want, rtol=1e-6)
  grad = jax.grad(lambda z: xentjax.cross_entropy_loss(z, labels))(logits)
  assert grad.dtype == dtype


def test_output_dtype_follows_logits():
  logits = jnp.zeros((2, 3))  # float64 under JAX_ENABLE_X64=1, else float32
  assert xentjax.cross_entropy_loss(logits, jnp.array([0, 1])).dtype == logits.dtype


def test_jit_matches_eager():
  logits, targets = _make_inputs((3, 4, NUM_CLASSES), -1, "int", -100, seed=10)
  kw = {"weight": _weight(True), "label_smoothing": 0.1}
  eager = xentjax.cross_entropy_loss(logits, targets, **kw)
  jitted = jax.jit(lambda z, y: xentjax.cross_entropy_loss(z, y, **kw))(logits, targets)
  np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)


# ----------------------------------------------------------------------------
# Bad arguments: raised at trace time, naming the argument and the shapes.


def test_integer_targets_with_wrong_shape():
  with pytest.raises(ValueError, match=r"targets.*\(4,\).*targets.shape=\(3,\)"):
    xentjax.cross_entropy_loss(jnp.zeros((4, 3)), jnp.zeros((3,), jnp.int32))


def test_integer_targets_where_probabilities_expected():
  with pytest.raises(ValueError, match="probability targets must have a floating dtype"):
    xentjax.cross_entropy_loss(jnp.zeros((4, 3)), jnp.zeros((4, 3), jnp.int32))


def test_probability_targets_where_indices_expected():
  with pytest.raises(ValueError, match="for class indices use an integer dtype"):
    xentjax.cross_entropy_loss(jnp.zeros((4, 3)), jnp.zeros((4,), jnp.float32))


def test_probability_targets_with_wrong_shape():
  with pytest.raises(ValueError, match=r"targets.shape=\(4, 2\)"):
    xentjax.cross_entropy_loss(jnp.zeros((4, 3)), jnp.zeros((4, 2), jnp.float32))


def test_non_floating_logits():
  with pytest.raises(TypeError, match="`logits`"):
    xentjax.cross_entropy_loss(jnp.zeros((4, 3), jnp.int32), jnp.zeros((4,), jnp.int32))


def test_bool_targets_rejected():
  with pytest.raises(TypeError, match="`targets`"):
    xentjax.cross_entropy_loss(jnp.zeros((4, 3)), jnp.zeros((4, 3), bool))


def test_unknown_reduction():
  with pytest.raises(ValueError, match=r"`reduction`.*'avg'"):
    xentjax.cross_entropy_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), reduction="avg")


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan")])
def test_label_smoothing_out_of_range(eps):
  with pytest.raises(ValueError, match="`label_smoothing`"):
    xentjax.cross_entropy_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), label_smoothing=eps)


def test_weight_shape_and_dtype():
  with pytest.raises(ValueError, match=r"`weight`.*\(3,\).*\(4,\)"):
    xentjax.cross_entropy_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), weight=jnp.ones(4))
  with pytest.raises(TypeError, match="`weight`"):
    xentjax.cross_entropy_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), weight=jnp.ones(3, int))


def test_scalar_logits_and_bad_axis():
  with pytest.raises(ValueError, match="`logits`"):
    xentjax.cross_entropy_loss(jnp.zeros(()), jnp.array(0))
  with pytest.raises(ValueError, match="`axis`"):
    xentjax.cross_entropy_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), axis=2)


def test_errors_raise_at_trace_time_inside_jit():
  f = jax.jit(lambda z, y: xentjax.cross_entropy_loss(z, y))
  with pytest.raises(ValueError, match=r"targets.shape"):
    f(jnp.zeros((4, 3)), jnp.zeros((5,), jnp.int32))


# ----------------------------------------------------------------------------
# check_labels.


def test_check_labels_returns_labels_unchanged():
  labels = np.array([[0, 2], [1, -100]])
  assert xentjax.check_labels(labels, 3, ignore_index=-100) is labels
  jl = jnp.array([0, 1, 2])
  assert xentjax.check_labels(jl, 3) is jl


@pytest.mark.parametrize(
  "labels,where,value",
  [
    ([0, 3, 1], r"labels\[1\]", "3"),
    ([[0, 1], [-1, 5]], r"labels\[1, 0\]", "-1"),
    ([0, -100], r"labels\[1\]", "-100"),  # -100 is not allowed unless named
  ],
)
def test_check_labels_names_first_offender(labels, where, value):
  with pytest.raises(ValueError, match=rf"{where} = {value} is out of range for num_classes=3"):
    xentjax.check_labels(np.array(labels), 3)


def test_check_labels_counts_offenders_and_scalar():
  with pytest.raises(ValueError, match="2 of 4 labels"):
    xentjax.check_labels(np.array([5, 0, 7, 1]), 3)
  with pytest.raises(ValueError, match=r"^labels = 4 "):
    xentjax.check_labels(np.array(4), 3)


def test_check_labels_type_errors():
  with pytest.raises(TypeError, match="integer"):
    xentjax.check_labels(np.array([0.0, 1.0]), 3)
  with pytest.raises(TypeError, match="`num_classes`"):
    xentjax.check_labels(np.array([0]), 3.0)
  with pytest.raises(ValueError, match="`num_classes`"):
    xentjax.check_labels(np.array([0]), 0)
  with pytest.raises(TypeError, match="traced"):
    jax.jit(lambda y: xentjax.check_labels(y, 3))(jnp.array([0, 1]))
