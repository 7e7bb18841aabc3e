# %% [markdown]
# # 5. Why cross-entropy, and not squared error, for classification
#
# Squared error is the natural loss for regression, and nothing stops us from
# using it on a classifier's probabilities: $\lVert \hat y - y \rVert^2$ (the *Brier
# score*). It even has the same minimizer, $\hat y = y$. What goes wrong is the
# **gradient**: through a sigmoid or a softmax, squared error loses the cancellation
# that notebook 4 found for cross-entropy, and a confidently wrong model stops
# learning. This notebook derives that, plots it, reproduces the
# `xentjax demo --compare` experiment with `xentjax.train`, and then compares
# cross-entropy with two other popular choices: the hinge loss and the cosine
# distance.

# %%
# %matplotlib inline
import itertools
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import xentjax
from xentjax import datasets, train

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.0, 3.6)})
rng = np.random.default_rng(0)
print("xentjax", xentjax.__version__, "| jax", jax.__version__, "| x64:", jax.config.jax_enable_x64)

# %% [markdown]
# ## One sigmoid unit
#
# Let $a = \sigma(z)$ with target $y \in \{0, 1\}$ and $\sigma'(z) = a(1 - a)$.
#
# | loss | $L(z)$ | $\partial L/\partial z$ |
# |---|---|---|
# | cross-entropy | $-y\ln a - (1-y)\ln(1-a)$ | $a - y$ |
# | squared error | $(a - y)^2$ | $2(a - y)\,a(1 - a)$ |
#
# The squared-error gradient carries the extra factor $a(1-a) \le \tfrac14$, which
# vanishes at **both** ends of the sigmoid. When $y = 1$ but $z = -10$, the model is
# confidently wrong, $a \approx 4.5\times 10^{-5}$, and
#
# * cross-entropy pushes with $a - 1 \approx -1$, its largest possible gradient;
# * squared error pushes with $2(a-1)a(1-a) \approx -9\times 10^{-5}$: four orders of
#   magnitude weaker, exactly where the model most needs correcting.

# %%
z = jnp.linspace(-10.0, 10.0, 401)
y1 = jnp.ones_like(z)


def mse_sigmoid(z, y):
  return xentjax.squared_error(jax.nn.sigmoid(z), y)


g_ce = jax.vmap(jax.grad(xentjax.sigmoid_binary_cross_entropy))(z, y1)
g_mse = jax.vmap(jax.grad(mse_sigmoid))(z, y1)
a = jax.nn.sigmoid(z)
assert jnp.allclose(g_ce, a - 1, atol=1e-6)
assert jnp.allclose(g_mse, 2 * (a - 1) * a * (1 - a), atol=1e-6)

i = 0  # z = -10
print(
  f"z = {float(z[i]):.0f}, y = 1:  dCE/dz = {float(g_ce[i]):.6f},  dMSE/dz = {float(g_mse[i]):.3e}"
)
assert abs(float(g_ce[i]) + 1) < 1e-4
assert abs(float(g_mse[i])) < 1e-4 and abs(float(g_ce[i]) / float(g_mse[i])) > 1e4

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.4))
ax1.plot(z, xentjax.sigmoid_binary_cross_entropy(z, y1), label="cross-entropy")
ax1.plot(z, mse_sigmoid(z, y1), label="squared error")
ax1.set(xlabel="logit $z$ (target $y = 1$)", ylabel="loss", title="Loss")
ax1.legend()
ax2.plot(z, -g_ce, label="cross-entropy: $1 - a$")
ax2.plot(z, -g_mse, label="squared error: $2(1-a)a(1-a)$")
ax2.set(
  xlabel="logit $z$ (target $y = 1$)",
  ylabel="$-\\partial L / \\partial z$",
  title="Gradient: MSE saturates when wrong",
)
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Through a softmax
#
# With $K$ classes, $\hat y = \operatorname{softmax}(z)$ and the Brier score
# $L = \lVert \hat y - y\rVert^2$, the chain rule with the softmax Jacobian
# $J = \operatorname{diag}(\hat y) - \hat y\hat y^\top$ gives
#
# $$\begin{aligned}
# \frac{\partial L}{\partial z} &= J\, 2(\hat y - y) \quad \text{(squared error), versus}\\
# \frac{\partial H}{\partial z} &= \hat y - y \quad \text{(cross-entropy).}
# \end{aligned}$$
#
# When the model is confidently wrong, $\hat y$ is close to a one-hot vector $e_k$
# with $k \ne c$, and $J \to \operatorname{diag}(e_k) - e_k e_k^\top = 0$: the Brier
# gradient vanishes while the cross-entropy gradient tends to $e_k - e_c$, of norm
# $\sqrt 2$.


