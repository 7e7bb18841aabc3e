"""`linear_row_loss`: any per-row function of the logits ``x @ w + b``, fused, its gradient by JAX.

The entry point of the whole-row adapter (`kernels.rowwise.RowFunction`): a
quantity written as one function of a row of logits (and that row's
operands, such as a label) runs over chunks of whole rows of the logits,
with its gradient from `jax.vjp` of the function, as Liger Kernel's chunked
losses do. A sum or a mean is one pass that forms the gradients as it goes
(strategy "store"); per-row values recompute each chunk in the backward pass
(strategy "recompute").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax import lax

from xentjax import _validation as V
from xentjax._api import public
from xentjax._vocab.inputs import Head, prepare_call
from xentjax._vocab.kernels.rowwise import RowFunction, operand_key
from xentjax._vocab.reduce import WeightedRows, run_and_reduce

ROW_LOSS_OPTIONS = (
  "fn",
  "reduction",
  "w_layout",
  "vocab_size",
  "token_chunk_size",
  "precision",
  "mesh",
  "data_axis",
)


def check_fn(fn):
  """A callable that is hashable (it is part of the compiled program)."""
  if not callable(fn):
    raise TypeError(f"`fn` must be a function of a row of logits, got {V.describe(fn)}.")
  try:
    hash(fn)
  except TypeError:
    raise TypeError(f"`fn` must be hashable (it is static), got {V.describe(fn)}.") from None
  return fn


@public(static=ROW_LOSS_OPTIONS, validators={"fn": check_fn})
def linear_row_loss(
  fn: Callable[..., Any],
  x: jax.typing.ArrayLike,
  w: jax.typing.ArrayLike,
  operands: Mapping[str, jax.typing.ArrayLike] | None = None,
  *,
  bias: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  reduction: Literal["mean", "sum", "none"] = "mean",
  w_layout: Literal["dv", "vd"] = "dv",
  vocab_size: int | None = None,
  token_chunk_size: int | None = None,
  precision: Any = None,
  mesh: jax.sharding.Mesh | None = None,
  data_axis: Any = None,
) -> jax.Array:
  r"""A per-row function of the logits ``x @ w + b``, reduced, without forming all the logits.

  For each token :math:`i` with hidden state :math:`x_i` and operands
  :math:`o_i`, with logits :math:`z_i = x_i^\top w + b` (``[V]``),

  .. math::

    \ell_i = f(z_i, o_i), \qquad
    L = \sum_{i \in C} \ell_i \ \text{(sum)}, \quad
    \frac{1}{|C|} \sum_{i \in C} \ell_i \ \text{(mean)},

  with :math:`C` the tokens ``where`` keeps. The logits are formed a chunk
  of ``token_chunk_size`` whole rows at a time, and
  :math:`\partial L / \partial z_i` comes from `jax.vjp` of ``fn`` on the
  chunk, so the ``[..., V]`` logits never exist at once (the way Liger
  Kernel's chunked losses work). A sum or a mean forms every gradient in its
  one forward pass (``dx = dz w^T``, ``dw += x^T dz``); per-row values
  (``reduction="none"``) recompute each chunk in the backward pass.

  Args:
    fn: ``fn(z, **operand_rows) -> scalar``: ``z`` is one row of logits
      ``[V]`` (float32 for 16-bit inputs), each operand one token's row.
      Static: it must be hashable, and a new function object (a lambda made
      per call) compiles anew; define it once.
    x: hidden states ``[..., D]``.
    w: ``[D, V]`` (or ``[V, D]`` with ``w_layout="vd"``).
    operands: optional ``{name: [..., *shape]}``: per-token arrays (leading
      dimensions those of ``x`` without ``D``), passed to ``fn`` by name, one
      token's ``[*shape]`` each. They carry no gradient.
    bias: optional ``[V]`` output bias (one per column of ``w``).
    where: optional boolean token mask broadcastable to ``x.shape[:-1]``.
    reduction: ``"mean"`` (over the tokens ``where`` keeps), ``"sum"`` or
      ``"none"`` (``[...]``, 0 where ``where`` is false).
    w_layout: ``"dv"`` (``w`` is ``[D, V]``) or ``"vd"`` (``[V, D]``).
    vocab_size: number of real classes: ``fn`` sees ``z[:vocab_size]`` (the
      trailing columns of ``w`` are padding).
    token_chunk_size: rows per chunk (automatic: about 64 MiB of float32
      logits, at least 8 rows).
    precision: passed to `lax.dot_general`.
    mesh: optional `jax.sharding.Mesh` whose ``data_axis`` shards the tokens
      (``w`` is replicated: each row needs its whole vocabulary, so the
      vocabulary cannot be sharded).
    data_axis: mesh axis (or axes) of the tokens (with ``mesh``).

  Returns:
    A scalar (``"mean"``, ``"sum"``) or ``[...]`` (``"none"``), float32 for
    16-bit inputs (else the promoted dtype). Differentiable with respect to
    ``x``, ``w`` and ``bias``.

  Note:
    Tokens ``where`` masks contribute 0 with an exactly zero gradient, even
    where ``fn`` is not finite on them. The mean over no token is NaN (with
    a zero gradient). A NaN from ``fn`` on a kept token propagates.

  Example:
    >>> import jax, jax.numpy as jnp, xentjax
    >>> def margin(z, label):  # the label's logit below the best other one
    ...   return jnp.max(jnp.where(jnp.arange(z.shape[0]) == label, -jnp.inf, z)) - z[label]
    >>> x = jnp.eye(2, 3); w = jnp.arange(12.0).reshape(3, 4); y = jnp.array([0, 3])
    >>> float(xentjax.linear_row_loss(margin, x, w, {"label": y}))  # (3 - 0 + 6 - 7) / 2
    1.0

  References:
    P.-L. Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM
    Training", 2024 (the chunked losses). E. Wijmans et al., "Cut Your Losses
    in Large-Vocabulary Language Models", 2024.
  """
  if mesh is None and data_axis is not None:
    raise ValueError("`data_axis` needs a `mesh`.")
  head = Head(w_layout, vocab_size, token_chunk_size, None, precision, mesh, data_axis, None)
  call = prepare_call(
    x, w, None, head, ignore_index=-100, where=where, strategy="store", bias=bias, student=True
  )
  tok = call.tokens
  rows = flat_operands(operands, tok.batch_shape)
  kernel = RowFunction(fn, tuple(rows), tok.vocab_size if tok.vocab_size < tok.n_cols else None)
  ops = call.ops.with_rows(**{operand_key(k): v for k, v in rows.items()})
  counted = tok.status.counted
  strategy = "recompute" if reduction == "none" else "store"  # "store" sums in its sweep
  aux = {"weight": jnp.where(counted, 1.0, 0.0).astype(tok.cdt)}
  count = jnp.sum(counted).astype(tok.cdt)
  call = call._replace(ops=ops)
  loss, _ = run_and_reduce(
    call, kernel, WeightedRows("value"), aux, strategy, reduction, lambda: {"weight": count}
  )
  return loss


def flat_operands(operands, batch_shape: tuple) -> dict:
  """``{name: [n, *shape]}``: each operand with its token dimensions flattened, constant."""
  if operands is None:
    return {}
  if not isinstance(operands, Mapping) or not all(isinstance(k, str) for k in operands):
    raise TypeError(
      f"`operands` must be a dict of per-token arrays by name, got {V.describe(operands)}."
    )
  out = {}
  k = len(batch_shape)
  for name, value in operands.items():
    a = jnp.asarray(value)
    if a.shape[:k] != tuple(batch_shape):
      raise ValueError(
        f"Operand {name!r} must have the token dimensions of `x` {tuple(batch_shape)} first, "
        f"got shape {a.shape}."
      )
    out[name] = lax.stop_gradient(a.reshape(math.prod(batch_shape), *a.shape[k:]))
  return out
