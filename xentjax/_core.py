"""The softmax-statistics core: the integer-label cross-entropy paths take their numbers here.

Every quantity of the cross-entropy family that xentjax computes from logits
``z`` (``K`` classes on the last axis) and an integer label ``y`` is a function
of a few per-row statistics and of one validity rule:

==============  ==============================================================
``m``           the row maximum, a shift held under ``stop_gradient``
                (0 for a row with no finite maximum)
``log_s``       ``log sum_j exp(z_j - m)``, so ``lse = m + log_s``
``zy``          ``z_y - m``, the label's logit relative to the maximum
``zmean``       ``mean_j z_j - m`` (label smoothing)
``n_greater``   number of classes with ``z_j > z_y`` (accuracy, top-k)
``n_tied``      number of classes with ``z_j == z_y``, the label included
==============  ==============================================================

The dense paths (`xentjax.softmax_cross_entropy`,
`xentjax.softmax_cross_entropy_with_integer_labels`, `xentjax.poly_loss_cross_entropy`,
`xentjax.cross_entropy_loss`, `xentjax.metrics`, `xentjax.evaluate`,
`xentjax.train`, and the Brier score and ECE of `xentjax.calibration`)
compute them from a ``[..., K]`` array with the functions here; the fused
and vocabulary-parallel cross-entropy paths compute the same statistics tile
by tile and finish them here. The loss algebra on top of them
(`cross_entropy_from_stats`), the validity rule (`label_status`), the tie
rule (`top_k_credit`) and the empty-mean rule (`mean_or_nan`) are written
once, here.

Four paths compute their own log-normalizer, each for a reason of its own:
the focal loss (``xentjax.losses._focal``: ``log1p`` of the non-maximal terms, for
an exact ``1 - p`` of a confident class), the temperature fit
(``xentjax.calibration``: the loss of ``z / T`` and its derivatives in
``log T``, in the same ``log1p`` form), `xentjax.info.kl_divergence_from_logits`
(a softmax over any tuple of axes with masked classes), and the distillation
sweep (``xentjax._vocab.kernels.distillation``: the running normalizers of teacher and student
together). They follow the same conventions (shift by a gradient-free row
maximum, ``0 * log 0 = 0``, ``-inf`` rows), tested against float64 in their
own tests.

Conventions decided here (the README's conventions table says the same):

* **Validity.** A row counts unless its label equals ``ignore_index`` or its
  ``where`` entry is False. A row that counts with a label outside
  ``[0, K)`` is *bad*: its loss and gradient are NaN, never a silent finite
  number. Comparisons happen in the labels' own integer type without
  wraparound (``-100`` is never equal to a ``uint8``/``uint16`` label, and a
  64-bit label ``2**32 + 1`` is out of range, not class 1).
* **Ties.** Accuracy and top-k accuracy give fractional credit: with ``g``
  classes strictly above the label and ``t`` classes tied with it (the label
  included), the top-k credit is ``clip((k - g) / t, 0, 1)``, the expected
  hit under a uniformly random tie break. A constant model scores exactly
  ``k/K``, a tie is never a full hit, and without ties the credit is the
  ordinary 0/1 hit. Functions that return an index (``argmax``) break ties
  toward the lowest index, as NumPy and PyTorch do.
* **Nothing counted.** The mean over no counted rows is NaN (there is no
  data), with a zero gradient; ``reduction="sum"`` of nothing is 0.
* **Non-finite rows.** A NaN logit (or ``+inf`` at the label: `nan_row`)
  makes every statistic of its row NaN (loss, credit, confidence). A row
  whose logits are all ``-inf`` has ``lse = -inf``: its loss is ``+inf``
  with a zero gradient, all classes are tied (credit ``k/K``, confidence
  ``1/K``).
* **No 0 * inf.** A term whose weight is 0 is left out, never multiplied
  (`xent`, `target_dot`); rows that do not count are replaced by zeros
  before anything is computed (`neutral_rows`), so whatever they hold
  reaches neither the value nor the gradient.

Reading order for a newcomer: `label_status` (which rows count), `row_stats`
(the statistics), `cross_entropy_from_stats`/`xent` (the loss from them),
`top_k_credit` and `row_metrics` (what `xentjax.metrics` averages and
`xentjax.evaluate` sums), `brier_from_stats` and `probabilities` (what
`xentjax.calibration` scores), `mean_or_nan` (the reduction).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


class LabelStatus(NamedTuple):
  """Validity of integer labels: see `label_status`."""

  counted: jax.Array  # bool: the row counts (not ignored, not masked out)
  bad: jax.Array  # bool: counted but the label is not a class (-> NaN)
  # int32: the label where it is a class, else 0 (safe to gather). The field's name hides
  # `tuple.index`, which nothing calls on this type.
  index: jax.Array  # type: ignore[assignment]


def _in_range_of(value: int, dtype) -> bool:
  info = np.iinfo(dtype)
  return info.min <= value <= info.max


def label_status(labels, num_classes: int, *, ignore_index=None, where=None) -> LabelStatus:
  """Which rows count, which are bad, and a gather-safe int32 index.

  Args:
    labels: integer labels ``[...]`` of any signed or unsigned integer dtype.
    num_classes: the number of classes ``K`` (a Python int).
    ignore_index: a Python int (or None): rows with this label do not count.
      A value the labels' dtype cannot hold matches no row (no wraparound).
      A 0-d array (a traced value, to share one compiled program between
      values) must already hold a value of the labels' dtype: the caller
      checks that it fits.
    where: optional bool mask broadcastable to ``labels``: rows where it is
      False do not count.

  Returns:
    `LabelStatus` ``(counted, bad, index)``, each of the shape of ``labels``.
  """
  labels = jnp.asarray(labels)
  dt = labels.dtype
  counted = jnp.ones(labels.shape, bool)
  if isinstance(ignore_index, (jax.Array, np.ndarray)):
    counted = labels != ignore_index.astype(dt)
  elif ignore_index is not None and _in_range_of(int(ignore_index), dt):
    counted = labels != jnp.asarray(ignore_index, dt)
  if where is not None:
    counted = counted & jnp.broadcast_to(jnp.asarray(where, bool), labels.shape)
  in_range = jnp.ones(labels.shape, bool)
  if np.iinfo(dt).min < 0:
    in_range = labels >= 0
  if _in_range_of(int(num_classes), dt):
    in_range = in_range & (labels < jnp.asarray(num_classes, dt))
  bad = counted & ~in_range
  index = jnp.where(in_range, labels, jnp.zeros((), dt)).astype(jnp.int32)
  return LabelStatus(counted, bad, index)


def top_k_credit(n_greater, n_tied, k: int):
  """Fractional top-k credit ``clip((k - n_greater) / n_tied, 0, 1)``.

  ``n_greater`` counts the classes strictly above the label, ``n_tied`` the
  classes equal to it (label included, so ``n_tied >= 1`` for a finite row).
  Both may be float arrays (NaN propagates). The expected top-k hit when ties
  are broken uniformly at random.
  """
  n_greater = jnp.asarray(n_greater)
  n_tied = jnp.asarray(n_tied)
  dt = jnp.result_type(n_greater.dtype, n_tied.dtype, jnp.float32)
  g = n_greater.astype(dt)
  t = jnp.maximum(n_tied.astype(dt), 1.0)
  return jnp.clip((k - g) / t, 0.0, 1.0)


def mean_or_nan(total, count):
  """``total / count``, NaN when ``count == 0``, with a zero gradient there.

  The division is guarded on both sides of the `where`, so the untaken branch
  puts no NaN or inf into the gradient.
  """
  total = jnp.asarray(total)
  count = jnp.asarray(count, total.dtype)
  empty = count == 0
  safe = jnp.where(empty, 1.0, count)
  return jnp.where(empty, jnp.nan, total / safe)


def xent(log_s, mass, dot):
  r"""``mass * log_s - dot``: a cross-entropy from shifted statistics, edge cases decided.

  For a target ``t`` over the classes, ``-sum_c t_c log softmax(z)_c =
  mass * log_s - dot`` with ``mass = sum_c t_c`` and ``dot = sum_c t_c (z_c -
  m)`` (`target_dot`). A row with ``log_s == -inf`` (no class has
  probability: every logit ``-inf`` or masked) gives ``+inf`` with a zero
  gradient when ``mass > 0`` and 0 when ``mass == 0``. NaN stays NaN.
  """
  log_s = jnp.asarray(log_s)
  mass = jnp.asarray(mass, log_s.dtype)
  empty = log_s == -jnp.inf
  loss = mass * jnp.where(empty, 0.0, log_s) - dot
  return jnp.where(empty & (mass != 0), jnp.inf, loss)


def cross_entropy_from_stats(
  log_s, zy, zmean=None, m=None, *, label_smoothing: float = 0.0, z_loss: float = 0.0
):
  r"""Per-row cross-entropy from the core statistics.

  .. math::
    \ell = (1-\varepsilon)(\log s - z_y) + \varepsilon(\log s - \bar z)
      + \lambda\,(m + \log s)^2,

  with ``zy = z_y - m`` and ``zmean = \bar z - m`` (shifted by the row
  maximum, so the differences are taken between numbers of the size of the
  loss, not of the logits), :math:`\varepsilon` = ``label_smoothing``,
  :math:`\lambda` = ``z_loss``. A term whose coefficient is 0 is left out
  (so ``label_smoothing=1`` never forms ``0 * inf``), and the z-loss gradient
  is formed as ``(2 lambda) * lse`` so it stays finite where ``lse**2``
  overflows. A row with ``log_s = -inf`` (every logit ``-inf``) gives
  ``+inf`` with a zero gradient (`xent`).
  """
  eps = float(label_smoothing)
  loss = 0.0
  if eps < 1.0:
    loss = (1.0 - eps) * xent(log_s, 1.0, zy)
  if eps > 0.0:
    loss = loss + eps * xent(log_s, 1.0, zmean)
  if z_loss:
    loss = loss + z_loss_term(m, log_s, z_loss)
  return loss


def z_loss_term(m, log_s, lam: float):
  """``lam * lse**2`` with ``lse = m + log_s``; its gradient ``(2 lam) lse`` stays finite.

  A row with ``log_s = -inf`` (nothing to normalize) adds 0: such a row has
  no normalizer to push towards 0.
  """
  empty = log_s == -jnp.inf
  lse = m + jnp.where(empty, 0.0, log_s)
  return jnp.where(empty, 0.0, _z_loss_term(lse, float(lam)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _z_loss_term(lse, lam: float):
  return lam * jnp.square(lse)


@_z_loss_term.defjvp
def _z_loss_term_jvp(lam, primals, tangents):
  (lse,), (d_lse,) = primals, tangents
  return _z_loss_term(lse, lam), (2.0 * lam) * lse * d_lse


def shift(m):
  """The row max as a finite, gradient-free shift (0 where it is not finite)."""
  return lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))


# ---------------------------------------------------------------------------
# The dense row statistics ([..., K] logits in memory).
# ---------------------------------------------------------------------------


class RowStats(NamedTuple):
  r"""Per-row softmax statistics of ``[..., K]`` logits: see the module docstring.

  ``zmean`` is None unless asked for (``mean=True``); ``n_greater`` and
  ``n_tied`` are None unless asked for (``rank=True``) and are floating
  counts, NaN in a row with a NaN logit; ``s_other`` and ``sq_other``
  (``brier=True``) are :math:`\sum_{j \ne y} e^{z_j - m}` and
  :math:`\sum_{j \ne y} e^{2(z_j - m)}`, the other classes' probability
  mass and squared probabilities times :math:`s` and :math:`s^2`.
  """

  m: jax.Array
  log_s: jax.Array
  zy: jax.Array
  zmean: jax.Array | None = None
  n_greater: jax.Array | None = None
  n_tied: jax.Array | None = None
  s_other: jax.Array | None = None
  sq_other: jax.Array | None = None


def shifted_logits(z, mask=None):
  """``(z - m, m)`` over the last axis; masked classes become ``-inf``.

  ``m`` (``[..., 1]``) is the row maximum over the unmasked classes as a
  finite, gradient-free shift (`shift`).
  """
  if mask is not None:
    z = jnp.where(mask, z, -jnp.inf)
  m = row_shift(z, keepdims=True)
  return z - m, m


def row_shift(z, keepdims: bool = False):
  """`shift` of the row maximum over the last axis of ``z`` (``-inf`` for an empty row)."""
  return shift(jnp.max(z, axis=-1, keepdims=keepdims, initial=-jnp.inf))


def log_sum_exp_shifted(shifted):
  """``log sum exp(shifted)`` over the last axis; ``-inf`` where the sum is 0.

  The log is guarded on both sides of a `where`, so an empty row (every
  entry ``-inf``) puts no NaN into the gradient. A NaN entry gives NaN.
  """
  s = jnp.sum(jnp.exp(shifted), axis=-1)
  empty = s == 0
  return jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, s)))


def target_dot(shifted, t):
  """``sum_c t_c * shifted_c`` over the last axis with ``0 * (-inf) = 0``.

  A class with no target mass and a non-finite logit adds nothing, and its
  logit gets a zero gradient (finite logits keep their gradient with respect
  to ``t``).
  """
  drop = (t == 0) & ~jnp.isfinite(shifted)
  return jnp.sum(t * jnp.where(drop, 0.0, shifted), axis=-1)


def mean_shifted(z, shifted, m, mask):
  """``mean_j z_j - m`` over the unmasked classes, without overflow.

  The mean of the shifted logits is exact in the usual range; where it
  overflows (logits near the float maximum, ``z_j - m`` beyond it) the
  mean is taken as ``sum_j (z_j / K) - m``, whose terms cannot overflow.
  """
  if mask is None:
    k = jnp.asarray(z.shape[-1], z.dtype)
    direct = jnp.sum(shifted, axis=-1) / k
    fallback = jnp.sum(z / k, axis=-1) - m[..., 0]
  else:
    k = jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(z.dtype)
    direct = jnp.sum(jnp.where(mask, shifted, 0.0), axis=-1) / k
    fallback = jnp.sum(jnp.where(mask, z / k[..., None], 0.0), axis=-1) - m[..., 0]
  overflow = jnp.isinf(direct) & jnp.isfinite(fallback)
  return jnp.where(overflow, fallback, direct)


def nan_row(log_s, zy):
  """Rows whose cross-entropy is NaN: a NaN logit, or ``+inf`` at the label.

  Such a row is NaN in every metric (rank, credit, confidence), not only in
  its loss. A row whose logits are all ``-inf`` is not one (its loss is
  ``+inf``).
  """
  return jnp.isnan(log_s - zy) & (log_s != -jnp.inf)


def _rank(z, z_label, nan):
  """Classes strictly above the label and tied with it (label included), as floats.

  `_rank_counts`, with a NaN row (``nan``) NaN in both.
  """
  return tuple(jnp.where(nan, jnp.nan, v) for v in _rank_counts(z, z_label))


def _rank_counts(z, z_label):
  """Classes strictly above the label and tied with it (label included), in ``z``'s dtype.

  Compared in the logits' own values (``z`` with masked classes at ``-inf``,
  ``z_label`` ``[..., 1]``), not after the shift: subtracting the row
  maximum can round two different logits to one value and invent a tie.
  Both counts come from one sum, ``(K + 1) * above + tied``: one pass over
  the row instead of two (`_rank_code`, `_rank_decode`), else two sums.
  """
  k = z.shape[-1]
  dt = _rank_code_dtype(k, z.dtype)
  if dt is not None:
    return _rank_decode(jnp.sum(_rank_code(z, z_label, k, dt), -1), k, z.dtype)
  above, tied = jnp.sum(z > z_label, axis=-1), jnp.sum(z == z_label, axis=-1)
  return above.astype(z.dtype), tied.astype(z.dtype)


def _rank_code_dtype(k: int, dtype):
  """The dtype that sums `_rank_code` over ``k`` classes exactly, or None.

  The logits' floating dtype when every partial sum is an integer it holds
  exactly (``(K + 1)^2`` below ``2^24`` in float32: XLA's float reductions
  are several times faster than its integer ones on the CPU), else int32
  while that fits (K < 46340).
  """
  if (k + 1) ** 2 < 2 ** (jnp.finfo(dtype).nmant + 1):
    return dtype
  return jnp.int32 if (k + 1) ** 2 < 2**31 else None


def _rank_code(z, z_label, k: int, dtype):
  """Per class of a row of ``k``: ``K + 1`` above the label's logit, 1 tied with it, else 0."""
  return jnp.where(z > z_label, jnp.asarray(k + 1, dtype), (z == z_label).astype(dtype))


