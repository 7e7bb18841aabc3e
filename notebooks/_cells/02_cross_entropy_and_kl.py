# %% [markdown]
# # 2. Cross-entropy and the Kullback–Leibler divergence
#
# Outcomes are drawn from a true distribution $p$, but we score them with a model
# $q$. The average surprisal we then pay is the **cross-entropy**
#
# $$H(p, q) = \mathbb{E}_{x\sim p}\left[-\log q(x)\right] = -\sum_i p_i \log q_i .$$
#
# In coding terms: if codewords are designed for $q$ (outcome $i$ gets
# $-\log_2 q_i$ bits) but the data follow $p$, the average message costs $H(p, q)$
# bits. This notebook reproduces the classic numbers, shows why only the true
# class's probability matters for one-hot labels, and derives
# $\mathrm{KL}(p\,\|\,q) = H(p, q) - H(p) \ge 0$.

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
# ## Two worked examples
#
# **Three classes.** The truth is class 1, $p = (0, 1, 0)$; the model predicts
# $q = (0.228, 0.619, 0.153)$. Only one term of the sum survives:
#
# $$\begin{aligned}
# H(p, q) &= -(0\cdot\ln 0.228 + 1\cdot \ln 0.619 + 0\cdot \ln 0.153)\\
#   &= -\ln 0.619 \approx 0.479\ \text{nats}.
# \end{aligned}$$
#
# **Five classes.** The truth is class 0, $p = (1, 0, 0, 0, 0)$, and the model puts
# only $0.1$ on it, $q = (0.1, 0.5, 0.1, 0.1, 0.2)$:
#
# $$H(p, q) = -\ln 0.1 = \ln 10 \approx 2.303\ \text{nats}.$$

# %%
p3, q3 = jnp.array([0.0, 1.0, 0.0]), jnp.array([0.228, 0.619, 0.153])
p5, q5 = jnp.array([1.0, 0.0, 0.0, 0.0, 0.0]), jnp.array([0.1, 0.5, 0.1, 0.1, 0.2])

ce3 = float(info.cross_entropy(p3, q3))
ce5 = float(info.cross_entropy(p5, q5))
# the loss-style spelling (probabilities first, labels second) must agree
loss3 = float(xentjax.categorical_cross_entropy(q3, p3))
loss5 = float(xentjax.categorical_cross_entropy(q5, p5))
print(f"H([0,1,0], [0.228,0.619,0.153])            = {ce3:.4f} nats  (loss API: {loss3:.4f})")
print(f"H([1,0,0,0,0], [0.1,0.5,0.1,0.1,0.2])      = {ce5:.4f} nats  (loss API: {loss5:.4f})")
print(
  f"in bits: {float(info.cross_entropy(p3, q3, base=2)):.4f} and {float(info.cross_entropy(p5, q5, base=2)):.4f}"
)

assert abs(ce3 - 0.479) < 1e-3 and abs(ce3 - (-math.log(0.619))) < 1e-5
assert abs(ce5 - 2.303) < 5e-4 and abs(ce5 - math.log(10)) < 1e-5
assert abs(loss3 - ce3) < 1e-6 and abs(loss5 - ce5) < 1e-6
assert abs(float(info.cross_entropy(p5, q5, base=2)) - math.log2(10)) < 1e-5

# %% [markdown]
# ## Only the true class's probability enters
#
# With a one-hot $p$ (true class $c$), every term but one is multiplied by zero:
#
# $$H(p, q) = -\log q_c .$$
#
# How the model spreads the remaining mass $1 - q_c$ over the wrong classes is
# invisible to the loss. Below, four very different predictions that all give the
# true class $0.1$ have the same cross-entropy. (The *gradient* with respect to the
# logits is another matter — see notebook 4.)

# %%
variants = jnp.array(
  [
    [0.1, 0.5, 0.1, 0.1, 0.2],
    [0.1, 0.6, 0.1, 0.1, 0.1],
    [0.1, 0.9, 0.0, 0.0, 0.0],
    [0.1, 0.225, 0.225, 0.225, 0.225],
  ]
)
labels = jnp.broadcast_to(p5, variants.shape)
losses = np.asarray(xentjax.categorical_cross_entropy(variants, labels))
for row, loss in zip(np.asarray(variants), losses):
  print(f"q = {np.round(row, 3)}  ->  H = {loss:.4f}")
assert np.allclose(losses, math.log(10), atol=1e-5)

