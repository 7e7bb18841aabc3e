"""One question, one answer: every cross-entropy path on the same rows, against one reference.

The same logits and labels (ties, masks, nothing counted, `ignore_index`,
out-of-range labels, a NaN row, an all -inf row) go through the optax-style
losses (integer and one-hot labels), `cross_entropy_loss`, `xentjax.metrics`,
`xentjax.evaluate`, `train.evaluate_classifier` and the fused
`linear_softmax_cross_entropy` (fed the given logits as ``x @ w``), and every
number is compared with a float64 NumPy reference written from the
definitions and the conventions table:

* loss ``logsumexp(z) - z_y``; ``+inf`` for a row of ``-inf``; NaN for a NaN
  logit or a counted label outside ``[0, K)``;
* top-k credit by counting places: with ``g`` classes above the label and
  ``t`` equal to it, the label's place is uniform over ``g+1 .. g+t``;
* means over the counted rows; the mean over nothing is NaN.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax as L
from xentjax import metrics, train

K = 5
IGNORE = -100
RTOL = 1e-5


def _ties(seed, n=12):
  rng = np.random.default_rng(seed)
  z = rng.integers(-2, 3, size=(n, K)).astype(np.float32)  # integer-valued: many ties
  y = rng.integers(0, K, size=n)
  return z, y


def _case(name):
  z, y = _ties(1)
  mask = None
  if name == "masks":
    rng = np.random.default_rng(2)
    mask = rng.random(len(y)) < 0.7
    y = np.where(rng.random(len(y)) < 0.2, IGNORE, y)
  elif name == "all_masked":
    mask = np.zeros(len(y), bool)
  elif name == "all_ignored":
    y = np.full(len(y), IGNORE)
  elif name == "out_of_range":
    y = y.copy()
    y[3], y[7] = K, -3
  elif name == "nan_row":
    z[4, 2] = np.nan
  elif name == "neg_inf_row":
    z[5] = -np.inf
  elif name == "bad_rows_masked":
    z[4, 2] = np.nan
    y = y.copy()
    y[3] = K + 4
    mask = np.ones(len(y), bool)
    mask[[3, 4]] = False
  return z, y, mask


CASES = [
  "ties",
  "masks",
  "all_masked",
  "all_ignored",
  "out_of_range",
  "nan_row",
  "neg_inf_row",
  "bad_rows_masked",
]


# --- the float64 reference ----------------------------------------------------


def _counted(y, mask):
  keep = y != IGNORE
  return keep if mask is None else keep & mask


def _ref_rows(z, y, mask, k):
  """Per-row (loss, top-1 credit, top-k credit) in float64; NaN where undefined."""
  z = np.asarray(z, np.float64)
  counted = _counted(y, mask)
  loss, c1, ck = (np.zeros(len(y)) for _ in range(3))
  for i in np.flatnonzero(counted):
    row, label = z[i], y[i]
    if not 0 <= label < K or np.isnan(row).any():
      loss[i] = c1[i] = ck[i] = np.nan
      continue
    if np.all(row == -np.inf):
      loss[i] = np.inf
    else:
      m = row.max()
      loss[i] = m + np.log(np.sum(np.exp(row - m))) - row[label]
    g, t = int(np.sum(row > row[label])), int(np.sum(row == row[label]))
    c1[i] = sum(g + j <= 1 for j in range(1, t + 1)) / t
    ck[i] = sum(g + j <= k for j in range(1, t + 1)) / t
  return loss, c1, ck, counted


def _mean(values, counted):
  n = int(counted.sum())
  return math.nan if n == 0 else float(values[counted].sum() / n)


def _close(got, want, what):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, err_msg=what)


# --- the paths ------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_optax_style_losses(name):
  z, y, mask = _case(name)
  loss, _, _, counted = _ref_rows(z, y, mask, 2)
  got = L.softmax_cross_entropy_with_integer_labels(z, np.where(counted, y, 0), where=counted)
  _close(got, np.where(counted, loss, 0.0), "softmax_cross_entropy_with_integer_labels")
  # One-hot labels cannot say "out of range": compare the rows whose label is a class.
  ok = counted & (y >= 0) & (y < K)
  onehot = np.eye(K, dtype=np.float32)[np.where(ok, y, 0)]
  got = L.softmax_cross_entropy(z, onehot, where=ok)
  _close(got, np.where(ok, loss, 0.0), "softmax_cross_entropy (one-hot)")


@pytest.mark.parametrize("name", CASES)
def test_cross_entropy_loss(name):
  z, y, mask = _case(name)
  loss, _, _, counted = _ref_rows(z, y, mask, 2)
  labels = np.where(counted, y, IGNORE)
  _close(L.cross_entropy_loss(z, labels, reduction="none"), loss, "none")
  _close(L.cross_entropy_loss(z, labels), _mean(loss, counted), "mean")
  _close(L.cross_entropy_loss(z, labels, reduction="sum"), loss[counted].sum(), "sum")


@pytest.mark.parametrize("name", CASES)
def test_metrics(name):
  z, y, mask = _case(name)
  loss, c1, c2, counted = _ref_rows(z, y, mask, 2)
  where = counted
  _close(metrics.cross_entropy_rate(z, y, where=where), _mean(loss, counted), "ce rate")
  _close(metrics.perplexity(z, y, where=where), np.exp(_mean(loss, counted)), "perplexity")
  _close(metrics.accuracy(z, y, where=where), _mean(c1, counted), "accuracy")
  _close(metrics.top_k_accuracy(z, y, k=2, where=where), _mean(c2, counted), "top-2")
  _close(metrics.correct(z, y, where=where), c1, "correct")


@pytest.mark.parametrize("name", CASES)
def test_evaluate(name):
  z, y, mask = _case(name)
  loss, c1, c2, counted = _ref_rows(z, y, mask, 2)
  batch = (z, y) if mask is None else (z, y, mask)
  r = L.evaluate([batch], top_k=2, ignore_index=IGNORE, progress=False)
  assert r.count == int(counted.sum())
  _close(r.cross_entropy, _mean(loss, counted), "evaluate cross_entropy")
  _close(r.accuracy, _mean(c1, counted), "evaluate accuracy")
  _close(r.top_k_accuracy, _mean(c2, counted), "evaluate top-2")
  # The accumulator holds exactly what metrics averages, batch by batch.
  halves = [tuple(a[:5] for a in batch), tuple(a[5:] for a in batch)]
  r2 = L.evaluate(halves, top_k=2, ignore_index=IGNORE, progress=False)
  _close(r2.accuracy, r.accuracy, "evaluate accuracy in two batches")


@pytest.mark.parametrize("name", ["ties", "out_of_range", "nan_row", "neg_inf_row"])
def test_train_evaluate_classifier(name):
  z, y, mask = _case(name)
  assert mask is None
  _, c1, c2, counted = _ref_rows(z, y, mask, 2)
  out = train.evaluate_classifier(None, z, y, k=2, model=lambda params, x: x)
  _close(out["accuracy"], _mean(c1, counted), "accuracy")
  _close(out["top_k_accuracy"], _mean(c2, counted), "top-2")


def _fused_rows(z, y, mask):
  """The fused loss fed each row's logits exactly, as ``[[1.]] @ z[i:i+1]`` (no 0 * inf)."""
  out = []
  for i in range(len(y)):
    where = None if mask is None else mask[i : i + 1]
    out.append(
      L.linear_softmax_cross_entropy(
        jnp.ones((1, 1)), z[i : i + 1], y[i : i + 1], where=where, reduction="none"
      )[0]
    )
  return np.array(out, np.float64)


