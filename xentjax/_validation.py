"""Argument checks shared by every public function.

Every check runs at trace time on static information (shapes, dtypes, Python
numbers), so a bad call fails with a message that names the argument and shows
what it got, before anything is compiled. Nothing here inspects array values:
values cannot raise inside `jit` (see `xentjax.check_labels` for the eager
check of label ranges).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "mean", "sum")


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _shape(x):
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def check_floating(name: str, x) -> None:
  """Raise `TypeError` unless `x` has a floating dtype."""
  dt = _dtype(x)
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
        f"`{name}` must be a floating-point array (logits or probabilities), "
        f"got dtype {dt} with shape {_shape(x)}."
    )


def check_integer(name: str, x) -> None:
  """Raise `TypeError` unless `x` has an integer dtype (class indices)."""
  dt = _dtype(x)
  if not jnp.issubdtype(dt, jnp.integer):
    raise TypeError(
        f"`{name}` must be an integer array of class indices, got dtype {dt} "
        f"with shape {_shape(x)}. For probability targets use the function "
        "that takes one-hot or soft labels."
    )


def check_same_shape(name_a: str, a, name_b: str, b) -> None:
  """Raise `ValueError` unless the two arrays have the same shape."""
  sa, sb = _shape(a), _shape(b)
  if sa != sb:
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have the same shape, got "
        f"{name_a}.shape={sa} and {name_b}.shape={sb}."
    )


def check_broadcastable(name_a: str, a, name_b: str, b) -> None:
  """Raise `ValueError` unless the two arrays broadcast against each other."""
  sa, sb = _shape(a), _shape(b)
  try:
    np.broadcast_shapes(sa, sb)
  except ValueError:
    raise ValueError(
        f"`{name_a}` and `{name_b}` must have broadcastable shapes, got "
        f"{name_a}.shape={sa} and {name_b}.shape={sb}."
    ) from None


def normalize_axis(name: str, axis, ndim: int):
  """Return `axis` as non-negative int(s); raise `ValueError` when out of range."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"`{name}`={axis} is out of range for an array of rank {ndim}.")
    out.append(a % ndim)
  return out[0] if isinstance(axis, int) else tuple(out)


def check_reduction(reduction: str) -> str:
  """Return `reduction` if it is one of "none", "mean", "sum"."""
  if reduction not in REDUCTIONS:
    raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
  return reduction


def check_label_smoothing(label_smoothing) -> float:
  """Return `label_smoothing` as a float in [0, 1]."""
  try:
    eps = float(label_smoothing)
  except TypeError:
    raise TypeError(
        f"`label_smoothing` must be a Python number in [0, 1], got {label_smoothing!r}."
    ) from None
  if not 0.0 <= eps <= 1.0 or math.isnan(eps):
    raise ValueError(f"`label_smoothing` must lie in [0, 1], got {label_smoothing!r}.")
  return eps


def check_nonnegative(name: str, value) -> float:
  """Return `value` as a float >= 0 (for penalties such as `z_loss`)."""
  v = float(value)
  if not v >= 0.0:
    raise ValueError(f"`{name}` must be >= 0, got {value!r}.")
  return v


def log_base_scale(base) -> float | None:
  """Return 1 / ln(base), the factor that turns nats into units of `base`.

  `None` (nats) returns `None` so callers skip the multiplication entirely.
  Raises `ValueError` for a base <= 0 or == 1 (no logarithm exists there).
  """
  if base is None:
    return None
  try:
    b = float(base)
  except TypeError:
    raise TypeError(f"`base` must be None or a positive number != 1, got {base!r}.") from None
  if not b > 0.0 or b == 1.0 or math.isinf(b):
    raise ValueError(f"`base` must be None (nats) or a finite number > 0 and != 1, got {base!r}.")
  return 1.0 / math.log(b)


def to_base(x, base):
  """Convert a quantity in nats to units of `base` (identity for None)."""
  scale = log_base_scale(base)
  return x if scale is None else x * jnp.asarray(scale, dtype=x.dtype)


def compute_dtype(*dtypes):
  """The dtype computations run in: float32 for 16-bit floats, else the promoted dtype."""
  dt = jnp.result_type(*dtypes)
  if not jnp.issubdtype(dt, jnp.floating):
    dt = jnp.result_type(float)
  if jnp.finfo(dt).bits < 32:
    return jnp.dtype(jnp.float32)
  return jnp.dtype(dt)


def as_sequence(x) -> Sequence:
  return x if isinstance(x, (tuple, list)) else (x,)
