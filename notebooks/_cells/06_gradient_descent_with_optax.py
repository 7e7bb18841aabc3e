# %% [markdown]
# # 6. Gradient descent with optax
#
# Everything so far has been about one prediction. Here we train a whole model: a
# linear softmax classifier on the 8×8 digits shipped with `xentjax`, by gradient
# descent with [optax](https://github.com/google-deepmind/optax). We derive the
# gradient with respect to the weights, check it against `jax.grad`, add an L2
# penalty, watch the loss curves, measure accuracy and top-5 accuracy, and finally
# draw the decision boundaries of the same model on a 2-D toy problem, where they
# can be seen.

# %%
# %matplotlib inline
import itertools
import math
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import xentjax
from xentjax import datasets, metrics, train

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.0, 3.6)})
rng = np.random.default_rng(0)
print(
  "xentjax",
  xentjax.__version__,
  "| jax",
  jax.__version__,
  "| optax",
  optax.__version__,
  "| x64:",
  jax.config.jax_enable_x64,
)

# %% [markdown]
# ## The model and its gradient
#
# For inputs $X \in \mathbb{R}^{N\times d}$ (one image per row, $d = 64$ pixels) the
# model produces logits
#
# $$Z = XW + \mathbf{1} b^\top, \qquad W \in \mathbb{R}^{d\times K},\ b \in \mathbb{R}^K,$$
#
# and we minimize the mean cross-entropy plus an L2 penalty on the weights (not the
# bias):
#
# $$J(W, b) = \frac1N \sum_{n=1}^N H\big(y_n, \operatorname{softmax}(z_n)\big) + \frac{\lambda}{2}\lVert W\rVert_F^2 .$$
#
# Notebook 4 gave $\partial H/\partial z_n = \hat y_n - y_n$. Since
# $z_{nk} = \sum_i x_{ni} W_{ik} + b_k$, the chain rule collects these row errors
# $E = \hat Y - Y$ into
#
# $$\begin{aligned}
# \nabla_W J &= \frac1N X^\top (\hat Y - Y) + \lambda W,\\
# \nabla_b J &= \frac1N (\hat Y - Y)^\top \mathbf 1 .
# \end{aligned}$$
#
# Each weight $W_{ik}$ moves in proportion to how strongly pixel $i$ is lit on the
# examples where class $k$ is over- or under-predicted.

# %%
x_train, y_train, x_test, y_test = datasets.load_digits(seed=0)
N, d = x_train.shape
K = 10
print(f"train {x_train.shape}, test {x_test.shape}, pixel range [{x_train.min()}, {x_train.max()}]")

params = train.init_linear(jax.random.key(0), d, K, scale=0.1)
lam = 1e-2
ce = train.make_loss("ce")


def objective(p, x, y):
  return jnp.mean(ce(train.linear_logits(p, x), y)) + lam * train.l2_penalty(p)


grads = jax.grad(objective)(params, x_train, y_train)
E = jax.nn.softmax(train.linear_logits(params, x_train)) - jax.nn.one_hot(y_train, K)
grad_w = x_train.T @ E / N + lam * params["w"]
grad_b = E.sum(axis=0) / N
print("max |dJ/dW autodiff - closed form| =", float(jnp.max(jnp.abs(grads["w"] - grad_w))))
print("max |dJ/db autodiff - closed form| =", float(jnp.max(jnp.abs(grads["b"] - grad_b))))
assert jnp.allclose(grads["w"], grad_w, atol=1e-5)
assert jnp.allclose(grads["b"], grad_b, atol=1e-5)
# the penalty is half the squared Frobenius norm of W, and leaves b alone
assert abs(float(train.l2_penalty(params)) - 0.5 * float(jnp.sum(params["w"] ** 2))) < 1e-4

# %% [markdown]
# ## The optax loop
#
# An optax optimizer is a pair of pure functions: `init(params)` builds its state and
# `update(grads, state, params)` turns gradients into parameter updates. Plain
# gradient descent with step size $\eta$ is `optax.sgd(eta)`:
#
# $$W \leftarrow W - \eta\,\nabla_W J, \qquad b \leftarrow b - \eta\,\nabla_b J .$$
#
# `xentjax.train.make_train_step` wraps loss, penalty, gradient and update into one
# jitted function. Below we run full-batch gradient descent for 300 steps and record
# the training objective and the test cross-entropy after each step.

# %%
STEPS, LR = 300, 0.5
optimizer = optax.sgd(LR)
step = train.make_train_step(ce, optimizer, l2=lam)
train_loss = jax.jit(lambda p: jnp.mean(ce(train.linear_logits(p, x_train), y_train)))
test_loss = jax.jit(lambda p: jnp.mean(ce(train.linear_logits(p, x_test), y_test)))

# the first update by hand, to see optax do exactly W - eta * grad
opt_state = optimizer.init(params)
p1, _, _ = step(params, opt_state, x_train, y_train)
assert jnp.allclose(p1["w"], params["w"] - LR * grad_w, atol=1e-5)
assert jnp.allclose(p1["b"], params["b"] - LR * grad_b, atol=1e-5)

