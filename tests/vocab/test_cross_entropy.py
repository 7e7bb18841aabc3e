"""Tests of `xentjax.linear_softmax_cross_entropy` against materialized logits.

The reference below forms `x @ w` explicitly and writes the smoothed
cross-entropy, z-loss and soft cap out by hand; gradients of the reference come
from plain autodiff, so they are independent of the fused kernels' custom VJPs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xentjax import linear_softmax_cross_entropy as fused_ce


def reference(
  x,
  w,
  labels,
  *,
  reduction="mean",
  ignore_index=-100,
  where=None,
  label_smoothing=0.0,
  z_loss=0.0,
  logit_soft_cap=None,
  w_layout="dv",
  vocab_size=None,
):
  """Materialized logits, then the loss written out term by term (float32+)."""
  cdt = jnp.promote_types(jnp.result_type(x, w), jnp.float32)
  x = x.astype(cdt)
  w = w.astype(cdt)
  z = x @ (w.T if w_layout == "vd" else w)
  if logit_soft_cap is not None:
    z = logit_soft_cap * jnp.tanh(z / logit_soft_cap)
  if vocab_size is not None:
    z = z[..., :vocab_size]
  num_classes = z.shape[-1]
  lse = jax.scipy.special.logsumexp(z, axis=-1)
  logp = jax.nn.log_softmax(z, axis=-1)
  target = (1.0 - label_smoothing) * jax.nn.one_hot(
    labels, num_classes, dtype=cdt
  ) + label_smoothing / num_classes
  loss = -jnp.sum(target * logp, axis=-1) + z_loss * lse**2
  valid = labels != ignore_index
  if where is not None:
    valid = valid & where
  loss = jnp.where(valid, loss, 0.0)
  if reduction == "sum":
    loss = jnp.sum(loss)
  elif reduction == "mean":
    loss = jnp.sum(loss) / jnp.sum(valid)
  return loss, lse


def make_inputs(shape=(3, 5), d=16, v=37, dtype=jnp.float32, seed=0, scale=0.5, w_layout="dv"):
  kx, kw, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (*shape, d), jnp.float32).astype(dtype)
  w_shape = (v, d) if w_layout == "vd" else (d, v)
  w = (scale * jax.random.normal(kw, w_shape, jnp.float32)).astype(dtype)
  y = jax.random.randint(ky, shape, 0, v)
  return x, w, y


def assert_close(a, b, rtol=2e-5, atol=2e-5):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
  np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale)


# Named option sets; every one runs against the reference for values and both
# gradients. Tiles: 16 tokens in chunks of 8, V = 37 in chunks of 16 (a tail
# chunk); the "tails" case also has a token tail (N = 15 in chunks of 4).
OPTIONS = {
  "plain": {},
  "none": {"reduction": "none"},
  "ignore_where_sum": {"reduction": "sum", "ignore_index": 3, "_ignore": True, "_where": True},
  "label_smoothing": {"label_smoothing": 0.2},
  "z_loss": {"z_loss": 1e-2},
  "soft_cap": {"logit_soft_cap": 1.5},
  "vd_layout": {"w_layout": "vd", "label_smoothing": 0.1},
  "vocab_padding": {"vocab_size": 30, "label_smoothing": 0.3, "logit_soft_cap": 3.0},
  "tails": {
    "label_smoothing": 0.1,
    "z_loss": 1e-3,
    "logit_soft_cap": 2.0,
    "_ignore": True,
    "_where": True,
    "_shape": (3, 5),
    "token_chunk_size": 4,
    "vocab_chunk_size": 8,
  },
}
CHUNKS = {
  "recompute": {"token_chunk_size": 8, "vocab_chunk_size": 16},
  "store": {"token_chunk_size": 8},
}


def _split(opts, y):
  opts = dict(opts)
  opts.pop("_shape", None)
  where = None
  if opts.pop("_ignore", False):
    opts.setdefault("ignore_index", 3)
    y = y.at[0, :2].set(opts["ignore_index"])
  if opts.pop("_where", False):
    where = jnp.arange(y.size).reshape(y.shape) % 3 != 1
  if "vocab_size" in opts:
    y = y % opts["vocab_size"]
  return opts, y, where


# "store" needs a scalar reduction ("none" raises: see test_bad_input).
CASES = [
  (name, strategy)
  for strategy in ("recompute", "store")
  for name in OPTIONS
  if not (strategy == "store" and OPTIONS[name].get("reduction") == "none")
]


@pytest.mark.parametrize("name, strategy", CASES)
def test_matches_materialized(name, strategy):
  shape = OPTIONS[name].get("_shape", (2, 8))
  x, w, y = make_inputs(shape=shape, w_layout=OPTIONS[name].get("w_layout", "dv"))
  opts, y, where = _split(OPTIONS[name], y)
  chunks = {k: opts.pop(k, v) for k, v in CHUNKS[strategy].items()}
  if strategy == "store":
    opts.pop("vocab_chunk_size", None)
  cot = jax.random.normal(jax.random.PRNGKey(7), y.shape)

  def scalarize(loss):
    return jnp.sum(loss * cot) if loss.ndim else loss

  def ours(x, w):
    loss = fused_ce(x, w, y, where=where, strategy=strategy, **chunks, **opts)
    return scalarize(loss), loss

  def theirs(x, w):
    loss, _ = reference(
      x, w, y, where=where, **{k: v for k, v in opts.items() if not k.endswith("chunk_size")}
    )
    return scalarize(loss), loss

  (_, loss), grads = jax.jit(jax.value_and_grad(ours, (0, 1), has_aux=True))(x, w)
  (_, loss_ref), grads_ref = jax.jit(jax.value_and_grad(theirs, (0, 1), has_aux=True))(x, w)
  assert loss.shape == loss_ref.shape
  assert loss.dtype == jnp.float32
  assert_close(loss, loss_ref)
  for g, g_ref, arg in zip(grads, grads_ref, (x, w)):
    assert g.shape == arg.shape and g.dtype == arg.dtype
    assert_close(g, g_ref)


def test_matches_optax_plain():
  x, w, y = make_inputs(shape=(32,), d=24, v=50)
  got = jax.jit(lambda x, w: fused_ce(x, w, y, reduction="none"))(x, w)
  want = optax.softmax_cross_entropy_with_integer_labels(x @ w, y)
  assert_close(got, want)


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_lse_value_and_gradient(strategy):
  x, w, y = make_inputs(v=29)
  c = jax.random.normal(jax.random.PRNGKey(3), y.shape)
  kw = {"z_loss": 1e-2, "logit_soft_cap": 2.0, "reduction": "sum"}

  def ours(x, w):
    loss, lse = fused_ce(x, w, y, return_lse=True, strategy=strategy, token_chunk_size=4, **kw)
    return loss + jnp.sum(c * lse), lse

  def theirs(x, w):
    loss, lse = reference(x, w, y, **kw)
    # In "store" mode the returned lse is a constant for autodiff.
    lse_term = jnp.sum(c * (jax.lax.stop_gradient(lse) if strategy == "store" else lse))
    return loss + lse_term, lse

  (val, lse), g = jax.jit(jax.value_and_grad(ours, (0, 1), has_aux=True))(x, w)
  (val_r, lse_r), g_r = jax.jit(jax.value_and_grad(theirs, (0, 1), has_aux=True))(x, w)
  assert lse.shape == y.shape
  assert_close(lse, lse_r)
  assert_close(val, val_r)
  assert_close(g[0], g_r[0])
  assert_close(g[1], g_r[1])


@functools.partial(jax.jit, static_argnames=("reduction", "strategy"))
def fused_value_and_grads(x, w, y, where=None, *, reduction="mean", strategy="recompute"):
  """Jitted once per shape and options; labels and mask are arguments."""

  def f(x, w):
    return jnp.sum(fused_ce(x, w, y, where=where, reduction=reduction, strategy=strategy))

  return jax.value_and_grad(f, (0, 1))(x, w)


@jax.jit
def reference_value_and_grads(x, w, y, where=None):
  return jax.value_and_grad(lambda x, w: reference(x, w, y, where=where)[0], (0, 1))(x, w)


@pytest.mark.parametrize("strategy", ["recompute", "store"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs(dtype, strategy):
  x, w, y = make_inputs(shape=(4, 8), d=32, v=300, dtype=dtype)
  loss, (gx, gw) = fused_value_and_grads(x, w, y, strategy=strategy)
  assert loss.dtype == jnp.float32
  assert gx.dtype == dtype and gw.dtype == dtype
  # Reference: the same (rounded) inputs, materialized in float32.
  loss_r, (gx_r, gw_r) = reference_value_and_grads(x.astype(jnp.float32), w.astype(jnp.float32), y)
  assert_close(loss, loss_r, rtol=1e-2, atol=1e-2)
  assert_close(gx.astype(jnp.float32), gx_r, rtol=2e-2, atol=2e-2)
  assert_close(gw.astype(jnp.float32), gw_r, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_mixed_input_dtypes(strategy):
  """float32 x with a bfloat16 w: computed in float32, each gradient in its dtype."""
  x, w, y = make_inputs(shape=(4, 8), d=32, v=300)
  w = w.astype(jnp.bfloat16)
  loss, (gx, gw) = fused_value_and_grads(x, w, y, strategy=strategy)
  assert loss.dtype == jnp.float32 and gx.dtype == jnp.float32 and gw.dtype == jnp.bfloat16
  loss_r, (gx_r, gw_r) = reference_value_and_grads(x, w.astype(jnp.float32), y)
  assert_close(loss, loss_r)
  assert_close(gx, gx_r, rtol=1e-5, atol=1e-5)
  assert_close(gw.astype(jnp.float32), gw_r, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
  "reduction, strategy",
  [
    ("mean", "recompute"),
    ("sum", "recompute"),
    ("none", "recompute"),
    ("mean", "store"),
    ("sum", "store"),
  ],
)
def test_nothing_counted_mean_is_nan_with_zero_gradient(reduction, strategy):
  """The library's convention: the mean over nothing counted is NaN, a sum is 0."""
  x, w, y = make_inputs()
  for labels, where in ((jnp.full_like(y, -100), None), (y, jnp.zeros(y.shape, bool))):
    loss, (gx, gw) = fused_value_and_grads(
      x, w, labels, where, reduction=reduction, strategy=strategy
    )
    if reduction == "mean":
      assert np.isnan(float(loss))
    else:
      assert float(loss) == 0.0
    assert not np.any(np.asarray(gx)) and not np.any(np.asarray(gw))


