"""Fit dirichletcal's ``FullDirichletCalibrator`` in its own interpreter (Python >= 3.12).

dirichletcal 0.5.x requires Python 3.12 and turns on ``jax_enable_x64`` for
the whole process when imported, so it runs here, in a separate interpreter,
never inside the process that runs xentjax::

  PEER_PYTHON -m benchmarks._dirichletcal_peer IN.npz OUT.npz

``IN.npz`` holds ``probs`` ``[n, K]`` (float64), ``labels`` ``[n]`` and
``odir`` ``(reg_lambda, reg_mu)``; ``OUT.npz`` gets the fitted map's
``probs`` on the same rows, its ``weights`` ``[K, K + 1]`` (dirichletcal's
layout: ``[W | b]`` acting on log-probabilities), the wall time of ``fit``
in ``seconds`` (``repeats`` fits; the first includes dirichletcal's JAX
compilation) and the package's ``version``.

A virtual environment for it::

  python3.12 -m venv .dirichletcal-venv
  .dirichletcal-venv/bin/pip install "dirichletcal==0.5.3"
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main(argv):
  src, dst = argv[1], argv[2]
  repeats = int(argv[3]) if len(argv) > 3 else 1
  import dirichletcal
  from dirichletcal.calib.fulldirichlet import FullDirichletCalibrator

  data = np.load(src)
  probs, labels = data["probs"], data["labels"]
  lam, mu = (float(v) for v in data["odir"])
  seconds = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    cal = FullDirichletCalibrator(reg_lambda=lam, reg_mu=mu).fit(probs, labels)
    seconds.append(time.perf_counter() - t0)
  np.savez(
    dst,
    probs=np.asarray(cal.predict_proba(probs), np.float64),
    weights=np.asarray(cal.weights, np.float64),
    seconds=np.asarray(seconds),
    version=np.asarray(dirichletcal.__version__),
  )


if __name__ == "__main__":
  main(sys.argv)
