"""Contrastive losses (`contrastive_loss`, `sigmoid_contrastive_loss`, `ntxent`) and the InfoNCE bound.

The references are written here in float64 NumPy from the published
definitions: open_clip's ``ClipLoss`` (the mean of the two cross-entropies of
``scale · a bᵀ`` with the diagonal as labels) and big_vision's sigmoid loss
(``-sum_ij log σ(s_ij (scale a_i·b_j + bias)) / B``). Their gradients are
central differences of the references, in float64. NT-Xent is checked against
optax's own function and optax's own test cases.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.special import log_expit, logsumexp

import xentjax
from xentjax import contrastive_loss, ntxent, sigmoid_contrastive_loss

RNG = np.random.default_rng(0)
B, M, D = 10, 13, 5
A = RNG.normal(size=(B, D)).astype(np.float32)
BB = RNG.normal(size=(B, D)).astype(np.float32)
BM = RNG.normal(size=(M, D)).astype(np.float32)
Y = np.array([3, 0, 12, 5, 5, 7, 1, 9, 2, 11])  # two rows share column 5
KEEP = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
RAGGED = {"row_chunk_size": 3, "column_chunk_size": 4}  # 10 = 3+3+3+1, 13 = 4+4+4+1


# ----------------------------------------------------------------------------
# float64 references.


def _reduce(per_row, keep, reduction):
  per_row = np.where(keep, per_row, 0.0)
  if reduction == "none":
    return per_row
  return per_row.sum() / (keep.sum() if reduction == "mean" else 1.0)


def clip_ref(a, b, scale, labels=None, where=None, symmetric=True, reduction="mean"):
  """open_clip's ClipLoss, with labels (positive column y_i) and a row mask."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n = a.shape[0]
  keep = np.ones(n, bool) if where is None else np.asarray(where, bool)
  y = np.arange(n) if labels is None else np.asarray(labels)
  z = scale * a @ b.T
  col_ok = keep if labels is None else np.ones(b.shape[0], bool)
  zr = np.where(col_ok[None, :], z, -np.inf)
  zc = np.where(keep[:, None], z, -np.inf)
  zy = z[np.arange(n), y]
  a_to_b = logsumexp(zr, axis=1) - zy
  b_to_a = logsumexp(zc, axis=0)[y] - zy
  per_row = 0.5 * (a_to_b + b_to_a) if symmetric else a_to_b
  return _reduce(per_row, keep, reduction)


