"""ACE, MCE, smooth ECE and bootstrap intervals against netcal, relplot and float64 NumPy.

netcal (1.4.0) and relplot (1.0.3) are test-only peers (the ``calibration-peers``
extra); each peer test has a float64 NumPy reference beside it that runs without them.
"""

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp

import xentjax
from xentjax import calibration as C

X64 = jax.config.jax_enable_x64


def _data(n=1000, k=5, scale=3.0, seed=0):
  rng = np.random.default_rng(seed)
  z = (rng.normal(size=(n, k)) * scale).astype(np.float32)
  y = rng.integers(0, k, n)
  y[:3] = [0, 1, 2]  # netcal reads fewer than 3 distinct labels as a binary problem
  return z, y


def _calibrated(n, seed=1):
  """Two-class logits whose confidence f ~ U(0.5, 1) is right with probability f."""
  rng = np.random.default_rng(seed)
  f = rng.uniform(0.5, 1.0, n)
  right = rng.uniform(size=n) < f
  z = np.stack([np.log(f), np.log1p(-f)], 1).astype(np.float32)
  return z, np.where(right, 0, 1)


def _conf_correct64(z, y):
  """Max softmax probability and argmax == label, in float64 (no ties in these data)."""
  p = sp.softmax(np.asarray(z, np.float64), -1)
  return p.max(-1), (p.argmax(-1) == y).astype(np.float64)


def _gaps64(conf, correct, b, num_bins):
  gaps, full = np.zeros(num_bins), np.zeros(num_bins, bool)
  for i in range(num_bins):
    sel = b == i
    if sel.any():
      gaps[i], full[i] = abs(correct[sel].mean() - conf[sel].mean()), True
  return gaps, full


def _ace64(z, y, num_bins):
  conf, correct = _conf_correct64(z, y)
  edges = np.quantile(conf, np.linspace(0, 1, num_bins + 1))
  edges[0], edges[-1] = 0.0, 1.0
  b = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, num_bins - 1)
  gaps, full = _gaps64(conf, correct, b, num_bins)
  return gaps[full].mean()


def _mce64(z, y, num_bins):
  conf, correct = _conf_correct64(z, y)
  b = np.clip(np.searchsorted(np.linspace(0, 1, num_bins + 1), conf, "right") - 1, 0, num_bins - 1)
  return _gaps64(conf, correct, b, num_bins)[0].max()


CASES = [(1000, 5, 10, 3.0), (777, 10, 15, 1.0), (50, 3, 7, 2.0), (5000, 20, 30, 0.5)]


# --- ACE and MCE ----------------------------------------------------------------


@pytest.mark.parametrize("n,k,num_bins,scale", CASES)
def test_ace_and_mce_match_float64_numpy(n, k, num_bins, scale):
  z, y = _data(n, k, scale)
  got_ace = float(C.adaptive_calibration_error(z, y, num_bins=num_bins))
  got_mce = float(C.maximum_calibration_error(z, y, num_bins=num_bins))
  np.testing.assert_allclose(got_ace, _ace64(z, y, num_bins), atol=2e-6)
  np.testing.assert_allclose(got_mce, _mce64(z, y, num_bins), atol=2e-6)


@pytest.mark.parametrize("n,k,num_bins,scale", CASES)
def test_ace_and_mce_match_netcal(n, k, num_bins, scale):
  netcal = pytest.importorskip("netcal.metrics")
  z, y = _data(n, k, scale)
  p = sp.softmax(z.astype(np.float64), -1)
  ace = netcal.ACE(bins=num_bins, equal_intervals=False).measure(p, y)
  mce = netcal.MCE(bins=num_bins).measure(p, y)
  np.testing.assert_allclose(C.adaptive_calibration_error(z, y, num_bins=num_bins), ace, atol=2e-6)
  np.testing.assert_allclose(C.maximum_calibration_error(z, y, num_bins=num_bins), mce, atol=2e-6)


def test_ace_weighs_bins_equally_and_ece_by_mass():
  # Equal-mass bins and an equal mean: with one bin per distinct confidence,
  # ACE is the plain mean of the bin gaps and equals the ECE with quantile bins.
  z = np.log(np.array([[0.9, 0.1]] * 4 + [[0.6, 0.4]] * 4, np.float32))
  y = np.array([0, 0, 0, 1, 0, 1, 1, 1])  # bin gaps |0.75 - 0.9| and |0.25 - 0.6|
  np.testing.assert_allclose(C.adaptive_calibration_error(z, y, num_bins=2), 0.25, atol=1e-6)
  np.testing.assert_allclose(C.maximum_calibration_error(z, y, num_bins=10), 0.35, atol=1e-6)
  np.testing.assert_allclose(
    C.expected_calibration_error(z, y, num_bins=2, binning="quantile"), 0.25, atol=1e-6
  )


