"""The option checks the entry points of the vocabulary family share.

Each entry point calls these before tracing, so every one refuses the same
values the same way: a bool or a string where a number goes is a
`TypeError`, a number out of range a `ValueError`, and the message names the
argument (`xentjax._validation.real_option`). Arrays are checked for dtype and
shape, with the shapes in the message.

The options only one family takes are checked in that family's module, in the
same manner: the contrastive losses (`contrastive.py`: the scale, `k`, the
pairing of the two embeddings and their labels) and the distillation losses
(`distillation.py`: the teacher's head, the divergence and its `beta`,
`hard_weight`, a saved top-k teacher).

``temperature`` is the one numeric option that may also be an array (it is
an operand of the sweep, so a traced value does not recompile): a Python
number is checked now; an array is used as it is, and a value that is not a
finite number > 0 gives NaN (the library's rule for invalid traced values).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from xentjax import _validation as V
from xentjax._api import where_mask

STRATEGIES = ("recompute", "store")
# The compile-time options every entry point shares (`xentjax._api.public`'s
# ``static``): how `w` is laid out, tiled and placed.
HEAD_OPTIONS = (
  "w_layout",
  "vocab_size",
  "token_chunk_size",
  "vocab_chunk_size",
  "precision",
  "mesh",
  "data_axis",
  "vocab_axis",
)
# The compile-time options of the cross-entropy and of the token statistics
# (their single-device and `xentjax.parallel` versions alike).
CROSS_ENTROPY_OPTIONS = (
  "reduction",
  "ignore_index",
  "label_smoothing",
  "z_loss",
  "logit_soft_cap",
  "filter_eps",
  "return_lse",
  "return_stats",
  "strategy",
  *HEAD_OPTIONS,
)
TOKEN_STATS_OPTIONS = ("top_k", "ignore_index", "logit_soft_cap", *HEAD_OPTIONS)
SEQUENCE_OPTIONS = ("num_segments", "ignore_index", "logit_soft_cap", *HEAD_OPTIONS)


def check_head(x_name, x, w_name, w, layout_name, layout):
  """`(x, w, vd, n_cols)`: hidden states `[..., D]` and their output head, as arrays.

  The errors name the arguments (`x`, `w`, `w_layout` of every entry point; the
  distillation losses check their teacher's head under its own names).
  """
  V.check_floating(x_name, x, "a floating-point array of hidden states [..., D]")
  V.check_floating(w_name, w, "a floating-point matrix (an output head)")
  if layout not in ("dv", "vd"):
    raise ValueError(
      f'`{layout_name}` must be "dv" ({w_name} is [D, V]) or "vd" ({w_name} is [V, D], a '
      f"tied embedding table), got {layout!r}."
    )
  x, w = jnp.asarray(x), jnp.asarray(w)
  vd = layout == "vd"
  if x.ndim < 1 or w.ndim != 2:
    raise ValueError(
      f"`{x_name}` must be [..., D] and `{w_name}` a matrix ([D, V], or [V, D] with "
      f'{layout_name}="vd"), got {x_name}.shape={x.shape} and {w_name}.shape={w.shape}.'
    )
  d = x.shape[-1]
  w_d, n_cols = (w.shape[1], w.shape[0]) if vd else w.shape
  if w_d != d:
    hint = (
      f' ({w_name} looks like a [V, D] embedding table: pass {layout_name}="vd")'
      if not vd and w.shape[1] == d
      else f' ({w_name} looks like [D, V]: pass {layout_name}="dv")'
      if vd and w.shape[0] == d
      else ""
    )
    raise ValueError(
      f"The hidden size of `{x_name}` and `{w_name}` must agree: {x_name}.shape={x.shape} has "
      f"D={d} but {w_name}.shape={w.shape} with {layout_name}={layout!r} has D={w_d}{hint}."
    )
  return x, w, vd, n_cols


LABELS_HINT = (
  " Class indices stored as floats: cast them to an integer type first "
  "(labels.astype(jnp.int32)). A soft target (a teacher's distribution over the "
  "vocabulary) is a distillation: `xentjax.linear_distillation_loss` takes the "
  "teacher's hidden states and head, `xentjax.linear_topk_distillation_loss` its saved "
  "top-k logits."
)


def check_labels(labels, x, *, optional: bool = False):
  """Integer `labels` with the token shape of `x` (None stays None when `optional`)."""
  if labels is None and optional:
    return None
  V.check_integer("labels", labels, LABELS_HINT)
  labels = jnp.asarray(labels)
  if labels.shape != x.shape[:-1]:
    raise ValueError(
      f"`labels` must have the shape of `x` without its last axis, got "
      f"labels.shape={labels.shape} for x.shape={x.shape} (expected {x.shape[:-1]})."
    )
  return labels


def check_vocab_size(vocab_size, n_cols: int) -> int:
  if vocab_size is None:
    return n_cols
  v = V.int_option("vocab_size", vocab_size, low=1)
  if v > n_cols:
    raise ValueError(
      f"`vocab_size` must be an int in [1, {n_cols}] (the number of real classes "
      f"among the {n_cols} columns of `w`), got {vocab_size!r}."
    )
  return v


def check_where(where, x_shape: tuple, by_x: bool):
  """`where` as an array that broadcasts to the tokens `x_shape[:-1]` (or None).

  The errors name the tokens by `labels`, or by `x` where `by_x` (the
  distillation losses, whose labels are optional).
  """
  if where is None:
    return None
  batch_shape = x_shape[:-1]
  tokens = "x without its last axis" if by_x else "labels"
  V.check_broadcastable("where", where, tokens, jax.ShapeDtypeStruct(batch_shape, bool))
  where = where_mask(where)
  if where.ndim > len(batch_shape) or jnp.broadcast_shapes(where.shape, batch_shape) != batch_shape:
    got = f"got where.shape={where.shape} and "
    target = (
      f"the token shape of `x`, {got}x.shape={x_shape} (tokens {batch_shape})"
      if by_x
      else f"the shape of `labels`, {got}labels.shape={batch_shape}"
    )
    raise ValueError(f"`where` must broadcast to {target}.")
  return where


def check_ignore_index(ignore_index) -> int:
  return V.int_option("ignore_index", ignore_index)


def check_chunk(name: str, value) -> int | None:
  """A tile size: None (automatic) or an int >= 1."""
  return V.int_option(name, value, low=1, allow_none=True)


def check_strategy(reduction, strategy, vocab_chunk_size, filter_eps=None) -> None:
  """The reduction and the strategy of a fused loss ("store" needs a scalar and whole rows).

  With gradient filtering, "store" takes a `vocab_chunk_size`: the columns
  of its filter tiles.
  """
  V.check_reduction(reduction)
  if strategy not in STRATEGIES:
    raise ValueError(f'`strategy` must be "recompute" or "store", got {V.describe(strategy)}.')
  if strategy == "store" and reduction == "none":
    raise ValueError(
      'strategy="store" forms the weight gradient in the forward pass, which needs a '
      'scalar loss: use reduction="mean" or "sum", or strategy="recompute" for '
      'reduction="none".'
    )
  if strategy == "store" and vocab_chunk_size is not None and filter_eps is None:
    raise ValueError(
      'strategy="store" works on whole vocabulary rows; `vocab_chunk_size` only applies '
      'to strategy="recompute" (and to the filter tiles of `filter_eps`).'
    )


def positive_number(name: str, value) -> float:
  """A finite real Python number > 0 (one message for 0, negatives, NaN and inf)."""
  return V.positive_finite(name, value)


def check_temperature(temperature):
  """A Python number (checked: finite, > 0) as a float, or an array as it is (traced).

  A bool, a string or a non-numeric array is a `TypeError` naming
  ``temperature``; a Python number that is not finite and > 0 a `ValueError`.
  """
  if isinstance(temperature, (jax.Array, np.ndarray)):
    if not (
      jnp.issubdtype(temperature.dtype, jnp.floating)
      or jnp.issubdtype(temperature.dtype, jnp.integer)
    ):
      raise TypeError(
        f"`temperature` must be a number or a numeric array, got an array of dtype "
        f"{temperature.dtype}."
      )
    return temperature
  if not V.is_real(temperature):
    raise TypeError(
      f"`temperature` must be a real Python number > 0 or a float array, got "
      f"{V.describe(temperature)}."
    )
  return positive_number("temperature", temperature)


def temperature_rows(temperature, batch_shape: tuple, cdt):
  """A traced temperature as per-token rows `[n]` (NaN where it is not finite and > 0).

  Its shape must broadcast to the tokens (a scalar, or e.g. one per
  sequence); the gradient of a broadcast one is the sum over its tokens.
  """
  t = jnp.asarray(temperature)
  if not V.broadcasts_to(t.shape, batch_shape):
    raise ValueError(
      f"`temperature` must be a number, a scalar array, or an array that broadcasts to the "
      f"tokens {batch_shape}, got temperature.shape={t.shape}."
    )
  t = jnp.broadcast_to(t.astype(cdt), batch_shape).reshape(math.prod(batch_shape))
  return jnp.where((t > 0.0) & (t < jnp.inf), t, jnp.nan)


def check_soft_cap(cap) -> float | None:
  """None, or a finite Python number > 0 (static: part of the compiled program)."""
  if cap is None:
    return None
  if isinstance(cap, (jax.Array, np.ndarray)):
    raise TypeError(
      "`logit_soft_cap` must be a Python number; it is static (part of the compiled "
      f"program, one per value), so pass a float, not {V.describe(cap)}."
    )
  v = V.real_option("logit_soft_cap", cap, allow_none=True)
  if not (v > 0.0 and math.isfinite(v)):
    raise ValueError(f"`logit_soft_cap` must be None or a finite number > 0, got {cap!r}.")
  return v


def check_top_k(top_k, vocab_size: int) -> int:
  k = V.int_option("top_k", top_k, low=0)
  if k > vocab_size:
    raise ValueError(f"`top_k`={k} exceeds the vocabulary size V={vocab_size}.")
  return k


def check_unit_interval(name: str, value) -> float:
  return V.real_option(name, value, low=0.0, high=1.0)


def check_filter_eps(filter_eps, label_smoothing) -> float | None:
  if filter_eps is None:
    return None
  f = V.real_option("filter_eps", filter_eps)
  if not 0.0 < f < 1.0:
    raise ValueError(f"`filter_eps` must be None or a number in (0, 1), got {filter_eps!r}.")
  if label_smoothing:
    raise ValueError(
      "`filter_eps` does not combine with `label_smoothing`: the smoothing "
      "term puts gradient on every column, so no tile could be skipped."
    )
  return f


def check_vocab_order(order, vocab_size: int, vocab_shards: int):
  """An integer `[vocab_size]` column order (or None), as int32.

  That it is a permutation is checked by `check_vocab_order_values` before
  tracing, where its values are known.
  """
  if order is None:
    return None
  V.check_integer(
    "vocab_order",
    order,
    " It must be an integer permutation of the classes, e.g. np.argsort(-counts).",
  )
  order = jnp.asarray(order)
  if order.shape != (vocab_size,):
    raise ValueError(
      f"`vocab_order` must have shape ({vocab_size},) (a permutation of the classes), got "
      f"vocab_order.shape={order.shape}."
    )
  if vocab_shards > 1:
    raise ValueError(
      "`vocab_order` does not combine with a vocabulary sharded over a mesh (permuting the "
      "columns would gather `w` across devices); store `w` with its columns in the order "
      "(w[:, order]) and pass the labels as positions in it (inverse[labels])."
    )
  return order.astype(jnp.int32)


def check_vocab_order_values(order):
  """`order` itself; a `ValueError` when its values are known and not a permutation."""
  if order is None or isinstance(order, jax.core.Tracer):
    return order
  a = np.asarray(order)
  integer = a.ndim == 1 and np.issubdtype(a.dtype, np.integer)
  if integer and not np.array_equal(np.sort(a), np.arange(a.size)):
    raise ValueError(
      f"`vocab_order` must be a permutation of 0..{a.size - 1} (each class once), e.g. "
      "np.argsort(-token_counts)."
    )
  return order


def check_vector(name: str, v, size: int, what: str):
  """A float array of shape `[size]` (or None), with an error naming `name`."""
  if v is None:
    return None
  V.check_floating(name, v, f"a floating-point array ({what})")
  v = jnp.asarray(v)
  if v.shape != (size,):
    raise ValueError(f"`{name}` must have shape ({size},) ({what}), got {name}.shape={v.shape}.")
  return v


def check_weights(weights, batch_shape):
  """Float token weights broadcast to the tokens `batch_shape` (or None)."""
  if weights is None:
    return None
  V.check_floating("weights", weights, "a floating-point array (one weight per token)")
  weights = jnp.asarray(weights)
  if weights.ndim > len(batch_shape) or not V.broadcasts_to(weights.shape, batch_shape):
    raise ValueError(
      f"`weights` must broadcast to the shape of `labels`, got weights.shape={weights.shape} "
      f"and labels.shape={batch_shape}."
    )
  return jnp.broadcast_to(weights, batch_shape)


def check_denominator(denominator):
  """None, a Python number (checked: finite, > 0), or a numeric array (traced)."""
  if denominator is None:
    return None
  if isinstance(denominator, (jax.Array, np.ndarray, np.generic)):
    dt = jnp.result_type(denominator)
    if not (jnp.issubdtype(dt, jnp.floating) or jnp.issubdtype(dt, jnp.integer)):
      raise TypeError(
        f"`denominator` must be a number or a numeric scalar array, got an array of dtype {dt}."
      )
    return denominator
  if not V.is_real(denominator):
    raise TypeError(
      "`denominator` must be a real number > 0 (the count of the whole accumulated batch) or "
      f"a scalar array, got {V.describe(denominator)}."
    )
  return positive_number("denominator", denominator)


def check_denominator_use(denominator, reduction, cdt):
  """The mean's `denominator` as a scalar of `cdt`, without gradient (or None).

  Only ``"mean"`` divides. A traced value that is not a finite number > 0
  becomes 0, which the empty-mean rule turns into NaN (with zero gradients).
  """
  if denominator is None:
    return None
  if reduction != "mean":
    raise ValueError(
      f'`denominator` is the divisor of reduction="mean", got reduction={reduction!r}: pass '
      'reduction="mean", or denominator=None (and divide the "sum" yourself).'
    )
  d = jnp.asarray(denominator)
  if d.ndim:
    raise ValueError(
      "`denominator` must be a scalar (the count of the whole accumulated batch), got "
      f"denominator.shape={d.shape}."
    )
  d = jax.lax.stop_gradient(d.astype(cdt))
  return jnp.where((d > 0.0) & (d < jnp.inf), d, 0.0)


def validators() -> dict:
  """The checks `xentjax._api.public` runs before tracing, where its defaults differ.

  ``temperature`` is an array argument (a Python number is checked here, then
  traced); ``logit_soft_cap`` is static and says so for a traced value;
  ``top_k`` may be 0.
  """
  return {
    "temperature": check_temperature,
    "logit_soft_cap": check_soft_cap,
    "top_k": lambda k: V.int_option("top_k", k, low=0),
    "denominator": check_denominator,
    "vocab_order": check_vocab_order_values,
  }
