# %% [markdown]
# # 1. Information and entropy
#
# Cross-entropy is built out of one idea: an outcome that was unlikely tells you more
# than one you expected. This notebook makes that idea quantitative — surprisal,
# bits versus nats, entropy and its extremes — and checks every number with
# `xentjax.info` against an independent computation in `math`/`numpy`.
#
# Every assertion below is part of the test suite: if a derivation or the library
# drifts, the notebook fails.

# %%
# %matplotlib inline
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import xentjax
from xentjax import info

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.0, 3.6)})
rng = np.random.default_rng(0)
print("xentjax", xentjax.__version__, "| jax", jax.__version__, "| x64:", jax.config.jax_enable_x64)

# %% [markdown]
# ## Surprisal
#
# We want a measure $I(x)$ of the information carried by observing an outcome of
# probability $p(x)$ that
#
# * is $0$ for a certain outcome, $p = 1$,
# * grows as $p$ shrinks,
# * **adds** for independent outcomes: $I(x, y) = I(x) + I(y)$ when $p(x, y) = p(x)\,p(y)$.
#
# The last requirement turns products into sums, which only a logarithm does, so
#
# $$I(x) = -\log_b p(x) = \log_b \frac{1}{p(x)} .$$
#
# The base $b$ only picks the unit. With $b = 2$ the unit is the **bit**: a fair coin
# flip carries $-\log_2 \tfrac12 = 1$ bit. With $b = e$ it is the **nat**, the unit
# machine-learning losses use because $\ln$ has the simplest derivative. Changing base
# is multiplication by a constant:
#
# $$I_{\text{bits}} = \frac{I_{\text{nats}}}{\ln 2}, \qquad 1\ \text{nat} = \frac{1}{\ln 2} \approx 1.4427\ \text{bits}.$$

# %%
for p in [1.0, 0.5, 0.25, 1 / 8, 1 / 1024]:
  bits = float(info.information(p, base=2)) + 0.0  # + 0.0 turns -0.0 into 0.0
  nats = float(info.information(p)) + 0.0
  print(f"p = {p:<10.6g} I = {bits:6.3f} bits = {nats:6.3f} nats")
  assert abs(bits - (-math.log2(p))) < 1e-5
  assert abs(nats - (-math.log(p))) < 1e-5
  assert abs(bits * math.log(2) - nats) < 1e-5

# additivity: two independent fair coins and a fair die
p_coin, p_die = 0.5, 1 / 6
joint = float(info.information(p_coin * p_coin * p_die, base=2))
parts = 2 * float(info.information(p_coin, base=2)) + float(info.information(p_die, base=2))
print(f"I(coin, coin, die) = {joint:.4f} bits = I(coin) + I(coin) + I(die) = {parts:.4f} bits")
assert abs(joint - parts) < 1e-5
assert abs(1 / math.log(2) - 1.4427) < 5e-5

# %%
p_grid = np.linspace(1e-3, 1.0, 400)
fig, ax = plt.subplots()
ax.plot(p_grid, np.asarray(info.information(p_grid, base=2)), label="bits, $-\\log_2 p$")
ax.plot(p_grid, np.asarray(info.information(p_grid)), label="nats, $-\\ln p$")
ax.set(
  xlabel="probability $p$ of the outcome",
  ylabel="surprisal $I$",
  ylim=(0, 10),
  title="Rare outcomes are surprising; certain ones carry nothing",
)
ax.legend()
plt.show()

# %% [markdown]
# ## Entropy: the expected surprisal
#
# The entropy of a distribution is the surprisal you expect *before* looking:
#
# $$H(p) = \mathbb{E}_{x\sim p}\left[-\log p(x)\right] = -\sum_i p_i \log p_i ,$$
#
# with the convention $0 \log 0 = 0$ (the limit of $t \log t$ as $t \to 0^+$): an
# impossible outcome never happens, so it contributes nothing.
#
# ### Equally likely outcomes
#
# If $n$ outcomes are equally likely, every one has surprisal $\log n$, so the
# average is $H = \log_2 n$ bits. A basket of 8 equally likely fruits carries
# $\log_2 8 = 3$ bits per draw — exactly the three yes/no questions needed to find
# the fruit by halving the basket each time. With 1024 fruits it takes 10 questions.

# %%
fruits = ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape", "honeydew"]
h8 = float(info.entropy(jnp.full((len(fruits),), 1 / len(fruits)), base=2))
h1024 = float(info.entropy(jnp.full((1024,), 1 / 1024), base=2))
print(f"{len(fruits)} equally likely fruits: H = {h8:.6f} bits")
print(f"1024 equally likely fruits:   H = {h1024:.6f} bits")
assert abs(h8 - 3.0) < 1e-5 and abs(h8 - math.log2(8)) < 1e-5
assert abs(h1024 - 10.0) < 1e-4

# in nats the same entropies are multiplied by ln 2
assert abs(float(info.entropy(jnp.full((8,), 1 / 8))) - 3 * math.log(2)) < 1e-5

# %% [markdown]
# ### Entropy as an average code length
#
# When the outcomes are not equally likely, frequent ones deserve short codewords.
# For $p = (\tfrac12, \tfrac14, \tfrac18, \tfrac18)$ the prefix code
# `0`, `10`, `110`, `111` gives outcome $i$ a codeword of exactly $-\log_2 p_i$ bits,
# so its average length equals the entropy:
#
# $$H = \tfrac12\cdot 1 + \tfrac14\cdot 2 + \tfrac18\cdot 3 + \tfrac18 \cdot 3 = 1.75\ \text{bits}.$$
#
# Shannon's source-coding theorem says no lossless code can do better on average;
# entropy is the floor.

