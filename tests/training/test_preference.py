"""Tests of `xentjax.preference` against TRL 1.16's own loss code, and edge inputs.

TRL's trainers keep their losses in methods (``DPOTrainer._compute_loss``,
``KTOTrainer._compute_loss``, ``CPOTrainer.cpo_loss``,
``ORPOTrainer.odds_ratio_loss``). Building a trainer needs a model and a
dataset, so the tests call the unbound methods with a minimal stand-in
``self`` (the attributes the method reads) and, for the two ``_compute_loss``
methods, a stand-in model whose per-token log-probabilities sum to the given
sequence log-probabilities. Values, gradients (torch autograd against
``jax.grad``) and the logged rewards are compared on the same inputs. TRL is
the test-only extra ``peers``; without it those tests are skipped, and the
float64 transcriptions below (written from the papers and TRL 1.16's
formulas) still run.
"""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

import xentjax
from xentjax import preference as P

DPO_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "apo_zero", "apo_down")
SMOOTHING = {"robust": 0.2, "exo_pair": 0.1}


def pairs(seed=0, b=6):
  """Sequence log-probabilities with margins of both signs (and one exact tie)."""
  rng = np.random.default_rng(seed)
  c = -rng.uniform(5, 40, b)
  r = -rng.uniform(5, 40, b)
  rc = c + rng.normal(0, 3, b)
  rr = r + rng.normal(0, 3, b)
  r[0], rr[0] = c[0], rc[0]  # equal log-ratios, exactly: u = 0
  counts = rng.integers(1, 20, (2, b)).astype(np.float64)
  return c, r, rc, rr, counts


# ---------------------------------------------------------------------------
# float64 references (TRL 1.16's formulas, transcribed), run without TRL.
# ---------------------------------------------------------------------------


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def sigmoid(x):
  return np.exp(log_sigmoid(x))


def dpo_reference(c, r, rc, rr, beta, loss_type, eps):
  dc, dr = c - rc, r - rr
  u = beta * (dc - dr)
  table = {
    "sigmoid": lambda: -log_sigmoid(u),
    "hinge": lambda: np.maximum(0.0, 1.0 - u),
    "ipo": lambda: (dc - dr - 1.0 / (2 * beta)) ** 2,
    "robust": lambda: (-(1 - eps) * log_sigmoid(u) + eps * log_sigmoid(-u)) / (1 - 2 * eps),
    "exo_pair": lambda: (
      sigmoid(u) * (log_sigmoid(u) - np.log1p(-eps)) + sigmoid(-u) * (log_sigmoid(-u) - np.log(eps))
    ),
    "nca_pair": lambda: (
      -log_sigmoid(beta * dc) - 0.5 * log_sigmoid(-beta * dc) - 0.5 * log_sigmoid(-beta * dr)
    ),
    "apo_zero": lambda: 1 - sigmoid(beta * dc) + sigmoid(beta * dr),
    "apo_down": lambda: sigmoid(beta * dc) + 1 - sigmoid(u),
  }
  return table[loss_type]()


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_equals_the_float64_formula(loss_type):
  c, r, rc, rr, _ = pairs(1)
  eps = SMOOTHING.get(loss_type, 0.0)
  got = P.dpo_loss(
    c, r, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=eps, reduction="none"
  )
  want = dpo_reference(c, r, rc, rr, 0.3, loss_type, eps)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  mean = P.dpo_loss(c, r, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=eps)
  total = P.dpo_loss(
    c, r, rc, rr, beta=0.3, loss_type=loss_type, label_smoothing=eps, reduction="sum"
  )
  np.testing.assert_allclose([mean, total], [want.mean(), want.sum()], rtol=2e-5)


def test_reference_free_losses_equal_the_float64_formulas():
  c, r, _, _, n = pairs(2)
  c, r = c / n[0], r / n[1]  # per-token averages
  u = 2.0 * (c - r) - 0.7
  want = -(0.9) * log_sigmoid(u) - 0.1 * log_sigmoid(-u)
  got = P.simpo_loss(c, r, beta=2.0, gamma=0.7, label_smoothing=0.1, reduction="none")
  np.testing.assert_allclose(got, want, rtol=2e-5)
  u = 0.5 * (c - r)
  got = P.cpo_loss(c, r, beta=0.5, label_smoothing=0.2, reduction="none")
  np.testing.assert_allclose(got, -0.8 * log_sigmoid(u) - 0.2 * log_sigmoid(-u), rtol=2e-5)
  log_odds = (c - r) - (np.log(-np.expm1(c)) - np.log(-np.expm1(r)))
  got = P.orpo_loss(c, r, beta=0.25, reduction="none")
  np.testing.assert_allclose(got, -0.25 * log_sigmoid(log_odds), rtol=2e-5)


