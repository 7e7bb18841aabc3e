"""Exact streaming evaluation over data sets larger than memory.

`evaluate` turns an iterable of batches into dataset-level cross-entropy,
perplexity, accuracy, top-k accuracy and calibration error in one call:

* one jit-compiled step per padded batch shape: the ragged last batch is
  padded to the first batch's size and masked, so it does not recompile;
* accumulators stay on the device (no host round trip per batch) and the
  steps run asynchronously, so the next batch is read and transferred while
  the current one computes; at most a few batches are alive at any time;
* the batch axis is sharded over a 1-D `Mesh` of all local devices;
* the loss sum is a two-float (hi, lo) sum built from error-free
  transformations: inside a batch, a tree of TwoSum folds (`_exact_sum`: a
  few vectorized reductions), across batches TwoSum, so the dataset mean
  matches a float64 computation to about the float32 rounding of the
  per-example values, however many examples there are, and does not depend
  on the batch size beyond rounding. Counts are
  integers. With `JAX_ENABLE_X64=1` the accumulators are float64 pairs.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import math
import mmap
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xentjax import _core, _validation, calibration
from xentjax import distributed as _distributed
from xentjax._api import check_mask_dtype
from xentjax._vocab import evaluation as vocab_evaluation

# Integer counters are int32 when x64 is off: the host folds the device
# accumulators into Python numbers before this many (padded) rows pass.
_FLUSH_ROWS = 1 << 30
_INT32_MAX = (1 << 31) - 1  # the byte counts' sum is folded before it passes this
# Per-document rows kept on the host before they are merged by id (and again
# whenever they double): bounds the host memory by about twice the documents.
_DOC_COMPACT_ROWS = 1 << 20
_PAGE_BYTES = mmap.PAGESIZE  # `_touch_pages` reads one byte per page where it cannot madvise
# Linux's madvise(MADV_POPULATE_READ) (5.14+): maps a range's pages in one call.
_MADV_POPULATE_READ = 22

# Back-pressure: without it a fast reader would queue unbounded work. Up to
# `_MAX_IN_FLIGHT` steps, and `_IN_FLIGHT_BYTES` of their batches (never
# fewer than two steps), may be in flight; when more are, the loop waits
# until a quarter of that depth is left (`_depths`), not for one step at a
# time. Waking up for every step took a core from XLA's threads on a 2-core
# CPU: two steps with one wait per step gave 1.31x the minimal loop's time
# in `benchmarks/evaluate.py`'s setting, eight steps drained to two 1.25x
# (20 alternating rounds; 1.45x against 1.30x on batches already on the
# device, 24 rounds).
_MAX_IN_FLIGHT = 8
_IN_FLIGHT_BYTES = 1 << 28


def _depths(batch_bytes: int) -> tuple[int, int]:
  """``(most, resume)``: steps allowed in flight, and how many may stay after a wait."""
  most = max(2, min(_MAX_IN_FLIGHT, _IN_FLIGHT_BYTES // max(batch_bytes, 1)))
  return most, (most // 4 if most >= 4 else most)


# ---------------------------------------------------------------------------
# Result.


@dataclasses.dataclass(frozen=True, eq=False)
class DocumentSums:
  """Per-document totals of `evaluate`, one entry per document id, ids ascending.

  Every id that labels a batch row is listed, also a document none of whose
  tokens counts (masked or `ignore_index` only): its count, bytes and sum
  are 0.

  Attributes:
    ids: int64 ``[D]``, the distinct ``document_ids``, ascending.
    negative_log_likelihood_sum: float64 ``[D]``, each document's total NLL in
      nats over its counted tokens (an exact two-float sum, like the
      dataset total, across batches and processes).
    count: int64 ``[D]``, its counted tokens.
    byte_count: int64 ``[D]``, its counted tokens' bytes (zeros when the
      batches carry no ``byte_counts``).
  """

  ids: np.ndarray
  negative_log_likelihood_sum: np.ndarray
  count: np.ndarray
  byte_count: np.ndarray

  @property
  def bits_per_byte(self) -> np.ndarray:
    """Each document's ``NLL / ln 2 / bytes`` (NaN where it has no counted bytes)."""
    with np.errstate(divide="ignore", invalid="ignore"):
      bits = self.negative_log_likelihood_sum / math.log(2.0)
      return np.where(self.byte_count > 0, bits / np.maximum(self.byte_count, 1), np.nan)

  def to_dict(self) -> dict[str, list]:
    """The columns as lists of Python numbers (for JSON)."""
    return {
      "ids": self.ids.tolist(),
      "negative_log_likelihood_sum": self.negative_log_likelihood_sum.tolist(),
      "count": self.count.tolist(),
      "byte_count": self.byte_count.tolist(),
    }


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
  """Dataset-level metrics returned by `evaluate`.

  Attributes:
    count: number of examples counted (not masked, not `ignore_index`).
    cross_entropy: mean negative log-likelihood, in nats or in units of
      `base`.
    perplexity: `exp(cross_entropy in nats)`.
    bits_per_token: cross-entropy in bits (`nats / ln 2`).
    accuracy: mean top-1 credit: 1 when the target class has the top score
      alone, ``1/t`` when it shares it with ``t - 1`` others (the
      expected hit of a random tie break; `xentjax.metrics.accuracy`).
    top_k_accuracy: mean top-k credit, ties shared the same way
      (`xentjax.metrics.top_k_accuracy`).
    expected_calibration_error: `sum_b (n_b / N) |acc_b - conf_b|` over
      `num_bins` equal-width confidence bins on [0, 1].
    negative_log_likelihood_sum: total negative log-likelihood in nats.
    top_k: the `k` of `top_k_accuracy`.
    num_bins: number of calibration bins.
    base: logarithm base of `cross_entropy` (None for nats).
    brier_score: mean over examples of `sum_c (softmax(z)_c - y_c)**2`
      (exact streaming sum, like the loss).
    temperature: the `T` minimizing the mean cross-entropy of `logits / T`
      (temperature scaling), from one pass: see `evaluate`. None unless
      asked for (``evaluate(..., temperature=True)``); then NaN only when
      nothing is counted or a counted row is NaN.
    bin_count, bin_confidence_sum, bin_correct: per-bin counts, summed
      confidences and summed top-1 credit of the ECE's bins
      (`reliability_diagram()` turns them into a diagram).
    bits_per_byte: ``sum_i -log2 p_i / sum_i bytes_i`` over the counted
      tokens, when the batches carry ``byte_counts`` (else None); NaN when
      the counted tokens hold no bytes.
    byte_count: the counted tokens' total bytes (None without ``byte_counts``).
    per_document: a `xentjax.evaluation.DocumentSums` when the batches carry ``document_ids``
      (else None).
  """

  count: int
  cross_entropy: float
  perplexity: float
  bits_per_token: float
  accuracy: float
  top_k_accuracy: float
  expected_calibration_error: float
  negative_log_likelihood_sum: float
  top_k: int = 5
  num_bins: int = 15
  base: float | None = None
  brier_score: float = math.nan
  temperature: float | None = None
  bin_count: tuple[int, ...] = ()
  bin_confidence_sum: tuple[float, ...] = ()
  bin_correct: tuple[float, ...] = ()
  bits_per_byte: float | None = None
  byte_count: int | None = None
  per_document: DocumentSums | None = dataclasses.field(default=None, compare=False, repr=False)

  def reliability_diagram(self) -> calibration.ReliabilityDiagram:
    """The ECE's bins as a `xentjax.calibration.ReliabilityDiagram` (``.plot()`` draws it)."""
    return calibration.ReliabilityDiagram.from_sums(
      self.bin_count, self.bin_confidence_sum, self.bin_correct
    )

  def to_dict(self) -> dict[str, Any]:
    """The scalar fields as a plain dict of Python numbers (for JSON; the per-bin
    tuples are left out: `reliability_diagram()` has them, and so is `temperature`
    when it was not asked for)."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    del d["per_document"]
    for name in ("temperature", "bits_per_byte", "byte_count"):
      if d[name] is None:
        del d[name]
    return {k: v for k, v in d.items() if not k.startswith("bin_")}

  def units(self) -> dict[str, str]:
    """The unit of each logarithmic field: ``cross_entropy`` in those of `base`
    (``"nats"``, ``"bits"`` or e.g. ``"base 10"``), ``bits_per_token`` in bits,
    ``negative_log_likelihood_sum`` always in nats, ``bits_per_byte`` (when the
    batches carry byte counts) in bits (the other fields have none)."""
    unit = "nats" if self.base is None else ("bits" if self.base == 2 else f"base {self.base:g}")
    units = {
      "cross_entropy": unit,
      "bits_per_token": "bits",
      "negative_log_likelihood_sum": "nats",
    }
    if self.bits_per_byte is not None:
      units["bits_per_byte"] = "bits"
    return units

  def __str__(self) -> str:
    unit = self.units()["cross_entropy"]
    rows = [
      ("examples", f"{self.count:,}"),
      (f"cross-entropy ({unit})", f"{self.cross_entropy:.6f}"),
      ("perplexity", f"{self.perplexity:.6g}"),
      ("bits per token", f"{self.bits_per_token:.6f}"),
      ("accuracy", f"{self.accuracy:.6f}"),
      (f"top-{self.top_k} accuracy", f"{self.top_k_accuracy:.6f}"),
      (f"ECE ({self.num_bins} bins)", f"{self.expected_calibration_error:.6f}"),
      ("Brier score", f"{self.brier_score:.6f}"),
      ("NLL sum (nats)", f"{self.negative_log_likelihood_sum:.6f}"),
    ]
    if self.temperature is not None:  # fitted only on request: no row for what was not asked
      rows.insert(-1, ("temperature (logits / T)", f"{self.temperature:.6g}"))
    if self.bits_per_byte is not None:
      rows.insert(4, ("bits per byte", f"{self.bits_per_byte:.6f}"))
    if self.per_document is not None:
      rows.append(("documents", f"{len(self.per_document.ids):,}"))
    width = max(len(name) for name, _ in rows)
    vwidth = max(len(value) for _, value in rows)
    lines = [f"{'metric':<{width}}  {'value':>{vwidth}}", f"{'-' * width}  {'-' * vwidth}"]
    lines += [f"{name:<{width}}  {value:>{vwidth}}" for name, value in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Error-free summation.


def _two_sum(a, b):
  """Knuth's TwoSum: s = fl(a + b) and e with s + e == a + b exactly."""
  s = a + b
  bb = s - a
  e = (a - (s - bb)) + (b - bb)
  return s, e


