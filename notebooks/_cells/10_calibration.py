# %% [markdown]
# # 10. Calibration: reliability diagrams and temperature scaling
#
# A classifier that says "90% sure" should be right nine times out of ten. Cross-entropy
# rewards that, but a model trained until it fits its training set exactly keeps
# growing its logits and ends up **over-confident** on new data: its probabilities are
# sharper than its accuracy justifies. This notebook trains such a model on the shipped
# digits, measures its miscalibration (reliability diagram, expected calibration error,
# Brier score), and fixes it with **temperature scaling** (Guo et al., 2017): one number
# $T > 0$, fitted on held-out data, that divides every logit.

# %%
# %matplotlib inline
import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import xentjax
from xentjax import calibration, datasets, train

plt.rcParams.update({"figure.dpi": 80})
print("xentjax", xentjax.__version__, "| jax", jax.__version__, "| x64:", jax.config.jax_enable_x64)

# %% [markdown]
# ## An over-confident classifier
#
# A linear softmax classifier trained with Adam on only 120 of the 1,347 training
# digits, for 150 epochs and without weight decay: it fits those 120 images
# perfectly, so nothing stops its weights (and its logits) from growing. The 450 test
# digits are split in two: a **calibration** half, on which the temperature will be
# fitted, and an **evaluation** half that the fit never sees.

# %%
x_tr, y_tr, x_te, y_te = datasets.load_digits()
params = train.init_linear(jax.random.key(0), 64, 10)
params, history = train.fit(
  params, optax.adam(0.1), (x_tr[:120], y_tr[:120]), epochs=150, batch_size=120, seed=0
)
z_cal, y_cal = train.linear_logits(params, x_te[::2]), y_te[::2]
z_eval, y_eval = train.linear_logits(params, x_te[1::2]), y_te[1::2]
print(f"train accuracy {history['train_accuracy'][-1]:.3f}")
print(f"evaluation accuracy {xentjax.metrics.accuracy(z_eval, y_eval):.3f}")
print(f"mean confidence {jax.nn.softmax(z_eval).max(-1).mean():.3f}")

# %% [markdown]
# The mean confidence is above the accuracy: the model is over-confident.
#
# ## The reliability diagram and the ECE
#
# Sort the predictions into bins by confidence $c = \max_k \mathrm{softmax}(z)_k$; in each
# bin compare the mean confidence with the fraction that is right. A calibrated model
# has bars on the diagonal. The **expected calibration error** is the gap averaged over
# the bins, weighted by their counts:
#
# $$\mathrm{ECE} = \sum_b \frac{n_b}{N}\,\lvert \mathrm{acc}_b - \mathrm{conf}_b \rvert .$$
#
# (A prediction tied for the top among $t$ classes counts $1/t$ of a hit, the rule used
# by `xentjax.metrics` and `xentjax.evaluate` too.) The **Brier score**
# $\frac1N \sum_i \lVert \mathrm{softmax}(z_i) - \mathrm{onehot}(y_i) \rVert^2$ measures
# calibration and sharpness together.

# %%
before = calibration.reliability_diagram(z_eval, y_eval, num_bins=10)
print("bin      count  confidence  accuracy")
for lo, hi, n, c, a in zip(
  before.lower, before.upper, before.count, before.confidence, before.accuracy, strict=True
):
  if n:
    print(f"[{lo:.1f}, {hi:.1f})  {n:5d}  {c:10.3f}  {a:8.3f}")
print(f"ECE {before.ece:.4f}   Brier {calibration.brier_score(z_eval, y_eval):.4f}")

# %% [markdown]
# ## Temperature scaling
#
# $T$ minimizes the mean cross-entropy of $z / T$ on the calibration half:
#
# $$T^\star = \arg\min_{T>0} \frac1N \sum_i \Big[\log \sum_k e^{z_{ik}/T} - z_{i y_i}/T\Big].$$
#
# The objective is convex in $\beta = 1/T$ (a log-sum-exp minus a linear term), and its
# first two derivatives in $s = \log T$ are sums over examples:
# $\partial_s \ell = -\beta\,(\mathbb{E}_p[z] - z_y)$ and
# $\partial_s^2 \ell = \beta^2\,\mathrm{Var}_p[z] + \beta\,(\mathbb{E}_p[z] - z_y)$ with
# $p = \mathrm{softmax}(\beta z)$. `calibration.fit_temperature` takes safeguarded Newton
# steps in $s$ with these exact derivatives, inside one `jit`. $T > 1$ softens the
# probabilities; dividing by $T$ never changes which class is predicted, so the
# accuracy stays the same.

# %%
T = float(calibration.fit_temperature(z_cal, y_cal))
ce = xentjax.softmax_cross_entropy_with_integer_labels
after = calibration.reliability_diagram(z_eval / T, y_eval, num_bins=10)
print(f"T = {T:.4f}")
print(f"cross-entropy  {ce(z_eval, y_eval).mean():.4f} -> {ce(z_eval / T, y_eval).mean():.4f}")
print(f"ECE            {before.ece:.4f} -> {after.ece:.4f}")
b0, b1 = calibration.brier_score(z_eval, y_eval), calibration.brier_score(z_eval / T, y_eval)
print(f"Brier          {b0:.4f} -> {b1:.4f}")
assert T > 1 and after.ece < before.ece and b1 < b0
assert ce(z_cal / T, y_cal).mean() <= ce(z_cal, y_cal).mean()  # never worse where it is fitted

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
before.plot(axes[0], title=f"before: ECE {before.ece:.3f}")
after.plot(axes[1], title=f"after T = {T:.2f}: ECE {after.ece:.3f}")
fig.tight_layout()

