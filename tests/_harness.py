"""What the subprocess check scripts share: a recorder of named checks and a closeness test.

The scripts (`_parallel_checks.py`, `_distill_parallel_checks.py`,
`_multiprocess_worker.py`) run in fresh interpreters (simulated devices or
real processes) and report a JSON of check name -> "ok" or the traceback,
which their pytest wrappers assert on (`run_checks`; `shared_checks` for a
module-scoped fixture, run once however many pytest-xdist workers need it).
"""

import json
import os
import pathlib
import subprocess
import sys
import traceback

import numpy as np

try:
  import fcntl
except ImportError:  # Windows: there each pytest-xdist worker runs its own checks
  fcntl = None


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


def shared_checks(script: str, tmp_path_factory, *, devices: int | None = None) -> dict:
  """`run_checks` once per test run, however many pytest-xdist workers ask for it.

  A module-scoped fixture is built once in every worker that runs one of the
  module's tests, and the scheduler may spread a module's tests over the
  workers: each of them then started the same minute-long subprocess. Under
  pytest-xdist the first worker to ask runs the script while holding a lock
  and leaves the results in the run's shared temporary directory (the
  parent of every worker's ``basetemp``); a worker that asks meanwhile waits
  on the lock, leaving both cores to the subprocess, and then reads them.
  Without pytest-xdist (or without ``fcntl``) it is `run_checks`.
  """
  if os.environ.get("PYTEST_XDIST_WORKER") is None or fcntl is None:
    return run_checks(script, devices=devices)
  root = tmp_path_factory.getbasetemp().parent
  done = root / f"{script}.devices-{devices}.json"
  with open(root / f"{script}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if done.exists():
        return json.loads(done.read_text())
      results = run_checks(script, devices=devices)
      done.write_text(json.dumps(results))
      return results
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
