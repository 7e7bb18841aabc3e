"""Tests of `xentjax.linear_distillation_loss`'s options.

``divergence="jsd_scaled"`` (the generalized JSD over beta (1 - beta),
continuous at both ends), ``divergence="tvd"`` (the total variation distance,
a kernel of the engine), ``bias``/``teacher_bias`` and
``return_components=True``. The reference materializes both logit arrays in
float64 (under `jax.enable_x64`, whatever the suite's setting), writes each
divergence from `jax.nn.log_softmax`, and takes every gradient (``x``, ``w``,
the student's bias, a traced temperature) by plain autodiff: independent of
the kernels and their custom VJPs. Tiles are small and ragged (token chunk 4,
vocabulary chunk 8, V = 37), so every loop runs full chunks and a tail.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax

SHAPE, D, D_T, V = (2, 7), 5, 6, 37
CHUNKS = {
  "recompute": {"token_chunk_size": 4, "vocab_chunk_size": 8},
  "store": {"token_chunk_size": 4},
}
STRATEGIES = ["recompute", "store"]


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(*SHAPE, D)).astype(np.float32)
  w = (1.5 * rng.normal(size=(D, V))).astype(np.float32)
  tx = rng.normal(size=(*SHAPE, D_T)).astype(np.float32)
  tw = (2.0 * rng.normal(size=(D_T, V))).astype(np.float32)
  y = rng.integers(0, V, SHAPE)
  b = rng.normal(size=(V,)).astype(np.float32)
  tb = (2.0 * rng.normal(size=(V,))).astype(np.float32)
  return x, w, tx, tw, y, b, tb


def divergence64(a, b, divergence, beta):
  """Per-token divergence from student/teacher log-probabilities (float64, plain formulas)."""
  pa, pb = jnp.exp(a), jnp.exp(b)
  if divergence == "tvd":
    return 0.5 * jnp.sum(jnp.abs(pb - pa), -1)
  if beta == 0.0:
    return jnp.sum(pb * (b - a), -1)
  if beta == 1.0:
    return jnp.sum(pa * (a - b), -1)
  lm = jnp.log(beta * pb + (1 - beta) * pa)
  jsd = beta * jnp.sum(pb * (b - lm), -1) + (1 - beta) * jnp.sum(pa * (a - lm), -1)
  return jsd / (beta * (1 - beta)) if divergence == "jsd_scaled" else jsd


def reference(
  x,
  w,
  tx,
  tw,
  labels=None,
  *,
  divergence="jsd",
  beta=0.0,
  temperature=1.0,
  hard_weight=0.0,
  bias=None,
  teacher_bias=None,
  counted=None,
  reduction="mean",
):
  """`(loss, soft, hard, grads)` of the materialized computation in float64.

  `soft` and `hard` are the reduced terms ``T^2 D`` and ``CE``; `grads` holds
  the autodiff gradients of the loss with respect to ``x``, ``w``, ``bias``
  (zeros without one) and the temperature.
  """
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float64))
    c = np.ones(SHAPE, bool) if counted is None else np.asarray(counted)
    n = c.sum() if reduction == "mean" else 1.0
    bias0 = np.zeros(V) if bias is None else bias
    zt = f64(tx) @ f64(tw) + (0.0 if teacher_bias is None else f64(teacher_bias)[None, None])

    def terms(xx, ww, bb, t):
      zs = xx @ ww + bb[None, None]
      a = jax.nn.log_softmax(zs / t, -1)
      soft = t**2 * divergence64(a, jax.nn.log_softmax(zt / t, -1), divergence, beta)
      y = np.clip(np.asarray(labels if labels is not None else np.zeros(SHAPE, int)), 0, V - 1)
      hard = jax.nn.logsumexp(zs, -1) - jnp.take_along_axis(zs, y[..., None], -1)[..., 0]
      red = lambda v: (
        jnp.where(c, v, 0.0) if reduction == "none" else jnp.sum(jnp.where(c, v, 0)) / n
      )
      return red(soft), red(hard)

    def loss(xx, ww, bb, t):
      soft, hard = terms(xx, ww, bb, t)
      out = (1 - hard_weight) * soft + hard_weight * hard
      return jnp.sum(out) if reduction == "none" else out

    args = (f64(x), f64(w), f64(bias0), f64(temperature))
    grads = jax.grad(loss, (0, 1, 2, 3))(*args)
    soft, hard = terms(*args)
    value = (1 - hard_weight) * soft + hard_weight * hard
    grads = tuple(None if g is None else np.asarray(g) for g in grads)
    if bias is None:
      grads = (*grads[:2], None, grads[3])
    return (*(np.asarray(v) for v in (value, soft, hard)), grads)


def assert_close(a, b, what, rtol=3e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
  np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale, err_msg=what)


def fused(x, w, tx, tw, labels=None, *, bias=None, strategy="recompute", **opts):
  """The loss and its gradients with respect to ``x``, ``w`` and ``bias`` (jit)."""
  kw = dict(strategy=strategy, **CHUNKS[strategy], **opts)
  b = jnp.zeros((V,), jnp.float32) if bias is None else jnp.asarray(bias)
  with_bias = bias is not None

  def f(x, w, b):
    return xentjax.linear_distillation_loss(
      x, w, tx, tw, labels, bias=b if with_bias else None, **kw
    )

  loss, grads = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(jnp.asarray(x), jnp.asarray(w), b)
  return loss, grads


def check(ref, loss, grads, rtol=3e-5, what=""):
  r_loss, _, _, r_grads = ref
  assert_close(loss, r_loss, f"loss {what}", rtol)
  for name, g, r in zip(("x", "w", "bias"), grads, r_grads[:3]):
    if r is not None:  # the bias's gradient when the call has one
      assert_close(g, r, f"grad {name} {what}", rtol)


# ----------------------------------------------------------------------------
# divergence="jsd_scaled": continuous in beta.


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("beta", [1e-6, 0.3, 1 - 1e-6])
def test_scaled_jsd_matches_the_reference(beta, strategy):
  x, w, tx, tw, y, _, _ = inputs(seed=1)
  y[0, 1] = -100
  opts = {"divergence": "jsd_scaled", "beta": beta, "temperature": 1.5, "hard_weight": 0.25}
  loss, grads = fused(x, w, tx, tw, y, strategy=strategy, **opts)
  check(reference(x, w, tx, tw, y, counted=y != -100, **opts), loss, grads, what=str(beta))


def first_order_gap(x, w, tx, tw, end):
  """The slope of "jsd_scaled" at an end (float64): mean ``KL - chi^2 / 2`` (see the docstring).

  At 0: ``KL(p_t || p_s) - chi^2(p_t || p_s) / 2``; at 1 the same with the heads swapped.
  """
  zs, zt = np.asarray(x, np.float64) @ w, np.asarray(tx, np.float64) @ tw
  la = zs - np.log(np.exp(zs).sum(-1, keepdims=True))
  lb = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
  if end == 1.0:
    la, lb = lb, la
  pa, pb = np.exp(la), np.exp(lb)
  kl, chi2 = (pb * (lb - la)).sum(-1), ((pb - pa) ** 2 / pa).sum(-1)
  return float(np.mean(kl - chi2 / 2))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scaled_jsd_is_continuous_at_both_ends_and_exact_there(strategy):
  """At beta = 0 and 1 exactly "jsd_scaled" is the forward and reverse KL, and tends to them.

  Near an end it moves from the KL with the slope of the docstring's
  expansion, ``KL - chi^2 / 2`` (on moderate logits: where the student gives
  a tiny probability to a class the teacher likes, chi^2 is large and the
  approach slow). Plain "jsd" near 0 is about beta times the forward KL:
  the jump "jsd_scaled" avoids.
  """
  x, w, tx, tw, _, _, _ = inputs(seed=2)
  x, tx = 0.1 * x, 0.1 * tx  # logits well below unit scale: chi^2 is moderate
  opts = {"divergence": "jsd_scaled"}
  for end, sign in ((0.0, 1.0), (1.0, -1.0)):
    exact, g_exact = fused(x, w, tx, tw, beta=end, strategy=strategy, **opts)
    check(reference(x, w, tx, tw, beta=end, **opts), exact, g_exact, what=f"beta={end}")
    kl, _ = fused(x, w, tx, tw, beta=end, strategy=strategy)
    assert float(exact) == float(kl)  # "jsd_scaled" at the ends is the KL, bit for bit
    slope, grad_gaps = first_order_gap(x, w, tx, tw, end), []
    for eps in (1e-3, 1e-4):
      near, g_near = fused(x, w, tx, tw, beta=end + sign * eps, strategy=strategy, **opts)
      np.testing.assert_allclose((float(near) - float(exact)) / eps, slope, rtol=0.05)
      grad_gaps.append(max(float(jnp.max(jnp.abs(g - r))) for g, r in zip(g_near, g_exact)))
    assert 8 < grad_gaps[0] / grad_gaps[1] < 12, grad_gaps  # the gradients: O(beta) too
  plain, _ = fused(x, w, tx, tw, beta=1e-6, strategy=strategy)
  kl, _ = fused(x, w, tx, tw, beta=0.0, strategy=strategy)
  assert 0.0 < float(plain) < 1e-4 * float(kl)


def test_scaled_jsd_of_a_traced_temperature_has_the_reference_gradient():
  x, w, tx, tw, y, _, _ = inputs(seed=3)
  opts = {"divergence": "jsd_scaled", "beta": 0.2, "hard_weight": 0.3}
  f = lambda t: xentjax.linear_distillation_loss(
    x, w, tx, tw, y, temperature=t, **opts, **CHUNKS["recompute"]
  )
  dt = jax.jit(jax.grad(f))(jnp.float32(1.7))
  r = reference(x, w, tx, tw, y, temperature=1.7, **opts)
  assert_close(dt, r[3][3], "d loss / d temperature", 1e-4)


# ----------------------------------------------------------------------------
# divergence="tvd": the total variation distance as a kernel.


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("temperature", "hard_weight"), [(1.0, 0.0), (2.5, 0.4)])
def test_tvd_matches_the_reference(temperature, hard_weight, strategy):
  x, w, tx, tw, y, _, _ = inputs(seed=4)
  y[1, :2] = -100
  where = (np.arange(14).reshape(SHAPE) % 5) != 3
  counted = (y != -100) & where
  opts = {"divergence": "tvd", "temperature": temperature, "hard_weight": hard_weight}
  loss, grads = fused(x, w, tx, tw, y, where=where, strategy=strategy, **opts)
  check(reference(x, w, tx, tw, y, counted=counted, **opts), loss, grads)


def test_tvd_per_token_bounds_identical_models_and_traced_temperature():
  x, w, tx, tw, _, _, _ = inputs(seed=5)
  f = lambda x, w, tx, tw, **kw: xentjax.linear_distillation_loss(
    x, w, tx, tw, divergence="tvd", **kw, **CHUNKS["recompute"]
  )
  per_token = np.asarray(f(x, w, tx, tw, reduction="none"))
  assert per_token.shape == SHAPE and np.all((per_token > 0) & (per_token <= 1))
  loss, (gx, gw) = jax.value_and_grad(lambda x, w: f(x, w, x, w), (0, 1))(x, w)
  assert float(loss) == 0.0  # sign(0) = 0: the subgradient at p_t = p_s is 0
  assert float(jnp.max(jnp.abs(gx))) == 0.0 and float(jnp.max(jnp.abs(gw))) == 0.0
  dt = jax.grad(lambda t: f(x, w, tx, tw, temperature=t))(jnp.float32(0.8))
  assert_close(dt, reference(x, w, tx, tw, divergence="tvd", temperature=0.8)[3][3], "dT", 1e-4)


# ----------------------------------------------------------------------------
# bias and teacher_bias.


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("divergence", ["jsd", "jsd_scaled", "tvd"])
def test_student_and_teacher_bias(divergence, strategy):
  x, w, tx, tw, y, b, tb = inputs(seed=6)
  b[3] = -np.inf  # a masked class of the student (the teacher keeps it: forward KL is inf)
  b = b if divergence == "tvd" else np.where(np.isinf(b), -30.0, b).astype(np.float32)
  beta = 0.0 if divergence == "tvd" else 0.4
  opts = {"divergence": divergence, "beta": beta, "temperature": 1.3, "hard_weight": 0.2}

  def f(x, w, b, tb):
    return xentjax.linear_distillation_loss(
      x, w, tx, tw, y, bias=b, teacher_bias=tb, strategy=strategy, **opts, **CHUNKS[strategy]
    )

  args = [jnp.asarray(a) for a in (x, w, b, tb)]
  loss, grads = jax.jit(jax.value_and_grad(f, (0, 1, 2, 3)))(*args)
  ref = reference(x, w, tx, tw, y, bias=b, teacher_bias=tb, **opts)
  check(ref, loss, grads[:3])
  assert float(jnp.max(jnp.abs(grads[3]))) == 0.0  # the teacher's bias is a constant
  without, _ = fused(x, w, tx, tw, y, strategy=strategy, **opts)
  assert abs(float(without) - float(loss)) > 1e-3  # the biases were used


# ----------------------------------------------------------------------------
# return_components=True.


@pytest.mark.parametrize(
  ("reduction", "strategy"),  # "store" needs a scalar loss
  [
    ("mean", "recompute"),
    ("mean", "store"),
    ("sum", "recompute"),
    ("sum", "store"),
    ("none", "recompute"),
  ],
)
def test_components_are_the_soft_and_hard_terms(reduction, strategy):
  x, w, tx, tw, y, _, _ = inputs(seed=7)
  y[0, 3] = -100
  opts = {"beta": 0.5, "temperature": 2.0, "hard_weight": 0.3, "reduction": reduction}
  loss, comp = jax.jit(
    lambda x, w: xentjax.linear_distillation_loss(
      x, w, tx, tw, y, return_components=True, strategy=strategy, **opts, **CHUNKS[strategy]
    )
  )(x, w)
  assert isinstance(comp, xentjax.DistillationComponents)
  r_loss, r_soft, r_hard, _ = reference(x, w, tx, tw, y, counted=y != -100, **opts)
  assert_close(loss, r_loss, "loss")
  assert_close(comp.soft, r_soft, "soft")
  assert_close(comp.hard, r_hard, "hard")
  assert comp.soft.shape == comp.hard.shape == np.shape(r_loss)
  assert_close(loss, 0.7 * comp.soft + 0.3 * comp.hard, "loss = mix of the components", 1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_components_at_zero_hard_weight_without_labels_and_without_gradient(strategy):
  x, w, tx, tw, y, _, _ = inputs(seed=8)
  kw = dict(return_components=True, strategy=strategy, **CHUNKS[strategy])
  loss, comp = xentjax.linear_distillation_loss(x, w, tx, tw, y, divergence="tvd", **kw)
  _, r_soft, r_hard, _ = reference(x, w, tx, tw, y, divergence="tvd")
  assert_close(loss, r_soft, "loss = soft at hard_weight 0")
  assert_close(comp.soft, r_soft, "soft")
  assert_close(comp.hard, r_hard, "hard: the labels' cross-entropy, for monitoring")
  loss, comp = xentjax.linear_distillation_loss(x, w, tx, tw, **kw)
  assert comp.hard is None
  assert_close(comp.soft, loss, "soft = loss without labels", 1e-6)
  grad_soft = jax.grad(
    lambda w: xentjax.linear_distillation_loss(x, w, tx, tw, y, hard_weight=0.5, **kw)[1].soft
  )(jnp.asarray(w))
  assert float(jnp.max(jnp.abs(grad_soft))) == 0.0  # components are values, not losses
  plain = xentjax.linear_distillation_loss(x, w, tx, tw, y, hard_weight=0.5, strategy=strategy)
  with_components, _ = xentjax.linear_distillation_loss(x, w, tx, tw, y, hard_weight=0.5, **kw)
  assert_close(with_components, plain, "the loss with its components", 1e-6)


# ----------------------------------------------------------------------------
# Argument errors.


def test_argument_errors_name_the_option():
  x, w, tx, tw, _, b, _ = inputs()
  L = xentjax.linear_distillation_loss
  with pytest.raises(ValueError, match=r"divergence.*'jsd', 'jsd_scaled', 'tvd'.*'kl'"):
    L(x, w, tx, tw, divergence="kl")
  with pytest.raises(ValueError, match=r'beta.*divergence="tvd".*beta=0'):
    L(x, w, tx, tw, divergence="tvd", beta=0.5)
  with pytest.raises(ValueError, match=r"`bias` must have shape \(37,\)"):
    L(x, w, tx, tw, bias=b[:5])
  with pytest.raises(ValueError, match=r"`teacher_bias` must have shape \(37,\).*teacher_w"):
    L(x, w, tx, tw, teacher_bias=b[:5])
  with pytest.raises(TypeError, match="teacher_bias"):
    L(x, w, tx, tw, teacher_bias=np.arange(V))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_components_share_the_loss_denominator(strategy):
  """With `denominator=` (gradient accumulation) both terms are divided by it too."""
  x, w, tx, tw, y, _, _ = inputs(seed=9)
  y[1, 2] = -100
  counted = y != -100
  kw = dict(beta=0.3, hard_weight=0.4, strategy=strategy, **CHUNKS[strategy])
  loss, comp = xentjax.linear_distillation_loss(
    x, w, tx, tw, y, denominator=40.0, return_components=True, **kw
  )
  r_loss, r_soft, r_hard, _ = reference(x, w, tx, tw, y, counted=counted, beta=0.3, hard_weight=0.4)
  scale = counted.sum() / 40.0  # the reference's mean divides by the count
  assert_close(loss, r_loss * scale, "loss / denominator")
  assert_close(comp.soft, r_soft * scale, "soft / denominator")
  assert_close(comp.hard, r_hard * scale, "hard / denominator")
