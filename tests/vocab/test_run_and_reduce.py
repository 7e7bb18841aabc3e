"""The run-and-reduce step the fused entry points share (`xentjax._vocab.reduce`).

One rule for every entry point that reduces over tokens: ``"sum"``, ``"mean"``
over the counted tokens (or over the caller's ``denominator``), NaN with zero
gradients for a mean over nothing, and the same numbers from strategy
"store" as from "recompute". Checked on the cross-entropy, both distillation
losses, the whole-row adapter and the sigmoid contrastive loss (whose "store"
goes through `store_and_reduce`), and on the reduction itself against float64
NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax
from xentjax._core import LabelStatus
from xentjax._vocab.reduce import counted_only, mean_denominators, reduce_terms

N, D, V, K = 6, 4, 11, 3


def data(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, D)).astype(np.float32)
  w = rng.normal(size=(D, V)).astype(np.float32)
  tx = rng.normal(size=(N, D + 1)).astype(np.float32)
  tw = rng.normal(size=(D + 1, V)).astype(np.float32)
  y = rng.integers(0, V, size=N).astype(np.int32)
  idx = np.stack([rng.permutation(V)[:K] for _ in range(N)]).astype(np.int32)
  lp = np.log(rng.dirichlet(np.ones(K), size=N) * 0.9).astype(np.float32)
  return x, w, tx, tw, y, idx, lp


def brier(z, label):
  p = jax.nn.softmax(z)
  return jnp.sum(p * p) - 2.0 * p[label]


def entries():
  """`{name: loss(x, w, labels, where, **options)}` for each entry point that reduces."""
  _, _, tx, tw, _, idx, lp = data()
  return {
    "cross_entropy": lambda x, w, y, m, **o: xentjax.linear_softmax_cross_entropy(
      x, w, y, where=m, z_loss=1e-2, label_smoothing=0.1, **o
    ),
    "distillation": lambda x, w, y, m, **o: xentjax.linear_distillation_loss(
      x, w, tx, tw, y, where=m, hard_weight=0.3, temperature=2.0, **o
    ),
    "topk_distillation": lambda x, w, y, m, **o: xentjax.linear_topk_distillation_loss(
      x, w, idx, lp, y, where=m, hard_weight=0.3, **o
    ),
  }


def value_and_grads(f, x, w):
  return jax.value_and_grad(f, argnums=(0, 1))(x, w)


@pytest.mark.parametrize("name", list(entries()))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_store_and_recompute_reduce_alike(name, reduction):
  x, w, _, _, y, _, _ = data()
  mask = np.array([True, False, True, True, False, True])
  loss = entries()[name]

  def run(strategy):
    return value_and_grads(
      lambda x, w: loss(x, w, y, mask, reduction=reduction, strategy=strategy), x, w
    )

  (v1, g1), (v2, g2) = run("recompute"), run("store")
  np.testing.assert_allclose(v2, v1, rtol=2e-5)
  for a, b in zip(g2, g1):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(entries()))
@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_the_denominator_divides_the_sum(name, strategy):
  x, w, _, _, y, _, _ = data(1)
  mask = np.array([True, True, False, True, True, True])
  loss = entries()[name]
  total = float(loss(x, w, y, mask, reduction="sum", strategy=strategy))
  got = float(loss(x, w, y, mask, reduction="mean", strategy=strategy, denominator=7.0))
  np.testing.assert_allclose(got, total / 7.0, rtol=1e-5)
  own = float(loss(x, w, y, mask, reduction="mean", strategy=strategy))
  np.testing.assert_allclose(own, total / mask.sum(), rtol=1e-5)  # no weights: the count


@pytest.mark.parametrize("name", list(entries()))
@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_a_mean_over_nothing_is_nan_with_zero_gradients(name, strategy):
  x, w, _, _, y, _, _ = data(2)
  nothing = np.zeros(N, bool)
  loss = entries()[name]
  v, grads = value_and_grads(lambda x, w: loss(x, w, y, nothing, strategy=strategy), x, w)
  assert np.isnan(v)
  for g in grads:
    np.testing.assert_array_equal(g, np.zeros_like(g))
  s = loss(x, w, y, nothing, strategy=strategy, reduction="sum")
  assert float(s) == 0.0
  # A traced denominator that is not a finite number > 0 counts as nothing.
  bad = jax.jit(lambda d: loss(x, w, y, None, strategy=strategy, denominator=d))(jnp.float32(0))
  assert np.isnan(bad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_row_loss_reduces_by_the_same_rules(reduction):
  x, w, _, _, y, _, _ = data(3)
  mask = np.array([True, True, False, True, False, True])
  got = xentjax.linear_row_loss(brier, x, w, {"label": y}, where=mask, reduction=reduction)
  z = x.astype(np.float64) @ w.astype(np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  per = (p * p).sum(1) - 2.0 * p[np.arange(N), y]
  per = np.where(mask, per, 0.0)
  want = {"none": per, "sum": per.sum(), "mean": per.sum() / mask.sum()}[reduction]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  nothing = xentjax.linear_row_loss(brier, x, w, {"label": y}, where=np.zeros(N, bool))
  assert np.isnan(nothing)


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_the_sigmoid_contrastive_loss_reduces_by_the_same_rules(strategy):
  # Its strategy "store" sums through `store_and_reduce`, the store step of `run_and_reduce`.
  rng = np.random.default_rng(5)
  a = rng.normal(size=(N, D)).astype(np.float32)
  b = rng.normal(size=(N + 3, D)).astype(np.float32)
  y = rng.integers(0, N + 3, size=N)
  mask = np.array([True, False, True, True, False, True])

  def loss(a, b, where, reduction="mean"):
    return xentjax.sigmoid_contrastive_loss(
      a, b, labels=y, where=where, reduction=reduction, strategy=strategy
    )

  total = float(loss(a, b, mask, "sum"))
  np.testing.assert_allclose(float(loss(a, b, mask)), total / mask.sum(), rtol=1e-5)
  nothing = np.zeros(N, bool)
  v, grads = jax.value_and_grad(loss, argnums=(0, 1))(a, b, nothing)
  assert np.isnan(v)
  for g in grads:
    np.testing.assert_array_equal(g, np.zeros_like(g))
  assert float(loss(a, b, nothing, "sum")) == 0.0


def test_reduce_terms_divides_each_term_by_its_own_denominator():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=5), rng.normal(size=5)
  terms = {"coef": jnp.asarray(a), "zcoef": jnp.asarray(b)}
  dens = {"coef": jnp.asarray(2.5), "zcoef": jnp.asarray(4.0)}
  np.testing.assert_allclose(reduce_terms(terms, "mean", dens, (5,)), a.sum() / 2.5 + b.sum() / 4)
  np.testing.assert_allclose(reduce_terms(terms, "sum", dens, (5,)), a.sum() + b.sum())
  np.testing.assert_allclose(reduce_terms(terms, "none", dens, (1, 5)), (a + b)[None])
  # The caller's denominator replaces every term's own.
  assert mean_denominators(dens, 7.0) == {"coef": 7.0, "zcoef": 7.0}
  assert mean_denominators(dens, None) is dens
  # A zero denominator: NaN, and its term adds nothing (no NaN) to the gradient.
  zero = {"coef": jnp.asarray(0.0), "zcoef": jnp.asarray(4.0)}

  def f(t):
    return reduce_terms({"coef": t, "zcoef": 2.0 * t}, "mean", zero, (5,))

  assert np.isnan(f(jnp.ones(5)))
  np.testing.assert_array_equal(jax.grad(f)(jnp.ones(5)), np.full(5, 2.0 / 4.0))


def test_counted_only_zeroes_uncounted_and_marks_bad_tokens():
  status = LabelStatus(
    counted=jnp.array([True, False, True]), bad=jnp.array([False, False, True]), index=None
  )
  got = np.asarray(counted_only(jnp.array([1.5, 2.0, 3.0]), status))
  np.testing.assert_array_equal(got[:2], [1.5, 0.0])
  assert np.isnan(got[2])
