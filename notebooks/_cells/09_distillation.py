# %% [markdown]
# # 9. Distillation: learning from a teacher's whole distribution
#
# A trained **teacher** model gives, for every input, a full probability
# distribution over the classes, not just the right answer. Knowledge
# distillation (Hinton, Vinyals & Dean, 2015) trains a smaller **student** to match
# that distribution. With student logits $z_s$, teacher logits $z_t$ and a
# temperature $T$,
#
# $$\begin{aligned}
# p_s &= \operatorname{softmax}(z_s / T),\\
# p_t &= \operatorname{softmax}(z_t / T),\\
# \ell &= T^2\, \mathrm{KL}(p_t \,\|\, p_s)\\
#   &= T^2 \sum_j p_{t,j} \log\frac{p_{t,j}}{p_{s,j}} .
# \end{aligned}$$
#
# A higher temperature flattens both distributions, so the small probabilities the
# teacher gives to the *wrong* classes ("this 7 looks a bit like a 1") carry more
# weight; the factor $T^2$ keeps the gradient's size independent of $T$. Other
# divergences are in use: the reverse $\mathrm{KL}(p_s\|p_t)$ (mode seeking) and the
# generalized Jensen–Shannon divergence
# $\beta\,\mathrm{KL}(p_t\|m) + (1-\beta)\,\mathrm{KL}(p_s\|m)$ with
# $m = \beta p_t + (1-\beta) p_s$.
#
# For a language model both logit arrays are `[tokens, vocabulary]`: at 8192 tokens
# and 262,144 words each is 8 GiB in float32. `xentjax.linear_distillation_loss`
# takes the two models' last hidden states and output matrices instead and never
# forms either array. This notebook checks it against the materialized computation,
# derives the one-pass trick it uses, measures its memory, and then distills a
# teacher into a student on the shipped digits.

# %%
# %matplotlib inline
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import xentjax
from xentjax.demos import distill as distill_demo

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7.0, 3.6)})
print("xentjax", xentjax.__version__, "| jax", jax.__version__, "| backend:", jax.default_backend())

# %% [markdown]
# ## The fused loss equals the materialized one
#
# Student hidden states $x$ (`[N, D]`) and head $W$ (`[D, V]`), teacher hidden states
# $x_t$ (`[N, D_t]`) and head $W_t$ (`[D_t, V]`); the hidden sizes may differ. The
# reference builds both logit arrays and uses `jax.nn.log_softmax`.

# %%
rng = np.random.default_rng(0)
N, D, D_T, V = 64, 16, 24, 300
x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
w = jnp.asarray(rng.normal(size=(D, V)) / 2, jnp.float32)
tx = jnp.asarray(rng.normal(size=(N, D_T)), jnp.float32)
tw = jnp.asarray(rng.normal(size=(D_T, V)) / 2, jnp.float32)


def materialized(x, w, beta, T):
  a = jax.nn.log_softmax(x @ w / T)
  b = jax.nn.log_softmax(jax.lax.stop_gradient(tx @ tw) / T)
  pa, pb = jnp.exp(a), jnp.exp(b)
  if beta == 0.0:
    d = jnp.sum(pb * (b - a), -1)
  elif beta == 1.0:
    d = jnp.sum(pa * (a - b), -1)
  else:
    lm = jnp.log(beta * pb + (1 - beta) * pa)
    d = beta * jnp.sum(pb * (b - lm), -1) + (1 - beta) * jnp.sum(pa * (a - lm), -1)
  return T**2 * jnp.mean(d)


for beta, T in ((0.0, 1.0), (0.5, 3.0), (1.0, 2.0)):
  fused = lambda x, w, b=beta, t=T: xentjax.linear_distillation_loss(
    x, w, tx, tw, beta=b, temperature=t, vocab_chunk_size=128
  )
  v1, g1 = jax.value_and_grad(fused, (0, 1))(x, w)
  v2, g2 = jax.value_and_grad(lambda x, w, b=beta, t=T: materialized(x, w, b, t), (0, 1))(x, w)
  err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g1, g2))
  print(
    f"beta={beta:3.1f} T={T:g}: fused {float(v1):.6f}  materialized {float(v2):.6f}  "
    f"max |grad difference| {err:.1e}"
  )
  assert abs(float(v1) - float(v2)) <= 1e-5 * max(1.0, abs(float(v2))) and err < 1e-5