# %% [markdown]
# ## KL divergence and Gibbs' inequality
#
# Split the cross-entropy into the part that the data force on us and the part the
# model adds:
#
# $$H(p, q) = -\sum_i p_i \log q_i = \underbrace{-\sum_i p_i \log p_i}_{H(p)} + \underbrace{\sum_i p_i \log \frac{p_i}{q_i}}_{\mathrm{KL}(p\,\|\,q)} .$$
#
# The KL divergence is the *extra* surprisal, in nats per sample, caused by using $q$
# instead of $p$. It is never negative (**Gibbs' inequality**). Using
# $\ln x \le x - 1$ (the tangent line at $x=1$ lies above the concave $\ln$), summed
# over the support of $p$:
#
# $$\begin{aligned}
# -\mathrm{KL}(p\,\|\,q) &= \sum_{i:\,p_i>0} p_i \ln \frac{q_i}{p_i}
#   \le \sum_{i:\,p_i>0} p_i\left(\frac{q_i}{p_i} - 1\right)\\
#   &= \sum_{i:\,p_i>0} q_i - 1 \le 0 ,
# \end{aligned}$$
#
# with equality iff $q_i = p_i$ everywhere. Hence $H(p, q) \ge H(p)$: no model
# scores the data better than the truth itself.

# %%
n_trials, n_classes = 5000, 6
P = jnp.asarray(rng.dirichlet(np.ones(n_classes), size=n_trials))
Q = jnp.asarray(rng.dirichlet(np.ones(n_classes), size=n_trials))

kl = np.asarray(info.kl_divergence(P, Q))
ce = np.asarray(info.cross_entropy(P, Q))
h = np.asarray(info.entropy(P))
kl_ref = np.sum(np.asarray(P) * np.log(np.asarray(P) / np.asarray(Q)), axis=-1)

print(
  f"{n_trials} random pairs: min KL = {kl.min():.3g}, max |KL - (H(p,q) - H(p))| = "
  f"{np.abs(kl - (ce - h)).max():.2g}"
)
assert np.allclose(kl, kl_ref, rtol=1e-4, atol=1e-5)
assert np.allclose(kl, ce - h, rtol=1e-4, atol=1e-5)
assert kl.min() >= -1e-6  # Gibbs
assert abs(float(info.kl_divergence(P[0], P[0]))) < 1e-6  # equality at q = p

# the library's optax-style spelling takes log-predictions first, targets second
kl_optax = np.asarray(xentjax.kl_divergence(jnp.log(Q), P))
assert np.allclose(kl_optax, kl, rtol=1e-4, atol=1e-5)

# and from logits: p and q given as unnormalized log-probabilities
zp, zq = jnp.asarray(rng.normal(size=(8, n_classes))), jnp.asarray(rng.normal(size=(8, n_classes)))
kl_logits = np.asarray(info.kl_divergence_from_logits(zp, zq))
kl_probs = np.asarray(info.kl_divergence(jax.nn.softmax(zp), jax.nn.softmax(zq)))
assert np.allclose(kl_logits, kl_probs, rtol=1e-4, atol=1e-5)

# %% [markdown]
# ### KL is not a distance
#
# $\mathrm{KL}(p\,\|\,q) \ne \mathrm{KL}(q\,\|\,p)$ in general, and KL is unbounded:
# if $q_i = 0$ where $p_i > 0$ it is $+\infty$. The **Jensen–Shannon divergence**
# symmetrizes it through the mixture $m = \tfrac12(p + q)$,
#
# $$\mathrm{JS}(p, q) = \tfrac12 \mathrm{KL}(p\,\|\,m) + \tfrac12 \mathrm{KL}(q\,\|\,m) \le \ln 2 ,$$
#
# which is symmetric, finite, and at most 1 bit (reached by distributions with
# disjoint support).

# %%
a, b = jnp.array([0.5, 0.5]), jnp.array([0.9, 0.1])
kl_ab, kl_ba = float(info.kl_divergence(a, b)), float(info.kl_divergence(b, a))
js_ab, js_ba = float(info.js_divergence(a, b)), float(info.js_divergence(b, a))
m = (a + b) / 2
js_ref = 0.5 * float(info.kl_divergence(a, m)) + 0.5 * float(info.kl_divergence(b, m))
print(f"KL(a||b) = {kl_ab:.4f}, KL(b||a) = {kl_ba:.4f}, JS = {js_ab:.4f} = {js_ba:.4f}")
assert abs(kl_ab - kl_ba) > 0.1
assert abs(js_ab - js_ba) < 1e-6 and abs(js_ab - js_ref) < 1e-5

disjoint_p, disjoint_q = jnp.array([0.5, 0.5, 0.0, 0.0]), jnp.array([0.0, 0.0, 0.3, 0.7])
js_max = float(info.js_divergence(disjoint_p, disjoint_q, base=2))
kl_inf = float(info.kl_divergence(disjoint_p, disjoint_q))
print(f"disjoint supports: JS = {js_max:.6f} bits, KL = {kl_inf}")
assert abs(js_max - 1.0) < 1e-5 and kl_inf == math.inf

