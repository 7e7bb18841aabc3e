"""Memory and time of `xentjax.linear_softmax_cross_entropy` against optax.

Usage::

  python benchmarks/fused.py           # full run (minutes on a CPU)
  python benchmarks/fused.py --small   # quick run at small sizes
  python benchmarks/fused.py --setting real   # timed on the real model's activations

Prints markdown tables:

* temporary memory of ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))``
  (``compiled.memory_analysis().temp_size_in_bytes``: deterministic, nothing
  is allocated) for optax on materialized logits, the fused default
  (``strategy="recompute"``) and ``strategy="store"``, at the Gemma size
  N=8192, D=2048, V=262144 (compile only, from `jax.ShapeDtypeStruct`) and at
  the timing size;
* fwd+bwd time at the timing size (N=2048, D=1024, V=32768 by default),
  median over repeats in which the functions run alternately after a warm-up,
  as ratios to optax and to the floor of the three matmuls every gradient
  needs (``x @ w``, ``dlogits @ w.T``, ``x.T @ dlogits``).
"""

from __future__ import annotations

import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax

import xentjax
from benchmarks import _settings
from benchmarks._common import alternate, machine, parser, print_header, timing_size

GEMMA = (8192, 2048, 262144)
TIMING = (2048, 1024, 32768)
SMALL = (512, 256, 8192)


def losses():
  """The compared losses of `(x, w, y, b)`; `b` is a bias `[V]` or None."""

  def baseline(x, w, y, b=None):
    logits = x @ w if b is None else x @ w + b
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def recompute(x, w, y, b=None):
    return xentjax.linear_softmax_cross_entropy(x, w, y, bias=b)

  def store(x, w, y, b=None):
    return xentjax.linear_softmax_cross_entropy(x, w, y, bias=b, strategy="store")

  return {
    "optax (materialized)": baseline,
    "fused recompute (default)": recompute,
    "fused store": store,
  }


def value_and_grad(loss):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def temp_bytes(loss, n, d, v, dtype=jnp.float32):
  s = jax.ShapeDtypeStruct
  compiled = (
    value_and_grad(loss).lower(s((n, d), dtype), s((d, v), dtype), s((n,), jnp.int32)).compile()
  )
  return compiled.memory_analysis().temp_size_in_bytes


def fmt_bytes(b):
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if b >= scale:
      return f"{b / scale:.2f} {unit}"
  return f"{b} B"


def memory_table(sizes):
  rows = ["| size (N, D, V), float32 | method | temp memory | vs optax |", "|---|---|---:|---:|"]
  for n, d, v in sizes:
    base = None
    for name, loss in losses().items():
      b = temp_bytes(loss, n, d, v)
      base = b if base is None else base
      rows.append(f"| {n}, {d}, {v} | {name} | {fmt_bytes(b)} | {100 * b / base:.2f}% |")
  # bfloat16 inputs, for reference (the targets are float32). On the CPU
  # backend XLA runs bfloat16 matmuls in float32 and keeps a float32 copy of
  # w, which shows here; GPU/TPU compile bfloat16 matmuls natively.
  n, d, v = sizes[0]
  for name, loss in list(losses().items())[:2]:
    b = temp_bytes(loss, n, d, v, jnp.bfloat16)
    b32 = temp_bytes(losses()["optax (materialized)"], n, d, v)
    rows.append(
      f"| {n}, {d}, {v}, bfloat16 ({jax.default_backend()}) | {name} | "
      f"{fmt_bytes(b)} | {100 * b / b32:.2f}% of float32 optax |"
    )
  return "\n".join(rows), None


def floor_fn():
  @jax.jit
  def three_matmuls(x, w, dlogits):
    return x @ w, dlogits @ w.T, x.T @ dlogits

  return three_matmuls


def time_table(setting, repeats, warmup):
  """Alternating fwd+bwd times on a `benchmarks._settings.Setting`."""
  x, w, y, b = setting.x, setting.w, setting.y, setting.b
  n, d, v = setting.size
  dl = jax.random.normal(jax.random.PRNGKey(3), (n, v), jnp.float32)
  fns = {name: (value_and_grad(loss), (x, w, y, b)) for name, loss in losses().items()}
  fns["3-matmul floor"] = (floor_fn(), (x, w, dl))
  times, _ = alternate(fns, repeats, warmup)
  med = {name: statistics.median(ts) for name, ts in times.items()}
  base, floor = med["optax (materialized)"], med["3-matmul floor"]
  rows = [
    (
      f"| method ({setting.name}, N={n}, D={d}, V={v}, float32) | fwd+bwd median | min | "
      "vs optax | vs 3-matmul floor |"
    ),
    "|---|---:|---:|---:|---:|",
  ]
  for name in fns:
    rows.append(
      f"| {name} | {med[name] * 1e3:.1f} ms | {min(times[name]) * 1e3:.1f} ms | "
      f"{med[name] / base:.3f}x | {med[name] / floor:.3f}x |"
    )
  return "\n".join(rows), med


def main(argv=None):
  args = parser(__doc__, SMALL).parse_args(argv)
  timing = timing_size(args, TIMING, SMALL)
  repeats = args.repeats
  print_header()
  print()
  if not args.no_memory:
    sizes = [args.memory_size or GEMMA, timing]
    table, _ = memory_table(sizes)
    print(
      "Temporary memory of jit(value_and_grad(loss, argnums=(0, 1))) "
      "(memory_analysis().temp_size_in_bytes; the Gemma size is compiled, not run):"
    )
    print()
    print(table)
    print()
  setting = _settings.make(args.setting, *timing)
  table, _ = time_table(setting, repeats=repeats, warmup=args.warmup)
  note = f" ({setting.note})" if setting.note else ""
  print(
    f"Time of one fwd+bwd on the {setting.name} setting{note}, median of {repeats} "
    "alternating repeats after warm-up:"
  )
  print()
  print(table)
  print()
  print(f"Machine at the end: {machine()}")


if __name__ == "__main__":
  main()
