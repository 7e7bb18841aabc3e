"""The compiled programs of the fused functions: temporary memory and a hash of the HLO.

Usage::

  python benchmarks/programs.py            # small programs and the Gemma-size ratios
  python benchmarks/programs.py --no-big   # small programs only (seconds)

A refactoring of the large-vocabulary engine should leave what XLA compiles
alone. For six representative ``jax.jit(jax.value_and_grad(...))`` programs at
small shapes this prints the temporary memory
(``compiled.memory_analysis().temp_size_in_bytes``, deterministic: nothing
runs) and a hash of the optimized HLO text with its metadata (source lines,
op names) stripped, so two runs before and after a change can be diffed.
Then, compiled from `jax.ShapeDtypeStruct` at N=8192, D=2048, V=262144, the
temporary memory of the fused cross-entropy, token statistics and
distillation as a share of the materialized computation (the README's
targets: at most 1%), with the code of `benchmarks/fused.py`,
`benchmarks/token_stats.py` and `benchmarks/distillation.py`.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

import xentjax
from benchmarks import distillation, fused, token_stats

N, D, V, K = 96, 48, 1000, 4


def _args():
  s = jax.ShapeDtypeStruct
  return {
    "x": s((N, D), jnp.float32),
    "w": s((D, V), jnp.float32),
    "w_vd": s((V, D), jnp.float32),
    "y": s((N,), jnp.int32),
    "tx": s((N, 2 * D), jnp.float32),
    "tw": s((2 * D, V), jnp.float32),
    "idx": s((N, K), jnp.int32),
    "lp": s((N, K), jnp.float32),
  }


def programs():
  """`{name: (loss, argument names)}`: each program is value_and_grad over (x, w)."""

  def ce(x, w, y):
    return xentjax.linear_softmax_cross_entropy(x, w, y)

  def ce_store_smooth(x, w, y):
    return xentjax.linear_softmax_cross_entropy(x, w, y, strategy="store", label_smoothing=0.1)

  def ce_vd_padded_chunks(x, w_vd, y):
    return xentjax.linear_softmax_cross_entropy(
      x, w_vd, y, w_layout="vd", vocab_size=V - 37, token_chunk_size=40, vocab_chunk_size=128
    )

  def token_stats_topk(x, w, y):
    s = xentjax.linear_token_stats(x, w, y, top_k=K, temperature=0.7)
    return jnp.sum(-s.logprob - 0.01 * s.entropy) + 0.0 * jnp.sum(s.top_k_logprobs)

  def jsd(x, w, tx, tw, y):
    return xentjax.linear_distillation_loss(
      x, w, tx, tw, y, beta=0.5, temperature=2.0, hard_weight=0.25
    )

  def topk_distill(x, w, idx, lp, y):
    return xentjax.linear_topk_distillation_loss(x, w, idx, lp, y, temperature=2.0, hard_weight=0.5)

  return {
    "ce default": (ce, ("x", "w", "y")),
    "ce store + label_smoothing": (ce_store_smooth, ("x", "w", "y")),
    "ce vd + padding + chunks": (ce_vd_padded_chunks, ("x", "w_vd", "y")),
    "token stats + top-k": (token_stats_topk, ("x", "w", "y")),
    "distillation JSD + hard": (jsd, ("x", "w", "tx", "tw", "y")),
    "top-k distillation + hard": (topk_distill, ("x", "w", "idx", "lp", "y")),
  }


def hlo_hash(text: str) -> str:
  """Hash of optimized HLO text without metadata, so source edits do not change it.

  Left out: each instruction's ``metadata={...}`` and the tables of source
  files, functions and stack frames that the text starts with.
  """
  tables = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
  blocks = [b for b in text.split("\n\n") if not b.lstrip().startswith(tables)]
  text = re.sub(r",?\s*metadata=\{[^}]*\}", "", "\n\n".join(blocks))
  text = re.sub(r'op_name="[^"]*"', "", text)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def ops_hash(text: str) -> str:
  """`hlo_hash` with the instructions' numbering removed (``%add.462`` is ``%add``).

  Two programs that differ only in how XLA numbered their instructions (the
  order in which the same operations were traced) have the same ops hash.
  """
  return hlo_hash(re.sub(r"(%[\w\-]+?)\.\d+\b", r"\1", text))


def small_table():
  args = _args()
  rows = [
    "| program (N, D, V = 96, 48, 1000) | temp bytes | HLO hash | ops hash |",
    "|---|---:|---|---|",
  ]
  for name, (loss, names) in programs().items():
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    compiled = f.lower(*(args[k] for k in names)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    text = compiled.as_text()
    rows.append(f"| {name} | {temp} | {hlo_hash(text)} | {ops_hash(text)} |")
  return "\n".join(rows)


def big_table():
  n, d, v = fused.GEMMA
  rows = [f"| at N, D, V = {n}, {d}, {v} (float32) | fused temp | materialized | share |"]
  rows.append("|---|---:|---:|---:|")

  def row(name, fused_b, base_b):
    rows.append(
      f"| {name} | {fused_b} | {base_b} | {100 * fused_b / base_b:.2f}% |",
    )

  ce = fused.losses()
  base = fused.temp_bytes(ce["optax (materialized)"], n, d, v)
  row("cross-entropy, recompute", fused.temp_bytes(ce["fused recompute (default)"], n, d, v), base)
  row("cross-entropy, store", fused.temp_bytes(ce["fused store"], n, d, v), base)
  base = token_stats.temp_bytes(token_stats.pg_materialized, n, d, v)
  row("token statistics", token_stats.temp_bytes(token_stats.pg_fused, n, d, v), base)
  dl = distillation.losses(0.0, 1.0)
  base = distillation.temp_bytes(dl["materialized (2 logit arrays)"], n, d, v)
  row(
    "distillation, recompute",
    distillation.temp_bytes(dl["fused recompute (default)"], n, d, v),
    base,
  )
  row("distillation, store", distillation.temp_bytes(dl["fused store"], n, d, v), base)
  return "\n".join(rows)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--no-big", action="store_true", help="skip the Gemma-size memory ratios")
  args = p.parse_args(argv)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, x64 {jax.config.jax_enable_x64}")
  print()
  print(small_table())
  if not args.no_big:
    print()
    print(big_table())


if __name__ == "__main__":
  main()
