"""`xentjax.linear_row_loss`: a per-row function of the logits through the whole-row adapter.

Values and gradients are compared with float64 NumPy: the materialized logits
``x @ w + b`` and a closed-form gradient of each row function, multiplied
into ``x``, ``w`` and ``bias`` by hand (nothing shared with the engine or with
`jax.vjp`). The row functions: the Brier score (squared error of the softmax
against a one-hot label), a pairwise preference on two classes per row, and
one that is not finite on the rows a mask removes.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax
from xentjax import linear_row_loss

# ---------------------------------------------------------------------------
# Row functions (defined once: they are static) and their float64 references.
# ---------------------------------------------------------------------------


def brier(z, label):
  p = jax.nn.softmax(z)
  return jnp.sum(jnp.square(p - jax.nn.one_hot(label, z.shape[0], dtype=z.dtype)))


def brier64(z, labels):
  """``(value [n], dvalue/dz [n, V])`` of `brier` in float64 NumPy."""
  e = np.exp(z - z.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  r = p - np.eye(z.shape[-1])[labels]
  # d/dz_k sum_j r_j^2 = 2 p_k (r_k - sum_j r_j p_j)
  return (r**2).sum(-1), 2 * p * (r - (r * p).sum(-1, keepdims=True))


def prefer(z, pair):
  """``softplus(z_b - z_a)``: the loss of preferring class ``a`` over class ``b``."""
  return jax.nn.softplus(z[pair[1]] - z[pair[0]])


def prefer64(z, pairs):
  rows = np.arange(z.shape[0])
  d = z[rows, pairs[:, 1]] - z[rows, pairs[:, 0]]
  s = 1 / (1 + np.exp(-d))
  dz = np.zeros_like(z)
  dz[rows, pairs[:, 1]] += s
  dz[rows, pairs[:, 0]] -= s
  return np.log1p(np.exp(d)), dz


def sqrt_lse(z, s):
  """``sqrt(s) · logsumexp(z)``: NaN value and gradient where ``s < 0``."""
  return jnp.sqrt(s) * jax.nn.logsumexp(z)


# ---------------------------------------------------------------------------
# Inputs and the float64 reference of a whole call.
# ---------------------------------------------------------------------------

B, T, D, V = 3, 5, 8, 37  # 15 tokens: chunks of 4 rows leave a ragged last chunk


def inputs(v=V, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  w = rng.normal(size=(D, v)).astype(np.float32) * 0.5
  bias = rng.normal(size=(v,)).astype(np.float32)
  labels = rng.integers(0, V, size=(B, T)).astype(np.int32)
  keep = rng.random((B, T)) < 0.7
  keep[0, 0] = False
  return x, w, bias, labels, keep


def reference64(row64, x, w, bias, operand, keep, cotangent):
  """``(values [B, T], d sum(cotangent·values) / d(x, w, bias))`` in float64."""
  x64, w64 = np.asarray(x, np.float64).reshape(-1, D), np.asarray(w, np.float64)
  z = x64 @ w64 + np.asarray(bias, np.float64)
  op = np.asarray(operand).reshape(B * T, *np.shape(operand)[2:])
  value, dvalue = row64(z, op)
  c = np.where(keep, cotangent, 0.0).reshape(-1)
  dz = c[:, None] * dvalue
  grads = ((dz @ w64.T).reshape(B, T, D), x64.T @ dz, dz.sum(0))
  return np.where(keep, value.reshape(B, T), 0.0), grads


def cotangent_of(reduction, keep):
  """The cotangent of each row's value in the reduced loss (random for "none")."""
  if reduction == "none":
    return np.random.default_rng(1).normal(size=keep.shape)
  return keep / keep.sum() if reduction == "mean" else keep.astype(np.float64)


def assert_close(got, want, rtol=2e-5, atol=2e-6):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


def loss_and_grads(fn, x, w, bias, operands, keep, reduction, cotangent, **kw):
  def loss(x, w, bias):
    out = linear_row_loss(fn, x, w, operands, bias=bias, where=keep, reduction=reduction, **kw)
    return jnp.sum(out * cotangent) if reduction == "none" else out

  out = linear_row_loss(fn, x, w, operands, bias=bias, where=keep, reduction=reduction, **kw)
  return out, jax.grad(loss, argnums=(0, 1, 2))(x, w, bias)


# ---------------------------------------------------------------------------
# Values and gradients.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("token_chunk_size", [4, None])
def test_values_and_gradients_match_float64(reduction, token_chunk_size):
  x, w, bias, labels, keep = inputs()
  c = cotangent_of(reduction, keep)
  value, grads = loss_and_grads(
    brier,
    x,
    w,
    bias,
    {"label": labels},
    keep,
    reduction,
    c.astype(np.float32),
    token_chunk_size=token_chunk_size,
  )
  values, want = reference64(brier64, x, w, bias, labels, keep, c)
  expected = {"none": values, "sum": values.sum(), "mean": values.sum() / keep.sum()}[reduction]
  assert_close(value, expected)
  for g, ref in zip(grads, want, strict=True):
    assert_close(g, ref)