def test_empty_batch():
  x = jnp.zeros((0, 16))
  w = jnp.ones((16, 10))
  y = jnp.zeros((0,), jnp.int32)
  loss, (gx, gw) = fused_value_and_grads(x, w, y)
  assert np.isnan(float(loss)) and gx.shape == (0, 16) and not np.any(np.asarray(gw))
  assert float(fused_value_and_grads(x, w, y, reduction="sum")[0]) == 0.0
  assert fused_ce(x, w, y, reduction="none").shape == (0,)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16"])
def test_unsigned_labels_do_not_wrap(dtype):
  """-100 is no uint16 value: every token counts (it used to match 65436)."""
  v = 200 if dtype != "uint16" else 65536
  x = jnp.ones((3, 1))
  w = jnp.zeros((1, v))
  labels = np.array([v - 100 if dtype != "int16" else 5, 5, 0]).astype(dtype)
  got = fused_ce(x, w, jnp.asarray(labels), reduction="none")
  np.testing.assert_allclose(np.asarray(got), np.full(3, np.log(v)), rtol=1e-6)


def test_64_bit_labels_out_of_range_are_nan():
  if not jax.config.jax_enable_x64:
    labels = jnp.array([2**31 - 1, 1], jnp.int32)  # the widest label without x64
  else:
    labels = jnp.array([2**32 + 1, 1], jnp.int64)  # was cast to int32 -> class 1
  x, w, _ = make_inputs(shape=(2,), v=10)
  got = np.asarray(fused_ce(x, w, labels, reduction="none"))
  assert np.isnan(got[0]) and np.isfinite(got[1])