def _two_float_reducer(x, y):
  s, e = _two_sum(x[0], y[0])
  return s, x[1] + y[1] + e


def _two_float_sum(hi, lo=None):
  """Sum the last axis into a two-float (hi, lo) pair.

  One variadic XLA reduction whose combiner adds the `hi` parts with TwoSum
  and collects their rounding errors, exactly, in `lo` (summed plainly).
  Every combination preserves `hi + lo` up to the rounding of the tiny `lo`
  additions, so the result carries about twice the working precision in
  whatever order XLA reduces. Returns arrays of shape `hi.shape[:-1]`.
  """
  lo = jnp.zeros_like(hi) if lo is None else lo
  zero = jnp.zeros((), hi.dtype)
  return jax.lax.reduce((hi, lo), (zero, zero), _two_float_reducer, (hi.ndim - 1,))


_SUM_FAN = 4  # `_exact_sum`: values each column folds per level


def _exact_sum(x, groups: int = 1):
  r"""Sum the rows ``x`` ``[n]`` into a two-float ``(hi, lo)`` pair (a cascaded TwoSum tree).

  Each level lays the current ``(hi, lo)`` values out as ``f = _SUM_FAN``
  rows of columns (padded with zeros) and folds every column down its ``f``
  rows with `_two_float_reducer`: TwoSum on the high parts, whose rounding
  errors go, exactly, into the low parts (those are added plainly). There
  are :math:`d = \lceil \log_f n \rceil` levels, one vectorized XLA
  reduction each (the fold runs across the columns, which XLA's CPU code
  generator turns into vector lanes; one TwoSum chain over the rows ran as a
  scalar loop, and Rump's extraction by blocks, used before, took some fifty
  small kernels per sum). The rows are ``groups`` contiguous device blocks,
  each folded on its own until the last fold.

  Error: every TwoSum is exact, so only the low parts' plain additions
  round. With :math:`u = 2^{-p}` the unit roundoff, the errors TwoSum passes
  down are at most :math:`(f - 1) d\, u \sum_i |x_i|` in all, and they are
  added in chains of at most :math:`2 (f - 1) d` additions, so
  :math:`|hi + lo - \sum_i x_i| \le 2 (f - 1)^2 d^2 u^2 \sum_i |x_i|` (to
  first order): about :math:`1{,}200\, u^2` for 50,000 rows, which is
  :math:`4 \cdot 10^{-12}` in float32 and :math:`10^{-29}` in float64. That
  bound is for adversarial rounding; the tests see at most about
  :math:`2 u^2` (7e-15 in float32) against `math.fsum`. A NaN or infinite
  value gives the plain sum's NaN or infinity in ``hi`` (and 0 in ``lo``).
  """
  zero = jnp.zeros((), x.dtype)
  if x.size == 0:
    return zero, zero
  hi = x.reshape(groups, -1)
  lo = jnp.zeros_like(hi)
  while hi.shape[1] > 1:
    n = hi.shape[1]
    f = min(_SUM_FAN, n)
    cols = -(-n // f)
    hi, lo = (jnp.pad(a, ((0, 0), (0, f * cols - n))).reshape(groups, f, cols) for a in (hi, lo))
    hi, lo = jax.lax.reduce((hi, lo), (zero, zero), _two_float_reducer, (1,))
  total, err = _two_float_sum(hi[:, 0], lo[:, 0])
  return total, jnp.where(jnp.isfinite(total), err, zero)


def _bin_references(num_bins: int) -> np.ndarray:
  """A dyadic value near each bin's centre (exact in float32 and float64).

  Confidences are summed per bin as residuals from these values, so the
  plain (scatter) sum only ever sees numbers below 1 / num_bins.
  """
  return np.floor((np.arange(num_bins) + 0.5) / num_bins * 256.0) / 256.0


def _acc_add(acc, part):
  """Add a batch's (hi, lo) to the running (hi, lo) without losing digits."""
  hi, e = _two_sum(acc[0], part[0])
  return hi, acc[1] + part[1] + e


# ---------------------------------------------------------------------------
# The per-batch step.


class _StepConfig(NamedTuple):
  top_k: int
  num_bins: int
  ignore: bool  # compare labels with the (traced) ignore value
  groups: int
  soft: bool
  documents: bool = False  # per-document sums (the batch carries "segments")
  mesh: Any = None  # with `hidden`: the data mesh of several devices (None: one)
  hidden: bool = False  # the batch is hidden states; `params` is (w, bias or None)
  whole_max: bool = False  # the rows' maximum over the whole batch (`_WHOLE_BATCH_MAX`)


def _zero_accumulators(num_bins: int, num_t: int = 20) -> dict:
  """The running totals: a flat dict of (hi, lo) float sums and integer counts.

  Every entry is a sum over counted rows, so a new quantity is one more
  entry here, one more per-row value in `_batch_sums` and one more line in
  `_result` (`_HostTotals` folds any entry of these two kinds).
  """
  float_dtype = jax.dtypes.canonicalize_dtype(float)  # float32, or float64 under x64
  int_dtype = jax.dtypes.canonicalize_dtype(int)  # int32, or int64 under x64
  # NumPy zeros, put on the device in one transfer by the caller (a dozen
  # `jnp.zeros` were a dozen dispatches: about 2 ms of every `evaluate` call).
  f = np.zeros((), float_dtype)
  fb = np.zeros((num_bins,), float_dtype)
  ib = np.zeros((num_bins,), int_dtype)
  return {
    "nll": (f, f),  # sum of per-row cross-entropy (nats)
    "top_k": (f, f),  # sum of top-k credit
    "bin_count": ib,  # counted rows per confidence bin
    "bin_credit": (fb, fb),  # sum of top-1 credit per bin
    "resid": (fb, fb),  # sum of (confidence - bin reference) per bin
    "brier": (f, f),  # sum of the Brier score
    "temp": (np.zeros((3, num_t), float_dtype), np.zeros((3, num_t), float_dtype)),
    "bytes": np.zeros((), int_dtype),  # sum of the counted rows' byte counts
  }


@functools.lru_cache(maxsize=16)
def _zeros_program(num_bins: int, num_t: int, sharding: NamedSharding, x64: bool) -> Callable:
  """A compiled program that makes fresh `_zero_accumulators` on ``sharding``'s devices.

  One dispatch per `evaluate` call, where putting the dozen small arrays on
  the devices took about 1.5 ms. ``x64`` keys the cache: the dtypes follow it.
  """
  del x64
  return jax.jit(functools.partial(_zero_accumulators, num_bins, num_t), out_shardings=sharding)


def _check_batch(logits, labels, mask, soft: bool):
  _validation.check_floating("logits", logits)
  if logits.ndim < 2:
    raise ValueError(f"`logits` must have shape [batch, ..., num_classes], got {logits.shape}.")
  if soft:
    _validation.check_same_shape("logits", logits, "labels", labels)
  elif labels.shape != logits.shape[:-1]:
    raise ValueError(
      "integer `labels` must have the shape of `logits` without its class axis, got "
      f"logits.shape={logits.shape} and labels.shape={labels.shape}."
    )
  row_shape = logits.shape[:-1]
  if mask is not None and mask.shape != row_shape:
    raise ValueError(
      f"`mask` must have shape {row_shape} (logits without the class axis), got {mask.shape}."
    )


def _real_rows(row_shape, mask, num_real):
  """Rows that exist and are not masked: padding (beyond `num_real`) never counts."""
  batch = row_shape[0]
  real = jnp.arange(batch) < num_real
  keep = jnp.broadcast_to(real.reshape((batch,) + (1,) * (len(row_shape) - 1)), row_shape)
  return keep if mask is None else keep & mask.astype(bool)


def _soft_rows(z, y, keep):
  """Per-row metrics for soft labels: loss ``-sum_c y_c log softmax(z)_c``, rank of argmax(y).

  A row with a negative target entry is bad (NaN), never a negative loss.
  """
  bad_target = jnp.any(y < 0, axis=-1)
  status = _core.LabelStatus(keep, keep & bad_target, jnp.argmax(y, axis=-1).astype(jnp.int32))
  zn = _core.neutral_rows(z, keep)
  shifted, _ = _core.shifted_logits(zn)
  log_s = _core.log_sum_exp_shifted(shifted)
  yn = jnp.where(keep[..., None], y, jnp.zeros((), y.dtype))
  nll = _core.xent(log_s, jnp.sum(yn, axis=-1), _core.target_dot(shifted, yn))
  return status, nll


def _flat_row_metrics(logits, labels, keep, ignore_value, config: _StepConfig) -> _core.RowMetrics:
  """The core's per-row metrics of a flattened batch.

  Integer labels: `_core.forward_row_metrics` (the dense `_core.row_metrics`
  with the Brier score, in fewer passes: evaluation needs no gradient).
  Soft labels: `_core.row_metrics` with their own loss.
  """
  num_classes = logits.shape[-1]
  z = logits.astype(_validation.compute_dtype(logits.dtype)).reshape(-1, num_classes)
  keep = keep.reshape(-1)
  if config.soft:
    y = labels.astype(z.dtype).reshape(-1, num_classes)
    status, nll = _soft_rows(z, y, keep)
    return _core.row_metrics(z, status, config.top_k, nll=nll)
  status = _int_status(labels.reshape(-1), keep, num_classes, ignore_value, config)
  return _core.forward_row_metrics(z, status, config.top_k)


def _batch_sums(rows: _core.RowMetrics, acc_dtype, config: _StepConfig, byte_counts) -> dict:
  """The batch's contribution to each accumulator (same keys as `_zero_accumulators`).

  The loss, top-k credit and Brier score (``rows.brier``, which must be
  set): exact two-float sums (`_exact_sum`). Calibration
  bins: counts by integer segment sums (exact); confidences as residuals
  from a dyadic reference per bin (the host adds back count * reference
  exactly), so the plain per-bin sums only see small numbers. Byte counts:
  an integer sum over the counted rows.
  """
  nb = config.num_bins
  conf = rows.confidence
  bins = jnp.clip(jnp.floor(conf * nb).astype(jnp.int32), 0, nb - 1)
  refs = jnp.asarray(_bin_references(nb), acc_dtype)
  zero = jnp.zeros((), acc_dtype)
  resid = jnp.where(rows.counted, conf.astype(acc_dtype) - refs[bins], zero)
  int_dtype = jnp.zeros((), dtype=int).dtype

  def binned(v):
    return jax.ops.segment_sum(v, bins, nb)

  def pair(v):
    return (v, jnp.zeros_like(v))

  assert rows.brier is not None  # set by the caller (the core's, or `_calibration_rows`)
  g = config.groups
  return {
    "nll": _exact_sum(rows.nll.astype(acc_dtype), g),
    "top_k": _exact_sum(rows.credit_k.astype(acc_dtype), g),
    "brier": _exact_sum(rows.brier.astype(acc_dtype), g),
    "bin_count": binned(rows.counted.astype(int_dtype)),
    "bin_credit": pair(binned(rows.credit.astype(acc_dtype))),
    "resid": pair(binned(resid)),
    "bytes": jnp.sum(jnp.where(rows.counted, byte_counts, 0)),
  }


def _add_sums(acc: dict, part: dict) -> dict:
  """Add a batch's sums to the running totals: (hi, lo) pairs without losing digits.

  An entry that ``part`` lacks is kept as it is.
  """

  def add(a, b):
    return _acc_add(a, b) if isinstance(a, tuple) else a + b

  return {k: add(v, part[k]) if k in part else v for k, v in acc.items()}


# XLA's CPU code generator vectorizes the step's elementwise passes (the
# exponential, the rank comparison) for 256-bit registers unless told
# otherwise; on a CPU with AVX-512 the wider preference took a 50,000 x 64
# batch's step from 2.45-2.56 to 2.06-2.23 ms (benchmarks/evaluate_step.py,
# three runs of ten alternating rounds). Elsewhere the preference is capped
# at what the CPU has, and other backends ignore a CPU option.
_STEP_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


@functools.partial(
  jax.jit, static_argnames=("model", "config"), compiler_options=_STEP_COMPILER_OPTIONS
)
def _step(
  acc, params, x, labels, mask, extras, num_real, ignore_value, log_t, *, model, config: _StepConfig
):
  """Fold one padded batch into the accumulators (one compile per shape).

  Returns ``(acc, documents)``: ``documents`` is None, or with ``segments``
  the per-segment sums of the batch (`_document_sums`).
  """
  if config.hidden:
    return _hidden_step(acc, params, x, labels, mask, extras, num_real, ignore_value, config)
  logits = x if model is None else model(params, x)
  _check_batch(logits, labels, mask, config.soft)
  keep = _real_rows(logits.shape[:-1], mask, num_real)
  num_classes = logits.shape[-1]
  flat: tuple = (
    logits.reshape(-1, num_classes),
    labels.reshape(-1, num_classes) if config.soft else labels.reshape(-1),
    keep.reshape(-1),
    _flat_bytes(extras, keep),
  )
  acc_dtype = acc["nll"][0].dtype
  fold = _folds(config, flat[0].shape, log_t.shape[0])
  if not config.soft:  # the labels' status once, for the whole batch: the chunks read
    status = _int_status(flat[1], flat[2], num_classes, ignore_value, config)
    flat = (flat[0], flat[1], status.counted, flat[3], status.index)  # its rows
    if config.whole_max and not fold:  # the rows' shift in one pass over the batch
      z = flat[0].astype(_validation.compute_dtype(flat[0].dtype))
      flat += (_core.row_shift(z),)

  def part(z, y, k, b, *index):
    """One chunk's passes over its logits: per-row values, and the temperature sums.

    ``k``: the rows that exist (soft labels) or that count (integer labels,
    whose gather-safe ``index`` comes next, then the rows' shift where the
    batch's was taken whole).
    """
    if config.soft:
      rows = _flat_row_metrics(z, y, k, ignore_value, config)
      brier, temp = _calibration_rows(z, y, rows.counted, rows.brier, log_t, acc_dtype, config)
      out = rows._replace(brier=brier)._asdict()
    else:
      z = z.astype(_validation.compute_dtype(z.dtype))
      if fold:
        out = _core.forward_row_stats_folded(z, index[0], _FOLD_WIDTH)._asdict()
      else:
        out = _core.forward_row_stats(z, *index)._asdict()
      _, temp = _calibration_rows(z, y, k, None, log_t, acc_dtype, config)
    return {"temp": (temp, jnp.zeros_like(temp))}, out

  if not fold:
    acc, out = _fold_chunks(acc, flat, part, config.groups)
  else:  # short rows folded: the whole batch at once (`_folds`)
    sums, out = part(*flat)
    acc = _add_sums(acc, sums)
  if config.soft:
    rows = _core.RowMetrics(**out)
  else:  # the per-row arithmetic once, on the whole batch's rows
    stats = _core.ForwardStats(**out)
    rows = _core.forward_metrics_from_stats(stats, status, config.top_k, num_classes)
  acc = _add_sums(acc, _batch_sums(rows, acc_dtype, config, flat[3]))
  return acc, _documents_of(_kept_rows(rows, config), flat[3], extras, acc_dtype, config)


def _int_status(labels, keep, num_classes: int, ignore_value, config: _StepConfig):
  """`_core.label_status` of flat integer labels ``[n]`` and the rows that exist (``keep``)."""
  ignore = ignore_value if config.ignore else None
  return _core.label_status(labels, num_classes, ignore_index=ignore, where=keep)


def _flat_bytes(extras, keep):
  """The rows' byte counts (int32, or int64 under x64), 0 without any."""
  b = extras.get("byte_counts")
  return jnp.zeros(keep.size, dtype=int) if b is None else b.reshape(-1).astype(int)


def _kept_rows(rows: _core.RowMetrics, config: _StepConfig) -> dict:
  """The per-row values the per-document sums need (none without documents)."""
  return {"nll": rows.nll, "counted": rows.counted} if config.documents else {}


def _documents_of(rows: dict, byte_counts, extras, acc_dtype, config: _StepConfig):
  if not config.documents:
    return None
  segments = extras["segments"].reshape(-1)
  return _document_sums(rows["nll"].astype(acc_dtype), rows["counted"], byte_counts, segments)


def _hidden_step(acc, params, x, labels, mask, extras, num_real, ignore_value, config):
  """`_step` for hidden states ``[batch, ..., D]`` and a head: the fused engine's rows."""
  w, bias = params
  if config.soft:
    raise TypeError("with `head`, `labels` must be integer classes (soft labels need logits).")
  if labels.shape != x.shape[:-1]:
    raise ValueError(
      "integer `labels` must have the shape of `hidden` without its feature axis, got "
      f"hidden.shape={x.shape} and labels.shape={labels.shape}."
    )
  keep = _real_rows(labels.shape, mask, num_real).reshape(-1)
  ignore = ignore_value if config.ignore else None
  status = _core.label_status(labels.reshape(-1), w.shape[1], ignore_index=ignore, where=keep)
  rows = vocab_evaluation.evaluation_rows(
    x.reshape(-1, x.shape[-1]),
    w,
    status,
    top_k=config.top_k,
    bias=bias,
    mesh=config.mesh,
    data_axis=None if config.mesh is None else "data",
  )
  acc_dtype = acc["nll"][0].dtype
  b = _flat_bytes(extras, keep)
  acc = _add_sums(acc, _batch_sums(rows, acc_dtype, config, b))  # no temperature sums
  return acc, _documents_of(_kept_rows(rows, config), b, extras, acc_dtype, config)


def _segmented_two_float(values, segments, num_segments: int):
  """Exact (hi, lo) sums of `values` per segment index, as ``[num_segments]`` arrays.

  The rows are sorted by segment (stably) and summed by a segmented
  `lax.associative_scan` whose combiner is the TwoSum step of
  `_two_float_reducer`; each segment's last row holds its total.
  """
  seg, v = jax.lax.sort((segments, values), num_keys=1, is_stable=True)
  change = seg[1:] != seg[:-1]
  start = jnp.concatenate([jnp.ones((1,), bool), change])

  def combine(a, b):
    s, e = _two_sum(a[1], b[1])
    return a[0] | b[0], jnp.where(b[0], b[1], s), jnp.where(b[0], b[2], a[2] + b[2] + e)

  _, hi, lo = jax.lax.associative_scan(combine, (start, v, jnp.zeros_like(v)))
  end = jnp.concatenate([change, jnp.ones((1,), bool)])
  at = jnp.where(end, seg, num_segments)  # out of range: dropped
  zeros = jnp.zeros((num_segments,), values.dtype)
  return zeros.at[at].set(hi, mode="drop"), zeros.at[at].set(lo, mode="drop")


def _document_sums(nll, counted, byte_counts, segments) -> dict:
  """Per segment of one batch: the NLL's (hi, lo), the counted rows and their bytes."""
  n = segments.shape[0]
  hi, lo = _segmented_two_float(jnp.where(counted, nll, jnp.zeros((), nll.dtype)), segments, n)
  count = jax.ops.segment_sum(counted.astype(byte_counts.dtype), segments, n)
  nbytes = jax.ops.segment_sum(jnp.where(counted, byte_counts, 0), segments, n)
  return {"nll_hi": hi, "nll_lo": lo, "count": count, "bytes": nbytes}


# Rows per chunk of a batch: as many logits as fill twice one core's L2
# cache (`_chunk_logits`), so every pass over a chunk's [rows, K] logits
# reads from the cache. Unchunked, the dozen passes of a [50000, 64] batch
# each went out to memory: 4-5x slower on a 2-core CPU
# (benchmarks/evaluate.py). Only the passes over the logits run per chunk
# (`_core.forward_row_stats`, for integer labels), the row maximum included
# where that is faster (`_WHOLE_BATCH_MAX`). The
# per-row arithmetic and the exact sums then run once on the batch's [n]
# rows: the step's loop body went from about sixty XLA kernels to seventeen.


def _parse_cache_size(text: str) -> int:
  """Bytes of a sysfs cache size such as ``"1024K"`` (suffixes K, M, G; none: bytes)."""
  text = text.strip().upper()
  scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
  return int(text[:-1] if scale > 1 else text) * scale


def _chunk_logits(cache_root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
  """Float32 logits per chunk: twice the first core's L2 cache, from Linux's sysfs.

  Between ``2**16`` and ``2**20`` logits (256 KiB to 4 MiB); ``2**18``
  (1 MiB) where the size is unknown (another system, no sysfs). On 2-core
  VMs the best chunk filled both cores' L2 caches (XLA splits each pass
  over the two): 1 MiB on a Zen 3 with 512 KiB of L2 per core, 2 MiB on a
  Zen 4 with 1 MiB, where the step went from 1.24x to 1.18x the naive loss
  (docs/benchmarks.md).
  """
  try:
    for entry in sorted(os.listdir(cache_root)):
      path = os.path.join(cache_root, entry)
      with open(os.path.join(path, "level")) as f:
        level = int(f.read())
      with open(os.path.join(path, "type")) as f:
        kind = f.read().strip()
      if level == 2 and kind in ("Unified", "Data"):
        with open(os.path.join(path, "size")) as f:
          size = _parse_cache_size(f.read())
        return int(np.clip(2 * size // 4, 1 << 16, 1 << 20))
  except (OSError, ValueError):
    pass
  return 1 << 18


_CHUNK_LOGITS = _chunk_logits()
_MIN_CHUNK_ROWS = 64


def _cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The first ``vendor_id`` of Linux's cpuinfo (``"GenuineIntel"``, ``"AuthenticAMD"``), or ``""``."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("vendor_id"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


# Where the step takes the rows' maximum (integer labels). Per chunk, XLA
# first copies the chunk out of the batch (its CPU reduction reads a whole
# buffer), then every later pass reads the copy from the cache. Over the
# whole batch, one reduction reads the batch in place and no chunk is
# copied; the later passes read the batch where it is. The statistics are
# the same bit for bit (tests/evaluation/test_evaluate.py). Each way won on
# one kind of CPU: per chunk on an AMD EPYC with AVX-512 (the fifth
# session's VM, streamed: 1.38 and 1.37x the naive loop, against 1.51 and
# 1.46x over the whole batch); over the whole batch on an Intel Xeon
# (Emerald Rapids, 2 MiB of L2 per core), where the chunks' copies took
# about a quarter of the step (the step alone: 1.54x the naive loss against
# 1.85x, `benchmarks/evaluate_step.py`; streamed: medians 1.49-1.53x against
# 1.82x). Elsewhere, per chunk, as measured first. Only for CPU devices
# (`_Run._config`): the choice is about XLA's CPU kernels.
_WHOLE_BATCH_MAX = _cpu_vendor() == "GenuineIntel"

# Where `_WHOLE_BATCH_MAX` holds, short rows of integer-label logits are read
# by `_core.forward_row_stats_folded`, the whole batch at once: K a multiple
# of 16 from 64 to 1,024 classes, at most 2**23 logits (32 MiB) per device
# and no temperature fit. On the Intel VM, streamed (`benchmarks/evaluate.py`'s
# data, alternating with the chunked step): 1.27x the naive loop against
# 1.45x for batches of 50,000 x 64, 1.39x against 1.48x for 100,000, but
# 2.57x against 1.63x for 200,000 (51 MiB), hence the bound.
_FOLD_WIDTH = 16
_FOLD_CLASSES = (64, 1024)
_FOLD_LOGITS = 1 << 23


def _folds(config: _StepConfig, shape: tuple, num_t: int) -> bool:
  """Whether `_step` reads a batch of ``[n, K]`` logits folded (see `_FOLD_LOGITS`)."""
  n, k = shape
  low, high = _FOLD_CLASSES
  return bool(
    config.whole_max
    and not config.soft
    and num_t == 0
    and k % _FOLD_WIDTH == 0
    and low <= k <= high
    and n // config.groups * k <= _FOLD_LOGITS
  )


def _fold_chunks(acc, flat, part_sums, groups: int):
  """Fold ``part_sums(*rows)`` of each chunk of rows of ``flat`` into ``acc``.

  ``flat`` are row-aligned arrays (``[n, K]`` logits first) whose rows are
  split into ``groups`` contiguous device blocks; a chunk takes the same rows
  of every block (`lax.dynamic_slice` on the block's own axis), so a sharded
  batch stays on its devices. The remainder is one last, smaller chunk. The
  sums are exact two-float sums, so the totals do not depend on the chunking
  beyond rounding. ``part_sums`` returns ``(sums, rows)``: the rows (a dict
  of ``[chunk]`` arrays) are put back together into ``[n]`` arrays, returned
  beside the totals (`_step` sums most of its figures from them).
  """
  local = flat[0].shape[0] // groups
  size = max(_MIN_CHUNK_ROWS, _CHUNK_LOGITS // max(flat[0].shape[-1], 1))
  if local <= size:
    sums, whole = part_sums(*flat)
    return _add_sums(acc, sums), whole
  blocks = [a.reshape(groups, local, *a.shape[1:]) for a in flat]

  def rows(start, count):
    return [
      jax.lax.dynamic_slice_in_dim(b, start, count, axis=1).reshape(groups * count, *b.shape[2:])
      for b in blocks
    ]

  out = jax.eval_shape(lambda: part_sums(*rows(0, size))[1])
  buffers = {k: jnp.zeros((groups, local), v.dtype) for k, v in out.items()}

  def add(carry, start, count):
    a, bufs = carry
    sums, got = part_sums(*rows(start, count))
    put = lambda b, v: jax.lax.dynamic_update_slice_in_dim(b, v.reshape(groups, count), start, 1)
    return _add_sums(a, sums), {k: put(bufs[k], got[k]) for k in bufs}

  full = local // size
  carry = jax.lax.fori_loop(0, full, lambda i, c: add(c, i * size, size), (acc, buffers))
  if local % size:
    carry = add(carry, full * size, local % size)
  acc, bufs = carry
  return acc, {k: v.reshape(-1) for k, v in bufs.items()}


def _calibration_rows(logits, labels, counted, brier, log_t, acc_dtype, config: _StepConfig):
  """The rows' Brier scores and the batch's temperature statistics (`xentjax.calibration`).

  Returns ``(brier [n], temp [3, len(log_t)])``. The Brier score of integer
  labels is the core's (`_core.brier_from_stats`), passed in as ``brier``
  (or None where the caller adds it later); soft labels and the temperature
  statistics need the probabilities themselves (`_core.probabilities`,
  `calibration.temperature_statistics`). ``counted``: the rows that count.
  """
  num_classes = logits.shape[-1]
  z = logits.astype(_validation.compute_dtype(logits.dtype)).reshape(-1, num_classes)
  temp = jnp.zeros((3, log_t.shape[0]), acc_dtype)
  if config.soft or log_t.shape[0]:
    valid = counted
    if config.soft:
      y_prob = labels.astype(z.dtype).reshape(z.shape)
    else:
      y = labels.reshape(-1)
      ok = (y >= 0) & (y < num_classes)
      y_prob = jax.nn.one_hot(jnp.where(ok, y, 0), num_classes, dtype=z.dtype)
      valid = counted & ok
    if config.soft:
      p = _core.probabilities(z)
      brier = jnp.where(valid, jnp.sum(jnp.square(p - y_prob), axis=-1), 0.0)
    st = calibration.temperature_statistics(z, y_prob, log_t, where=valid)
    temp = jnp.stack([st.loss, st.d1, st.d2])
  return brier, temp.astype(acc_dtype)


# ---------------------------------------------------------------------------
# Host side: batches, padding, prefetching.


class _Prepared(NamedTuple):
  x: Any
  labels: Any
  mask: Any
  num_real: Any
  rows: int  # real rows along the batch axis (for the progress bar)
  soft: bool
  ignore: Any  # the ignore value as a device scalar of the labels' dtype, or None
  extras: dict  # device arrays: "byte_counts", "segments" (each optional)
  doc_ids: Any = None  # int64 [S]: the document of each segment index of "segments"
  byte_bound: int = 0  # the piece's byte total (an int32 accumulator must not overflow)


def _num_rows(tree) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError("a batch's inputs have no arrays in them.")
  rows = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if None in rows or len(rows) != 1:
    raise ValueError(
      "every array of a batch needs the same leading (batch) dimension, got shapes "
      f"{[np.shape(leaf) for leaf in leaves]}."
    )
  (n,) = rows
  assert n is not None  # checked above
  return n


def _as_array(a):
  return a if isinstance(a, (jax.Array, np.ndarray)) else np.asarray(a)


def _pad_rows(a, size: int, edge: bool):
  """Pad the leading axis of `a` to `size` (zeros, or repeats of the last row)."""
  n = a.shape[0]
  if n == size:
    return a
  widths = [(0, size - n)] + [(0, 0)] * (a.ndim - 1)
  mode = "edge" if edge and n > 0 else "constant"
  if isinstance(a, jax.Array):
    return jnp.pad(a, widths, mode=mode)
  a = np.asarray(a)
  return np.pad(a, widths, mode="edge") if mode == "edge" else np.pad(a, widths)


_BATCH_KEYS = ("labels", "mask", "byte_counts", "document_ids")


class _Parts(NamedTuple):
  """One batch as arrays, checked: `x` is the logits, hidden states or model inputs."""

  x: Any
  labels: Any
  mask: Any
  byte_counts: Any
  document_ids: Any
  soft: bool
  rows: int


def _split(batch, x_key: str) -> tuple:
  """``(x, labels, mask, byte_counts, document_ids)`` of a tuple or dict batch."""
  if isinstance(batch, dict):
    return _split_dict(batch, x_key)
  if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
    hint = ""
    if hasattr(batch, "shape"):  # `evaluate((logits, labels))` iterates the pair itself
      hint = (
        f" (shape {tuple(batch.shape)}): `batches` is iterated, one batch per item, so "
        "to evaluate a single batch wrap the pair in a list: evaluate([(logits, labels)])"
      )
    raise TypeError(
      f"each batch must be a ({x_key}, labels) or ({x_key}, labels, mask) tuple, or a dict "
      f"with keys {x_key!r}, 'labels' and optionally 'mask', 'byte_counts', 'document_ids'; "
      f"got {type(batch).__name__}{hint}."
    )
  mask = batch[2] if len(batch) == 3 else None
  return batch[0], batch[1], mask, None, None


def _split_dict(batch: dict, x_key: str) -> tuple:
  unknown = sorted(set(batch) - {x_key, *_BATCH_KEYS})
  missing = [k for k in (x_key, "labels") if k not in batch]
  if unknown or missing:
    other = {"logits": "hidden (with head=)", "hidden": "logits (without head=)"}.get(x_key)
    hint = f"; {other!r} is not this call's input" if other and other.split()[0] in batch else ""
    raise ValueError(
      f"a dict batch needs the keys {x_key!r} and 'labels' (optional: 'mask', 'byte_counts', "
      f"'document_ids'); got {sorted(batch)}"
      + (f", unknown {unknown}" if unknown else "")
      + (f", missing {missing}" if missing else "")
      + hint
      + "."
    )
  return tuple(batch.get(k) for k in (x_key, *_BATCH_KEYS))


def _check_row_array(name: str, a, shape: tuple, *, nonnegative: bool = False):
  """An integer array of the rows' shape (`byte_counts`, `document_ids`), as an array."""
  a = _as_array(a)
  if not jnp.issubdtype(a.dtype, jnp.integer):
    raise TypeError(f"`{name}` must be integers, got dtype {a.dtype}.")
  if tuple(a.shape) != tuple(shape):
    raise ValueError(
      f"`{name}` must have the labels' row shape {tuple(shape)} (one per token), got {a.shape}."
    )
  if nonnegative and a.size and int(a.min()) < 0:
    raise ValueError(f"`{name}` must be >= 0, got a minimum of {int(a.min())}.")
  return a


def _check_parts(batch, model, x_key: str = "logits") -> _Parts:
  """One batch as arrays, checked."""
  x, labels, mask, byte_counts, document_ids = _split(batch, x_key)
  x = jax.tree_util.tree_map(_as_array, x)
  labels = _as_array(labels)
  mask = None if mask is None else _as_array(mask)
  if mask is not None:
    check_mask_dtype(mask.dtype, mask.shape, "mask")
  if model is None:
    _validation.check_floating(x_key, x)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    soft = False
  elif jnp.issubdtype(labels.dtype, jnp.floating):
    soft = True
  else:
    raise TypeError(
      f"`labels` must be integer class indices or floating soft labels, got dtype {labels.dtype}."
    )
  rows = _num_rows(x)
  parts = [labels] if mask is None else [labels, mask]
  if any(np.ndim(p) == 0 or np.shape(p)[0] != rows for p in parts):
    raise ValueError(
      f"labels (and mask) must have the batch's {rows} rows along their first axis, got "
      f"labels.shape={np.shape(labels)}"
      + ("" if mask is None else f", mask.shape={np.shape(mask)}")
      + "."
    )
  row_shape = labels.shape[:-1] if soft else labels.shape
  if byte_counts is not None:
    byte_counts = _check_row_array("byte_counts", byte_counts, row_shape, nonnegative=True)
  if document_ids is not None:
    document_ids = _check_row_array("document_ids", document_ids, row_shape)
  return _Parts(x, labels, mask, byte_counts, document_ids, soft, rows)


class _DeviceScalars:
  """Replicated device scalars, made once per distinct value and reused."""

  def __init__(self, mesh: Mesh):
    self._sharding = NamedSharding(mesh, P())
    self._cache: dict = {}

  def __call__(self, value, dtype):
    key = (int(value), np.dtype(dtype).str)
    if key not in self._cache:
      if len(self._cache) > 64:
        self._cache.clear()
      self._cache[key] = jax.device_put(np.asarray(value, dtype=dtype), self._sharding)
    return self._cache[key]


def _ignore_value(scalars, ignore_index, labels, soft):
  """`ignore_index` in the labels' dtype, or None when nothing can equal it (no wraparound)."""
  if soft or ignore_index is None:
    return None
  info = np.iinfo(labels.dtype)
  return scalars(ignore_index, labels.dtype) if info.min <= ignore_index <= info.max else None


def _padded_batches(
  batches: Iterable, *, model, mesh: Mesh, ignore_index, x_key: str = "logits"
) -> Iterator[_Prepared]:
  """Yield padded, device-placed pieces of fixed batch size (the first batch's)."""
  groups = mesh.devices.size
  rows_sharding = NamedSharding(mesh, P("data"))
  scalars = _DeviceScalars(mesh)
  size = kinds = None
  for batch in batches:
    parts = _check_parts(batch, model, x_key)
    kinds = _same_kinds(kinds, parts)
    if parts.rows == 0:
      continue
    if size is None:  # the first batch fixes the compiled size
      size = -(-parts.rows // groups) * groups
    ignore = _ignore_value(scalars, ignore_index, parts.labels, parts.soft)
    for start in range(0, parts.rows, size):
      stop = min(start + size, parts.rows)

      def piece(a, edge=False, start=start, stop=stop, size=size):
        a = a if (start == 0 and stop == a.shape[0]) else a[start:stop]
        return _pad_rows(a, size, edge)

      xp = jax.tree_util.tree_map(functools.partial(piece, edge=model is not None), parts.x)
      mp = None if parts.mask is None else piece(parts.mask)
      extras, host = _extras(parts, piece)
      arrays = (xp, piece(parts.labels), mp, extras)
      jax.tree_util.tree_map(_touch_pages, arrays)
      xd, ld, md, ed = jax.device_put(arrays, rows_sharding)
      real = scalars(stop - start, np.int32)
      yield _Prepared(xd, ld, md, real, stop - start, parts.soft, ignore, ed, **host)


def _touch_pages(a) -> None:
  """Map every memory page of a NumPy array before its step is dispatched.

  On the CPU, `jax.device_put` of a contiguous NumPy array is zero-copy: the
  compiled step reads the array in place. For a memory-mapped batch, the
  first read of each page is a page fault (about 1.7 ms per 12.8 MB batch on
  the benchmark's CPU): without this, every one of them happened inside the
  step, on the critical path. Mapped here (in the loop, or in the feeding
  thread with ``prefetch > 0``), the faults overlap the previous batches'
  asynchronous steps. Linux maps the whole range in one
  ``madvise(MADV_POPULATE_READ)`` call (about a fifth less CPU time than
  faulting page by page); elsewhere, or where the call fails, a strided read
  of ``size / page`` bytes faults them in. Either is cheap for an array
  already in memory.
  """
  if not (isinstance(a, np.ndarray) and a.size and a.flags.c_contiguous):
    return
  if not _populate(a):
    np.add.reduce(a.reshape(-1).view(np.uint8)[::_PAGE_BYTES], dtype=np.uint64)


def _madvise():
  """libc's ``madvise`` through ctypes (Linux only), or None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    fn = ctypes.CDLL(None, use_errno=True).madvise
  except (OSError, AttributeError):
    return None
  fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
  fn.restype = ctypes.c_int
  return fn


_MADVISE = _madvise()


def _populate(a: np.ndarray) -> bool:
  """Map the pages under ``a`` in one system call; False where that is not possible."""
  if _MADVISE is None:
    return False
  start = a.ctypes.data
  base = start - start % _PAGE_BYTES
  return _MADVISE(base, start + a.nbytes - base, _MADV_POPULATE_READ) == 0


def _same_kinds(kinds, parts: _Parts):
  """Which optional arrays the batches carry: the first batch's, the same in every batch."""
  now = (parts.byte_counts is not None, parts.document_ids is not None)
  if kinds is not None and now != kinds:
    names = lambda k: [n for n, has in zip(("byte_counts", "document_ids"), k) if has] or "neither"
    raise ValueError(
      f"every batch must carry the same optional arrays: the first had {names(kinds)}, "
      f"a later one {names(now)}."
    )
  return now


def _extras(parts: _Parts, piece) -> tuple[dict, dict]:
  """The piece's byte counts and document segments: device arrays, and host values.

  A piece's documents are numbered ``0 .. S-1`` in the order of their ids
  (`np.unique`): the device sums each number's rows, the host keeps which
  id it is. Padding rows join segment 0 (they never count, so add nothing).
  """
  extras: dict = {}
  host: dict = {}
  if parts.byte_counts is not None:
    counts = piece(parts.byte_counts)
    extras["byte_counts"] = counts
    host["byte_bound"] = int(np.sum(np.asarray(counts), dtype=np.int64))
  if parts.document_ids is not None:
    ids = np.asarray(piece(parts.document_ids)).astype(np.int64)
    real = piece(np.ones(parts.rows, bool))  # the padded rows' flag, by the same slicing
    real = np.broadcast_to(real.reshape(real.shape + (1,) * (ids.ndim - 1)), ids.shape)
    unique, inverse = np.unique(ids[real], return_inverse=True)
    segments = np.zeros(ids.shape, np.int32)
    segments[real] = inverse.reshape(-1)
    extras["segments"], host["doc_ids"] = segments, unique
  return extras, host


_DONE = object()


class _Prefetcher:
  """Run an iterator in a background thread, at most `size` items ahead."""

  def __init__(self, iterator: Iterator, size: int):
    self._iterator = iterator
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="xentjax-evaluate", daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      for item in self._iterator:
        if not self._put(item):
          return
      self._put(_DONE)
    except BaseException as e:
      self._put(e)

  def __iter__(self):
    while True:
      item = self._queue.get()
      if item is _DONE:
        return
      if isinstance(item, BaseException):
        raise item
      yield item

  def close(self):
    self._stop.set()
    while True:  # unblock a producer waiting on a full queue
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=10)


def _want_progress(progress: bool | None) -> bool:
  if progress is None:
    try:
      return sys.stderr.isatty()
    except (AttributeError, ValueError):
      return False
  return bool(progress)


class _NoBar:
  def update(self, n):
    del n

  def close(self):
    pass


def _progress_bar(show: bool, total: int | None):
  if not show:
    return _NoBar()
  try:
    from tqdm.auto import tqdm
  except ImportError:  # tqdm is optional
    return _NoBar()
  return tqdm(total=total, unit="ex", unit_scale=True, desc="evaluate", file=sys.stderr)


class _HostTotals:
  """Python-number totals the device accumulators are folded into.

  ``pairs[name]`` keeps every (hi, lo) part of a float sum as float64 arrays
  (summed exactly at the end by `_total`); ``counts[name]`` is an int64 sum.
  Any accumulator entry of these two kinds is folded without code here.
  """

  def __init__(self):
    self.pairs: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    self.counts: dict[str, np.ndarray] = {}
    # The temperature statistics: one (grid, [3, G] sums) pair per process
    # (grids differ between processes, so they are kept apart, not summed).
    self.temp_grid: list[np.ndarray] = []
    self.temp: list[np.ndarray] = []
    # What the batches carried ("bytes", "documents"): a list, so that a
    # process without batches merges with one that had them.
    self.kinds: list[str] = []
    # Per-document tables (`_DOC_FIELDS` -> [S] arrays), compacted now and then.
    self.documents: list[dict] = []
    self._doc_rows = self._doc_compacted = 0

  def add(self, acc):
    acc = dict(jax.device_get(acc))
    hi, lo = acc.pop("temp")
    if self.temp_grid:  # no batch yet: its grid is set by the first one
      part = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
      self.temp = [self.temp[0] + part] if self.temp else [part]
    for name, value in acc.items():
      if isinstance(value, tuple):
        self.pairs[name] += [np.asarray(v, np.float64) for v in value]
      else:
        v = np.asarray(value, np.int64)
        self.counts[name] = self.counts.get(name, 0) + v

  def add_documents(self, ids: np.ndarray, docs: dict) -> None:
    """One batch's per-segment sums: segment ``j`` is document ``ids[j]``."""
    n = len(ids)
    table = {"ids": ids.astype(np.int64)}
    table["nll_hi"] = np.asarray(docs["nll_hi"][:n], np.float64)
    table["nll_lo"] = np.asarray(docs["nll_lo"][:n], np.float64)
    table["count"] = np.asarray(docs["count"][:n], np.int64)
    table["bytes"] = np.asarray(docs["bytes"][:n], np.int64)
    self.documents.append(table)
    self._doc_rows += n
    if self._doc_rows > max(_DOC_COMPACT_ROWS, 2 * self._doc_compacted):
      self.compact_documents()

  def compact_documents(self) -> None:
    if self.documents:
      self.documents = [_merge_documents(self.documents)]
      self._doc_rows = self._doc_compacted = len(self.documents[0]["ids"])

  def sum(self, name: str, index=None, extra: float = 0.0) -> float:
    """The exact total of a float sum (of one bin with ``index``), plus ``extra``."""
    parts = [np.ravel(p if index is None else p[index]) for p in self.pairs[name]]
    his = [float(v) for p in parts[0::2] for v in p] + [float(extra)]
    los = [float(v) for p in parts[1::2] for v in p]
    return _total(his, los)


def _merge_documents(tables: list[dict]) -> dict:
  """One table with one row per document id: the tables' rows of each id added exactly.

  Counts and bytes are integer sums; the NLL's (hi, lo) parts are added in
  float64 with TwoSum (the rounding errors of the ``hi`` additions go, with
  the ``lo`` parts, into ``lo``), one part per document at a time, so the
  order of the rows does not matter beyond the rounding of the tiny ``lo``
  additions. A non-finite ``hi`` makes the document's ``hi`` non-finite.
  """
  ids = np.concatenate([t["ids"] for t in tables])
  unique, inverse = np.unique(ids, return_inverse=True)
  order = np.argsort(inverse, kind="stable")
  group = inverse[order]
  first = np.searchsorted(group, np.arange(len(unique)))
  rank = np.arange(len(group)) - first[group]
  out = {"ids": unique}
  for name in ("count", "bytes"):
    out[name] = np.bincount(inverse, np.concatenate([t[name] for t in tables]), len(unique))
    out[name] = np.rint(out[name]).astype(np.int64)  # bincount adds in float64: exact below 2**53
  hi_parts = np.concatenate([t["nll_hi"] for t in tables])[order]
  lo_parts = np.concatenate([t["nll_lo"] for t in tables])[order]
  hi, lo = np.zeros(len(unique)), np.zeros(len(unique))
  with np.errstate(invalid="ignore"):
    for r in range(int(rank.max(initial=-1)) + 1):
      at = rank == r
      g = group[at]
      hi[g], e = _two_sum(hi[g], hi_parts[at])
      lo[g] = lo[g] + lo_parts[at] + e
  out["nll_hi"], out["nll_lo"] = hi, lo
  return out


def _total(his: list[float], los: list[float]) -> float:
  """Exact sum of (hi, lo) parts; a non-finite hi wins (its lo is then NaN)."""
  if not all(math.isfinite(h) for h in his):
    return float(sum(his))  # inf, or NaN for NaN / inf - inf
  return math.fsum(his + los)


# ---------------------------------------------------------------------------
# Public API.


def evaluate(
  batches: Iterable,
  *,
  model: Callable[[Any, Any], jax.Array] | None = None,
  params: Any = None,
  top_k: int = 5,
  num_bins: int = 15,
  base: float | None = None,
  ignore_index: int | None = -100,
  progress: bool | None = None,
  total: int | None = None,
  devices: Sequence[jax.Device] | None = None,
  prefetch: int = 0,
  temperature: bool = False,
  across_processes: bool | None = None,
  head: jax.typing.ArrayLike | None = None,
  bias: jax.typing.ArrayLike | None = None,
) -> EvaluationResult:
  r"""Exact dataset-level cross-entropy, accuracy and calibration, streamed.

  For the counted examples :math:`i \in V` (not padding, not masked, label
  not `ignore_index`), with logits :math:`z_i` and target :math:`y_i`,

  .. math::

    \begin{aligned}
    \ell_i &= \operatorname{logsumexp}(z_i) - z_{i, y_i},\\
    \mathrm{CE} &= \frac{1}{|V|} \sum_{i \in V} \ell_i,\\
    \mathrm{ECE} &= \frac{1}{|V|} \sum_{b=1}^{B} \Bigl| \sum_{i \in V_b}
      \big([\text{correct}_i] - p_i\big) \Bigr|,
    \end{aligned}

  where :math:`p_i = \max_c \operatorname{softmax}(z_i)_c` is the confidence
  and :math:`V_b` the examples whose confidence falls in the equal-width bin
  :math:`[(b-1)/B, b/B)` (the last bin includes 1). For soft labels
  :math:`\ell_i = -\sum_c y_{ic} \log \operatorname{softmax}(z_i)_c`.

  Each batch is padded to the size of the first one and masked, so the whole
  stream compiles one step per distinct batch shape (a larger batch is split
  into pieces of that size). Accumulators stay on the device and the steps
  are dispatched asynchronously, so the next batch is read and transferred
  while the current one computes (with ``prefetch > 0``, also in a
  background thread); the loop lets at most eight steps, and 256 MiB of
  their batches (but always two steps), queue up, so only a few batches are
  alive whatever the data set's size. With several local devices the batch
  axis is sharded over a 1-D mesh (``"data"``) and the accumulators are
  replicated.

  The loss sum is exact to about twice the working precision: each batch is
  reduced with error-free TwoSum steps into a (hi, lo) pair and added to the
  running pair the same way (float32 pairs when x64 is off, float64 pairs
  under `JAX_ENABLE_X64=1`); counts are integers, folded into Python ints
  before an int32 could overflow; per-bin confidences are summed as small
  residuals from a reference value per bin. Per-example losses are computed in the
  logits' dtype (16-bit floats in float32), so the mean matches a float64
  computation to a few float32 roundings (about 1e-7 relative) however many
  examples there are.

  Calibration beside the ECE, in the same single pass: the Brier score
  (an exact compensated sum, like the loss) and the temperature of
  temperature scaling (`xentjax.calibration.fit_temperature`). For the
  temperature the first batch is fitted exactly, and every batch then adds
  the exact sums of the loss and its first two derivatives in ``log T`` at
  20 log-temperatures (`xentjax.calibration.temperature_grid`: 7 nodes 0.03
  apart around the first batch's fit, 13 fixed ones from 1e-3 to 1e3). The
  reported ``T`` is the root of the cubic Hermite interpolant of those
  derivatives (`xentjax.calibration.temperature_from_statistics`): exact at
  the nodes, within about 1e-6 relative of the multi-pass Newton fit when the
  minimum lies among the fine nodes (the usual case: the first batch is a
  sample of the same data); between coarse nodes (a first batch unlike the
  rest, or each process's own grid in a multi-process run) to about 1e-2.
  `xentjax.calibration.fit_temperature_streaming` gives the exact value in a
  few more passes.

  Bits per byte and per-document sums come from dict batches (below): with
  ``byte_counts`` :math:`b_i` (the UTF-8 bytes token :math:`i` decodes to)
  ``bits_per_byte`` is :math:`\sum_{i \in V} \ell_i / \ln 2 \,/\,
  \sum_{i \in V} b_i`, both sums over the same counted tokens: a masked
  token, an `ignore_index` label and padding add neither bits nor bytes (a
  first token that is never predicted, and its bytes, are left out by
  masking it). With ``document_ids`` each document gets the same sums over
  its counted tokens (`xentjax.evaluation.DocumentSums`), exact two-float sums like the total
  (per batch a segmented TwoSum scan on the device, across batches and
  processes TwoSum in float64 on the host), whatever batches and processes
  a document is split over.

  From hidden states: with ``head=w`` (``[D, V]``) and optional ``bias``
  (``[V]``), batches carry hidden states ``[batch, ..., D]`` instead of
  logits, and every figure is that of the logits ``hidden @ w + bias``,
  computed by the fused engine's tiles (`xentjax.linear_token_stats`'
  engine) without an ``[n, V]`` array in any compiled program: one sweep
  over the vocabulary keeps the row maximum, the normalizer, the label's
  logit, the Brier score's two sums and the ``k`` largest logits with the
  count of logits equal to the ``k``-th, which is all the tie-shared top-1
  and top-k credit need (below the ``k``-th value the credit is 0, above it
  every class ahead of the label is among the ``k``). Integer labels only;
  no ``temperature=True`` (it needs the logits at 20 temperatures).

  Args:
    batches: iterable of ``(logits, labels)`` or ``(logits, labels, mask)``
      tuples of NumPy or JAX arrays (memory maps are fine), or of dicts
      ``{"logits", "labels", "mask"?, "byte_counts"?, "document_ids"?}``.
      `logits` is ``[batch, ..., num_classes]``; `labels` is integer
      ``[batch, ...]`` or floating soft labels ``[batch, ..., num_classes]``;
      `mask` is bool or integer 0/1 ``[batch, ...]`` (True = counted);
      `byte_counts` and `document_ids` are integers of the labels' row shape
      ``[batch, ...]`` (bytes ``>= 0``; ids any int64), and every batch must
      carry the same optional keys. With `model`, each tuple is
      ``(inputs, labels[, mask])`` (dict key ``"inputs"``) where `inputs` is
      an array or pytree of arrays with a leading batch axis; with `head`,
      ``(hidden, labels[, mask])`` (dict key ``"hidden"``).
    model: optional ``model(params, inputs) -> logits``; it runs inside the
      compiled step. It must be hashable (any function is) and is padded with
      repeats of the last example on the ragged last batch.
    params: passed to `model`, placed on the devices once (replicated).
    top_k: the `k` of `top_k_accuracy` (capped at the number of classes).
    num_bins: number of equal-width confidence bins for the ECE.
    base: report `cross_entropy` in units of this logarithm base (None:
      nats). `perplexity`, `bits_per_token` and
      `negative_log_likelihood_sum` do not depend on it.
    ignore_index: integer label value that is not counted (PyTorch's -100 by
      default; None counts every label).
    progress: show a tqdm progress bar with examples/s (None: only when
      stderr is a terminal; without tqdm there is no bar).
    total: expected number of rows (entries along the batch axis), for the
      progress bar, which counts rows.
    devices: devices to shard the batch over (default: all local devices).
    prefetch: batches prepared ahead in a background thread (default 0: no
      thread). The asynchronous steps already overlap reading a batch with
      computing the previous ones; on a 2-core CPU the thread competed with
      XLA's for the cores (1.38x against 1.29x the minimal loop's time in
      `benchmarks/evaluate.py`'s setting, 30 alternating rounds), so it only
      pays where preparing a batch blocks without using a core.
    temperature: also fit the temperature of temperature scaling in the same
      pass (see above; it evaluates the loss at 20 temperatures, so it costs
      about 20 times the work of the rest); False leaves `temperature` None
      (no row in the printed table, no key in `to_dict()`).
    across_processes: combine the totals of every process of a
      `jax.distributed` job, so that each returns the global result (None:
      when `jax.process_count() > 1`). Every process must then call
      `evaluate` with the same options, each with its own batches (any
      number, none included); the call returns when the slowest process
      is done. An exception in one process is raised in every process (the
      others raise `xentjax.distributed.ProcessFailedError`), and different
      options raise `ValueError`, in every process. See
      `xentjax.distributed`.
    head: optional output head ``[D, V]``: the batches hold hidden states
      and the logits are ``hidden @ head + bias`` (never formed).
    bias: optional ``[V]`` bias of `head`.

  Returns:
    An `EvaluationResult` of Python numbers; `str()` of it is a table.
    ``bits_per_byte`` and ``byte_count`` are None without ``byte_counts``,
    ``per_document`` None without ``document_ids``.

  Note:
    * A counted example with an integer label outside ``[0, num_classes)``
      other than `ignore_index` (or a NaN row) makes `cross_entropy`,
      `perplexity`, `bits_per_token`, the NLL sum, `accuracy`,
      `top_k_accuracy` and the ECE NaN (never a silent finite number);
      `count` still counts it. The command line checks labels
      eagerly instead. A target logit of -inf gives an infinite loss.
    * Ties are shared (as in `xentjax.metrics`): with ``g`` classes above
      the target and ``t`` tied with it, the top-k credit is
      ``clip((k - g) / t, 0, 1)``, so a constant model scores ``k / K``.
      Every per-example number comes from the same core as the metrics.
    * Non-finite rows: a NaN logit (or ``+inf`` at the target) makes that
      example NaN in every metric; a row whose logits are all ``-inf`` has
      loss ``+inf``, all classes tied (credit ``k / K``) and confidence
      ``1 / K``. A soft label with a negative entry is NaN.
    * Soft labels: accuracy, top-k and the ECE use the argmax of the target
      distribution as the class; each example counts once whatever its
      target's total mass.
    * Bytes: no counted byte gives ``bits_per_byte`` NaN. Documents: every
      id on a batch row is listed, one whose tokens are all masked or
      ignored with zeros (its ``bits_per_byte`` NaN).
    * No counted example (empty stream, everything masked): `count` is 0,
      the NLL sum 0.0 and every mean NaN; nothing raises.

  References:
    Guo, Pleiss, Sun, Weinberger, "On Calibration of Modern Neural
    Networks", ICML 2017 (ECE). Knuth, The Art of Computer Programming
    vol. 2, 4.2.2 (TwoSum); Higham, "The Accuracy of Floating Point
    Summation", SIAM J. Sci. Comput. 1993.

  Example:
    >>> import numpy as np, xentjax
    >>> logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], np.float32))
    >>> r = xentjax.evaluate([(logits, np.array([0, 2]))], top_k=2, progress=False)
    >>> r.count, r.accuracy, r.top_k_accuracy  # row 2: class 2 ties class 0 for 2nd place
    (2, 0.5, 0.75)
    >>> round(r.cross_entropy, 4)  # (-log 0.7 - log 0.1) / 2
    1.3296
    >>> batch = {"logits": logits, "labels": np.array([0, 2]),
    ...          "byte_counts": np.array([3, 1]), "document_ids": np.array([7, 7])}
    >>> r = xentjax.evaluate([batch], progress=False)
    >>> round(r.bits_per_byte, 4)  # (-log2 0.7 - log2 0.1) / (3 + 1)
    0.9591
    >>> r.per_document.ids, r.per_document.count
    (array([7]), array([2]))
    >>> hidden, head = np.eye(2, dtype=np.float32), logits  # hidden @ head == logits
    >>> r = xentjax.evaluate([(hidden, np.array([0, 1]))], head=head, progress=False)
    >>> round(r.cross_entropy, 4)  # (-log 0.7 - log 0.8) / 2
    0.2899
  """
  _check_options(top_k=top_k, num_bins=num_bins, ignore_index=ignore_index, prefetch=prefetch)
  scale = _validation.log_base_scale(base)
  top_k, num_bins = int(top_k), int(num_bins)
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("`devices` must name at least one device.")
  mesh = Mesh(np.asarray(devices), ("data",))
  hidden = head is not None
  if hidden:
    params = _check_head(head, bias, model=model, temperature=temperature)
  if model is not None or hidden:
    params = jax.device_put(params, NamedSharding(mesh, P()))
  across = jax.process_count() > 1 if across_processes is None else bool(across_processes)
  x_key = "hidden" if hidden else ("inputs" if model is not None else "logits")
  prepared = _padded_batches(
    batches, model=model, mesh=mesh, ignore_index=ignore_index, x_key=x_key
  )
  source = _Prefetcher(prepared, prefetch) if prefetch > 0 else None
  bar = _progress_bar(_want_progress(progress), total)
  run = _Run(
    mesh,
    top_k=top_k,
    num_bins=num_bins,
    model=model,
    params=params,
    temperature=temperature,
    hidden=hidden,
  )
  failure = _consume(source if source is not None else prepared, run, bar, source, across)
  host = run.finish() if failure is None else run.host
  if across:
    # Every field of the totals is a partial sum: merged over the processes
    # field by field (`merge_sums`), so fields added later combine too.
    options = {"top_k": top_k, "num_bins": num_bins, "base": base, "ignore_index": ignore_index}
    host = _distributed.combine_evaluation(host, options=options, failure=failure)
  return _result(
    host, top_k=top_k, num_bins=num_bins, base=base, scale=scale, temperature=bool(temperature)
  )


def _consume(items, run: _Run, bar, source, across: bool):
  """Step through every batch; an exception is returned (not raised) `across` processes."""
  try:
    for item in items:
      run.step(item)
      bar.update(item.rows)
  except Exception as e:
    if not across:
      raise
    return e  # the other processes must hear of it before anyone raises
  finally:
    if source is not None:
      source.close()
    bar.close()
  return None


def _check_head(head, bias, *, model, temperature) -> tuple:
  """``(w, bias or None)`` as arrays: the output head of hidden-state batches."""
  if model is not None:
    raise ValueError("give `model` or `head`, not both.")
  if temperature:
    raise ValueError(
      "`temperature=True` needs the logits: the one-pass fit evaluates every class at 20 "
      "temperatures, which the fused evaluation from hidden states does not; evaluate "
      "`(hidden @ head + bias, labels)` batches for it."
    )
  w = jnp.asarray(head)
  _validation.check_floating("head", w)
  if w.ndim != 2:
    raise ValueError(f"`head` must be [D, V] (hidden @ head), got shape {w.shape}.")
  if bias is None:
    return w, None
  b = jnp.asarray(bias)
  _validation.check_floating("bias", b)
  if b.shape != (w.shape[1],):
    raise ValueError(f"`bias` must have shape ({w.shape[1]},) (one per class), got {b.shape}.")
  return w, b


def _check_options(*, top_k, num_bins, ignore_index, prefetch) -> None:
  def count(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")

  count("top_k", top_k, 1)
  count("num_bins", num_bins, 1)
  count("prefetch", prefetch, 0)
  if ignore_index is not None and (
    isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer))
  ):
    raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")


class _Run:
  """The device side of one `evaluate` call: accumulators, steps in flight, flushes."""

  def __init__(self, mesh: Mesh, *, top_k: int, num_bins: int, model, params, temperature, hidden):
    self.mesh, self.model, self.params = mesh, model, params
    self.temperature, self.hidden = bool(temperature), bool(hidden)
    self.top_k, self.num_bins = top_k, num_bins
    self.host = _HostTotals()
    self.acc = self._fresh()
    self.in_flight: collections.deque = collections.deque()
    self.rows_since_flush = self.bytes_since_flush = 0
    self.log_t = None

  def _fresh(self):
    num_t = 20 if self.temperature else 0
    x64 = bool(jax.config.read("jax_enable_x64"))
    return _zeros_program(self.num_bins, num_t, NamedSharding(self.mesh, P()), x64)()

  def _config(self, item: _Prepared) -> _StepConfig:
    groups = self.mesh.devices.size
    return _StepConfig(
      self.top_k,
      self.num_bins,
      item.ignore is not None,
      groups,
      item.soft,
      documents=item.doc_ids is not None,
      mesh=self.mesh if self.hidden and groups > 1 else None,
      hidden=self.hidden,
      whole_max=_WHOLE_BATCH_MAX and self.mesh.devices.flat[0].platform == "cpu",
    )

  def step(self, item: _Prepared) -> None:
    size = jax.tree_util.tree_leaves(item.x)[0].shape[0] * _rows_per_batch_row(item)
    self._check_bytes(item)
    if (
      self.rows_since_flush + size > _FLUSH_ROWS
      or self.bytes_since_flush + item.byte_bound > _INT32_MAX
    ):
      self.drain()  # rare: keeps int32 counters from overflowing
      self.host.add(self.acc)
      self.acc, self.rows_since_flush, self.bytes_since_flush = self._fresh(), 0, 0
    config = self._config(item)
    if self.log_t is None:  # the first batch: the temperature grid, and what is summed
      self._first(item, config)
    self.acc, docs = _step(
      self.acc,
      self.params,
      item.x,
      item.labels,
      item.mask,
      item.extras,
      item.num_real,
      item.ignore,
      self.log_t,
      model=self.model,
      config=config,
    )
    self.rows_since_flush += size
    self.bytes_since_flush += item.byte_bound
    self.in_flight.append((self.acc["bin_count"], docs, item.doc_ids))
    most, resume = _depths(_batch_bytes(item))
    if len(self.in_flight) > most:
      while len(self.in_flight) > resume:
        self._retire()  # back-pressure; fetches a finished step's per-document sums

  def _check_bytes(self, item: _Prepared) -> None:
    if item.byte_bound > _INT32_MAX and not jax.config.read("jax_enable_x64"):
      raise ValueError(
        f"one batch holds {item.byte_bound:,} bytes, more than an int32 can count with x64 "
        "off: use smaller batches (or JAX_ENABLE_X64=1)."
      )

  def _first(self, item: _Prepared, config: _StepConfig) -> None:
    log_t = np.zeros((0,))  # no temperature fit: an empty grid costs nothing
    if self.temperature:
      log_t = _temperature_grid(item, self.params, model=self.model, config=config)
    self.log_t = jax.device_put(np.asarray(log_t, dtype=float), NamedSharding(self.mesh, P()))
    self.host.temp_grid.append(log_t)
    self.host.kinds += ["bytes"] * bool(item.extras.get("byte_counts") is not None)
    self.host.kinds += ["documents"] * (item.doc_ids is not None)

  def _retire(self) -> None:
    marker, docs, ids = self.in_flight.popleft()
    marker.block_until_ready()
    if docs is not None:
      self.host.add_documents(ids, jax.device_get(docs))

  def drain(self) -> None:
    while self.in_flight:
      self._retire()

  def finish(self) -> _HostTotals:
    self.drain()
    self.host.add(self.acc)
    self.host.compact_documents()
    return self.host


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _first_batch_temperature(params, x, labels, mask, num_real, ignore_value, *, model, config):
  """`calibration.fit_temperature` on the counted rows of one padded batch."""
  logits = x if model is None else model(params, x)
  keep = _real_rows(logits.shape[:-1], mask, num_real)
  rows = _flat_row_metrics(logits, labels, keep, ignore_value, config)
  z = logits.astype(_validation.compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
  valid = rows.counted
  if config.soft:
    y = labels.astype(z.dtype).reshape(z.shape)
  else:
    y = labels.reshape(-1)
    valid = valid & (y >= 0) & (y < z.shape[-1])
    y = jnp.where(valid, y, 0).astype(jnp.int32)
  return calibration.fit_temperature(z, y, where=valid)


def _temperature_grid(item, params, *, model, config) -> np.ndarray:
  """The log-temperature grid: around a fit on the first batch (each process its own)."""
  t0 = _first_batch_temperature(
    params, item.x, item.labels, item.mask, item.num_real, item.ignore, model=model, config=config
  )
  return calibration.temperature_grid(float(t0))


def _batch_bytes(item: _Prepared) -> int:
  """The bytes of a prepared batch's arrays (what a step in flight keeps alive)."""
  leaves = jax.tree_util.tree_leaves((item.x, item.labels, item.mask, item.extras))
  return sum(int(leaf.nbytes) for leaf in leaves)


def _rows_per_batch_row(item: _Prepared) -> int:
  """Examples per leading-axis row (sequence positions, for [B, T, ...] labels)."""
  shape = item.labels.shape[:-1] if item.soft else item.labels.shape
  return int(np.prod(shape[1:], dtype=np.int64))


def _result(host: _HostTotals, *, top_k, num_bins, base, scale, temperature) -> EvaluationResult:
  """Dataset metrics from the exact totals; every mean of nothing is NaN."""
  bin_count = host.counts.get("bin_count", np.zeros(num_bins, np.int64))
  count = int(bin_count.sum())  # every counted example lands in one bin
  nll_sum = host.sum("nll")
  ce = acc = acc_k = ece = math.nan
  conf = _bin_confidences(host, bin_count, num_bins)
  if count:
    ce = nll_sum / count
    acc = host.sum("bin_credit") / count
    acc_k = host.sum("top_k") / count
    ece = _calibration_error(host, conf, num_bins) / count
  perplexity = math.exp(ce) if ce < 709.0 or math.isnan(ce) else math.inf
  return EvaluationResult(
    count=count,
    cross_entropy=ce if scale is None else ce * scale,
    perplexity=perplexity,
    bits_per_token=ce / math.log(2.0),
    accuracy=acc,
    top_k_accuracy=acc_k,
    expected_calibration_error=ece,
    negative_log_likelihood_sum=nll_sum,
    top_k=top_k,
    num_bins=num_bins,
    base=None if base is None else float(base),
    **_calibration_fields(host, count, bin_count, conf, math.isnan(nll_sum), temperature),
    **_byte_fields(host, nll_sum),
  )


def _byte_fields(host: _HostTotals, nll_sum: float) -> dict:
  """Bits per byte and the per-document sums, for what the batches carried."""
  fields: dict = {}
  if "bytes" in host.kinds:
    nbytes = int(host.counts.get("bytes", 0))
    fields["byte_count"] = nbytes
    fields["bits_per_byte"] = nll_sum / math.log(2.0) / nbytes if nbytes else math.nan
  if "documents" in host.kinds:
    table = _merge_documents(host.documents) if host.documents else None
    if table is None:
      empty = np.zeros(0, np.int64)
      fields["per_document"] = DocumentSums(empty, np.zeros(0), empty, empty)
    else:
      hi, lo = table["nll_hi"], table["nll_lo"]
      with np.errstate(invalid="ignore"):
        nll = np.where(np.isfinite(hi), hi + lo, hi)
      fields["per_document"] = DocumentSums(table["ids"], nll, table["count"], table["bytes"])
  return fields


def _bin_confidences(host: _HostTotals, bin_count, num_bins: int) -> list[float]:
  """The exact sum of the confidences in each bin."""
  if not host.pairs.get("resid"):
    return [0.0] * num_bins
  refs = _bin_references(num_bins)
  return [host.sum("resid", b, extra=float(bin_count[b] * refs[b])) for b in range(num_bins)]


def _calibration_error(host: _HostTotals, conf, num_bins: int) -> float:
  """``sum_b |credit_b - confidence_b|`` (not yet divided by the count)."""
  return math.fsum(abs(host.sum("bin_credit", b) - conf[b]) for b in range(num_bins))


def _calibration_fields(
  host: _HostTotals, count: int, bin_count, conf, nan_out: bool, temperature: bool
) -> dict:
  """Brier score, fitted temperature (None unless asked for) and the ECE's per-bin sums."""
  nb = len(conf)
  credit = [host.sum("bin_credit", b) if host.pairs.get("bin_credit") else 0.0 for b in range(nb)]
  fields = {
    "bin_count": tuple(int(c) for c in bin_count),
    "bin_confidence_sum": tuple(float(c) for c in conf),
    "bin_correct": tuple(float(c) for c in credit),
    "brier_score": math.nan,
    "temperature": math.nan if temperature else None,
  }
  if count == 0 or nan_out:
    return fields
  fields["brier_score"] = host.sum("brier") / count
  if temperature and host.temp and all(len(g) for g in host.temp_grid):
    stats = [
      calibration.TemperatureStats(grid, temp[0], temp[1], temp[2], count)
      for grid, temp in zip(host.temp_grid, host.temp, strict=True)
    ]
    fields["temperature"], _ = calibration.temperature_from_statistics(stats)
  return fields
