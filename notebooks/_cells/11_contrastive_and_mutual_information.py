# %% [markdown]
# # 11. Contrastive learning and the mutual information it estimates
#
# CLIP, SigLIP and SimCLR learn from **pairs**: an image and its caption, or two views
# of one image. For a batch of $B$ pairs with embeddings $a_i$ and $b_i$, the logits
# are the scaled similarities $z_{ij} = s\, a_i \cdot b_j$, and each row is a
# classification problem whose right answer is the diagonal:
#
# $$L_{a \to b} = \frac{1}{B}\sum_i \Big(\log \sum_j e^{z_{ij}} - z_{ii}\Big), \qquad
# L_{\text{CLIP}} = \tfrac12 \big(L_{a\to b} + L_{b\to a}\big).$$
#
# This is cross-entropy with $B$ classes, and it is also the **InfoNCE** estimator
# of mutual information (van den Oord et al., 2018; Poole et al., 2019):
#
# $$I(A; B) \;\ge\; \log B - L_{a\to b}.$$
#
# The bound can never exceed $\log B$ (the loss is never negative): to certify
# $I$ nats a batch needs at least $e^I$ pairs (McAllester & Stratos, 2020). Large
# batches are why contrastive models work, and the $[B, B]$ matrix of logits is what
# limits them: 16 GiB in float32 at $B = 65{,}536$. `xentjax.contrastive_loss`
# never forms it. This notebook checks it against the materialized loss, measures
# its memory, shows the $\log B$ ceiling on Gaussians whose mutual information is
# known exactly, and trains a CLIP-style model on the shipped digits.

# %%
# %matplotlib inline
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import xentjax
from xentjax.demos import contrastive as contrastive_demo

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (7.0, 3.6)})
print("xentjax", xentjax.__version__, "| jax", jax.__version__, "| backend:", jax.default_backend())

# %% [markdown]
# ## The tiled loss equals the materialized one
#
# The reference builds $z = s\, a b^\top$ and applies optax's cross-entropy to its
# rows and to its columns. The tiled loss sweeps $[\text{rows} \times \text{columns}]$
# tiles once, keeping a running log-sum-exp for every row **and** every column, so both
# directions come from one pass; its backward pass recomputes each tile. The scale $s$
# is an ordinary differentiable argument (CLIP learns $s = e^t$).

# %%
rng = np.random.default_rng(0)
B, D = 300, 16
a = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
b = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)


def materialized(a, b, s):
  z = s * a @ b.T
  y = jnp.arange(a.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (ce(z, y).mean() + ce(z.T, y).mean())


def tiled(a, b, s):
  return xentjax.contrastive_loss(a, b, scale=s, row_chunk_size=64, column_chunk_size=96)


(l_ref, g_ref) = jax.value_and_grad(materialized, (0, 1, 2))(a, b, 0.7)
(l_new, g_new) = jax.value_and_grad(tiled, (0, 1, 2))(a, b, 0.7)
print(f"loss: materialized {float(l_ref):.6f}, tiled {float(l_new):.6f}")
for name, x, y in zip(("a", "b", "scale"), g_ref, g_new):
  print(f"max |grad {name} difference| = {float(jnp.max(jnp.abs(x - y))):.2e}")
  assert jnp.allclose(x, y, atol=1e-5)
assert abs(float(l_ref - l_new)) < 1e-5

# %% [markdown]
# ## Memory
#
# The compiled program's temporary memory (`memory_analysis()`: nothing is allocated)
# of the loss and its gradient in $a$, $b$ and $s$. The materialized loss keeps
# several $[B, B]$ arrays alive; the tiled one keeps $O(B \cdot D)$ plus one tile.
# `benchmarks/contrastive.py` measures the same at $B = 65{,}536$, $D = 768$.


# %%
def temp_mib(loss, n, d):
  x, s = jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)
  f = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
  return f.lower(x, x, s).compile().memory_analysis().temp_size_in_bytes / 2**20


