"""Tests of `xentjax.linear_token_stats` against materialized logits.

Values are compared with a float64 NumPy transcription of the definitions
(log-softmax, entropy, argmax, a stable sort for the top-k); gradients with
plain autodiff of the materialized computation in JAX, which shares nothing
with the fused engine's custom VJP.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax
from xentjax import linear_token_stats


def logits64(
  x, w, *, bias=None, temperature=1.0, logit_soft_cap=None, w_layout="dv", vocab_size=None
):
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  z = x @ (w.T if w_layout == "vd" else w)
  if bias is not None:
    z = z + np.asarray(bias, np.float64)
  if logit_soft_cap is not None:
    z = logit_soft_cap * np.tanh(z / logit_soft_cap)
  z = z / temperature
  return z if vocab_size is None else z[..., :vocab_size]


def reference64(x, w, labels, *, counted=None, top_k=0, **kw):
  """float64 NumPy: (logprob, entropy, lse, argmax, top-k logprobs, top-k indices)."""
  z = logits64(x, w, **kw)
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
  logp = z - lse[..., None]
  p = np.exp(logp)
  labels = np.asarray(labels)
  counted = np.ones(labels.shape, bool) if counted is None else counted
  safe = np.where(counted, labels, 0)
  logprob = np.where(counted, np.take_along_axis(logp, safe[..., None], -1)[..., 0], 0.0)
  entropy = np.where(counted, -(p * logp).sum(-1), 0.0)
  order = np.argsort(-z, axis=-1, kind="stable")[..., :top_k]
  return (logprob, entropy, lse, np.argmax(z, -1), np.take_along_axis(logp, order, -1), order)


def materialized(
  x,
  w,
  labels,
  counted,
  *,
  bias=None,
  temperature=1.0,
  logit_soft_cap=None,
  w_layout="dv",
  vocab_size=None,
):
  """The same statistics from materialized logits in JAX (for autodiff)."""
  z = x @ (w.T if w_layout == "vd" else w)
  if bias is not None:
    z = z + bias.reshape((1,) * (z.ndim - 1) + (-1,))
  if logit_soft_cap is not None:
    z = logit_soft_cap * jnp.tanh(z / logit_soft_cap)
  z = z / temperature
  if vocab_size is not None:
    z = z[..., :vocab_size]
  logp = jax.nn.log_softmax(z, axis=-1)
  safe = jnp.where(counted, labels, 0)
  logprob = jnp.where(counted, jnp.take_along_axis(logp, safe[..., None], -1)[..., 0], 0.0)
  entropy = jnp.where(counted, -jnp.sum(jnp.exp(logp) * logp, -1), 0.0)
  return logprob, entropy, jax.nn.logsumexp(z, axis=-1)


def make(shape=(2, 9), d=12, v=37, seed=0, w_layout="dv", scale=0.7, dtype=jnp.float32):
  kx, kw, kb, ky = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(kx, (*shape, d)).astype(dtype)
  w = (scale * jax.random.normal(kw, (v, d) if w_layout == "vd" else (d, v))).astype(dtype)
  b = jax.random.normal(kb, (v,))
  y = jax.random.randint(ky, shape, 0, v)
  return x, w, b, y


def close(a, b, tol=2e-5):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


# Named option sets; tiles of 8 tokens x 16 columns (a ragged tail of both
# with 18 tokens and V = 37) unless a case sets its own.
CASES = {
  "plain": {},
  "temperature_bias": {"temperature": 0.7, "_bias": True},
  "soft_cap_temperature": {"logit_soft_cap": 1.5, "temperature": 1.8, "_bias": True},
  "ignore_where": {"_ignore": True, "_where": True, "temperature": 1.3},
  "ragged_tiles": {"token_chunk_size": 5, "vocab_chunk_size": 7, "top_k": 4},
  "batch_dims_vd": {"_shape": (2, 3, 4), "w_layout": "vd", "top_k": 2},
  "vocab_padding": {"vocab_size": 30, "top_k": 3, "logit_soft_cap": 4.0},
}


def _setup(name):
  opts = dict(CASES[name])
  x, w, b, y = make(shape=opts.pop("_shape", (2, 9)), w_layout=opts.get("w_layout", "dv"))
  bias = b if opts.pop("_bias", False) else None
  where = None
  counted = np.ones(y.shape, bool)
  if opts.pop("_ignore", False):
    y = y.at[0, :3].set(-100)
    counted[0, :3] = False
  if opts.pop("_where", False):
    where = jnp.arange(y.size).reshape(y.shape) % 4 != 1
    counted &= np.asarray(where)
  if "vocab_size" in opts:
    y = y % opts["vocab_size"]
  opts.setdefault("token_chunk_size", 8)
  opts.setdefault("vocab_chunk_size", 16)
  return x, w, bias, y, where, counted, opts


def _ref_kw(opts, bias):
  keep = ("temperature", "logit_soft_cap", "w_layout", "vocab_size")
  return {"bias": bias, **{k: v for k, v in opts.items() if k in keep}}


@functools.partial(jax.jit, static_argnames=("opts",))
def _stats_and_grads(x, w, b, y, where, coef, opts):
  """The statistics and the gradient of sum(-A logprob - beta H + c lse), in one compile."""

  def loss(x, w, b):
    s = linear_token_stats(x, w, y, where=where, bias=b, **dict(opts))
    return jnp.sum(-coef[0] * s.logprob - coef[1] * s.entropy + coef[2] * s.lse), s

  (_, s), g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, w, b)
  return s, g


@pytest.mark.parametrize("name", list(CASES))
def test_matches_materialized(name):
  """Values against float64 NumPy; gradients against autodiff of the materialized logits."""
  x, w, bias, y, where, counted, opts = _setup(name)
  ks = jax.random.split(jax.random.PRNGKey(5), 3)
  coef = [jax.random.normal(k, y.shape) for k in ks]  # per-token advantages etc.
  s, got = _stats_and_grads(x, w, bias, y, where, coef, tuple(sorted(opts.items())))
  k = opts.get("top_k", 0)
  want = reference64(x, w, y, counted=counted, top_k=k, **_ref_kw(opts, bias))
  assert isinstance(s, xentjax.TokenStats)
  for value, ref, what in zip(s[:3], want[:3], ("logprob", "entropy", "lse")):
    assert value.shape == y.shape and value.dtype == jnp.float32, what
    close(value, ref)
  assert s.argmax.dtype == jnp.int32
  np.testing.assert_array_equal(s.argmax, want[3])
  if k:
    assert s.top_k_logprobs.shape == (*y.shape, k)
    close(s.top_k_logprobs, want[4])
    np.testing.assert_array_equal(s.top_k_indices, want[5])
  else:
    assert s.top_k_logprobs is None and s.top_k_indices is None
  ref_kw = {k: v for k, v in _ref_kw(opts, None).items() if k != "bias"}

  def ref_loss(x, w, b):
    lp, h, lse = materialized(x, w, y, jnp.asarray(counted), bias=b, **ref_kw)
    return jnp.sum(-coef[0] * lp - coef[1] * h + coef[2] * lse)

  ref_grads = jax.grad(ref_loss, (0, 1, 2))(x, w, bias)
  for g, r, arg in zip(got, ref_grads, (x, w, bias)):
    if arg is None:
      assert g is None
      continue
    assert g.shape == arg.shape and g.dtype == arg.dtype
    close(g, r)


def test_entropy_gradient_alone_and_bias_gradient():
  """The entropy bonus by itself (the p (z - E) term) and the bias gradient."""
  x, w, b, y = make(shape=(12,), v=23)

  def ours(x, w, b):
    s = linear_token_stats(x, w, y, bias=b, temperature=0.5, token_chunk_size=4, vocab_chunk_size=8)
    return jnp.sum(s.entropy)

  def theirs(x, w, b):
    return jnp.sum(materialized(x, w, y, jnp.ones(y.shape, bool), bias=b, temperature=0.5)[1])

  for g, r in zip(jax.grad(ours, (0, 1, 2))(x, w, b), jax.grad(theirs, (0, 1, 2))(x, w, b)):
    close(g, r)


def test_bfloat16_inputs():
  x, w, _, y = make(shape=(4, 8), d=32, v=300, dtype=jnp.bfloat16)
  s = linear_token_stats(x, w, y, top_k=3)
  assert s.logprob.dtype == jnp.float32
  want = reference64(x.astype(jnp.float32), w.astype(jnp.float32), y, top_k=3)
  for got, ref in zip(s[:3], want[:3]):
    close(got, ref, tol=1e-4)  # the rounded inputs, materialized in float64
  np.testing.assert_array_equal(s.top_k_indices, want[5])
  gx, gw = jax.grad(lambda x, w: jnp.sum(linear_token_stats(x, w, y).entropy), (0, 1))(x, w)
  assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
  rx, rw = jax.grad(
    lambda x, w: jnp.sum(materialized(x, w, y, jnp.ones(y.shape, bool))[1]), (0, 1)
  )(x.astype(jnp.float32), w.astype(jnp.float32))
  close(gx.astype(jnp.float32), rx, tol=3e-2)
  close(gw.astype(jnp.float32), rw, tol=3e-2)


def test_ties_break_to_the_lowest_index():
  """Equal logits: argmax and top-k take the lower index first (within and across tiles)."""
  x = jnp.ones((2, 1))
  w = jnp.array([[0.0, 3.0, 1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 1.0, 2.0]])
  s = linear_token_stats(x, w, jnp.array([1, 4]), top_k=5, vocab_chunk_size=3)
  np.testing.assert_array_equal(s.argmax, [1, 1])
  np.testing.assert_array_equal(s.top_k_indices[0], [1, 3, 4, 6, 5])
  np.testing.assert_allclose(s.logprob[0], s.logprob[1], rtol=1e-6)


def test_bad_labels_and_unsigned_labels():
  x, w, _, y = make(shape=(6,), v=20)
  yb = y.at[2].set(20)
  s = linear_token_stats(x, w, yb)
  assert np.isnan(s.logprob[2]) and np.isfinite(np.delete(np.asarray(s.logprob), 2)).all()
  assert np.isfinite(s.entropy).all()
  s16 = linear_token_stats(x, w, y.astype(jnp.uint16))  # -100 is not a uint16 value
  close(s16.logprob, linear_token_stats(x, w, y).logprob)


@pytest.mark.parametrize(
  "kw, err, match",
  [
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"top_k": 38}, ValueError, "top_k"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"bias": jnp.zeros((36,))}, ValueError, r"bias.*\(37,\)"),
    ({"bias": jnp.zeros((37,), jnp.int32)}, TypeError, "bias"),
    ({"logit_soft_cap": -2.0}, ValueError, "logit_soft_cap"),
    ({"vocab_chunk_size": 0}, ValueError, "vocab_chunk_size"),
    ({"vocab_axis": "vocab"}, ValueError, "mesh"),
  ],
)
def test_bad_input(kw, err, match):
  x, w, _, y = make()
  with pytest.raises(err, match=match):
    linear_token_stats(x, w, y, **kw)
