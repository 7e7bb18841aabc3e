"""Exact streaming evaluation over data sets larger than memory.

`evaluate` turns an iterable of batches into dataset-level cross-entropy,
perplexity, accuracy, top-k accuracy and calibration error in one call:

* one jit-compiled step per padded batch shape: the ragged last batch is
  padded to the first batch's size and masked, so it does not recompile;
* accumulators stay on the device (no host round trip per batch) and a
  background thread prepares and transfers the next batch while the current
  one computes; at most a few batches are alive at any time;
* the batch axis is sharded over a 1-D `Mesh` of all local devices;
* the loss sum is a two-float (hi, lo) sum built from the error-free TwoSum
  transformation, inside a batch (one variadic XLA reduction) and across
  batches, so the dataset mean matches a float64 computation to about the
  float32 rounding of the per-example values, however many examples there
  are, and does not depend on the batch size beyond rounding. Counts are
  integers. With `JAX_ENABLE_X64=1` the accumulators are float64 pairs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
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

from xentjax import _validation, calibration
from xentjax import distributed as _distributed

# Number of times the per-batch step has been traced (a Python side effect
# that runs only while tracing): the tests use it to show that the ragged last
# batch reuses the compiled step.
_TRACE_COUNT = 0

# Integer counters are int32 when x64 is off: the host folds the device
# accumulators into Python numbers before this many (padded) rows pass.
_FLUSH_ROWS = 1 << 30

# Steps allowed in flight before the loop waits for the oldest to finish
# (back-pressure: without it a fast reader would queue unbounded work).
_MAX_IN_FLIGHT = 2


# ---------------------------------------------------------------------------
# Result.


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
  """Dataset-level metrics returned by `evaluate`.

  Attributes:
    count: number of examples counted (not masked, not `ignore_index`).
    cross_entropy: mean negative log-likelihood, in nats or in units of
      `base`.
    perplexity: `exp(cross_entropy in nats)`.
    bits_per_token: cross-entropy in bits (`nats / ln 2`).
    accuracy: fraction of examples whose target class has the top score
      (ties count as correct).
    top_k_accuracy: fraction whose target class is among the `top_k` highest
      scores (fewer than `top_k` classes score strictly higher).
    expected_calibration_error: `sum_b (n_b / N) |acc_b - conf_b|` over
      `num_bins` equal-width confidence bins on [0, 1].
    negative_log_likelihood_sum: total negative log-likelihood in nats.
    top_k: the `k` of `top_k_accuracy`.
    num_bins: number of calibration bins.
    base: logarithm base of `cross_entropy` (None for nats).
    brier_score: mean over examples of `sum_c (softmax(z)_c - y_c)**2`
      (exact streaming sum, like the loss).
    temperature: the `T` minimizing the mean cross-entropy of `logits / T`
      (temperature scaling), from one pass: see `evaluate`.
    bin_count, bin_confidence_sum, bin_correct: per-bin counts, summed
      confidences and correct predictions of the ECE's bins
      (`reliability_diagram()` turns them into a diagram).
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
  temperature: float = math.nan
  bin_count: tuple[int, ...] = ()
  bin_confidence_sum: tuple[float, ...] = ()
  bin_correct: tuple[float, ...] = ()

  def reliability_diagram(self) -> calibration.ReliabilityDiagram:
    """The ECE's bins as a `xentjax.calibration.ReliabilityDiagram` (``.plot()`` draws it)."""
    return calibration.ReliabilityDiagram.from_sums(
      self.bin_count, self.bin_confidence_sum, self.bin_correct
    )

  def to_dict(self) -> dict[str, Any]:
    """The scalar fields as a plain dict of Python numbers (for JSON; the per-bin
    tuples are left out: `reliability_diagram()` has them)."""
    d = dataclasses.asdict(self)
    return {k: v for k, v in d.items() if not k.startswith("bin_")}

  def __str__(self) -> str:
    unit = "nats" if self.base is None else ("bits" if self.base == 2 else f"base {self.base:g}")
    rows = [
      ("examples", f"{self.count:,}"),
      (f"cross-entropy ({unit})", f"{self.cross_entropy:.6f}"),
      ("perplexity", f"{self.perplexity:.6g}"),
      ("bits per token", f"{self.bits_per_token:.6f}"),
      ("accuracy", f"{self.accuracy:.6f}"),
      (f"top-{self.top_k} accuracy", f"{self.top_k_accuracy:.6f}"),
      (f"ECE ({self.num_bins} bins)", f"{self.expected_calibration_error:.6f}"),
      ("Brier score", f"{self.brier_score:.6f}"),
      ("temperature (logits / T)", f"{self.temperature:.6g}"),
      ("NLL sum (nats)", f"{self.negative_log_likelihood_sum:.6f}"),
    ]
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


