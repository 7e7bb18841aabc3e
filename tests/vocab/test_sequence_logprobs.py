"""`xentjax.linear_sequence_logprobs` against a dense float64 log-softmax, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax
from xentjax import preference

N, D, V, S = 23, 6, 37, 5


def data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, D)).astype(np.float32)
  w = (rng.normal(size=(D, V)) / np.sqrt(D)).astype(np.float32)
  b = rng.normal(size=V).astype(np.float32) * 0.3
  y = rng.integers(0, V, N)
  seg = rng.integers(0, S - 1, N)  # interleaved (packed rows); segment S-1 stays empty
  seg[3] = -1  # padding
  y[5] = -100  # ignored
  return x, w, b, y, seg


def dense(x, w, b, y, seg, *, t=1.0, cap=None, keep=None):
  """float64: per-segment sums and counts from the materialized log-softmax."""
  z = x @ w + b[None, :]
  if cap is not None:
    z = cap * jnp.tanh(z / cap)
  logp = jax.nn.log_softmax(z / t, axis=-1)
  counted = (y != -100) & (seg >= 0)
  if keep is not None:
    counted = counted & keep
  tok = jnp.where(counted, jnp.take_along_axis(logp, jnp.where(counted, y, 0)[:, None], 1)[:, 0], 0)
  onehot = (seg[:, None] == jnp.arange(S)[None, :]) & counted[:, None]
  return tok @ onehot.astype(tok.dtype), onehot.sum(0)


def f64(*a):
  return [
    jnp.asarray(v, jnp.float64) if np.issubdtype(np.asarray(v).dtype, np.floating) else v for v in a
  ]


@pytest.mark.parametrize(
  "opts",
  [
    {},
    {"temperature": 0.7, "logit_soft_cap": 3.0},
    {"vocab_chunk_size": 8, "token_chunk_size": 8},
  ],
)
def test_sums_counts_and_gradients_equal_the_dense_float64_reference(opts):
  x, w, b, y, seg = data()
  rng = np.random.default_rng(1)
  coef = rng.normal(size=S)  # a generic function of the sums

  t = opts.get("temperature", 1.0)
  cap = opts.get("logit_soft_cap")
  kw = {k: v for k, v in opts.items() if k != "temperature"}

  def ours(x, w, b, t):  # a traced temperature: its gradient is checked too
    sums, counts = xentjax.linear_sequence_logprobs(
      x, w, y, seg, num_segments=S, bias=b, temperature=t, **kw
    )
    return jnp.sum(sums * coef), (sums, counts)

  grads, (sums, counts) = jax.grad(ours, argnums=(0, 1, 2, 3), has_aux=True)(
    x, w, b, jnp.float32(t)
  )
  with jax.enable_x64(True):

    def ref(x, w, b, t):
      s, c = dense(x, w, b, jnp.asarray(y), jnp.asarray(seg), t=t, cap=cap)
      return jnp.sum(s * coef), (s, c)

    want_g, (want_s, want_c) = jax.grad(ref, argnums=(0, 1, 2, 3), has_aux=True)(*f64(x, w, b, t))
  np.testing.assert_allclose(sums, want_s, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(counts, want_c)
  assert counts[S - 1] == 0 and sums[S - 1] == 0  # the empty segment
  for g, wg in zip(grads, want_g, strict=True):
    np.testing.assert_allclose(g, wg, rtol=2e-4, atol=2e-5)


def test_where_and_the_vd_layout():
  x, w, b, y, seg = data(2)
  keep = np.random.default_rng(3).uniform(size=N) < 0.6
  sums, counts = xentjax.linear_sequence_logprobs(
    x, w.T.copy(), y, seg, num_segments=S, where=keep, bias=b, w_layout="vd"
  )
  with jax.enable_x64(True):
    want_s, want_c = dense(*f64(x, w, b), jnp.asarray(y), jnp.asarray(seg), keep=jnp.asarray(keep))
  np.testing.assert_allclose(sums, want_s, rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(counts, want_c)


def test_all_masked_gives_zero_sums_and_zero_gradients():
  x, w, _, y, seg = data(4)

  def f(x, w):
    sums, _ = xentjax.linear_sequence_logprobs(
      x, w, y, seg, num_segments=S, where=np.zeros(N, bool)
    )
    return jnp.sum(sums), sums

  (gx, gw), sums = jax.grad(f, argnums=(0, 1), has_aux=True)(x, w)
  assert (np.asarray(sums) == 0).all()
  assert not np.asarray(gx).any() and not np.asarray(gw).any()


def test_bad_labels_and_segment_ids_give_nan_not_a_silent_value():
  x, w, _, y, seg = data(5)
  y2 = y.copy()
  y2[0] = V + 3  # out of the vocabulary, counted
  sums, _ = xentjax.linear_sequence_logprobs(x, w, y2, seg, num_segments=S)
  assert np.isnan(sums[seg[0]]) and np.isfinite(np.delete(np.asarray(sums), seg[0])).all()
  seg2 = seg.copy()
  seg2[1] = S  # beyond num_segments: every sum is NaN
  sums, _ = xentjax.linear_sequence_logprobs(x, w, y, seg2, num_segments=S)
  assert np.isnan(sums).all()
  with pytest.raises(ValueError, match="`segment_ids` must have the shape of `labels`"):
    xentjax.linear_sequence_logprobs(x, w, y, seg[:-1], num_segments=S)
  with pytest.raises(TypeError, match="segment_ids"):
    xentjax.linear_sequence_logprobs(x, w, y, seg.astype(np.float32), num_segments=S)
  with pytest.raises(ValueError, match="num_segments"):
    xentjax.linear_sequence_logprobs(x, w, y, seg, num_segments=0)


def test_a_dpo_step_from_hidden_states_equals_the_materialized_one():
  rng = np.random.default_rng(6)
  x, w, _, y, _ = data(6)
  seg = np.repeat(np.arange(4), [6, 5, 7, 5])  # chosen 0, 1; rejected 2, 3
  ref = rng.normal(size=4).astype(np.float32) - 40.0

  def step(x, w, logps):
    return preference.dpo_loss(logps[:2], logps[2:], ref[:2], ref[2:], beta=0.1)

  def fused(x, w):
    sums, _ = xentjax.linear_sequence_logprobs(x, w, y, seg, num_segments=4)
    return step(x, w, sums)

  def materialized(x, w):
    logp = jax.nn.log_softmax(x @ w, axis=-1)
    tok = jnp.where(y != -100, jnp.take_along_axis(logp, np.maximum(y, 0)[:, None], 1)[:, 0], 0.0)
    return step(x, w, jax.ops.segment_sum(tok, seg, 4))

  got = jax.value_and_grad(fused, argnums=(0, 1))(x, w)
  want = jax.value_and_grad(materialized, argnums=(0, 1))(x, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, wg in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(g, wg, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(got[1][1])).max() > 0
