"""Range coding with a model's logits: `xentjax.coding` against constriction called directly.

Usage::

  python benchmarks/coding.py               # full run (minutes on a CPU)
  python benchmarks/coding.py --small       # quick run, a quarter of the symbols
  python benchmarks/coding.py --real quick  # only the small LM on held-out files (see `real_model`)
  python benchmarks/coding.py --real tiny   # notebook 12's model (no student) on the same windows

Prints markdown tables, everything measured side by side in one run:

1. **Throughput** in symbols per second at V = 256, 32,768 and 65,536 (medians
   of ``--repeats`` alternating repeats; the ratios are medians of per-repeat ratios): `xentjax.coding.encode` (teacher-forced: the stacked
   ``[n, V]`` logits), `xentjax.coding.decode` with the same logits, and
   `decode` with a ``step`` function (autoregressive: one row per call, here
   read from a table, so the model costs nothing); next to constriction called
   directly on the same rows: NumPy float64 softmax numerators and one
   ``RangeEncoder.encode`` per block of rows (constriction's own 24-bit
   quantization, one stage), and its decoder one symbol at a time (the
   autoregressive form). The ratio is the bridge's overhead: quantization to
   integer weights, the two stages past 1,024 symbols, the check word.
2. **Bits per symbol against the cross-entropy** (``ideal_bits``) on symbols
   drawn from the model, for "peaked" rows (99% of the mass on one symbol, the
   rest log-normal so that most symbols sit below 2^-24), "certain" rows (one
   symbol 40 nats above the rest: where constriction's floors cost the most)
   and "near-uniform" rows (logits of scale 0.3): the excess of xentjax's code and of
   constriction's, in total bits and per symbol beyond the fixed cost (64 bits
   for xentjax: the coder's last word and the check word; 32 for constriction).
3. **The quantization loss per symbol**, measured on a million symbols drawn
   from one row (see `rate`), where the fixed costs vanish.
4. **The cost of a symbol forced to (almost) zero probability**: a ``-inf``
   logit at V = 65,536 (the trade-off of the two stages' finer floor).

The logits cycle through 64 distinct rows (a view that materializes only the
block being coded), so that memory stays small at V = 65,536.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import importlib.metadata
import lzma
import math
import os
import pathlib
import platform
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import constriction
import numpy as np

from xentjax import coding

VOCABS = (256, 32_768, 65_536)
DISTINCT_ROWS = 64


class Cycled:
  """``[n, V]`` logits whose row ``t`` is ``rows[t % len(rows)]``, built a block at a time."""

  def __init__(self, rows: np.ndarray, n: int):
    self.rows, self.shape = rows, (n, rows.shape[1])

  def __getitem__(self, index: slice) -> np.ndarray:
    start, stop, _ = index.indices(self.shape[0])
    return self.rows[np.arange(start, stop) % len(self.rows)]


def _softmax(rows):
  p = np.exp(rows.astype(np.float64) - rows.max(axis=-1, keepdims=True))
  return p / p.sum(axis=-1, keepdims=True)


def _draw(rng, rows, n):
  p = _softmax(rows)[np.arange(n) % len(rows)]
  u = rng.random((n, 1))
  return np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), rows.shape[1] - 1)


def _peaked(rng, k, vocab):
  rows = rng.normal(size=(k, vocab)) * 4.0
  rows -= rows.max(axis=-1, keepdims=True)
  top = rng.integers(0, vocab, k)
  rest = np.exp(rows).sum(axis=-1) - np.exp(rows[np.arange(k), top])
  rows[np.arange(k), top] = np.log(99.0 * rest)
  return rows.astype(np.float32)


def _certain(rng, k, vocab):
  """One symbol 40 nats above the others: they hold about 65,536 e^-40 = 3e-13 of the mass."""
  rows = rng.normal(size=(k, vocab))
  rows[np.arange(k), rng.integers(0, vocab, k)] += 40.0
  return rows.astype(np.float32)


def _near_uniform(rng, k, vocab):
  return (0.3 * rng.normal(size=(k, vocab))).astype(np.float32)


# constriction called directly: float64 softmax numerators, one stage, 24-bit quantization.


def _direct_encode(logits, symbols):
  family = constriction.stream.model.Categorical(perfect=False)
  encoder = constriction.stream.queue.RangeEncoder()
  n, vocab = logits.shape
  block = max(1, coding.CHUNK_ELEMENTS // vocab)
  for start in range(0, n, block):
    z = logits[start : start + block].astype(np.float64)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    encoder.encode(symbols[start : start + block].astype(np.int32), family, p)
  return encoder.get_compressed()


def _direct_decode_steps(words, rows, n):
  family = constriction.stream.model.Categorical(perfect=False)
  decoder = constriction.stream.queue.RangeDecoder(words)
  out = np.zeros(n, np.int64)
  for t in range(n):
    z = rows[t % len(rows)].astype(np.float64)
    p = np.exp(z - z.max())[None, :]
    out[t] = decoder.decode(family, p)[0]
  return out


def _alternate(fns, repeats):
  """Seconds of each ``name: fn`` per repeat, every method once per repeat, and its output.

  Alternating makes drifting load hit every method alike; a ratio is taken
  within a repeat, and the table gives the median over repeats.
  """
  times, outputs = {name: [] for name in fns}, {}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      outputs[name] = fn()
      times[name].append(time.perf_counter() - start)
  return times, outputs


def throughput(vocab, n, repeats, rng):
  rows = _near_uniform(rng, DISTINCT_ROWS, vocab)
  logits, symbols = Cycled(rows, n), _draw(rng, rows, n)
  data = coding.encode(logits, symbols)
  words = _direct_encode(logits, symbols)
  step = lambda state, previous: (rows[state % DISTINCT_ROWS], state + 1)
  times, out = _alternate(
    {
      "encode": lambda: coding.encode(logits, symbols),
      "decode": lambda: coding.decode(data, logits, n),
      "step": lambda: coding.decode(data, step, n, 0),
      "direct encode": lambda: _direct_encode(logits, symbols),
      "direct step": lambda: _direct_decode_steps(words, rows, n),
    },
    repeats,
  )
  for name in ("decode", "step", "direct step"):
    assert (out[name] == symbols).all(), name
  rate = {name: f"{n / statistics.median(t):,.0f}" for name, t in times.items()}
  ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
  print(
    f"| {vocab:,} | {n:,} | {rate['encode']} | {rate['decode']} | {rate['step']} "
    f"| {rate['direct encode']} | {rate['direct step']} | {ratio('encode', 'direct encode'):.2f} "
    f"| {ratio('step', 'direct step'):.2f} |"
  )


def excess(vocab, n, kind, rng):
  make = {"peaked": _peaked, "certain": _certain, "near-uniform": _near_uniform}[kind]
  rows = make(rng, DISTINCT_ROWS, vocab)
  logits, symbols = Cycled(rows, n), _draw(rng, rows, n)
  ideal = coding.ideal_bits(logits, symbols)
  ours = 8 * len(coding.encode(logits, symbols)) - ideal
  direct = 32 * len(_direct_encode(logits, symbols)) - ideal
  print(
    f"| {vocab:,} | {kind} | {n:,} | {ideal / n:.4f} | {ours:.1f} | {(ours - 64) / n:+.2e} "
    f"| {direct:.1f} | {(direct - 32) / n:+.2e} | {ours <= ideal + 64 + 1e-3 * n} |"
  )


def _tables(row):
  """The weights and layout the module docstring of `xentjax.coding` states, written again.

  Returns ``(weights, group, groups, width)``: ``weights`` ``[V]`` for one stage
  or ``[groups, group]`` (zero past V) for two.
  """
  z = row.astype(np.float64)
  weights = np.floor(np.exp(z - z.max()) * 2.0**coding.WEIGHT_BITS) + 1.0
  vocab = len(z)
  if vocab <= coding.ONE_STAGE_MAX:
    return weights, vocab, 1, vocab
  group = 2 ** math.ceil(math.log2(vocab) / 2)
  groups = -(-vocab // group)
  weights = np.pad(weights, (0, groups * group - vocab)).reshape(groups, group)
  return weights, group, groups, max(group, groups)


def rate(vocab, kind, rng, n=1_000_000):
  """Bits per symbol over the cross-entropy, n i.i.d. symbols from one row, fixed tables.

  With one row every position has the same tables, so xentjax's code is built
  here from the row's tables alone (`_tables`), in the stream order `encode` uses (group, member, group,
  ...), without quantizing the same row a million times. constriction's own
  code is its i.i.d. code under the row's probabilities. This measures the
  quantization loss to about 1e-4 bits per symbol (the fixed costs over n).
  """
  row = {"peaked": _peaked, "certain": _certain}[kind](rng, 1, vocab)
  p = _softmax(row)[0]
  symbols = rng.choice(vocab, size=n, p=p / p.sum())
  ideal = -np.log2(p[symbols]).sum()
  weights, group, groups, width = _tables(row[0])
  family = constriction.stream.model.Categorical(perfect=False)
  encoder = constriction.stream.queue.RangeEncoder()
  for start in range(0, n, 4096):
    chunk = symbols[start : start + 4096].astype(np.int32)
    if groups == 1:
      encoder.encode(chunk, family, np.repeat(weights[None, :], len(chunk), axis=0))
      continue
    first, members = np.divmod(chunk, group)
    tables = np.zeros((len(chunk), 2, width))
    tables[:, 0, :groups] = weights.sum(axis=-1)
    tables[:, 1, :group] = weights[first]
    coded = np.stack([first, members], axis=1).reshape(-1).astype(np.int32)
    encoder.encode(coded, family, tables.reshape(-1, width))
  ours = 32 * len(encoder.get_compressed())
  direct = constriction.stream.queue.RangeEncoder()
  direct.encode(symbols.astype(np.int32), constriction.stream.model.Categorical(p, perfect=False))
  direct = 32 * len(direct.get_compressed())
  print(f"| {vocab:,} | {kind} | {n:,} | {(ours - ideal) / n:.2e} | {(direct - ideal) / n:.2e} |")


def floor_cost(rng, n=2000, vocab=65_536):
  """Bits per symbol of a symbol at a -inf logit, where every other logit but one or two is -inf."""
  print("| where the -inf symbol sits | xentjax bits per symbol | constriction bits per symbol |")
  print("|---|---:|---:|")
  cases = (
    ("beside the dominant symbol (same group)", 1, None),
    ("in a group of its own", 300, None),
    ("beside a symbol of probability 2^-20", 300, 1),
  )
  for name, dominant, other in cases:
    row = np.full(vocab, -np.inf, np.float32)
    row[dominant] = 0.0
    if other is not None:
      row[other] = -20 * math.log(2)
    logits, symbols = Cycled(row[None, :], n), np.zeros(n, np.int64)
    ours = 8 * (len(coding.encode(logits, symbols)) - 4) / n
    direct = 32 * len(_direct_encode(logits, symbols)) / n
    print(f"| {name} | {ours:.2f} | {direct:.2f} |")


class HeadLogits:
  """``[N, V]`` logits ``x @ w + b`` of the cached model, a block of rows at a time."""

  def __init__(self, x, w, b):
    self.x, self.w, self.b, self.shape = x, w, b, (x.shape[0], w.shape[1])

  def __getitem__(self, index: slice) -> np.ndarray:
    return self.x[index] @ self.w + self.b


def real_model(variant):
  """The small LM of `benchmarks/_real_lm` coding its held-out windows, against gzip, bz2, lzma.

  The cache is built on first use (`python benchmarks/real_lm.py` documents it;
  the ``tokenizers`` package is needed). Each held-out window's tokens after
  the first are coded with the teacher's logits (the model sees only its
  window); bits per byte divide by the UTF-8 bytes those tokens decode to, and
  the standard compressors get the same text, all windows as one file.
  """
  from tokenizers import Tokenizer

  from benchmarks._real_lm import build

  v = build.VARIANTS[variant]
  arrays, meta = build.load(v)
  tok = Tokenizer.from_file(str(build.cache_dir(v) / "tokenizer.json"))
  labels = arrays["labels"].astype(np.int64)
  text = b"".join(tok.decode(window[1:].tolist()).encode() for window in arrays["windows"])
  print(f"\n## The small LM ({variant}: {meta['teacher']['model']}, V={v.vocab:,})\n")
  print(f"{len(labels):,} held-out tokens, {len(text):,} bytes\n")
  print("| coder | bits per byte | coded / ideal - 1 |")
  print("|---|---:|---:|")
  for role in ("teacher", "student")[: 1 + bool(v.student_steps)]:  # `tiny` has no student
    logits = HeadLogits(arrays[f"{role}_x"], arrays[f"{role}_w"], arrays[f"{role}_b"])
    ideal = coding.ideal_bits(logits, labels)
    coded = 8 * len(coding.encode(logits, labels))
    print(f"| {role} ({meta[role]['model']}) | {coded / len(text):.3f} | {coded / ideal - 1:.5f} |")
  for name, fn in (
    ("gzip -9", lambda t: gzip.compress(t, 9)),
    ("bz2", bz2.compress),
    ("lzma", lzma.compress),
  ):
    print(f"| {name} | {8 * len(fn(text)) / len(text):.3f} | |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="a quarter of the symbols")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--real",
    choices=("tiny", "quick", "full"),
    help="only code the held-out windows with the small LM of benchmarks/_real_lm (built once)",
  )
  parser.add_argument("--throughput-only", action="store_true", help="only the first table")
  args = parser.parse_args()
  if args.real:
    real_model(args.real)
    return
  scale = 4 if args.small else 1
  rng = np.random.default_rng(0)
  print(
    f"{platform.platform()}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
    f"constriction {importlib.metadata.version('constriction')}"
  )
  print(f"\n## Throughput (symbols per second, medians of {args.repeats} alternating repeats)\n")
  print(
    "| V | n | xentjax encode | xentjax decode (logits) | xentjax decode (step) "
    "| constriction encode | constriction decode (per symbol) | encode ratio | step ratio |"
  )
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for vocab in VOCABS:
    n = max(256, min(50_000, 2**27 // vocab)) // scale
    throughput(vocab, n, args.repeats, rng)
  if args.throughput_only:
    return
  print("\n## Bits over the cross-entropy (symbols drawn from the model)\n")
  print(
    "| V | rows | n | ideal bits/symbol | xentjax excess (bits) | beyond 64, per symbol "
    "| constriction excess (bits) | beyond 32, per symbol | bound holds |"
  )
  print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
  for vocab in VOCABS:
    for kind in ("peaked", "certain", "near-uniform"):
      excess(vocab, 10_000 // scale, kind, rng)  # the contract size
  print("\n## Quantization loss per symbol (one row, i.i.d. symbols, see `rate`)\n")
  print("| V | rows | n | xentjax bits/symbol over ideal | constriction bits/symbol over ideal |")
  print("|---:|---|---:|---:|---:|")
  for vocab in VOCABS:
    for kind in ("peaked", "certain"):
      rate(vocab, kind, rng, 1_000_000 // scale)
  print("\n## A symbol at a -inf logit, V = 65,536\n")
  floor_cost(rng)


if __name__ == "__main__":
  main()