def _grouped_sum(x, groups: int):
  """Two-float sum of the rows `x` [n]: per device block, then across blocks.

  The rows are split into `groups` contiguous blocks (one per device) so the
  first reduction runs on each device's own shard.
  """
  hi, lo = _two_float_sum(x.reshape(groups, x.shape[0] // groups))
  return _two_float_sum(hi, lo)


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


class _Config(NamedTuple):
  top_k: int
  num_bins: int
  has_ignore_index: bool
  groups: int
  soft: bool


def _zero_accumulators(num_bins: int, num_t: int = 20) -> dict:
  f = jnp.zeros((), dtype=float)  # float32, or float64 under x64
  i = jnp.zeros((), dtype=int)  # int32, or int64 under x64
  fb = jnp.zeros((num_bins,), dtype=float)
  ib = jnp.zeros((num_bins,), dtype=int)
  return {
    "nll": (f, f),
    "resid": (fb, fb),
    "top_k": i,
    "bin_count": ib,
    "bin_correct": ib,
    "brier": (f, f),
    "temp": (jnp.zeros((3, num_t), dtype=float), jnp.zeros((3, num_t), dtype=float)),
  }


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _step(acc, params, x, labels, mask, num_real, ignore_index, log_t, *, model, config: _Config):
  """Fold one padded batch into the accumulators (one compile per shape)."""
  global _TRACE_COUNT
  _TRACE_COUNT += 1

  logits = x if model is None else model(params, x)
  _validation.check_floating("logits", logits)
  if logits.ndim < 2:
    raise ValueError(f"`logits` must have shape [batch, ..., num_classes], got {logits.shape}.")
  num_classes = logits.shape[-1]
  if config.soft:
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

  dtype = _validation.compute_dtype(logits.dtype)
  acc_dtype = acc["nll"][0].dtype
  z = logits.astype(dtype).reshape(-1, num_classes)
  n = z.shape[0]

  # Rows that count: real (not padding), not masked, not ignore_index.
  batch = row_shape[0]
  real = jnp.arange(batch) < num_real
  valid = jnp.broadcast_to(real.reshape((batch,) + (1,) * (len(row_shape) - 1)), row_shape)
  if mask is not None:
    valid = valid & mask.astype(bool)
  valid = valid.reshape(n)

  m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))  # [n, 1]
  sum_exp = jnp.sum(jnp.exp(z - m), axis=-1)  # [n]
  log_sum_exp = jnp.log(sum_exp)  # logsumexp(z) - max(z)
  confidence = 1.0 / sum_exp  # max softmax probability

  if config.soft:
    y = labels.astype(dtype).reshape(n, num_classes)
    # -sum_c y_c log softmax(z)_c = sum_c y_c (max - z_c) + (sum_c y_c) log sum exp(z - max);
    # a zero target never multiplies an infinite gap (0 * inf would be NaN).
    gap = jnp.where(y == 0, jnp.zeros_like(z), y * (m - z))
    nll = jnp.sum(gap, axis=-1) + jnp.sum(y, axis=-1) * log_sum_exp
    target = jnp.argmax(y, axis=-1)  # accuracy is measured against the argmax class
    in_range = jnp.ones((n,), dtype=bool)
  else:
    y = labels.reshape(n)
    if config.has_ignore_index:  # a traced value: no compile per ignore_index
      valid = valid & (y != ignore_index)
    in_range = (y >= 0) & (y < num_classes)
    target = jnp.where(in_range, y, 0)
  z_target = jnp.take_along_axis(z, target.reshape(n, 1), axis=-1)  # [n, 1]
  if not config.soft:
    # (max - z_y) + log sum exp(z - max): no cancellation against a large max.
    nll = (m[:, 0] - z_target[:, 0]) + log_sum_exp
    nll = jnp.where(in_range, nll, jnp.nan)

  higher = jnp.sum(z > z_target, axis=-1)  # classes strictly above the target
  correct = (higher == 0) & in_range & valid
  hit_k = (higher < config.top_k) & in_range & valid

  # Calibration bins: counts by segment sums (integers, exact); confidences
  # as residuals from a dyadic reference per bin (the host adds back
  # count * reference exactly), summed in the accumulator dtype.
  bins = jnp.clip(jnp.floor(confidence * config.num_bins).astype(jnp.int32), 0, config.num_bins - 1)
  zero = jnp.zeros((), acc_dtype)
  refs = jnp.asarray(_bin_references(config.num_bins), acc_dtype)
  resid = jnp.where(valid, confidence.astype(acc_dtype) - refs[bins], zero)
  resid_part = jax.ops.segment_sum(resid, bins, config.num_bins)
  nll_part = _grouped_sum(jnp.where(valid, nll.astype(acc_dtype), zero), config.groups)

  # Brier score and temperature statistics (`xentjax.calibration`).
  y_prob = y if config.soft else jax.nn.one_hot(target, num_classes, dtype=dtype)
  brier, temp = calibration._streaming_terms(z, y_prob, valid & in_range, log_t)
  brier_part = _grouped_sum(brier.astype(acc_dtype), config.groups)
  temp = temp.astype(acc_dtype)

  int_dtype = acc["top_k"].dtype
  return {
    "brier": _acc_add(acc["brier"], brier_part),
    "temp": _acc_add(acc["temp"], (temp, jnp.zeros_like(temp))),
    "nll": _acc_add(acc["nll"], nll_part),
    "resid": _acc_add(acc["resid"], (resid_part, jnp.zeros_like(resid_part))),
    "top_k": acc["top_k"] + jnp.sum(hit_k, dtype=int_dtype),
    "bin_count": acc["bin_count"]
    + jax.ops.segment_sum(valid.astype(int_dtype), bins, config.num_bins),
    "bin_correct": acc["bin_correct"]
    + jax.ops.segment_sum(correct.astype(int_dtype), bins, config.num_bins),
  }


