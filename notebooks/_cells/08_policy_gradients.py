# %% [markdown]
# # 8. Policy gradients on fused statistics: log-probabilities and entropy without the logits
#
# Reinforcement learning on a language model (REINFORCE, PPO, GRPO) trains the same
# output layer as pre-training, $z = x W / T$ over a vocabulary of $V$ tokens at a
# sampling temperature $T$, but with a different loss. Per token it needs
#
# * $\log \pi(a \mid x) = z_a - \operatorname{LSE}(z)$, the log-probability of the
#   token $a$ that was sampled, and
# * $H(\pi(\cdot \mid x)) = \operatorname{LSE}(z) - \sum_j p_j z_j$, the entropy of the
#   policy (a bonus that keeps exploring, and the first thing to watch in training).
#
# Both are per-token statistics of the softmax: `xentjax.linear_token_stats` computes
# them tile by tile, like the fused cross-entropy of notebook 07, and `jax.grad` of any
# combination of them never forms the $N \times V$ logits. This notebook derives the
# gradients, checks them against the materialized computation, and trains a small
# policy on a contextual bandit with a REINFORCE loss, watching the entropy fall.

# %%
# %matplotlib inline
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import xentjax

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.0, 3.6)})
print("xentjax", xentjax.__version__, "| jax", jax.__version__, "| x64:", jax.config.jax_enable_x64)

# %% [markdown]
# ## The gradients the engine rebuilds
#
# With $p = \operatorname{softmax}(z)$ and $E = \sum_j p_j z_j$,
#
# $$\begin{aligned}
# \frac{\partial \log p_a}{\partial z_k} &= [k = a] - p_k,\\
# \frac{\partial H}{\partial z_k} &= p_k - p_k (1 + z_k - E) = -p_k\,(z_k - E).
# \end{aligned}$$
#
# A loss $L = \sum_i (-A_i \log p_{a_i} - \beta H_i)$ therefore has, per token,
#
# $$\frac{\partial L}{\partial z_k} = A\,(p_k - [k = a]) + \beta\, p_k (z_k - E),$$
#
# which needs only $\operatorname{LSE}$ and $E$ (two numbers per token, kept by the
# forward pass) to be rebuilt one tile of $z$ at a time, multiplied into the gradients
# of $x$ and $W$, and dropped. The temperature contributes a factor $1/T$.
#
# First, the fused statistics against the materialized ones, values and gradients.

# %%
key = jax.random.PRNGKey(0)
kx, kw, ka, kadv = jax.random.split(key, 4)
N, D, V, T = 64, 16, 1000, 0.8
x = jax.random.normal(kx, (N, D))
W = jax.random.normal(kw, (D, V)) / np.sqrt(D)
a = jax.random.randint(ka, (N,), 0, V)
adv = jax.random.normal(kadv, (N,))
beta = 0.05


def pg_fused(x, W):
  s = xentjax.linear_token_stats(x, W, a, temperature=T)
  return jnp.mean(-adv * s.logprob - beta * s.entropy)


def pg_materialized(x, W):
  logp = jax.nn.log_softmax(x @ W / T, axis=-1)
  logprob = jnp.take_along_axis(logp, a[:, None], axis=-1)[:, 0]
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.mean(-adv * logprob - beta * entropy)


(l1, g1), (l2, g2) = (jax.value_and_grad(f, (0, 1))(x, W) for f in (pg_fused, pg_materialized))
err = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(g1, g2))
print(f"loss fused {float(l1):.6f}  materialized {float(l2):.6f}  max |grad diff| {err:.1e}")
assert abs(float(l1) - float(l2)) < 1e-5 and err < 1e-5

# %% [markdown]
# ## A contextual bandit
#
# Each context $x \in \mathbb{R}^{D}$ has one rewarded action among $V$: a hidden
# teacher $W^\star$ picks $a^\star(x) = \arg\max_j x \cdot w^\star_j$, and the reward
# is $r = [a = a^\star(x)]$. The policy $\pi(a \mid x) = \operatorname{softmax}(x W / T)$
# starts uniform (entropy $\log V$); REINFORCE with a mean-reward baseline $b$ follows
#
# $$\nabla J = \mathbb{E}\big[(r - b)\, \nabla \log \pi(a \mid x)\big] + \beta\, \nabla \mathbb{E}[H],$$
#
# the policy-gradient theorem with an entropy bonus (Williams, 1992). Actions are
# sampled by the generator (here a plain `jax.random.categorical` on the small logits);
# the training step sees only the sampled actions and the fused statistics.

# %%
V, D, N = 128, 16, 512
kt, kc = jax.random.split(jax.random.PRNGKey(1))
W_star = jax.random.normal(kt, (D, V))


def contexts(k):
  x = jax.random.normal(k, (N, D))
  return x, jnp.argmax(x @ W_star, axis=-1)  # context, rewarded action


opt = optax.adam(0.1)
beta = 0.02


@jax.jit
def step(W, opt_state, k):
  kx, ks = jax.random.split(k)
  x, best = contexts(kx)
  a = jax.random.categorical(ks, x @ W / T, axis=-1)  # the generator's samples
  r = (a == best).astype(jnp.float32)
  adv = r - jnp.mean(r)

  def loss(W):
    s = xentjax.linear_token_stats(x, W, a, temperature=T)
    return jnp.mean(-adv * s.logprob - beta * s.entropy), s

  (_, s), g = jax.value_and_grad(loss, has_aux=True)(W)
  updates, opt_state = opt.update(g, opt_state)
  return optax.apply_updates(W, updates), opt_state, jnp.mean(r), jnp.mean(s.entropy)


