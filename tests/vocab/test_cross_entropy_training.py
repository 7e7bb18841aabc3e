"""What a trainer reads from the fused cross-entropy's one sweep.

* the z-loss under ``"mean"`` with class weights is averaged over the tokens,
  not over their class weights (so doubling every class weight moves nothing);
* ``return_stats=True``: per-token log-normalizer, z-loss term, entropy,
  argmax and top-1 credit from the loss's own sweep;
* ``denominator=``: the mean's divisor for gradient accumulation, on the
  cross-entropy and both distillation losses.

Every value and gradient is checked against a float64 reference written here
on the materialized logits (NumPy; PyTorch float64 autograd for gradients).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax
from xentjax import linear_softmax_cross_entropy as fused_ce

torch = pytest.importorskip("torch")
torch.set_default_dtype(torch.float64)

STRATEGIES = ("recompute", "store")
N_SHAPE, D, V = (4, 7), 9, 23


def chunks(strategy):
  if strategy == "store":
    return {"token_chunk_size": 5}
  return {"token_chunk_size": 5, "vocab_chunk_size": 6}


def close(a, b, tol=2e-5):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  scale = max(1.0, float(np.nanmax(np.abs(b)))) if b.size else 1.0
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


def data(seed=0, shape=N_SHAPE, v=V, n_cols=None):
  rng = np.random.default_rng(seed)
  n_cols = v if n_cols is None else n_cols
  x = rng.normal(size=(*shape, D)).astype(np.float32)
  w = (0.7 * rng.normal(size=(D, n_cols))).astype(np.float32)
  b = rng.normal(size=(n_cols,)).astype(np.float32)
  y = rng.integers(0, v, shape).astype(np.int32)
  return x, w, b, y


# ----------------------------------------------------------------------------
# The float64 reference on the materialized logits.


def ref_logits(x, w, bias=None, cap=None, temperature=1.0, vocab_size=None):
  """float64 torch logits ``c tanh((x w + b) / c) / T`` of the real classes."""
  z = x @ w
  if bias is not None:
    z = z + bias
  if vocab_size is not None:
    z = z[..., :vocab_size]
  if cap is not None:
    z = cap * torch.tanh(z / cap)
  return z / temperature


def ref_loss(
  z,
  y,
  *,
  where=None,
  ignore_index=-100,
  weights=None,
  class_weights=None,
  eps=0.0,
  lam=0.0,
  reduction="mean",
  denominator=None,
):
  """The fused loss's formula in float64 torch (differentiable in `z`)."""
  v = z.shape[-1]
  y = torch.as_tensor(np.asarray(y, np.int64))
  counted = y != ignore_index
  if where is not None:
    counted = counted & torch.as_tensor(np.asarray(where, bool))
  yi = torch.where(counted, y, torch.zeros_like(y))
  lse = torch.logsumexp(z, -1)
  zy = torch.gather(z, -1, yi[..., None])[..., 0]
  c = (
    torch.ones(v)
    if class_weights is None
    else torch.as_tensor(np.asarray(class_weights, np.float64))
  )
  ce = (1 - eps) * c[yi] * (lse - zy)
  if eps:
    ce = ce + eps / v * torch.sum(c * (lse[..., None] - z), -1)
  zl = lam * lse**2
  tw = torch.ones(y.shape) if weights is None else torch.as_tensor(np.asarray(weights, np.float64))
  tw = torch.where(counted, tw, torch.zeros_like(tw))
  if reduction == "none":
    return tw * (ce + zl)
  if reduction == "sum":
    return torch.sum(tw * (ce + zl))
  d_ce = torch.sum(tw * c[yi]) if denominator is None else denominator
  d_z = torch.sum(tw) if denominator is None else denominator
  return torch.sum(tw * ce) / d_ce + torch.sum(tw * zl) / d_z


def ref_value_and_grads(x, w, bias, y, logit_opts, loss_opts, cot=None):
  """`(value, (dx, dw, dbias))` of the reference, float64."""
  xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
  wt = torch.tensor(np.asarray(w, np.float64), requires_grad=True)
  bt = None if bias is None else torch.tensor(np.asarray(bias, np.float64), requires_grad=True)
  loss = ref_loss(ref_logits(xt, wt, bt, **logit_opts), y, **loss_opts)
  if cot is not None:
    loss = torch.sum(loss * torch.as_tensor(np.asarray(cot, np.float64)))
  loss.backward()
  grads = (xt.grad.numpy(), wt.grad.numpy(), None if bt is None else bt.grad.numpy())
  return loss.item(), grads