# ---------------------------------------------------------------------------
# Host side: batches, padding, prefetching.


class _Prepared(NamedTuple):
  x: Any
  labels: Any
  mask: Any
  num_real: Any
  rows: int  # real rows along the batch axis (for the progress bar)
  soft: bool


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
  return rows.pop()


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
  return np.pad(np.asarray(a), widths, mode=mode)


def _split(batch) -> tuple[Any, Any, Any]:
  if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
    raise TypeError(
      "each batch must be a (logits, labels) or (logits, labels, mask) tuple (with `model`: "
      f"(inputs, labels[, mask])), got {type(batch).__name__}."
    )
  x, labels = batch[0], batch[1]
  mask = batch[2] if len(batch) == 3 else None
  return x, labels, mask


def _prepare(batches: Iterable, *, model, mesh: Mesh) -> Iterator[_Prepared]:
  """Yield padded, device-placed pieces of fixed batch size (the first batch's)."""
  groups = mesh.devices.size
  rows_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  size = None
  real_rows: dict[int, jax.Array] = {}
  for batch in batches:
    if len(real_rows) > 64:
      real_rows.clear()
    x, labels, mask = _split(batch)
    x = jax.tree_util.tree_map(_as_array, x)
    labels = _as_array(labels)
    mask = None if mask is None else _as_array(mask)
    if model is None:
      _validation.check_floating("logits", x)
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
    if rows == 0:
      continue
    if size is None:  # the first batch fixes the compiled size
      size = -(-rows // groups) * groups
    for start in range(0, rows, size):
      stop = min(start + size, rows)
      real = stop - start

      def piece(a, edge=False, start=start, stop=stop, size=size):
        a = a if (start == 0 and stop == a.shape[0]) else a[start:stop]
        return _pad_rows(a, size, edge)

      xp = jax.tree_util.tree_map(functools.partial(piece, edge=model is not None), x)
      lp = piece(labels)
      mp = None if mask is None else piece(mask)
      xd, ld, md = jax.device_put((xp, lp, mp), rows_sharding)  # one call, async
      if real not in real_rows:  # a device scalar per distinct count, reused
        real_rows[real] = jax.device_put(np.asarray(real, dtype=np.int32), replicated)
      yield _Prepared(x=xd, labels=ld, mask=md, num_real=real_rows[real], rows=real, soft=soft)


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
    except BaseException as e:  # noqa: BLE001 -- handed to the consuming thread
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
  """Python-number totals the device accumulators are folded into."""

  def __init__(self, num_bins: int):
    self.nll: list[float] = []
    self.resid: list[np.ndarray] = []
    self.top_k = 0
    self.bin_count = np.zeros(num_bins, dtype=np.int64)
    self.bin_correct = np.zeros(num_bins, dtype=np.int64)
    self.brier: list[float] = []
    # One (grid, [3, G] sums) pair per process: grids differ between processes.
    self.temp_grid: list[np.ndarray] = []
    self.temp: list[np.ndarray] = []

  def add(self, acc):
    acc = jax.device_get(acc)
    self.nll += [float(acc["nll"][0]), float(acc["nll"][1])]
    self.resid += [np.asarray(acc["resid"][0], np.float64), np.asarray(acc["resid"][1], np.float64)]
    self.top_k += int(acc["top_k"])
    self.bin_count += np.asarray(acc["bin_count"], np.int64)
    self.bin_correct += np.asarray(acc["bin_correct"], np.int64)
    self.brier += [float(acc["brier"][0]), float(acc["brier"][1])]
    part = np.asarray(acc["temp"][0], np.float64) + np.asarray(acc["temp"][1], np.float64)
    if not self.temp_grid:  # no batch yet (its grid is set by the first one)
      return
    if self.temp:
      self.temp[0] = self.temp[0] + part
    else:
      self.temp.append(part)


def _total(parts: list[float]) -> float:
  """Exact sum of (hi, lo) parts; a non-finite hi wins (its lo is then NaN)."""
  his = parts[0::2]
  if not all(math.isfinite(h) for h in his):
    return float(sum(his))  # inf, or NaN for NaN / inf - inf
  return math.fsum(parts)


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
  prefetch: int = 2,
  temperature: bool = False,
  across_processes: bool | None = None,
) -> EvaluationResult:
  r"""Exact dataset-level cross-entropy, accuracy and calibration, streamed.

  For the counted examples :math:`i \in V` (not padding, not masked, label
  not `ignore_index`), with logits :math:`z_i` and target :math:`y_i`,

  .. math::

    \ell_i = \operatorname{logsumexp}(z_i) - z_{i, y_i}, \qquad
    \mathrm{CE} = \frac{1}{|V|} \sum_{i \in V} \ell_i, \qquad
    \mathrm{ECE} = \frac{1}{|V|} \sum_{b=1}^{B}
      \Bigl| \sum_{i \in V_b} [\text{correct}_i] - \sum_{i \in V_b} p_i \Bigr|,

  where :math:`p_i = \max_c \operatorname{softmax}(z_i)_c` is the confidence
  and :math:`V_b` the examples whose confidence falls in the equal-width bin
  :math:`[(b-1)/B, b/B)` (the last bin includes 1). For soft labels
  :math:`\ell_i = -\sum_c y_{ic} \log \operatorname{softmax}(z_i)_c`.

  Each batch is padded to the size of the first one and masked, so the whole
  stream compiles one step per distinct batch shape (a larger batch is split
  into pieces of that size). Accumulators stay on the device; a background
  thread reads and transfers the next `prefetch` batches while the current
  one computes, and the loop never lets more than two steps queue up, so
  only a few batches are alive whatever the data set's size. With several
  local devices the batch axis is sharded over a 1-D mesh (``"data"``) and
  the accumulators are replicated.

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

  Args:
    batches: iterable of ``(logits, labels)`` or ``(logits, labels, mask)``
      tuples of NumPy or JAX arrays (memory maps are fine). `logits` is
      ``[batch, ..., num_classes]``; `labels` is integer ``[batch, ...]`` or
      floating soft labels ``[batch, ..., num_classes]``; `mask` is boolean
      ``[batch, ...]`` (True = counted). With `model`, each tuple is
      ``(inputs, labels[, mask])`` where `inputs` is an array or pytree of
      arrays with a leading batch axis.
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
    prefetch: batches prepared ahead in the background (0: no thread).
    temperature: also fit the temperature of temperature scaling in the same
      pass (see above; it evaluates the loss at 20 temperatures, so it costs
      about 20 times the work of the rest); False reports NaN.
    across_processes: combine the totals of every process of a
      `jax.distributed` job, so that each returns the global result (None:
      when `jax.process_count() > 1`). Every process must then call
      `evaluate` with the same options, each with its own batches (any
      number, none included); the call returns when the slowest process
      is done. An exception in one process is raised in every process (the
      others raise `xentjax.distributed.ProcessFailedError`), and different
      options raise `ValueError`, in every process. See
      `xentjax.distributed`.

  Returns:
    An `EvaluationResult` of Python numbers; `str()` of it is a table.

  Note:
    * A counted example with a NaN loss (an integer label outside
      ``[0, num_classes)`` other than `ignore_index`, or NaN logits) makes
      `cross_entropy`, `perplexity`, `bits_per_token`, the NLL sum,
      `accuracy`, `top_k_accuracy` and the ECE NaN (never a silent finite
      number); `count` still counts it. The command line checks labels
      eagerly instead. A target logit of -inf gives an infinite loss.
    * Ties count in the target's favour: an example is correct when no class
      scores strictly higher than its target, and a top-k hit when fewer
      than `k` classes do.
    * Soft labels: accuracy, top-k and the ECE use the argmax of the target
      distribution as the class; each example counts once whatever its
      target's total mass.
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
    >>> r.count, r.accuracy, r.top_k_accuracy  # row 2: only class 1 is above class 2
    (2, 0.5, 1.0)
    >>> round(r.cross_entropy, 4)  # (-log 0.7 - log 0.1) / 2
    1.3296
  """
  scale = _validation.log_base_scale(base)
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
    raise ValueError(f"`top_k` must be an integer >= 1, got {top_k!r}.")
  if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"`num_bins` must be an integer >= 1, got {num_bins!r}.")
  if ignore_index is not None and (
    isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer))
  ):
    raise TypeError(f"`ignore_index` must be an int or None, got {ignore_index!r}.")
  if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
    raise ValueError(f"`prefetch` must be an integer >= 0, got {prefetch!r}.")
  top_k, num_bins = int(top_k), int(num_bins)

  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("`devices` must name at least one device.")
  mesh = Mesh(np.asarray(devices), ("data",))
  replicated = NamedSharding(mesh, P())
  if model is not None:
    params = jax.device_put(params, replicated)

  def fresh():
    return jax.device_put(_zero_accumulators(num_bins, 20 if temperature else 0), replicated)

  host = _HostTotals(num_bins)
  across = jax.process_count() > 1 if across_processes is None else bool(across_processes)
  log_t, log_t_dev = None, None  # the temperature grid, set by the first batch
  failure = None
  acc = fresh()
  ignore_value = jax.device_put(np.asarray(0 if ignore_index is None else ignore_index), replicated)
  in_flight: collections.deque = collections.deque()
  rows_since_flush = 0
  prepared = _prepare(batches, model=model, mesh=mesh)
  source = _Prefetcher(prepared, prefetch) if prefetch > 0 else None
  bar = _progress_bar(_want_progress(progress), total)
  try:
    for item in source if source is not None else prepared:
      size = jax.tree_util.tree_leaves(item.x)[0].shape[0]
      if rows_since_flush + size * _rows_per_batch_row(item) > _FLUSH_ROWS:
        host.add(acc)  # rare: keeps int32 counters from overflowing
        acc, rows_since_flush = fresh(), 0
        in_flight.clear()
      config = _Config(top_k, num_bins, ignore_index is not None, mesh.devices.size, item.soft)
      if log_t is None:
        log_t = np.zeros((0,))  # no temperature fit: an empty grid costs nothing
        if temperature:
          log_t = _temperature_grid(item, params, ignore_value, model=model, config=config)
        log_t_dev = jax.device_put(np.asarray(log_t, dtype=float), replicated)
        host.temp_grid.append(log_t)
      acc = _step(
        acc,
        params,
        item.x,
        item.labels,
        item.mask,
        item.num_real,
        ignore_value,
        log_t_dev,
        model=model,
        config=config,
      )
      rows_since_flush += size * _rows_per_batch_row(item)
      in_flight.append(acc["top_k"])
      if len(in_flight) > _MAX_IN_FLIGHT:
        in_flight.popleft().block_until_ready()  # back-pressure, not a transfer
      bar.update(item.rows)
  except Exception as e:
    if not across:
      raise
    failure = e  # the other processes must hear of it before anyone raises
  finally:
    if source is not None:
      source.close()
    bar.close()
  if failure is None:
    host.add(acc)
  if across:
    # Every field of the totals is a partial sum: merged over the processes
    # field by field (`merge_sums`), so fields added later combine too.
    options = {"top_k": top_k, "num_bins": num_bins, "base": base, "ignore_index": ignore_index}
    host = _distributed.combine_evaluation(host, options=options, failure=failure)
  return _result(host, top_k=top_k, num_bins=num_bins, base=base, scale=scale)