def test_large_logits_keep_precision():
  """lse - z_y is formed from max-shifted statistics: exact for logits near 1e7."""
  x = jnp.ones((1, 1))
  for big in (1e4, 1e5, 1e7):
    w = big + jnp.array([[0.0, 1.0, 2.0]])
    want = np.log(np.exp([0.0, 1.0, 2.0]).sum())  # lse - z_0 of (0, 1, 2): 2.4076
    for strategy in ("recompute", "store"):
      got = float(fused_ce(x, w, jnp.array([0]), strategy=strategy))
      np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_out_of_range_label_is_nan(strategy):
  x, w, y = make_inputs(v=37)
  ok = jnp.ones(y.shape, bool).at[1, 2].set(False)
  loss_ref = reference(x, w, y, where=ok)[0]
  for bad in (37, -1, 1000):
    yb = y.at[1, 2].set(bad)
    loss, (gx, gw) = fused_value_and_grads(x, w, yb, None, strategy=strategy)
    assert np.isnan(float(loss))
    assert np.isnan(np.asarray(gx)[1, 2]).all() and np.isnan(np.asarray(gw)).any()
    # Masked out by `where`, the same token is harmless.
    loss_ok, (gx_ok, _) = fused_value_and_grads(x, w, yb, ok, strategy=strategy)
    assert_close(loss_ok, loss_ref)
    assert np.isfinite(np.asarray(gx_ok)).all()
  if strategy == "recompute":
    per_token = jax.jit(lambda y: fused_ce(x, w, y, reduction="none"))(y.at[0, 0].set(40))
    assert np.isnan(per_token[0, 0]) and np.isfinite(per_token[1:]).all()
    # A label among the padding columns of `vocab_size` is out of range too.
    assert np.isnan(float(fused_ce(x, w, y.at[0, 0].set(33), vocab_size=30)))