W = jnp.zeros((D, V))
opt_state = opt.init(W)
rewards, entropies = [], []
for k in jax.random.split(kc, 300):
  W, opt_state, r, h = step(W, opt_state, k)
  rewards.append(float(r))
  entropies.append(float(h))
print(
  f"mean reward: first 10 steps {np.mean(rewards[:10]):.3f}, last 10 {np.mean(rewards[-10:]):.3f}"
)
print(
  f"entropy (nats): start {entropies[0]:.3f} (log V = {np.log(V):.3f}), end {entropies[-1]:.3f}"
)
assert abs(entropies[0] - np.log(V)) < 1e-4  # the uniform policy
assert np.mean(rewards[-10:]) > 0.4 and np.mean(rewards[-10:]) > 10 * np.mean(rewards[:10])
assert entropies[-1] < 0.5 * entropies[0]

# %%
fig, ax1 = plt.subplots()
ax1.plot(entropies, color="tab:blue")
ax1.set_xlabel("training step")
ax1.set_ylabel("policy entropy (nats)", color="tab:blue")
ax1.axhline(np.log(V), color="tab:blue", linestyle=":", linewidth=1)
ax2 = ax1.twinx()
ax2.plot(rewards, color="tab:orange", alpha=0.8)
ax2.set_ylabel("mean reward", color="tab:orange")
ax1.set_title("REINFORCE on fused statistics: entropy falls as reward rises")
fig.tight_layout()
plt.show()

# %% [markdown]
# The entropy starts at $\log V$ (the uniform policy), stays high while the rewarded
# actions are still rare, and falls as the policy commits to them; the entropy bonus
# $\beta H$ slows the collapse. In a language model the same two statistics, per
# token, come from `xentjax.linear_token_stats(x, w, sampled_tokens, temperature=T)`
# with `x` the final hidden states and `w` the output embedding: for $V$ = 262,144
# the materialized logits of 8192 tokens would take 8 GiB (16 GiB with their gradient),
# the fused statistics a few tiles. With `mesh=` and `vocab_axis=` the same call runs
# on a vocabulary sharded over devices, and the entropy is combined across shards from
# per-token numbers.

# %% [markdown]
# ## Preference optimization: DPO is cross-entropy on a Bradley-Terry probability
#
# Preference tuning scores whole answers. With the implicit reward
# $r(y) = \beta \log \frac{\pi(y)}{\pi_\mathrm{ref}(y)}$, where
# $\log \pi(y) = \sum_t \log \pi(y_t \mid y_{<t})$ sums the tokens' log-probabilities,
# the Bradley-Terry probability that the chosen answer $y_w$ beats the rejected $y_l$
# is $\sigma(r(y_w) - r(y_l))$, and DPO's loss is the binary cross-entropy of the
# label "$y_w$ was chosen" under it: $-\log \sigma(\beta\,\mathrm{margin})$.
#
# `xentjax.linear_sequence_logprobs` sums the tokens' log-probabilities per sequence
# from the hidden states (sequences packed in one row, marked by segment ids), with
# the fused engine; `xentjax.preference.dpo_loss` is the loss. The gradient of the
# step below goes through the engine's backward pass, and equals the one through
# materialized float64 logits.

# %%
from xentjax import preference

kx, ky, kr = jax.random.split(jax.random.key(7), 3)
n_tok = 30
h = jax.random.normal(kx, (n_tok, D))  # hidden states of one packed row
nxt = jax.random.randint(ky, (n_tok,), 0, V)  # the answers' tokens
seg = jnp.array([0] * 8 + [2] * 7 + [1] * 6 + [3] * 9)  # chosen 0, 1; rejected 2, 3
W_pol = 0.3 * jax.random.normal(kr, (D, V))
W_ref = jnp.zeros((D, V))  # the reference: uniform
ref_sums, counts = xentjax.linear_sequence_logprobs(h, W_ref, nxt, seg, num_segments=4)


def dpo_step(W):
  sums, _ = xentjax.linear_sequence_logprobs(h, W, nxt, seg, num_segments=4)
  return preference.dpo_loss(sums[:2], sums[2:], ref_sums[:2], ref_sums[2:], beta=0.1)


loss, g = jax.value_and_grad(dpo_step)(W_pol)


def dpo_materialized64(W):
  z = jnp.asarray(h, jnp.float64) @ W
  tok = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), nxt[:, None], axis=1)[:, 0]
  ratio = jax.ops.segment_sum(tok, seg, 4) - np.asarray(ref_sums, np.float64)
  margin = ratio[:2] - ratio[2:]
  return jnp.mean(-jax.nn.log_sigmoid(0.1 * margin))  # cross-entropy on sigma(beta margin)


with jax.enable_x64(True):
  loss64, g64 = jax.value_and_grad(dpo_materialized64)(jnp.asarray(W_pol, jnp.float64))
gap = np.max(np.abs(np.asarray(g, np.float64) - np.asarray(g64)))
print(f"DPO loss: fused {float(loss):.6f}, materialized float64 {float(loss64):.6f}")
print(f"max |grad difference|: {gap:.1e}")
assert abs(float(loss) - float(loss64)) < 1e-5 and gap < 1e-5

# %% [markdown]
# The implicit reward is a log-likelihood ratio, so DPO needs nothing but the
# sequences' log-probabilities: the memory of the step is that of the hidden states
# and a few numbers per token, never the $N \times V$ logits
# (`benchmarks/preference.py` measures it).