def test_kto_equals_the_float64_formula():
  lp, _, ref, _, _ = pairs(3, b=7)
  good = np.array([1, 0, 1, 1, 0, 0, 1], bool)
  rho, z = lp - ref, 0.4
  want = np.where(good, 1.5 * (1 - sigmoid(0.2 * (rho - z))), 0.5 * (1 - sigmoid(0.2 * (z - rho))))
  got = P.kto_loss(
    lp, ref, good, kl=z, beta=0.2, desirable_weight=1.5, undesirable_weight=0.5, reduction="none"
  )
  np.testing.assert_allclose(got, want, rtol=2e-5)
  mean = P.kto_loss(lp, ref, good, kl=z, beta=0.2, desirable_weight=1.5, undesirable_weight=0.5)
  np.testing.assert_allclose(mean, want.mean(), rtol=2e-5)  # over all examples, unweighted


# ---------------------------------------------------------------------------
# TRL 1.16's own code.
# ---------------------------------------------------------------------------


def _torch():
  return pytest.importorskip("torch")


def _trl(module):
  pytest.importorskip("trl")
  import importlib

  return importlib.import_module(module)


def _accelerator():
  return types.SimpleNamespace(
    device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t, num_processes=1
  )


def _fake_model(log_probs, torch):
  """A model whose ``fused_lm_head`` output carries the given per-token log-probabilities."""

  def model(**_):
    n, t = log_probs.shape
    return types.SimpleNamespace(
      log_probs=log_probs,
      entropy=torch.zeros(n, t, dtype=log_probs.dtype),
      mean_logits=torch.zeros(n, t, dtype=log_probs.dtype),
      is_top1=torch.zeros(n, t, dtype=torch.bool),
    )

  return model


def _stub(**attrs):
  return types.SimpleNamespace(
    model=types.SimpleNamespace(training=True),
    accelerator=_accelerator(),
    aux_loss_enabled=False,
    _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    _total_train_tokens=0,
    _tp_size=1,
    **attrs,
  )


def trl_dpo(c, r, rc, rr, counts, *, beta, loss_type, label_smoothing):
  """TRL's ``DPOTrainer._compute_loss``: (loss, d/d[c, r, rc, rr], logged metrics)."""
  torch = _torch()
  dpo = _trl("trl.trainer.dpo_trainer")
  f64 = torch.float64
  logps = torch.tensor(np.concatenate([c, r]), dtype=f64, requires_grad=True)
  ref_c = torch.tensor(rc, dtype=f64, requires_grad=True)
  ref_r = torch.tensor(rr, dtype=f64, requires_grad=True)
  n_tok = np.concatenate(counts).astype(int)
  width = int(n_tok.max()) + 1
  mask = torch.tensor((np.arange(width)[None, :] < n_tok[:, None]).astype(np.int64))
  per_token = torch.cat([logps[:, None], torch.zeros(len(n_tok), width - 2, dtype=f64)], 1)
  stub = _stub(
    ld_alpha=None,
    precompute_ref_logps=True,
    f_divergence_type="reverse_kl",
    loss_types=[loss_type],
    loss_weights=[1.0],
    beta=beta,
    label_smoothing=label_smoothing,
    use_weighting=False,
  )
  inputs = {
    "input_ids": torch.zeros(len(n_tok), width, dtype=torch.long),
    "attention_mask": mask,
    "completion_mask": mask,
    "ref_chosen_logps": ref_c,
    "ref_rejected_logps": ref_r,
  }
  loss = dpo.DPOTrainer._compute_loss(stub, _fake_model(per_token, torch), inputs, False)
  loss.backward()
  b = len(c)
  grads = [logps.grad[:b], logps.grad[b:], ref_c.grad, ref_r.grad]
  return float(loss.detach()), [g.numpy() for g in grads], stub._metrics["train"]


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_equals_trl_values_gradients_and_metrics(loss_type):
  c, r, rc, rr, counts = pairs(4)
  eps = SMOOTHING.get(loss_type, 0.0)
  loss, grads, logged = trl_dpo(
    c, r, rc, rr, counts, beta=0.2, loss_type=loss_type, label_smoothing=eps
  )
  # TRL's IPO divides each log-ratio by its completion's token count; xentjax's
  # "ipo" takes those averages as inputs.
  scale = [counts[0], counts[1], counts[0], counts[1]] if loss_type == "ipo" else [1.0] * 4
  args = [a / s for a, s in zip((c, r, rc, rr), scale, strict=True)]

  def f(*a):
    return P.dpo_loss(*a, beta=0.2, loss_type=loss_type, label_smoothing=eps)

  np.testing.assert_allclose(f(*args), loss, rtol=2e-5, atol=1e-7)
  ours = jax.grad(f, argnums=(0, 1, 2, 3))(*(jnp.asarray(a, jnp.float32) for a in args))
  for g, want, s in zip(ours, grads, scale, strict=True):
    np.testing.assert_allclose(np.asarray(g) / s, want, rtol=2e-4, atol=1e-7)
  _, m = P.dpo_loss(*args, beta=0.2, loss_type=loss_type, label_smoothing=eps, return_metrics=True)
  if loss_type != "ipo":  # TRL logs the rewards of the sums
    np.testing.assert_allclose(float(m.chosen_rewards.mean()), logged["rewards/chosen"][-1], 1e-5)
    np.testing.assert_allclose(float(m.margins.mean()), logged["rewards/margins"][-1], 1e-5)
    acc = float(m.accuracies.mean())
    np.testing.assert_allclose(acc, logged["rewards/accuracies"][-1])
    assert 0 < acc < 1  # both outcomes present, so the comparison could fail


