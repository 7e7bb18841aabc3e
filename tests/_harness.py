"""What the subprocess check scripts share: a recorder of named checks and a closeness test.

The scripts (`_parallel_checks.py`, `_distill_parallel_checks.py`,
`_multiprocess_worker.py`) run in fresh interpreters (simulated devices or
real processes) and report a JSON of check name -> "ok" or the traceback,
which their pytest wrappers assert on.
"""

import json
import os
import pathlib
import subprocess
import sys
import traceback

import numpy as np


def recorder(results: dict, limit: int = 6):
  """A decorator that runs a check at once and records "ok" or its traceback in `results`."""

  def check(name):
    def wrap(fn):
      try:
        fn()
        results[name] = "ok"
      except Exception:
        results[name] = traceback.format_exc(limit=limit)
      return fn

    return wrap

  return check


def close(a, b, what, tol=2e-5):
  """`a` equals `b` to `tol`, relative to the larger of 1 and max |b|."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=what)


def run_checks(script: str, *, devices: int | None = None, timeout: int = 600) -> dict:
  """Run `tests/<script>` in a fresh CPU interpreter and return its RESULTS JSON.

  With `devices`, XLA simulates that many CPU devices (the count is fixed
  when JAX starts, hence the subprocess). A crash, a timeout or a missing
  RESULTS line fails the calling test with the script's output.
  """
  here = pathlib.Path(__file__).resolve().parent
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(here.parent), env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  if devices:
    flag = f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + flag
  proc = subprocess.run(
    [sys.executable, str(here / script)],
    capture_output=True,
    text=True,
    env=env,
    timeout=timeout,
    check=False,
  )
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS=")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULTS=") :])