def test_a_tie_for_the_top_counts_one_over_t():
  # Two classes tied for the top: the library credits 1/2 (netcal's argmax would
  # credit 1 for label 0 and 0 for label 1).
  z = np.array([[1.0, 1.0, -5.0], [1.0, 1.0, -5.0]], np.float32)
  conf = sp.softmax(z[0].astype(np.float64))[0]
  for y in ([0, 0], [1, 1], [0, 1]):
    np.testing.assert_allclose(C.adaptive_calibration_error(z, y), abs(0.5 - conf), atol=1e-6)
    np.testing.assert_allclose(C.maximum_calibration_error(z, y), abs(0.5 - conf), atol=1e-6)


# --- smooth ECE -----------------------------------------------------------------


def _relplot_smece(z, y, bandwidth=None):
  relplot = pytest.importorskip("relplot")
  f, c = relplot.multiclass_logits_to_confidences(np.asarray(z, np.float64), y)
  if bandwidth is not None:
    return relplot.smECE_sigma(f, c, bandwidth), bandwidth
  return relplot.metrics.smECE(f, c, return_width=True)


@pytest.mark.parametrize("n,k,num_bins,scale", CASES)
def test_smooth_ece_matches_relplot(n, k, num_bins, scale):
  z, y = _data(n, k, scale)
  ref, _ = _relplot_smece(z, y)
  np.testing.assert_allclose(C.smooth_ece(z, y), ref, atol=1e-5)
  ref05, _ = _relplot_smece(z, y, 0.05)
  np.testing.assert_allclose(C.smooth_ece(z, y, bandwidth=0.05), ref05, atol=1e-5)


@pytest.mark.parametrize("n", [20_000, 200_000])
def test_smooth_ece_matches_relplot_at_small_bandwidths(n):
  # A calibrated model: smECE ~ 0.004-0.01, so the fixed point is below 0.01 and
  # relplot's grid grows past its 1001 points (the arrays here are sized for 1/512).
  z, y = _calibrated(n)
  ref, sigma = _relplot_smece(z, y)
  assert sigma < 0.011
  np.testing.assert_allclose(C.smooth_ece(z, y), ref, atol=1e-5)
  diagram = C.reliability_diagram(z, y, smooth=True)
  np.testing.assert_allclose(diagram.smooth.bandwidth, sigma, rtol=1e-6)
  np.testing.assert_allclose(diagram.smooth.smece, ref, atol=1e-5)


def _smece_direct64(f, c, sigma):
  """The same smECE from its definition in float64: exact reflected kernel sums, no grid."""
  t = np.linspace(0, 1, max(round(10 / sigma), 200))
  d = t[:, None] - np.concatenate([f, -f, 2 - f])[None, :]
  kern = np.exp(-0.5 * (d / sigma) ** 2) / (np.sqrt(2 * np.pi) * sigma)
  r = np.concatenate([f - c] * 3)
  return np.abs(kern @ r).sum() / kern.sum()


def test_smooth_ece_is_the_kernel_definition_at_small_bandwidth():
  # Below the kernel's truncation (|d| <= 1/2) the grid only discretizes: the
  # direct reflected-Gaussian sums in float64 agree.
  z, y = _data(3000, 4, 2.0)
  f, c = _conf_correct64(z, y)
  np.testing.assert_allclose(
    C.smooth_ece(z, y, bandwidth=0.05), _smece_direct64(f, c, 0.05), atol=2e-4
  )


def test_smooth_ece_bandwidth_is_checked():
  z, y = _data(100, 3)
  with pytest.raises(ValueError, match="bandwidth"):
    C.smooth_ece(z, y, bandwidth=1e-3)


# --- edge inputs (each error on its own definition) -----------------------------

ERRORS = [
  C.adaptive_calibration_error,
  C.maximum_calibration_error,
  C.smooth_ece,
  C.expected_calibration_error,
]