def ref_stats(z, y, counted, lam):
  """float64 NumPy `CrossEntropyStats` of materialized logits `z` (``-inf`` allowed)."""
  z = np.asarray(z, np.float64)
  m = np.max(z, -1, keepdims=True)
  lse = (m + np.log(np.sum(np.exp(z - m), -1, keepdims=True)))[..., 0]
  p = np.exp(z - lse[..., None])
  pz = np.sum(p * np.where(p > 0, z, 0.0), -1)  # 0 log 0 = 0 on -inf classes
  zy = np.take_along_axis(z, np.where(counted, y, 0)[..., None], -1)
  greater = np.sum(z > zy, -1)
  tied = np.sum(z == zy, -1)
  credit = np.clip((1.0 - greater) / tied, 0.0, 1.0)
  return {
    "lse": lse,
    "z_loss": np.where(counted, lam * lse**2, 0.0),
    "entropy": np.where(counted, lse - pz, 0.0),
    "argmax": np.argmax(z, -1),
    "correct": np.where(counted, credit, 0.0),
  }


# ----------------------------------------------------------------------------
# Item 10: the z-loss with class weights is a mean over the tokens.


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_z_loss_with_class_weights_is_a_mean_over_tokens(strategy, eps):
  x, w, _, y = data(1)
  y[0, :2] = -100
  where = np.arange(y.size).reshape(y.shape) % 6 != 4
  rng = np.random.default_rng(2)
  weights = rng.uniform(0.2, 2.0, y.shape).astype(np.float32)
  cw = rng.uniform(0.1, 3.0, (V,)).astype(np.float32)
  lam = 0.05
  common = {"where": where, "weights": weights, "label_smoothing": eps, "strategy": strategy}

  def ours(cw, lam):
    f = lambda x, w: fused_ce(x, w, y, class_weights=cw, z_loss=lam, **common, **chunks(strategy))
    return jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)

  v, g = ours(cw, lam)
  loss_opts = {"where": where, "weights": weights, "class_weights": cw, "eps": eps, "lam": lam}
  v_ref, g_ref = ref_value_and_grads(x, w, None, y, {}, loss_opts)
  close(v, v_ref)
  close(g[0], g_ref[0])
  close(g[1], g_ref[1])
  # Doubling every class weight changes neither term of the mean (value and gradients) ...
  v2, g2 = ours(2.0 * cw, lam)
  close(v2, v_ref)
  close(g2[0], g_ref[0])
  close(g2[1], g_ref[1])
  # ... and the z-loss part is lam * sum_i w_i lse_i^2 / sum_i w_i over the counted tokens.
  v0, _ = ours(cw, 0.0)
  counted = (y != -100) & where
  lse = ref_stats(np.asarray(x, np.float64) @ w, y, counted, 0.0)["lse"]
  tw = np.where(counted, weights, 0.0)
  close(float(v) - float(v0), lam * np.sum(tw * lse**2) / np.sum(tw), tol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_z_loss_with_class_weights_sum_and_none(strategy):
  x, w, _, y = data(3)
  cw = np.random.default_rng(4).uniform(0.1, 3.0, (V,)).astype(np.float32)
  reductions = ("sum",) if strategy == "store" else ("sum", "none")
  for reduction in reductions:
    cot = np.random.default_rng(5).normal(size=y.shape) if reduction == "none" else None

    def f(x, w, reduction=reduction, cot=cot):
      loss = fused_ce(
        x,
        w,
        y,
        class_weights=cw,
        z_loss=0.02,
        reduction=reduction,
        strategy=strategy,
        **chunks(strategy),
      )
      return jnp.sum(loss * cot) if cot is not None else loss

    v, g = jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)
    opts = {"class_weights": cw, "lam": 0.02, "reduction": reduction}
    v_ref, g_ref = ref_value_and_grads(x, w, None, y, {}, opts, cot)
    close(v, v_ref)
    close(g[0], g_ref[0])
    close(g[1], g_ref[1])


def test_dense_cross_entropy_loss_has_no_z_loss():
  """The dense PyTorch-style loss takes class weights but no z-loss, and the dense losses
  with a z-loss take no class weights: the rule of item 10 has nothing to agree with."""
  import inspect

  assert "z_loss" not in inspect.signature(xentjax.cross_entropy_loss).parameters
  for f in (xentjax.softmax_cross_entropy, xentjax.softmax_cross_entropy_with_integer_labels):
    params = inspect.signature(f).parameters
    assert "z_loss" in params and not any("weight" in p for p in params)


# ----------------------------------------------------------------------------
# return_stats: the per-token statistics of the same sweep.

