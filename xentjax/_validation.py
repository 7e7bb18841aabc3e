"""Argument checks shared by every public function.

Every check runs at trace time on static information (shapes, dtypes, Python
numbers), so a bad call fails with a message that names the argument and shows
what it got, before anything is compiled. Nothing here inspects array values:
values cannot raise inside `jit` (see `xentjax.check_labels` for the eager
check of label ranges).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("none", "mean", "sum")


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def _shape(x):
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _check_kind(name: str, x, kind, what: str, hint: str = "") -> None:
  dt = _dtype(x)
  if not jnp.issubdtype(dt, kind):
    raise TypeError(f"`{name}` must be {what}, got dtype {dt} with shape {_shape(x)}.{hint}")


def check_floating(
  name: str, x, what: str = "a floating-point array (logits or probabilities)"
) -> None:
  """Raise `TypeError` unless `x` has a floating dtype (`what` describes the argument)."""
  _check_kind(name, x, jnp.floating, what)


def check_integer(name: str, x, hint: str | None = None) -> None:
  """Raise `TypeError` unless `x` has an integer dtype (class indices).

  `hint` is the sentence that names the fix; by default the dense losses'
  (one-hot or soft labels go to the function of the same family that takes them).
  """
  if hint is None:
    hint = " For probability targets use the function that takes one-hot or soft labels."
  if _dtype(x) == jnp.bool_:  # not floats: the float hint would mislead
    hint = (
      f" Booleans are not class indices: for two classes cast them ({name}.astype(jnp.int32)); "
      "a boolean that selects tokens is a mask, passed as `where`."
    )
  _check_kind(name, x, jnp.integer, "an integer array of class indices", hint)


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


def broadcasts_to(shape, target) -> bool:
  """Whether an array of `shape` broadcasts to exactly `target` (no new or larger dimensions)."""
  try:
    return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
  except ValueError:
    return False


def normalize_axis(name: str, axis, ndim: int):
  """Return `axis` as non-negative int(s); raise `ValueError` when out of range."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"`{name}`={axis} is out of range for an array of rank {ndim}.")
    out.append(a % ndim)
  return out[0] if isinstance(axis, int) else tuple(out)


# ---------------------------------------------------------------------------
# Options: Python values checked before tracing, returned in canonical form.
# ---------------------------------------------------------------------------


def describe(value) -> str:
  """How an error message shows a bad option value."""
  if isinstance(value, jax.core.Tracer):
    return "a traced array (options are compile-time values: pass a Python number)"
  if isinstance(value, (jax.Array, np.ndarray)):
    return (
      f"an array of shape {tuple(np.shape(value))} (options are compile-time values: "
      "pass a Python number, e.g. float(x))"
    )
  return repr(value)


def is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def real_option(name: str, value, *, low=None, high=None, integer=False, allow_none=False):
  """`value` as a Python float (int with ``integer``) in ``[low, high]``, else a named error.

  Strings, bools and arrays are refused with a `TypeError` (``"0.1"`` is not
  silently read as a number); a number out of range (or NaN) is a
  `ValueError`. None is returned as None when ``allow_none``.
  """
  if value is None and allow_none:
    return None
  kind = "a Python int" if integer else "a real Python number"
  if not (is_int(value) if integer else is_real(value)):
    raise TypeError(f"`{name}` must be {'None or ' * allow_none}{kind}, got {describe(value)}.")
  v = int(value) if integer else float(value)
  if math.isnan(v) or (low is not None and v < low) or (high is not None and v > high):
    rule = " and ".join(
      p for p in (low is not None and f">= {low:g}", high is not None and f"<= {high:g}") if p
    )
    raise ValueError(f"`{name}` must be {rule}, got {value!r}.")
  return v


def positive_finite(name: str, value, what: str = "") -> float:
  """`value` as a finite Python float > 0, else one `ValueError` for every way it is not.

  0, a negative number, NaN and infinity all get the same message (``what``,
  if given, says what the number is); a non-number is a `TypeError`.
  """
  if not is_real(value):
    raise TypeError(f"`{name}` must be a real Python number > 0, got {describe(value)}.")
  v = float(value)
  if not (v > 0.0 and math.isfinite(v)):
    raise ValueError(f"`{name}` must be a finite number > 0{what}, got {value!r}.")
  return v


def int_option(name: str, value, *, low=None, allow_none=False):
  """`value` as a Python int >= ``low`` (or None when allowed), else a named error."""
  return real_option(name, value, low=low, integer=True, allow_none=allow_none)


def check_reduction(reduction: str) -> str:
  """Return `reduction` if it is one of "none", "mean", "sum"."""
  if not isinstance(reduction, str) or reduction not in REDUCTIONS:
    raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {describe(reduction)}.")
  return reduction


def check_label_smoothing(label_smoothing) -> float:
  """Return `label_smoothing` as a float in [0, 1]."""
  return real_option("label_smoothing", label_smoothing, low=0.0, high=1.0)


def check_nonnegative(name: str, value) -> float:
  """Return `value` as a float >= 0 (for penalties such as `z_loss`)."""
  return real_option(name, value, low=0.0)


def log_base_scale(base) -> float | None:
  """Return 1 / ln(base), the factor that turns nats into units of `base`.

  `None` (nats) returns `None` so callers skip the multiplication entirely.
  A string or an array is a `TypeError`; a base <= 0, == 1 or infinite a
  `ValueError` (no logarithm exists there).
  """
  if base is None:
    return None
  if not is_real(base):
    raise TypeError(
      "`base` must be None (nats) or a positive real Python number != 1 (2 for bits), "
      f"got {describe(base)}."
    )
  b = float(base)
  if not b > 0.0 or b == 1.0 or math.isinf(b):
    raise ValueError(f"`base` must be None (nats) or a finite number > 0 and != 1, got {base!r}.")
  return 1.0 / math.log(b)


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
