"""Gradient filtering (`filter_eps`) on four distributions: time, skip rate, error.

Usage::

  python benchmarks/filtering.py                  # N=2048, D=1024, V=32768 (minutes on a CPU)
  python benchmarks/filtering.py --overhead --repeats 21   # only where nothing can be skipped
  python benchmarks/filtering.py --size 256,128,4096 --repeats 2

For each distribution of `benchmarks/_settings.py` (``random``,
``concentrated``, ``scattered`` and ``real``, the model trained by
`benchmarks/real_lm.py`), in one run: the fwd+bwd time of
``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` for
`xentjax.linear_softmax_cross_entropy` without filtering, with
``filter_eps=2**-12`` (adaptive: a column chunk with less than a quarter of
its tiles skippable runs unfiltered), the same with the columns sorted by the
token frequency known before training, once stored sorted (``w[:, order]``,
labels as positions: what a training run that permutes its head once pays)
and once through ``vocab_order=order`` (a gather of ``w`` per pass and of its
gradient); ``strategy="store"`` without and with the filter, and with it on
the head stored sorted; and optax's
``softmax_cross_entropy_with_integer_labels`` on materialized logits, run
alternately (every method once per repeat, after a warm-up). Ratios are taken within each repeat; the table gives their median and
range over the repeats. Beside them: the fraction of the automatic filtering
tiles (256 tokens x 512 columns) that the filter can skip, counted in NumPy on
the logits (every probability of the tile below ``eps`` and no label in it;
beside them, the same for the store strategy's tiles of 256 x 256),
with the vocabulary as it is, with its columns sorted by the token frequency
known before training, and sorted by the batch's own mean probability (an
oracle fitted to the scored batch: optimistic); and the relative
error of the filtered gradients against optax's (Frobenius, over ``x`` and
``w``). The synthetic bias is Zipf-sorted already, so there the frequency
order is the identity and the sorted rows measure the cost of sorting alone;
``random`` has no frequency order ("n/a").
"""

from __future__ import annotations

import functools
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
from benchmarks import _settings
from benchmarks._common import (
  FILTER_TILE,
  STORE_FILTER_TILE,
  alternate,
  machine,
  parser,
  print_header,
  timing_size,
)
from benchmarks._real_lm import stats

TIMING = (2048, 1024, 32768)
SMALL = (512, 256, 8192)
EPS = 2.0**-12
DISTRIBUTIONS = ("random", "concentrated", "scattered", "real")
ERRORS = ("filter", "store_filter", "stored", "order")


def optax_loss(x, w, y, b):
  logits = x @ w if b is None else x @ w + b
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def fused_loss(x, w, y, b, eps=None, order=None, strategy="recompute"):
  return xentjax.linear_softmax_cross_entropy(
    x, w, y, bias=b, filter_eps=eps, vocab_order=order, strategy=strategy
  )


def value_and_grad(loss):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def rel_error(g, g_ref):
  num = sum(float(((a - r) ** 2).sum()) for a, r in zip(g, g_ref))
  return math.sqrt(num / sum(float((r**2).sum()) for r in g_ref))


def spread(values, digits=3):
  """`median (min-max)` of a list of ratios."""
  lo, mid, hi = min(values), statistics.median(values), max(values)
  return f"{mid:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def skip_rates(s, vc=FILTER_TILE[1]):
  """Skippable fraction of the filtering tiles: as is, by known frequency, by the oracle order."""
  tc = min(FILTER_TILE[0], s.size[0])  # a small batch is one tile
  m = stats.measure(s.x, s.w, s.b, s.y, eps=EPS, token_chunks=(tc,))
  orders = (None, s.frequency_order, stats.by_mass(m["mean_p"]))
  return m, [
    None if k == 1 and order is None else stats.skippable(m, tc, vc, order)
    for k, order in enumerate(orders)
  ]


def ratio_of(times, a, b):
  """`spread` of the per-repeat ratios of method `a`'s time to `b`'s ("n/a" if `a` did not run)."""
  return "n/a" if a not in times else spread([p / q for p, q in zip(times[a], times[b])])


def fastest_ratio(times, a, b):
  """The ratio of method `a`'s fastest repeat to method `b`'s."""
  return f"{min(times[a]) / min(times[b]):.3f}"


def percent(r):
  return "n/a" if r is None else f"{100 * r:.1f}%"


def sorted_inputs(s):
  """`(w, b, y, inverse)` with the columns stored in frequency order and the labels as positions."""
  order = np.asarray(s.frequency_order)
  inverse = np.empty_like(order)
  inverse[order] = np.arange(order.size)
  b = None if s.b is None else s.b[order]
  return s.w[:, order], b, jnp.asarray(inverse)[s.y], inverse


def timed(s, repeats, warmup):
  """`(times, outputs, inverse)` of the methods on setting `s`, alternating."""
  args = (s.x, s.w, s.y, s.b)
  fns = {
    "none": (value_and_grad(fused_loss), args),
    "filter": (value_and_grad(lambda x, w, y, b: fused_loss(x, w, y, b, EPS)), args),
    "optax": (value_and_grad(optax_loss), args),
    "store": (value_and_grad(functools.partial(fused_loss, strategy="store")), args),
    "store_filter": (
      value_and_grad(lambda x, w, y, b: fused_loss(x, w, y, b, EPS, strategy="store")),
      args,
    ),
  }
  inverse = None
  if s.frequency_order is not None:
    w_s, b_s, y_s, inverse = sorted_inputs(s)
    order = jnp.asarray(s.frequency_order)
    fns["stored"] = (fns["filter"][0], (s.x, w_s, y_s, b_s))
    fns["store_stored"] = (fns["store_filter"][0], (s.x, w_s, y_s, b_s))
    fns["order"] = (
      value_and_grad(lambda x, w, y, b, o: fused_loss(x, w, y, b, EPS, o)),
      (*args, order),
    )
  times, outputs = alternate(fns, repeats, warmup)
  return times, outputs, inverse