def _rank_decode(code, k: int, dtype):
  """``(above, tied)`` in ``dtype`` from the summed `_rank_code` of a row of ``k``."""
  code = code.astype(jnp.int32)
  return (code // (k + 1)).astype(dtype), (code % (k + 1)).astype(dtype)


def row_stats(
  z, index, mask=None, *, mean: bool = False, rank: bool = False, brier: bool = False
) -> RowStats:
  """The core statistics of ``[..., K]`` logits and gather-safe labels, in one pass.

  Args:
    z: floating logits ``[..., K]`` (already in the compute dtype).
    index: int32 labels ``[...]`` in ``[0, K)`` (`LabelStatus.index`). The
      label's logit is read even where ``mask`` excludes its class (optax).
    mask: optional bool ``[..., K]``: excluded classes leave the
      normalizer, the mean and the rank.
    mean: also compute ``zmean`` (label smoothing).
    rank: also compute ``n_greater``/``n_tied`` (accuracy, top-k).
    brier: also compute ``s_other``/``sq_other`` (the Brier score, `brier_from_stats`).

  Returns:
    `RowStats` with ``[...]``-shaped fields.
  """
  shifted, m = shifted_logits(z, mask)
  log_s = log_sum_exp_shifted(shifted)
  z_label = jnp.take_along_axis(z, index[..., None], axis=-1)
  zy = z_label[..., 0] - m[..., 0]
  zmean = mean_shifted(z, shifted, m, mask) if mean else None
  n_greater = n_tied = None
  if rank:
    ranked = z if mask is None else jnp.where(mask, z, -jnp.inf)
    n_greater, n_tied = _rank(ranked, z_label, nan_row(log_s, zy))
  s_other = sq_other = None
  if brier:
    label = lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == index[..., None]
    other = jnp.where(label, 0.0, jnp.exp(shifted))
    s_other, sq_other = jnp.sum(other, axis=-1), jnp.sum(jnp.square(other), axis=-1)
  return RowStats(m[..., 0], log_s, zy, zmean, n_greater, n_tied, s_other, sq_other)


def probabilities(z):
  """``softmax(z)`` over the last axis; a row whose logits are all ``-inf`` is uniform.

  Such a row has every class tied (as in `confidence` and the tie credit),
  so its distribution is ``1/K`` per class, never NaN. A NaN row is NaN.
  """
  empty = jnp.all(z == -jnp.inf, axis=-1, keepdims=True)
  uniform = jnp.asarray(1.0 / z.shape[-1], z.dtype)
  return jnp.where(empty, uniform, jax.nn.softmax(jnp.where(empty, 0.0, z), axis=-1))


def brier_from_stats(log_s, s_other, sq_other, num_classes):
  r"""The Brier score of a row, :math:`\sum_j (p_j - [j = y])^2`, from `row_stats`.

  Written as :math:`(1 - p_y)^2 + \sum_{j \ne y} p_j^2
  = (s_{\ne y}^2 + \sum_{j \ne y} e^{2(z_j - m)}) / s^2` with
  :math:`1 - p_y = s_{\ne y} / s` summed over the other classes: no term is
  a difference of numbers near 1, so a confident row keeps its relative
  precision (``1 - softmax(z)[y]``, or :math:`\sum_j p_j^2 - 2 p_y + 1`,
  has an absolute error of about 1e-7 in float32). A row whose logits are
  all ``-inf`` has every class tied (as for `confidence`): the uniform
  distribution's score :math:`1 - 1/K`. A NaN row is NaN.
  """
  empty = log_s == -jnp.inf
  score = (jnp.square(s_other) + sq_other) * jnp.exp(-2.0 * jnp.where(empty, 0.0, log_s))
  return jnp.where(empty, 1.0 - 1.0 / jnp.asarray(num_classes, score.dtype), score)


def confidence(log_s, num_classes):
  """The top softmax probability ``exp(-log_s)`` (calibration).

  A row with ``log_s = -inf`` (every logit ``-inf``: all classes tied) has
  confidence ``1/K``, matching its tie credit; NaN stays NaN.
  """
  empty = log_s == -jnp.inf
  uniform = 1.0 / jnp.asarray(num_classes, log_s.dtype)
  return jnp.where(empty, uniform, jnp.exp(-jnp.where(empty, 0.0, log_s)))


class RowMetrics(NamedTuple):
  """Per-row classification numbers: what `xentjax.metrics` averages and `evaluate` sums."""

  nll: jax.Array  # cross-entropy of the label (NaN for a bad label or a NaN row)
  credit: jax.Array  # top-1 credit (`top_k_credit` with k = 1)
  credit_k: jax.Array  # top-k credit
  confidence: jax.Array  # top softmax probability
  counted: jax.Array  # bool: the row counts; the fields above are 0 where it does not
  brier: jax.Array | None = None  # Brier score against the label (when asked for)


def row_metrics(z, status: LabelStatus, top_k: int, nll=None, *, brier=False) -> RowMetrics:
  """Loss, top-1/top-k credit and confidence of each row, from one `row_stats` pass.

  ``z`` ``[..., K]`` logits, ``status`` from `label_status`. Rows that do
  not count are neutralized first (`neutral_rows`) and reported as 0; a bad
  label, or a NaN row (`nan_row`), is NaN in every field. ``nll``, when
  given, replaces the integer-label loss (soft labels); it must already be
  computed from neutralized rows. ``brier=True`` adds the Brier score
  (`brier_from_stats`) of the label.
  """
  z = neutral_rows(z, status.counted)
  st = row_stats(z, status.index, rank=True, brier=brier)
  k = min(int(top_k), z.shape[-1])
  credits = (top_k_credit(st.n_greater, st.n_tied, 1), top_k_credit(st.n_greater, st.n_tied, k))
  b = brier_from_stats(st.log_s, st.s_other, st.sq_other, z.shape[-1]) if brier else None
  return metrics_from_stats(status, st.log_s, st.zy, credits, z.shape[-1], nll=nll, brier=b)


class ForwardStats(NamedTuple):
  """What `forward_row_stats` reads off each row of ``[..., K]`` logits (each ``[...]``).

  ``m`` the row's `shift`, ``z_label`` the label's logit as it is in ``z``,
  ``s_other`` and ``sq_other`` the sums of :math:`e^{z_j - m}` and
  :math:`e^{2 (z_j - m)}` over the other classes, ``above`` and ``tied``
  the classes strictly above the label's logit and equal to it (label
  included), in ``z``'s dtype.
  """

  m: jax.Array
  z_label: jax.Array
  s_other: jax.Array
  sq_other: jax.Array
  above: jax.Array
  tied: jax.Array


def forward_row_metrics(z, status: LabelStatus, top_k: int) -> RowMetrics:
  r"""`row_metrics` with the Brier score, forward only, in fewer passes over ``z``.

  The same numbers as ``row_metrics(z, status, top_k, brier=True)`` for
  every row that counts (the rows that do not are 0 in both), computed as
  streaming evaluation needs them: no gradient, so the rows that do not
  count are not neutralized first (`metrics_from_stats` zeroes them, and a
  `where` drops whatever they hold), and the normalizer comes from the
  other classes' sum, which the Brier score needs anyway:

  .. math::

    s = s_{\ne y} + e^{z_y - m}, \qquad
    s_{\ne y} = \sum_{j \ne y} e^{z_j - m}, \qquad
    q_{\ne y} = \sum_{j \ne y} e^{2 (z_j - m)},

  a sum of non-negative terms (no cancellation). The passes over ``[n, K]``
  (`forward_row_stats`): the row maximum, one exponential of the
  label-excluded logits summed twice, and the rank count (`_rank_counts`),
  against the dense path's extra copy of the neutralized logits and second
  exponential for the normalizer. The rest is per row
  (`forward_metrics_from_stats`). ``log s`` may differ from `row_stats`' in
  the last bit (another summation order).

  Args:
    z: floating logits ``[..., K]`` in the compute dtype.
    status: the rows' `LabelStatus` (`label_status`), integer labels.
    top_k: the ``k`` of the top-k credit (capped at ``K``).

  Returns:
    `RowMetrics` with ``brier`` set.
  """
  stats = forward_row_stats(z, status.index)
  return forward_metrics_from_stats(stats, status, top_k, z.shape[-1])


def forward_row_stats(z, index, m=None) -> ForwardStats:
  """The passes of `forward_row_metrics` over the logits ``[..., K]``: `ForwardStats`.

  ``index`` is `LabelStatus.index` (gather-safe int32 labels ``[...]``).
  Every output is per row, so a caller that splits a batch into chunks to
  keep each pass in the cache (streaming evaluation) runs only this per
  chunk, the row maximum included, and the rest once on whole rows.
  ``m``: the rows' shift ``[...]`` (``shift`` of the row maximum) where the
  caller took it already, over a whole batch; the statistics are the same
  bit for bit.
  """
  m = row_shift(z, keepdims=True) if m is None else m[..., None]
  z_label = jnp.take_along_axis(z, index[..., None], axis=-1)
  label = lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == index[..., None]
  other = jnp.where(label, 0.0, jnp.exp(z - m))
  s_other, sq_other = jnp.sum(other, axis=-1), jnp.sum(jnp.square(other), axis=-1)
  above, tied = _rank_counts(z, z_label)
  return ForwardStats(m[..., 0], z_label[..., 0], s_other, sq_other, above, tied)


def forward_row_stats_folded(z, index, width: int = 16) -> ForwardStats:
  """`forward_row_stats` for short rows, in fewer bytes: ``[n, K]`` logits, ``K % width == 0``.

  The row maximum is one reduction over ``z``. Each other pass (the masked
  exponentials :math:`e^{z_j - m}`, their squares as :math:`e^{2 (z_j - m)}`,
  the rank code) adds the row's ``K / width`` column blocks elementwise into
  ``[n, width]`` as it reads ``z``, and only that is written out and summed.
  On XLA's CPU backend the unfolded passes write ``[n, K]`` arrays (a
  reduction cannot take the label's mask in its own kernel); for ``K = 64``
  this writes a quarter of the bytes. The sums are the same quantities in
  another order (float32 rounding); the rank counts are exact as before.
  """
  k = z.shape[-1]
  if z.ndim != 2 or k % width:
    raise ValueError(f"`z` must be [n, K] with K a multiple of {width}, got shape {z.shape}.")
  code_dtype = _rank_code_dtype(k, z.dtype)
  if code_dtype is None:
    raise ValueError(f"{k} classes are too many for one rank code; use `forward_row_stats`.")
  m = row_shift(z)[:, None]
  z_label = jnp.take_along_axis(z, index[:, None], axis=-1)
  # Always true (``index`` is gather-safe): a select after the blocks' sum
  # keeps that sum in XLA's elementwise kernel instead of a reduction's.
  keep = (index >= 0)[:, None]

  def fold(term):
    total = None
    for j in range(0, k, width):
      block = z[:, j : j + width]
      label = lax.broadcasted_iota(jnp.int32, block.shape, 1) + j == index[:, None]
      v = term(block, label)
      total = v if total is None else total + v
    return jnp.sum(jnp.where(keep, total, jnp.zeros((), total.dtype)), axis=-1)

  s_other = fold(lambda b, label: jnp.where(label, 0.0, jnp.exp(b - m)))
  sq_other = fold(lambda b, label: jnp.where(label, 0.0, jnp.exp(2.0 * (b - m))))
  code = fold(lambda b, label: _rank_code(b, z_label, k, code_dtype))
  above, tied = _rank_decode(code, k, z.dtype)
  return ForwardStats(m[:, 0], z_label[:, 0], s_other, sq_other, above, tied)


def forward_metrics_from_stats(
  stats: ForwardStats, status: LabelStatus, top_k: int, num_classes: int
) -> RowMetrics:
  """`forward_row_metrics` from its `ForwardStats`: per-row arithmetic only."""
  zy = stats.z_label - stats.m
  s = stats.s_other + jnp.exp(zy)
  empty = s == 0  # every logit -inf (or excluded): as `log_sum_exp_shifted`
  log_s = jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, s)))
  nan = nan_row(log_s, zy)
  n_greater, n_tied = (jnp.where(nan, jnp.nan, v) for v in (stats.above, stats.tied))
  k = min(int(top_k), num_classes)
  credits = (top_k_credit(n_greater, n_tied, 1), top_k_credit(n_greater, n_tied, k))
  # An empty row's score is decided in `brier_from_stats`; zeroing its sums
  # here also keeps XLA from fusing the sums' reductions with the row math.
  s_other, sq_other = (jnp.where(empty, 0.0, v) for v in (stats.s_other, stats.sq_other))
  b = brier_from_stats(log_s, s_other, sq_other, num_classes)
  return metrics_from_stats(status, log_s, zy, credits, num_classes, brier=b)


