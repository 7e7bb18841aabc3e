"""Memory and time of `xentjax.linear_distillation_loss` against the materialized computation.

Usage::

  python benchmarks/distillation.py              # full run (minutes on a CPU)
  python benchmarks/distillation.py --small      # quick run at small sizes
  python benchmarks/distillation.py --setting real   # timed on the real model's activations
  python benchmarks/distillation.py --beta 0.5   # generalized JSD instead of forward KL

Prints markdown tables, side by side in one run:

* temporary memory of ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))``
  (``compiled.memory_analysis().temp_size_in_bytes``: compiled from
  `jax.ShapeDtypeStruct`, nothing is allocated) at N=8192, D=D_t=2048,
  V=262144 and at the timing size, for the materialized computation (both
  logit arrays built, `jax.nn.log_softmax`, the same divergence, the teacher
  under `stop_gradient`), the fused default (``strategy="recompute"``) and
  ``strategy="store"``;
* fwd+bwd time at N=2048, D=D_t=1024, V=32768: every method runs alternately
  after a warm-up, median and spread (min-max) over the repeats, as ratios to
  the materialized computation.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

import xentjax
from benchmarks import _settings
from benchmarks._common import alternate, parser, print_header, timing_size

GEMMA = (8192, 2048, 262144)
TIMING = (2048, 1024, 32768)
SMALL = (512, 256, 8192)


def materialized(beta, temperature):
  """The reference: both logits, log-softmax, the divergence, mean over tokens."""

  def loss(x, w, tx, tw):
    a = jax.nn.log_softmax(x @ w / temperature, axis=-1)
    b = jax.nn.log_softmax(jax.lax.stop_gradient(tx @ tw) / temperature, axis=-1)
    pa, pb = jnp.exp(a), jnp.exp(b)
    if beta == 0.0:
      d = jnp.sum(pb * (b - a), axis=-1)
    elif beta == 1.0:
      d = jnp.sum(pa * (a - b), axis=-1)
    else:
      m = jnp.logaddexp(jnp.log(beta) + b, jnp.log1p(-beta) + a)
      d = beta * jnp.sum(pb * (b - m), axis=-1) + (1 - beta) * jnp.sum(pa * (a - m), axis=-1)
    return temperature**2 * jnp.mean(d)

  return loss


def losses(beta, temperature):
  def fused(strategy):
    def loss(x, w, tx, tw):
      return xentjax.linear_distillation_loss(
        x, w, tx, tw, beta=beta, temperature=temperature, strategy=strategy
      )

    return loss

  return {
    "materialized (2 logit arrays)": materialized(beta, temperature),
    "fused recompute (default)": fused("recompute"),
    "fused store": fused("store"),
  }


def value_and_grad(loss):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def temp_bytes(loss, n, d, v, dtype=jnp.float32):
  s = jax.ShapeDtypeStruct
  args = (s((n, d), dtype), s((d, v), dtype), s((n, d), dtype), s((d, v), dtype))
  return value_and_grad(loss).lower(*args).compile().memory_analysis().temp_size_in_bytes


def fmt_bytes(b):
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if b >= scale:
      return f"{b / scale:.2f} {unit}"
  return f"{b} B"


def memory_table(sizes, beta, temperature):
  rows = [
    "| size (N, D=D_t, V), float32 | method | temp memory | vs materialized |",
    "|---|---|---:|---:|",
  ]
  for n, d, v in sizes:
    base = None
    for name, loss in losses(beta, temperature).items():
      b = temp_bytes(loss, n, d, v)
      base = b if base is None else base
      rows.append(f"| {n}, {d}, {v} | {name} | {fmt_bytes(b)} | {100 * b / base:.2f}% |")
  return "\n".join(rows)


def time_table(student, teacher, beta, temperature, repeats, warmup):
  """Alternating fwd+bwd times on a student and a teacher `benchmarks._settings.Setting`."""
  x, w, tx, tw = student.x, student.w, teacher.x, teacher.w
  n, d, v = student.size
  fns = {
    name: (value_and_grad(loss), (x, w, tx, tw)) for name, loss in losses(beta, temperature).items()
  }
  times, outputs = alternate(fns, repeats, warmup)
  values = {name: float(out[0]) for name, out in outputs.items()}
  med = {name: statistics.median(ts) for name, ts in times.items()}
  base = med["materialized (2 logit arrays)"]
  rows = [
    (
      f"| method ({student.name}, N={n}, D=D_t={d}, V={v}, float32) | loss | fwd+bwd median | "
      "min - max | vs materialized |"
    ),
    "|---|---:|---:|---:|---:|",
  ]
  for name in fns:
    rows.append(
      f"| {name} | {values[name]:.6f} | {med[name] * 1e3:.1f} ms | "
      f"{min(times[name]) * 1e3:.0f} - {max(times[name]) * 1e3:.0f} ms | "
      f"**{med[name] / base:.3f}x** |"
    )
  return "\n".join(rows)


def main(argv=None):
  p = parser(__doc__, SMALL)
  p.add_argument("--beta", type=float, default=0.0, help="0 forward KL, 1 reverse KL, else JSD")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--no-time", action="store_true", help="skip the time table")
  args = p.parse_args(argv)
  timing = timing_size(args, TIMING, SMALL)
  print_header()
  print(f"Loss: beta={args.beta}, temperature={args.temperature}, reduction mean\n")
  if not args.no_memory:
    sizes = [args.memory_size or GEMMA, timing] if not args.small else [timing]
    print(memory_table(sizes, args.beta, args.temperature), "\n", flush=True)
  if not args.no_time:
    student, teacher = _settings.teacher_student(args.setting, *timing)
    if student.note:
      print(f"Student: {student.note}; teacher: {teacher.note}\n")
    print(time_table(student, teacher, args.beta, args.temperature, args.repeats, args.warmup))


if __name__ == "__main__":
  main()
