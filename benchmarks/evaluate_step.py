"""Time `xentjax.evaluate`'s compiled step alone, against the minimal jitted loss.

`benchmarks/evaluate.py` times the whole stream (memory-mapped batches, their
pages mapped before each step, the host's totals). This isolates the step: ``B x C``
float32 batches already on the device (six different ones, cycled, so a
batch is not in the cache when its step starts), the step called directly
with `evaluate`'s own arguments, and beside it the naive per-batch loss of
`benchmarks/evaluate.py` (a jitted mean, synced per batch). The variants
run in alternation, ``--repeats`` rounds of ``--batches`` calls each, and
the medians and their ratio to the naive loss are printed:

* ``step``: as `evaluate` compiles it (``_STEP_COMPILER_OPTIONS``);
* ``step, default vectors``: the same step compiled without those options
  (XLA's default vector width on the CPU);
* ``step, rows' maximum ...``: the step compiled the other way round for
  the rows' maximum (per chunk, or over the whole batch: the choice
  `_WHOLE_BATCH_MAX` makes for the other kind of CPU).

  PYTHONPATH=. python benchmarks/evaluate_step.py [--repeats 10] [--batches 60]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import xentjax
from benchmarks.evaluate import _batch_mean_loss, machine
from xentjax.evaluation import _stream


def step_arguments(z, y):
  """The positional and keyword arguments `evaluate` passes to its step for one batch."""
  seen = []
  step = _stream._step

  def spy(*args, **kwargs):
    seen.append((args, kwargs))
    return step(*args, **kwargs)

  _stream._step = spy
  try:
    xentjax.evaluate([(z, y)], progress=False)
  finally:
    _stream._step = step
  return seen[0]


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=50_000)
  parser.add_argument("--classes", type=int, default=64)
  parser.add_argument("--batches", type=int, default=60, help="calls per timed round")
  parser.add_argument("--repeats", type=int, default=10, help="alternating rounds")
  args = parser.parse_args(argv)

  rng = np.random.default_rng(0)
  zs = [
    jnp.asarray(rng.standard_normal((args.rows, args.classes), dtype=np.float32) * 3)
    for _ in range(6)
  ]
  ys = [jnp.asarray(rng.integers(0, args.classes, args.rows, dtype=np.int32)) for _ in range(6)]
  (acc, params, _, _, *rest), kwargs = step_arguments(zs[0], ys[0])

  def unoptioned(*a, **k):
    # A function object of its own: JAX caches a function's traces (and what
    # they compile to) by the function, whatever `jax.jit` wraps it, so a
    # second `jax.jit(_stream._step.__wrapped__)` could run the first's program.
    return _stream._step.__wrapped__(*a, **k)

  plain = jax.jit(unoptioned, static_argnames=("model", "config"))

  whole = kwargs["config"].whole_max
  flipped = {**kwargs, "config": kwargs["config"]._replace(whole_max=not whole)}

  def stepper(fn, options=kwargs):
    def run():
      a = acc
      for i in range(args.batches):
        a, _ = fn(a, params, zs[i % 6], ys[i % 6], *rest, **options)
      jax.block_until_ready(a)

    return run

  def naive():
    total = np.float32(0.0)
    for i in range(args.batches):
      total += np.float32(_batch_mean_loss(zs[i % 6], ys[i % 6]))

  variants = {
    "naive jitted loss": naive,
    "step": stepper(_stream._step),
    "step, default vectors": stepper(plain),
    f"step, rows' maximum {'per chunk' if whole else 'over the batch'}": stepper(
      _stream._step, flipped
    ),
  }
  for run in variants.values():
    run()  # compile and warm up
  times = {name: [] for name in variants}
  for _ in range(args.repeats):
    for name, run in variants.items():
      t = time.perf_counter()
      run()
      times[name].append((time.perf_counter() - t) / args.batches * 1e3)
  base = times["naive jitted loss"]
  print(
    f"{args.rows:,} x {args.classes} float32 batches on the device, {args.batches} calls per "
    f"round, {args.repeats} alternating rounds; step options {_stream._STEP_COMPILER_OPTIONS}; "
    f"rows' maximum {'over the batch' if whole else 'per chunk'} (`_StepConfig.whole_max`)"
  )
  print()
  print("| variant | ms per batch (median) | min | ratio to the naive loss (median, min-max) |")
  print("|---|---:|---:|---:|")
  for name, ts in times.items():
    ratios = [t / b for t, b in zip(ts, base)]
    print(
      f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f} | "
      f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"
    )
  print(f"machine: {machine()}")


if __name__ == "__main__":
  main()