@pytest.mark.parametrize("name", CASES)
def test_fused(name):
  z, y, mask = _case(name)
  loss, _, _, counted = _ref_rows(z, y, mask, 2)
  _close(_fused_rows(z, y, mask), np.where(counted, loss, 0.0), "fused none (per row)")
  if np.isfinite(z).all():  # identity @ logits is exact only for finite logits
    x = jnp.eye(len(y), dtype=jnp.float32)
    got = L.linear_softmax_cross_entropy(x, z, y, where=mask)
    _close(got, _mean(loss, counted), "fused mean")
    got = L.linear_softmax_cross_entropy(x, z.T, y, where=mask, reduction="sum", w_layout="vd")
    _close(got, loss[counted].sum(), "fused sum")


@pytest.mark.parametrize("name", ["all_masked", "all_ignored", "bad_rows_masked"])
def test_nothing_counted_or_masked_rows_have_a_zero_gradient(name):
  z, y, mask = _case(name)
  _, _, _, counted = _ref_rows(z, y, mask, 2)
  labels = np.where(counted, y, IGNORE)
  z_finite = jnp.asarray(np.where(np.isfinite(z), z, 0.0))  # identity @ w needs finite w
  grads = {
    "cross_entropy_loss": jax.grad(lambda v: L.cross_entropy_loss(v, labels))(jnp.asarray(z)),
    "metrics": jax.grad(lambda v: metrics.cross_entropy_rate(v, y, where=counted))(jnp.asarray(z)),
    "fused": jax.grad(lambda v: L.linear_softmax_cross_entropy(jnp.eye(len(y)), v, y, where=mask))(
      z_finite
    ),
  }
  for path, g in grads.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    np.testing.assert_array_equal(g[~counted], 0.0, err_msg=path)