def trl_cpo(c, r, *, beta, loss_type, gamma=0.0, label_smoothing=0.0):
  torch = _torch()
  cpo = _trl("trl.experimental.cpo.cpo_trainer")
  tc = torch.tensor(c, dtype=torch.float64, requires_grad=True)
  tr = torch.tensor(r, dtype=torch.float64, requires_grad=True)
  stub = types.SimpleNamespace(
    alpha=0.0,
    beta=beta,
    loss_type=loss_type,
    simpo_gamma=gamma,
    label_smoothing=label_smoothing,
    accelerator=_accelerator(),
  )
  losses, chosen_rewards, rejected_rewards = cpo.CPOTrainer.cpo_loss(stub, tc, tr)
  losses.mean().backward()
  out = (losses, chosen_rewards, rejected_rewards, tc.grad, tr.grad)
  return [t.detach().numpy() for t in out]


@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_simpo_and_cpo_equal_trl(eps):
  c, r, _, _, n = pairs(5)
  c, r = c / n[0], r / n[1]
  want = trl_cpo(c, r, beta=2.0, loss_type="simpo", gamma=0.8, label_smoothing=eps)

  def simpo(a, b):
    return P.simpo_loss(a, b, beta=2.0, gamma=0.8, label_smoothing=eps)

  check_against(simpo, c, r, want)
  want = trl_cpo(c * n[0], r * n[1], beta=0.1, loss_type="sigmoid", label_smoothing=eps)
  check_against(
    lambda a, b: P.cpo_loss(a, b, beta=0.1, label_smoothing=eps), c * n[0], r * n[1], want
  )