@functools.partial(jax.jit, static_argnames=("model", "config"))
def _first_batch_temperature(params, x, labels, mask, num_real, ignore_index, *, model, config):
  """`calibration.fit_temperature` on the counted rows of one padded batch."""
  logits = x if model is None else model(params, x)
  z = logits.astype(_validation.compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
  row_shape = logits.shape[:-1]
  real = jnp.arange(row_shape[0]) < num_real
  valid = jnp.broadcast_to(real.reshape((row_shape[0],) + (1,) * (len(row_shape) - 1)), row_shape)
  if mask is not None:
    valid = valid & mask.astype(bool)
  valid = valid.reshape(-1)
  if config.soft:
    y = labels.astype(z.dtype).reshape(z.shape)
  else:
    y = labels.reshape(-1)
    if config.has_ignore_index:
      valid = valid & (y != ignore_index)
    valid = valid & (y >= 0) & (y < z.shape[-1])
    y = jnp.where(valid, y, 0).astype(jnp.int32)
  return calibration._fit_jit(z, y, valid, (1e-3, 1e3), 1e-7, 60)


def _temperature_grid(item, params, ignore_value, *, model, config) -> np.ndarray:
  """The log-temperature grid: around a fit on the first batch (each process its own)."""
  t0 = _first_batch_temperature(
    params, item.x, item.labels, item.mask, item.num_real, ignore_value, model=model, config=config
  )
  return calibration.temperature_grid(float(t0))


def _rows_per_batch_row(item: _Prepared) -> int:
  """Examples per leading-axis row (sequence positions, for [B, T, ...] labels)."""
  shape = item.labels.shape[:-1] if item.soft else item.labels.shape
  return int(np.prod(shape[1:], dtype=np.int64))


def _calibration_fields(host: _HostTotals, count: int, conf, nan_out: bool) -> dict:
  """Brier score, fitted temperature and the ECE's per-bin sums for the result."""
  fields = {
    "bin_count": tuple(int(c) for c in host.bin_count),
    "bin_confidence_sum": tuple(float(c) for c in conf),
    "bin_correct": tuple(float(c) for c in host.bin_correct),
  }
  if count == 0 or nan_out:
    return {**fields, "brier_score": math.nan, "temperature": math.nan}
  brier = _total(host.brier) / count
  if not host.temp or not all(len(g) for g in host.temp_grid):
    return {**fields, "brier_score": brier, "temperature": math.nan}
  stats = [
    calibration.TemperatureStats(grid, temp[0], temp[1], temp[2], count)
    for grid, temp in zip(host.temp_grid, host.temp, strict=True)
  ]
  t, _ = calibration.temperature_from_statistics(stats)
  return {**fields, "brier_score": brier, "temperature": t}


def _result(host: _HostTotals, *, top_k, num_bins, base, scale) -> EvaluationResult:
  count = int(host.bin_count.sum())  # every counted example lands in one bin
  nll_sum = _total(host.nll)
  nan = math.nan
  if count == 0:
    ce = acc = acc_k = ece = nan
    conf = np.zeros(num_bins)
  else:
    ce = nll_sum / count
    acc = int(host.bin_correct.sum()) / count
    acc_k = host.top_k / count
    refs = _bin_references(num_bins)
    conf = np.zeros(num_bins)
    for b in range(num_bins):
      parts = [float(part[b]) for part in host.resid]
      conf[b] = _total([float(host.bin_count[b] * refs[b]), 0.0] + parts)
    ece = math.fsum(abs(float(c) - float(s)) for c, s in zip(host.bin_correct, conf)) / count
  if math.isnan(nll_sum):  # out-of-range label or NaN logits: no silent finite numbers
    acc = acc_k = ece = nan
  perplexity = math.exp(ce) if ce < 709.0 or math.isnan(ce) else math.inf
  return EvaluationResult(
    count=int(count),
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
    **_calibration_fields(host, count, conf, math.isnan(nll_sum)),
  )
