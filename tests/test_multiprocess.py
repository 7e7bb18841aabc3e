"""Real multi-process runs: 2 processes x 4 simulated CPU devices, joined by `jax.distributed`.

Each scenario starts its processes once on the loopback interface (a free
port chosen here, gloo collectives) and checks several things. Every process
runs in its own session under a deadline: on a timeout or a failure the
whole group is killed, so a hang fails the test instead of stalling CI.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_multiprocess_worker.py"
DEADLINE = 150  # seconds for a whole scenario (it takes ~15 s on 2 busy cores)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env() -> dict:
  e = dict(os.environ)
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  e["PYTHONUNBUFFERED"] = "1"
  return e


def launch(commands, cwd, deadline=DEADLINE):
  """Run the commands at once; return [(returncode, stdout, stderr, seconds)].

  Every process gets its own session; past the deadline every group still
  running is killed (SIGKILL) and the test fails with what they printed.
  """
  start = time.monotonic()
  procs = [
    subprocess.Popen(
      cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    for cmd in commands
  ]
  results = []
  try:
    for p in procs:
      left = max(1.0, deadline - (time.monotonic() - start))
      try:
        out, err = p.communicate(timeout=left)
      except subprocess.TimeoutExpired:
        kill_all(procs)
        outs = [q.communicate() for q in procs]
        report = "\n".join(f"--- process {i}:\n{e.decode()[-2000:]}" for i, (_, e) in enumerate(outs))
        pytest.fail(f"processes still running after {deadline} s; killed.\n{report}")
      results.append((p.returncode, out.decode(), err.decode(), time.monotonic() - start))
  finally:
    kill_all(procs)
  return results


def kill_all(procs):
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


# ---------------------------------------------------------------------------
# The library: evaluate, vocabulary-parallel loss, a training step.


def test_library_across_two_processes(tmp_path):
  port = free_port()
  runs = launch(
    [[sys.executable, str(WORKER), str(i), "2", str(port), str(tmp_path)] for i in range(2)],
    cwd=tmp_path,
  )
  for i, (code, _, err, _) in enumerate(runs):
    assert code == 0, f"process {i} exited {code}:\n{err[-3000:]}"
  results = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
  checks = [k for k, v in results[0].items() if isinstance(v, str) and k != "trained_w_sha"]
  assert len(checks) == 8, checks
  for i, r in enumerate(results):
    assert r["process_index"] == i
    failed = {k: v for k, v in r.items() if k in checks and v != "ok"}
    assert not failed, f"process {i}:\n" + "\n".join(f"{k}:\n{v}" for k, v in failed.items())
  # Both processes computed the same global numbers and trained the same parameters.
  assert results[0]["split_result"] == results[1]["split_result"]
  assert results[0]["losses"] == results[1]["losses"]
  assert results[0]["trained_w_sha"] == results[1]["trained_w_sha"]
  # The global count is the single-process count: 1003 rows, 90% kept, -100 labels dropped.
  assert results[0]["split_result"]["count"] > 800
  print(json.dumps(results[0]["measured"], indent=1))
