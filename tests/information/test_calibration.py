"""xentjax.calibration against float64 references (SciPy's scalar minimizer, NumPy formulas)."""

import jax
import numpy as np
import pytest
import scipy.optimize
import scipy.special as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import xentjax as L
from xentjax import calibration as C

X64 = jax.config.jax_enable_x64


def _overconfident(n=1500, k=8, scale=5.0, seed=0):
  """Logits of an over-confident classifier: right 60% of the time, sure of itself."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n)
  z = rng.normal(size=(n, k))
  z[np.arange(n), y] += 1.2
  return (z * scale).astype(np.float32), y


Z, Y = _overconfident()


def _mean_ce64(z, y, t):
  z = np.asarray(z, np.float64) / t
  if y.ndim == z.ndim:
    return np.mean(-(y * (z - sp.logsumexp(z, -1, keepdims=True))).sum(-1))
  return np.mean(sp.logsumexp(z, -1) - z[np.arange(len(y)), y])


def _scipy_temperature(z, y):
  res = scipy.optimize.minimize_scalar(
    lambda s: _mean_ce64(z, y, np.exp(s)),
    bounds=(-6, 6),
    method="bounded",
    options={"xatol": 1e-12},
  )
  return float(np.exp(res.x))


# --- temperature --------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.3, 5.0])
def test_fit_temperature_matches_scipy(scale):
  z, y = _overconfident(scale=scale, seed=1)
  expected = _scipy_temperature(z, y)
  got = float(C.fit_temperature(z, y))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert (got > 1) == (scale == 5.0)  # over-confident -> T > 1; under-confident -> T < 1
  # Soft labels (one-hot) give the same; where drops rows like boolean indexing.
  np.testing.assert_allclose(C.fit_temperature(z, np.eye(8, dtype=np.float32)[y]), got, rtol=1e-5)
  keep = np.arange(len(y)) % 3 != 0
  np.testing.assert_allclose(
    C.fit_temperature(z, y, where=keep), _scipy_temperature(z[keep], y[keep]), rtol=1e-5
  )


def test_fit_temperature_streaming_equals_in_memory():
  batches = [(Z[i : i + 400], Y[i : i + 400]) for i in range(0, len(Y), 400)]  # ragged last
  got = C.fit_temperature_streaming(batches)
  np.testing.assert_allclose(got, _scipy_temperature(Z, Y), rtol=1e-5)
  np.testing.assert_allclose(got, float(C.fit_temperature(Z, Y)), rtol=1e-5)
  # A zero-argument callable works; a one-shot generator is refused with advice.
  np.testing.assert_allclose(C.fit_temperature_streaming(lambda: iter(batches)), got, rtol=1e-7)
  with pytest.raises(TypeError, match="re-iterable"):
    C.fit_temperature_streaming(b for b in batches)


def test_temperature_statistics_add_up_and_match_float64():
  grid = np.log([0.5, 1.0, 3.0])
  whole = C.temperature_statistics(Z, Y, grid)
  parts = C.temperature_statistics(Z[:700], Y[:700], grid).add(
    C.temperature_statistics(Z[700:], Y[700:], grid)
  )
  for a, b in zip(whole[1:], parts[1:]):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  n = len(Y)
  expected = [n * _mean_ce64(Z, Y, t) for t in np.exp(grid)]
  np.testing.assert_allclose(whole.loss, expected, rtol=1e-5)
  # d1 is the derivative in log T: central differences of the float64 loss.
  h = 1e-5
  fd = [
    n * (_mean_ce64(Z, Y, np.exp(s + h)) - _mean_ce64(Z, Y, np.exp(s - h))) / (2 * h) for s in grid
  ]
  np.testing.assert_allclose(whole.d1, fd, rtol=1e-4, atol=1e-2)
  assert int(whole.count) == n


@settings(max_examples=15, deadline=None)
@given(
  seed=st.integers(0, 2**16),
  scale=st.floats(0.05, 20.0),
  n=st.integers(2, 40),
)
def test_fitted_cross_entropy_never_above_the_logits(seed, scale, n):
  z, y = _overconfident(n=n, k=4, scale=scale, seed=seed)
  t = C.fit_temperature(z, y)
  before = L.softmax_cross_entropy_with_integer_labels(z, y).mean()
  after = L.softmax_cross_entropy_with_integer_labels(z / t, y).mean()
  assert after <= before + 1e-6 * abs(before)


def test_fit_temperature_edge_cases():
  # Separable data: the loss keeps falling as T -> 0; the fit stops where it
  # is 0 to working precision (or at the lower bound).
  z = np.array([[3.0, 0.0], [0.0, 3.0]], np.float32)
  t = C.fit_temperature(z, np.array([0, 1]))
  assert 1e-3 <= t < 0.05 and _mean_ce64(z, np.array([0, 1]), float(t)) < 1e-12
  assert np.isnan(C.fit_temperature(z, np.array([0, 2])))  # out-of-range label
  assert np.isnan(C.fit_temperature(z, np.array([0, 1]), where=np.array([False, False])))
  with pytest.raises(ValueError, match="bounds"):
    C.fit_temperature(z, np.array([0, 1]), bounds=(2.0, 3.0))


def test_fit_temperature_of_non_finite_data_is_nan_like_the_streaming_fit():
  # A NaN row once fitted T = 1.0 (a plausible number);
  # the convention, and `fit_temperature_streaming`, say NaN.
  z, y = _overconfident(n=64, k=4, scale=3.0, seed=3)
  finite = float(C.fit_temperature(z, y))
  assert np.isfinite(finite) and finite != 1.0  # the data alone fit a real temperature
  for bad_row in ([np.nan, 0.0, 1.0, 2.0], [-np.inf, 0.0, 1.0, 2.0]):  # NaN; -inf on the label
    zz = np.concatenate([z, np.array([bad_row], z.dtype)])
    yy = np.concatenate([y, [0]])
    assert np.isnan(C.fit_temperature(zz, yy)), bad_row
    assert np.isnan(C.fit_temperature_streaming([(zz, yy)])), bad_row
    # Masked out, the row does not count: the fit of the finite data again.
    keep = np.arange(len(yy)) < len(y)
    np.testing.assert_allclose(C.fit_temperature(zz, yy, where=keep), finite, rtol=1e-6)
  # -inf on a class other than the label is data, not an error.
  zz = np.concatenate([z, np.array([[3.0, -np.inf, 0.0, 1.0]], z.dtype)])
  assert np.isfinite(C.fit_temperature(zz, np.concatenate([y, [0]])))


# --- ECE, Brier, reliability --------------------------------------------------


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  return np.exp(z - sp.logsumexp(z, -1, keepdims=True))


def _np_ece(conf, correct, num_bins, binning):
  n = len(conf)
  if binning == "uniform":
    b = np.clip(np.floor(conf * num_bins).astype(int), 0, num_bins - 1)
  else:
    rank = np.empty(n, int)
    rank[np.argsort(conf, kind="stable")] = np.arange(n)
    b = rank * num_bins // n
  return sum(abs(correct[b == i].sum() - conf[b == i].sum()) for i in range(num_bins)) / n


@pytest.mark.parametrize("binning", ["uniform", "quantile"])
def test_ece_matches_numpy(binning):
  p = _np_softmax(Z)
  conf, correct = p.max(-1), (p.argmax(-1) == Y).astype(float)
  got = C.expected_calibration_error(Z, Y, num_bins=10, binning=binning)
  np.testing.assert_allclose(got, _np_ece(conf, correct, 10, binning), rtol=1e-5, atol=1e-7)
  # Classwise (Kull et al. 2019): per class, confidence p_k against [y = k].
  expected = np.mean(
    [_np_ece(p[:, k], (k == Y).astype(float), 10, binning) for k in range(p.shape[1])]
  )
  got = C.expected_calibration_error(Z, Y, num_bins=10, binning=binning, classwise=True)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_ece_tie_rule_is_fractional_credit_and_agrees_with_evaluate():
  # A constant model over 4 classes: every row a 4-way tie, confidence 1/4,
  # credit 1/4, so the ECE is 0 (a full-hit rule would say 3/4).
  z = np.zeros((8, 4), np.float32)
  y = np.arange(8) % 4
  np.testing.assert_allclose(C.expected_calibration_error(z, y), 0.0, atol=1e-7)
  # On logits without ties evaluate reports the same uniform-bin ECE.
  res = L.evaluate([(Z, Y)], num_bins=15)
  np.testing.assert_allclose(
    C.expected_calibration_error(Z, Y, num_bins=15), res.expected_calibration_error, rtol=1e-5
  )


def test_temperature_scaling_improves_calibration():
  t = C.fit_temperature(Z, Y)
  assert C.expected_calibration_error(Z / t, Y) < 0.5 * C.expected_calibration_error(Z, Y)
  assert C.brier_score(Z / t, Y) < C.brier_score(Z, Y)


def test_brier_matches_numpy_and_masks():
  p = _np_softmax(Z)
  onehot = np.eye(8)[Y]
  expected = ((p - onehot) ** 2).sum(-1).mean()
  np.testing.assert_allclose(C.brier_score(Z, Y), expected, rtol=1e-5)
  soft = np.random.default_rng(3).dirichlet(np.ones(8), len(Y))
  np.testing.assert_allclose(
    C.brier_score(Z, soft.astype(np.float32)), ((p - soft) ** 2).sum(-1).mean(), rtol=1e-5
  )
  keep = Y != 3
  np.testing.assert_allclose(
    C.brier_score(Z, Y, where=keep), ((p - onehot)[keep] ** 2).sum(-1).mean(), rtol=1e-5
  )
  assert np.isnan(C.brier_score(Z[:2], np.array([0, 8])))


def test_brier_of_confident_and_non_finite_rows():
  # Confident rows: 1 - softmax(z)_y, or sum_j p_j^2 - 2 p_y + 1, is a
  # difference of numbers near 1 (absolute error ~1e-7 in float32: row 0's
  # Brier score 2.5e-17 would come out 8.5e-18); the core sums the other
  # classes' probabilities instead.
  z = np.array(
    [[20.0, 0, 0, -30], [9.0, 0, 0, -1], [12.0, 2, 1, 0], [7.0, 7, 0, 0], [0.5, 0, 8, 1]],
    np.float32,
  )
  y = np.array([0, 0, 1, 0, 2])
  p = _np_softmax(z)
  per_row = ((p - np.eye(4)[y]) ** 2).sum(-1)
  for i in range(len(y)):
    np.testing.assert_allclose(C.brier_score(z[i : i + 1], y[i : i + 1]), per_row[i], rtol=1e-5)
  res = L.evaluate([(z, y)])
  np.testing.assert_allclose(res.brier_score, per_row.mean(), rtol=1e-5)
  np.testing.assert_allclose(
    L.evaluate([(z[:2], y[:2])]).brier_score, per_row[:2].mean(), rtol=1e-5
  )
  # Every logit -inf: all classes tied (confidence 1/K), the uniform score 1 - 1/K;
  # a NaN logit: NaN. The same in both.
  empty = np.array([[-np.inf] * 4], np.float32)
  np.testing.assert_allclose(C.brier_score(empty, np.array([1])), 1 - 1 / 4, rtol=1e-7)
  np.testing.assert_allclose(L.evaluate([(empty, np.array([1]))]).brier_score, 0.75, rtol=1e-7)
  uniform = np.full((1, 4), 0.25, np.float32)
  soft = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)
  np.testing.assert_allclose(C.brier_score(empty, soft), ((uniform - soft) ** 2).sum(), rtol=1e-6)
  np.testing.assert_allclose(
    L.evaluate([(empty, soft)]).brier_score, ((uniform - soft) ** 2).sum(), rtol=1e-6
  )
  nan_row = np.array([[0.0, np.nan, 1.0, 2.0]], np.float32)
  assert np.isnan(C.brier_score(nan_row, np.array([0])))
  assert np.isnan(L.evaluate([(nan_row, np.array([0]))]).brier_score)


def test_reliability_diagram_bins_and_plot(tmp_path):
  import matplotlib

  matplotlib.use("Agg")
  for binning in ("uniform", "quantile"):
    d = C.reliability_diagram(Z, Y, num_bins=10, binning=binning)
    assert d.count.sum() == len(Y)
    np.testing.assert_allclose(
      d.ece, C.expected_calibration_error(Z, Y, num_bins=10, binning=binning), rtol=1e-5
    )
    p = _np_softmax(Z)
    conf = p.max(-1)
    full = d.count > 0
    # Per-bin mean confidence against NumPy (uniform bins: [b/10, (b+1)/10)).
    if binning == "uniform":
      b = np.clip(np.floor(conf * 10).astype(int), 0, 9)
      ref = np.array([conf[b == i].mean() if (b == i).any() else np.nan for i in range(10)])
      np.testing.assert_allclose(d.confidence[full], ref[full], rtol=1e-5)
    ax = d.plot()
    ax.figure.savefig(tmp_path / f"{binning}.png")
    assert (tmp_path / f"{binning}.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="binning"):
    C.reliability_diagram(Z, Y, binning="equal")
  with pytest.raises(ValueError, match="num_bins"):
    C.expected_calibration_error(Z, Y, num_bins=0)


def test_one_pass_grid_temperature_matches_the_newton_fit():
  z, y = _overconfident(n=4000, scale=5.0, seed=5)
  exact = float(C.fit_temperature(z, y))
  grid = C.temperature_grid(float(C.fit_temperature(z[:500], y[:500])))  # first batch only
  assert grid.shape == (20,) and np.any(grid == 0.0)  # T = 1 is a node
  st = None
  for i in range(0, len(y), 1000):
    part = C.temperature_statistics(z[i : i + 1000], y[i : i + 1000], grid)
    st = part if st is None else st.add(part)
  t, h = C.temperature_from_statistics(st)
  np.testing.assert_allclose(t, exact, rtol=1e-6)
  assert h <= 0.03 + 1e-6  # bracketed on the fine part of the grid
  # A first estimate far off still brackets the minimum on the coarse nodes.
  st_far = C.temperature_statistics(z, y, C.temperature_grid(0.2))
  t_far, h_far = C.temperature_from_statistics(st_far)
  np.testing.assert_allclose(t_far, exact, rtol=2e-3)
  assert h_far > 0.03


# --- evaluate: Brier score, temperature, reliability; `xentjax evaluate --plot` ----------


def test_evaluate_reports_brier_and_temperature_in_one_pass():
  z, y = _overconfident(n=3000, scale=5.0, seed=9)
  y = y.copy()
  y[::10] = -100  # ignored rows leave every calibration figure
  keep = y != -100
  batches = [(z[i : i + 700], y[i : i + 700]) for i in range(0, len(y), 700)]  # ragged last
  r = L.evaluate(batches, progress=False, temperature=True)
  np.testing.assert_allclose(r.brier_score, C.brier_score(z[keep], y[keep]), rtol=1e-5)
  exact = _scipy_temperature(z[keep], y[keep])
  np.testing.assert_allclose(r.temperature, exact, rtol=1e-5)  # one pass, no second
  d = r.reliability_diagram()
  assert d.count.sum() == keep.sum()
  np.testing.assert_allclose(d.ece, r.expected_calibration_error, rtol=1e-9)
  # Soft (one-hot) labels give the same figures.
  soft = np.eye(8, dtype=np.float32)[y[keep]]
  r2 = L.evaluate([(z[keep], soft)], progress=False, temperature=True)
  np.testing.assert_allclose(
    [r2.brier_score, r2.temperature], [r.brier_score, r.temperature], rtol=1e-5
  )


def test_evaluate_calibration_fields_nan_without_data_or_with_bad_labels():
  z = np.zeros((4, 3), np.float32)
  r = L.evaluate([(z, np.full(4, -100))], progress=False, temperature=True)
  assert np.isnan(r.brier_score) and np.isnan(r.temperature)
  assert L.evaluate([(z, np.zeros(4, int))], progress=False).temperature is None  # opt-in
  r = L.evaluate([(z, np.array([0, 1, 2, 3]))], progress=False, temperature=True)
  assert np.isnan(r.brier_score) and np.isnan(r.temperature)


def test_cli_evaluate_plot_writes_the_reliability_diagram(tmp_path, capsys):
  from xentjax.cli._main import main

  z, y = _overconfident(n=500, seed=4)
  np.save(tmp_path / "z.npy", z)
  np.save(tmp_path / "y.npy", y)
  png = tmp_path / "reliability.png"
  argv = ["evaluate", "--no-progress", "--logits", str(tmp_path / "z.npy")]
  code = main([*argv, "--labels", str(tmp_path / "y.npy"), "--plot", str(png), "--temperature"])
  out, err = capsys.readouterr()
  assert code == 0, err
  assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "Brier score" in out and "temperature" in out and str(png) in err
  code = main([*argv, "--labels", str(tmp_path / "y.npy"), "--plot", str(tmp_path / "no/x.png")])
  out, err = capsys.readouterr()
  assert code != 0 and "--plot" in err