def test_operands_of_any_trailing_shape_and_the_vd_layout():
  x, w, bias, labels, keep = inputs()
  pairs = np.stack([labels, (labels + 3) % V], axis=-1)  # [B, T, 2]
  c = cotangent_of("sum", keep)
  value, (gx, gw, gb) = loss_and_grads(
    prefer, x, w.T, bias, {"pair": pairs}, keep, "sum", None, w_layout="vd", token_chunk_size=4
  )
  values, (wx, ww, wb) = reference64(prefer64, x, w, bias, pairs, keep, c)
  assert_close(value, values.sum())
  assert_close(gx, wx)
  assert_close(gw, ww.T)  # [V, D]
  assert_close(gb, wb)


def test_vocab_size_shows_the_function_the_real_classes_only():
  x, w, bias, labels, keep = inputs()
  pad = np.concatenate([w, np.ones((D, 3), np.float32)], axis=1)  # 3 padding columns
  pad_bias = np.concatenate([bias, np.zeros(3, np.float32)])
  c = cotangent_of("sum", keep)
  value, (gx, gw, gb) = loss_and_grads(
    brier, x, pad, pad_bias, {"label": labels}, keep, "sum", None, vocab_size=V
  )
  values, (wx, ww, wb) = reference64(brier64, x, w, bias, labels, keep, c)
  assert_close(value, values.sum())
  assert_close(gx, wx)
  assert_close(gw[:, :V], ww)
  assert_close(gb[:V], wb)
  assert np.all(np.asarray(gw[:, V:]) == 0) and np.all(np.asarray(gb[V:]) == 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_rows_add_nothing_even_where_the_function_is_not_finite(reduction):
  x, w, bias, _, keep = inputs()
  s = np.where(keep, 2.0, -1.0).astype(np.float32)  # sqrt(-1): NaN on the masked rows
  c = cotangent_of(reduction, keep)
  value, grads = loss_and_grads(
    sqrt_lse, x, w, bias, {"s": s}, keep, reduction, c.astype(np.float32), token_chunk_size=4
  )

  def lse64(z, s):
    m = z.max(-1, keepdims=True)
    e = np.exp(z - m)
    root = np.sqrt(np.maximum(s, 0.0))[:, None]
    return (root * (m + np.log(e.sum(-1, keepdims=True))))[:, 0], root * e / e.sum(
      -1, keepdims=True
    )

  values, want = reference64(lse64, x, w, bias, s, keep, c)
  assert_close(value, values.sum() / keep.sum() if reduction == "mean" else values)
  for g, ref in zip(grads, want, strict=True):
    assert np.all(np.isfinite(np.asarray(g)))
    assert_close(g, ref)


def test_a_mean_over_no_token_is_nan_with_a_zero_gradient():
  x, w, bias, labels, _ = inputs()
  none = np.zeros((B, T), bool)
  value, grads = loss_and_grads(brier, x, w, bias, {"label": labels}, none, "mean", None)
  assert np.isnan(float(value))
  for g in grads:
    assert np.all(np.asarray(g) == 0)
  assert float(linear_row_loss(brier, x, w, {"label": labels}, where=none, reduction="sum")) == 0


def test_under_jit_as_eager():
  x, w, bias, labels, keep = inputs()

  @jax.jit
  def step(x, w, bias, labels):
    def loss(x, w, bias):
      return linear_row_loss(brier, x, w, {"label": labels}, bias=bias, where=keep)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, bias)

  value, grads = step(x, w, bias, labels)
  eager, want = loss_and_grads(brier, x, w, bias, {"label": labels}, keep, "mean", None)
  assert_close(value, np.asarray(eager, np.float64), rtol=1e-6, atol=0)
  for g, ref in zip(grads, want, strict=True):
    assert_close(g, np.asarray(ref, np.float64), rtol=1e-5, atol=1e-7)


def test_16bit_inputs_give_a_float32_value_and_gradients_of_their_dtype():
  x, w, bias, labels, keep = inputs()
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  value, (gx, gw, _) = loss_and_grads(brier, xb, wb, bias, {"label": labels}, keep, "mean", None)
  assert value.dtype == jnp.float32 and gx.dtype == gw.dtype == jnp.bfloat16
  values, _ = reference64(
    brier64, np.asarray(xb, np.float32), np.asarray(wb, np.float32), bias, labels, keep, keep
  )
  assert_close(value, values.sum() / keep.sum(), rtol=1e-2, atol=1e-3)