# %%
def brier(logits, labels):
  """Squared error of the softmax probabilities against the one-hot label, summed over classes."""
  y = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
  return jnp.sum(xentjax.squared_error(jax.nn.softmax(logits), y), axis=-1)


rows = []
for confidence in [0.0, 2.0, 5.0, 10.0, 20.0]:
  zc = jnp.array([confidence, 0.0, 0.0, 0.0])  # the model favours class 0 ...
  label = 1  # ... but the truth is class 1
  g_h = jax.grad(xentjax.softmax_cross_entropy_with_integer_labels)(zc, label)
  g_b = jax.grad(brier)(zc, label)
  yhat, y = jax.nn.softmax(zc), jax.nn.one_hot(label, 4)
  J = jnp.diag(yhat) - jnp.outer(yhat, yhat)
  assert jnp.allclose(g_b, J @ (2 * (yhat - y)), atol=1e-6)
  assert jnp.allclose(g_h, yhat - y, atol=1e-6)
  rows.append(
    (confidence, float(yhat[label]), float(jnp.linalg.norm(g_h)), float(jnp.linalg.norm(g_b)))
  )
  print(
    f"z_0 - z_1 = {confidence:4.0f}: q_true = {rows[-1][1]:.2e}   |grad CE| = {rows[-1][2]:.3f}"
    f"   |grad Brier| = {rows[-1][3]:.2e}"
  )

assert rows[-1][2] > 1.41 and rows[-1][3] < 1e-7
assert all(
  r2[2] >= r1[2] for r1, r2 in itertools.pairwise(rows)
)  # CE pushes harder the worse it gets

# %% [markdown]
# ## On real data: the `xentjax demo --compare` experiment
#
# The same linear classifier $z = xW + b$ on the embedded 8×8 digits (1347 training,
# 450 test images), trained with plain SGD (learning rate 0.05, batch 64, seed 0) on
# three losses from `xentjax.train.make_loss`:
#
# * `"ce"` — softmax cross-entropy;
# * `"mse"` — squared error of the softmax **probabilities** against the one-hot label
#   (the Brier score), whose gradient on the true class carries a factor $q_y$;
#   (`"mse_logits"` is the other classic, squared error of the raw scores, i.e. linear
#   regression onto the class indicators);
# * `"hinge"` — the multiclass (Crammer–Singer) hinge loss.
#
# Plain SGD, because with SGD the size of the gradient is the size of the step; Adam
# divides each gradient by its running scale and would hide the saturation.
# This is what `xentjax demo --compare` runs (with more epochs).

# %%
data = datasets.load_digits()
x_train, y_train, x_test, y_test = data
print("train", x_train.shape, "test", x_test.shape)

EPOCHS = 10
histories, results = {}, {}
start = time.perf_counter()
for name in ["ce", "mse", "hinge"]:
  params0 = train.init_linear(jax.random.key(0), 64, 10)
  params, history = train.fit(
    params0, optax.sgd(0.05), data, epochs=EPOCHS, batch_size=64, seed=0, loss=name, progress=False
  )
  histories[name] = history
  results[name] = train.evaluate_classifier(params, x_test, y_test, k=5)
print(f"trained 3 models in {time.perf_counter() - start:.1f} s\n")

print(f"{'loss':6s} | epochs to 90% train acc. | test accuracy | test top-5")
for name, history in histories.items():
  reached = train.epochs_to_accuracy(history, 0.9)
  print(
    f"{name:6s} | {reached!s:>24} | {results[name]['accuracy']:13.4f} | "
    f"{results[name]['top_k_accuracy']:.4f}"
  )

reach = {name: train.epochs_to_accuracy(h, 0.9) for name, h in histories.items()}
assert reach["ce"] is not None and reach["mse"] is None  # CE gets there, MSE does not
assert results["ce"]["accuracy"] > results["mse"]["accuracy"] + 0.03
assert results["ce"]["top_k_accuracy"] >= 0.99

# %% [markdown]
# Even from a small, well-behaved initialization, squared error on probabilities lags:
# every step it takes is scaled down by the softmax. The difference is starker when
# the model starts **confidently wrong**. Below, the initial weights are
# large (standard deviation 1, so the untrained logits are spread over several units
# and the softmax is saturated on most examples), and plain SGD is used so that the
# size of the gradient is the size of the step. Cross-entropy recovers; the Brier
# score — squared error through the softmax — barely moves.

# %%
params_bad = train.init_linear(jax.random.key(0), 64, 10, scale=1.0)
q0 = jax.nn.softmax(train.linear_logits(params_bad, x_train))
print(
  f"untrained: mean max probability {float(q0.max(-1).mean()):.3f}, "
  f"accuracy {float(xentjax.metrics.accuracy(train.linear_logits(params_bad, x_train), y_train)):.3f}"
)


