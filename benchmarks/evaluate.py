"""Benchmark `xentjax.evaluate` on logits streamed from disk.

Writes N x C float32 logits (default 2,000,000 x 64, 512 MB) and int32 labels
as .npy files, then, in one run and on the same memory-mapped files read in
batches of 50,000:

* the I/O floor: only reading the batches (a copy of each slice);
* `xentjax.evaluate` (after a warm-up on a small file compiles the step),
  and on the small file with `temperature=True` (the opt-in one-pass fit);
* a straightforward float64 NumPy loop (the reference);
* a naive JAX loop (a jitted mean loss per batch, summed in float32), what
  people write by hand: the minimal cross-entropy loop `xentjax.evaluate` is
  held against (at most 1.3x its time in every repeat; each repeat runs the
  two back to back and prints their ratio, in wall and in CPU time);

with the relative error of each against float64 and its peak memory growth:
each method runs again in a fresh process that first warms up (imports,
compiles, one batch), then samples its anonymous memory (RssAnon, every
millisecond; memory-mapped file pages are page cache and not counted) over the
whole run. The timed runs sample nothing (the sampler thread would compete
with `xentjax.evaluate`'s loop for the interpreter). `xentjax.evaluate` is
also measured at a tenth of the size, to show
that the growth does not depend on the data set's size. Prints a
markdown table and the machine. The files are deleted afterwards unless
`--keep`.

  PYTHONPATH=. .venv/bin/python benchmarks/evaluate.py [--dir DIR] [--repeats 3]

With ``--hidden``, evaluation from hidden states instead: ``xentjax.evaluate(
batches, head=w)`` against the fused cross-entropy's forward pass alone
(``xentjax.linear_softmax_cross_entropy``, jitted per batch, summed on the
device) on the same ``(hidden, labels)`` batches, back to back in each
repeat, as tokens per second and their ratio (target: at most 1.2x in every
run at N = 10^6, D = 512, V = 32,768, the defaults):

  PYTHONPATH=. .venv/bin/python benchmarks/evaluate.py --hidden --repeats 3 \
      [--hidden-tokens 1000000 --hidden-dim 512 --vocab 32768 --hidden-batch 8192]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import xentjax


def write_data(directory: str, n: int, c: int, seed: int = 0) -> tuple[str, str]:
  """Write logits (float32, scale 3) and labels (int32) in chunks; return the paths."""
  rng = np.random.default_rng(seed)
  logits_path = os.path.join(directory, f"logits_{n}x{c}.npy")
  labels_path = os.path.join(directory, f"labels_{n}.npy")
  logits = np.lib.format.open_memmap(logits_path, mode="w+", dtype=np.float32, shape=(n, c))
  chunk = 200_000
  for i in range(0, n, chunk):
    rows = min(chunk, n - i)
    block = rng.standard_normal((rows, c), dtype=np.float32) * np.float32(3.0)
    logits[i : i + rows] = block
  logits.flush()
  del logits
  np.save(labels_path, rng.integers(0, c, n, dtype=np.int32))
  return logits_path, labels_path


def open_data(paths):
  return np.load(paths[0], mmap_mode="r"), np.load(paths[1], mmap_mode="r")


def batches(logits, labels, size):
  for i in range(0, logits.shape[0], size):
    yield logits[i : i + size], labels[i : i + size]


def rss_anon_kib() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1])
  return 0


class PeakAnon:
  """Peak RssAnon growth over a `with` block, sampled from a thread.

  Only in the memory runs (``enabled``): the sampler is a Python thread that
  wakes every millisecond, and in the timed runs it took the interpreter
  from `xentjax.evaluate`'s loop (then its feeding thread) more than from the
  plain loops.
  """

  def __init__(self, enabled: bool = True):
    self.enabled = enabled
    self.growth_mib = math.nan

  def __enter__(self):
    if not self.enabled:
      return self
    self.start = rss_anon_kib()
    self.peak = self.start
    self._stop = threading.Event()

    def sample():
      while not self._stop.is_set():
        self.peak = max(self.peak, rss_anon_kib())
        time.sleep(0.001)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    if not self.enabled:
      return
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_anon_kib())
    self.growth_mib = (self.peak - self.start) / 1024


def read_floor(paths, size) -> float:
  logits, labels = open_data(paths)
  t = time.perf_counter()
  touched = 0.0
  for z, y in batches(logits, labels, size):
    z, y = np.array(z), np.array(y)
    touched += float(z[-1, -1]) + float(y[-1])
  return time.perf_counter() - t


def run_evaluate(paths, size, temperature=False, sample=False):
  logits, labels = open_data(paths)
  with PeakAnon(sample) as mem:
    t = time.perf_counter()
    result = xentjax.evaluate(
      batches(logits, labels, size), progress=False, temperature=temperature
    )
    seconds = time.perf_counter() - t
  return seconds, result.cross_entropy, mem.growth_mib


def numpy_float64_loop(paths, size, sample=False):
  logits, labels = open_data(paths)
  with PeakAnon(sample) as mem:
    t = time.perf_counter()
    total, count = 0.0, 0
    for z, y in batches(logits, labels, size):
      z = np.asarray(z, np.float64)
      m = z.max(axis=-1)
      lse = m + np.log(np.exp(z - m[:, None]).sum(axis=-1))
      total += float((lse - z[np.arange(len(y)), y]).sum())
      count += len(y)
    seconds = time.perf_counter() - t
  return seconds, total / count, mem.growth_mib


@jax.jit
def _batch_mean_loss(z, y):
  return jnp.mean(jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], -1)[:, 0])


def naive_jax_loop(paths, size, sample=False):
  """What people write: a jitted batch mean, a float32 running sum, a sync per batch."""
  logits, labels = open_data(paths)
  with PeakAnon(sample) as mem:
    t = time.perf_counter()
    total, count = np.float32(0.0), 0
    for z, y in batches(logits, labels, size):
      total += np.float32(_batch_mean_loss(z, y)) * np.float32(len(y))
      count += len(y)
    seconds = time.perf_counter() - t
  return seconds, float(total / np.float32(count)), mem.growth_mib


METHODS = {}  # name -> function(paths, size, sample) -> (seconds, cross-entropy, growth MiB)


def hidden_batches(n, d, v, size, pool=4, seed=0):
  """``n`` tokens as ``(hidden, labels)`` batches of ``size``, cycling a pool of ``pool`` batches.

  Generating a million 512-wide hidden states per run would time NumPy's
  random generator, so both methods stream the same few batches over and over.
  """
  rng = np.random.default_rng(seed)
  bank = [
    (rng.standard_normal((size, d), dtype=np.float32), rng.integers(0, v, size).astype(np.int32))
    for _ in range(pool)
  ]
  return [bank[i % pool] for i in range(-(-n // size))]


def hidden_runs(n, d, v, size, repeats):
  """Target B: ``evaluate(batches, head=w)`` against the fused forward pass on the same batches.

  Each repeat runs the two back to back (after a warm-up that compiles both)
  and returns their seconds; tokens per second is ``n / seconds``.
  """
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((d, v), dtype=np.float32) / np.sqrt(d))
  batches = hidden_batches(n, d, v, size)
  forward = jax.jit(lambda x, y: xentjax.linear_softmax_cross_entropy(x, w, y, reduction="sum"))

  def fused():
    total = jnp.zeros((), jnp.float32)
    for x, y in batches:
      total = total + forward(x, y)
    return float(total)

  def evaluate():
    return xentjax.evaluate(batches, head=w, progress=False).negative_log_likelihood_sum

  warm = batches[:1]
  float(forward(*warm[0]))
  xentjax.evaluate(warm, head=w, progress=False)
  out = []
  for _ in range(repeats):
    pair = []
    for fn in (evaluate, fused):
      t = time.perf_counter()
      fn()
      pair.append(time.perf_counter() - t)
    out.append(tuple(pair))
  return out


def hidden_main(args) -> None:
  n, d, v, size = args.hidden_tokens, args.hidden_dim, args.vocab, args.hidden_batch
  runs = hidden_runs(n, d, v, size, args.repeats)
  ratios = [e / f for e, f in runs]
  print(
    f"evaluation from hidden states: N = {n:,} tokens streamed in batches of {size:,}, "
    f"D = {d}, V = {v:,} (float32)"
  )
  print()
  print("| run | `evaluate(head=w)` tokens/s | fused forward tokens/s | ratio (time) |")
  print("|---:|---:|---:|---:|")
  for i, (e, f) in enumerate(runs, 1):
    print(f"| {i} | {n / e:,.0f} | {n / f:,.0f} | {e / f:.2f} |")
  print()
  print(
    f"`xentjax.evaluate(..., head=w)` / `linear_softmax_cross_entropy` forward, run by run "
    f"(each pair back to back): {', '.join(f'{r:.2f}' for r in ratios)}x (min {min(ratios):.2f}, "
    f"median {statistics.median(ratios):.2f}, max {max(ratios):.2f}); target <= 1.2x in every "
    f"run: {'met' if max(ratios) <= 1.2 else 'NOT met'} (worst {max(ratios):.2f}x)"
  )
  print(f"machine: {machine()}")


def memory_child(method: str, paths, size: int) -> None:
  """In a fresh process: warm up on one batch, then report the peak growth."""
  fn = METHODS[method]
  logits, labels = open_data(paths)
  warm = os.path.join(tempfile.mkdtemp(prefix="xentjax_bench_warm_"), "x")
  np.save(warm + "_z.npy", logits[:size])
  np.save(warm + "_y.npy", labels[:size])
  fn((warm + "_z.npy", warm + "_y.npy"), size)
  shutil.rmtree(os.path.dirname(warm), ignore_errors=True)
  print(fn(paths, size, sample=True)[2])


def memory_in_fresh_process(method: str, paths, size: int) -> float:
  env = dict(os.environ)
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--memory-child", method, *paths,
       "--batch-size", str(size)],
      env=env, capture_output=True, text=True, check=True,
  )  # fmt: skip
  return float(out.stdout.strip().splitlines()[-1])


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  return (
    f"{cpu}, {os.cpu_count()} cores (load average {load} at the end), "
    f"Python {platform.python_version()}, jax {jax.__version__} on "
    f"{jax.devices()[0].platform} x{jax.local_device_count()}, "
    f"x64 {'on' if jax.config.jax_enable_x64 else 'off'}"
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--examples", type=int, default=2_000_000)
  parser.add_argument("--classes", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=50_000)
  parser.add_argument("--repeats", type=int, default=3, help="timed runs; the minimum is reported")
  parser.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the files")
  parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
  parser.add_argument(
    "--hidden", action="store_true",
    help="instead: evaluation from hidden states against the fused forward pass (target B)",
  )  # fmt: skip
  parser.add_argument("--hidden-tokens", type=int, default=1_000_000)
  parser.add_argument("--hidden-dim", type=int, default=512)
  parser.add_argument("--vocab", type=int, default=32_768)
  parser.add_argument("--hidden-batch", type=int, default=8_192)
  args = parser.parse_args(argv)
  if args.hidden:
    return hidden_main(args)
  if args.memory_child:
    method, *paths = args.memory_child
    return memory_child(method, paths, args.batch_size)

  n, c, size = args.examples, args.classes, args.batch_size
  small_n = max(size, n // 10)
  directory = args.dir or tempfile.mkdtemp(prefix="xentjax_bench_")
  os.makedirs(directory, exist_ok=True)
  t = time.perf_counter()
  big = write_data(directory, n, c)
  small = write_data(directory, small_n, c, seed=1)
  print(
    f"wrote {n:,} x {c} float32 logits ({n * c * 4 / 2**20:,.0f} MiB) and {small_n:,} x {c} "
    f"to {directory} in {time.perf_counter() - t:.1f} s"
  )
  try:
    run_evaluate(small, size)  # warm-up: compiles the (size, c) step once
    naive_jax_loop(small, size)

    floors, evals, naives, cpu = [], [], [], {"evaluate": [], "naive": []}
    for _ in range(args.repeats):
      floors.append(read_floor(big, size))
      for name, fn, out in (("evaluate", run_evaluate, evals), ("naive", naive_jax_loop, naives)):
        start = time.process_time()
        out.append(fn(big, size))
        cpu[name].append(time.process_time() - start)
    np_seconds, reference, _ = numpy_float64_loop(big, size)
    small_eval = min((run_evaluate(small, size) for _ in range(args.repeats)), key=lambda r: r[0])
    run_evaluate(small, size, temperature=True)  # compiles the temperature step
    small_temp = min(
      (run_evaluate(small, size, temperature=True) for _ in range(args.repeats)),
      key=lambda r: r[0],
    )
    mems = {m: memory_in_fresh_process(m, big, size) for m in METHODS}
    small_mem = memory_in_fresh_process("evaluate", small, size)
  finally:
    if not args.keep:
      for path in (*big, *small):
        os.remove(path)
      if args.dir is None:
        shutil.rmtree(directory, ignore_errors=True)

  floor = min(floors)
  ev = min(evals, key=lambda r: r[0])
  nv = min(naives, key=lambda r: r[0])

  def rel(x):
    return abs(x - reference) / abs(reference)

  def fmt_err(x):
    return "0 (reference)" if x == 0 else f"{x:.1e}"

  rows = [
    ("read the batches only (I/O floor)", floor, None, None),
    ("`xentjax.evaluate`", ev[0], rel(ev[1]), mems["evaluate"]),
    ("float64 NumPy loop", np_seconds, 0.0, mems["numpy"]),
    ("naive JAX loop (jit per batch, float32 sum)", nv[0], rel(nv[1]), mems["naive"]),
  ]
  print()
  print(
    f"{n:,} examples x {c} classes, float32 .npy memory-mapped (warm page cache), "
    f"batches of {size:,}; best of {args.repeats} (NumPy: 1 run); the I/O floor copies each "
    "slice out of the memory map"
  )
  print()
  print(
    "| method | time (s) | × I/O floor | examples/s | rel. error vs float64 | peak anon. memory growth (MiB) |"
  )
  print("|---|---:|---:|---:|---:|---:|")
  for name, seconds, err, mem in rows:
    print(
      f"| {name} | {seconds:.3f} | {seconds / floor:.1f} | {n / seconds:,.0f} | "
      f"{'–' if err is None else fmt_err(err)} | {'–' if mem is None else f'{mem:.0f}'} |"
    )
  print()
  print(
    f"`xentjax.evaluate` on {small_n:,} examples: {small_eval[0]:.3f} s, peak anon. memory "
    f"growth {small_mem:.0f} MiB (vs {mems['evaluate']:.0f} MiB on {n:,}); "
    f"evaluate times over the repeats: {', '.join(f'{r[0]:.3f}' for r in evals)} s "
    f"(median {statistics.median(r[0] for r in evals):.3f}); read floors: "
    f"{', '.join(f'{x:.3f}' for x in floors)} s"
  )
  ratios = [e[0] / v[0] for e, v in zip(evals, naives)]
  cpu_ratios = [e / v for e, v in zip(cpu["evaluate"], cpu["naive"])]
  print(
    f"`xentjax.evaluate` / naive JAX loop, run by run (each pair back to back): "
    f"{', '.join(f'{r:.2f}' for r in ratios)}x (min {min(ratios):.2f}, median "
    f"{statistics.median(ratios):.2f}, max {max(ratios):.2f}); the same in process CPU time "
    f"(every thread's work, less sensitive to a busy machine): "
    f"{', '.join(f'{r:.2f}' for r in cpu_ratios)}x"
  )
  print(
    f"`xentjax.evaluate(..., temperature=True)` on {small_n:,} examples: {small_temp[0]:.3f} s, "
    f"{small_temp[0] / small_eval[0]:.0f}x the time without the temperature fit"
  )
  ok_time = ev[0] <= 4 * floor
  ok_err = rel(ev[1]) <= 1e-6
  ok_ratio = max(ratios) <= 1.3
  print(
    f"targets: time <= 4x floor: {'met' if ok_time else 'NOT met'} ({ev[0] / floor:.1f}x); "
    f"rel. error <= 1e-6: {'met' if ok_err else 'NOT met'} ({rel(ev[1]):.1e}); "
    f"<= 1.3x the naive JAX loop in every run: {'met' if ok_ratio else 'NOT met'} "
    f"(worst {max(ratios):.2f}x)"
  )
  print(f"machine: {machine()}")
  if math.isnan(ev[1]):
    raise SystemExit("evaluate returned NaN")


METHODS.update(evaluate=run_evaluate, numpy=numpy_float64_loop, naive=naive_jax_loop)

if __name__ == "__main__":
  main()