def metrics_from_stats(
  status: LabelStatus, log_s, zy, credits, num_classes: int, *, nll=None, brier=None
) -> RowMetrics:
  """`RowMetrics` from the row statistics, wherever they were computed.

  ``log_s`` and ``zy`` as in `row_stats`; ``credits`` the top-1 and top-k
  credit; ``brier`` optional. The dense rows (`row_metrics`) and the fused
  engine's (`xentjax.evaluate` from hidden states) finish here alike: a bad
  label or a NaN row is NaN in every field, a row that does not count is 0.
  """
  own = cross_entropy_from_stats(log_s, zy)
  nll = own if nll is None else nll
  conf = jnp.where(nan_row(log_s, zy), jnp.nan, confidence(log_s, num_classes))
  fields: tuple[jax.Array, ...] = (nll, *credits, conf) + (() if brier is None else (brier,))
  dt = log_s.dtype

  def finish(v):
    v = jnp.where(status.bad, jnp.nan, v.astype(dt))
    return jnp.where(status.counted, v, jnp.zeros((), dt))

  nll, credit, credit_k, conf, *rest = (finish(v) for v in fields)
  return RowMetrics(nll, credit, credit_k, conf, status.counted, *rest)


def neutral_rows(z, counted):
  """Logits with uncounted rows replaced by zeros (the double-`where` rule).

  An uncounted row may hold anything (``-inf``, NaN, padding); zeroing it
  before the statistics keeps its value and its gradient exactly 0 in every
  later step, so no ``0 * inf`` can reach the gradient of the counted rows.
  """
  return jnp.where(counted[..., None], z, jnp.zeros((), z.dtype))