STAT_CASES = {
  "plain": ({}, {}),
  "bias_temperature_cap": ({"temperature": 0.7, "cap": 2.5, "_bias": True}, {"lam": 0.01}),
  "padding_where_ignore": ({"vocab_size": V - 4}, {"lam": 0.03, "_mask": True}),
  "smoothing_weights": ({"_bias": True}, {"eps": 0.1, "_weights": True, "lam": 1e-3}),
  "minus_inf_bias": ({"_bias": "-inf"}, {"_mask": True}),
}


def stat_case(name):
  logit_opts, loss_opts = (dict(o) for o in STAT_CASES[name])
  x, w, b, y = data(7, v=logit_opts.get("vocab_size", V), n_cols=V)
  bias = logit_opts.pop("_bias", None)
  if bias == "-inf":
    b[[2, 5, 11]] = -np.inf
    y = np.where(np.isin(y, [2, 5, 11]), 0, y).astype(np.int32)
  bias = None if bias is None else b
  where = None
  if loss_opts.pop("_mask", False):
    y[1, :3] = -100
    where = np.arange(y.size).reshape(y.shape) % 5 != 1
  weights = None
  if loss_opts.pop("_weights", False):
    weights = np.random.default_rng(8).uniform(0.0, 2.0, y.shape).astype(np.float32)
  return x, w, bias, y, where, weights, logit_opts, loss_opts


def fused_kwargs(logit_opts, loss_opts, where, weights, bias):
  kw = {
    "where": where,
    "weights": weights,
    "bias": bias,
    "label_smoothing": loss_opts.get("eps", 0.0),
    "z_loss": loss_opts.get("lam", 0.0),
    "temperature": logit_opts.get("temperature", 1.0),
    "logit_soft_cap": logit_opts.get("cap"),
    "vocab_size": logit_opts.get("vocab_size"),
  }
  return kw


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", list(STAT_CASES))
def test_stats_match_float64(name, strategy):
  x, w, bias, y, where, weights, logit_opts, loss_opts = stat_case(name)
  kw = fused_kwargs(logit_opts, loss_opts, where, weights, bias)

  def f(x, w, b):
    return fused_ce(x, w, y, **kw, bias=b, strategy=strategy, return_stats=True, **chunks(strategy))

  kw.pop("bias")
  (loss, stats), g = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(x, w, bias)
  opts = {**loss_opts, "where": where, "weights": weights}
  v_ref, g_ref = ref_value_and_grads(x, w, bias, y, logit_opts, opts)
  close(loss, v_ref)
  for a, r in zip(g, g_ref):
    if r is not None:
      close(a, r)
  z = ref_logits(
    torch.as_tensor(np.asarray(x, np.float64)),
    torch.as_tensor(np.asarray(w, np.float64)),
    None if bias is None else torch.as_tensor(np.asarray(bias, np.float64)),
    **logit_opts,
  ).numpy()
  counted = y != -100
  if where is not None:
    counted = counted & where
  ref = ref_stats(z, y, counted, loss_opts.get("lam", 0.0))
  assert isinstance(stats, xentjax.CrossEntropyStats)
  for field in ("lse", "z_loss", "entropy", "correct"):
    got = getattr(stats, field)
    assert got.shape == y.shape and got.dtype == loss.dtype, field
    close(got, ref[field])
  assert stats.argmax.dtype == jnp.int32
  np.testing.assert_array_equal(stats.argmax, ref["argmax"])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stats_ties_follow_metrics_correct(strategy):
  """Exact ties (zero head, a bias with tied maxima): argmax the lowest index, the label's
  credit 1/t as `xentjax.metrics.correct`; an all -inf row ties every class."""
  x, _, _, _ = data(9, shape=(12,))
  w = np.zeros((D, V), np.float32)
  b = np.zeros(V, np.float32)
  b[[3, 9, 17]] = 2.0  # a 3-way tie at the top
  b[[4, 5]] = -np.inf
  y = np.array([3, 9, 17, 0, 4, 22, 3, 9, 1, 17, 2, 3], np.int32)
  _, stats = fused_ce(x, w, y, bias=b, strategy=strategy, return_stats=True, **chunks(strategy))
  z = np.broadcast_to(b, (12, V))
  np.testing.assert_array_equal(stats.argmax, np.full(12, 3))
  close(stats.correct, xentjax.metrics.correct(jnp.asarray(z), y))
  close(stats.correct, np.where(np.isin(y, [3, 9, 17]), 1 / 3, 0.0))
  # Every logit -inf: all V classes tied (credit 1/V), as `metrics.correct`.
  b_all = np.full(V, -np.inf, np.float32)
  _, s = fused_ce(x, w, y, bias=b_all, strategy=strategy, return_stats=True, **chunks(strategy))
  close(s.correct, np.full(12, 1 / V))
  close(s.correct, xentjax.metrics.correct(jnp.broadcast_to(jnp.asarray(b_all), (12, V)), y))


