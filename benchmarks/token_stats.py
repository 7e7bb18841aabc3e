"""Fused per-token statistics and gradient filtering against materialized logits.

Usage::

  python benchmarks/token_stats.py           # full run (minutes on a CPU)
  python benchmarks/token_stats.py --small   # quick run at small sizes
  python benchmarks/token_stats.py --setting real   # timed on the real model's activations

Prints markdown tables, everything measured side by side in one run:

1. temporary memory (``compiled.memory_analysis().temp_size_in_bytes``,
   compiled from `jax.ShapeDtypeStruct`, nothing is allocated) of
   ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` for the
   policy-gradient loss ``mean(-A * logprob - 0.01 * entropy)`` at
   N=8192, D=2048, V=262144 in float32: `xentjax.linear_token_stats` against
   the same loss on materialized logits (``jax.nn.log_softmax``);
2. its fwd+bwd time at N=2048, D=1024, V=32768 (median of alternating
   repeats after a warm-up);
3. gradient filtering (``filter_eps``) of `xentjax.linear_softmax_cross_entropy`
   on language-model-like logits ``x @ w + b``: a Zipf-shaped unigram bias
   ``b_j = -alpha log(1 + j)`` (frequent tokens first, as in a BPE
   vocabulary), per-token Gaussian variation of scale 0.5 and, per token, one
   context-preferred column drawn from a Zipf distribution and raised by
   ``beta`` (so each token's mass sits on a token of its own, not only the
   head); labels are sampled from the model's distribution. Two settings: a
   "peaked" one (mean largest probability about 0.8) and a "realistic" one
   (about 2.3 nats of entropy, mean largest probability about 0.5). For each:
   the fwd+bwd time as a ratio to optax on materialized logits, the fraction
   of (token x vocabulary) tiles skipped, and the relative error
   ``|g - g_exact| / |g_exact|`` (Frobenius, over the gradients of ``x`` and
   ``w``) against the exact float32 gradient of optax.
"""

from __future__ import annotations

import math
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xentjax
from benchmarks import _common, _settings
from benchmarks._common import FILTER_TILE, machine, parser, print_header, timing_size

GEMMA = (8192, 2048, 262144)
TIMING = (2048, 1024, 32768)
SMALL = (512, 256, 8192)
BETA_ENTROPY = 0.01
# (name, alpha, beta): the Zipf exponent of the unigram bias, the boost of each
# token's preferred column.
SETTINGS = (("peaked", 1.5, 9.0), ("realistic", 1.5, 4.0))
# (filter_eps, token_chunk_size, vocab_chunk_size): None chunks are the automatic
# filtering tiles (256 x 512); two other shapes show the trade-off.
VARIANTS = (
  (2.0**-12, None, None),
  (2.0**-16, None, None),
  (2.0**-12, 128, 512),
  (2.0**-12, 512, 1024),
)


# ----------------------------------------------------------------------------
# 1-2. The policy-gradient loss: fused statistics vs materialized logits.


def pg_fused(x, w, y, adv, b=None):
  s = xentjax.linear_token_stats(x, w, y, bias=b)
  return jnp.mean(-adv * s.logprob - BETA_ENTROPY * s.entropy)


def pg_materialized(x, w, y, adv, b=None):
  logp = jax.nn.log_softmax(x @ w if b is None else x @ w + b, axis=-1)
  logprob = jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.mean(-adv * logprob - BETA_ENTROPY * entropy)


def value_and_grad(loss):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def temp_bytes(loss, n, d, v):
  s = jax.ShapeDtypeStruct
  args = (s((n, d), jnp.float32), s((d, v), jnp.float32), s((n,), jnp.int32), s((n,), jnp.float32))
  compiled = value_and_grad(loss).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def fmt_bytes(b):
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if b >= scale:
      return f"{b / scale:.2f} {unit}"
  return f"{b} B"


def alternate(fns, repeats, warmup):
  """Median and min seconds of each `(f, args)`, run alternately after a warm-up."""
  times, _ = _common.alternate(fns, repeats, warmup)
  return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def pg_tables(memory_size, setting, repeats, warmup):
  rows = [
    (
      "| loss `mean(-A·logprob - 0.01·entropy)`, float32 | size (N, D, V) | value | "
      "vs materialized |"
    ),
    "|---|---|---:|---:|",
  ]
  if memory_size is not None:
    base = temp_bytes(pg_materialized, *memory_size)
    fused = temp_bytes(pg_fused, *memory_size)
    size = ", ".join(map(str, memory_size))
    rows.append(f"| temp memory, materialized | {size} | {fmt_bytes(base)} | 100% |")
    rows.append(
      f"| temp memory, fused `linear_token_stats` | {size} | {fmt_bytes(fused)} | "
      f"**{100 * fused / base:.2f}%** |"
    )
  n, d, v = setting.size
  x, w, y, b = setting.x, setting.w, setting.y, setting.b
  adv = jax.random.normal(jax.random.PRNGKey(3), (n,))
  fns = {
    "materialized": (value_and_grad(pg_materialized), (x, w, y, adv, b)),
    "fused": (value_and_grad(pg_fused), (x, w, y, adv, b)),
  }
  t = alternate(fns, repeats, warmup)
  base = t["materialized"][0]
  size = f"{n}, {d}, {v} ({setting.name})"
  for name, (med, lo) in t.items():
    rows.append(
      f"| fwd+bwd time, {name} (median; min {lo * 1e3:.0f} ms) | {size} | "
      f"{med * 1e3:.0f} ms | **{med / base:.3f}×** |"
    )
  return "\n".join(rows)


# ----------------------------------------------------------------------------
# 3. Gradient filtering on language-model-like logits.


