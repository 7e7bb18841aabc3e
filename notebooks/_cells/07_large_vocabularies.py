# %% [markdown]
# # 7. Large vocabularies: cross-entropy without the logits
#
# A language model's last layer maps each token's hidden state $x_n \in \mathbb{R}^D$
# to $V$ logits, $z_n = x_n W$ with $W \in \mathbb{R}^{D\times V}$. For a batch of
# $N$ tokens the logits form an $N\times V$ matrix, and so does their gradient. With
# $N = 8192$ tokens and a 262,144-word vocabulary that is $2^{31}$ numbers — 8 GiB in
# float32, twice over for the backward pass — far more than the model's weights.
#
# The loss does not need that matrix. This notebook derives what it does need,
# checks that `xentjax.linear_softmax_cross_entropy` (the fused loss) agrees with the
# materialized computation, and measures the temporary memory XLA allocates for both,
# from the compiled programs — without allocating anything.

# %%
# %matplotlib inline
import math
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import xentjax

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.0, 3.6)})
print(
  "xentjax",
  xentjax.__version__,
  "| jax",
  jax.__version__,
  "| x64:",
  jax.config.jax_enable_x64,
  "| backend:",
  jax.default_backend(),
)

# %% [markdown]
# ## What the loss and its gradient need
#
# Per token with label $y$, the loss is
#
# $$\begin{aligned}
# \ell &= \operatorname{LSE}(z) - z_y,\\
# \operatorname{LSE}(z) &= \ln \sum_{j=1}^{V} e^{z_j}, \qquad z_j = x\cdot w_j .
# \end{aligned}$$
#
# * $z_y = x\cdot w_y$ is one dot product.
# * $\operatorname{LSE}$ can be accumulated over **tiles** of the vocabulary with the
#   streaming (online) rule: keep a running maximum $m$ and a running sum
#   $s = \sum e^{z_j - m}$; a new tile with maximum $m'$ and sum $s'$ merges as
#   $m'' = \max(m, m')$, $s'' = s\,e^{m - m''} + s'\,e^{m' - m''}$. Only two numbers per
#   token survive each tile.
#
# The gradient is $\partial\ell/\partial z_j = \operatorname{softmax}(z)_j - [j = y] = e^{z_j - \operatorname{LSE}} - [j=y]$,
# so once $\operatorname{LSE}$ is known every tile of $\partial\ell/\partial z$ can be
# **recomputed** from $x$, $W$ and $\operatorname{LSE}$ and immediately contracted:
#
# $$\frac{\partial \ell}{\partial x} = \sum_j \frac{\partial\ell}{\partial z_j}\, w_j, \qquad \frac{\partial \ell}{\partial w_j} = \frac{\partial\ell}{\partial z_j}\, x .$$
#
# Memory then scales with the tile, not with $N\times V$; the price is one extra
# matrix multiplication in the backward pass.


# %%
def streaming_lse(z, tile):
  """Log-sum-exp over the last axis, one tile of columns at a time (numpy, float64)."""
  m = np.full(z.shape[:-1], -np.inf)
  s = np.zeros(z.shape[:-1])
  for start in range(0, z.shape[-1], tile):
    zt = z[..., start : start + tile]
    m_t = zt.max(-1)
    s_t = np.exp(zt - m_t[..., None]).sum(-1)
    m_new = np.maximum(m, m_t)
    s = s * np.exp(m - m_new) + s_t * np.exp(m_t - m_new)
    m = m_new
  return m + np.log(s)


rng = np.random.default_rng(0)
z_demo = rng.normal(size=(4, 1000)) * 5
exact = np.log(np.exp(z_demo - z_demo.max(-1, keepdims=True)).sum(-1)) + z_demo.max(-1)
for tile in (1, 7, 128, 1000):
  assert np.allclose(streaming_lse(z_demo, tile), exact, rtol=1e-12, atol=1e-12)
print("streaming log-sum-exp equals the one-shot value for tiles of 1, 7, 128 and 1000 columns")

# %% [markdown]
# ## The fused loss agrees with the materialized one
#
# On a small problem we can afford both. Values and gradients with respect to $x$ and
# $W$ must match the straightforward computation: logits $XW$, then
# `softmax_cross_entropy_with_integer_labels`, then the mean.


# %%
def materialized_loss(x, w, labels):
  return jnp.mean(xentjax.softmax_cross_entropy_with_integer_labels(x @ w, labels))


def fused_loss(x, w, labels, strategy="recompute"):
  return xentjax.linear_softmax_cross_entropy(x, w, labels, reduction="mean", strategy=strategy)


key_x, key_w, key_y = jax.random.split(jax.random.key(0), 3)
n, dim, vocab = 256, 64, 5000
x = jax.random.normal(key_x, (n, dim))
w = jax.random.normal(key_w, (dim, vocab)) / math.sqrt(dim)
labels = jax.random.randint(key_y, (n,), 0, vocab)

