"""Calibration at scale: fitting a Dirichlet map and bootstrapping calibration errors.

Usage::

  python benchmarks/calibration.py                 # N=100,000 rows, K=100 classes, n=1000
  python benchmarks/calibration.py --small         # N=20,000, K=20, n=200 (a quick check)
  python benchmarks/calibration.py --n 100000 --k 100 --resamples 1000 --repeats 2

Two tables, each peer measured in the same run, on the same logits (an
over-confident classifier, float32):

1. ``calibration.fit(logits, labels, "dirichlet", odir=(1e-3, 1e-3))``: the
   first call (compilation included) and a warm call, the L-BFGS steps and the
   training NLL, beside dirichletcal 0.5.3's ``FullDirichletCalibrator(reg_lambda=1e-3,
   reg_mu=1e-3)`` on the same probabilities: it needs Python 3.12, so it runs in
   its own interpreter (``XENTJAX_DIRICHLETCAL_PYTHON``, or the
   ``.dirichletcal-venv`` that ``.ci/run`` builds; ``benchmarks/_dirichletcal_peer.py``),
   and the time is its ``fit`` alone (``--repeats`` fits: the first, and the fastest
   of the others).
2. ``calibration.bootstrap(metric, ..., n=resamples)`` for the ECE, ACE and
   smooth ECE on N rows of ``--boot-k`` classes (default 10), by row weights
   (the path of the library's metrics), and the ECE once more through a wrapper
   the bootstrap does not know (the general path: it gathers and re-evaluates the
   logits of every resample, so its cost grows with K), beside one evaluation of
   netcal's ``ACE`` and relplot's ``smECE`` (NumPy, when installed): the time a
   bootstrap of ``resamples`` evaluations would take with them is that time
   multiplied by ``resamples``.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import scipy.special as sp

from benchmarks._common import machine
from xentjax import calibration as C

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _logits(n, k, seed=0):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, k, n)
  z = rng.normal(size=(n, k)).astype(np.float32)
  z[np.arange(n), y] += 2.0
  return (4.0 * z).astype(np.float32), y


def _seconds(f, repeats):
  t0 = time.perf_counter()
  out = jax.block_until_ready(f())
  first = time.perf_counter() - t0
  warm = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(f())
    warm.append(time.perf_counter() - t0)
  return first, min(warm), out


def _nll(u, y):
  u = np.asarray(u, np.float64)
  return float(np.mean(sp.logsumexp(u, 1) - u[np.arange(len(y)), y]))


def fit_table(z, y, repeats):
  rows = [
    "| fit (dirichlet, odir=(1e-3, 1e-3)) | first call (s) | warm (s) | train NLL |",
    "|---|---|---|---|",
  ]
  first, warm, cal = _seconds(lambda: C.fit(z, y, "dirichlet", (1e-3, 1e-3)), repeats)
  rows.append(f"| xentjax `calibration.fit` | {first:.2f} | {warm:.2f} | {_nll(cal(z), y):.6f} |")
  rows.append(f"| (identity map) | | | {_nll(z, y):.6f} |")
  peer = _peer_python()
  if peer is None:
    rows.append("| dirichletcal `FullDirichletCalibrator` | no Python 3.12 with it | | |")
    return rows
  p = sp.softmax(z.astype(np.float64), 1)
  with tempfile.TemporaryDirectory() as tmp:
    src, dst = pathlib.Path(tmp, "in.npz"), pathlib.Path(tmp, "out.npz")
    np.savez(src, probs=p, labels=y, odir=np.asarray((1e-3, 1e-3)))
    cmd = [peer, "-m", "benchmarks._dirichletcal_peer", src, dst, str(repeats)]
    t0 = time.perf_counter()
    # The peer's interpreter has its own jaxlib, which may not know this
    # process's XLA_FLAGS (XLA aborts on an unknown flag).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    if done.returncode != 0:  # e.g. -9: killed by the kernel, out of memory
      t = time.perf_counter() - t0
      rows.append(
        f"| dirichletcal `FullDirichletCalibrator` | failed after {t:.0f} s "
        f"(exit status {done.returncode}) | | |"
      )
      return rows
    out = np.load(dst)
  t, nll = out["seconds"], _nll(np.log(np.maximum(out["probs"], 1e-300)), y)
  name = f"dirichletcal {out['version']} `FullDirichletCalibrator`"
  warm = f"{min(t[1:]):.2f}" if len(t) > 1 else ""
  rows.append(f"| {name} | {t[0]:.2f} | {warm} | {nll:.6f} |")
  return rows


def _peer_python():
  """The interpreter with dirichletcal (see benchmarks/_dirichletcal_peer.py), or None."""
  named = os.environ.get("XENTJAX_DIRICHLETCAL_PYTHON")
  local = ROOT / ".dirichletcal-venv" / "bin" / "python"
  return named or (str(local) if local.exists() else None)


def _any_metric(logits, labels, where=None):
  """The ECE behind a callable `bootstrap` does not recognize: its gathering path."""
  return C.expected_calibration_error(logits, labels, where=where)


def bootstrap_table(z, y, resamples, repeats):
  rows = [
    f"| metric | bootstrap n={resamples}: first call (s) | warm (s) | estimate [low, high] |",
    "|---|---|---|---|",
  ]
  metrics = {
    "ECE (15 bins)": C.expected_calibration_error,
    "ACE (15 bins)": C.adaptive_calibration_error,
    "smooth ECE": C.smooth_ece,
    "ECE (15 bins), general path": _any_metric,
  }
  for name, m in metrics.items():
    f = functools.partial(C.bootstrap, m, z, y, n=resamples, key=jax.random.key(0))
    first, warm, (est, low, high) = _seconds(f, repeats)
    rows.append(f"| {name} | {first:.2f} | {warm:.2f} | {est:.5f} [{low:.5f}, {high:.5f}] |")
  p = sp.softmax(z.astype(np.float64), 1)
  try:
    from netcal.metrics import ACE

    t0 = time.perf_counter()
    ACE(bins=15, equal_intervals=False).measure(p, y)
    t = time.perf_counter() - t0
    rows.append(
      f"| netcal ACE, one evaluation (x{resamples}) | {t:.3f} ({t * resamples:.0f}) | | |"
    )
  except ImportError:
    rows.append("| netcal | not installed | | |")
  try:
    import relplot

    f, c = relplot.multiclass_logits_to_confidences(p, y, probs=True)
    t0 = time.perf_counter()
    relplot.smECE(f, c)
    t = time.perf_counter() - t0
    rows.append(
      f"| relplot smECE, one evaluation (x{resamples}) | {t:.3f} ({t * resamples:.0f}) | | |"
    )
  except ImportError:
    rows.append("| relplot | not installed | | |")
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=100_000)
  ap.add_argument("--k", type=int, default=100)
  ap.add_argument("--resamples", type=int, default=1000)
  ap.add_argument("--boot-k", type=int, default=10, help="classes of the bootstrap table")
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--small", action="store_true", help="N=20,000, K=20, 200 resamples")
  ap.add_argument("--only", choices=("fit", "bootstrap"), default=None)
  a = ap.parse_args()
  if a.small:
    a.n, a.k, a.resamples, a.boot_k = 20_000, 20, 200, 5
  print(machine())
  if a.only in (None, "fit"):
    z, y = _logits(a.n, a.k)
    print(f"N={a.n}, K={a.k}, float32\n")
    print("\n".join(fit_table(z, y, a.repeats)) + "\n")
  if a.only in (None, "bootstrap"):
    z, y = _logits(a.n, a.boot_k)
    print(f"N={a.n}, K={a.boot_k}, float32\n")
    print("\n".join(bootstrap_table(z, y, a.resamples, a.repeats)))


if __name__ == "__main__":
  main()