def check_against(fn, c, r, want, sign=1.0):
  """``fn`` (a mean) against TRL's per-pair losses, rewards and mean gradients."""
  losses, _, _, gc, gr = want
  np.testing.assert_allclose(fn(c, r), sign * losses.mean(), rtol=2e-5)
  got = jax.grad(fn, argnums=(0, 1))(jnp.asarray(c, jnp.float32), jnp.asarray(r, jnp.float32))
  np.testing.assert_allclose(got[0], sign * gc, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(got[1], sign * gr, rtol=2e-4, atol=1e-7)


def trl_orpo(c, r, *, beta):
  torch = _torch()
  orpo = _trl("trl.experimental.orpo.orpo_trainer")
  tc = torch.tensor(c, dtype=torch.float32, requires_grad=True)
  tr = torch.tensor(r, dtype=torch.float32, requires_grad=True)
  stub = types.SimpleNamespace(beta=beta, accelerator=_accelerator())
  losses, chosen_rewards, rejected_rewards, _, _ = orpo.ORPOTrainer.odds_ratio_loss(stub, tc, tr)
  losses.mean().backward()
  out = (losses, chosen_rewards, rejected_rewards, tc.grad, tr.grad)
  return [t.detach().numpy() for t in out]


def test_orpo_equals_minus_trl_odds_ratio_loss():
  c, r, _, _, n = pairs(6)
  c, r = c / n[0], r / n[1]
  c[1], r[2] = -1e-3, -0.5  # near 0, and on the other side of -log 2
  want = trl_orpo(c, r, beta=0.1)
  # TRL returns beta * log sigmoid(log odds) and subtracts it; xentjax returns the term to add.
  check_against(lambda a, b: P.orpo_loss(a, b, beta=0.1), c, r, want, sign=-1.0)
  _, m = P.orpo_loss(c, r, beta=0.1, return_metrics=True)
  np.testing.assert_allclose(m.chosen_rewards, want[1], rtol=1e-6)
  np.testing.assert_allclose(m.rejected_rewards, want[2], rtol=1e-6)


def trl_kto(lp, ref, good, kl, *, beta, wd, wu):
  """TRL's ``KTOTrainer._compute_loss`` with ``calculate_KL`` and precomputed reference."""
  torch = _torch()
  kto = _trl("trl.trainer.kto_trainer")
  f64 = torch.float64
  logps = torch.tensor(lp, dtype=f64, requires_grad=True)
  b = len(lp)
  stub = _stub(
    calculate_KL=True,
    precompute_ref_logps=True,
    loss_type="kto",
    beta=beta,
    desirable_weight=wd,
    undesirable_weight=wu,
    _compute_kl_logps=lambda model, batch: torch.tensor([kl], dtype=f64),
  )
  inputs = {
    "input_ids": torch.zeros(b, 2, dtype=torch.long),
    "attention_mask": torch.ones(b, 2, dtype=torch.long),
    "completion_mask": torch.ones(b, 2, dtype=torch.long),
    "label": torch.tensor(good),
    "ref_logps": torch.tensor(ref, dtype=f64),
    "ref_KL_logps": torch.zeros(1, dtype=f64),
  }
  loss = kto.KTOTrainer._compute_loss(stub, _fake_model(logps[:, None], torch), inputs, False)
  loss.backward()
  return float(loss.detach()), logps.grad.numpy(), stub._metrics["train"]


@pytest.mark.parametrize("kl", [0.0, 0.7])
def test_kto_equals_trl(kl):
  lp, _, ref, _, _ = pairs(7, b=7)
  good = np.array([1, 0, 1, 1, 0, 0, 1], bool)
  loss, grad, logged = trl_kto(lp, ref, good, kl, beta=0.3, wd=1.3, wu=0.6)

  def f(a):
    return P.kto_loss(a, ref, good, kl=kl, beta=0.3, desirable_weight=1.3, undesirable_weight=0.6)

  np.testing.assert_allclose(f(lp), loss, rtol=2e-5)
  np.testing.assert_allclose(jax.grad(f)(jnp.asarray(lp, jnp.float32)), grad, rtol=2e-4, atol=1e-8)
  _, m = P.kto_loss(lp, ref, good, kl=kl, beta=0.3, return_metrics=True)
  np.testing.assert_allclose(np.nanmean(m.chosen_rewards), logged["rewards/chosen"][-1], 1e-5)
  np.testing.assert_allclose(np.nanmean(m.rejected_rewards), logged["rewards/rejected"][-1], 1e-5)
  np.testing.assert_allclose(m.margin, logged["rewards/margins"][-1], rtol=1e-5)
  assert np.isnan(m.chosen_rewards[~good]).all() and np.isnan(m.rejected_rewards[good]).all()


# ---------------------------------------------------------------------------
# Edges, options and errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_edges_give_numbers(loss_type):
  eps = SMOOTHING.get(loss_type, 0.0)

  def f(c, r, rc, rr):
    return P.dpo_loss(c, r, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=eps)

  # Equal chosen and rejected, log-probabilities at 0, and very negative ones.
  for v in (0.0, -1e4, -3e38):
    a = jnp.full((3,), v, jnp.float32)
    value, grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3))(a, a, a, a)
    want = dpo_reference(*(np.zeros(3),) * 4, 0.1, loss_type, eps).mean()
    np.testing.assert_allclose(value, want, rtol=1e-6)
    assert all(np.isfinite(g).all() for g in grads)


def test_dpo_rewards_and_the_reference_gradient():
  c, r, rc, rr, _ = pairs(8)
  _, m = P.dpo_loss(c, r, rc, rr, beta=0.5, return_metrics=True)
  np.testing.assert_allclose(m.chosen_rewards, 0.5 * (c - rc), rtol=1e-5)
  np.testing.assert_allclose(m.rejected_rewards, 0.5 * (r - rr), rtol=1e-5)
  np.testing.assert_array_equal(m.accuracies, (m.chosen_rewards > m.rejected_rewards).astype(float))
  assert m.accuracies[0] == 0.0  # the exact tie is not an accuracy (strict >)
  # The reference is not detached: its gradient is minus the policy's.
  gc, grc = jax.grad(lambda a, b: P.dpo_loss(a, r, b, rr), argnums=(0, 1))(c, rc)
  np.testing.assert_allclose(grc, -gc, rtol=1e-6)
  assert np.abs(gc).min() > 0


