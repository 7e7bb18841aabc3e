"""Memory and time of `xentjax.info.mutual_information_bounds` against the materialized bounds.

Usage::

  python benchmarks/mutual_information.py              # memory at B=65,536 and time at B=8192
  python benchmarks/mutual_information.py --small      # quick run at small sizes
  python benchmarks/mutual_information.py --no-time    # memory only (compiles, runs nothing)

The materialized computation forms the critic's scores ``S = scale · a bᵀ +
bias`` (``[B, B]``) and the four bounds of Poole et al. from it in plain JAX
(InfoNCE, NWJ, Donsker-Varadhan, Jensen-Shannon, as TFP defines them); the
sweep computes the same four numbers without ``S``. Both are differentiated
with respect to ``a``, ``b``, ``scale`` and ``bias`` (the sum of the four
bounds, so every one carries a gradient). Prints markdown tables:

* temporary memory of ``jax.jit(jax.value_and_grad(total, (a, b, scale, bias)))``
  at B = 65,536, D = 768, float32 (``compiled.memory_analysis().temp_size_in_bytes``:
  deterministic, nothing is allocated);
* fwd+bwd time at B = 8192, D = 512 (``--small``: B = 1024, D = 128): the
  two functions run alternately after a warm-up, and each repeat gives one
  ratio (sweep / materialized); the table shows the median time of each, the
  median ratio and the spread (min-max) of the ratios.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

import xentjax
from benchmarks._common import alternate, machine, parser, print_header

MEMORY = (65536, 768)
TIMING = (8192, 512)
SMALL = (1024, 128)


def materialized_bounds(a, b, scale, bias):
  """The four bounds of ``S = scale a bᵀ + bias``, with ``S`` formed (plain JAX)."""
  s = scale * a @ b.T + bias
  n = s.shape[0]
  off = ~jnp.eye(n, dtype=bool)
  diag = jnp.diagonal(s)
  infonce = jnp.mean(diag) - jnp.mean(jax.nn.logsumexp(s, axis=1)) + jnp.log(n)
  log_mean_off = jax.nn.logsumexp(jnp.where(off, s, -jnp.inf)) - jnp.log(n * (n - 1.0))
  nwj = jnp.mean(diag) - jnp.exp(log_mean_off - 1.0)
  dv = jnp.mean(diag) - log_mean_off
  sp_off = jnp.sum(jnp.where(off, jax.nn.softplus(s), 0.0))
  js = -jnp.mean(jax.nn.softplus(-diag)) - sp_off / (n * (n - 1.0))
  return infonce, nwj, dv, js


def sweep_bounds(a, b, scale, bias):
  return tuple(xentjax.info.mutual_information_bounds(a, b, scale=scale, bias=bias))


METHODS = {"materialized": materialized_bounds, "xentjax sweep": sweep_bounds}


def value_and_grad(bounds):
  return jax.jit(jax.value_and_grad(lambda *x: sum(bounds(*x)), argnums=(0, 1, 2, 3)))


def fmt_bytes(b):
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if b >= scale:
      return f"{b / scale:.2f} {unit}"
  return f"{b} B"


def memory_table(n, d):
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  s = jax.ShapeDtypeStruct((), jnp.float32)
  rows = [
    f"| bounds (B={n}, D={d}, float32) | temp memory (value and gradient) | vs materialized |"
  ]
  rows.append("|---|---:|---:|")
  base = None
  for name, bounds in METHODS.items():
    compiled = value_and_grad(bounds).lower(x, x, s, s).compile()
    b = compiled.memory_analysis().temp_size_in_bytes
    base = b if base is None else base
    rows.append(f"| {name} | {fmt_bytes(b)} | {100 * b / base:.3f}% |")
  return "\n".join(rows)


def time_table(n, d, repeats, warmup):
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, d), jnp.float32) / d**0.5
  b = 0.6 * a + 0.8 * jax.random.normal(kb, (n, d), jnp.float32) / d**0.5
  args = (a, b, jnp.float32(5.0), jnp.float32(-1.0))
  fns = {name: (value_and_grad(f), args) for name, f in METHODS.items()}
  times, out = alternate(fns, repeats, warmup)
  ratios = [s / m for s, m in zip(times["xentjax sweep"], times["materialized"], strict=True)]
  del out
  values = [jax.jit(f)(*args) for f in METHODS.values()]  # the four bounds of each
  gap = max(abs(float(x) - float(y)) for x, y in zip(*values, strict=True))
  rows = [
    f"| bounds (B={n}, D={d}, float32) | fwd+bwd median | min | ratio median | ratio min-max |",
    "|---|---:|---:|---:|---:|",
  ]
  for name, ts in times.items():
    med, lo = statistics.median(ts), min(ts)
    ratio = statistics.median(ratios) if name != "materialized" else 1.0
    spread = f"{min(ratios):.3f}-{max(ratios):.3f}" if name != "materialized" else ""
    rows.append(f"| {name} | {med * 1e3:.1f} ms | {lo * 1e3:.1f} ms | {ratio:.3f}x | {spread} |")
  rows.append("")
  rows.append(f"Largest difference of a bound between the two: {gap:.2e} nats.")
  return "\n".join(rows)


def main(argv=None):
  p = parser(__doc__, SMALL, repeats=5)
  p.add_argument("--no-time", action="store_true", help="skip the time table")
  args = p.parse_args(argv)
  print_header()
  print()
  if not args.no_memory:
    size = SMALL if args.small else MEMORY
    print("Temporary memory of jit(value_and_grad(sum of bounds, (a, b, scale, bias))):")
    print()
    print(memory_table(*size))
    print()
  if not args.no_time:
    n, d = SMALL if args.small else TIMING
    print(f"fwd+bwd time, {args.repeats} alternating repeats after warm-up:")
    print()
    print(time_table(n, d, args.repeats, args.warmup))
    print()
    print(f"Machine at the end: {machine()}")


if __name__ == "__main__":
  main()
