"""Tests of `xentjax.linear_distillation_loss` and `xentjax.linear_topk_distillation_loss`.

The reference materializes both logit arrays in float64 (under
`jax.enable_x64`, whatever the suite's setting), writes each divergence out
from `jax.nn.log_softmax` (the mixture ``m`` of the generalized JSD as
``log(beta p_t + (1 - beta) p_s)``), and takes its gradients by plain
autodiff: independent of the fused kernels and of their custom VJPs. Tiles are small and ragged (token chunk 4, vocabulary chunk
8, V = 37) so every loop runs full chunks and a tail.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _harness import run_checks

import xentjax

SHAPE, D, D_T, V = (2, 7), 5, 6, 37
CHUNKS = {
  "recompute": {"token_chunk_size": 4, "vocab_chunk_size": 8},
  "store": {"token_chunk_size": 4},
}


def inputs(seed=0, v=V, w_vd=False, tw_vd=False, d_t=D_T):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(*SHAPE, D)).astype(np.float32)
  w = (1.5 * rng.normal(size=(v, D) if w_vd else (D, v))).astype(np.float32)
  tx = rng.normal(size=(*SHAPE, d_t)).astype(np.float32)
  tw = (2.0 * rng.normal(size=(v, d_t) if tw_vd else (d_t, v))).astype(np.float32)
  y = rng.integers(0, v, SHAPE)
  return x, w, tx, tw, y


def reference(
  x,
  w,
  tx,
  tw,
  labels=None,
  *,
  beta=0.0,
  temperature=1.0,
  hard_weight=0.0,
  counted=None,
  reduction="mean",
  cotangent=None,
  w_vd=False,
  tw_vd=False,
  vocab_size=None,
  topk=None,
):
  """Loss and (dx, dw) of the materialized computation, in float64 JAX autodiff.

  Runs under `jax.enable_x64(True)` whatever the suite's setting. `topk=(indices,
  logprobs)` replaces the teacher by the renormalized top-k distribution (then
  `tx`, `tw` are unused).
  """
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    T, alpha = temperature, hard_weight
    c = np.ones(np.shape(x)[:-1], bool) if counted is None else np.asarray(counted)

    def per_token(xx, ww):
      zs = xx @ (ww.T if w_vd else ww)
      if vocab_size is not None:
        zs = zs[..., :vocab_size]
      a = jax.nn.log_softmax(zs / T, axis=-1)
      if topk is None:
        zt = f64(tx) @ (f64(tw).T if tw_vd else f64(tw))
        if vocab_size is not None:
          zt = zt[..., :vocab_size]
        b = jax.nn.log_softmax(zt / T, axis=-1)
        pa, pb = jnp.exp(a), jnp.exp(b)
        if beta == 0.0:
          div = jnp.sum(pb * (b - a), -1)
        elif beta == 1.0:
          div = jnp.sum(pa * (a - b), -1)
        else:
          lm = jnp.log(beta * pb + (1 - beta) * pa)
          div = beta * jnp.sum(pb * (b - lm), -1) + (1 - beta) * jnp.sum(pa * (a - lm), -1)
      else:
        idx, lp = topk
        q = jax.nn.softmax(f64(lp) / T, axis=-1)
        la = jnp.take_along_axis(a, jnp.asarray(np.asarray(idx)), -1)
        logq = jnp.log(jnp.where(q > 0, q, 1.0))
        div = jnp.sum(jnp.where(q > 0, q * (logq - la), 0.0), -1)
      loss = (1 - alpha) * T**2 * div
      if alpha:
        y = np.clip(np.asarray(labels), 0, zs.shape[-1] - 1)
        ce = jax.nn.logsumexp(zs, -1) - jnp.take_along_axis(zs, y[..., None], -1)[..., 0]
        loss = loss + alpha * ce
      return jnp.where(c, loss, 0.0)

    def scalar(xx, ww):
      loss = per_token(xx, ww)
      if reduction == "none":
        return jnp.sum(loss * f64(cotangent))
      return jnp.sum(loss) / (c.sum() if reduction == "mean" else 1)

    xx, ww = f64(x), f64(w)
    value, (gx, gw) = jax.value_and_grad(scalar, (0, 1))(xx, ww)
    out = per_token(xx, ww) if reduction == "none" else value
    return np.asarray(out), np.asarray(gx), np.asarray(gw)


def assert_close(a, b, what, rtol=3e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=what)


def jax_value_and_grads(fn, x, w, cotangent=None):
  def scalar(x, w):
    out = fn(x, w)
    return jnp.sum(out * cotangent) if cotangent is not None else out

  out, (gx, gw) = jax.jit(jax.value_and_grad(scalar, (0, 1)))(x, w)
  if cotangent is not None:
    out = jax.jit(fn)(x, w)
  return out, gx, gw


def check_against_reference(fn, ref_kwargs, x, w, tx, tw, y, cotangent=None, rtol=3e-5):
  out, gx, gw = jax_value_and_grads(fn, jnp.asarray(x), jnp.asarray(w), cotangent)
  r_out, r_gx, r_gw = reference(x, w, tx, tw, y, cotangent=cotangent, **ref_kwargs)
  assert_close(out, r_out, "loss", rtol)
  assert_close(gx, r_gx, "grad x", rtol)
  assert_close(gw, r_gw, "grad w", rtol)
  assert gx.shape == x.shape and gw.shape == w.shape


# ----------------------------------------------------------------------------
# Exactness against the float64 materialized computation.


@pytest.mark.parametrize("strategy", ["recompute", "store"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_every_beta_with_temperature_hard_labels_and_masks(beta, strategy):
  x, w, tx, tw, y = inputs()
  y[0, :2] = -100
  where = (np.arange(14).reshape(SHAPE) % 5) != 3
  counted = (y != -100) & where
  opts = {"beta": beta, "temperature": 2.5, "hard_weight": 0.3}

  def fn(x, w):
    return xentjax.linear_distillation_loss(
      x, w, tx, tw, y, where=where, strategy=strategy, **opts, **CHUNKS[strategy]
    )

  check_against_reference(fn, dict(opts, counted=counted), x, w, tx, tw, y)


@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_sum_without_labels_at_temperature_one(beta):
  x, w, tx, tw, _ = inputs(seed=1)

  def fn(x, w):
    return xentjax.linear_distillation_loss(
      x, w, tx, tw, beta=beta, reduction="sum", **CHUNKS["recompute"]
    )

  check_against_reference(fn, {"beta": beta, "reduction": "sum"}, x, w, tx, tw, None)


def test_reduction_none_with_a_cotangent():
  x, w, tx, tw, y = inputs(seed=2)
  y[1, 3] = -100
  cot = np.random.default_rng(5).normal(size=SHAPE)
  opts = {"beta": 1.0, "temperature": 0.7, "hard_weight": 0.5}

  def fn(x, w):
    return xentjax.linear_distillation_loss(
      x, w, tx, tw, y, reduction="none", **opts, **CHUNKS["recompute"]
    )

  out = jax.jit(fn)(x, w)
  assert out.shape == SHAPE and float(out[1, 3]) == 0.0
  check_against_reference(
    fn, dict(opts, counted=y != -100, reduction="none"), x, w, tx, tw, y, cotangent=cot
  )


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_tied_layouts_padding_and_different_hidden_sizes(strategy):
  x, w, tx, tw, y = inputs(seed=3, v=40, w_vd=True, tw_vd=True, d_t=9)
  opts = {"beta": 0.5, "temperature": 1.5, "hard_weight": 0.2}

  def fn(x, w):
    return xentjax.linear_distillation_loss(
      x,
      w,
      tx,
      tw,
      y % 33,
      w_layout="vd",
      teacher_w_layout="vd",
      vocab_size=33,
      strategy=strategy,
      **opts,
      **CHUNKS[strategy],
    )

  ref = dict(opts, w_vd=True, tw_vd=True, vocab_size=33)
  check_against_reference(fn, ref, x, w, tx, tw, y % 33)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_inputs_accumulate_in_float32(dtype):
  x, w, tx, tw, _y = (jnp.asarray(a) for a in inputs(seed=4))
  x, w, tx, tw = (a.astype(dtype) for a in (x, w, tx, tw))

  def fn(x, w):
    return xentjax.linear_distillation_loss(
      x, w, tx, tw, beta=0.5, temperature=2.0, **CHUNKS["recompute"]
    )

  loss, (gx, gw) = jax.jit(jax.value_and_grad(fn, (0, 1)))(x, w)
  assert loss.dtype == jnp.float32 and gx.dtype == dtype and gw.dtype == dtype
  # The reference on the same (rounded) values in float64: only the
  # 16-bit rounding of each logit-gradient tile before its matmul differs.
  up = [np.asarray(a, np.float32) for a in (x, w, tx, tw)]
  r_loss, r_gx, r_gw = reference(*up, beta=0.5, temperature=2.0)
  assert_close(loss, r_loss, "loss", 1e-5)
  assert_close(gx, r_gx, "grad x", 2e-2)
  assert_close(gw, r_gw, "grad w", 2e-2)


# ----------------------------------------------------------------------------
# Top-k teachers.


def topk_teacher(seed=0, k=5, v=V):
  """The top-k of a random teacher distribution: indices and log-probabilities."""
  rng = np.random.default_rng(seed)
  logp = np.log(rng.dirichlet(np.full(v, 0.3), SHAPE))
  idx = np.argsort(-logp, axis=-1)[..., :k]
  return idx, np.take_along_axis(logp, idx, -1).astype(np.float32)


@pytest.mark.parametrize(
  ("strategy", "temperature", "hard_weight"),
  [("recompute", 1.0, 0.0), ("recompute", 2.0, 0.4), ("store", 0.5, 0.3)],
)
def test_topk_matches_the_renormalized_reference(strategy, temperature, hard_weight):
  x, w, _, _, y = inputs(seed=6)
  idx, lp = topk_teacher(seed=6)
  lp[0, 0, 4] = -np.inf  # a saved probability of 0
  y[1, 0] = -100
  opts = {"temperature": temperature, "hard_weight": hard_weight}

  def fn(x, w):
    return xentjax.linear_topk_distillation_loss(
      x, w, idx, lp, y, strategy=strategy, **opts, **CHUNKS[strategy]
    )

  ref = dict(opts, topk=(idx, lp), counted=y != -100)
  check_against_reference(fn, ref, x, w, None, None, y)


def test_topk_tied_layout_and_padding():
  x, w, _, _, _y = inputs(seed=7, v=40, w_vd=True)
  idx, lp = topk_teacher(seed=7, k=3, v=33)

  def fn(x, w):
    return xentjax.linear_topk_distillation_loss(
      x, w, idx, lp, w_layout="vd", vocab_size=33, reduction="sum", **CHUNKS["recompute"]
    )

  ref = {"topk": (idx, lp), "w_vd": True, "vocab_size": 33, "reduction": "sum"}
  check_against_reference(fn, ref, x, w, None, None, None)


def test_topk_with_the_whole_vocabulary_is_the_full_kl():
  """k = V with the teacher's exact log-softmax: the two losses agree."""
  x, w, tx, tw, _ = inputs(seed=8)
  lp = jax.nn.log_softmax(jnp.asarray(tx) @ jnp.asarray(tw) / 1.7, axis=-1) * 1.7
  idx = jnp.broadcast_to(jnp.arange(V), (*SHAPE, V))
  full = xentjax.linear_distillation_loss(x, w, tx, tw, temperature=1.7, **CHUNKS["recompute"])
  topk = xentjax.linear_topk_distillation_loss(
    x, w, idx, lp, temperature=1.7, **CHUNKS["recompute"]
  )
  assert_close(topk, full, "top-k with k = V vs full KL", 1e-5)


def test_topk_divergence_is_at_least_minus_log_of_the_covered_mass():
  x, w, _, _, _ = inputs(seed=9)
  idx, lp = topk_teacher(seed=9, k=4)
  per_token = xentjax.linear_topk_distillation_loss(x, w, idx, lp, reduction="none")
  logp = jax.nn.log_softmax(np.asarray(x, np.float64) @ np.asarray(w, np.float64), axis=-1)
  covered = np.exp(np.take_along_axis(np.asarray(logp), idx, -1)).sum(-1)
  assert np.all(np.asarray(per_token) >= -np.log(covered) - 1e-5)


# ----------------------------------------------------------------------------
# Conventions: identical models, the constant teacher, masks, bad values.


def test_identical_teacher_gives_zero_loss_and_gradient():
  x, w, _, _, _ = inputs(seed=10)
  for beta in (0.0, 0.5, 1.0):
    loss, (gx, gw) = jax.value_and_grad(
      lambda x, w, b=beta: xentjax.linear_distillation_loss(x, w, x, w, beta=b, temperature=3.0),
      (0, 1),
    )(x, w)
    assert abs(float(loss)) < 1e-5
    assert float(jnp.max(jnp.abs(gx))) < 1e-5 and float(jnp.max(jnp.abs(gw))) < 1e-5


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_teacher_gets_no_gradient(strategy):
  x, w, tx, tw, _ = inputs(seed=11)
  g = jax.grad(
    lambda tx, tw: xentjax.linear_distillation_loss(x, w, tx, tw, strategy=strategy), (0, 1)
  )(jnp.asarray(tx), jnp.asarray(tw))
  assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in g)


def test_backward_pass_has_no_teacher_cotangent_matmul():
  """fwd+bwd has 2 + 4 matmuls (both heads forward; both recomputed, dx and dw).

  A teacher cotangent would add `d teacher_x` and `d teacher_w` products.
  """
  x, w, tx, tw, _ = inputs(seed=11)
  jaxpr = jax.make_jaxpr(
    jax.value_and_grad(lambda x, w: xentjax.linear_distillation_loss(x, w, tx, tw), (0, 1))
  )(x, w)
  assert str(jaxpr).count("dot_general") == 6


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_nothing_counted_mean_is_nan_with_zero_gradient(strategy):
  x, w, tx, tw, _y = inputs(seed=12)
  fn = lambda x, w, red="mean": xentjax.linear_distillation_loss(
    x, w, tx, tw, np.full(SHAPE, -100), hard_weight=0.5, reduction=red, strategy=strategy
  )
  loss, (gx, gw) = jax.value_and_grad(fn, (0, 1))(x, w)
  assert np.isnan(float(loss))
  assert float(jnp.max(jnp.abs(gx))) == 0.0 and float(jnp.max(jnp.abs(gw))) == 0.0
  assert float(fn(x, w, "sum")) == 0.0


def test_out_of_range_label_is_nan_only_on_its_token():
  x, w, tx, tw, y = inputs(seed=13)
  y[0, 1] = V
  per_token = xentjax.linear_distillation_loss(x, w, tx, tw, y, hard_weight=0.5, reduction="none")
  bad = np.isnan(np.asarray(per_token))
  assert bad[0, 1] and bad.sum() == 1
  gx, gw = jax.grad(
    lambda x, w: xentjax.linear_distillation_loss(x, w, tx, tw, y, hard_weight=0.5), (0, 1)
  )(x, w)
  # NaN in the bad token's row of dx, and everywhere in dw (which sums over tokens).
  assert np.all(np.isnan(np.asarray(gx)) == bad[..., None]) and np.all(np.isnan(np.asarray(gw)))


def test_unsigned_labels_do_not_wrap_around():
  x, w, tx, tw, y = inputs(seed=14)
  per_token = xentjax.linear_distillation_loss(
    x, w, tx, tw, y.astype(np.uint8), hard_weight=0.5, reduction="none"
  )
  assert np.all(np.isfinite(np.asarray(per_token)))  # -100 is not a uint8: nothing ignored


@pytest.mark.parametrize(
  "case", ["index_high", "index_negative", "repeated", "positive", "nan", "all_inf"]
)
def test_bad_topk_teacher_entries_give_nan_on_their_token(case):
  x, w, _, _, _ = inputs(seed=15)
  idx, lp = topk_teacher(seed=15, k=3)
  if case == "index_high":
    idx[1, 2, 0] = V
  elif case == "index_negative":
    idx[1, 2, 1] = -1
  elif case == "repeated":
    idx[1, 2, 2] = idx[1, 2, 0]
  elif case == "positive":
    lp[1, 2, 2] = 0.1
  elif case == "nan":
    lp[1, 2, 0] = np.nan
  else:
    lp[1, 2] = -np.inf
  per_token = np.asarray(xentjax.linear_topk_distillation_loss(x, w, idx, lp, reduction="none"))
  assert np.isnan(per_token[1, 2]) and np.isnan(per_token).sum() == 1
  with pytest.raises(ValueError, match=r"teacher_(indices|logprobs)"):
    xentjax.check_topk_teacher(idx, lp, V)


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_repeated_teacher_index_is_a_bad_token_not_a_negative_divergence(strategy):
  """One class saved twice made D = -log 2 < 0; now that token is NaN.

  Every other token matches the float64 reference, values and gradients; the
  repeated token's gradient is NaN in its row of dx (and in dw, a sum over
  tokens), as for an out-of-range index; masked out, it is 0 and harmless.
  """
  x, w, _, _, _ = inputs(seed=17)
  idx, lp = topk_teacher(seed=17, k=3)
  idx[0, 4, 1] = idx[0, 4, 2]
  bad = np.zeros(SHAPE, bool)
  bad[0, 4] = True
  ok_idx = np.where(bad[..., None], np.arange(3), idx)  # any valid teacher on the bad token
  x2, w2 = np.ones((1, 1, D), np.float32), np.zeros((D, V), np.float32)
  w2[:, 5] = 100.0  # the student puts all its mass on class 5, saved twice
  same = xentjax.linear_topk_distillation_loss(x2, w2, [[[5, 5]]], np.log([[[0.5, 0.5]]]))
  assert np.isnan(float(same))  # was -log 2
  per_token = np.asarray(
    xentjax.linear_topk_distillation_loss(x, w, idx, lp, reduction="none", strategy="recompute")
  )
  assert np.isnan(per_token[0, 4]) and np.isnan(per_token).sum() == 1
  r_out, _, _ = reference(x, w, None, None, topk=(ok_idx, lp), reduction="none", cotangent=bad)
  assert_close(np.where(bad, 0.0, per_token), np.where(bad, 0.0, r_out), "other tokens")

  def fn(x, w, where=None):
    return xentjax.linear_topk_distillation_loss(
      x, w, idx, lp, where=where, reduction="sum", strategy=strategy, **CHUNKS[strategy]
    )

  gx, gw = jax.grad(fn, (0, 1))(x, w)
  assert np.all(np.isnan(np.asarray(gx)) == bad[..., None]) and np.all(np.isnan(np.asarray(gw)))
  check_against_reference(
    lambda x, w: fn(x, w, where=~bad),
    {"topk": (ok_idx, lp), "counted": ~bad, "reduction": "sum"},
    x,
    w,
    None,
    None,
    None,
  )
  with pytest.raises(ValueError, match=r"teacher_indices.*repeats class \d+ in row \(0, 4\)"):
    xentjax.check_topk_teacher(idx, lp, V)


def test_check_topk_teacher_accepts_a_real_top_k_and_rejects_too_much_mass():
  idx, lp = topk_teacher(seed=16, k=4)
  xentjax.check_topk_teacher(idx, lp, V)  # no error
  with pytest.raises(ValueError, match=r"teacher_logprobs.*sums to probability"):
    xentjax.check_topk_teacher(idx, np.full(idx.shape, math.log(0.5), np.float32), V)


# ----------------------------------------------------------------------------
# Bad arguments: errors at trace time naming the argument.


def test_argument_errors():
  x, w, tx, tw, y = inputs()
  L = xentjax.linear_distillation_loss
  with pytest.raises(ValueError, match=r"vocabularies differ.*V=37.*V=36"):
    L(x, w, tx, tw[:, :36])
  for t in (0.0, -1.0, float("inf")):
    with pytest.raises(ValueError, match="temperature"):
      L(x, w, tx, tw, temperature=t)
  for b in (-0.1, 1.5):
    with pytest.raises(ValueError, match="beta"):
      L(x, w, tx, tw, beta=b)
  for a in (-0.1, 1.01):
    with pytest.raises(ValueError, match="hard_weight"):
      L(x, w, tx, tw, y, hard_weight=a)
  with pytest.raises(ValueError, match=r"hard_weight.*labels=None"):
    L(x, w, tx, tw, hard_weight=0.5)
  with pytest.raises(ValueError, match=r"teacher_x.*leading"):
    L(x, w, tx[:1], tw)
  with pytest.raises(ValueError, match="hidden size of `teacher_x` and `teacher_w`"):
    L(x, w, tx, tw[:4])
  with pytest.raises(ValueError, match='teacher_w_layout="vd"'):
    L(x, w, tx, tw.T)
  with pytest.raises(ValueError, match="strategy"):
    L(x, w, tx, tw, strategy="store", reduction="none")
  with pytest.raises(TypeError, match="labels"):
    L(x, w, tx, tw, y.astype(np.float32))
  K = xentjax.linear_topk_distillation_loss
  idx, lp = topk_teacher(k=3)
  with pytest.raises(TypeError, match="teacher_indices"):
    K(x, w, lp, lp)
  with pytest.raises(ValueError, match=r"teacher_indices.*teacher_logprobs"):
    K(x, w, idx, lp[..., :2])
  with pytest.raises(ValueError, match="token shape"):
    K(x, w, idx[:1], lp[:1])
  with pytest.raises(ValueError, match="temperature"):
    K(x, w, idx, lp, temperature=0)


# ----------------------------------------------------------------------------
# Vocabulary parallelism: 8 simulated CPU devices, in one subprocess.

PARALLEL_CHECKS = [
  "recompute_beta_0.0_hlo",
  "recompute_beta_0.4_hlo",
  "recompute_beta_1.0_hlo",
  "store_jsd_hlo",
  "padded_vocabulary",
  "topk_recompute_hlo",
  "topk_store",
  "tvd_recompute_hlo",
  "tvd_store",
  "jsd_scaled_recompute",
  "biases_and_components",
  "none_reduction_sharded_over_data",
  "explicit_shardings_without_mesh_argument",
  "hlo_checker_detects_vocab_gather",
  "errors",
]


def test_parallel_checks():
  """Both heads sharded over the vocabulary on a 2 x 4 mesh = one device, no vocab gather."""
  results = run_checks("_distill_parallel_checks.py", devices=8)
  assert sorted(results) == sorted(PARALLEL_CHECKS)
  failed = {k: v for k, v in results.items() if v != "ok"}
  assert not failed, failed


# ----------------------------------------------------------------------------
# The worked example: `xentjax demo --distill`.


def test_demo_distill_prints_the_comparison(capsys, monkeypatch):
  import re

  from xentjax.cli import _main as _cli
  from xentjax.demos import distill as _demo_distill

  monkeypatch.setattr(_demo_distill, "STEPS", 150)  # the printed table is the same shape
  assert _cli.main(["demo", "--distill"]) == 0
  out = capsys.readouterr().out
  teacher = float(re.search(r"^teacher test accuracy: ([0-9.]+)$", out, re.MULTILINE).group(1))
  alone = float(re.search(r"labels alone: ([0-9.]+)$", out, re.MULTILINE).group(1))
  assert re.search(
    r"^student test accuracy +\| forward KL +\| JSD\(0\.5\) +\| reverse KL$", out, re.MULTILINE
  )
  rows = re.findall(
    r"^distilled, T=(\d+) +\| ([0-9.]+) +\| ([0-9.]+) +\| ([0-9.]+)$", out, re.MULTILINE
  )
  assert [r[0] for r in rows] == ["1", "2", "4"]
  accuracies = [float(a) for r in rows for a in r[1:]]
  assert teacher > 0.93 and 0.5 < alone < teacher
  assert max(accuracies) > alone + 0.02  # the teacher's soft outputs help the student


def test_demo_distill_rejects_other_modes(capsys):
  from xentjax.cli import _main as _cli

  assert _cli.main(["demo", "--distill", "--compare"]) != 0
  assert "--distill" in capsys.readouterr().err