# %%
p = jnp.array([1 / 2, 1 / 4, 1 / 8, 1 / 8])
code = ["0", "10", "110", "111"]
avg_len = sum(float(pi) * len(c) for pi, c in zip(p, code))
h = float(info.entropy(p, base=2))
print(f"average code length = {avg_len} bits, entropy = {h:.6f} bits")
assert avg_len == 1.75 and abs(h - 1.75) < 1e-6

# %% [markdown]
# ### The extremes: $0 \le H(p) \le \log n$
#
# *Lower bound.* Every term $-p_i \log p_i$ is $\ge 0$ because $0 \le p_i \le 1$, and
# the sum is $0$ only if every $p_i$ is $0$ or $1$: a **certain outcome carries no
# information**.
#
# *Upper bound.* $\log$ is concave, so Jensen's inequality gives
#
# $$H(p) = \sum_i p_i \log \frac{1}{p_i} \;\le\; \log \sum_i p_i \frac{1}{p_i} = \log n ,$$
#
# with equality exactly when $1/p_i$ is constant, i.e. $p$ uniform. For $2^k$ classes
# the maximum entropy is therefore $k$ bits. Below we check both bounds on thousands
# of random distributions drawn from a Dirichlet.

# %%
for k in range(11):
  n = 2**k
  # + 0.0 turns the -0.0 of one certain class (-1 · log 1) into 0.0 for printing
  h_uniform = float(info.entropy(jnp.full((n,), 1 / n), base=2)) + 0.0
  samples = rng.dirichlet(np.full(n, 0.5), size=2000)
  h_random = np.asarray(info.entropy(jnp.asarray(samples), base=2))
  # independent numpy computation of the same entropies (0 log 0 = 0)
  with np.errstate(divide="ignore", invalid="ignore"):
    ref = -np.sum(np.where(samples > 0, samples * np.log2(samples), 0.0), axis=-1)
  assert np.allclose(h_random, ref, atol=1e-4)
  assert abs(h_uniform - k) < 1e-4
  assert np.all(h_random <= k + 1e-4) and np.all(h_random >= -1e-6)
  print(
    f"2^{k:<2} = {n:5d} classes: uniform H = {h_uniform:7.4f} bits, "
    f"largest of 2000 random = {h_random.max() + 0.0:7.4f} bits"
  )

# %%
certain = jnp.array([0.0, 0.0, 1.0, 0.0])
h_certain = info.entropy(certain, base=2)
print("H(certain outcome) =", float(h_certain), "bits")
assert float(h_certain) == 0.0 and bool(jnp.isfinite(h_certain))

# %% [markdown]
# The gradient at a zero entry is a **convention**, not the derivative. Each term
# has $\frac{d}{dp}(-p \ln p) = -\ln p - 1$, which tends to $+\infty$ as
# $p \to 0^+$: the true derivative at $p = 0$ is $+\infty$. xentjax reports $0$
# there instead ($0 \log 0 = 0$ in value *and* gradient, see the conventions page),
# so no $\infty$ or NaN leaks out of the zero entries into a training step.

# %%
g = jax.grad(lambda q: info.entropy(q))(jnp.array([0.5, 0.5, 0.0]))
print("dH/dp at (1/2, 1/2, 0):", g)
print("  entries 1, 2: -ln(1/2) - 1 =", -math.log(0.5) - 1)
print("  entry 3: the true derivative -ln p - 1 is +inf at p = 0; 0 is the library's convention")
assert np.allclose(g[:2], -math.log(0.5) - 1, atol=1e-6)
assert float(g[2]) == 0.0 and not bool(jnp.any(jnp.isnan(g)))

# %% [markdown]
# ## The binary entropy curve
#
# A coin with $P(\text{heads}) = t$ has entropy
#
# $$H_b(t) = -t \log_2 t - (1 - t)\log_2(1 - t).$$
#
# It is $0$ at $t \in \{0, 1\}$ (no doubt), symmetric about $t = \tfrac12$, and
# peaks at exactly 1 bit for the fair coin:
# $H_b'(t) = \log_2 \frac{1 - t}{t} = 0 \iff t = \tfrac12$.

# %%
t = np.linspace(0.0, 1.0, 501)
coins = jnp.asarray(np.stack([t, 1 - t], axis=-1))
hb = np.asarray(info.entropy(coins, base=2))
with np.errstate(divide="ignore", invalid="ignore"):
  hb_ref = -np.nan_to_num(t * np.log2(t)) - np.nan_to_num((1 - t) * np.log2(1 - t))

assert np.allclose(hb, hb_ref, atol=1e-5)
assert hb[0] == 0.0 and hb[-1] == 0.0
assert abs(hb[250] - 1.0) < 1e-6 and int(np.argmax(hb)) == 250
assert np.allclose(hb, hb[::-1], atol=1e-5)
print(f"H_b(0.1) = {hb[50]:.4f} bits, H_b(0.5) = {hb[250]:.4f} bits")

fig, ax = plt.subplots()
ax.plot(t, hb)
ax.axvline(0.5, color="gray", lw=0.8, ls="--")
ax.set(
  xlabel="$t = P(\\mathrm{heads})$",
  ylabel="$H_b(t)$ [bits]",
  title="Binary entropy: zero when certain, 1 bit for a fair coin",
)
plt.show()

# %% [markdown]
# **Take-aways.** Surprisal is $-\log p$; entropy is its average; the unit is a choice
# of logarithm base ($\ln 2$ nats per bit). Entropy is $0$ for a certain outcome and at
# most $\log n$, reached by the uniform distribution. The next notebook asks what
# happens when outcomes come from one distribution $p$ but are *scored* with
# another, $q$ — that is cross-entropy.