def mean_grad_norm(loss_fn, params):
  g = jax.grad(lambda p: jnp.mean(loss_fn(train.linear_logits(p, x_train), y_train)))(params)
  return float(jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(g))))


gn_ce = mean_grad_norm(train.make_loss("ce"), params_bad)
gn_brier = mean_grad_norm(brier, params_bad)
print(f"gradient norm at the start: cross-entropy {gn_ce:.3f}, Brier {gn_brier:.4f}")
assert gn_ce > 5 * gn_brier

bad = {}
for name, loss in [("cross-entropy", "ce"), ("Brier (MSE on softmax)", brier)]:
  _, bad[name] = train.fit(
    params_bad,
    optax.sgd(0.3),
    data,
    epochs=EPOCHS,
    batch_size=64,
    seed=0,
    loss=loss,
    progress=False,
  )
  print(f"{name:24s} test accuracy by epoch:", np.round(bad[name]["test_accuracy"], 2))

assert (
  bad["cross-entropy"]["test_accuracy"][-1]
  > bad["Brier (MSE on softmax)"]["test_accuracy"][-1] + 0.2
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.4), sharey=True)
epochs = np.arange(1, EPOCHS + 1)
for name, history in histories.items():
  ax1.plot(epochs, history["test_accuracy"], marker="o", ms=3, label=name)
ax1.set(xlabel="epoch", ylabel="test accuracy", title="Small init, Adam", ylim=(0, 1))
ax1.legend()
for name, history in bad.items():
  ax2.plot(epochs, history["test_accuracy"], marker="o", ms=3, label=name)
ax2.set(xlabel="epoch", title="Confidently wrong init, SGD")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Hinge loss: margins instead of probabilities
#
# For a binary problem with labels $t \in \{-1, +1\}$ and score $s$, both losses are
# functions of the **margin** $m = t s$ alone:
#
# $$\begin{aligned}
# \text{hinge: } & \max(0,\ 1 - m),\\
# \text{logistic (cross-entropy): } & \ln(1 + e^{-m})\\
#   & = \operatorname{softplus}(-m).
# \end{aligned}$$
#
# (The logistic form is the sigmoid cross-entropy with $y = (t + 1)/2$ and $z = s$.)
# Far on the wrong side both grow with slope $-1$. The difference is on the right
# side: the hinge loss is **exactly zero** once the margin exceeds 1, so confidently
# correct examples stop contributing (the support-vector property), while
# cross-entropy keeps a small, never-zero pull $\sigma(-m)$ toward larger margins. In
# exchange, cross-entropy's scores are calibrated log-odds, $P(t = 1) = \sigma(s)$;
# a hinge-trained score is just a score.
#
# The multiclass (Crammer–Singer) version asks the true class to beat every other by
# a margin of 1: $\ell(s, c) = \max_k\big(s_k + [k \ne c]\big) - s_c$.

# %%
m = jnp.linspace(-4.0, 4.0, 161)
t = jnp.ones_like(m)
hinge = xentjax.hinge_loss(m, t)
logistic = xentjax.sigmoid_binary_cross_entropy(m, (t + 1) / 2)
assert jnp.allclose(hinge, jnp.maximum(0.0, 1.0 - m))
assert jnp.allclose(logistic, jnp.logaddexp(0.0, -m), atol=1e-6)
assert bool(jnp.all(hinge[m >= 1] == 0)) and bool(jnp.all(logistic > 0))
# slope -1 far on the wrong side, for both
g_h = jax.grad(lambda v: xentjax.hinge_loss(v, 1.0))(-4.0)
g_l = jax.grad(lambda v: xentjax.sigmoid_binary_cross_entropy(v, 1.0))(-4.0)
print(f"slope at m = -4: hinge {float(g_h):.3f}, logistic {float(g_l):.3f}")
print(
  f"slope at m = +2: hinge {float(jax.grad(lambda v: xentjax.hinge_loss(v, 1.0))(2.0)) + 0.0:.3f}, "
  f"logistic {float(jax.grad(lambda v: xentjax.sigmoid_binary_cross_entropy(v, 1.0))(2.0)):.3f}"
)
assert float(g_h) == -1.0 and abs(float(g_l) + 1) < 0.02

# multiclass hinge against an independent numpy computation
S = rng.normal(size=(200, 7)) * 2
C = rng.integers(0, 7, size=200)
ref = np.max(S + (np.arange(7)[None, :] != C[:, None]), axis=1) - S[np.arange(200), C]
lib = np.asarray(xentjax.multiclass_hinge_loss(jnp.asarray(S), jnp.asarray(C)))
assert np.allclose(lib, ref, atol=1e-5) and np.all(lib >= 0)
print(
  "multiclass hinge matches numpy on 200 random examples; zero for",
  int(np.sum(lib == 0)),
  "examples with margin >= 1",
)

