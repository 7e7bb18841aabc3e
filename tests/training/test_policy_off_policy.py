"""GSPO, CISPO, ``delta``, truncated importance sampling and packed rows of
`xentjax.policy.policy_gradient_loss`, against TRL 1.16's ``GRPOTrainer._compute_loss``
(called unbound with a stand-in ``self``, as in ``tests/training/test_preference.py``) and
against float64 transcriptions of the papers' formulas.
"""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xentjax import policy

B, T = 5, 6


def data(seed=0):
  rng = np.random.default_rng(seed)
  lp = np.log(rng.uniform(0.05, 0.95, (B, T)))
  old = lp + rng.normal(0, 0.4, (B, T))  # ratios on both sides of every clip edge
  ref = lp + rng.normal(0, 0.3, (B, T))
  behavior = old + rng.normal(0, 0.5, (B, T))
  adv = rng.normal(size=B)
  mask = rng.uniform(size=(B, T)) < 0.7
  mask[:, 0] = True  # every sequence has a token (TRL's "grpo" mean counts empty ones too)
  return lp, old, ref, behavior, adv, mask


def trl_grpo(
  lp,
  adv,
  mask,
  *,
  old=None,
  ref=None,
  beta=0.0,
  loss_type="grpo",
  level="token",
  eps=0.2,
  eps_high=0.2,
  delta=None,
  is_ratio=None,
):
  """TRL's ``GRPOTrainer._compute_loss``: (loss, d loss / d logprobs)."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("trl")
  from trl.trainer.grpo_trainer import GRPOTrainer

  f64 = torch.float64
  t_lp = torch.tensor(lp, dtype=f64, requires_grad=True)
  m = torch.tensor(mask, dtype=f64)
  stub = types.SimpleNamespace(
    _get_per_token_logps_and_entropies=lambda *a, **k: (t_lp, torch.zeros_like(t_lp), None),
    top_entropy_quantile=1.0,
    off_policy_mask_threshold=None,
    importance_sampling_level=level,
    beta=beta,
    args=types.SimpleNamespace(use_bias_correction_kl=False, delta=delta, steps_per_generation=1),
    loss_type=loss_type,
    epsilon_low=eps,
    epsilon_high=eps_high,
    use_vllm=is_ratio is not None,
    vllm_importance_sampling_correction=is_ratio is not None,
    model=types.SimpleNamespace(training=True),
    current_gradient_accumulation_steps=1,
    max_completion_length=lp.shape[1],
    _entropy_bonus_enabled=False,
    aux_loss_enabled=False,
    accelerator=types.SimpleNamespace(
      reduce=lambda t, reduction="sum": t, gather=lambda t: t, num_processes=1
    ),
    _metrics={"train": collections.defaultdict(list)},
  )
  inputs = {
    "prompt_ids": torch.zeros(len(lp), 1, dtype=torch.long),
    "prompt_mask": torch.ones(len(lp), 1, dtype=f64),
    "completion_ids": torch.zeros(lp.shape, dtype=torch.long),
    "completion_mask": m,
    "advantages": torch.tensor(adv, dtype=f64),
    "num_items_in_batch": m.sum(),
  }
  if old is not None:
    inputs["old_per_token_logps"] = torch.tensor(old, dtype=f64)
  if ref is not None:
    inputs["ref_per_token_logps"] = torch.tensor(ref, dtype=f64)
  if is_ratio is not None:
    inputs["importance_sampling_ratio"] = torch.tensor(is_ratio, dtype=f64)
  loss = GRPOTrainer._compute_loss(stub, None, inputs)
  loss.backward()
  return float(loss.detach()), t_lp.grad.numpy()


def ours(lp, adv, mask, **kw):
  f = lambda a: policy.policy_gradient_loss(a, adv, mask, **kw)
  value, grad = jax.value_and_grad(f)(jnp.asarray(lp, jnp.float32))
  return float(value), np.asarray(grad)


CASES = {
  "grpo, token ratios, KL": (
    {"loss_type": "grpo", "beta": 0.05},
    {"normalization": "sequence", "kl_coef": 0.05},
  ),
  "grpo with delta": (
    {"loss_type": "grpo", "delta": 1.2},
    {"normalization": "sequence", "delta": 1.2},
  ),
  "gspo (sequence ratios), KL": (
    {"loss_type": "grpo", "level": "sequence", "beta": 0.05, "eps": 3e-4, "eps_high": 4e-4},
    {
      "normalization": "sequence",
      "importance_sampling_level": "sequence",
      "kl_coef": 0.05,
      "epsilon": 3e-4,
      "epsilon_high": 4e-4,
    },
  ),
  "gspo, wide clip": (
    {"loss_type": "grpo", "level": "sequence"},
    {"normalization": "sequence", "importance_sampling_level": "sequence"},
  ),
  "cispo": (
    {"loss_type": "cispo", "eps_high": 1.3},
    {"normalization": "token", "clip_mode": "cispo", "epsilon_high": 0.3},
  ),
  "cispo, sequence ratios, KL": (
    {"loss_type": "cispo", "eps_high": 1.1, "level": "sequence", "beta": 0.1},
    {
      "normalization": "token",
      "clip_mode": "cispo",
      "epsilon_high": 0.1,
      "importance_sampling_level": "sequence",
      "kl_coef": 0.1,
    },
  ),
  "dr_grpo": (
    {"loss_type": "dr_grpo", "eps_high": 0.28},
    {"normalization": "constant", "epsilon_high": 0.28},
  ),
  "dapo with delta": (
    {"loss_type": "dapo", "eps_high": 0.28, "delta": 1.1},
    {"normalization": "token", "epsilon_high": 0.28, "delta": 1.1},
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_trl_grpo_loss(name):
  lp, old, ref, _, adv, mask = data(1)
  trl_kw, our_kw = CASES[name]
  uses_ref = "kl_coef" in our_kw
  want = trl_grpo(lp, adv, mask, old=old, ref=ref if uses_ref else None, **trl_kw)
  got = ours(lp, adv, mask, old_logprobs=old, ref_logprobs=ref if uses_ref else None, **our_kw)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(got[1], want[1], rtol=2e-4, atol=1e-7)
  assert np.abs(want[1]).max() > 0


@pytest.mark.parametrize(
  "mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
)
def test_truncated_importance_sampling_equals_trl(mode):
  lp, old, ref, behavior, adv, mask = data(2)
  cap = 1.4
  # TRL's ratio (from `_generate_and_score_completions`), transcribed in float64.
  diff = (old - behavior) * mask
  diff = diff.sum(-1, keepdims=True) if mode.startswith("sequence") else diff
  rho = np.exp(diff)
  rho = np.minimum(rho, cap) if mode.endswith("truncate") else np.where(rho > cap, 0.0, rho)
  assert 0 < (rho == cap).mean() < 1 or 0 < (rho == 0).mean() < 1  # the cap acts somewhere
  want = trl_grpo(lp, adv, mask, old=old, ref=ref, beta=0.05, loss_type="bnpo", is_ratio=rho)
  got = ours(
    lp,
    adv,
    mask,
    old_logprobs=old,
    ref_logprobs=ref,
    kl_coef=0.05,
    behavior_logprobs=behavior,
    importance_cap=cap,
    importance_mode=mode,
    normalization="token",
  )
  np.testing.assert_allclose(got[0], want[0], rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(got[1], want[1], rtol=2e-4, atol=1e-7)


# ---------------------------------------------------------------------------
# float64 transcriptions of the papers' formulas.
# ---------------------------------------------------------------------------


def gspo_reference(lp, old, adv, mask, eps, eps_high):
  """GSPO (Zheng et al., 2025, eq. 5-7): per-sequence ratio, clipped, mean over sequences."""
  n = mask.sum(1)
  s = np.exp(((lp - old) * mask).sum(1) / n)
  per_seq = -np.minimum(s * adv, np.clip(s, 1 - eps, 1 + eps_high) * adv)
  # d/d lp_t of s_i = s_i / |o_i| on the unclipped branch, 0 on the clipped one.
  takes_unclipped = s * adv <= np.clip(s, 1 - eps, 1 + eps_high) * adv
  g_seq = np.where(takes_unclipped, -adv * s, 0.0)
  grad = (g_seq / n)[:, None] * mask / len(lp)
  return per_seq.mean(), grad


def test_gspo_equals_the_paper_in_float64():
  lp, old, _, _, adv, mask = data(3)
  want = gspo_reference(lp, old, adv, mask, 0.05, 0.08)
  got = ours(
    lp,
    adv,
    mask,
    old_logprobs=old,
    importance_sampling_level="sequence",
    epsilon=0.05,
    epsilon_high=0.08,
  )
  np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=2e-4, atol=1e-8)


def test_cispo_weight_is_detached_and_capped_in_float64():
  lp, old, _, _, adv, mask = data(4)
  r = np.exp(lp - old)
  w = np.minimum(r, 1.5)
  a = adv[:, None]
  want = (-(w * a * lp) * mask).sum() / mask.sum()
  grad = -(w * a) * mask / mask.sum()  # no gradient through the weight
  got = ours(
    lp, adv, mask, old_logprobs=old, clip_mode="cispo", epsilon_high=0.5, normalization="token"
  )
  np.testing.assert_allclose(got[0], want, rtol=2e-5)
  np.testing.assert_allclose(got[1], grad, rtol=2e-4, atol=1e-8)
  assert (r > 1.5).any() and (r < 0.5).any()  # capped above, never clipped below


def test_delta_caps_only_the_unclipped_term_in_float64():
  lp, old, _, _, adv, mask = data(5)
  r = np.exp(lp - old)
  a = adv[:, None]
  per = -np.minimum(np.minimum(r, 1.1) * a, np.clip(r, 0.8, 1.2) * a)
  want = (per * mask).sum() / mask.sum()
  got = ours(lp, adv, mask, old_logprobs=old, delta=1.1, normalization="token")
  np.testing.assert_allclose(got[0], want, rtol=2e-5)
  plain = ours(lp, adv, mask, old_logprobs=old, normalization="token")
  assert abs(plain[0] - got[0]) > 1e-4  # delta acts on these ratios


# ---------------------------------------------------------------------------
# Packed rows.
# ---------------------------------------------------------------------------


def packed(lp, old, ref, behavior, mask):
  """The B rows of `data` packed into 2 rows of 3T tokens, sequences interleaved."""
  order = np.random.default_rng(7).permutation(B * T)
  seg = np.repeat(np.arange(B), T)[order]
  seg = np.where(mask.reshape(-1)[order], seg, -1)  # masked tokens become padding
  pad = np.full(6 * T - B * T, -1)
  flat = [
    np.concatenate([a.reshape(-1)[order], np.zeros(len(pad))]).reshape(2, 3 * T)
    for a in (lp, old, ref, behavior)
  ]
  return flat, np.concatenate([seg, pad]).reshape(2, 3 * T)


@pytest.mark.parametrize(
  "kw",
  [
    {"normalization": "sequence", "importance_sampling_level": "sequence", "kl_coef": 0.1},
    {"normalization": "token", "clip_mode": "cispo", "epsilon_high": 0.4},
    {"normalization": "constant", "max_length": T, "kl_coef": 0.1},
    {"normalization": "token", "importance_cap": 1.3, "importance_mode": "sequence_mask"},
  ],
)
def test_packed_rows_equal_one_row_per_sequence(kw):
  lp, old, ref, behavior, adv, mask = data(6)
  mask[2] = False  # an empty sequence
  extra = {"ref_logprobs": ref} if "kl_coef" in kw else {}
  extra_b = {"behavior_logprobs": behavior} if "importance_cap" in kw else {}
  want = ours(lp, adv, mask, old_logprobs=old, **extra, **extra_b, **kw)
  (plp, pold, pref, pbeh), seg = packed(lp, old, ref, behavior, mask)
  extra = {"ref_logprobs": pref} if "kl_coef" in kw else {}
  extra_b = {"behavior_logprobs": pbeh} if "importance_cap" in kw else {}
  got = ours(
    plp, adv, None, old_logprobs=pold, segment_ids=seg, num_segments=B, **extra, **extra_b, **kw
  )
  np.testing.assert_allclose(got[0], want[0], rtol=2e-5)
  order = np.random.default_rng(7).permutation(B * T)
  back = np.zeros(B * T)
  back[order] = got[1].reshape(-1)[: B * T]
  np.testing.assert_allclose(back.reshape(B, T), want[1], rtol=2e-4, atol=1e-8)
  assert not got[1].reshape(-1)[B * T :].any()  # padding gets no gradient


def test_bad_combinations_are_refused():
  lp, _, _, behavior, adv, mask = data(0)
  f = policy.policy_gradient_loss
  with pytest.raises(ValueError, match="`delta` caps PPO's unclipped ratio"):
    f(lp, adv, mask, clip_mode="cispo", delta=2.0)
  with pytest.raises(ValueError, match="`importance_cap` truncates"):
    f(lp, adv, mask, importance_cap=2.0)
  with pytest.raises(ValueError, match="both `segment_ids` and `num_segments`"):
    f(lp, adv, mask, num_segments=3)
  with pytest.raises(ValueError, match="needs `max_length`"):
    f(lp, adv, segment_ids=np.zeros((B, T), int), num_segments=B, normalization="constant")
  with pytest.raises(ValueError, match=r"`advantages` must be \[num_segments\]"):
    f(lp, adv, segment_ids=np.zeros((B, T), int), num_segments=B + 1)
  with pytest.raises(ValueError, match="importance_sampling_level"):
    f(lp, adv, importance_sampling_level="seq")
  with pytest.raises(ValueError, match="clip_mode"):
    f(lp, adv, clip_mode="clip")
  with pytest.raises(ValueError, match="importance_mode"):
    f(lp, adv, behavior_logprobs=behavior, importance_mode="truncate")
  with pytest.raises(ValueError, match="`behavior_logprobs` must have the shape"):
    f(lp, adv, behavior_logprobs=behavior[:, :2])