def test_a_mesh_shards_the_tokens_only():
  x, w, bias, labels, keep = inputs()
  mesh = jax.make_mesh((1,), ("data",))
  got, got_grads = loss_and_grads(
    brier, x, w, bias, {"label": labels}, keep, "mean", None, mesh=mesh, data_axis="data"
  )
  want, want_grads = loss_and_grads(brier, x, w, bias, {"label": labels}, keep, "mean", None)
  assert_close(got, np.asarray(want, np.float64), rtol=1e-6, atol=0)
  for g, ref in zip(got_grads, want_grads, strict=True):
    assert_close(g, np.asarray(ref, np.float64), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="`data_axis` needs a `mesh`"):
    linear_row_loss(brier, x, w, {"label": labels}, data_axis="data")


# Two data shards, in a subprocess with 2 simulated CPU devices: the same values and
# gradients as one device (each shard's weight gradient summed over the data axis).
TWO_SHARDS = textwrap.dedent(
  """
  import jax, jax.numpy as jnp, numpy as np, xentjax

  def brier(z, label):
    p = jax.nn.softmax(z)
    return jnp.sum(jnp.square(p - jax.nn.one_hot(label, z.shape[0], dtype=z.dtype)))

  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(2, 7, 8)), rng.normal(size=(8, 37))
  x, w, b = x.astype(np.float32), w.astype(np.float32), rng.normal(size=37).astype(np.float32)
  y, keep = rng.integers(0, 37, (2, 7)).astype(np.int32), rng.random((2, 7)) < 0.7
  c = np.arange(14.0, dtype=np.float32).reshape(2, 7)
  mesh = jax.make_mesh((2,), ("data",))
  for red in ("mean", "none"):
    def f(x, w, b, **kw):
      out = xentjax.linear_row_loss(
        brier, x, w, {"label": y}, bias=b, where=keep, reduction=red, token_chunk_size=3, **kw
      )
      return jnp.sum(out * c) if red == "none" else out
    two = jax.value_and_grad(lambda *a: f(*a, mesh=mesh, data_axis="data"), (0, 1, 2))(x, w, b)
    one = jax.value_and_grad(f, (0, 1, 2))(x, w, b)
    for a, e in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
      np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
  print("two shards agree")
  """
)


def test_two_data_shards_match_one_device():
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
  env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(
    [sys.executable, "-c", TWO_SHARDS], env=env, capture_output=True, text=True, timeout=600
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.strip() == "two shards agree"


# ---------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------


class Unhashable:
  __hash__ = None  # type: ignore[assignment]

  def __call__(self, z):
    return jnp.sum(z)


def vector(z, label):
  return z * label


def test_clear_errors():
  x, w, _, labels, _ = inputs()
  ops = {"label": labels}
  with pytest.raises(TypeError, match="`fn` must be a function"):
    linear_row_loss("brier", x, w, ops)
  with pytest.raises(TypeError, match="`fn` must be hashable"):
    linear_row_loss(Unhashable(), x, w)
  with pytest.raises(ValueError, match="must return a scalar per row"):
    linear_row_loss(vector, x, w, ops)
  with pytest.raises(ValueError, match=r"Operand 'label' must have the token dimensions"):
    linear_row_loss(brier, x, w, {"label": labels.T})
  with pytest.raises(TypeError, match="`operands` must be a dict"):
    linear_row_loss(brier, x, w, labels)
  with pytest.raises(ValueError, match="`reduction`"):
    linear_row_loss(brier, x, w, ops, reduction="max")


# ---------------------------------------------------------------------------
# Memory: a chunk of rows at a time, never the n x V logits.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_compiled_step_holds_a_small_fraction_of_the_logits(reduction):
  n, v, d = 8192, 131072, 256
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  y = jax.ShapeDtypeStruct((n,), jnp.int32)

  def loss(x, w, y):
    return jnp.sum(linear_row_loss(brier, x, w, {"label": y}, reduction=reduction))

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  temp = step.lower(x, w, y).compile().memory_analysis().temp_size_in_bytes
  logits = n * v * 4  # 4 GiB; the materialized gradient holds at least this much
  assert temp < logits / 10, f"{temp / 2**20:.1f} MiB of temporaries"


def test_the_kernel_refuses_a_sharded_vocabulary_and_partial_rows():
  from xentjax._vocab.kernels.rowwise import RowFunction
  from xentjax._vocab.placement import Placement
  from xentjax._vocab.tiles import Tiling

  whole = Tiling(V, V, False, 8, V, cdt=jnp.float32)
  kernel = RowFunction(brier, ("label",))
  state, _ = kernel.init(0, 4, V, whole, jnp.float32)
  assert state["value"].shape == (4,)
  sharded = Tiling(V, V, False, 8, V, placement=Placement(vocab_axis="v"), cdt=jnp.float32)
  with pytest.raises(NotImplementedError, match="vocabulary cannot be sharded"):
    kernel.init(0, 4, V, sharded, jnp.float32)
  partial = Tiling(V, V, False, 8, 16, cdt=jnp.float32)
  with pytest.raises(ValueError, match="whole-row tiles"):
    kernel.init(0, 4, V, partial, jnp.float32)


def test_public_name():
  assert xentjax.linear_row_loss is linear_row_loss
  assert "linear_row_loss" in xentjax.__all__
