"""What the subprocess check scripts share: a recorder of named checks and a closeness test.

The scripts (`_parallel_checks.py`, `_distill_parallel_checks.py`,
`_multiprocess_worker.py`) run in fresh interpreters (simulated devices or
real processes) and report a JSON of check name -> "ok" or the traceback,
which their pytest wrappers assert on.
"""

import traceback

import numpy as np


def recorder(results: dict, limit: int = 6):
  """A decorator that runs a check at once and records "ok" or its traceback in `results`."""

  def check(name):
    def wrap(fn):
      try:
        fn()
        results[name] = "ok"
      except Exception:  # noqa: BLE001 -- reported to the test, which fails
        results[name] = traceback.format_exc(limit=limit)
      return fn

    return wrap

  return check


def close(a, b, what, tol=2e-5):
  """`a` equals `b` to `tol`, relative to the larger of 1 and max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=what)