# %% [markdown]
# ## One pass over the vocabulary for the forward KL
#
# Write $a = z_s/T$, $b = z_t/T$ and $\operatorname{lse}(b) = \log\sum_j e^{b_j}$. Then
# $\log p_t - \log p_s = (b - \operatorname{lse} b) - (a - \operatorname{lse} a)$, so
#
# $$\begin{aligned}
# \mathrm{KL}(p_t\|p_s) &= \frac{\sum_j e^{b_j - m}\,(b_j - a_j)}{\sum_j e^{b_j - m}}\\
#   &\quad - \operatorname{lse}(b) + \operatorname{lse}(a)
# \end{aligned}$$
#
# for any shift $m$. Streaming over tiles of columns, keep the running maximum $m$ of
# $b$, the running sum $s = \sum e^{b_j - m}$ and the running weighted sum
# $u = \sum e^{b_j - m}(b_j - a_j)$; when a tile raises the maximum to $m'$, both $s$ and
# $u$ are multiplied by $e^{m - m'}$. Together with the online log-sum-exp of $a$, that is
# five numbers per token, whatever $V$ is. The gradient with respect to $a$ is
# $p_s - p_t$, which the backward pass rebuilds tile by tile from the two saved
# log-normalizers. (The Jensen–Shannon mixture $\log m$ needs both normalizers before
# it can be formed, so it takes a statistics pass first.)


# %%
def streaming_kl(a, b, tile):
  """Forward KL per row, one tile of columns at a time (numpy, float64)."""
  n = a.shape[0]
  m_b = np.full(n, -np.inf)
  s_b = np.zeros(n)
  u = np.zeros(n)
  m_a = np.full(n, -np.inf)
  s_a = np.zeros(n)
  for start in range(0, a.shape[1], tile):
    at, bt = a[:, start : start + tile], b[:, start : start + tile]
    new_b = np.maximum(m_b, bt.max(1))
    e = np.exp(bt - new_b[:, None])
    scale = np.exp(m_b - new_b)
    s_b, u = s_b * scale + e.sum(1), u * scale + (e * (bt - at)).sum(1)
    new_a = np.maximum(m_a, at.max(1))
    s_a = s_a * np.exp(m_a - new_a) + np.exp(at - new_a[:, None]).sum(1)
    m_a, m_b = new_a, new_b
  return u / s_b - (m_b + np.log(s_b)) + (m_a + np.log(s_a))


a64 = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
b64 = np.asarray(tx, np.float64) @ np.asarray(tw, np.float64)
la = (
  a64
  - np.log(np.exp(a64 - a64.max(1, keepdims=True)).sum(1, keepdims=True))
  - a64.max(1, keepdims=True)
)
lb = (
  b64
  - np.log(np.exp(b64 - b64.max(1, keepdims=True)).sum(1, keepdims=True))
  - b64.max(1, keepdims=True)
)
direct = (np.exp(lb) * (lb - la)).sum(1)
for tile in (7, 64, 300):
  gap = np.max(np.abs(streaming_kl(a64, b64, tile) - direct))
  print(f"tile {tile:3d}: max |streaming - direct| = {gap:.1e}")
  assert gap < 1e-10

# %% [markdown]
# ## Memory at language-model size, without allocating anything
#
# XLA reports the temporary memory of a compiled program. Compiling
# `jax.value_and_grad` of both versions for abstract arrays
# (`jax.ShapeDtypeStruct`) at $N = 8192$ tokens, $D = D_t = 2048$ and
# $V = 262{,}144$ allocates nothing:

# %%
S = jax.ShapeDtypeStruct
N_, D_, V_ = 8192, 2048, 262144
args = (
  S((N_, D_), jnp.float32),
  S((D_, V_), jnp.float32),
  S((N_, D_), jnp.float32),
  S((D_, V_), jnp.float32),
)


def big_materialized(x, w, tx, tw):
  a = jax.nn.log_softmax(x @ w)
  b = jax.nn.log_softmax(jax.lax.stop_gradient(tx @ tw))
  return jnp.mean(jnp.sum(jnp.exp(b) * (b - a), -1))


def temp_gib(loss):
  compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2**30