def lm_like(n, d, v, alpha, beta, seed=0):
  """`(x, w, b, y)` whose logits `x @ w + b` look like a trained model's output."""
  kx, kw, ks, kc, ky = jax.random.split(jax.random.PRNGKey(seed), 5)
  w = jax.random.normal(kw, (d, v)) / d**0.5  # unit columns (about)
  b = -alpha * jnp.log1p(jnp.arange(v, dtype=jnp.float32))
  prior = -1.1 * jnp.log1p(jnp.arange(v, dtype=jnp.float32))  # where preferred columns fall
  pref = jax.random.categorical(ks, prior, shape=(n,))
  boost = beta * jax.random.uniform(kc, (n,), minval=0.5, maxval=1.5)
  wp = w[:, pref].T  # [n, d]
  x = 0.5 * jax.random.normal(kx, (n, d)) + (boost / jnp.sum(wp * wp, axis=1))[:, None] * wp
  y = jax.random.categorical(ky, x @ w + b, axis=-1)
  return x, w, b, y


def tiles_skipped(logits, y, eps, tc, vc):
  """Fraction of `[tc, vc]` tiles the filter skips (the documented rule, from the logits)."""
  n, v = logits.shape
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  pad_n = -(-n // tc) * tc - n
  pad_v = -(-v // vc) * vc - v
  logp = np.pad(logp, ((0, pad_n), (0, pad_v)), constant_values=-np.inf)
  blk = logp.reshape(logp.shape[0] // tc, tc, logp.shape[1] // vc, vc).max(axis=(1, 3))
  keep = blk >= math.log(eps)
  keep[np.arange(n) // tc, np.asarray(y) // vc] = True  # a tile holding a label is kept
  return 1.0 - keep.mean()


def rel_error(g, g_ref):
  num = sum(float(jnp.sum(jnp.square(a.astype(jnp.float32) - r))) for a, r in zip(g, g_ref))
  den = sum(float(jnp.sum(jnp.square(r))) for r in g_ref)
  return math.sqrt(num / den)


def filter_table(size, repeats, warmup):
  n, d, v = size
  tc, vc = FILTER_TILE
  rows = [
    (
      f"| setting (N={n}, D={d}, V={v}, float32) | mean max p | entropy (nats) | method | "
      "fwd+bwd median | vs optax | tiles skipped | grad rel. error |"
    ),
    "|---|---:|---:|---|---:|---:|---:|---:|",
  ]

  def optax_loss(x, w, b, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ w + b, y).mean()

  def fused_loss(x, w, b, y, eps=None, tc=None, vc=None):
    return xentjax.linear_softmax_cross_entropy(
      x, w, y, bias=b, filter_eps=eps, token_chunk_size=tc, vocab_chunk_size=vc
    )

  def label(eps, tc_, vc_):
    tiles = "" if tc_ is None else f", tiles {tc_}x{vc_}"
    return f"fused, filter_eps=2^{round(math.log2(eps))}{tiles}"

  for name, alpha, beta in SETTINGS:
    x, w, b, y = lm_like(n, d, v, alpha, beta)
    logits = x @ w + b
    p = jax.nn.softmax(logits, axis=-1)
    pmax = float(jnp.mean(jnp.max(p, axis=-1)))
    ent = float(jnp.mean(-jnp.sum(p * jax.nn.log_softmax(logits, axis=-1), axis=-1)))
    args = (x, w, b, y)
    fns = {
      "optax (materialized)": (value_and_grad(optax_loss), args),
      "fused, no filter": (value_and_grad(fused_loss), args),
    }
    skipped = {}
    for eps, tc_, vc_ in VARIANTS:
      fns[label(eps, tc_, vc_)] = (
        value_and_grad(lambda x, w, b, y, e=eps, t=tc_, c=vc_: fused_loss(x, w, b, y, e, t, c)),
        args,
      )
      skipped[label(eps, tc_, vc_)] = tiles_skipped(logits, y, eps, tc_ or tc, vc_ or vc)
    grads = {k: f(*a)[1] for k, (f, a) in fns.items()}
    del logits, p
    t = alternate(fns, repeats, warmup)
    base = t["optax (materialized)"][0]
    ref = grads["optax (materialized)"]
    for k, (med, _) in t.items():
      frac = f"{100 * skipped[k]:.1f}%" if k in skipped else "-"
      err = "-" if k.startswith("optax") else f"{rel_error(grads[k], ref):.1e}"
      rows.append(
        f"| {name} (alpha={alpha}, beta={beta}) | {pmax:.2f} | {ent:.2f} | {k} | "
        f"{med * 1e3:.0f} ms | **{med / base:.3f}×** | {frac} | {err} |"
      )
  return "\n".join(rows)


def main(argv=None):
  p = parser(__doc__, SMALL, memory_help="skip the compile-only memory row")
  p.add_argument("--only", choices=("pg", "filter"), default=None)
  args = p.parse_args(argv)
  timing = timing_size(args, TIMING, SMALL)
  print_header()
  print()
  if args.only in (None, "pg"):
    print("Policy-gradient loss, fused statistics vs materialized logits:\n")
    memory = None if args.no_memory else (args.memory_size or GEMMA)
    setting = _settings.make(args.setting, *timing)
    print(pg_tables(memory, setting, args.repeats, args.warmup))
    print()
  if args.only in (None, "filter"):
    print(f"Gradient filtering (tiles of {FILTER_TILE[0]} tokens x {FILTER_TILE[1]} columns):\n")
    print(filter_table(timing, args.repeats, args.warmup))
    print()
  print(f"Machine at the end: {machine()}")


if __name__ == "__main__":
  main()