# `eps=` keeps the input's precision : under x64 the clip
# bounds (Python numbers) must not promote float32 or 16-bit inputs to float64.


def _eps_functions():
  """Every public function with an `eps=` argument (found, not listed by hand)."""
  import inspect

  found = []
  for module in (L, L.grads, L.info, L.metrics, L.calibration):
    for name in module.__all__:
      fn = getattr(module, name)
      if inspect.isfunction(fn) and "eps" in inspect.signature(fn).parameters:
        found.append((f"{module.__name__}.{name}", fn))
  return found


def eps_dtype_mismatches() -> list:
  """``(function, input dtype, output dtype, expected)`` wherever `eps=` changes the dtype."""
  q = np.array([[0.0, 0.3, 0.7], [1.0, 0.0, 0.0]])
  y = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
  bad = []
  for name, fn in _eps_functions():
    for dtype in (np.float32, jnp.bfloat16, np.float16):
      first = q.astype(dtype)
      labels = np.array([2, 1]) if "integer_labels" in name else y.astype(dtype)
      out = fn(first, labels, eps=1e-3)
      # A loss is computed (and returned) in float32 for 16-bit inputs; a
      # gradient has the dtype of its argument.
      want = dtype if name.startswith("xentjax.grads.") else np.float32
      if out.dtype != want:
        bad.append((name, np.dtype(dtype).name, out.dtype.name, np.dtype(want).name))
  return bad


def test_eps_keeps_the_input_dtype_under_x64():
  assert len(_eps_functions()) >= 6  # the losses and their gradients: the search finds them
  if jax.config.jax_enable_x64:
    assert eps_dtype_mismatches() == []
    return
  import os
  import pathlib
  import subprocess
  import sys

  tests = pathlib.Path(__file__).resolve().parent
  code = (
    "import sys; sys.path.insert(0, sys.argv[1]); import jax; "
    "assert jax.config.jax_enable_x64; import test_every_path_agrees as t; "
    "print(t.eps_dtype_mismatches())"
  )
  env = {**os.environ, "JAX_ENABLE_X64": "1", "JAX_PLATFORMS": "cpu"}
  env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), env.get("PYTHONPATH", "")])
  run = subprocess.run(
    [sys.executable, "-c", code, str(tests)],
    check=False,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout
