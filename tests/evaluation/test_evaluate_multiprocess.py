"""Real multi-process runs: 2 processes x 4 simulated CPU devices, joined by `jax.distributed`.

Each scenario starts its processes once on the loopback interface (a free
port chosen here, gloo collectives) and checks several things. Every process
runs in its own session under a deadline: on a timeout or a failure the
whole group is killed, so a hang fails the test instead of stalling CI.
"""

import contextlib
import csv
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "_multiprocess_worker.py"
DEADLINE = 150  # seconds for a whole scenario (it takes ~15 s on 2 busy cores)


def free_port() -> int:
  """A port free when checked, below Linux's ephemeral range (32768-60999).

  A port the kernel hands out (``bind(0)``) is an ephemeral one, and the
  processes' own connections, or another test's, can take it before the
  coordinator binds it (CI once failed with "Failed to start RPC server").
  """
  rng = random.Random()
  for _ in range(100):
    port = rng.randrange(20000, 32000)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
      return port
  raise RuntimeError("no free port in 20000-32000")


# How a process reports that its coordinator could not bind its port: another
# socket took it between `free_port` and the bind. Not what a test checks, so
# `launch` runs the scenario again on another port.
PORT_TAKEN = "Failed to start RPC server"


def env() -> dict:
  e = dict(os.environ)
  # The parent's flags too (tests/conftest.py's compile settings): the processes'
  # results are compared with this process's to 1e-12, so all compile alike.
  e["XLA_FLAGS"] = f"{e.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()
  e["JAX_PLATFORMS"] = "cpu"
  e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  e["PYTHONUNBUFFERED"] = "1"
  return e


def launch(commands, cwd, deadline=DEADLINE, tries=3):
  """Run the commands at once; return [(returncode, stdout, stderr, seconds)].

  ``commands`` is a list, or a function of a port (from `free_port`) that
  returns the list: then a run whose coordinator could not bind its port
  (`PORT_TAKEN`) is run again on another, up to ``tries`` times. Every
  process gets its own session; past the deadline every group still
  running is killed (SIGKILL) and the test fails with what they printed.
  """
  if not callable(commands):
    return _launch_once(commands, cwd, deadline)
  for _ in range(tries - 1):
    runs = _launch_once(commands(free_port()), cwd, deadline)
    if not any(PORT_TAKEN in err for _, _, err, _ in runs):
      return runs
  return _launch_once(commands(free_port()), cwd, deadline)


def _launch_once(commands, cwd, deadline):
  start = time.monotonic()
  procs = [
    subprocess.Popen(
      cmd,
      cwd=cwd,
      env=env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      stdin=subprocess.DEVNULL,
      start_new_session=True,
    )
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
        report = "\n".join(
          f"--- process {i}:\n{e.decode()[-2000:]}" for i, (_, e) in enumerate(outs)
        )
        pytest.fail(f"processes still running after {deadline} s; killed.\n{report}")
      results.append((p.returncode, out.decode(), err.decode(), time.monotonic() - start))
  finally:
    kill_all(procs)
  return results


def kill_all(procs):
  for p in procs:
    if p.poll() is None:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
      p.wait()


# ---------------------------------------------------------------------------
# The library: evaluate, vocabulary-parallel loss, a training step.


def test_library_across_two_processes(tmp_path):
  runs = launch(
    lambda port: [
      [sys.executable, str(WORKER), str(i), "2", str(port), str(tmp_path)] for i in range(2)
    ],
    cwd=tmp_path,
  )
  for i, (code, _, err, _) in enumerate(runs):
    assert code == 0, f"process {i} exited {code}:\n{err[-3000:]}"
  results = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
  checks = [k for k, v in results[0].items() if isinstance(v, str) and k != "trained_w_sha"]
  assert len(checks) == 10, checks
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


# ---------------------------------------------------------------------------
# The command line: `xentjax evaluate` in two processes.


@pytest.fixture
def shards(tmp_path):
  """Three (logits, labels) file pairs of different sizes, and their float64 reference."""
  rng = np.random.default_rng(3)
  zs, ys = [], []
  for i, n in enumerate((300, 250, 123)):
    z = (rng.standard_normal((n, 10)) * 2).astype(np.float32)
    y = rng.integers(0, 10, n)
    y[::41] = -100
    np.save(tmp_path / f"z{i}.npy", z)
    np.save(tmp_path / f"y{i}.npy", y)
    zs.append(z)
    ys.append(y)
  return tmp_path, np.concatenate(zs), np.concatenate(ys)


def files_argv(d, names=(0, 1, 2)):
  argv = []
  for i in names:
    argv += ["--logits", str(d / f"z{i}.npy"), "--labels", str(d / f"y{i}.npy")]
  return argv


def cli(port, i, *argv, n=2):
  return [
    sys.executable, "-m", "xentjax", "evaluate", "--coordinator", f"127.0.0.1:{port}",
    "--num-processes", str(n), "--process-id", str(i), "--timeout", "20", *argv,
  ]  # fmt: skip


def test_cli_two_processes_print_once_and_match_one_process(shards, capsys):
  d, z, y = shards
  runs = launch(
    lambda port: [cli(port, i, *files_argv(d), "--json", "--top-k", "3") for i in range(2)], cwd=d
  )
  (code0, out0, err0, _), (code1, out1, err1, _) = runs
  assert code0 == 0 and code1 == 0, (err0, err1)
  assert out1 == "" and err0 == "" and err1 == ""  # no gloo or JAX log on the user's streams
  got = json.loads(out0)

  from xentjax.cli._main import main

  assert main(["evaluate", "--no-progress", *files_argv(d), "--json", "--top-k", "3"]) == 0
  one = json.loads(capsys.readouterr().out)
  assert got.keys() == one.keys()
  for key, want in one.items():
    if isinstance(want, float):
      # The one-pass temperature interpolates on per-process grids: here (random logits,
      # T ~ 33) on coarse nodes, so it agrees to the interpolation's 1e-2, not to rounding.
      rtol = 1e-2 if key == "temperature" else 1e-12
      np.testing.assert_allclose(got[key], want, rtol=rtol, atol=1e-9, err_msg=key)
    else:
      assert got[key] == want, key
  keep = y != -100
  zk = z[keep].astype(np.float64)
  nll = np.logaddexp.reduce(zk, axis=-1) - zk[np.arange(keep.sum()), y[keep]]
  assert got["count"] == int(keep.sum()) == 655
  np.testing.assert_allclose(got["cross_entropy"], nll.mean(), rtol=1e-6)


def test_cli_per_document_over_two_processes_names_every_file(shards):
  """File pair i is document i, read by process i mod 2; process 0 writes the whole CSV."""
  d, z, y = shards
  out_csv = d / "docs.csv"
  argv = [*files_argv(d), "--per-document", str(out_csv)]
  runs = launch(lambda port: [cli(port, i, *argv) for i in range(2)], cwd=d)
  assert all(code == 0 for code, *_ in runs), [err for _, _, err, _ in runs]
  with open(out_csv, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["document"]) for r in rows] == [0, 1, 2]
  assert [r["file"] for r in rows] == [str(d / f"z{i}.npy") for i in range(3)]
  start = 0
  for r, n in zip(rows, (300, 250, 123)):
    zs, ys = z[start : start + n].astype(np.float64), y[start : start + n]
    keep = ys != -100
    nll = np.logaddexp.reduce(zs[keep], axis=-1) - zs[keep][np.arange(keep.sum()), ys[keep]]
    assert int(r["tokens"]) == keep.sum()
    np.testing.assert_allclose(float(r["nll_nats"]), nll.sum(), rtol=1e-6)
    start += n