mem_mat = temp_gib(big_materialized)
mem_fused = temp_gib(xentjax.linear_distillation_loss)
print(
  f"materialized: {mem_mat:8.2f} GiB\nfused:        {mem_fused:8.3f} GiB "
  f"({100 * mem_fused / mem_mat:.2f}% of it)"
)
assert mem_fused < 0.01 * mem_mat

# %% [markdown]
# ## Distilling on the digits
#
# The teacher is an MLP with 128 ReLU features, trained on all 1,347 labelled
# training digits. The student has 12 tanh features — about a tenth of the
# parameters — and, to make the teacher's help visible, sees the **labels of only
# 10%** of the training digits. Trained on those labels alone it overfits them.
# Distilled, it sees no labels at all, only the teacher's output distribution on all
# training inputs (a *transfer set*), at temperatures $T \in \{1, 4\}$ and for the
# three divergences. In both models the last layer is the fused head: the hidden
# features (with a constant 1 for the bias) are `x` and the output matrix is `w`.
# The training code is `xentjax/demos/distill.py`; `xentjax demo --distill` prints the
# same comparison on a larger grid.

# %%
results = distill_demo.compare(temperatures=(1.0, 4.0), betas=(0.0, 0.5, 1.0), steps=200)
print(
  f"teacher: {results['teacher']:.4f}   student on {results['n_labelled']} labels: "
  f"{results['labels_only']:.4f}"
)
print(distill_demo.table(results))
print(f"({results['seconds']:.1f} s)")

# %%
fig, ax = plt.subplots()
temps = sorted({t for t, _ in results["distilled"]})
betas = sorted({b for _, b in results["distilled"]})
width = 0.8 / len(betas)
for i, b in enumerate(betas):
  xs = np.arange(len(temps)) + (i - (len(betas) - 1) / 2) * width
  ax.bar(
    xs,
    [results["distilled"][(t, b)] for t in temps],
    width,
    label=f"distilled, {distill_demo.BETA_NAMES[b]}",
  )
ax.axhline(results["teacher"], color="black", linestyle="--", label="teacher (128 features)")
ax.axhline(
  results["labels_only"],
  color="tab:red",
  linestyle=":",
  label=f"student on {results['n_labelled']} labels",
)
ax.set(
  xticks=np.arange(len(temps)),
  xticklabels=[f"T = {t:g}" for t in temps],
  ylabel="test accuracy",
  ylim=(0.8, 1.0),
  title="12-feature student on the 8x8 digits",
)
ax.legend(loc="lower right", fontsize=8)
plt.show()

best = max(results["distilled"].values())
assert results["teacher"] > 0.93
assert best > results["labels_only"] + 0.02, (best, results["labels_only"])

# %% [markdown]
# Every distilled student beats the one trained on the labels it had, and comes
# within a couple of points of the teacher with a tenth of its width. On this small,
# clean problem the choice of divergence and temperature matters little; the
# teacher's soft outputs on unlabelled inputs are what helps.
#
# ## When the teacher was saved as its top-k
#
# Offline distillation often stores only the teacher's $k$ most likely tokens and
# their log-probabilities. `xentjax.linear_topk_distillation_loss` renormalizes them,
# $\hat p_t \propto e^{\ell_i / T}$ over the $k$ saved tokens, and computes
# $T^2 \sum_i \hat p_{t,i}(\log \hat p_{t,i} - \log p_{s,j_i})$ with the student's exact
# full-vocabulary $\log p_s$. With $k = V$ it is the full KL:

# %%
logp_t = jax.nn.log_softmax(tx @ tw, axis=-1)
idx = jnp.broadcast_to(jnp.arange(V), (N, V))
full_kl = xentjax.linear_distillation_loss(x, w, tx, tw)
topk_all = xentjax.linear_topk_distillation_loss(x, w, idx, logp_t)
top8_idx = jnp.argsort(-logp_t, axis=-1)[:, :8]
top8 = xentjax.linear_topk_distillation_loss(
  x, w, top8_idx, jnp.take_along_axis(logp_t, top8_idx, -1)
)
print(
  f"full KL {float(full_kl):.6f} | top-k with k = V {float(topk_all):.6f} | top-8 {float(top8):.6f}"
)
assert abs(float(full_kl) - float(topk_all)) < 1e-4