def fused(a, b, s):
  return xentjax.contrastive_loss(a, b, scale=s)


for n in (16384,):
  m, f = temp_mib(materialized, n, 256), temp_mib(fused, n, 256)
  print(f"B={n:6d}, D=256: materialized {m:9.1f} MiB, xentjax {f:6.1f} MiB ({100 * f / m:.2f}%)")
assert f < 0.02 * m

# %% [markdown]
# ## Gaussians with known mutual information
#
# Let $x \sim \mathcal N(0, I_d)$ and $y_k = \rho\, x_k + \sqrt{1-\rho^2}\,\epsilon_k$
# with independent noise $\epsilon \sim \mathcal N(0, I_d)$. Each coordinate pair is a
# bivariate Gaussian with correlation $\rho$, so
#
# $$I(X; Y) = -\tfrac12 \sum_{k=1}^{d} \log(1-\rho^2).$$
#
# A small separable critic $f(x, y) = g(x) \cdot h(y)$ (two MLPs) is trained with
# `contrastive_loss(g(x), h(y), symmetric=False)` at batch size $B$, and the bound
# $\log B - L$ is then averaged over fresh batches. One critic per
# $(\rho, B)$; the four correlations are trained at once with `jax.vmap`.

# %%
DIM, HIDDEN, EMB = 4, 64, 32
RHOS = np.array([0.5, 0.8, 0.95, 0.99])
BATCHES = (8, 32, 128, 512)
TRUE_MI = -0.5 * DIM * np.log(1 - RHOS.astype(np.float64) ** 2)
print("true I(X;Y) in nats:", np.round(TRUE_MI, 2))


def sample(key, n, rho):
  kx, ke = jax.random.split(key)
  x = jax.random.normal(kx, (n, DIM))
  return x, rho * x + jnp.sqrt(1 - rho**2) * jax.random.normal(ke, (n, DIM))


def init_critic(key):
  def mlp(k):
    k1, k2 = jax.random.split(k)
    return {
      "w1": jax.random.normal(k1, (DIM, HIDDEN)) / 2,
      "b1": jnp.zeros((HIDDEN,)),
      "w2": jax.random.normal(k2, (HIDDEN, EMB)) / 8,
    }

  kg, kh = jax.random.split(key)
  return {"g": mlp(kg), "h": mlp(kh)}


def encode(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"]


def infonce(p, x, y):
  return xentjax.contrastive_loss(encode(p["g"], x), encode(p["h"], y), symmetric=False)


def bound_after_training(rho, batch, steps=300):
  opt = optax.adam(3e-3)

  def step(carry, key):
    p, state = carry
    grads = jax.grad(infonce)(p, *sample(key, batch, rho))
    updates, state = opt.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), None

  p = init_critic(jax.random.key(0))
  (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(jax.random.key(1), steps))
  keys = jax.random.split(jax.random.key(2), 32)  # fresh batches for the estimate
  loss = jnp.mean(jax.vmap(lambda k: infonce(p, *sample(k, batch, rho)))(keys))
  return xentjax.info.infonce_lower_bound(loss, batch)


bounds = {}
for batch in BATCHES:
  train = jax.jit(jax.vmap(lambda r, batch=batch: bound_after_training(r, batch)))
  bounds[batch] = np.asarray(train(RHOS))
  print(f"B={batch:4d} (log B = {math.log(batch):.2f}): bounds {np.round(bounds[batch], 2)}")

# %%
fig, ax = plt.subplots()
ax.plot(TRUE_MI, TRUE_MI, "k--", label="truth")
for batch in BATCHES:
  (line,) = ax.plot(TRUE_MI, bounds[batch], "o-", label=f"B = {batch}")
  ax.axhline(math.log(batch), color=line.get_color(), lw=0.8, ls=":")
ax.set_xlabel("true mutual information (nats)")
ax.set_ylabel("InfoNCE bound log B - L (nats)")
ax.set_title("The bound follows the truth until log B (dotted) stops it")
ax.legend()
plt.show()