def errors(outputs, inverse):
  """Relative gradient errors against optax: filtered, stored sorted, vocab_order."""
  ref = outputs["optax"][1]
  err = {k: rel_error(outputs[k][1], ref) for k in ("filter", "store_filter")}
  if inverse is not None:
    gx, gw = outputs["stored"][1]
    err["stored"] = rel_error((gx, gw[:, inverse]), ref)  # back to the original columns
    err["order"] = rel_error(outputs["order"][1], ref)
  return err


def table(size, repeats, warmup, names=DISTRIBUTIONS):
  rows = [
    (
      "| distribution | N, D, V | entropy (nats) | p < 2^-12 | unfiltered | "
      "filtered / unfiltered | stored sorted / unfiltered | vocab_order / unfiltered | "
      "filtered / optax | stored sorted / optax | "
      "store filtered / store | store filtered / optax | store, stored sorted / optax | "
      "tiles skippable (as is / by frequency / oracle) | store tiles skippable | "
      "grad rel. error (filtered / store filtered / stored sorted / vocab_order) |"
    ),
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name in names:
    s = _settings.make(name, *size)
    m, skip = skip_rates(s)
    _, store_skip = skip_rates(s, STORE_FILTER_TILE[1])
    times, outputs, inverse = timed(s, repeats, warmup)
    err = errors(outputs, inverse)
    del outputs
    ratio = functools.partial(ratio_of, times)

    n, d, v = s.size
    rows.append(
      f"| {name} | {n}, {d}, {v} | {m['entropy']:.2f} | {100 * m['below_eps']:.1f}% | "
      f"{statistics.median(times['none']) * 1e3:.0f} ms | **{ratio('filter', 'none')}** | "
      f"{ratio('stored', 'none')} | {ratio('order', 'none')} | "
      f"**{ratio('filter', 'optax')}** | {ratio('stored', 'optax')} | "
      f"**{ratio('store_filter', 'store')}** | **{ratio('store_filter', 'optax')}** | "
      f"{ratio('store_stored', 'optax')} | {' / '.join(percent(r) for r in skip)} | "
      f"{' / '.join(percent(r) for r in store_skip)} | "
      f"{' / '.join(f'{err[k]:.1e}' if k in err else 'n/a' for k in ERRORS)} |"
    )
  return "\n".join(rows)


def overhead(size, repeats, warmup, names=("random", "scattered")):
  """Where nothing can be skipped: filtered against unfiltered, both strategies, only those.

  Besides the median (min-max) of the per-repeat ratios, the ratio of the
  fastest repeats: the least disturbed estimate on a shared machine.
  """
  rows = [
    (
      "| distribution | N, D, V | tiles skippable (recompute / store) | filtered / unfiltered "
      "| same, fastest repeats | store filtered / store | same, fastest repeats |"
    ),
    "|---|---|---:|---:|---:|---:|---:|",
  ]
  for name in names:
    s = _settings.make(name, *size)
    (_, skip), (_, store_skip) = skip_rates(s), skip_rates(s, STORE_FILTER_TILE[1])
    args = (s.x, s.w, s.y, s.b)
    fns = {
      "none": fused_loss,
      "filter": functools.partial(fused_loss, eps=EPS),
      "store": functools.partial(fused_loss, strategy="store"),
      "store_filter": functools.partial(fused_loss, eps=EPS, strategy="store"),
    }
    times, _ = alternate({k: (value_and_grad(f), args) for k, f in fns.items()}, repeats, warmup)
    fastest = functools.partial(fastest_ratio, times)
    rows.append(
      f"| {name} | {', '.join(map(str, s.size))} | {percent(skip[0])} / {percent(store_skip[0])} "
      f"| **{ratio_of(times, 'filter', 'none')}** | {fastest('filter', 'none')} "
      f"| **{ratio_of(times, 'store_filter', 'store')}** | {fastest('store_filter', 'store')} |"
    )
  return "\n".join(rows)


def main(argv=None):
  p = parser(__doc__, SMALL, repeats=5)
  p.add_argument("--distributions", nargs="+", choices=DISTRIBUTIONS, default=list(DISTRIBUTIONS))
  p.add_argument(
    "--overhead",
    action="store_true",
    help="only the cost of filtering where nothing can be skipped (random, scattered)",
  )
  args = p.parse_args(argv)
  size = timing_size(args, TIMING, SMALL)
  print_header()
  print()
  if args.overhead:
    print(
      f"Filtering where nothing can be skipped, filter_eps=2^-12; {args.repeats} alternating "
      "repeats, ratios the median (min-max) of the per-repeat ratios:\n"
    )
    print(overhead(size, args.repeats, args.warmup))
    print(f"\nMachine at the end: {machine()}")
    return
  print(
    f"Gradient filtering, filter_eps=2^-12, tiles of {FILTER_TILE[0]} tokens x {FILTER_TILE[1]} "
    f"columns (strategy store: x {STORE_FILTER_TILE[1]}); times are medians of {args.repeats} alternating repeats, ratios the median "
    "(min-max) of the per-repeat ratios:\n"
  )
  print(table(size, args.repeats, args.warmup, args.distributions))
  print()
  print(f"Machine at the end: {machine()}")


if __name__ == "__main__":
  main()