def test_stats_mean_credit_is_accuracy_and_bad_labels_are_nan():
  x, w, _, y = data(10)
  y[0, 0] = V  # out of range
  where = np.arange(y.size).reshape(y.shape) % 3 != 0
  _, s = fused_ce(x, w, y, where=where, return_stats=True)
  assert np.isnan(s.correct[0, 0]) == bool(where[0, 0])
  ok = np.ones(y.shape, bool)
  ok[0, 0] = False
  z = jnp.asarray(x) @ jnp.asarray(w)
  y_ok = np.where(ok, y, 0)
  acc = xentjax.metrics.accuracy(z, y_ok, where=where & ok)
  close(np.sum(np.where(ok & where, s.correct, 0.0)) / np.sum(ok & where), acc)
  assert not np.any(np.asarray(s.correct)[~where])


def test_stats_carry_no_gradient_and_the_loss_gradient_is_unchanged():
  x, w, b, y = data(11)
  kw = {"bias": b, "z_loss": 0.01, "token_chunk_size": 5, "vocab_chunk_size": 6}

  def with_stats(x, w):
    loss, s = fused_ce(x, w, y, return_stats=True, **kw)
    return loss + jnp.sum(s.entropy + s.lse + s.z_loss + s.correct)

  g = jax.grad(with_stats, (0, 1))(x, w)
  g0 = jax.grad(lambda x, w: fused_ce(x, w, y, **kw), (0, 1))(x, w)
  for a, r in zip(g, g0):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(r))


def test_return_lse_and_stats_together():
  x, w, _, y = data(12)
  loss, lse, s = fused_ce(x, w, y, return_lse=True, return_stats=True)
  close(loss, fused_ce(x, w, y))
  close(lse, s.lse)


# ----------------------------------------------------------------------------
# denominator=: the mean's divisor for gradient accumulation.


ALL = slice(None)


def microbatches(n_tokens, sizes=(2, 1, 1)):
  """Slices of the leading axis: unequal microbatches."""
  starts = np.cumsum((0, *sizes))
  return [slice(a, b) for a, b in itertools.pairwise(starts)]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("class_weighted", [False, True])
def test_accumulated_microbatches_equal_the_full_batch(strategy, class_weighted):
  x, w, b, y = data(13)
  y[0, :5] = -100  # the microbatches count different numbers of tokens
  where = np.arange(y.size).reshape(y.shape) % 4 != 3
  cw = np.random.default_rng(14).uniform(0.2, 2.0, (V,)).astype(np.float32)
  cw = cw if class_weighted else None
  lam = 0.0 if class_weighted else 0.02
  counted = (y != -100) & where
  total = np.sum(cw[np.where(counted, y, 0)] * counted) if class_weighted else np.sum(counted)
  kw = {"class_weights": cw, "z_loss": lam, "label_smoothing": 0.1, "strategy": strategy}
  kw.update(chunks(strategy))

  @jax.jit
  def step(x, w, b, y, where, d):
    return jax.value_and_grad(
      lambda x, w, b: fused_ce(x, w, y, where=where, bias=b, denominator=d, **kw), (0, 1, 2)
    )(x, w, b)

  acc_v, acc_g = 0.0, None
  for sl in microbatches(y.shape[0]):
    v, (_gx, gw, gb) = step(x[sl], w, b, y[sl], where[sl], jnp.float32(total))
    acc_v += float(v)
    acc_g = (gw, gb) if acc_g is None else (acc_g[0] + gw, acc_g[1] + gb)
  opts = {"where": where, "class_weights": cw, "eps": 0.1, "lam": lam}
  v_ref, g_ref = ref_value_and_grads(x, w, b, y, {}, opts)
  close(acc_v, v_ref)
  close(acc_g[0], g_ref[1])
  close(acc_g[1], g_ref[2])
  # The full batch with its own count as the denominator is the plain mean.
  v_full = fused_ce(x, w, y, where=where, bias=b, denominator=float(total), **kw)
  close(v_full, v_ref)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_distillation_denominator_accumulates(strategy):
  x, w, _, y = data(15)
  rng = np.random.default_rng(16)
  tx = rng.normal(size=(*y.shape, 5)).astype(np.float32)
  tw = rng.normal(size=(5, V)).astype(np.float32)
  where = np.arange(y.size).reshape(y.shape) % 3 != 1
  idx = np.argsort(-(tx @ tw), -1)[..., :4].astype(np.int32)
  lp = np.log(np.full(idx.shape, 0.2, np.float32))
  count = float(np.sum(where))
  kw = dict(temperature=2.0, strategy=strategy, **chunks(strategy))
  losses = {
    "full": lambda x, w, sl, d: xentjax.linear_distillation_loss(
      x, w, tx[sl], tw, y[sl], where=where[sl], beta=0.5, hard_weight=0.3, denominator=d, **kw
    ),
    "topk": lambda x, w, sl, d: xentjax.linear_topk_distillation_loss(
      x, w, idx[sl], lp[sl], y[sl], where=where[sl], hard_weight=0.3, denominator=d, **kw
    ),
  }
  for loss in losses.values():
    v_full, g_full = jax.value_and_grad(lambda x, w, f=loss: f(x, w, ALL, None), (0, 1))(x, w)
    acc_v, acc_gw = 0.0, 0.0
    for sl in microbatches(y.shape[0]):
      v, (_, gw) = jax.value_and_grad(
        lambda x, w, f=loss, sl=sl: f(x, w, sl, jnp.float32(count)), (0, 1)
      )(x[sl], w)
      acc_v, acc_gw = acc_v + float(v), acc_gw + gw
    close(acc_v, v_full)
    close(acc_gw, g_full[1])