def test_cli_failures_are_one_line_in_every_process(shards):
  d, _, _ = shards
  bad = np.load(d / "y1.npy")
  bad[7] = 10
  np.save(d / "y1.npy", bad)
  # Process 1's own file (the {process} placeholder) has a label out of range.
  runs = launch(
    lambda port: [
      cli(port, i, "--logits", str(d / "z{process}.npy"), "--labels", str(d / "y{process}.npy"))
      for i in range(2)
    ],
    cwd=d,
  )
  (code0, out0, err0, _), (code1, out1, err1, _) = runs
  assert out0 == "" and out1 == "", "no partial result may be printed"
  assert code1 == 2 and err1.count("\n") == 1 and "label 10 is out of range" in err1, err1
  assert code0 == 1 and err0.count("\n") == 1, err0
  assert "failed in process 1 of 2" in err0 and "label 10 is out of range" in err0, err0

  # Different options in the two processes: an error in both, nothing printed.
  runs = launch(
    lambda port: [
      cli(port, i, *files_argv(d, (0, 2)), "--num-bins", str(10 + i)) for i in range(2)
    ],
    cwd=d,
  )
  for code, out, err, _ in runs:
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "`num_bins` differs between processes" in err, err

  # Different file lists (without {process}): the round-robin shares would be wrong.
  runs = launch(lambda port: [cli(port, i, *files_argv(d, (i,))) for i in range(2)], cwd=d)
  for code, out, err, _ in runs:
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "different --logits/--labels lists" in err, err


def test_cli_unreachable_coordinator_fails_in_bounded_time(shards):
  d, _, _ = shards
  cmd = cli(free_port(), 1, *files_argv(d), "--json")
  cmd[cmd.index("--timeout") + 1] = "2"
  ((code, out, err, seconds),) = launch([cmd], cwd=d, deadline=60)
  assert code == 1 and out == "", err
  assert err.count("\n") == 1 and "could not join the job within --timeout 2 s" in err, err
  assert seconds < 40, seconds


def test_cli_peer_killed_after_joining_ends_the_other_in_one_line(shards):
  d, _, _ = shards
  fifo = d / "z1.npy"
  fifo.unlink()
  os.mkfifo(fifo)  # process 1 blocks reading it once it has joined the job
  port = free_port()
  own = ["--logits", str(d / "z{process}.npy"), "--labels", str(d / "y{process}.npy")]
  commands = [cli(port, i, *own) for i in range(2)]
  for c in commands:
    c[c.index("--timeout") + 1] = "5"
  procs = [
    subprocess.Popen(
      c,
      cwd=d,
      env=env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      stdin=subprocess.DEVNULL,
      start_new_session=True,
    )
    for c in commands
  ]
  try:
    start = time.monotonic()
    while True:  # a non-blocking open for writing succeeds once process 1 reads the fifo
      try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        break
      except OSError:
        assert time.monotonic() - start < DEADLINE, "process 1 never joined"
        assert procs[1].poll() is None, procs[1].communicate()
        time.sleep(0.1)
    os.killpg(procs[1].pid, signal.SIGKILL)  # the supervisor and the worker
    os.close(fd)
    out, err = procs[0].communicate(timeout=60)
  finally:
    kill_all(procs)
  assert procs[0].returncode == 1 and out == b"", err
  err = err.decode()
  # The collective breaks at once (gloo: connection closed), or JAX's heartbeat ends the process.
  assert err.count("\n") == 1, err
  assert "lost contact with the other processes" in err or "stopped responding" in err, err