def test_default_chunks_and_layouts_agree():
  """Automatic tiles (two vocabulary chunks) and both layouts give one answer."""
  x, w, y = make_inputs(shape=(2, 40), d=8, v=2048)
  g = jax.jit(
    jax.value_and_grad(lambda x, w, **kw: fused_ce(x, w, y, **kw), (0, 1)),
    static_argnames=("w_layout",),
  )
  loss_a, (gx_a, gw_a) = g(x, w)
  loss_b, (gx_b, gw_b) = g(x, w.T, w_layout="vd")
  loss_r, (gx_r, gw_r) = reference_value_and_grads(x, w, y)
  assert_close(loss_a, loss_r)
  assert_close(loss_b, loss_r)
  assert_close(gx_a, gx_r)
  assert_close(gx_b, gx_r)
  assert_close(gw_a, gw_r)
  assert_close(gw_b.T, gw_r)


def test_float64_under_x64():
  if not jax.config.jax_enable_x64:
    x, w, y = make_inputs(v=20)
    # Without x64 float64 requests are float32: the loss is float32.
    assert fused_ce(x, w, y).dtype == jnp.float32
    return
  x, w, y = make_inputs(v=20, dtype=jnp.float64)
  loss, (gx, gw) = jax.value_and_grad(
    lambda x, w: fused_ce(x, w, y, z_loss=1e-2, token_chunk_size=4, vocab_chunk_size=8), (0, 1)
  )(x, w)
  loss_r, (gx_r, gw_r) = jax.value_and_grad(
    lambda x, w: reference(x, w, y, z_loss=1e-2)[0], (0, 1)
  )(x, w)
  assert loss.dtype == jnp.float64 and gx.dtype == jnp.float64
  assert_close(loss, loss_r, rtol=1e-12, atol=1e-12)
  assert_close(gx, gx_r, rtol=1e-12, atol=1e-12)
  assert_close(gw, gw_r, rtol=1e-12, atol=1e-12)


def test_recompute_never_materializes_logits():
  """Compile-only: the temporary memory of value_and_grad is far below N*V."""
  n, d, v = 4096, 64, 1 << 16
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  y = jax.ShapeDtypeStruct((n,), jnp.int32)
  f = jax.jit(jax.value_and_grad(lambda x, w, y: fused_ce(x, w, y), (0, 1)))
  temp = f.lower(x, w, y).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = n * v * 4
  assert temp < 0.05 * logits_bytes, (temp, logits_bytes)


# ----------------------------------------------------------------------------
# Bad input: clear errors at trace time.


@pytest.mark.parametrize(
  "call, err, match",
  [
    (lambda x, w, y: fused_ce(x, w[:-1], y), ValueError, r"hidden size.*x.shape=\(3, 5, 16\)"),
    (lambda x, w, y: fused_ce(x, w.T, y), ValueError, 'w_layout="vd"'),
    (lambda x, w, y: fused_ce(x, w, y, w_layout="vd"), ValueError, 'w_layout="dv"'),
    (lambda x, w, y: fused_ce(x, w, y[:, :-1]), ValueError, r"labels.shape=\(3, 4\)"),
    (lambda x, w, y: fused_ce(x, w, y.astype(jnp.float32)), TypeError, "labels"),
    (lambda x, w, y: fused_ce(x.astype(jnp.int32), w, y), TypeError, "`x`"),
    (lambda x, w, y: fused_ce(x, w[None], y), ValueError, "w.shape"),
    (lambda x, w, y: fused_ce(x, w, y, reduction="avg"), ValueError, "reduction"),
    (
      lambda x, w, y: fused_ce(x, w, y, strategy="store", reduction="none"),
      ValueError,
      "scalar loss",
    ),
    (
      lambda x, w, y: fused_ce(x, w, y, strategy="store", vocab_chunk_size=8),
      ValueError,
      "vocab_chunk_size",
    ),
    (lambda x, w, y: fused_ce(x, w, y, strategy="fast"), ValueError, "strategy"),
    (lambda x, w, y: fused_ce(x, w, y, logit_soft_cap=0.0), ValueError, "logit_soft_cap"),
    (lambda x, w, y: fused_ce(x, w, y, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda x, w, y: fused_ce(x, w, y, z_loss=-1.0), ValueError, "z_loss"),
    (lambda x, w, y: fused_ce(x, w, y, token_chunk_size=0), ValueError, "token_chunk_size"),
    (lambda x, w, y: fused_ce(x, w, y, vocab_size=38), ValueError, "vocab_size"),
    (lambda x, w, y: fused_ce(x, w, y, where=jnp.ones((4,), bool)), ValueError, "where"),
    (lambda x, w, y: fused_ce(x, w, y, ignore_index=1.5), TypeError, "ignore_index"),
  ],
)
def test_bad_input(call, err, match):
  x, w, y = make_inputs()
  with pytest.raises(err, match=match):
    jax.jit(call)(x, w, y)
