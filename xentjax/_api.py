"""The one convention for xentjax's public functions: compilation, inputs, options.

A public function that computes on arrays is declared with `public`::

    @public(static=("axis", "label_smoothing"))
    def softmax_cross_entropy(logits, labels, axis=-1, where=None, *, label_smoothing=0.0): ...

or, when it takes exactly the arguments of another public function (a
closed-form gradient beside its loss, `cosine_distance` beside
`cosine_similarity`), with ``public_like(model)``. There is no other way (no
alias, no bare `jax.jit`); `is_public` tells whether a function was declared
so. ``tests/architecture/test_architecture.py`` checks every name in the public modules'
``__all__`` and lists the exceptions: classes, constants, and the host-side
functions that loop over batches, read files or draw (they call public
functions, they are not compiled themselves).

A declared function gets, without writing it again:

* **Compiled once per input signature** with `jax.jit`; the names in
  ``static`` are compile-time options (Python values, part of the cache key).
* **Array arguments** (every parameter not in ``static``) accept whatever
  `numpy.asarray` accepts: JAX and NumPy arrays and scalars pass through;
  lists, tuples and objects with ``__array__`` (a pandas DataFrame or
  Series, an xarray DataArray) are converted on the host before `jit` sees
  them. None stays None.
* **Options are validated by name** (`OPTIONS`), before tracing, with an
  error that names the option and shows what it got, and are turned into one
  canonical hashable value (``axis=[0, 1]`` becomes ``(0, 1)``,
  ``label_smoothing=np.float32(0.1)`` a Python float), so equal options share
  one compiled program. An option not in `OPTIONS` only has to be hashable.
* **The function stays itself** for `help()`, IDEs, `inspect`, stack traces
  and profiles: the returned function is a plain Python function with the
  original ``__name__``, ``__qualname__``, ``__doc__``, ``__module__`` and
  signature (``__wrapped__`` is the undecorated function). A closed-form
  gradient keeps its own name (``softmax_cross_entropy_grad``); `xentjax.grads`
  only collects the gradients under the loss names.

`where_mask` is the one rule for ``where`` masks: a boolean array, or an
integer 0/1 array read as ``!= 0``; a floating mask is a `TypeError` (a float
is a weight, and a weight of 0.5 is not a mask: multiply the per-example
losses by it instead).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from xentjax import _validation as V

__all__ = [
  "OPTIONS",
  "ArrayLike",
  "Axis",
  "Mask",
  "as_array_argument",
  "broadcast_to_first",
  "check_float_labels",
  "class_axes",
  "closed_form_jvp",
  "doc_parts",
  "forwarding_signature",
  "from_last",
  "gradient_doc",
  "is_public",
  "prepare_where",
  "public",
  "public_like",
  "to_last",
  "where_mask",
]

Axis = int | tuple[int, ...] | None
ArrayLike = jax.typing.ArrayLike
Mask = jax.typing.ArrayLike | None  # a `where` mask (see `where_mask`)

# ---------------------------------------------------------------------------
# Option validators: value -> canonical hashable value, or a clear error.
# ---------------------------------------------------------------------------


real_option, int_option, describe = V.real_option, V.int_option, V.describe


def _axis(value):
  if value is None or V.is_int(value):
    return None if value is None else int(value)
  if isinstance(value, (tuple, list)) and all(V.is_int(a) for a in value):
    return tuple(int(a) for a in value)
  raise TypeError(f"`axis` must be an int, a tuple of ints or None, got {describe(value)}.")


def _base(value):
  V.log_base_scale(value)  # the one rule for `base`: None, or a real number > 0 and != 1
  return None if value is None else float(value)


def _eps(value):
  """The clipping bound of the probability losses: None, or a number in [1e-37, 0.5).

  The lower end keeps ``log(eps)`` a normal float32 logarithm (float32's
  smallest normal number is about 1.2e-38).
  """
  if value is None:
    return None
  v = real_option("eps", value)
  if not 1e-37 <= v < 0.5:
    raise ValueError(
      f"`eps` must be None (no clipping) or a number in [1e-37, 0.5), got {value!r}."
    )
  return v


OPTIONS: dict[str, Callable] = {
  "axis": _axis,
  "base": _base,
  "reduction": V.check_reduction,
  "label_smoothing": V.check_label_smoothing,
  "z_loss": lambda v: V.check_nonnegative("z_loss", v),
  "k": lambda v: int_option("k", v, low=1),
  "top_k": lambda v: int_option("top_k", v, low=1),
  "ignore_index": lambda v: int_option("ignore_index", v, allow_none=True),
  "eps": _eps,
}
"""Validators of the compile-time options, by name (shared by every module)."""


def _hashable(name: str):
  def check(value):
    try:
      hash(value)
    except TypeError:
      raise TypeError(
        f"`{name}` is a compile-time option and must be hashable, got {describe(value)}."
      ) from None
    return value

  return check


# ---------------------------------------------------------------------------
# Array arguments.
# ---------------------------------------------------------------------------

_PASS_THROUGH = (jax.Array, np.ndarray, np.generic, numbers.Number, bool)


def as_array_argument(value):
  """What `jit` can take: arrays and scalars unchanged, the rest through `numpy.asarray`.

  Lists, tuples and objects with ``__array__`` (pandas, xarray) become NumPy
  arrays on the host; None stays None.
  """
  if value is None or isinstance(value, _PASS_THROUGH):
    return value
  if isinstance(value, (list, tuple)) or hasattr(value, "__array__"):
    return np.asarray(value)
  return value  # anything else: `jit` reports it (e.g. a string) with its type


# ---------------------------------------------------------------------------
# The decorator.
# ---------------------------------------------------------------------------


def public(
  static: Iterable[str] = (),
  *,
  validators: dict[str, Callable] | None = None,
  signature: inspect.Signature | None = None,
):
  """Declare a public function: jit with ``static`` options, converted arrays, same face.

  Args:
    static: parameter names that are compile-time options. Each is validated
      by ``validators[name]``, else by `OPTIONS[name]`, else only checked to
      be hashable; the validated (canonical) value is what the function sees.
    validators: per-function validators that override `OPTIONS`; a name
      that is not in ``static`` (an array argument) is checked by its
      validator before conversion, on the raw value, and stays traced (e.g. a
      Python number that must lie in a range, where arrays are also fine).
    signature: bind calls with this signature instead of the function's own
      (`public_like` uses it to give a gradient its loss's arguments); the
      function then receives every parameter by name.

  Returns:
    A decorator. The decorated function binds its arguments like the
    original (same errors for a wrong call; defaults filled in), validates
    the options, converts the array arguments (`as_array_argument`) and
    calls one `jax.jit` of the original. It keeps the original's name,
    docstring, module and signature.
  """
  static = tuple(static)
  extra = dict(validators or {})

  def deco(fn):
    sig = signature or inspect.signature(fn)
    unknown = [n for n in static if n not in sig.parameters]
    if unknown:
      raise TypeError(f"{fn.__name__} has no parameter(s) {unknown} to make static.")
    check = {n: extra.get(n) or OPTIONS.get(n) or _hashable(n) for n in static}
    pre = {n: v for n, v in extra.items() if n not in static}
    jitted = jax.jit(fn, static_argnames=static)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      bound = sig.bind(*args, **kwargs)
      bound.apply_defaults()
      call = {}
      for name, value in bound.arguments.items():
        if name in check:
          call[name] = check[name](value)
        else:
          call[name] = as_array_argument(pre[name](value) if name in pre else value)
      return jitted(**call)

    wrapper.__signature__ = sig
    wrapper.static_argnames = static
    wrapper.__xentjax_public__ = True  # the mark `is_public` reads
    return wrapper

  return deco


def is_public(fn) -> bool:
  """Whether ``fn`` was declared with `public` (or `public_like`)."""
  return getattr(fn, "__xentjax_public__", False) is True


def gradient_doc(loss, *, wrt: str, formula: str, note: str = ""):
  """Write the docstring of the closed-form gradient of the public `loss`.

  Apply it below ``public_like(loss)``: the function keeps its own name (e.g.
  ``softmax_cross_entropy_grad``) and module; the docstring says that it
  computes ``d sum(loss(...)) / d wrt``, with ``formula`` (a ``.. math::``
  body) and ``note``, and that it takes the loss's arguments.
  """

  def deco(fn):
    name = loss.__name__
    doc = (
      f"Gradient of `xentjax.{name}` with respect to ``{wrt}``.\n\n"
      f"  .. math::\n    {formula}\n\n"
      f"  Takes the arguments of `xentjax.{name}` (see there).\n\n"
      f"  Returns:\n    The gradient of the summed per-example loss, with the shape and dtype "
      f"of ``{wrt}``.\n"
    )
    if note:
      doc += f"\n  Note:\n    {note}\n"
    fn.__doc__ = doc
    return fn

  return deco


def public_like(model, *, validators: dict[str, Callable] | None = None):
  """Declare a public function that takes exactly the arguments of the public `model`.

  The decorated function keeps its own name and docstring; it gets `model`'s
  signature (annotations and defaults included, so `help()` shows the same
  arguments), compiled options and argument handling, and receives every
  parameter by name: ``def f(logits, labels, axis, where, label_smoothing)``.
  For a function that is defined by its model's arguments, such as a
  closed-form gradient beside its loss.

  A function with a ``**options`` parameter forwards to `model` with some
  parameters of its own (`forwarding_signature`): ``def f(x, w, labels, *,
  mesh: Mesh, data_axis="data", vocab_axis="vocab", **options)`` takes
  `model`'s other keywords in place of ``options``. `validators` as in
  `public`.
  """

  def deco(fn):
    sig = inspect.signature(model)
    if any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
      sig = forwarding_signature(fn, model)
      fn.__xentjax_forwards_to__ = model  # where the docs read the other defaults
    fn.__annotations__ = {
      **{n: p.annotation for n, p in sig.parameters.items() if p.annotation is not p.empty},
      "return": sig.return_annotation,
    }
    return public(model.static_argnames, validators=validators, signature=sig)(fn)

  return deco


def forwarding_signature(fn, model) -> inspect.Signature:
  """`fn`'s signature with `model`'s parameters that it does not name in place of its ``**``.

  A parameter of `fn` without an annotation takes `model`'s; the return
  annotation is `fn`'s, else `model`'s.
  """
  own, base = inspect.signature(fn), inspect.signature(model).parameters
  params = []
  for p in own.parameters.values():
    if p.kind is p.VAR_KEYWORD:
      params += [q for n, q in base.items() if n not in own.parameters]
    elif p.annotation is p.empty and p.name in base:
      params.append(p.replace(annotation=base[p.name].annotation))
    else:
      params.append(p)
  returns = own.return_annotation
  return own.replace(
    parameters=params,
    return_annotation=inspect.signature(model).return_annotation
    if returns is own.empty
    else returns,
  )


def doc_parts(**parts: str):
  """Fill the ``{name}`` placeholders of a docstring with text shared by several functions.

  For the Args and Returns that functions with the same arguments describe
  alike: each ``{name}`` line of the docstring becomes ``parts[name]``, written
  with the indentation it needs. Apply it below `public` (first), so that the
  public function and `help()` see the filled docstring. A placeholder that is
  not in the docstring is an error (at import).
  """

  def deco(fn):
    doc = fn.__doc__
    for name, text in parts.items():
      marker = "{" + name + "}"
      if marker not in doc:
        raise ValueError(f"the docstring of {fn.__name__} has no {marker} to fill.")
      doc = doc.replace(marker, text)
    fn.__doc__ = doc
    return fn

  return deco


def closed_form_jvp(value, grad, contract):
  """``f(z, a, b) = value(z, a, b)`` as a `jax.custom_jvp` whose ``z`` tangent is a closed form.

  The tangent in ``z`` is ``contract(grad(z, a, b), dz)`` (e.g. a sum over the
  class axis of ``grad * dz``), finite where the product rule through
  ``value`` would give ``inf * 0 = NaN``; the tangents in ``a`` and ``b``
  (weights, labels, an exponent) go through `jax.jvp` of ``value``. Symbolic
  zeros skip the parts that are not asked for.
  """

  @jax.custom_jvp
  def f(z, a, b):
    return value(z, a, b)

  @functools.partial(f.defjvp, symbolic_zeros=True)
  def f_jvp(primals, tangents):
    z, a, b = primals
    dz, da, db = tangents
    out = value(z, a, b)
    zero = jax.custom_derivatives.SymbolicZero
    t = jnp.zeros_like(out)
    if not isinstance(dz, zero):
      t = t + contract(grad(z, a, b), dz)
    if not (isinstance(da, zero) and isinstance(db, zero)):
      da = jnp.zeros_like(a) if isinstance(da, zero) else da
      db = jnp.zeros_like(b) if isinstance(db, zero) else db
      t = t + jax.jvp(lambda a_, b_: value(z, a_, b_), (a, b), (da, db))[1]
    return out, t

  return f


# ---------------------------------------------------------------------------
# `where` masks.
# ---------------------------------------------------------------------------


def where_mask(where, name: str = "where"):
  """``where`` as a boolean array (None stays None): the one mask rule.

  A boolean array is used as given; an integer array is read as ``!= 0``
  (0/1 masks from data pipelines). A floating (or complex) array raises
  `TypeError`: a float is a weight, not a mask (multiply the per-example
  losses by it, or use ``weight=`` where a function has one).
  """
  if where is None:
    return None
  w = jnp.asarray(as_array_argument(where))
  check_mask_dtype(w.dtype, w.shape, name)
  return w if w.dtype == jnp.bool_ else w != 0


def check_mask_dtype(dtype, shape: tuple, name: str = "where") -> None:
  """The dtype half of `where_mask`, for masks that stay on the host (`evaluate`)."""
  if dtype == np.bool_ or np.issubdtype(dtype, np.integer):
    return
  raise TypeError(
    f"`{name}` must be a boolean mask (or an integer 0/1 mask), got dtype {dtype} with "
    f"shape {tuple(shape)}. A floating array is a weight, not a mask: multiply the "
    "per-example values by it instead."
  )


# ---------------------------------------------------------------------------
# Layout: class axes to the end, masks broadcast (shared by every loss module).
# ---------------------------------------------------------------------------


def class_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
  """The class axes as a tuple of non-negative ints (None: every axis)."""
  if axis is None:
    return tuple(range(ndim))
  if isinstance(axis, (int, np.integer)):
    return (V.normalize_axis("axis", int(axis), ndim),)
  if isinstance(axis, (tuple, list)):
    axes = V.normalize_axis("axis", tuple(int(a) for a in axis), ndim)
    if len(set(axes)) != len(axes):
      raise ValueError(f"`axis`={axis} repeats an axis.")
    return axes
  raise TypeError(f"`axis` must be an int, a tuple of ints or None, got {axis!r}.")


def to_last(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """Move `axes` to the end (in the given order) and flatten them into one."""
  batch = tuple(i for i in range(x.ndim) if i not in axes)
  x = jnp.transpose(x, batch + axes)
  k = math.prod(x.shape[len(batch) :])
  return x.reshape((*x.shape[: len(batch)], k))


def from_last(g: jax.Array, axes: tuple[int, ...], shape: tuple[int, ...]) -> jax.Array:
  """Inverse of `to_last`: unflatten the class axis and put it back."""
  batch = tuple(i for i in range(len(shape)) if i not in axes)
  g = g.reshape(tuple(shape[i] for i in batch) + tuple(shape[i] for i in axes))
  perm = batch + tuple(axes)
  return jnp.transpose(g, tuple(int(i) for i in np.argsort(perm)))


def prepare_where(where, shape: tuple[int, ...], axis: Axis, axes, name="where"):
  """`where` (`where_mask`) broadcast to `shape`; a batch-shaped mask gets the class axes."""
  where = where_mask(where, name)
  if where is None:
    return None
  if where.ndim != len(shape):
    if axis is None:
      raise ValueError(
        f"`{name}` must have the shape of the input when axis=None, got "
        f"{name}.shape={where.shape} and input shape {shape}."
      )
    where = jnp.expand_dims(where, axes)
  if not V.broadcasts_to(where.shape, shape):
    raise ValueError(
      f"`{name}` must broadcast to the input shape {tuple(shape)} (or to its batch "
      f"shape without the class axes), got {name}.shape={where.shape}."
    )
  return jnp.broadcast_to(where, shape)


def broadcast_to_first(name_a, a, name_b, b) -> jax.Array:
  """Broadcast `b` to `a`'s shape, with a message naming both when impossible."""
  sa, sb = tuple(a.shape), tuple(np.shape(b))
  if not V.broadcasts_to(sb, sa):
    raise ValueError(
      f"`{name_b}` must have the shape of `{name_a}` (or broadcast to it), got "
      f"{name_a}.shape={sa} and {name_b}.shape={sb}."
    )
  return jnp.broadcast_to(b, sa)


def check_float_labels(name: str, labels) -> None:
  """`TypeError` unless `labels` holds probabilities (floating), naming the integer-label function."""
  dt = jnp.asarray(labels).dtype if not hasattr(labels, "dtype") else labels.dtype
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(
      f"`{name}` must hold probabilities (a floating-point array with the shape "
      f"of the logits), got dtype {dt} with shape {np.shape(labels)}. For integer "
      "class indices use `softmax_cross_entropy_with_integer_labels`."
    )