# %% [markdown]
# ## Minimizing KL = minimizing cross-entropy (when $p$ is fixed)
#
# In training, $p$ is the data and $q_\theta$ is the model. Since
# $H(p, q_\theta) = H(p) + \mathrm{KL}(p\,\|\,q_\theta)$ and $H(p)$ does not depend on
# $\theta$,
#
# $$\nabla_\theta H(p, q_\theta) = \nabla_\theta \mathrm{KL}(p\,\|\,q_\theta),$$
#
# so the two objectives have the same minimizer ($q_\theta = p$) and gradient descent
# takes identical steps on either. The cross-entropy at the optimum is not $0$ but
# $H(p)$ — the irreducible noise in the labels. The plot shows both curves for a
# biased coin $p = (0.3, 0.7)$ scored by $q = (t, 1 - t)$: the same shape, offset by
# $H(p)$.

# %%
p_coin = jnp.array([0.3, 0.7])
t = jnp.linspace(0.01, 0.99, 393)
Qs = jnp.stack([t, 1 - t], axis=-1)
Ps = jnp.broadcast_to(p_coin, Qs.shape)
ce_curve = np.asarray(info.cross_entropy(Ps, Qs))
kl_curve = np.asarray(info.kl_divergence(Ps, Qs))
h_p = float(info.entropy(p_coin))

i_min = int(np.argmin(ce_curve))
print(
  f"argmin over t: CE at t = {float(t[i_min]):.3f}, KL at t = {float(t[np.argmin(kl_curve)]):.3f}"
)
print(f"min CE = {ce_curve[i_min]:.4f} = H(p) = {h_p:.4f}; min KL = {kl_curve.min():.2g}")
assert abs(float(t[i_min]) - 0.3) < 0.01 and np.argmin(kl_curve) == i_min
assert np.allclose(ce_curve - kl_curve, h_p, atol=1e-5)

# identical gradients with respect to model logits theta, q = softmax(theta)
theta = jnp.asarray(rng.normal(size=(4, 2)))
grad_ce = jax.grad(lambda th: info.cross_entropy(Ps[:4], jax.nn.softmax(th)).sum())(theta)
grad_kl = jax.grad(lambda th: info.kl_divergence(Ps[:4], jax.nn.softmax(th)).sum())(theta)
print("max |grad CE - grad KL| =", float(jnp.max(jnp.abs(grad_ce - grad_kl))))
assert jnp.allclose(grad_ce, grad_kl, atol=1e-5)

fig, ax = plt.subplots()
ax.plot(t, ce_curve, label="$H(p, q)$")
ax.plot(t, kl_curve, label="$\\mathrm{KL}(p\\,\\|\\,q)$")
ax.axhline(h_p, color="gray", ls=":", lw=0.8, label=f"$H(p)$ = {h_p:.3f}")
ax.axvline(0.3, color="gray", ls="--", lw=0.8)
ax.set(
  xlabel="model probability $t$ of the first outcome",
  ylabel="nats",
  ylim=(0, 2.5),
  title="Same minimizer; the curves differ by the constant $H(p)$",
)
ax.legend()
plt.show()

# %% [markdown]
# ## Soft targets
#
# Nothing above required $p$ to be one-hot. With label smoothing, knowledge
# distillation or genuinely ambiguous labels, every class with $p_i > 0$ contributes
# $-p_i \log q_i$. `xentjax.smooth_labels` mixes a one-hot target with the uniform
# distribution, $p = (1-\alpha)\,y + \alpha/K$; the cross-entropy then rewards the
# model for keeping some mass on every class.

# %%
y = jnp.array([0.0, 1.0, 0.0, 0.0])
alpha = 0.1
soft = xentjax.smooth_labels(y, alpha)
assert jnp.allclose(soft, (1 - alpha) * y + alpha / 4, atol=1e-6)

q_sharp = jnp.array([0.001, 0.997, 0.001, 0.001])
q_calib = jnp.array([0.025, 0.925, 0.025, 0.025])
print("soft target:", np.round(np.asarray(soft), 4))
for name, q in [("sharp     ", q_sharp), ("calibrated", q_calib)]:
  print(
    f"{name} q: H(one-hot, q) = {float(info.cross_entropy(y, q)):.4f}, "
    f"H(smoothed, q) = {float(info.cross_entropy(soft, q)):.4f}"
  )
# with the one-hot target the sharper prediction wins; with smoothed targets the
# prediction equal to the target (q = p, the minimizer) wins
assert float(info.cross_entropy(y, q_sharp)) < float(info.cross_entropy(y, q_calib))
assert float(info.cross_entropy(soft, q_calib)) < float(info.cross_entropy(soft, q_sharp))
assert abs(float(info.cross_entropy(soft, q_calib)) - float(info.entropy(soft))) < 1e-5