start = time.perf_counter()
p, opt_state = params, optimizer.init(params)
train_curve, train_ce_curve, test_curve = [], [], []
for _ in range(STEPS):
  p, opt_state, loss = step(p, opt_state, x_train, y_train)  # loss: objective before the step
  train_curve.append(float(loss))
  train_ce_curve.append(float(train_loss(p)))
  test_curve.append(float(test_loss(p)))
print(f"{STEPS} full-batch steps in {time.perf_counter() - start:.1f} s")
print(
  f"objective: {train_curve[0]:.4f} -> {train_curve[-1]:.4f};  test CE: {test_curve[0]:.4f} -> {test_curve[-1]:.4f}"
)
assert train_curve[-1] < 0.5 * train_curve[0] and test_curve[-1] < 0.5 * test_curve[0]
# with a small enough step, full-batch gradient descent decreases the objective every step
assert all(b <= a + 1e-6 for a, b in itertools.pairwise(train_curve))
params_gd = p

# %% [markdown]
# ## Accuracy, top-5 accuracy, perplexity
#
# Cross-entropy is what we optimize; what we usually report is
#
# * **accuracy** — the fraction of examples whose largest logit is the true class;
# * **top-$k$ accuracy** — the fraction whose true class is among the $k$ largest
#   logits ($k = 5$ here);
# * **perplexity** $= e^{\text{mean CE}}$, the effective number of classes the model
#   is still hesitating between (1 for a perfect model, $K$ for a uniform guess).
#
# We check `xentjax.metrics` against a plain numpy computation.

# %%
logits_test = train.linear_logits(params_gd, x_test)
acc = float(metrics.accuracy(logits_test, y_test))
top5 = float(metrics.top_k_accuracy(logits_test, y_test, k=5))
ppl = float(metrics.perplexity(logits_test, y_test))

L = np.asarray(logits_test, dtype=np.float64)
yt = np.asarray(y_test)
acc_np = np.mean(L.argmax(axis=1) == yt)
top5_np = np.mean([yt[n] in np.argsort(-L[n])[:5] for n in range(len(yt))])
lse = L.max(1) + np.log(np.exp(L - L.max(1, keepdims=True)).sum(1))
ppl_np = math.exp(np.mean(lse - L[np.arange(len(yt)), yt]))
print(
  f"test accuracy {acc:.4f} (numpy {acc_np:.4f}), top-5 {top5:.4f} (numpy {top5_np:.4f}), "
  f"perplexity {ppl:.3f} (numpy {ppl_np:.3f}) of {K} classes"
)
assert abs(acc - acc_np) < 1e-6 and abs(top5 - top5_np) < 1e-6 and abs(ppl - ppl_np) < 1e-3 * ppl_np
assert acc >= 0.9 and top5 >= 0.99 and ppl < 2.0

summary = train.evaluate_classifier(params_gd, x_test, y_test, k=5)
assert abs(summary["accuracy"] - acc) < 1e-6 and abs(summary["top_k_accuracy"] - top5) < 1e-6

# an untrained (uniform) model has perplexity K
assert abs(float(metrics.perplexity(jnp.zeros((5, K)), jnp.arange(5))) - K) < 1e-4

# %% [markdown]
# ## Minibatches, Adam and the L2 penalty
#
# `xentjax.train.fit` runs the same objective over shuffled minibatches (one jitted
# `lax.scan` per epoch) with any optax optimizer. We train with Adam and three penalty
# weights $\lambda$. The penalty's gradient $\lambda W$ pulls every weight toward
# zero at each step, so larger $\lambda$ gives smaller weights — and, for a linear
# model, less confident (higher-entropy) predictions; on this small, clean data set
# the accuracy barely changes.

# %%
EPOCHS = 10
runs = {}
start = time.perf_counter()
for l2 in [0.0, 1e-3, 1e-2]:
  fitted, history = train.fit(
    train.init_linear(jax.random.key(0), d, K),
    optax.adam(0.01),
    (x_train, y_train, x_test, y_test),
    epochs=EPOCHS,
    batch_size=64,
    seed=0,
    loss="ce",
    l2=l2,
    progress=False,
  )
  runs[l2] = (fitted, history)
print(f"3 x {EPOCHS} epochs in {time.perf_counter() - start:.1f} s\n")

print(f"{'lambda':>7s} | ||W||_F | test acc. | mean test entropy [nats]")
norms = []
for l2, (fitted, history) in runs.items():
  norm = float(jnp.linalg.norm(fitted["w"]))
  ent = float(jnp.mean(xentjax.info.entropy(jax.nn.softmax(train.linear_logits(fitted, x_test)))))
  norms.append(norm)
  print(f"{l2:7.0e} | {norm:7.3f} | {history['test_accuracy'][-1]:9.4f} | {ent:.4f}")
  assert history["test_accuracy"][-1] >= 0.88
