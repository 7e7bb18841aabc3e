"""The real-model setting: a small LM trained on the Python standard library, and its statistics.

Usage::

  python benchmarks/real_lm.py           # build the cache once (minutes), print the tables
  python benchmarks/real_lm.py --quick   # a tiny model (V=4096), seconds
  python benchmarks/real_lm.py --rebuild # train again

The corpus is the standard library's own ``.py`` files (every machine has
them; every tenth file of the sorted list is held out). A 32,768-entry
byte-level BPE vocabulary is trained on the training files with the
``tokenizers`` package (``pip install xentjax[bench]``), then two causal
transformers (the teacher, d=256 with 4 layers, and the student, d=128 with 2)
are trained with ``xentjax.linear_softmax_cross_entropy`` and optax. The
tokenizer, the parameters and the final hidden states and heads on 8192
held-out tokens are cached under ``$XENTJAX_BENCH_CACHE`` (default
``~/.cache/xentjax-bench``); later runs only read them.

Prints markdown tables: the models (size, tokens seen, training time,
held-out perplexity), then for each distribution (the two synthetic ones of
`benchmarks/_settings.py` and the two models) the mean entropy of the
next-token distributions, the mean largest probability and the fraction of
probabilities below 2^-12, and the fraction of ``[tokens x columns]`` tiles
that gradient filtering (``filter_eps=2**-12``) can skip, with the vocabulary
as it is and with its columns sorted by mass (by the frequency known before
training, and, optimistically, by the batch's own mean probability).
Everything here is NumPy on the logits, independent of the fused engine.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


from benchmarks import _settings
from benchmarks._common import FILTER_TILE
from benchmarks._real_lm import build, stats

N, D, V = 2048, 1024, 32768
QUICK_SIZE = (256, 128, 4096)


def model_table(meta, held_out) -> str:
  rows = [
    "| model | parameters | tokens seen | training time | held-out CE (nats) | perplexity |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for role in ("teacher", "student"):
    m = meta[role]
    ce = held_out[role]
    rows.append(
      f"| {role}: {m['model']} | {m['parameters'] / 1e6:.1f} M | {m['tokens_seen']:,} | "
      f"{meta['seconds'][f'train_{role}']:.0f} s | {ce:.3f} | {math.exp(ce):.1f} |"
    )
  return "\n".join(rows)


def measurements(n, d, v):
  """`{name: (measure dict, frequency order)}` for the four distributions.

  The frequency order is the column order known before training: the
  synthetic bias is Zipf-sorted already (the identity), the models' is their
  training-set token frequency.
  """
  out = {}
  for name in ("concentrated", "scattered"):
    s = _settings.make(name, n, d, v)
    out[name] = (stats.measure(s.x, s.w, s.b, s.y), s.frequency_order)
  for role in ("teacher", "student"):
    x, w, b, y, _ = _settings.real_arrays(role)
    out[f"real {role}"] = (stats.measure(x[:n], w, b, y[:n]), _settings.real_frequency_order())
  return out


def distribution_table(ms) -> str:
  rows = [
    "| distribution | N | V | entropy (nats) | mean max p | p < 2^-12 | label CE (nats) |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for name, (m, _) in ms.items():
    rows.append(
      f"| {name} | {m['n']} | {m['v']} | {m['entropy']:.2f} | {m['max_p']:.3f} | "
      f"{100 * m['below_eps']:.2f}% | {m['cross_entropy']:.3f} |"
    )
  return "\n".join(rows)


def tile_table(ms, tiles=None) -> str:
  """Skippable tiles: the engine's rule (label tiles kept), then probabilities alone."""
  rows = [
    (
      "| distribution | tile (tokens x columns) | as is | sorted by frequency | "
      "sorted by this batch's mean p (oracle) | p only, as is | p only, sorted by frequency |"
    ),
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for name, (m, freq) in ms.items():
    oracle = stats.by_mass(m["mean_p"])
    for tc in m["group_max"]:
      for vc in stats.VOCAB_CHUNKS:
        if tiles is not None and (tc, vc) not in tiles:
          continue
        cells = [
          stats.skippable(m, tc, vc),
          stats.skippable(m, tc, vc, freq),
          stats.skippable(m, tc, vc, oracle),
          stats.skippable(m, tc, vc, labels=False),
          stats.skippable(m, tc, vc, freq, labels=False),
        ]
        bold = "**" if (tc, vc) == FILTER_TILE else ""
        cells = " | ".join(f"{100 * c:.1f}%" for c in cells)
        rows.append(f"| {name} | {bold}{tc} x {vc}{bold} | {cells} |")
  return "\n".join(rows)


def held_out_ce(meta) -> dict:
  """Mean next-token cross-entropy of each model over every cached held-out token."""
  out = {}
  for role in ("teacher", "student"):
    x, w, b, y, _ = _settings.real_arrays(role)
    out[role] = stats.measure(x, w, b, y, token_chunks=())["cross_entropy"]
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="the tiny variant (V=4096), seconds")
  p.add_argument("--rebuild", action="store_true", help="train again, replacing the cache")
  args = p.parse_args(argv)
  if args.quick:
    _settings.os.environ["XENTJAX_BENCH_REAL"] = "quick"
  variant = build.VARIANTS[_settings.real_variant()]
  _, meta = build.load(variant, rebuild=args.rebuild)
  n, d, v = QUICK_SIZE if args.quick else (N, D, V)
  print(f"Cache: {build.cache_dir(variant)}")
  print(
    f"Corpus: {meta['files']['all']} files of {meta['python_stdlib']} "
    f"({meta['files']['held_out']} held out); {meta['tokens']['train']:,} training and "
    f"{meta['tokens']['held_out']:,} held-out tokens; tokenizer and encoding "
    f"{meta['seconds']['tokenizer_and_encoding']:.0f} s, everything {meta['seconds']['total']:.0f} s."
  )
  print()
  ce = held_out_ce(meta)
  print(f"Models (held-out CE over {meta['variant']['eval_windows']} windows):\n")
  print(model_table(meta, ce))
  print()
  ms = measurements(n, d, v)
  print(f"Next-token distributions (first N={n} held-out tokens; synthetic at D={d}):\n")
  print(distribution_table(ms))
  print()
  print(
    "Tiles that `filter_eps=2**-12` can skip: every probability in the tile below 2^-12 and no "
    "label in it (the engine's rule), then by the probabilities alone. Columns as they are, "
    "sorted by the frequency known before training (the synthetic bias is Zipf-sorted already; "
    "the models': training-set token counts), and sorted by this batch's own mean probability "
    "(an oracle fitted to the batch it is scored on: optimistic, though not an optimum). The "
    "automatic filtering "
    "tile in bold:\n"
  )
  print(tile_table(ms))


if __name__ == "__main__":
  main()