fig, ax = plt.subplots()
ax.plot(m, hinge, label="hinge $\\max(0, 1 - m)$")
ax.plot(m, logistic, label="logistic $\\ln(1 + e^{-m})$")
ax.plot(m, (m < 0).astype(float), ls=":", color="gray", label="0–1 loss")
ax.set(xlabel="margin $m = t\\,s$", ylabel="loss", title="Margin losses")
ax.legend()
plt.show()

# %% [markdown]
# ## Cosine distance as a loss
#
# When only the **direction** of a prediction matters (embeddings, retrieval), the
# cosine distance
#
# $$\begin{aligned}
# d(a, b) &= 1 - \cos(a, b)\\
#   &= 1 - \frac{a\cdot b}{\lVert a\rVert\,\lVert b\rVert} \in [0, 2]
# \end{aligned}$$
#
# is a common loss. It is invariant to the scale of $a$, so its gradient has no
# component along $a$:
#
# $$\begin{aligned}
# \nabla_a \cos(a, b) &= \frac{1}{\lVert a\rVert}\left(\frac{b}{\lVert b\rVert}
#   - \cos(a,b)\,\frac{a}{\lVert a\rVert}\right),\\
# a\cdot\nabla_a \cos(a,b) &= \frac{1}{\lVert a\rVert}\left(\cos - \cos\right) = 0 .
# \end{aligned}$$
#
# As a classification loss against one-hot targets it ignores confidence entirely:
# logits $z$ and $10z$ score the same. That is the opposite of cross-entropy, which
# cares precisely about how much probability lands on the truth.

# %%
a_vec = jnp.asarray(rng.normal(size=(16, 8)))
b_vec = jnp.asarray(rng.normal(size=(16, 8)))
an, bn = np.asarray(a_vec), np.asarray(b_vec)
cos_ref = np.sum(an * bn, -1) / (np.linalg.norm(an, axis=-1) * np.linalg.norm(bn, axis=-1))
d = xentjax.cosine_distance(a_vec, b_vec)
assert np.allclose(np.asarray(xentjax.cosine_similarity(a_vec, b_vec)), cos_ref, atol=1e-5)
assert np.allclose(np.asarray(d), 1 - cos_ref, atol=1e-5)
assert bool(jnp.all((d >= 0) & (d <= 2)))
assert jnp.allclose(xentjax.cosine_distance(7.5 * a_vec, b_vec), d, atol=1e-5)  # scale-invariant

g = jax.vmap(jax.grad(xentjax.cosine_similarity))(a_vec, b_vec)
na = jnp.linalg.norm(a_vec, axis=-1, keepdims=True)
nb = jnp.linalg.norm(b_vec, axis=-1, keepdims=True)
g_ref = (b_vec / nb - jnp.asarray(cos_ref)[:, None] * a_vec / na) / na
assert jnp.allclose(g, g_ref, atol=1e-5)
print("max |a . grad_a cos(a, b)| =", float(jnp.max(jnp.abs(jnp.sum(a_vec * g, -1)))))
assert float(jnp.max(jnp.abs(jnp.sum(a_vec * g, -1)))) < 1e-5

z3 = jnp.array([0.2, 1.0, -0.5])
onehot = jnp.array([0.0, 1.0, 0.0])
print(
  f"cosine distance of z and 10 z to the label: {float(xentjax.cosine_distance(z3, onehot)):.4f}, "
  f"{float(xentjax.cosine_distance(10 * z3, onehot)):.4f}"
)
print(
  f"cross-entropy   of z and 10 z:              {float(xentjax.softmax_cross_entropy(z3, onehot)):.4f}, "
  f"{float(xentjax.softmax_cross_entropy(10 * z3, onehot)):.4f}"
)
assert (
  abs(float(xentjax.cosine_distance(10 * z3, onehot) - xentjax.cosine_distance(z3, onehot))) < 1e-6
)
assert float(xentjax.softmax_cross_entropy(10 * z3, onehot)) < float(
  xentjax.softmax_cross_entropy(z3, onehot)
)

# %% [markdown]
# **Take-aways.** Through a sigmoid or softmax, squared error multiplies the error by
# the saturating derivative $a(1-a)$ (or the softmax Jacobian) and stalls on
# confidently wrong examples; cross-entropy's gradient is the plain error
# $\hat y - y$, largest exactly when the model is most wrong. Hinge loss optimizes
# margins and ignores examples beyond them; cross-entropy optimizes probabilities and
# never quite lets go. Cosine distance ignores scale — fine for directions, blind to
# confidence.