def test_distillation_denominator_against_float64():
  x, w, _, y = data(17)
  rng = np.random.default_rng(18)
  tx = rng.normal(size=(*y.shape, 5)).astype(np.float32)
  tw = rng.normal(size=(5, V)).astype(np.float32)
  got = xentjax.linear_distillation_loss(x, w, tx, tw, denominator=7.0)
  zs = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  zt = np.asarray(tx, np.float64) @ np.asarray(tw, np.float64)
  ls = zs - np.log(np.exp(zs).sum(-1, keepdims=True))
  lt = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
  kl = np.sum(np.exp(lt) * (lt - ls), -1)
  close(got, kl.sum() / 7.0)


def test_denominator_is_traced_and_takes_python_numbers():
  x, w, _, y = data(19)
  traces = []

  @jax.jit
  def f(d):
    traces.append(1)
    return fused_ce(x, w, y, denominator=d)

  s = float(fused_ce(x, w, y, reduction="sum"))
  close(f(jnp.float32(4.0)), s / 4.0)
  close(f(jnp.float32(9.0)), s / 9.0)
  assert len(traces) == 1
  close(fused_ce(x, w, y, denominator=5), s / 5.0)
  close(fused_ce(x, w, y, denominator=np.int32(5)), s / 5.0)


@pytest.mark.parametrize("d", [0.0, -2.0, np.inf, np.nan])
def test_traced_bad_denominator_is_nan_with_zero_gradient(d):
  x, w, _, y = data(20)
  v, g = jax.jit(jax.value_and_grad(lambda x, d: fused_ce(x, w, y, denominator=d)))(
    x, jnp.float32(d)
  )
  assert np.isnan(float(v)) and not np.any(np.asarray(g))


@pytest.mark.parametrize(
  "kw, err, match",
  [
    ({"denominator": 3.0, "reduction": "sum"}, ValueError, 'reduction="mean"'),
    ({"denominator": 3.0, "reduction": "none"}, ValueError, "denominator"),
    ({"denominator": 0}, ValueError, "denominator"),
    ({"denominator": -1.0}, ValueError, "denominator"),
    ({"denominator": float("nan")}, ValueError, "denominator"),
    ({"denominator": True}, TypeError, "denominator"),
    ({"denominator": "8"}, TypeError, "denominator"),
    ({"denominator": np.ones(2, np.float32)}, ValueError, "scalar"),
    (
      {"denominator": 3.0, "class_weights": np.ones(V, np.float32), "z_loss": 0.1},
      ValueError,
      "z_loss=0",
    ),
  ],
)
def test_denominator_errors_name_the_fix(kw, err, match):
  x, w, _, y = data(21)
  with pytest.raises(err, match=match):
    fused_ce(x, w, y, **kw)


def test_distillation_denominator_errors():
  x, w, _, _ = data(22)
  with pytest.raises(ValueError, match="denominator"):
    xentjax.linear_distillation_loss(x, w, x, w, denominator=2.0, reduction="sum")
  with pytest.raises(ValueError, match="denominator"):
    xentjax.linear_distillation_loss(x, w, x, w, denominator=-2.0)
