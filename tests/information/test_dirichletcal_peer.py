"""calibration.fit(method="dirichlet", odir=...) against dirichletcal's own fit.

dirichletcal 0.5.x needs Python >= 3.12 (this package supports 3.11) and turns
on ``jax_enable_x64`` for its whole process when imported, so it runs in its
own interpreter (``benchmarks/_dirichletcal_peer.py``): the one named by
``XENTJAX_DIRICHLETCAL_PYTHON``, or ``.dirichletcal-venv/bin/python`` at the
repository root, which ``.ci/run`` builds where a Python 3.12 exists. Where
neither exists the test is skipped with that reason; the float64 SciPy fit of
the ported objective in test_calibration_maps.py runs everywhere.
"""

import os
import pathlib
import subprocess

import jax
import numpy as np
import pytest
import scipy.special as sp

from xentjax import calibration as C

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _peer_python():
  named = os.environ.get("XENTJAX_DIRICHLETCAL_PYTHON")
  if named:
    return named
  local = ROOT / ".dirichletcal-venv" / "bin" / "python"
  return str(local) if local.exists() else None


PEER = _peer_python()


def _over_confident(n, k, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n)
  z = rng.normal(size=(n, k))
  z[np.arange(n), y] += 1.5
  z = 4.0 * z + rng.normal(size=k)
  return z.astype(np.float32), y


@pytest.mark.skipif(PEER is None, reason="no interpreter with dirichletcal (needs Python >= 3.12)")
@pytest.mark.parametrize("odir", [(1e-3, 1e-2), (1e-1, 1e-1)])
def test_dirichlet_fit_matches_dirichletcal(tmp_path, odir):
  z, y = _over_confident(3000, 5, seed=1)
  probs = sp.softmax(z.astype(np.float64), 1)
  np.savez(tmp_path / "in.npz", probs=probs, labels=y, odir=np.asarray(odir))
  # The peer's interpreter has its own jaxlib: the suite's XLA_FLAGS (tests/conftest.py)
  # may name flags it does not know, and XLA aborts on those.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run(
    [PEER, "-m", "benchmarks._dirichletcal_peer", tmp_path / "in.npz", tmp_path / "out.npz"],
    cwd=ROOT,
    env=env,
    check=True,
    timeout=300,
    capture_output=True,
  )
  peer = np.load(tmp_path / "out.npz")
  assert str(peer["version"]).startswith("0.5")
  # Under x64 the fit runs on float64 logits, else on the float32 ones.
  x64 = jax.config.jax_enable_x64
  zin = z.astype(np.float64) if x64 else z
  cal = C.fit(zin, y, "dirichlet", odir=odir)
  ours = np.asarray(jax.nn.softmax(cal(zin), axis=-1), np.float64)
  # The same convex objective: both minimizers give the same probabilities, to the
  # rounding of our fit's dtype.
  tol = 1e-5 if x64 else 2e-4
  np.testing.assert_allclose(ours, peer["probs"], atol=tol)
  # dirichletcal's weights [W | b] act on log-probabilities and have a zero last row
  # (ref_row): the same map, so the same matrix up to that row.
  w = np.asarray(cal.weight, np.float64)
  b = np.asarray(cal.bias, np.float64)
  ours_wb = np.concatenate([w, b[:, None]], 1)
  ours_wb = ours_wb - ours_wb[-1]
  np.testing.assert_allclose(ours_wb, peer["weights"], atol=50 * tol)
