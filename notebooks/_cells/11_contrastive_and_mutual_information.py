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
# known exactly, trains a CLIP-style model on the shipped digits, and compares InfoNCE
# with the NWJ, DV and JS bounds, with the optimal critic and with trained ones.

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
# Each 8×8 digit is cut into two views, its top half (rows 0–3) and its bottom half
# (rows 4–7). Two encoders, one per view (32 → 64 tanh → 16, unit-norm outputs), learn
# to match a top half to its own bottom half among a batch of 256, with a learned
# scale $s = e^t$ (CLIP's inverse temperature, starting at $s = 10$). The loss is the
# symmetric InfoNCE loss above, `xentjax.contrastive_loss(a, b, scale=exp(t))`, and
# $t$ is trained with the encoders. The same model and loop run as
# `xentjax demo --contrastive` (`xentjax.demos.contrastive`); a check below keeps the
# two the same.

# %%
from xentjax import datasets

x_train, y_train, x_test, y_test = datasets.load_digits()  # [n, 64] pixels in [0, 1]
WIDTH, EMBEDDING, BATCH = 64, 16, 256


def init(key):
  def encoder(k):
    k1, k2 = jax.random.split(k)
    return {
      "w1": jax.random.normal(k1, (32, WIDTH)) / math.sqrt(32),
      "b1": jnp.zeros((WIDTH,)),
      "w2": jax.random.normal(k2, (WIDTH, EMBEDDING)) / math.sqrt(WIDTH),
    }

  ka, kb = jax.random.split(key)
  return {"top": encoder(ka), "bottom": encoder(kb), "t": jnp.log(jnp.float32(10.0))}


