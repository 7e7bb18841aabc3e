# %% [markdown]
# # 3. Softmax and logits
#
# A classifier does not output probabilities directly. Its last layer produces one
# real number per class — a **logit** $z_i \in \mathbb{R}$ — and the softmax turns them
# into a distribution:
#
# $$q_i = \operatorname{softmax}(z)_i = \frac{e^{z_i}}{\sum_j e^{z_j}} .$$
#
# Exponentiation makes every score positive and preserves their order;
# dividing by the sum makes them add to one. This notebook walks the classic
# dog/cat/panda example through the four tables, then shows why a library should
# compute the loss from the logits (log-sum-exp) rather than from the probabilities.

# %%
# %matplotlib inline
import math

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

import xentjax

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (6.0, 3.6)})
print("xentjax", xentjax.__version__, "| jax", jax.__version__, "| x64:", jax.config.jax_enable_x64)

# %% [markdown]
# ## The four tables
#
# An image of a panda gets the scores dog $-3.44$, cat $1.16$, panda $3.91$.
#
# 1. **Logits** $z$ — unbounded, and only their differences will matter.
# 2. **Exponentials** $e^{z}$ — all positive: $0.0321$, $3.19$, $49.9$.
# 3. **Normalized** $q = e^{z}/\sum e^{z}$ with $\sum e^z \approx 53.12$:
#    $0.0006$, $0.0601$, $0.9393$.
# 4. **Loss** for the true class (panda): $-\ln q_{\text{panda}} = -\ln 0.9393 \approx 0.0626$.
#
# The code computes each table by hand with `math.exp` and then asks `xentjax` for
# the last one straight from the logits.

# %%
classes = ["dog", "cat", "panda"]
z = [-3.44, 1.16, 3.91]
true_class = classes.index("panda")

e = [math.exp(v) for v in z]
total = sum(e)
q = [v / total for v in e]
loss_by_hand = -math.log(q[true_class])

rows = "\n".join(
  f"| {c} | {zi:+.2f} | {ei:.4f} | {qi:.4f} | {(-math.log(qi) if i == true_class else 0.0):.4f} |"
  for i, (c, zi, ei, qi) in enumerate(zip(classes, z, e, q))
)
display(
  Markdown(
    "| class | logit $z$ | $e^z$ | $q = e^z / \\sum e^z$ | $-y \\ln q$ |\n|---|---|---|---|---|\n"
    + rows
    + f"\n| **sum** | | {total:.4f} | {sum(q):.4f} | **{loss_by_hand:.4f}** |"
  )
)

assert [round(v, 4) for v in q] == [0.0006, 0.0601, 0.9393]
assert round(loss_by_hand, 4) == 0.0626

logits = jnp.array(z)
q_lib = jax.nn.softmax(logits)
loss_int = float(xentjax.softmax_cross_entropy_with_integer_labels(logits, true_class))
loss_onehot = float(xentjax.softmax_cross_entropy(logits, jax.nn.one_hot(true_class, 3)))
loss_probs = float(xentjax.categorical_cross_entropy(q_lib, jax.nn.one_hot(true_class, 3)))
print(f"xentjax from logits (integer label) = {loss_int:.6f}")
print(f"xentjax from logits (one-hot)       = {loss_onehot:.6f}")
print(f"xentjax from probabilities          = {loss_probs:.6f}")
print(f"by hand                             = {loss_by_hand:.6f}")
for value in (loss_int, loss_onehot, loss_probs):
  assert abs(value - loss_by_hand) < 1e-5 and abs(value - 0.0626) < 5e-5
assert np.allclose(np.asarray(q_lib), q, atol=1e-6)

# %% [markdown]
# ## Only differences of logits matter
#
# Adding the same constant $c$ to every logit multiplies numerator and denominator by
# $e^c$:
#
# $$\frac{e^{z_i + c}}{\sum_j e^{z_j + c}} = \frac{e^{c}\, e^{z_i}}{e^{c}\sum_j e^{z_j}} = \operatorname{softmax}(z)_i .$$
#
# So the panda example could equally be written $(0, 4.60, 7.35)$, or
# $(-7.35, -2.75, 0)$.

# %%
for c in [0.0, 3.44, -3.91, 100.0]:
  shifted = float(xentjax.softmax_cross_entropy_with_integer_labels(logits + c, true_class))
  print(f"shift c = {c:+7.2f}: loss = {shifted:.6f}")
  assert abs(shifted - loss_by_hand) < 5e-4  # float32 spacing near 100 is ~1e-5

# %% [markdown]
# ## Why log-sum-exp
#
# Taking the log of the softmax gives
#
# $$-\ln q_c = -z_c + \ln \sum_j e^{z_j} = -z_c + \operatorname{LSE}(z).$$
#
# Computed literally, $e^{z_j}$ overflows for large logits ($e^{89} >$ the largest
# float32, $e^{710} >$ the largest float64) and the result is `inf/inf = nan`. The
# shift invariance above is the cure: with $m = \max_j z_j$,
#
# $$\operatorname{LSE}(z) = m + \ln \sum_j e^{z_j - m},$$
#
# where every exponent is $\le 0$ and the largest term is exactly $e^0 = 1$, so the sum
# lies in $[1, n]$: no overflow, and its log is never $\log 0$.


# %%
def naive_loss(z, c):
  """Cross-entropy computed the textbook way: softmax, then -log."""
  ez = jnp.exp(z)
  return -jnp.log(ez[c] / jnp.sum(ez))


big = logits + 1000.0
with np.errstate(all="ignore"):
  naive_big = float(naive_loss(big, true_class))
