# %% [markdown]
# # 4. Gradients of cross-entropy
#
# Training needs $\partial L / \partial z$, the derivative of the loss with respect to
# the logits. We derive it in three steps — through the log, through the softmax,
# and combined — and check every step against `jax.grad`, a finite-difference
# estimate in float64 numpy, and the closed forms in `xentjax.grads`.
#
# The punchline is one of the nicest results in machine learning:
#
# $$\begin{aligned}
# \frac{\partial}{\partial z}\, H\big(y, \operatorname{softmax}(z)\big)
#   &= \operatorname{softmax}(z) - y\\
#   &= \hat y - y .
# \end{aligned}$$

# %%
# %matplotlib inline
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import xentjax
from xentjax import info

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.0, 3.6)})
rng = np.random.default_rng(0)
print("xentjax", xentjax.__version__, "| jax", jax.__version__, "| x64:", jax.config.jax_enable_x64)


def numeric_grad(f, x, h=1e-6):
  """Central finite differences in float64 numpy, independent of JAX autodiff."""
  x = np.asarray(x, dtype=np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = h
    g[i] = (f(x + e) - f(x - e)) / (2 * h)
  return g


# %% [markdown]
# ## Step 1: with respect to the probabilities
#
# Treat $q$ as free variables in $H(p, q) = -\sum_i p_i \ln q_i$. Each $q_i$ appears in
# one term only, so
#
# $$\frac{\partial H}{\partial q_i} = -\frac{p_i}{q_i}.$$
#
# For a one-hot $p$ this is $-1/q_c$ at the true class and $0$ elsewhere: the loss on
# probabilities only ever pushes the true class up, and pushes harder the lower it is.

# %%
p = jnp.array([1.0, 0.0, 0.0, 0.0, 0.0])
q = jnp.array([0.1, 0.5, 0.1, 0.1, 0.2])

g_auto = jax.grad(lambda q_: info.cross_entropy(p, q_))(q)
g_closed = xentjax.grads.categorical_cross_entropy(q, p)
g_numeric = numeric_grad(lambda q_: -np.sum(np.asarray(p) * np.log(q_)), q)
print("jax.grad     :", np.asarray(g_auto))
print("closed form  :", np.asarray(g_closed))
print("finite diff. :", np.round(g_numeric, 6))
assert np.allclose(g_auto, -p / q, atol=1e-5)
assert np.allclose(g_closed, -p / q, atol=1e-5)
assert np.allclose(g_numeric, -np.asarray(p) / np.asarray(q), atol=1e-4)
assert abs(float(g_closed[0]) + 10.0) < 1e-5

# soft targets: every class with p_i > 0 gets -p_i / q_i
p_soft = jnp.array([0.6, 0.1, 0.1, 0.1, 0.1])
assert np.allclose(xentjax.grads.categorical_cross_entropy(q, p_soft), -p_soft / q, atol=1e-5)

# %% [markdown]
# ## Step 2: the softmax Jacobian
#
# With $q_i = e^{z_i}/S$ and $S = \sum_k e^{z_k}$, the quotient rule gives, for $j = i$,
#
# $$\begin{aligned}
# \frac{\partial q_i}{\partial z_i} &= \frac{e^{z_i} S - e^{z_i} e^{z_i}}{S^2}\\
#   &= q_i - q_i^2 = q_i (1 - q_i),
# \end{aligned}$$
#
# and for $j \ne i$ (only $S$ depends on $z_j$)
#
# $$\frac{\partial q_i}{\partial z_j} = \frac{0 - e^{z_i} e^{z_j}}{S^2} = -q_i q_j .$$
#
# Both cases in one line, with the Kronecker delta $\delta_{ij}$:
#
# $$\begin{aligned}
# J_{ij} &= \frac{\partial q_i}{\partial z_j} = q_i(\delta_{ij} - q_j),\\
# J &= \operatorname{diag}(q) - q q^{\top}.
# \end{aligned}$$
#
# $J$ is symmetric and every row sums to zero: raising all logits together changes
# nothing (notebook 3).

# %%
z = jnp.asarray(rng.normal(size=5))
qz = jax.nn.softmax(z)
J_auto = jax.jacobian(jax.nn.softmax)(z)
J_closed = jnp.diag(qz) - jnp.outer(qz, qz)
print("max |J_autodiff - (diag(q) - q q^T)| =", float(jnp.max(jnp.abs(J_auto - J_closed))))
assert jnp.allclose(J_auto, J_closed, atol=1e-6)
assert jnp.allclose(J_closed.sum(axis=1), 0.0, atol=1e-6) and jnp.allclose(J_closed, J_closed.T)

# %% [markdown]
# ## Step 3: the chain rule
#
# $$\begin{aligned}
# \frac{\partial H}{\partial z_j}
#   &= \sum_i \frac{\partial H}{\partial q_i}\frac{\partial q_i}{\partial z_j}\\
#   &= \sum_i \left(-\frac{p_i}{q_i}\right) q_i (\delta_{ij} - q_j)\\
#   &= -\sum_i p_i \delta_{ij} + q_j \sum_i p_i\\
#   &= q_j - p_j ,
# \end{aligned}$$
#
# using $\sum_i p_i = 1$. The $q_i$ from the Jacobian cancels the $1/q_i$ from the log,
# which is why the logit gradient is **bounded** ($|q_j - p_j| \le 1$) even where the
# probability gradient $-p/q$ is huge. For a one-hot label:
# $\hat y - y$, "prediction minus truth".

# %%
z = jnp.asarray(rng.normal(size=(4, 6)) * 3)
labels = jnp.array([0, 5, 2, 2])
y = jax.nn.one_hot(labels, 6)

# chain rule, literally: (dH/dq) times the softmax Jacobian, one example at a time
dH_dq = -y / jax.nn.softmax(z)
jacobians = jax.vmap(jax.jacobian(jax.nn.softmax))(z)
chain = jnp.einsum("bi,bij->bj", dH_dq, jacobians)
auto = jax.vmap(jax.grad(xentjax.softmax_cross_entropy))(z, y)
auto_int = jax.vmap(jax.grad(xentjax.softmax_cross_entropy_with_integer_labels))(z, labels)
closed = xentjax.grads.softmax_cross_entropy(z, y)
closed_int = xentjax.grads.softmax_cross_entropy_with_integer_labels(z, labels)
numeric = np.stack(
  [
    numeric_grad(lambda v, c=c: np.log(np.sum(np.exp(v))) - v[c], z[b])
    for b, c in enumerate(labels.tolist())
  ]
)

y_hat = jax.nn.softmax(z)
for name, g in [
  ("chain rule", chain),
  ("jax.grad", auto),
  ("jax.grad, int labels", auto_int),
  ("xentjax.grads", closed),
  ("xentjax.grads, int", closed_int),
  ("finite diff.", numeric),
]:
  err = float(np.max(np.abs(np.asarray(g) - np.asarray(y_hat - y))))
  print(f"{name:22s} max |g - (y_hat - y)| = {err:.2e}")
  assert err < 1e-4
# the gradient sums to zero over classes and lives in [-1, 1]
assert np.allclose(np.asarray(closed).sum(axis=-1), 0.0, atol=1e-6)
assert np.all(np.abs(np.asarray(closed)) <= 1.0)

# %% [markdown]
# ## Same loss, different gradients
#
# Take the true class to be class 0 and two predictions that both give it $0.1$:
#
# | | $q_0$ | $q_1$ | $q_2$ | $q_3$ | $q_4$ | loss |
# |---|---|---|---|---|---|---|
# | A | 0.1 | 0.5 | 0.1 | 0.1 | 0.2 | $\ln 10 \approx 2.303$ |
# | B | 0.1 | 0.6 | 0.1 | 0.1 | 0.1 | $\ln 10 \approx 2.303$ |
#
# The losses are equal (notebook 2: only $q_0$ enters), and so are the gradients with
# respect to the probabilities, $(-10, 0, 0, 0, 0)$. But the gradients with respect to
# the logits are $\hat y - y$:
#
# $$\begin{aligned}
# g_A &= (-0.9,\ 0.5,\ 0.1,\ 0.1,\ 0.2),\\
# g_B &= (-0.9,\ 0.6,\ 0.1,\ 0.1,\ 0.1).
# \end{aligned}$$
#
# Through the softmax, the loss *does* see the wrong classes: each is pushed down in
# proportion to the probability it stole. Prediction B gets a bigger push on class 1
# and a smaller one on class 4.

# %%
qA = jnp.array([0.1, 0.5, 0.1, 0.1, 0.2])
qB = jnp.array([0.1, 0.6, 0.1, 0.1, 0.1])
y0 = jnp.array([1.0, 0.0, 0.0, 0.0, 0.0])
zA, zB = jnp.log(qA), jnp.log(qB)  # logits whose softmax is exactly qA, qB

loss_A = float(xentjax.softmax_cross_entropy(zA, y0))
loss_B = float(xentjax.softmax_cross_entropy(zB, y0))
gq_A = xentjax.grads.categorical_cross_entropy(qA, y0)
gq_B = xentjax.grads.categorical_cross_entropy(qB, y0)
gz_A = jax.grad(xentjax.softmax_cross_entropy)(zA, y0)
gz_B = jax.grad(xentjax.softmax_cross_entropy)(zB, y0)
print(f"loss A = {loss_A:.4f}, loss B = {loss_B:.4f}")
print("dL/dq  A:", np.round(np.asarray(gq_A), 4), "  B:", np.round(np.asarray(gq_B), 4))
print("dL/dz  A:", np.round(np.asarray(gz_A), 4), "  B:", np.round(np.asarray(gz_B), 4))

assert abs(loss_A - 2.303) < 5e-4 and abs(loss_B - 2.303) < 5e-4
assert np.allclose(gq_A, gq_B)
assert np.allclose(gz_A, [-0.9, 0.5, 0.1, 0.1, 0.2], atol=1e-5)
assert np.allclose(gz_B, [-0.9, 0.6, 0.1, 0.1, 0.1], atol=1e-5)

# %% [markdown]
# ## Binary cross-entropy through the sigmoid: $\sigma(z) - y$
#
# With one logit per example, $\hat y = \sigma(z) = 1/(1 + e^{-z})$ and
#
# $$L = -y \ln \sigma(z) - (1 - y)\ln\big(1 - \sigma(z)\big).$$
#
# The sigmoid's derivative is $\sigma'(z) = \sigma(z)\big(1 - \sigma(z)\big)$, so
#
# $$\begin{aligned}
# \frac{\partial L}{\partial z}
#   &= \left(-\frac{y}{\sigma} + \frac{1 - y}{1 - \sigma}\right)\sigma(1 - \sigma)\\
#   &= -y(1 - \sigma) + (1 - y)\sigma\\
#   &= \sigma(z) - y .
# \end{aligned}$$
#
# The same cancellation as in the softmax case (the sigmoid *is* a two-class
# softmax with logits $(z, 0)$). Written with $\ln\sigma(z) = -\operatorname{softplus}(-z)$,
# $L = \operatorname{softplus}(z) - yz$, which is how a stable implementation computes it.

# %%
zs = jnp.linspace(-8.0, 8.0, 161)
for target in (0.0, 0.3, 1.0):
  yy = jnp.full_like(zs, target)
  g_auto = jax.vmap(jax.grad(xentjax.sigmoid_binary_cross_entropy))(zs, yy)
  g_closed = xentjax.grads.sigmoid_binary_cross_entropy(zs, yy)
  assert jnp.allclose(g_auto, jax.nn.sigmoid(zs) - yy, atol=1e-5)
  assert jnp.allclose(g_closed, jax.nn.sigmoid(zs) - yy, atol=1e-5)
  # the stable form softplus(z) - y z, checked in float64 numpy
  ref = np.logaddexp(0.0, np.asarray(zs, np.float64)) - target * np.asarray(zs, np.float64)
  assert np.allclose(np.asarray(xentjax.sigmoid_binary_cross_entropy(zs, yy)), ref, atol=1e-5)

# it is the two-class softmax with logits (z, 0)
two = jnp.stack([zs, jnp.zeros_like(zs)], axis=-1)
yy = jnp.full_like(zs, 1.0)
assert jnp.allclose(
  xentjax.sigmoid_binary_cross_entropy(zs, yy),
  xentjax.softmax_cross_entropy(two, jnp.stack([yy, 1 - yy], -1)),
  atol=1e-5,
)
print("sigmoid BCE gradient = sigma(z) - y for y in {0, 0.3, 1}: checked on", zs.size, "points")

fig, ax = plt.subplots()
ax.plot(zs, xentjax.sigmoid_binary_cross_entropy(zs, yy), label="loss, $y = 1$")
ax.plot(zs, xentjax.grads.sigmoid_binary_cross_entropy(zs, yy), label="gradient $\\sigma(z) - 1$")
ax.plot(zs, jax.nn.sigmoid(zs), ls=":", label="$\\sigma(z)$")
ax.axhline(0, color="gray", lw=0.6)
ax.set(xlabel="logit $z$", title="Binary cross-entropy and its gradient, $y = 1$")
ax.legend()
plt.show()

# %% [markdown]
# ## Batches: the mean divides by $N$
#
# A training loss averages over a batch, $L = \frac1N\sum_n H(y_n, \operatorname{softmax}(z_n))$,
# so each row of the gradient is $(\hat y_n - y_n)/N$. PyTorch-style
# `cross_entropy_loss` with `reduction="mean"` follows this rule, and with
# `reduction="sum"` drops the $1/N$.

# %%
zb = jnp.asarray(rng.normal(size=(32, 10)))
lb = jnp.asarray(rng.integers(0, 10, size=32))
g_mean = jax.grad(lambda v: xentjax.cross_entropy_loss(v, lb))(zb)
g_sum = jax.grad(lambda v: xentjax.cross_entropy_loss(v, lb, reduction="sum"))(zb)
expected = jax.nn.softmax(zb) - jax.nn.one_hot(lb, 10)
assert jnp.allclose(g_mean, expected / 32, atol=1e-6)
assert jnp.allclose(g_sum, expected, atol=1e-5)
print("mean-reduced gradient = (y_hat - y) / N: checked for N = 32")

# %% [markdown]
# **Take-aways.** On probabilities the gradient is $-p/q$ — unbounded, and blind to the
# wrong classes when $p$ is one-hot. Through the softmax, the Jacobian
# $\operatorname{diag}(q) - qq^\top$ cancels the division and the logit gradient is the
# bounded, everywhere-informative $\hat y - y$; for one logit and a sigmoid it is
# $\sigma(z) - y$. The next notebook shows what goes wrong when squared error
# replaces cross-entropy and this cancellation is lost.