def embed(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"][None, :]) @ p["w2"]
  return h / jnp.linalg.norm(h, axis=1, keepdims=True)


def views(p, x):
  """Embeddings [n, 16] of the top halves (pixels 0-31) and of the bottom halves (32-63)."""
  return embed(p["top"], x[:, :32]), embed(p["bottom"], x[:, 32:])


def clip_loss(p, x):
  return xentjax.contrastive_loss(*views(p, x), scale=jnp.exp(p["t"]))


# %% [markdown]
# The training loop: Adam on the encoders and $t$, a fresh batch of 256 training
# digits per step. At each logged step it records the batch's loss, the scale, the
# bound $\log B - L$, and the retrieval accuracy on the 450 test digits taken as one
# batch: `retrieval_k=(1, 5)` returns, from the same sweep as the loss, how often a top
# half ranks its own bottom half first (or among the first 5), and back. Chance is
# $1/450$.


# %%
opt = optax.adam(3e-3)


@jax.jit
def step(p, state, x):
  loss, grads = jax.value_and_grad(clip_loss)(p, x)
  updates, state = opt.update(grads, state, p)
  return optax.apply_updates(p, updates), state, loss


def on_test(p):
  a, b = views(p, x_test)
  loss, acc = xentjax.contrastive_loss(a, b, scale=math.exp(float(p["t"])), retrieval_k=(1, 5))
  bound = float(xentjax.info.infonce_lower_bound(loss, len(x_test)))
  return {"test_loss": float(loss), "test_bound": bound} | {
    f"test_top{k}_{way}": float(getattr(acc, way)[j])
    for j, k in enumerate((1, 5))
    for way in ("a_to_b", "b_to_a")
  }


def train(steps=600, log_every=50, seed=0):
  params = init(jax.random.key(seed))
  state, rng, history = opt.init(params), np.random.default_rng(seed), []
  for i in range(1, steps + 1):
    batch = x_train[rng.choice(len(x_train), size=BATCH, replace=False)]
    params, state, loss = step(params, state, jnp.asarray(batch))
    if i % log_every == 0 or i == 1:
      bound = float(xentjax.info.infonce_lower_bound(loss, BATCH))
      scale = float(jnp.exp(params["t"]))
      entry = {"step": i, "loss": float(loss), "scale": scale, "bound": bound}
      history.append(entry | {"bound_bits": bound / math.log(2)} | on_test(params))
  return params, history


params, hist = train()
print(contrastive_demo.table(hist))

# `xentjax demo --contrastive` trains with xentjax.demos.contrastive: the same numbers.
demo = contrastive_demo.train(steps=20, log_every=10)["history"]
for ours, theirs in zip(train(steps=20, log_every=10)[1], demo, strict=True):
  assert ours.keys() == theirs.keys()
  for key, value in theirs.items():
    assert math.isclose(ours[key], value, rel_tol=1e-5, abs_tol=1e-6), (key, ours[key], value)

# %%
steps = [h["step"] for h in hist]
fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
axes[0].plot(steps, [h["loss"] for h in hist], label="training loss")
axes[0].plot(steps, [h["bound"] for h in hist], label="bound log B - L")
axes[0].axhline(math.log(256), color="gray", ls=":", label="log 256")
axes[0].axhline(0, color="black", lw=0.6)
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
# far above chance.
#
# **The negative bound at step 1.** Mutual information is never negative, yet the
# first row reads $-1.69$ bits. The bound is not wrong but **vacuous**: $\log B - L \le
# I$ holds for every critic, and once the loss exceeds $\log B$ it only says that $I$ is
# at least a negative number. Where the excess comes from, for one direction, with
# $\bar z_i = \frac1B \sum_j z_{ij}$ the mean logit of row $i$:
#
# $$L_{a\to b} - \log B = \frac1B \sum_i \Big(\underbrace{\log \tfrac1B
# \textstyle\sum_j e^{z_{ij}} - \bar z_i}_{\text{spread} \;\ge\; 0} \;-\;
# \underbrace{(z_{ii} - \bar z_i)}_{\text{advantage}}\Big).$$
#
# The spread term is never negative (Jensen's inequality) and is zero only for a flat
# row; the advantage is how far the right pair's logit stands above its row's mean.
# An indifferent critic ($s \to 0$) has loss exactly $\log B$ and bound 0. The
# untrained encoders at $s = 10$ spread their logits but barely favour the right pair,
# so the spread outweighs the advantage and the loss lies above $\log B$. The cell
# below computes both terms for the untrained model. Training builds the advantage and
# brings the loss below $\log B$ within the first 50 steps; from then on the bound
# certifies something.

# %%
untrained = init(jax.random.key(0))
a0, b0 = views(untrained, x_train[:BATCH])
print(f"log B = {math.log(BATCH):.4f} nats; untrained encoders, one direction (top -> bottom):")
for s in (1e-3, 1.0, 10.0):
  z = s * np.asarray(a0 @ b0.T, np.float64)  # materialized only to take the loss apart
  spread = np.mean(np.log(np.mean(np.exp(z), axis=1)) - z.mean(axis=1))  # |z| <= 10
  advantage = np.mean(np.diag(z) - z.mean(axis=1))
  loss = float(xentjax.contrastive_loss(a0, b0, scale=s, symmetric=False))
  bits = float(xentjax.info.infonce_lower_bound(loss, BATCH)) / math.log(2)
  print(
    f"  scale {s:5g}: loss {loss:.4f} = log B + spread {spread:.4f} - advantage "
    f"{advantage:.4f}; bound {bits:+.3f} bits"
  )
  assert abs(loss - (math.log(BATCH) + spread - advantage)) < 1e-4 and spread >= 0
assert spread > advantage > 0  # at s = 10: a little advantage, a lot of spread
assert hist[0]["loss"] > math.log(BATCH) and hist[0]["bound"] < 0  # vacuous at step 1
assert all(h["bound"] > 0 for h in hist[1:])  # informative from step 50 on

# %% [markdown]
# **What the model confuses.** Below, the first eight test digits whose top half picked
# someone else's bottom half: the query (top half), the bottom half it belongs to, and
# the bottom half it picked, with their classes. Most picked bottom halves come from a
# digit of the same class, and they resemble the right one: the model matches shapes,
# and where two digits' bottom halves look alike, a top half cannot tell them apart.
# The cell counts this over all the confusions: how often the class is the same, and
# how far, in pixels, the picked bottom half lies from the right one.

# %%
a, b = views(params, x_test)
picked = np.asarray(jnp.argmax(a @ b.T, axis=1))  # the bottom half each top half ranks first
wrong = np.flatnonzero(picked != np.arange(len(x_test)))

shown = wrong[:8]
fig, axes = plt.subplots(3, len(shown), figsize=(9, 2.2), gridspec_kw={"hspace": 0.1})
rows = (
  ("top half", x_test[shown, :32]),
  ("its bottom", x_test[shown, 32:]),
  ("picked", x_test[picked[shown], 32:]),
)
for r, (name, images) in enumerate(rows):
  for c, image in enumerate(images):
    axes[r, c].imshow(image.reshape(4, 8), cmap="gray_r", vmin=0, vmax=1)
    axes[r, c].set_xticks([])
    axes[r, c].set_yticks([])
  axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center")
for c, i in enumerate(shown):
  axes[0, c].set_title(f"{y_test[i]} → {y_test[picked[i]]}", fontsize=10)
plt.show()

bottoms = x_test[:, 32:]
same_class = np.mean(y_test[picked[wrong]] == y_test[wrong])
to_picked = np.linalg.norm(bottoms[picked[wrong]] - bottoms[wrong], axis=1)
to_other = np.linalg.norm(np.roll(bottoms, 1, axis=0) - bottoms, axis=1)  # another digit's
print(f"{len(wrong)} of {len(x_test)} top halves pick another digit's bottom half")
print(f"the picked one is of the same class in {100 * same_class:.0f}% of them (chance ~10%)")
print(
  f"pixel distance to the right bottom half: picked {np.median(to_picked):.2f}, "
  f"another test digit's {np.median(to_other):.2f} (medians)"
)
assert abs(1 - len(wrong) / len(x_test) - hist[-1]["test_top1_a_to_b"]) < 1.5 / len(x_test)
assert same_class > 0.5 and np.median(to_picked) < 0.75 * np.median(to_other)

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

# %% [markdown]
# ## Four bounds on the same Gaussians: bias against variance
#
# InfoNCE is one of a family of variational bounds (Poole et al., 2019). For a critic
# $f$ with scores $S_{ij} = f(x_i, y_j)$ and
# $L_{\text{off}} = \log \frac{1}{B(B-1)} \sum_{i \ne j} e^{S_{ij}}$:
#
# $$I_{\text{NWJ}} = \tfrac1B \textstyle\sum_i S_{ii} - e^{L_{\text{off}} - 1}, \qquad
# I_{\text{DV}} = \tfrac1B \textstyle\sum_i S_{ii} - L_{\text{off}},$$
#
# and the Jensen–Shannon estimator of Deep InfoMax,
# $-\frac1B\sum_i \operatorname{softplus}(-S_{ii}) - \frac{1}{B(B-1)}\sum_{i\ne j}
# \operatorname{softplus}(S_{ij}) \le 0$, which trains critics but is not in nats of
# information. To see the bounds' own bias and variance, apart from how well a critic
# was trained, take the **optimal critic**, known in closed form for these Gaussians:
#
# $$f^*(x, y) = \log \frac{p(y \mid x)}{p(y)}
#   = I + \frac{\rho}{1-\rho^2}\, x \cdot y - \frac{\rho^2}{2(1-\rho^2)}\big(|x|^2 + |y|^2\big).$$
#
# It is a dot product of two embeddings,
# $u(x) = \big(\tfrac{\rho}{1-\rho^2} x,\; I - \tfrac{\rho^2}{2(1-\rho^2)}|x|^2,\; 1\big)$
# and $v(y) = \big(y,\; 1,\; -\tfrac{\rho^2}{2(1-\rho^2)}|y|^2\big)$, so
# `xentjax.info.mutual_information_bounds(u, v)` evaluates all four bounds in one sweep,
# without the $[B, B]$ matrix. NWJ's optimal critic is $1 + f^*$ (`bias=1.0`). Each
# estimate is repeated on 16 fresh batches per batch size.

# %%
SIZES = (16, 64, 256, 1024)
REPEATS = 16
KINDS = ("InfoNCE", "NWJ", "DV", "JS")


def optimal_embeddings(x, y, rho):
  k, q = rho / (1 - rho**2), rho**2 / (2 * (1 - rho**2))
  mi = -0.5 * DIM * jnp.log(1 - rho**2)
  ones = jnp.ones((x.shape[0], 1))
  u = jnp.concatenate([k * x, (mi - q * jnp.sum(x**2, axis=1))[:, None], ones], axis=1)
  v = jnp.concatenate([y, ones, (-q * jnp.sum(y**2, axis=1))[:, None]], axis=1)
  return u, v


def four_estimates(key, n, rho):
  u, v = optimal_embeddings(*sample(key, n, rho), rho)
  at_f = xentjax.info.mutual_information_bounds(u, v)
  nwj = xentjax.info.mutual_information_bounds(u, v, bias=1.0).nwj  # critic 1 + f*
  return jnp.stack([at_f.infonce, nwj, at_f.dv, at_f.js])


estimates = {}  # batch size -> [rho, repeat, kind]
for n in SIZES:
  run = jax.jit(jax.vmap(jax.vmap(lambda k, r, n=n: four_estimates(k, n, r), (0, None)), (None, 0)))
  estimates[n] = np.asarray(run(jax.random.split(jax.random.key(n), REPEATS), RHOS))
  mean, std = estimates[n].mean(axis=1), estimates[n].std(axis=1)
  print(
    f"B={n:5d}: "
    + "  ".join(f"{k} {m[-1]:6.2f} ± {s[-1]:4.2f}" for k, m, s in zip(KINDS, mean.T, std.T))
    + f"   (I = {TRUE_MI[-1]:.2f})"
  )

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for j, kind in enumerate(KINDS[:3]):
  axes[0].plot(TRUE_MI, estimates[256][:, :, j].mean(axis=1), "o-", label=kind)
axes[0].plot(TRUE_MI, TRUE_MI, "k--", label="truth")
axes[0].axhline(math.log(256), color="gray", ls=":", label="log 256")
axes[0].set_xlabel("true mutual information (nats)")
axes[0].set_ylabel("estimate with the optimal critic")
axes[0].set_title("B = 256")
axes[0].legend()
for j, kind in enumerate(KINDS[:3]):
  e = np.stack([estimates[n][-1, :, j] for n in SIZES])
  axes[1].errorbar(SIZES, e.mean(axis=1), yerr=e.std(axis=1), marker="o", capsize=3, label=kind)
axes[1].axhline(TRUE_MI[-1], color="k", ls="--", label="truth")
axes[1].plot(SIZES, np.log(SIZES), color="gray", ls=":", label="log B")
axes[1].set_xscale("log")
axes[1].set_xlabel("batch size B")
axes[1].set_title(f"I = {TRUE_MI[-1]:.2f} nats: mean ± std over {REPEATS} batches")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Even with the best possible critic the bounds behave differently:
#
# * **InfoNCE** has the smallest spread, but it saturates at $\log B$: at
#   $I = 7.8$ nats it needs thousands of pairs per batch.
# * **NWJ** has no ceiling and is unbiased around the truth, but its spread grows with
#   the information (it averages $e^{S_{ij}}$, a heavy-tailed quantity).
# * **DV** (MINE) is at least NWJ on the same batch ($e^{x} \ge 1 + x$), and the log of a
#   batch mean makes it biased: with few pairs it overshoots the truth (it is a lower
#   bound only in expectation over large batches), and its spread is as large as NWJ's.
# * **JS** is at most 0 whatever the information: it is for training critics, whose
#   scores the other bounds then read.

# %%
log_b = {n: math.log(n) for n in SIZES}
for n in SIZES:
  e_infonce, e_nwj, e_dv, e_js = np.moveaxis(estimates[n], -1, 0)
  assert np.all(e_infonce <= log_b[n] + 1e-6)  # the ceiling, in every batch
  assert np.all(e_dv >= e_nwj - 1e-4)  # e^x >= 1 + x, batch by batch
  assert np.all(e_js <= 0.0)
  assert e_nwj[-1].std() > 2 * e_infonce[-1].std()  # NWJ's variance at I = 7.8 nats
assert estimates[16][-1, :, 2].mean() > TRUE_MI[-1] + 1.0  # DV overshoots with 16 pairs
assert abs(estimates[1024][-1, :, 1].mean() - TRUE_MI[-1]) < 0.5  # NWJ centred on the truth
assert estimates[1024][-1, :, 0].mean() < TRUE_MI[-1] - 1.0  # InfoNCE still below, capped
print(
  "DV at B=16:",
  round(float(estimates[16][-1, :, 2].mean()), 2),
  "nats; truth",
  TRUE_MI[-1].round(2),
)

# %% [markdown]
# ## Trained critics, one per bound
#
# The optimal critic is never at hand: an estimator trains one. Here the separable
# critic of the first Gaussian section, $f(x, y) = g(x) \cdot h(y) + c$ (two small MLPs
# and a learned constant $c$, passed as `bias=`), is trained at $\rho = 0.95$
# ($I = 4.66$ nats) by Adam to **maximize each bound in turn**, reading all four from
# `xentjax.info.mutual_information_bounds(g(x), h(y), bias=c)` in one sweep and taking
# the gradient of the chosen one. The critic trained on JS is read with NWJ
# (Poole et al.'s JS estimator: the JS objective finds the log density ratio $f^*$
# without NWJ's exponential in the gradient, and NWJ's own optimum is $1 + f^*$, so
# one is added to its $c$). One critic per bound and batch size, 300 steps each; the
# estimate is recorded on the training batch at every step and, at the end, on 16
# fresh batches.

# %%
RHO = 0.95
MI = float(-0.5 * DIM * np.log(1 - RHO**2))
TRAINED_ON = ("InfoNCE", "NWJ", "DV", "JS")
TRAIN_SIZES = (16, 64, 256)


def all_bounds(p, x, y, shift=0.0):
  """The four bounds (InfoNCE, NWJ, DV, JS) of the critic g(x).h(y) + c + shift."""
  c = p["c"] + shift
  m = xentjax.info.mutual_information_bounds(encode(p["g"], x), encode(p["h"], y), bias=c)
  return jnp.stack([m.infonce, m.nwj, m.dv, m.js])


def read_estimate(p, x, y, kind):
  """The critic's estimate: its own bound, or NWJ at critic + 1 for the JS-trained one."""
  js = kind == 3
  return all_bounds(p, x, y, shift=jnp.where(js, 1.0, 0.0))[jnp.where(js, 1, kind)]


def train_on_bound(kind, batch, steps=300):
  opt = optax.adam(3e-3)

  def step(carry, key):
    p, state = carry
    x, y = sample(key, batch, RHO)
    grads = jax.grad(lambda q: -all_bounds(q, x, y)[kind])(p)
    updates, state = opt.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), read_estimate(p, x, y, kind)

  p = init_critic(jax.random.key(0)) | {"c": jnp.zeros(())}
  (p, _), curve = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(jax.random.key(1), steps))
  keys = jax.random.split(jax.random.key(2), 16)  # fresh batches for the final estimate
  final = jax.vmap(lambda k: read_estimate(p, *sample(k, batch, RHO), kind))(keys)
  return curve, final