def sigmoid_ref(a, b, scale, bias, labels=None, where=None, reduction="mean"):
  """big_vision's sigmoid loss: -sum_ij log σ(s_ij z_ij), s = +1 at the positive, / B."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n = a.shape[0]
  keep = np.ones(n, bool) if where is None else np.asarray(where, bool)
  y = np.arange(n) if labels is None else np.asarray(labels)
  z = scale * a @ b.T + bias
  sign = -np.ones_like(z)
  sign[np.arange(n), y] = 1.0
  col_ok = keep if labels is None else np.ones(b.shape[0], bool)
  per_row = -np.sum(np.where(col_ok[None, :], log_expit(sign * z), 0.0), axis=1)
  return _reduce(per_row, keep, reduction)


def numeric_grad(f, x, h=1e-6):
  """Central differences of a float64 function of one array (or scalar)."""
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, dn = x.copy(), x.copy()
    up[i] += h
    dn[i] -= h
    g[i] = (f(up) - f(dn)) / (2 * h)
  return g


def close(got, want, tol=2e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def check_value_and_grads(loss, ref, a, b, params: dict):
  """``loss(a, b, **params)`` and its gradients in a, b and each param against ``ref``."""
  names = ["a", "b", *params]
  args = [jnp.asarray(a), jnp.asarray(b), *(jnp.float32(v) for v in params.values())]

  def f(*xs):
    return loss(xs[0], xs[1], **dict(zip(params, xs[2:], strict=True)))

  value, grads = jax.value_and_grad(f, tuple(range(len(args))))(*args)
  plain = [np.asarray(a, np.float64), np.asarray(b, np.float64), *params.values()]
  close(value, ref(*plain))
  for i, (name, g) in enumerate(zip(names, grads, strict=True)):

    def along(x, i=i):
      return ref(*plain[:i], x, *plain[i + 1 :])

    close(g, numeric_grad(along, plain[i]), tol=1e-4)
    assert np.shape(g) == np.shape(args[i]), name


# ----------------------------------------------------------------------------
# CLIP / InfoNCE.


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tiles", [{}, RAGGED])
def test_clip_matches_open_clip_definition(symmetric, tiles):
  def loss(a, b, scale):
    return contrastive_loss(a, b, scale=scale, symmetric=symmetric, **tiles)

  def ref(a, b, scale):
    return clip_ref(a, b, scale, symmetric=symmetric)

  check_value_and_grads(loss, ref, A, BB, {"scale": 2.5})


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_with_labels_more_candidates_and_mask(symmetric):
  def loss(a, b, scale):
    return contrastive_loss(a, b, scale=scale, labels=Y, where=KEEP, symmetric=symmetric, **RAGGED)

  def ref(a, b, scale):
    return clip_ref(a, b, scale, labels=Y, where=KEEP, symmetric=symmetric)

  check_value_and_grads(loss, ref, A, BM, {"scale": 1.5})


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_clip_mask_and_reductions(reduction):
  got = contrastive_loss(A, BB, scale=3.0, where=KEEP, reduction=reduction, **RAGGED)
  close(got, clip_ref(A, BB, 3.0, where=KEEP, reduction=reduction))
  # A masked pair is padding: changing it changes nothing.
  a2, b2 = A.copy(), BB.copy()
  a2[~KEEP], b2[~KEEP] = 100.0, -50.0
  close(contrastive_loss(a2, b2, scale=3.0, where=KEEP, reduction=reduction), got)


def test_clip_matches_optax_materialized():
  z = 2.0 * A @ BB.T
  y = np.arange(B)
  want = 0.5 * (
    optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
    + optax.softmax_cross_entropy_with_integer_labels(z.T, y).mean()
  )
  close(contrastive_loss(A, BB, scale=2.0), want)


def test_clip_bf16_accumulates_in_float32():
  a16, b16 = jnp.asarray(A, jnp.bfloat16), jnp.asarray(BB, jnp.bfloat16)
  got, (ga, gb) = jax.value_and_grad(
    lambda a, b: contrastive_loss(a, b, scale=2.0, **RAGGED), (0, 1)
  )(a16, b16)
  assert got.dtype == jnp.float32 and ga.dtype == gb.dtype == jnp.bfloat16
  a64, b64 = np.asarray(a16, np.float64), np.asarray(b16, np.float64)
  close(got, clip_ref(a64, b64, 2.0), tol=1e-5)
  want = numeric_grad(lambda a: clip_ref(a, b64, 2.0), a64)
  close(np.asarray(ga, np.float64), want, tol=2e-2)


def test_out_of_range_label_is_nan_and_check_labels_raises():
  y = Y.copy()
  y[4] = M
  per_row = contrastive_loss(A, BM, labels=y, reduction="none")
  assert np.isnan(per_row[4]) and np.all(np.isfinite(np.delete(np.asarray(per_row), 4)))
  assert np.isnan(contrastive_loss(A, BM, labels=y))
  assert np.isnan(sigmoid_contrastive_loss(A, BM, labels=y, reduction="none")[4])
  with pytest.raises(ValueError, match="out of range"):
    xentjax.check_labels(y, M)


# ----------------------------------------------------------------------------
# Retrieval accuracy.


def ranks_ref(z, y, k):
  """Fractional top-k credit of z[i, y_i] in each row: clip((k - above) / tied, 0, 1)."""
  zy = z[np.arange(len(y)), y][:, None]
  above, tied = np.sum(z > zy, axis=1), np.sum(z == zy, axis=1)
  return np.clip((k - above) / tied, 0.0, 1.0)


def test_retrieval_accuracy_with_ties():
  # Integer embeddings: every logit is an exact integer, so ties are exact.
  a = RNG.integers(-1, 2, size=(12, 3)).astype(np.float32)
  b = RNG.integers(-1, 2, size=(12, 3)).astype(np.float32)
  z = a.astype(np.float64) @ b.T.astype(np.float64)
  y = np.arange(12)
  assert np.sum(z == np.diag(z)[:, None]) > 2 * 12  # ties do occur
  ks = (1, 2, 5)
  for kw in ({}, {"row_chunk_size": 5, "column_chunk_size": 7}):
    loss, acc = contrastive_loss(a, b, retrieval_k=ks, reduction="none", **kw)
    close(loss, clip_ref(a, b, 1.0, reduction="none"))
    for j, k in enumerate(ks):
      close(acc.a_to_b[:, j], ranks_ref(z, y, k))
      close(acc.b_to_a[:, j], ranks_ref(z.T, y, k))
  _, mean = contrastive_loss(a, b, retrieval_k=ks)
  close(mean.a_to_b, acc.a_to_b.mean(axis=0))


def test_retrieval_accuracy_with_labels_and_mask():
  z = 1.0 * A.astype(np.float64) @ BM.T.astype(np.float64)
  _, acc = contrastive_loss(A, BM, labels=Y, where=KEEP, retrieval_k=3, reduction="none")
  assert acc.b_to_a is None
  close(acc.a_to_b[:, 0], np.where(KEEP, ranks_ref(z, Y, 3), 0.0))


# ----------------------------------------------------------------------------
# SigLIP.


@pytest.mark.parametrize("strategy", [None, "recompute"])
@pytest.mark.parametrize("tiles", [{}, RAGGED])
def test_sigmoid_matches_big_vision_definition(strategy, tiles):
  def loss(a, b, scale, bias):
    return sigmoid_contrastive_loss(a, b, scale=scale, bias=bias, strategy=strategy, **tiles)

  check_value_and_grads(loss, sigmoid_ref, A, BB, {"scale": 2.0, "bias": -1.5})


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_sigmoid_with_labels_mask_and_reductions(reduction):
  strategies = ["recompute"] + ["store"] * (reduction != "none")
  for strategy in strategies:

    def loss(a, b, scale, bias, strategy=strategy):
      out = sigmoid_contrastive_loss(
        a,
        b,
        scale=scale,
        bias=bias,
        labels=Y,
        where=KEEP,
        reduction=reduction,
        strategy=strategy,
        # "store" sweeps whole rows: only the rows are chunked (10 = 3+3+3+1).
        **(RAGGED if strategy == "recompute" else {"row_chunk_size": 3}),
      )
      return jnp.sum(out * jnp.arange(1.0, B + 1)) if reduction == "none" else out

    def ref(a, b, scale, bias):
      out = sigmoid_ref(a, b, scale, bias, labels=Y, where=KEEP, reduction=reduction)
      return np.sum(out * np.arange(1.0, B + 1)) if reduction == "none" else out

    check_value_and_grads(loss, ref, A, BM, {"scale": 0.7, "bias": 0.3})


def test_sigmoid_bf16():
  a16, b16 = jnp.asarray(A, jnp.bfloat16), jnp.asarray(BB, jnp.bfloat16)
  got = sigmoid_contrastive_loss(a16, b16, scale=2.0, bias=-1.0)
  assert got.dtype == jnp.float32
  close(got, sigmoid_ref(np.asarray(a16, np.float64), np.asarray(b16, np.float64), 2.0, -1.0))


# ----------------------------------------------------------------------------
# NT-Xent: optax's call, optax's answers.


def test_ntxent_optax_test_cases():
  # The inputs and expected values of optax's `_self_supervised_test.NtxentTest`.
  ys = jnp.array([[-1.9540, 1.0780], [0.2380, -0.5703], [1.8745, -0.0195], [-0.6719, -1.9210]])
  ys_2 = ys.at[0].set(0.0)
  ts_1, ts_2 = jnp.array([0, 0, 1, 1]), jnp.array([0, 0, 0, 1])
  for e, t, expected in ((ys, ts_1, 14.01032), (ys, ts_2, 8.968544), (ys_2, ts_1, 9.2889)):
    np.testing.assert_allclose(jax.jit(ntxent)(e, t), expected, atol=1e-4)
    np.testing.assert_allclose(ntxent(e, t), optax.ntxent(e, t), rtol=1e-6)


@pytest.mark.parametrize("tiles", [{}, {"row_chunk_size": 5, "column_chunk_size": 7}])
def test_ntxent_matches_optax_values_and_gradients(tiles):
  e = RNG.normal(size=(17, 4)).astype(np.float32)
  t = jnp.asarray(RNG.integers(0, 4, 17))
  mine = jax.value_and_grad(lambda e, temp: ntxent(e, t, temp, **tiles), (0, 1))(e, 0.5)
  theirs = jax.value_and_grad(lambda e, temp: optax.ntxent(e, t, temp), (0, 1))(e, 0.5)
  close(mine[0], theirs[0])
  close(mine[1][0], theirs[1][0], tol=1e-4)
  close(mine[1][1], theirs[1][1], tol=1e-4)


def test_ntxent_without_positives_is_nan_like_optax():
  e = RNG.normal(size=(4, 3)).astype(np.float32)
  t = jnp.arange(4)
  assert np.isnan(ntxent(e, t)) and np.isnan(optax.ntxent(e, t))


# ----------------------------------------------------------------------------
# Memory: linear in B, not quadratic.


@pytest.mark.parametrize("loss", [contrastive_loss, sigmoid_contrastive_loss])
def test_temporary_memory_is_linear_in_the_batch(loss):
  d = 32

  def temp(n):
    a = jax.ShapeDtypeStruct((n, d), jnp.float32)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    tiles = {"row_chunk_size": 256, "column_chunk_size": 256}
    f = jax.value_and_grad(lambda a, b, s: loss(a, b, scale=s, **tiles), (0, 1, 2))
    return jax.jit(f).lower(a, a, s).compile().memory_analysis().temp_size_in_bytes

  small, large = temp(2048), temp(4096)
  assert large < 4096 * 4096 * 4 / 16  # far below the [B, B] float32 logits
  # 2048 more rows add a few [rows, D] float32 buffers, not [B, B] ones
  # (a quadratic program would add 3 * 2048^2 * 4 bytes = 48 MiB).
  assert large - small < 4 * 2048 * d * 4


# ----------------------------------------------------------------------------
# The InfoNCE bound.


def test_infonce_lower_bound():
  loss = np.array([0.0, 1.0, 2.5])
  close(xentjax.info.infonce_lower_bound(loss, 64), np.log(64) - loss)
  close(xentjax.info.infonce_lower_bound(loss, 64, base=2), (np.log(64) - loss) / np.log(2))
  # The bound never exceeds log B: the loss is a cross-entropy, never negative.
  bound = xentjax.info.infonce_lower_bound(contrastive_loss(A, BB, scale=50.0), B)
  assert bound <= np.log(B) + 1e-6


# ----------------------------------------------------------------------------
# Bad input: clear errors at trace time, naming the argument.


@pytest.mark.parametrize(
  "call, error, match",
  [
    (lambda: contrastive_loss(A, BB[:, :4]), ValueError, "same width D"),
    (lambda: contrastive_loss(A, BM), ValueError, "Pass `labels`"),
    (lambda: contrastive_loss(A, BB, scale=0.0), ValueError, "`scale` must be > 0"),
    (lambda: contrastive_loss(A, BB, scale=-1), ValueError, "`scale` must be > 0"),
    (lambda: sigmoid_contrastive_loss(A, BB, scale=-2.0), ValueError, "`scale` must be > 0"),
    (lambda: contrastive_loss(A, BB, where=KEEP.astype(np.float32)), TypeError, "`where`"),
    (lambda: contrastive_loss(A, BB, where=KEEP[:4]), ValueError, "`where` must have shape"),
    (lambda: contrastive_loss(A, BM, labels=Y.astype(np.float32)), TypeError, "`labels`"),
    (lambda: contrastive_loss(A, BM, labels=Y[:3]), ValueError, "`labels` must have shape"),
    (lambda: contrastive_loss(A.astype(int), BB), TypeError, "`a`"),
    (lambda: contrastive_loss(A, BB, row_chunk_size=0), ValueError, "`row_chunk_size`"),
    (lambda: contrastive_loss(A, BB, retrieval_k=0), ValueError, "`retrieval_k`"),
    (lambda: contrastive_loss(A, BB, data_axis="data"), ValueError, "pass `mesh` too"),
    (lambda: contrastive_loss(A, BB, mesh="cpu", data_axis="d"), TypeError, "`mesh`"),
    (lambda: sigmoid_contrastive_loss(A, BB, strategy="x"), ValueError, "`strategy`"),
    (
      lambda: sigmoid_contrastive_loss(A, BB, strategy="store", reduction="none"),
      ValueError,
      "recompute",
    ),
    (
      lambda: sigmoid_contrastive_loss(A, BB, strategy="store", column_chunk_size=4),
      ValueError,
      "whole rows",
    ),
    (lambda: ntxent(A, np.arange(3)), ValueError, "same leading dimension"),
    (lambda: ntxent(A, np.arange(B), True), TypeError, "`temperature`"),
    (lambda: contrastive_loss(A, BB, scale=float("inf")), ValueError, "`scale` must be > 0"),
    (lambda: contrastive_loss(A, BB, scale="2"), TypeError, "`scale`"),
  ],
)
def test_bad_input(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_mesh_axis_must_divide_the_batch():
  mesh = jax.make_mesh((1,), ("data",))
  with pytest.raises(ValueError, match="`data_axis` must name an axis"):
    contrastive_loss(A, BB, mesh=mesh, data_axis="model")
