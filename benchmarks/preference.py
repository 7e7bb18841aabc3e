"""A DPO step from hidden states: `xentjax.linear_sequence_logprobs` against materialized logits.

Usage::

  python benchmarks/preference.py             # full run (minutes on a CPU)
  python benchmarks/preference.py --small     # quick run at small sizes
  python benchmarks/preference.py --setting real   # timed on the real model's activations

The step: ``2P`` sequences (P pairs, chosen then rejected) of ``N / 2P``
tokens each, packed into one row of N tokens; their log-probability sums
under the policy head ``w``; `xentjax.preference.dpo_loss` (sigmoid,
beta=0.1) against precomputed reference sums. The fused step gets the sums
from `xentjax.linear_sequence_logprobs`; the materialized one from
``jax.nn.log_softmax(x @ w)``, gathered at the labels and summed per sequence
with `jax.ops.segment_sum` (the same loss, the same gradients). Prints markdown
tables, everything measured side by side in one run:

1. temporary memory (``compiled.memory_analysis().temp_size_in_bytes``,
   compiled from `jax.ShapeDtypeStruct`, nothing is allocated) of
   ``jax.jit(jax.value_and_grad(step, argnums=(0, 1)))`` at N=8192, D=2048,
   V=262144 in float32;
2. its fwd+bwd time at N=2048, D=1024, V=32768: the two run alternately
   after a warm-up; the ratio fused / materialized is taken within each
   repeat, and its median, min and max are reported.
"""

from __future__ import annotations

import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

import xentjax
from benchmarks import _common, _settings
from benchmarks._common import machine, parser, print_header, timing_size
from xentjax import preference

GEMMA = (8192, 2048, 262144)
TIMING = (2048, 1024, 32768)
SMALL = (512, 256, 8192)
PAIRS = 8  # 16 sequences
BETA = 0.1


def segments(n):
  """The sequence of each of the N packed tokens: 2P runs of N / 2P (the rest padding, -1)."""
  per = n // (2 * PAIRS)
  seg = jnp.repeat(jnp.arange(2 * PAIRS, dtype=jnp.int32), per)
  return jnp.concatenate([seg, jnp.full((n - seg.shape[0],), -1, jnp.int32)])


def dpo(sums, ref):
  return preference.dpo_loss(sums[:PAIRS], sums[PAIRS:], ref[:PAIRS], ref[PAIRS:], beta=BETA)


def step_fused(x, w, y, seg, ref):
  sums, _ = xentjax.linear_sequence_logprobs(x, w, y, seg, num_segments=2 * PAIRS)
  return dpo(sums, ref)


def step_materialized(x, w, y, seg, ref):
  logp = jax.nn.log_softmax(x @ w, axis=-1)
  tok = jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
  sums = jax.ops.segment_sum(jnp.where(seg >= 0, tok, 0.0), jnp.maximum(seg, 0), 2 * PAIRS)
  return dpo(sums, ref)


def value_and_grad(step):
  return jax.jit(jax.value_and_grad(step, argnums=(0, 1)))


def temp_bytes(step, n, d, v):
  s = jax.ShapeDtypeStruct
  args = (
    s((n, d), jnp.float32),
    s((d, v), jnp.float32),
    s((n,), jnp.int32),
    s((n,), jnp.int32),
    s((2 * PAIRS,), jnp.float32),
  )
  compiled = value_and_grad(step).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def fmt_bytes(b):
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if b >= scale:
      return f"{b / scale:.2f} {unit}"
  return f"{b} B"


def memory_rows(size):
  base = temp_bytes(step_materialized, *size)
  fused = temp_bytes(step_fused, *size)
  text = ", ".join(map(str, size))
  return [
    f"| temp memory, materialized `log_softmax` | {text} | {fmt_bytes(base)} | 100% |",
    (
      f"| temp memory, fused `linear_sequence_logprobs` | {text} | {fmt_bytes(fused)} | "
      f"**{100 * fused / base:.2f}%** |"
    ),
  ]


def timing_rows(setting, repeats, warmup):
  n, d, v = setting.size
  x, w, y = setting.x, setting.w, setting.y
  if setting.b is not None:  # fold a bias into the head: one more input column of ones
    x = jnp.concatenate([x, jnp.ones((n, 1), x.dtype)], axis=1)
    w = jnp.concatenate([w, setting.b[None, :]], axis=0)
  seg = segments(n)
  ref = jax.lax.stop_gradient(step_sums(x, w, y, seg)) - 0.5
  args = (x, w, y, seg, ref)
  fns = {
    "materialized": (value_and_grad(step_materialized), args),
    "fused": (value_and_grad(step_fused), args),
  }
  times, out = _common.alternate(fns, repeats, warmup)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(out["fused"][1], out["materialized"][1]))
  ratios = [f / m for f, m in zip(times["fused"], times["materialized"], strict=True)]
  size = f"{n}, {d}, {v} ({setting.name})"
  rows = []
  for name in fns:
    med, lo = statistics.median(times[name]), min(times[name])
    rows.append(
      f"| fwd+bwd time, {name} (median; min {lo * 1e3:.0f} ms) | {size} | {med * 1e3:.0f} ms | |"
    )
  rows.append(
    f"| fused / materialized, per repeat ({repeats} repeats) | {size} | median "
    f"**{statistics.median(ratios):.3f}×** | min {min(ratios):.3f}×, max {max(ratios):.3f}× |"
  )
  rows.append(f"| max abs. gradient difference, fused vs materialized | {size} | {gap:.1e} | |")
  return rows


def step_sums(x, w, y, seg):
  sums, _ = xentjax.linear_sequence_logprobs(x, w, y, seg, num_segments=2 * PAIRS)
  return sums


def main(argv=None):
  p = parser(__doc__, SMALL, repeats=3, memory_help="skip the compile-only memory rows")
  args = p.parse_args(argv)
  timing = timing_size(args, TIMING, SMALL)
  print_header()
  print()
  print(f"DPO step (sigmoid, beta={BETA}, {PAIRS} pairs packed in one row), float32:\n")
  rows = ["| quantity | size (N, D, V) | value | vs materialized |", "|---|---|---:|---:|"]
  if not args.no_memory:
    rows += memory_rows(args.memory_size or GEMMA)
  rows += timing_rows(_settings.make(args.setting, *timing), args.repeats, args.warmup)
  print("\n".join(rows))
  print()
  print(f"Machine at the end: {machine()}")


if __name__ == "__main__":
  main()