curves, finals = {}, {}
for batch in TRAIN_SIZES:
  run = jax.jit(jax.vmap(lambda kind, batch=batch: train_on_bound(kind, batch)))
  c, f = run(jnp.arange(4))
  curves[batch], finals[batch] = np.asarray(c), np.asarray(f)  # [kind, step], [kind, batch]
  print(
    f"B={batch:4d} (log B = {math.log(batch):.2f}): "
    + "  ".join(f"{k} {e.mean():5.2f} ± {e.std():4.2f}" for k, e in zip(TRAINED_ON, f))
    + f"   (I = {MI:.2f})"
  )

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for j, kind in enumerate(TRAINED_ON):
  axes[0].plot(curves[256][j], lw=0.8, label=f"trained on {kind}")
axes[0].axhline(MI, color="k", ls="--", label="truth")
axes[0].axhline(math.log(256), color="gray", ls=":", label="log 256")
axes[0].set_ylim(-2, 2 * MI)
axes[0].set_xlabel("training step")
axes[0].set_ylabel("estimate on the training batch (nats)")
axes[0].set_title("B = 256, during training")
axes[0].legend(fontsize="small")
for j, kind in enumerate(TRAINED_ON):
  e = np.stack([finals[n][j] for n in TRAIN_SIZES])
  axes[1].errorbar(
    TRAIN_SIZES, e.mean(axis=1), yerr=e.std(axis=1), marker="o", capsize=3, label=kind
  )