# %% [markdown]
# Every estimate lies below the truth **and** below $\log B$. With a small mutual
# information the largest batch recovers most of it; with a large one, each batch size
# stalls under its own ceiling, however good the critic: a larger batch is the only way
# to measure more.

# %%
for batch in BATCHES:
  assert np.all(bounds[batch] <= math.log(batch) + 1e-6)  # the ceiling
  assert np.all(bounds[batch] <= TRUE_MI + 0.1)  # a lower bound (up to sampling noise)
assert bounds[512][0] > 0.8 * TRUE_MI[0]  # nearly tight where I << log B
largest = np.array([bounds[batch][-1] for batch in BATCHES])
assert np.all(np.diff(largest) > 0.5)  # I = 7.8 nats: each larger batch certifies more
print("bound at I = 7.83 nats, by batch size:", np.round(largest, 2))

# %% [markdown]
# ## A CLIP-style model on the digits
#
# Each 8×8 digit is cut into two views, its top half and its bottom half. Two
# encoders (32 → 64 → 16, unit-norm outputs) learn to match a top half to its own
# bottom half among a batch of 256 others, with a learned scale $s = e^t$ (CLIP's
# inverse temperature). `xentjax.contrastive_loss(..., retrieval_k=(1, 5))` also
# returns the retrieval accuracy, from the same sweep: how often a top half finds its
# own bottom half (and back) among all 450 held-out digits, where chance is $1/450$.
# The same experiment runs as `xentjax demo --contrastive`.

# %%
run = contrastive_demo.train(steps=600, log_every=50)
hist = run["history"]
steps = [h["step"] for h in hist]
print(contrastive_demo.table(hist))

fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
axes[0].plot(steps, [h["loss"] for h in hist], label="training loss")
axes[0].plot(steps, [h["bound"] for h in hist], label="bound log B - L")
axes[0].axhline(math.log(256), color="gray", ls=":", label="log 256")
axes[0].set_xlabel("step")
axes[0].set_ylabel("nats")
axes[0].legend()
axes[1].plot(steps, [h["scale"] for h in hist])
axes[1].set_xlabel("step")
axes[1].set_title("learned scale exp(t)")
for key, label in (
  ("test_top1_a_to_b", "top-1 top→bottom"),
  ("test_top1_b_to_a", "top-1 bottom→top"),
):
  axes[2].plot(steps, [h[key] for h in hist], label=label)
axes[2].plot(steps, [h["test_top5_a_to_b"] for h in hist], label="top-5 top→bottom")
axes[2].set_xlabel("step")
axes[2].set_title("test retrieval (450 digits)")
axes[2].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The loss falls, the scale grows (the model grows more confident as its embeddings
# separate), and the bound rises to several bits: the two halves of a digit share
# information, and the encoders found some of it. Retrieval among 450 test digits is
# far above chance; confusions are mostly digits whose halves look alike.

# %%
last = hist[-1]
assert all(h["bound"] <= math.log(256) + 1e-6 for h in hist)
assert last["loss"] < 0.5 * hist[0]["loss"] and last["scale"] > hist[0]["scale"]
assert last["bound_bits"] > 4.0
assert last["test_top1_a_to_b"] > 0.1 and last["test_top1_b_to_a"] > 0.1  # chance: 0.002
print(f"final bound: {last['bound_bits']:.2f} bits; test top-1: {last['test_top1_a_to_b']:.3f}")

# %% [markdown]
# ## Summary
#
# * Contrastive losses are cross-entropy over a similarity matrix;
#   `xentjax.contrastive_loss` computes both directions in one tiled sweep and never
#   forms the matrix (`xentjax.sigmoid_contrastive_loss` does the same for SigLIP,
#   `xentjax.ntxent` for SimCLR; with `mesh=` the batch is sharded around a ring of
#   devices).
# * $\log B - L$ is a lower bound on mutual information that cannot pass $\log B$:
#   `xentjax.info.infonce_lower_bound`.
