"""calibration.fit_streaming against calibration.fit on the concatenated rows and a float64 optimum.

The float64 optimum is the SciPy fit of dirichletcal's objective ported in
``test_calibration_maps.py`` (minimized by L-BFGS-B to a gradient of 1e-10).
"""

import itertools

import jax
import numpy as np
import pytest
import scipy.special as sp
from test_calibration_maps import (
  MAPS,
  _classifier,
  _features64,
  _fit64,
  _objective64,
  _theta_of,
)

from xentjax import calibration as C

_Z, _Y = _classifier(6000, 5, seed=3)
_KEEP = np.ones(len(_Y), bool)
_KEEP[5000::3] = False  # the last batch carries a mask


def _batches(z, y):
  """Uneven batches; the last one as (logits, labels, where)."""
  cuts = [0, 2500, 3100, 5000, len(y)]
  out = [(z[a:b], y[a:b]) for a, b in itertools.pairwise(cuts[:-1])]
  return [*out, (z[5000:], y[5000:], _KEEP[5000:])]


def _probabilities(cal, z):
  return sp.softmax(np.asarray(cal(z), np.float64), 1)


_OPTIMA = {}


def _optimum64(z, y, method, odir):
  """`_fit64`, once per map and rows (the float32 and float64 tests fit the same rows)."""
  key = (method, odir, np.asarray(z, np.float64).tobytes(), np.asarray(y).tobytes())
  if key not in _OPTIMA:
    _OPTIMA[key] = _fit64(z, y, method, odir)
  return _OPTIMA[key]


def _gap(cal, z, y, method, odir):
  """The float64 objective of the map above the float64 optimum's."""
  x, k = _features64(z, method), z.shape[1]
  best, _ = _objective64(_optimum64(z, y, method, odir), x, y, k, method, odir)
  ours, _ = _objective64(_theta_of(cal, method), x, y, k, method, odir)
  return ours - best


@pytest.mark.parametrize("method,odir", MAPS)
def test_fit_streaming_matches_fit_on_the_concatenated_rows(method, odir):
  cal = C.fit_streaming(_batches(_Z, _Y), method, odir)
  ref = C.fit(_Z, _Y, method, odir, where=_KEEP)
  assert cal.method == method and cal.weight.dtype == np.float32
  z, y = _Z[_KEEP], _Y[_KEEP]
  np.testing.assert_allclose(_probabilities(cal, z), _probabilities(ref, z), atol=3e-4)
  assert -1e-9 <= _gap(cal, z, y, method, odir) <= 1e-7


@pytest.mark.parametrize("method,odir", MAPS[:3] + MAPS[4:])
def test_fit_streaming_in_float64_matches_fit(method, odir):
  with jax.enable_x64(True):
    z64 = _Z.astype(np.float64)
    cal = C.fit_streaming(lambda: iter(_batches(z64, _Y)), method, odir)
    ref = C.fit(z64, _Y, method, odir, where=_KEEP)
    assert cal.weight.dtype == np.float64
    z, y = z64[_KEEP], _Y[_KEEP]
    np.testing.assert_allclose(_probabilities(cal, z), _probabilities(ref, z), atol=3e-5)
    assert -1e-12 <= _gap(cal, z, y, method, odir) <= 1e-10


def test_fit_streaming_temperature_is_the_streaming_newton_fit():
  batches = _batches(_Z, _Y)
  cal = C.fit_streaming(batches, "temperature")
  assert cal.method == "temperature" and cal.weight.dtype == np.float32
  np.testing.assert_allclose(float(cal.weight), C.fit_temperature_streaming(batches), rtol=1e-6)
  np.testing.assert_allclose(cal.weight, C.fit(_Z, _Y, where=_KEEP).weight, rtol=1e-5)


@pytest.mark.parametrize("method", ["vector", "dirichlet"])
def test_fit_streaming_of_bad_data_is_nan_like_fit(method):
  z, y = _Z[:400].copy(), _Y[:400].copy()
  bad_label = [(z[:200], y[:200]), (z[200:], np.where(np.arange(200) == 7, 9, y[200:]))]
  nothing = [(z, y, np.zeros(len(y), bool))]
  nan_logit = [(np.where(np.arange(400)[:, None] == 3, np.nan, z), y)]
  for batches in (bad_label, nothing, nan_logit):
    cal = C.fit_streaming(batches, method)
    assert np.all(np.isnan(np.asarray(cal.weight))) and np.all(np.isnan(np.asarray(cal.bias)))
    zz = np.concatenate([b[0] for b in batches])
    yy = np.concatenate([b[1] for b in batches])
    keep = batches[0][2] if len(batches[0]) == 3 else None
    assert np.all(np.isnan(np.asarray(C.fit(zz, yy, method, where=keep).weight)))


def test_fit_streaming_argument_errors():
  batches = _batches(_Z, _Y)
  with pytest.raises(TypeError, match="re-iterable"):
    C.fit_streaming((b for b in batches), "vector")
  with pytest.raises(ValueError, match="no batch"):
    C.fit_streaming([], "matrix")
  with pytest.raises(ValueError, match="`odir` applies"):
    C.fit_streaming(batches, "vector", (0.1, 0.1))
  with pytest.raises(ValueError, match="`method`"):
    C.fit_streaming(batches, "platt")
  with pytest.raises(TypeError, match="each batch"):
    C.fit_streaming([_Z], "vector")