@pytest.mark.parametrize("metric", ERRORS, ids=lambda f: f.__name__)
def test_edge_inputs(metric):
  rng = np.random.default_rng(3)
  z = (rng.normal(size=(60, 4)) * 2).astype(np.float32)
  pred = z.argmax(-1)
  conf, _ = _conf_correct64(z, pred)
  # All correct: each gap is 1 - conf; all wrong: each is conf (smECE too, as a
  # weighted mean of |smoothed residual| with residuals of one sign).
  right, wrong = float(metric(z, pred)), float(metric(z, (pred + 1) % 4))
  assert 0 < right <= (1 - conf).max() + 1e-6 and right >= (1 - conf).min() - 1e-6
  assert conf.min() - 1e-6 <= wrong <= conf.max() + 1e-6
  # A single class present (netcal refuses this; here it is an ordinary input).
  one = np.zeros(60, int)
  np.testing.assert_allclose(metric(z, one), metric(z[:, [0, 1, 2, 3]], one), rtol=0)
  assert np.isfinite(float(metric(z, one)))
  # A NaN row is NaN; masked, it is as if absent; a bad label is NaN; nothing counted is NaN.
  bad = z.copy()
  bad[5, 2] = np.nan
  keep = np.arange(60) != 5
  assert np.isnan(float(metric(bad, pred)))
  np.testing.assert_allclose(metric(bad, pred, where=keep), metric(z[keep], pred[keep]), atol=1e-6)
  assert np.isnan(float(metric(z, np.where(keep, pred, 7))))
  assert np.isnan(float(metric(z, pred, where=np.zeros(60, bool))))


@pytest.mark.parametrize("metric", ERRORS[:3], ids=lambda f: f.__name__)
def test_where_is_boolean_indexing_and_dtype(metric):
  z, y = _data(400, 6, 2.0)
  keep = np.arange(400) % 3 != 1
  np.testing.assert_allclose(metric(z, y, where=keep), metric(z[keep], y[keep]), atol=1e-6)
  out = metric(z.astype(np.float64), y)
  assert out.dtype == (jnp.float64 if X64 else jnp.float32)
  assert metric(z.astype(jnp.bfloat16), y).dtype == jnp.float32


# --- bootstrap ------------------------------------------------------------------


def test_bootstrap_of_a_mean_is_the_normal_interval():
  # A metric with a known sampling distribution: the mean of the first logit.
  rng = np.random.default_rng(4)
  z = rng.normal(size=(4000, 2)).astype(np.float32)
  y = np.zeros(4000, int)

  def mean0(logits, labels):
    return jnp.mean(logits[:, 0])

  est, low, high = C.bootstrap(mean0, z, y, n=2000, key=jax.random.key(0))
  np.testing.assert_allclose(est, z[:, 0].mean(), rtol=1e-5)
  half = statistics.NormalDist().inv_cdf(0.975) * z[:, 0].std() / np.sqrt(4000)
  np.testing.assert_allclose([low, high], [est - half, est + half], atol=0.12 * half)