safe_big = float(xentjax.softmax_cross_entropy_with_integer_labels(big, true_class))
print(f"logits + 1000: naive = {naive_big}, xentjax = {safe_big:.6f}")
assert math.isnan(naive_big)
assert abs(safe_big - loss_by_hand) < 5e-4  # float32 spacing near 1000 is ~6e-5

# underflow: a confidently wrong model. The true class's probability is e^-2000,
# which is 0 in any floating-point format, so -log(q) is inf -- but the loss is
# simply 2000 (minus a tiny correction) when computed as LSE(z) - z_c.
wrong = jnp.array([-1000.0, 0.0, 1000.0])
naive_wrong = float(naive_loss(wrong, 0))
safe_wrong = float(xentjax.softmax_cross_entropy_with_integer_labels(wrong, 0))
print(f"confidently wrong: naive = {naive_wrong}, xentjax = {safe_wrong}")
assert not math.isfinite(naive_wrong)
assert abs(safe_wrong - 2000.0) < 1e-3

# %% [markdown]
# ## What happens at $q = 0$
#
# On probabilities, the loss $-\ln q_c$ and its derivative $-1/q_c$ (more generally
# $\partial H/\partial q_i = -p_i/q_i$, derived in notebook 4) both blow up as
# $q_c \to 0$: a true class with probability exactly $0$ gives a loss of $+\infty$ and a
# gradient that divides by zero. That is the right *mathematical* answer — the
# model declared the observed event impossible — but it wrecks a training run.
# Libraries that accept probabilities therefore clip them to $[\varepsilon, 1]$, an
# opt-in `eps` here, which silently caps the loss at $-\ln\varepsilon$.
#
# Working from logits avoids the problem at its source:
#
# * the loss $\operatorname{LSE}(z) - z_c$ is finite for every finite $z$, growing only
#   linearly as the model becomes more confidently wrong;
# * the gradient with respect to the logits is $\operatorname{softmax}(z) - y$, every
#   component in $[-1, 1]$, however extreme the logits.

# %%
p = jnp.array([1.0, 0.0, 0.0])
q0 = jnp.array([0.0, 0.3, 0.7])
loss_q0 = float(xentjax.categorical_cross_entropy(q0, p))
grad_q0 = xentjax.grads.categorical_cross_entropy(q0, p)
with np.errstate(divide="ignore", invalid="ignore"):
  grad_numpy = -np.asarray(p) / np.asarray(q0)
print("loss on probabilities with q_true = 0:", loss_q0)
print("closed-form gradient -p/q            :", grad_q0, " (numpy:", grad_numpy, ")")
assert loss_q0 == math.inf
assert float(grad_q0[0]) == -math.inf and grad_numpy[0] == -math.inf

eps = 1e-7
clipped = float(xentjax.categorical_cross_entropy(q0, p, eps=eps))
print(f"with eps = {eps:g}: loss = {clipped:.4f} = -ln(eps) = {-math.log(eps):.4f}")
assert abs(clipped - (-math.log(eps))) < 1e-3

# the same prediction expressed as logits: the true class is 1000 nats behind
z0 = jnp.array([-1000.0, 0.0, 0.8473])
loss_z0 = float(xentjax.softmax_cross_entropy(z0, p))
grad_z0 = jax.grad(lambda v: xentjax.softmax_cross_entropy(v, p))(z0)
print(f"from logits: loss = {loss_z0:.4f}, gradient = {np.round(np.asarray(grad_z0), 4)}")
assert math.isfinite(loss_z0) and bool(jnp.all(jnp.abs(grad_z0) <= 1.0))
assert jnp.allclose(grad_z0, jax.nn.softmax(z0) - p, atol=1e-6)
assert jnp.allclose(xentjax.grads.softmax_cross_entropy(z0, p), grad_z0, atol=1e-6)

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.4))
qq = np.linspace(1e-4, 1, 500)
ax1.plot(qq, -np.log(qq), label="loss $-\\ln q_c$")
ax1.plot(qq, -1 / qq, label="gradient $-1/q_c$")
ax1.set(xlabel="$q_c$", ylim=(-10, 10), title="On probabilities: both blow up at 0")
ax1.axhline(0, color="gray", lw=0.6)
ax1.legend()

margin = jnp.linspace(-12, 12, 401)  # z_c minus the other logit (2 classes)
two = jnp.stack([margin, jnp.zeros_like(margin)], axis=-1)
y0 = jnp.broadcast_to(jnp.array([1.0, 0.0]), two.shape)
loss_m = np.asarray(xentjax.softmax_cross_entropy(two, y0))
grad_m = np.asarray(jax.vmap(jax.grad(xentjax.softmax_cross_entropy))(two, y0))[:, 0]
ax2.plot(margin, loss_m, label="loss $\\mathrm{LSE}(z) - z_c$")
ax2.plot(margin, grad_m, label="$\\partial/\\partial z_c = q_c - 1$")
ax2.set(
  xlabel="logit margin $z_c - z_{other}$", ylim=(-2, 12), title="On logits: linear, bounded slope"
)
ax2.axhline(0, color="gray", lw=0.6)
ax2.legend()
plt.tight_layout()
plt.show()
assert np.all(np.isfinite(loss_m)) and np.all(np.abs(grad_m) <= 1.0)
# far on the wrong side the loss is the margin itself: softplus(-m) ~ -m
assert abs(loss_m[0] - 12.0) < 1e-4

# %% [markdown]
# **Take-aways.** Softmax exponentiates and normalizes; only differences of logits
# matter. Compute $-\ln q_c$ as $\operatorname{LSE}(z) - z_c$ with the max subtracted,
# never as $\ln(\text{softmax})$. On probabilities the loss and its gradient $-p/q$
# are infinite at $q = 0$; on logits they are finite, and the gradient is the bounded
# $\operatorname{softmax}(z) - y$ derived in the next notebook.