axes[1].axhline(MI, color="k", ls="--", label="truth")
axes[1].plot(TRAIN_SIZES, np.log(TRAIN_SIZES), color="gray", ls=":", label="log B")
axes[1].set_xscale("log")
axes[1].set_xticks(TRAIN_SIZES, [str(n) for n in TRAIN_SIZES])
axes[1].minorticks_off()
axes[1].set_xlabel("batch size B")
axes[1].set_title("after training: mean ± std over 16 fresh batches")
axes[1].legend(fontsize="small")
plt.tight_layout()
plt.show()

# %% [markdown]
# Trained critics add the cost of learning to the bounds' own bias and variance:
#
# * **InfoNCE** learns fastest and reads the most at every batch size, and it stays
#   under $\log B$: with 16 pairs it cannot report more than 2.77 nats however long it
#   trains.
# * **NWJ**, **DV** and the **JS**-trained critic (read with NWJ) learn more slowly: after
#   300 steps they read well below the truth, not because of a ceiling (they have none)
#   but because their critics are still poor. With 16 pairs their estimates spread two
#   to three times as much as InfoNCE's over fresh batches (they average exponentials
#   of the scores), and DV's training curve is the noisiest.
# * **DV** reads above NWJ from 64 pairs on: the log of a batch mean, whose upward bias
#   the optimal critic showed above.
#
# The optimal-critic section isolates each bound; this one shows what an estimator
# actually reports after a short training run.

# %%
for batch in TRAIN_SIZES:
  assert np.all(curves[batch][0] <= math.log(batch) + 1e-5)  # the ceiling, at every step
  assert np.all(finals[batch][0] <= math.log(batch) + 1e-5)
assert finals[16][0].mean() < MI - 1.5  # capped at log 16 = 2.77 < I
assert finals[256][0].mean() > 0.6 * MI  # with 256 pairs InfoNCE gets most of it
assert finals[256][0].mean() > finals[256][1:].mean(axis=1).max()  # and learns fastest
assert finals[16][1:].std(axis=1).min() > 1.8 * finals[16][0].std()  # the others' spread
assert all(finals[n][2].mean() > finals[n][1].mean() for n in (64, 256))  # DV above NWJ
noise = [float(np.abs(np.diff(curves[16][j][-100:])).mean()) for j in range(4)]
assert noise[2] > 2 * noise[0]  # DV's training curve at B = 16
print(
  "step-to-step change over the last 100 steps (B = 16):",
  {k: round(v, 2) for k, v in zip(TRAINED_ON, noise)},
)