def test_orpo_at_probability_one():
  def f(c, r):
    return P.orpo_loss(c, r, beta=1.0, reduction="none")

  c = jnp.array([0.0, 0.0, -1e4, -5.0, -5.0])
  r = jnp.array([-1.0, 0.0, -1e4 - 1.0, 0.0, -5.0])
  value = f(c, r)
  assert value[0] == 0.0  # infinite chosen odds
  assert np.isnan(value[1])  # both odds infinite: the documented NaN
  np.testing.assert_allclose(value[2], -log_sigmoid(1.0), rtol=1e-5)  # odds ~ probabilities
  assert value[3] == np.inf
  np.testing.assert_allclose(value[4], np.log(2.0), rtol=1e-6)
  gc, gr = jax.grad(lambda a, b: jnp.sum(jnp.where(jnp.isfinite(f(a, b)), f(a, b), 0.0)), (0, 1))(
    c, r
  )
  odds_r = np.exp(-1.0) / -np.expm1(-1.0)
  np.testing.assert_allclose([gc[0], gr[0]], [-odds_r, 0.0], rtol=1e-5)  # loss 0 near r
  assert gc[1] == 0.0 and gr[1] == 0.0
  np.testing.assert_allclose([gc[2], gr[2]], [-sigmoid(-1.0), sigmoid(-1.0)], rtol=1e-5)


def test_orpo_gradient_matches_finite_differences_in_float64():
  with jax.enable_x64(True):
    c = jnp.array([-2e-3, -0.2, -0.69, -0.7, -3.0])  # steps of 1e-4 stay <= 0
    r = jnp.array([-0.3, -2e-3, -2.0, -0.69, -0.01])
    f = lambda a, b: P.orpo_loss(a, b, beta=0.3)
    jtu.check_grads(f, (c, r), order=1, eps=1e-6)  # small steps: curvature ~ 1/c^2


def test_kto_kl_gets_no_gradient_and_empty_batches():
  lp, ref = jnp.array([-3.0, -4.0]), jnp.array([-3.5, -3.0])
  good = jnp.array([True, False])
  g = jax.grad(lambda k: P.kto_loss(lp, ref, good, kl=k))(0.3)
  assert g == 0.0
  empty = jnp.zeros((0,), jnp.float32)
  value, grad = jax.value_and_grad(lambda a: P.kto_loss(a, empty, empty > 0, kl=0.0))(empty)
  assert np.isnan(value) and grad.shape == (0,)
  value = P.dpo_loss(empty, empty, empty, empty)
  assert np.isnan(value)
  _, m = P.kto_loss(lp, ref, jnp.array([True, True]), kl=0.0, return_metrics=True)
  assert np.isnan(m.margin)  # no undesirable example


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"label_smoothing": 0.1}, "enters only loss_type 'robust' and 'exo_pair'"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, "would be ignored"),
    ({"loss_type": "exo_pair"}, "0 < label_smoothing < 1"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing < 0.5"),
    ({"loss_type": "bco"}, "must be one of"),
    ({"beta": 0.0}, "finite number > 0"),
    ({"reduction": "avg"}, "reduction"),
  ],
)
def test_dpo_refuses_options_it_would_ignore(kwargs, match):
  a = jnp.zeros(2)
  with pytest.raises(ValueError, match=match):
    P.dpo_loss(a, a, a, a, **kwargs)


def test_errors_name_the_argument():
  a = jnp.zeros(2)
  with pytest.raises(ValueError, match="`rejected_logps` must have the shape"):
    P.cpo_loss(a, jnp.zeros(3))
  with pytest.raises(TypeError, match="`desirable` must be a boolean"):
    P.kto_loss(a, a, jnp.zeros(2), kl=0.0)
  with pytest.raises(ValueError, match=r"label_smoothing.*\[0, 0.5\)"):
    P.simpo_loss(a, a, label_smoothing=0.5)
  with pytest.raises(TypeError, match="return_metrics"):
    P.orpo_loss(a, a, return_metrics=1)


def test_the_module_is_public():
  assert xentjax.preference is P
  assert "preference" in xentjax.__all__
