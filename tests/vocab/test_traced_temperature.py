"""A traced temperature in the fused functions: values, gradients, one compile, the NaN rule.

`temperature` is an operand of the engine: a scalar or per-token array is
traced (a sweep over values shares one compiled program) and gets a
gradient. The references materialize the logits in float64 (under
`jax.enable_x64`, whatever the suite's setting) and differentiate them with
plain autodiff, with respect to ``x``, ``w`` and ``T``. Tiles are small and
ragged so every loop runs full chunks and a tail.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax

SHAPE, D, V = (2, 5), 6, 29
TILES = {"token_chunk_size": 4, "vocab_chunk_size": 8}
STORE_TILES = {"token_chunk_size": 4}
T_SCALAR = 0.7
T_TOKENS = np.array([[0.5, 0.9, 1.3, 2.0, 0.8], [1.1, 0.6, 3.0, 0.7, 1.0]], np.float32)


def data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(*SHAPE, D)).astype(np.float32)
  w = (1.5 * rng.normal(size=(D, V))).astype(np.float32)
  tx = rng.normal(size=(*SHAPE, D + 1)).astype(np.float32)
  tw = (2.0 * rng.normal(size=(D + 1, V))).astype(np.float32)
  y = rng.integers(0, V, SHAPE).astype(np.int32)
  b = rng.normal(size=(V,)).astype(np.float32)
  return x, w, tx, tw, y, b


def f64_grads(loss, *args):
  """`(value, grads)` of `loss` in float64, w.r.t. every argument."""
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
    v, g = jax.value_and_grad(loss, argnums=tuple(range(len(args))))(*args)
    return np.asarray(v), [np.asarray(a) for a in g]


def close(got, want, tol=2e-4):
  got = np.asarray(got, np.float64)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * (1 + np.max(np.abs(want))))


def tempered_logits(x, w, t, b=None):
  z = x @ w
  if b is not None:
    z = z + b.reshape((1,) * (z.ndim - 1) + (-1,))
  return z / (t if jnp.ndim(t) == 0 else t[..., None])


def ce_reference(x, w, t, y, b):
  logp = jax.nn.log_softmax(tempered_logits(x, w, t, b), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(y)[..., None], axis=-1))


@pytest.mark.parametrize("strategy", ["recompute", "store"])
@pytest.mark.parametrize("t", [T_SCALAR, T_TOKENS], ids=["scalar", "per_token"])
def test_cross_entropy_gradient_of_the_temperature(strategy, t):
  x, w, _, _, y, b = data()
  tiles = TILES if strategy == "recompute" else STORE_TILES

  def fused(x, w, t, b):
    return xentjax.linear_softmax_cross_entropy(
      x, w, y, temperature=t, bias=b, strategy=strategy, **tiles
    )

  got_v, got_g = jax.value_and_grad(fused, argnums=(0, 1, 2, 3))(x, w, jnp.asarray(t), b)
  want_v, want_g = f64_grads(lambda x, w, t, b: ce_reference(x, w, t, y, b), x, w, t, b)
  close(got_v, want_v)
  for g, r in zip(got_g, want_g):
    assert np.shape(g) == np.shape(r)
    close(g, r)
  # A Python number gives the same value: the static and the traced paths agree.
  if np.ndim(t) == 0:
    close(fused(x, w, float(t), b), want_v)


def test_token_stats_gradient_of_the_temperature():
  x, w, _, _, y, _ = data(1)

  def fused(x, w, t):
    s = xentjax.linear_token_stats(x, w, y, temperature=t, top_k=3, **TILES)
    return jnp.sum(s.logprob) - 0.3 * jnp.sum(s.entropy) + 0.1 * jnp.sum(s.lse)

  def reference(x, w, t):
    z = tempered_logits(x, w, t)
    logp = jax.nn.log_softmax(z, axis=-1)
    lp = jnp.take_along_axis(logp, jnp.asarray(y)[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.sum(lp) - 0.3 * jnp.sum(ent) + 0.1 * jnp.sum(jax.nn.logsumexp(z, axis=-1))

  got_v, got_g = jax.value_and_grad(fused, argnums=(0, 1, 2))(x, w, jnp.asarray(T_TOKENS))
  want_v, want_g = f64_grads(reference, x, w, T_TOKENS)
  close(got_v, want_v)
  for g, r in zip(got_g, want_g):
    close(g, r)


def distill_reference(beta, alpha, y):
  def loss(x, w, tx, tw, t):
    a = jax.nn.log_softmax(tempered_logits(x, w, t), axis=-1)
    bb = jax.nn.log_softmax(tempered_logits(tx, tw, t), axis=-1)
    pa, pb = jnp.exp(a), jnp.exp(bb)
    if beta == 0.0:
      div = jnp.sum(pb * (bb - a), -1)
    elif beta == 1.0:
      div = jnp.sum(pa * (a - bb), -1)
    else:
      m = jnp.log(beta * pb + (1 - beta) * pa)
      div = beta * jnp.sum(pb * (bb - m), -1) + (1 - beta) * jnp.sum(pa * (a - m), -1)
    lz = jax.nn.log_softmax(x @ w, axis=-1)
    ce = -jnp.take_along_axis(lz, jnp.asarray(y)[..., None], axis=-1)[..., 0]
    return jnp.mean((1 - alpha) * t**2 * div + alpha * ce)

  return loss


@pytest.mark.parametrize("strategy", ["recompute", "store"])
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_distillation_gradient_of_the_temperature(strategy, beta):
  x, w, tx, tw, y, _ = data(2)
  tiles = TILES if strategy == "recompute" else STORE_TILES
  alpha = 0.3

  def fused(x, w, t):
    return xentjax.linear_distillation_loss(
      x, w, tx, tw, y, beta=beta, temperature=t, hard_weight=alpha, strategy=strategy, **tiles
    )

  got_v, got_g = jax.value_and_grad(fused, argnums=(0, 1, 2))(x, w, jnp.asarray(T_TOKENS))
  ref = distill_reference(beta, alpha, y)
  want_v, want_g = f64_grads(lambda x, w, t: ref(x, w, tx, tw, t), x, w, T_TOKENS)
  close(got_v, want_v)
  for g, r in zip(got_g, want_g):
    close(g, r)


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_topk_distillation_gradient_of_the_temperature(strategy):
  x, w, _, _, y, _ = data(3)
  rng = np.random.default_rng(4)
  idx = np.stack([rng.permutation(V)[:4] for _ in range(10)]).reshape(*SHAPE, 4)
  lp = np.log(rng.dirichlet(np.ones(6), size=SHAPE)[..., :4]).astype(np.float32)
  tiles = TILES if strategy == "recompute" else STORE_TILES

  def fused(x, w, t):
    return xentjax.linear_topk_distillation_loss(
      x, w, idx, lp, y, temperature=t, hard_weight=0.25, strategy=strategy, **tiles
    )

  def reference(x, w, t):
    a = jax.nn.log_softmax(tempered_logits(x, w, t), axis=-1)
    logq = jax.nn.log_softmax(jnp.asarray(lp) / t, axis=-1)
    a_idx = jnp.take_along_axis(a, jnp.asarray(idx), axis=-1)
    div = jnp.sum(jnp.exp(logq) * (logq - a_idx), -1)
    lz = jax.nn.log_softmax(x @ w, axis=-1)
    ce = -jnp.take_along_axis(lz, jnp.asarray(y)[..., None], axis=-1)[..., 0]
    return jnp.mean(0.75 * t**2 * div + 0.25 * ce)

  got_v, got_g = jax.value_and_grad(fused, argnums=(0, 1, 2))(x, w, jnp.asarray(T_SCALAR))
  want_v, want_g = f64_grads(reference, x, w, np.asarray(T_SCALAR))
  close(got_v, want_v)
  for g, r in zip(got_g, want_g):
    close(g, r)


FUNCTIONS = {
  "linear_softmax_cross_entropy": lambda x, w, tx, tw, y, **kw: (
    xentjax.linear_softmax_cross_entropy(x, w, y, **kw)
  ),
  "linear_token_stats": lambda x, w, tx, tw, y, **kw: (
    xentjax.linear_token_stats(x, w, y, **kw).logprob
  ),
  "linear_distillation_loss": lambda x, w, tx, tw, y, **kw: xentjax.linear_distillation_loss(
    x, w, tx, tw, y, **kw
  ),
  "linear_topk_distillation_loss": lambda x, w, tx, tw, y, **kw: (
    xentjax.linear_topk_distillation_loss(
      x,
      w,
      np.zeros((*SHAPE, 2), np.int32) + np.array([0, 1]),
      np.log(np.full((*SHAPE, 2), 0.4)),
      y,
      **kw,
    )
  ),
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_a_temperature_sweep_compiles_once(name):
  x, w, tx, tw, y, _ = data()
  fn = FUNCTIONS[name]
  chex.clear_trace_counter()  # `f` below is one function to chex, whatever `name` is

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(t):
    return fn(x, w, tx, tw, y, temperature=t)

  values = [float(jnp.sum(f(t))) for t in (0.5, 0.8, 1.0, 2.5)]
  assert len(set(values)) == 4  # each temperature gives its own value


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
def test_an_invalid_traced_temperature_gives_nan(name, bad):
  x, w, tx, tw, y, _ = data()
  got = jax.jit(lambda t: FUNCTIONS[name](x, w, tx, tw, y, temperature=t))(bad)
  assert np.all(np.isnan(np.asarray(got)))
  # Per token: only the tokens with a bad temperature are NaN.
  t = np.where(np.arange(10).reshape(SHAPE) == 3, bad, 1.0).astype(np.float32)
  if name == "linear_token_stats":
    got = np.asarray(jax.jit(lambda t: FUNCTIONS[name](x, w, tx, tw, y, temperature=t))(t))
    assert np.isnan(got.reshape(-1)[3]) and np.all(np.isfinite(np.delete(got.reshape(-1), 3)))


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize(
  "bad, err",
  [
    (True, TypeError),
    ("0.5", TypeError),
    (0.0, ValueError),
    (-2, ValueError),
    (np.inf, ValueError),
  ],
)
def test_a_python_temperature_is_checked_the_same_everywhere(name, bad, err):
  x, w, tx, tw, y, _ = data()
  with pytest.raises(err, match="`temperature`"):
    FUNCTIONS[name](x, w, tx, tw, y, temperature=bad)


def test_a_per_token_temperature_must_fit_the_tokens():
  x, w, _, _, y, _ = data()
  with pytest.raises(ValueError, match=r"temperature.*broadcasts to the tokens \(2, 5\)"):
    xentjax.linear_softmax_cross_entropy(x, w, y, temperature=jnp.ones((3,)))


@pytest.mark.parametrize("name", ["linear_softmax_cross_entropy", "linear_token_stats"])
def test_the_soft_cap_is_static_and_says_so(name):
  x, w, tx, tw, y, _ = data()
  with pytest.raises(TypeError, match=r"logit_soft_cap.*static"):
    jax.jit(lambda c: FUNCTIONS[name](x, w, tx, tw, y, logit_soft_cap=c))(2.0)
  for bad in (True, "2.0"):
    with pytest.raises(TypeError, match="logit_soft_cap"):
      FUNCTIONS[name](x, w, tx, tw, y, logit_soft_cap=bad)
