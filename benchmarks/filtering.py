"""Gradient filtering (`filter_eps`) on four distributions: time, skip rate, error.

Usage::

  python benchmarks/filtering.py                  # N=2048, D=1024, V=32768 (minutes on a CPU)
  python benchmarks/filtering.py --size 256,128,4096 --repeats 2

For each distribution of `benchmarks/_settings.py` (``random``,
``concentrated``, ``scattered`` and ``real``, the model trained by
`benchmarks/real_lm.py`), in one run: the fwd+bwd time of
``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` for
`xentjax.linear_softmax_cross_entropy` without filtering, with
``filter_eps=2**-12`` (adaptive: a column chunk with less than a quarter of
its tiles skippable runs unfiltered), with ``filter_eps=2**-12`` and
``vocab_order=`` the token frequency known before training (the synthetic
bias is Zipf-sorted already, so there the order is the identity and the row
measures the cost of the option itself; ``random`` has none and runs
unsorted), and optax's ``softmax_cross_entropy_with_integer_labels`` on
materialized logits, run alternately (every method once per repeat, after a
warm-up). Ratios are taken within each repeat; the table gives their median and
range over the repeats. Beside them: the fraction of the automatic filtering
tiles (256 tokens x 512 columns) that the filter can skip, counted in NumPy on
the logits (every probability of the tile below ``eps`` and no label in it),
with the vocabulary as it is, with its columns sorted by the token frequency
known before training, and sorted by the batch's own mean probability (an
oracle fitted to the scored batch: optimistic); and the relative
error of the filtered gradients (unsorted / sorted) against optax's
(Frobenius, over ``x`` and ``w``).
"""

from __future__ import annotations

import functools
import math
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import optax

import xentjax
from benchmarks import _settings
from benchmarks._common import FILTER_TILE, alternate, machine, parser, print_header, timing_size
from benchmarks._real_lm import stats

TIMING = (2048, 1024, 32768)
SMALL = (512, 256, 8192)
EPS = 2.0**-12
DISTRIBUTIONS = ("random", "concentrated", "scattered", "real")


def optax_loss(x, w, y, b):
  logits = x @ w if b is None else x @ w + b
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def fused_loss(x, w, y, b, eps=None, order=None):
  return xentjax.linear_softmax_cross_entropy(x, w, y, bias=b, filter_eps=eps, vocab_order=order)


def value_and_grad(loss):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def rel_error(g, g_ref):
  num = sum(float(((a - r) ** 2).sum()) for a, r in zip(g, g_ref))
  return math.sqrt(num / sum(float((r**2).sum()) for r in g_ref))


def spread(values, digits=3):
  """`median (min-max)` of a list of ratios."""
  lo, mid, hi = min(values), statistics.median(values), max(values)
  return f"{mid:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def skip_rates(s):
  """Skippable fraction of the filtering tiles: as is, by known frequency, by the oracle order."""
  tc, vc = min(FILTER_TILE[0], s.size[0]), FILTER_TILE[1]  # a small batch is one tile
  m = stats.measure(s.x, s.w, s.b, s.y, eps=EPS, token_chunks=(tc,))
  orders = (None, s.frequency_order, stats.by_mass(m["mean_p"]))
  return m, [
    None if k == 1 and order is None else stats.skippable(m, tc, vc, order)
    for k, order in enumerate(orders)
  ]


def ratio_of(times, a, b):
  """`spread` of the per-repeat ratios of method `a`'s time to method `b`'s."""
  return spread([p / q for p, q in zip(times[a], times[b])])


def percent(r):
  return "n/a" if r is None else f"{100 * r:.1f}%"


def timed(s, repeats, warmup):
  """`(times, outputs)` of the four methods on setting `s`, alternating."""
  args = (s.x, s.w, s.y, s.b)
  order = None if s.frequency_order is None else jax.numpy.asarray(s.frequency_order)
  fns = {
    "none": (value_and_grad(fused_loss), args),
    "filter": (value_and_grad(lambda x, w, y, b: fused_loss(x, w, y, b, EPS)), args),
    "sorted": (
      value_and_grad(lambda x, w, y, b, o: fused_loss(x, w, y, b, EPS, o)),
      (*args, order),
    ),
    "optax": (value_and_grad(optax_loss), args),
  }
  return alternate(fns, repeats, warmup)


def table(size, repeats, warmup, names=DISTRIBUTIONS):
  rows = [
    (
      "| distribution | N, D, V | entropy (nats) | p < 2^-12 | no filter | filter 2^-12 | "
      "filter + sorted | optax | filtered / unfiltered | sorted / unfiltered | "
      "filtered / optax | sorted / optax | tiles skippable (as is / by frequency / oracle) | "
      "grad rel. error (filtered / sorted) |"
    ),
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name in names:
    s = _settings.make(name, *size)
    m, skip = skip_rates(s)
    times, outputs = timed(s, repeats, warmup)
    err = [rel_error(outputs[k][1], outputs["optax"][1]) for k in ("filter", "sorted")]
    del outputs
    med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
    ratio = functools.partial(ratio_of, times)
    n, d, v = s.size
    rows.append(
      f"| {name} | {n}, {d}, {v} | {m['entropy']:.2f} | {100 * m['below_eps']:.1f}% | "
      f"{med['none']:.0f} ms | {med['filter']:.0f} ms | {med['sorted']:.0f} ms | "
      f"{med['optax']:.0f} ms | **{ratio('filter', 'none')}** | {ratio('sorted', 'none')} | "
      f"**{ratio('filter', 'optax')}** | {ratio('sorted', 'optax')} | "
      f"{' / '.join(percent(r) for r in skip)} | {err[0]:.1e} / {err[1]:.1e} |"
    )
  return "\n".join(rows)


def main(argv=None):
  p = parser(__doc__, SMALL, repeats=5)
  p.add_argument("--distributions", nargs="+", choices=DISTRIBUTIONS, default=list(DISTRIBUTIONS))
  args = p.parse_args(argv)
  size = timing_size(args, TIMING, SMALL)
  print_header()
  print()
  print(
    f"Gradient filtering, filter_eps=2^-12, tiles of {FILTER_TILE[0]} tokens x {FILTER_TILE[1]} "
    f"columns; times are medians of {args.repeats} alternating repeats, ratios the median "
    "(min-max) of the per-repeat ratios:\n"
  )
  print(table(size, args.repeats, args.warmup, args.distributions))
  print()
  print(f"Machine at the end: {machine()}")


if __name__ == "__main__":
  main()