def test_bootstrap_is_deterministic_and_contains_the_estimate():
  z, y = _calibrated(3000, seed=5)
  ece40 = functools.partial(C.expected_calibration_error, num_bins=40)
  a = C.bootstrap(ece40, z, y, n=300, key=jax.random.key(1))
  b = C.bootstrap(ece40, z, y, n=300, key=jax.random.key(1))
  c = C.bootstrap(ece40, z, y, n=300, key=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert float(a[1]) != float(c[1])
  est, low, high = (float(v) for v in a)
  np.testing.assert_allclose(est, C.expected_calibration_error(z, y, num_bins=40), rtol=1e-6)
  assert low <= est <= high and low < high


def test_bc_interval_formula():
  # Efron's BC interval on given replicates, against SciPy's normal quantiles.
  rng = np.random.default_rng(6)
  reps = rng.gamma(2.0, size=999).astype(np.float32)
  for est in (1.2, 2.0, 3.5):
    p = np.mean(reps < est)
    z0 = sp.ndtri(p)
    za = sp.ndtri(0.05)
    lo, hi = np.quantile(reps, sp.ndtr([2 * z0 + za, 2 * z0 - za]))
    got = C._bc_interval(jnp.float32(est), jnp.asarray(reps), 0.9)
    np.testing.assert_allclose(got, [min(lo, est), max(hi, est)], rtol=1e-5)
  # All replicates above the estimate (a biased metric): the interval still holds it.
  low, high = C._bc_interval(jnp.float32(0.0), jnp.asarray(reps), 0.95)
  assert float(low) == 0.0 and float(high) >= 0.0


def test_bootstrap_where_draws_only_counted_rows():
  z, y = _data(500, 4)
  keep = np.arange(500) < 300
  junk = z.copy()
  junk[~keep] = np.nan  # a drawn uncounted row would make a replicate NaN
  est, low, high = C.bootstrap(
    C.adaptive_calibration_error, junk, y, n=100, key=jax.random.key(3), where=keep
  )
  np.testing.assert_allclose(est, C.adaptive_calibration_error(z[:300], y[:300]), rtol=1e-6)
  assert np.isfinite([low, high]).all() and low <= est <= high


def test_bootstrap_nan_and_smooth_ece():
  z, y = _data(300, 3)
  bad = z.copy()
  bad[0, 0] = np.nan
  assert np.isnan(C.bootstrap(C.smooth_ece, bad, y, n=20, key=jax.random.key(0))).all()
  est, low, high = C.bootstrap(C.smooth_ece, z, y, n=20, key=jax.random.key(0))
  np.testing.assert_allclose(est, C.smooth_ece(z, y), rtol=1e-6)
  assert low <= est <= high


def _gathered_replicates(metric, z, y, keep, n, key):
  """The metric on each resample's gathered rows, drawn as `bootstrap` documents its draws."""
  counted = np.ones(len(y), bool) if keep is None else keep
  order = np.argsort(~counted, kind="stable")
  m = int(counted.sum())
  reps = []
  for k in jax.random.split(key, n):
    pick = np.asarray(jax.random.randint(k, (len(y),), 0, m))
    rows = order[pick][:m]
    reps.append(float(metric(z[rows], y[rows])))
  return np.asarray(reps, np.float32)


BOOTSTRAPPED = {
  "ece": C.expected_calibration_error,
  "ece-quantile": functools.partial(C.expected_calibration_error, binning="quantile", num_bins=9),
  "ace": functools.partial(C.adaptive_calibration_error, num_bins=7),
  "mce": C.maximum_calibration_error,
  "smooth": C.smooth_ece,
  "smooth-0.03": functools.partial(C.smooth_ece, bandwidth=0.03),
  "brier": C.brier_score,
  "nll-bits": functools.partial(xentjax.metrics.cross_entropy_rate, base=2),
}


@pytest.mark.parametrize("name", list(BOOTSTRAPPED))
@pytest.mark.parametrize("rows", [600, 11])
def test_bootstrap_by_weights_is_the_metric_of_each_gathered_resample(name, rows):
  # The library's metrics are bootstrapped as weighted reductions; the reference
  # gathers each resample's rows and evaluates the metric on them (11 rows: rows
  # drawn many times span several equal-mass bins).
  metric = BOOTSTRAPPED[name]
  z, y = _data(rows, 4, seed=7)
  keep = None if rows == 11 else np.arange(rows) % 5 != 0
  key = jax.random.key(8)
  reps = _gathered_replicates(metric, z, y, keep, 40, key)
  counted = jnp.ones(rows, bool) if keep is None else jnp.asarray(keep)
  order, m = jnp.argsort(~counted, stable=True), jnp.sum(counted).astype(jnp.int32)
  weighted = C._weighted_metric(metric)
  assert weighted is not None
  got = C._weighted_replicates(*weighted, z, y, counted, order, m, jax.random.split(key, 40))
  np.testing.assert_allclose(got, reps, rtol=2e-6, atol=5e-7)
  if rows == 11:  # few distinct replicates: ties at the estimate make the interval jump
    return
  est, low, high = C.bootstrap(metric, z, y, n=40, key=key, where=keep)
  ref_est = metric(z[keep], y[keep])
  ref = C._bc_interval(jnp.float32(ref_est), jnp.asarray(reps), 0.95)
  np.testing.assert_allclose(est, ref_est, rtol=1e-6)
  np.testing.assert_allclose([low, high], ref, rtol=2e-5, atol=2e-6)


def test_bootstrap_knows_the_library_metrics_and_gathers_for_the_others():
  assert C._weighted_metric(C.smooth_ece) == ("smooth", {"bandwidth": None})
  assert C._weighted_metric(functools.partial(C.adaptive_calibration_error, num_bins=4)) == (
    "ace",
    {"num_bins": 4},
  )
  classwise = functools.partial(C.expected_calibration_error, classwise=True)
  assert C._weighted_metric(classwise) is None  # gathered
  assert C._weighted_metric(functools.partial(C.brier_score, where=None)) is None
  assert C._weighted_metric(lambda z, y: C.brier_score(z, y)) is None
  z, y = _data(300, 3)
  est, low, high = C.bootstrap(classwise, z, y, n=30, key=jax.random.key(0))
  np.testing.assert_allclose(est, classwise(z, y), rtol=1e-6)
  assert low <= est <= high