# %% [markdown]
# ## Checking the fit
#
# The Newton fit agrees with a general-purpose scalar minimizer, and the same fit
# streamed over batches (one pass per Newton step, the sums accumulated over batches)
# gives the same temperature: that is how to calibrate on data that does not fit in
# memory.

# %%
from scipy.optimize import minimize_scalar


def mean_ce(log_t):
  return float(ce(z_cal / np.exp(log_t), y_cal).mean())


t_scipy = float(np.exp(minimize_scalar(mean_ce, bounds=(-3, 3), method="bounded").x))
batches = [(z_cal[i : i + 50], y_cal[i : i + 50]) for i in range(0, len(y_cal), 50)]
t_stream = calibration.fit_temperature_streaming(batches)
print(f"Newton {T:.5f}   SciPy {t_scipy:.5f}   streamed {t_stream:.5f}")
assert abs(t_scipy / T - 1) < 1e-3 and abs(t_stream / T - 1) < 1e-5

# %% [markdown]
# ## Equal-mass bins, and the classwise ECE
#
# Equal-width bins leave the low-confidence bins nearly empty for a confident model;
# equal-mass ("quantile") bins give every bin the same number of predictions. The
# classwise ECE (Kull et al., 2019) checks every class's probability, not only the top
# one. A single temperature is fitted to the top-label loss: it moves the top-label ECE
# in both binnings, and need not improve the classwise one (here it barely moves).

# %%
for binning in ("uniform", "quantile"):
  e0 = calibration.expected_calibration_error(z_eval, y_eval, num_bins=10, binning=binning)
  e1 = calibration.expected_calibration_error(z_eval / T, y_eval, num_bins=10, binning=binning)
  print(f"{binning:8s}  top-label ECE {e0:.4f} -> {e1:.4f}")
e0 = calibration.expected_calibration_error(z_eval, y_eval, classwise=True)
e1 = calibration.expected_calibration_error(z_eval / T, y_eval, classwise=True)
print(f"classwise ECE          {e0:.4f} -> {e1:.4f}")

# %% [markdown]
# ## Beyond one temperature: vector, matrix and Dirichlet maps
#
# A temperature rescales every logit alike. `calibration.fit` also fits the maps of
# dirichletcal (Kull et al., 2019), each by exact minimization of the mean
# cross-entropy on the calibration half: **vector** scaling $a \odot z + b$ (a scale
# and a bias per class), **matrix** scaling $W z + b$ and **Dirichlet** calibration
# $W \log \mathrm{softmax}(z) + b$. With 10 classes and 225 calibration digits the
# last two have 110 parameters each, so they are regularized with ODIR,
# $\lambda \sum_{i \ne j} W_{ij}'^2 + \mu \sum_i b_i'^2$ (dirichletcal's `reg_lambda`,
# `reg_mu`). Each map returns a callable `Calibrator`.
#
# The table compares them on the evaluation half with the cross-entropy, the ECE,
# netcal's equal-mass **ACE** (every non-empty bin weighs the same) and relplot's
# **smooth ECE** (a kernel-smoothed reliability curve, no bins), the last with a 95%
# bias-corrected bootstrap interval: on 225 digits the errors are uncertain to a
# few hundredths, which is the scale of the differences between the maps.

# %%
maps = {"none": None, "temperature": calibration.fit(z_cal, y_cal)}
maps["vector"] = calibration.fit(z_cal, y_cal, "vector")
for method in ("matrix", "dirichlet"):
  maps[method] = calibration.fit(z_cal, y_cal, method, odir=(1e-2, 1e-2))
print(f"{'map':12s} {'NLL':>6s} {'ECE':>6s} {'ACE':>6s}  smooth ECE [95% interval]")
for name, cal in maps.items():
  z = z_eval if cal is None else cal(z_eval)
  nll = float(ce(z, y_eval).mean())
  ece = float(calibration.expected_calibration_error(z, y_eval, num_bins=10))
  ace = float(calibration.adaptive_calibration_error(z, y_eval, num_bins=10))
  sm, lo, hi = calibration.bootstrap(
    calibration.smooth_ece, z, y_eval, n=300, key=jax.random.key(0)
  )
  print(f"{name:12s} {nll:6.3f} {ece:6.3f} {ace:6.3f}  {sm:.3f} [{lo:.3f}, {hi:.3f}]")
  # Where it is fitted, a map is never worse than no map (its objective starts at identity).
  fitted = z_cal if cal is None else cal(z_cal)
  assert ce(fitted, y_cal).mean() <= ce(z_cal, y_cal).mean() + 1e-5

# %% [markdown]
# Matrix scaling has the lowest held-out cross-entropy here. The smooth reliability
# curve of `smooth_ece` draws the calibration without bins: below the diagonal means
# over-confident.

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
calibration.reliability_diagram(z_eval, y_eval, num_bins=10, smooth=True, ax=axes[0])
axes[0].set_title("before")
d = calibration.reliability_diagram(
  maps["matrix"](z_eval), y_eval, num_bins=10, smooth=True, ax=axes[1]
)
axes[1].set_title(f"matrix scaling (smooth ECE {d.smooth.smece:.3f})")
plt.tight_layout()
plt.show()
