"""The one softmax-statistics core: every cross-entropy path takes its numbers from here.

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

The dense paths (`xentjax.softmax_cross_entropy_with_integer_labels`,
`xentjax.cross_entropy_loss`, `xentjax.metrics`, `xentjax.evaluate`,
`xentjax.train`) compute them from a ``[..., K]`` array; the fused and
vocabulary-parallel paths compute the same statistics tile by tile. The loss
algebra on top of them (`cross_entropy_from_stats`), the validity rule
(`label_status`), the tie rule (`top_k_credit`) and the empty-mean rule
(`mean_or_nan`) are written once, here.

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
* **Non-finite rows.** A NaN logit makes every statistic of its row NaN (loss,
  credit, confidence). A row whose logits are all ``-inf`` has ``lse = -inf``:
  its loss is ``+inf``, all classes are tied (credit ``k/K``).
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
  index: jax.Array  # int32: the label where it is a class, else 0 (safe to gather)


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
    where: optional bool mask broadcastable to ``labels``: rows where it is
      False do not count.

  Returns:
    `LabelStatus` ``(counted, bad, index)``, each of the shape of ``labels``.
  """
  labels = jnp.asarray(labels)
  dt = labels.dtype
  counted = jnp.ones(labels.shape, bool)
  if ignore_index is not None and _in_range_of(int(ignore_index), dt):
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
  overflows.
  """
  eps = float(label_smoothing)
  loss = 0.0
  if eps < 1.0:
    loss = (1.0 - eps) * (log_s - zy)
  if eps > 0.0:
    loss = loss + eps * (log_s - zmean)
  if z_loss:
    loss = loss + _z_loss_term(m + log_s, z_loss)
  return loss


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