assert norms[0] > norms[1] > norms[2]

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.4))
ax1.plot(train_curve, label="train objective (CE + penalty)")
ax1.plot(train_ce_curve, label="train cross-entropy")
ax1.plot(test_curve, label="test cross-entropy")
ax1.set(
  xlabel="full-batch SGD step",
  ylabel="nats",
  yscale="log",
  title=f"Gradient descent, $\\eta$ = {LR}, $\\lambda$ = {lam:g}",
)
ax1.legend()
for l2, (_, history) in runs.items():
  ax2.plot(
    np.arange(1, EPOCHS + 1), history["loss"], marker="o", ms=3, label=f"$\\lambda$ = {l2:g}"
  )
ax2.set(
  xlabel="epoch (Adam, batch 64)", ylabel="mean objective", yscale="log", title="Minibatch training"
)
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The learned weights are images too: column $k$ of $W$ is a $8\times 8$ template
# that the model correlates with the input to score class $k$.

# %%
w_img = np.asarray(runs[1e-3][0]["w"]).T.reshape(K, 8, 8)
fig, axes = plt.subplots(1, K, figsize=(9.0, 1.3))
lim = np.abs(w_img).max()
for k, ax in enumerate(axes):
  ax.imshow(w_img[k], cmap="RdBu_r", vmin=-lim, vmax=lim)
  ax.set_title(str(k))
  ax.axis("off")
plt.show()

# %% [markdown]
# ## Decision boundaries on a 2-D toy problem
#
# With two input features the same model can be drawn. The predicted class is
# $\arg\max_k z_k(x)$, and the boundary between classes $i$ and $j$ is where their
# logits tie:
#
# $$z_i(x) = z_j(x) \iff (w_i - w_j)\cdot x + (b_i - b_j) = 0,$$
#
# a straight line. A linear softmax classifier therefore partitions the plane into
# convex polygonal regions — one per class — and the softmax turns the distance to
# these lines into confidence. Three Gaussian blobs, full-batch Adam. In the plot the
# dashed lines are the three full tie lines; each is a boundary only along the
# segment where its two classes are the top two.

# %%
centers = np.array([[-2.0, -1.0], [2.0, -1.0], [0.0, 2.2]])
n_per = 100
x2 = np.concatenate([c + 0.8 * rng.normal(size=(n_per, 2)) for c in centers]).astype(np.float32)
y2 = np.repeat(np.arange(3), n_per).astype(np.int32)

p2 = train.init_linear(jax.random.key(1), 2, 3)
opt2 = optax.adam(0.1)
step2 = train.make_train_step(ce, opt2)
state2 = opt2.init(p2)
for _ in range(200):
  p2, state2, loss2 = step2(p2, state2, x2, y2)
acc2 = float(metrics.accuracy(train.linear_logits(p2, x2), y2))
print(f"toy problem: final loss {float(loss2):.4f}, training accuracy {acc2:.3f}")
assert acc2 >= 0.95

# every point on the line between classes 0 and 1 ties their logits
w, b = np.asarray(p2["w"], np.float64), np.asarray(p2["b"], np.float64)
dw, db = w[:, 0] - w[:, 1], b[0] - b[1]
xs = np.linspace(-3, 3, 7)
on_line = np.stack([xs, -(db + dw[0] * xs) / dw[1]], axis=1)
z_line = on_line @ w + b
assert np.allclose(z_line[:, 0], z_line[:, 1], atol=1e-5)

gx, gy = np.meshgrid(np.linspace(-5, 5, 250), np.linspace(-4.5, 5.5, 250))
grid = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float32)
probs = np.asarray(jax.nn.softmax(train.linear_logits(p2, grid)))
pred = probs.argmax(1).reshape(gx.shape)
conf = probs.max(1).reshape(gx.shape)

fig, ax = plt.subplots(figsize=(5.2, 4.6))
ax.contourf(gx, gy, pred, levels=[-0.5, 0.5, 1.5, 2.5], colors=["#c6dbef", "#fdd0a2", "#c7e9c0"])
cs = ax.contour(gx, gy, conf, levels=[0.5, 0.9, 0.99], colors="gray", linewidths=0.6)
ax.clabel(cs, fmt="%.2f", fontsize=7)
for i, j in [(0, 1), (0, 2), (1, 2)]:
  dw, db = w[:, i] - w[:, j], b[i] - b[j]
  line_x = np.linspace(-5, 5, 2)
  ax.plot(line_x, -(db + dw[0] * line_x) / dw[1], "k--", lw=0.7)
for k, color in enumerate(["tab:blue", "tab:orange", "tab:green"]):
  ax.scatter(*x2[y2 == k].T, s=8, color=color, label=f"class {k}")
ax.set(
  xlim=(-5, 5),
  ylim=(-4.5, 5.5),
  xlabel="$x_1$",
  ylabel="$x_2$",
  title="Linear softmax: straight boundaries,\nconfidence contours max $q$ = 0.5, 0.9, 0.99",
)
ax.legend(loc="lower right", fontsize=8)
plt.show()

# %% [markdown]
# **Take-aways.** For a linear softmax model the gradient of the mean cross-entropy is
# $X^\top(\hat Y - Y)/N$ (plus $\lambda W$ with an L2 penalty); optax turns it into an
# update, and `xentjax.train` wraps the loop. The decision boundaries are the lines
# where two logits tie.