ref_value, (ref_gx, ref_gw) = jax.value_and_grad(materialized_loss, argnums=(0, 1))(x, w, labels)
for strategy in ("recompute", "store"):
  value, (gx, gw) = jax.value_and_grad(fused_loss, argnums=(0, 1))(x, w, labels, strategy)
  err = max(float(jnp.max(jnp.abs(gx - ref_gx))), float(jnp.max(jnp.abs(gw - ref_gw))))
  print(
    f"{strategy:9s}: loss {float(value):.6f} vs materialized {float(ref_value):.6f}; "
    f"max gradient difference {err:.1e}"
  )
  assert abs(float(value) - float(ref_value)) < 1e-4 * abs(float(ref_value))
  assert jnp.allclose(gx, ref_gx, atol=1e-5) and jnp.allclose(gw, ref_gw, atol=1e-6)
# and the optax reference agrees as well
assert (
  abs(
    float(jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(x @ w, labels)))
    - float(ref_value)
  )
  < 1e-5
)

# %% [markdown]
# ## Measuring memory without allocating it
#
# `jax.jit(f).lower(*shapes).compile()` builds the XLA program from abstract
# `jax.ShapeDtypeStruct` arguments — no array is ever created — and
# `.memory_analysis()` reports the buffers it plans, among them
# `temp_size_in_bytes`: scratch memory beyond the arguments and outputs. We compile
# the training computation, loss **and** gradients with respect to $x$ and $W$, in
# float32, for $N = 8192$ tokens, $D = 2048$ and vocabularies from 8K to 256K words.
#
# The materialized program needs the logits and their gradient:
# $2 \cdot 4NV$ bytes, i.e. $2 \times 8$ GiB at $V = 262{,}144$.

# %%
N, D = 8192, 2048
VOCABS = [8192, 32768, 131072, 262144]


def temp_bytes(loss_fn, n_tokens, dim, vocab):
  shapes = (
    jax.ShapeDtypeStruct((n_tokens, dim), jnp.float32),
    jax.ShapeDtypeStruct((dim, vocab), jnp.float32),
    jax.ShapeDtypeStruct((n_tokens,), jnp.int32),
  )
  compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


start = time.perf_counter()
table = []
for V in VOCABS:
  mat = temp_bytes(materialized_loss, N, D, V)
  fus = temp_bytes(fused_loss, N, D, V)
  table.append((V, mat, fus))
store_262k = temp_bytes(lambda x, w, y: fused_loss(x, w, y, "store"), N, D, VOCABS[-1])
print(f"compiled {2 * len(VOCABS) + 1} programs in {time.perf_counter() - start:.1f} s\n")

GiB, MiB = 2**30, 2**20
print(f"{'V':>8s} | logits 4NV | materialized temp | fused temp | fused / materialized")
for V, mat, fus in table:
  print(
    f"{V:8d} | {4 * N * V / GiB:6.2f} GiB | {mat / GiB:13.2f} GiB | {fus / MiB:6.1f} MiB | {fus / mat:8.3%}"
  )
print(
  f"\n'store' strategy at V = {VOCABS[-1]}: {store_262k / MiB:.1f} MiB "
  f"(it keeps a float32 W-sized gradient buffer, 4DV = {4 * D * VOCABS[-1] / MiB:.0f} MiB)"
)

# %%
V_big, mat_big, fus_big = table[-1]
ratio = fus_big / mat_big
print(f"N = {N}, D = {D}, V = {V_big}: fused / materialized = {ratio:.4%}")
assert ratio <= 0.01
# the materialized program holds at least the N x V float32 logits
assert all(mat >= 4 * N * V for V, mat, _ in table)
# the fused program's scratch memory does not grow with the vocabulary
assert max(f for _, _, f in table) <= 2 * min(f for _, _, f in table)
# and is smaller than a single N x V logit matrix at every size
assert all(fus < 4 * N * V for V, _, fus in table)

# %%
fig, ax = plt.subplots()
vs = np.array([V for V, _, _ in table])
ax.plot(vs, [m / GiB for _, m, _ in table], marker="o", label="materialized $XW$ + softmax CE")
ax.plot(vs, [f / GiB for _, _, f in table], marker="o", label="fused (recompute)")
ax.plot(vs, 4 * N * vs / GiB, ls=":", color="gray", label="one $N\\times V$ float32 matrix")
ax.set(
  xscale="log",
  yscale="log",
  xlabel="vocabulary size $V$",
  ylabel="temporary memory [GiB]",
  title=f"Loss + gradients, N = {N}, D = {D}, float32 (XLA {jax.default_backend()})",
)
ax.set_xticks(vs, [f"{v // 1024}K" for v in vs])
ax.legend()
plt.show()

# %% [markdown]
# **Take-aways.** The cross-entropy of $XW$ needs only $\operatorname{LSE}$ and $z_y$
# per token; both, and the gradients, can be computed tile by tile. The compiled
# programs confirm it: the materialized loss plans two $N\times V$ float32 buffers
# (16 GiB at $V = 262{,}144$), the fused loss a few tiles whose size does not depend
# on $V$ — well under 1% of the materialized figure. The figures are XLA's plan for
# the backend this notebook ran on (printed in the first cell); other backends assign
# buffers differently, so re-run the notebook there to get their numbers.
