"""The options of `xentjax.linear_softmax_cross_entropy` beyond the plain loss.

Temperature, token weights and bias against autodiff of the materialized
logits in JAX; class weights against `torch.nn.functional.cross_entropy`
(float64) on the materialized logits, values and gradients; gradient
filtering against the exact gradient (the value must not move, the gradient
error must respect the documented bound, and skipped tiles must really be
skipped).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xentjax import linear_softmax_cross_entropy as fused_ce


def make(shape=(3, 6), d=10, v=29, seed=0, scale=0.8):
  kx, kw, kb, ky, kt = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(kx, (*shape, d))
  w = scale * jax.random.normal(kw, (d, v))
  b = jax.random.normal(kb, (v,))
  y = jax.random.randint(ky, shape, 0, v)
  t = jax.random.uniform(kt, shape, minval=0.0, maxval=2.0)  # token weights
  return x, w, b, y, t


def close(a, b, tol=2e-5):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


def materialized_ce(
  x,
  w,
  y,
  *,
  bias=None,
  temperature=1.0,
  logit_soft_cap=None,
  weights=None,
  where=None,
  z_loss=0.0,
  reduction="mean",
):
  z = x @ w
  if bias is not None:
    z = z + bias.reshape((1,) * (z.ndim - 1) + (-1,))
  if logit_soft_cap is not None:
    z = logit_soft_cap * jnp.tanh(z / logit_soft_cap)
  z = z / temperature
  lse = jax.nn.logsumexp(z, axis=-1)
  loss = lse - jnp.take_along_axis(z, y[..., None], -1)[..., 0] + z_loss * lse**2
  wt = jnp.ones(y.shape) if weights is None else weights
  if where is not None:
    wt = jnp.where(where, wt, 0.0)
  if reduction == "none":
    return wt * loss
  if reduction == "sum":
    return jnp.sum(wt * loss)
  return jnp.sum(wt * loss) / jnp.sum(wt)


OPTIONS = {
  "temperature": {"temperature": 0.6},
  "temperature_soft_cap_bias": {"temperature": 2.5, "logit_soft_cap": 3.0, "_bias": True},
  "weights_mean": {"_weights": True, "_where": True, "z_loss": 1e-2},
  "weights_sum_bias": {"_weights": True, "reduction": "sum", "_bias": True},
  "weights_none": {"_weights": True, "reduction": "none", "temperature": 1.5},
}


# "store" needs a scalar reduction ("none" is an error, tested in test_cross_entropy.py).
@pytest.mark.parametrize(
  "name, strategy",
  [
    (n, s)
    for s in ("recompute", "store")
    for n in OPTIONS
    if not (s == "store" and OPTIONS[n].get("reduction") == "none")
  ],
)
def test_options_match_materialized(name, strategy):
  opts = dict(OPTIONS[name])
  x, w, b, y, t = make()
  bias = b if opts.pop("_bias", False) else None
  weights = t if opts.pop("_weights", False) else None
  where = (jnp.arange(y.size).reshape(y.shape) % 5 != 3) if opts.pop("_where", False) else None
  chunks = (
    {"token_chunk_size": 4}
    if strategy == "store"
    else {"token_chunk_size": 4, "vocab_chunk_size": 8}
  )
  cot = jax.random.normal(jax.random.PRNGKey(2), y.shape)

  def scalar(loss):
    return jnp.sum(loss * cot) if loss.ndim else loss

  def ours(x, w, b):
    return scalar(
      fused_ce(x, w, y, bias=b, weights=weights, where=where, strategy=strategy, **chunks, **opts)
    )

  def theirs(x, w, b):
    return scalar(materialized_ce(x, w, y, bias=b, weights=weights, where=where, **opts))

  v, g = jax.jit(jax.value_and_grad(ours, (0, 1, 2)))(x, w, bias)
  v_r, g_r = jax.value_and_grad(theirs, (0, 1, 2))(x, w, bias)
  close(v, v_r)
  for a, r in zip(g, g_r):
    assert (a is None) == (r is None)
    if a is not None:
      close(a, r)


def test_zero_total_weight_is_nan_with_zero_gradient():
  x, w, _, y, _ = make()
  f = jax.value_and_grad(lambda x: fused_ce(x, w, y, weights=jnp.zeros(y.shape)))
  loss, g = f(x)
  assert np.isnan(float(loss)) and not np.any(np.asarray(g))


# ----------------------------------------------------------------------------
# Class weights: PyTorch's `weight=` exactly.


@pytest.mark.parametrize(
  "reduction, eps, ignore, strategy",
  [
    ("mean", 0.0, True, "recompute"),
    ("mean", 0.2, True, "recompute"),
    ("sum", 0.1, False, "recompute"),
    ("none", 0.3, True, "recompute"),
    ("mean", 0.2, True, "store"),
    ("sum", 0.0, True, "store"),
  ],
)
def test_class_weights_match_torch(reduction, eps, ignore, strategy):
  torch = pytest.importorskip("torch")
  x, w, _, y, _ = make(shape=(14,), v=11)
  if ignore:
    y = y.at[:3].set(-100)
  cw = jax.random.uniform(jax.random.PRNGKey(4), (11,), minval=0.1, maxval=3.0)
  cot = jax.random.normal(jax.random.PRNGKey(6), y.shape)
  chunks = (
    {"token_chunk_size": 4}
    if strategy == "store"
    else {"token_chunk_size": 4, "vocab_chunk_size": 4}
  )

  def ours(x, w):
    loss = fused_ce(
      x,
      w,
      y,
      class_weights=cw,
      label_smoothing=eps,
      reduction=reduction,
      strategy=strategy,
      **chunks,
    )
    return jnp.sum(loss * cot) if loss.ndim else loss

  v, (gx, gw) = jax.value_and_grad(ours, (0, 1))(x, w)
  xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
  wt = torch.tensor(np.asarray(w, np.float64), requires_grad=True)
  lt = torch.nn.functional.cross_entropy(
    xt @ wt,
    torch.tensor(np.asarray(y, np.int64)),
    weight=torch.tensor(np.asarray(cw, np.float64)),
    ignore_index=-100,
    label_smoothing=eps,
    reduction=reduction,
  )
  if reduction == "none":
    lt = (lt * torch.tensor(np.asarray(cot, np.float64))).sum()
  lt.backward()
  close(v, lt.item())
  close(gx, xt.grad.numpy())
  close(gw, wt.grad.numpy())


# ----------------------------------------------------------------------------
# Gradient filtering.


def _peaked(n=64, d=16, v=256, seed=0):
  """Logits with a few likely columns per token, the same few for all tokens."""
  kx, kw, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (n, d))
  w = 0.3 * jax.random.normal(kw, (d, v))
  b = jnp.where(jnp.arange(v) < 32, 4.0, -12.0)  # columns >= 32: probability < 1e-6
  y = jax.random.randint(ky, (n,), 0, 32)
  return x, w, b, y


@functools.partial(jax.jit, static_argnames=("filter_eps",))
def _filtered(x, w, b, y, filter_eps=None):
  def loss(x, w, b):
    return fused_ce(
      x, w, y, bias=b, filter_eps=filter_eps, z_loss=1e-3, token_chunk_size=16, vocab_chunk_size=32
    )

  return jax.value_and_grad(loss, (0, 1, 2))(x, w, b)


def test_filtering_skips_negligible_tiles_and_keeps_the_value():
  x, w, b, y = _peaked()
  v_exact, g_exact = _filtered(x, w, b, y)
  v_f, g_f = _filtered(x, w, b, y, filter_eps=1e-5)
  assert float(v_f) == float(v_exact)  # the forward pass is untouched
  gw, gw_exact = np.asarray(g_f[1]), np.asarray(g_exact[1])
  # Columns 32..255 hold tiles with every probability < 1e-6: skipped, so their
  # gradient is exactly 0, where the exact one is not.
  assert not np.any(gw[:, 32:]) and np.any(gw_exact[:, 32:])
  np.testing.assert_array_equal(gw[:, :32], gw_exact[:, :32])
  # The documented bound: each dropped logit-gradient entry is below
  # |g| * eps (g = 1/N for the mean), so |dW error| <= sum_i |x_i| |g| eps.
  bound = np.abs(np.asarray(x)).sum(0)[:, None] * (1 / 64) * 1e-5
  assert np.all(np.abs(gw - gw_exact) <= bound)
  for a, r in zip(g_f, g_exact):
    rel = np.linalg.norm(np.asarray(a) - np.asarray(r)) / np.linalg.norm(np.asarray(r))
    assert rel < 1e-5


def test_filtering_never_skips_a_tile_holding_a_label():
  """A label with negligible probability keeps its tile: the -1 of the one-hot stays."""
  x, w, b, y = _peaked()
  y = y.at[5].set(200)  # probability < 1e-6, in the otherwise skipped tile 192..223
  _, g_exact = _filtered(x, w, b, y)
  _, g_f = _filtered(x, w, b, y, filter_eps=1e-5)
  gw = np.asarray(g_f[1])
  assert np.any(gw[:, 192:224]) and not np.any(gw[:, 224:])
  close(g_f[0], g_exact[0], tol=1e-4)
  close(g_f[1], g_exact[1], tol=1e-4)


@pytest.mark.parametrize(
  "kw, err, match",
  [
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"weights": jnp.ones((4,))}, ValueError, r"weights.*\(4,\)"),
    ({"weights": jnp.ones((3, 6), jnp.int32)}, TypeError, "weights"),
    ({"class_weights": jnp.ones((28,))}, ValueError, r"class_weights.*\(29,\)"),
    ({"class_weights": jnp.ones((29,), jnp.int32)}, TypeError, "class_weights"),
    ({"bias": jnp.ones((29, 1))}, ValueError, "bias"),
    ({"bias": jnp.ones((29,), bool)}, TypeError, "bias"),
    ({"filter_eps": 0.0}, ValueError, "filter_eps"),
    ({"filter_eps": 1.0}, ValueError, "filter_eps"),
    ({"vocab_chunk_size": 8, "strategy": "store"}, ValueError, "filter_eps"),
    ({"filter_eps": 1e-3, "label_smoothing": 0.1}, ValueError, "filter_eps"),
    ({"data_axis": "data"}, ValueError, "mesh"),
  ],
)
def test_bad_input(kw, err, match):
  x, w, _, y, _ = make()
  with pytest.raises(err, match=match):
    fused_ce(x, w, y, **kw)
