"""What the fused-kernel benchmarks share: the machine line and the common options."""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax

from xentjax._vocab import tiles


def machine() -> str:
  """One line: platform, CPUs, load average, jax version and backend."""
  dev = jax.devices()[0]
  load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
  return (
    f"{platform.platform()}; {platform.processor() or platform.machine()}; "
    f"{os.cpu_count()} CPUs; load average {load[0]:.1f}; jax {jax.__version__}; "
    f"backend {jax.default_backend()} ({dev.device_kind}, {jax.device_count()} device(s))"
  )


SETTINGS = ("random", "concentrated", "scattered", "real")
# The automatic tile of gradient filtering, in tokens x columns (`filter_eps` of
# `xentjax.linear_softmax_cross_entropy` documents it), read from the engine: the
# benchmarks count the tiles it can skip in NumPy. The one private import of the
# benchmarks, so that a change of the engine's tile changes their tables too.
FILTER_TILE = (tiles.FILTER_TOKEN_CHUNK, tiles.FILTER_VOCAB_CHUNK)
STORE_FILTER_TILE = (tiles.FILTER_TOKEN_CHUNK, tiles.STORE_FILTER_VOCAB_CHUNK)  # strategy="store"


def _size(text):
  n, d, v = (int(t) for t in text.split(","))
  return n, d, v


def parser(doc: str, small, *, repeats=5, memory_help="skip the memory table"):
  """The options every fused benchmark takes.

  --small, --size N,D,V (the timing size), --setting (the input distribution,
  `benchmarks/_settings.py`), --memory-size N,D,V (the large compile-only size),
  --repeats, --warmup, --no-memory.
  """
  p = argparse.ArgumentParser(description=doc.split("\n")[0])
  p.add_argument("--small", action="store_true", help=f"time at N, D, V = {small}")
  p.add_argument("--size", type=_size, default=None, help="time at N,D,V (overrides --small)")
  p.add_argument(
    "--setting",
    choices=SETTINGS,
    default="random",
    help="input distribution of the timed tables (see benchmarks/_settings.py)",
  )
  p.add_argument(
    "--memory-size", type=_size, default=None, help="the large compile-only size N,D,V"
  )
  p.add_argument("--repeats", type=int, default=repeats, help="timed repeats per method")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--no-memory", action="store_true", help=memory_help)
  return p


def alternate(fns, repeats, warmup):
  """Seconds of each `name: (f, args)`, run alternately after a warm-up, and its last output.

  Returns `({name: [seconds per repeat]}, {name: output of the last call})`.
  Alternating (every method once per repeat) makes drifting load hit every
  method alike, and lets a ratio be taken within one repeat.
  """
  outputs = {}
  for name, (f, args) in fns.items():  # compile, then warm up
    for _ in range(warmup):
      outputs[name] = jax.block_until_ready(f(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, (f, args) in fns.items():
      t0 = time.perf_counter()
      outputs[name] = jax.block_until_ready(f(*args))
      times[name].append(time.perf_counter() - t0)
  return times, outputs


def timing_size(args, default, small):
  """The timing size the options ask for: --size, else --small, else the default."""
  return args.size or (small if args.small else default)


def print_header() -> None:
  """The machine, and a warning when the numbers are CPU numbers."""
  print(f"Machine: {machine()}")
  if jax.default_backend() == "cpu":
    print("No GPU/TPU was available for this run: all numbers are CPU numbers.")
