"""One run-and-reduce step for the entry points: strategy, reduction, denominators, empty mean.

An entry point states its per-token loss as a token loss (`TokenLoss`) and its
per-token operands ``aux``; `run_and_reduce` runs the kernel by the strategy
and reduces:

* ``"recompute"``: the kernel's rows (`run_tokens`), the loss's terms on them,
  then ``"none"`` (the batch shape), ``"sum"`` or ``"mean"`` (`reduce_terms`);
* ``"store"``: the engine's one-pass sweep sums the token loss with its
  coefficients divided by the mean's denominators beforehand (a sum is the
  mean then), the gradients formed on the way.

The ``"mean"`` of a term divides by its own denominator, or by the caller's
``denominator`` for every term (`mean_denominators`); a mean over nothing
(a denominator of 0) is NaN with zero gradients, in both strategies (the
library's empty-mean rule, `xentjax._core.mean_or_nan`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
from jax import lax

from xentjax._core import LabelStatus, mean_or_nan
from xentjax._vocab.engine import run_recompute, run_store
from xentjax._vocab.inputs import Call
from xentjax._vocab.kernel import Kernel
from xentjax._vocab.placement import Operands
from xentjax._vocab.tiles import Tiling


class TokenLoss(Protocol):
  """A per-token loss on the kernel's rows ``out`` and the per-token operands ``aux``.

  ``terms`` gives ``{coefficient name: per-token term}``: each term is
  proportional to the coefficient ``aux[name]`` (0 where it is 0), and each
  is averaged over its own denominator; ``__call__`` is their sum (what
  strategy "store" sums inside its sweep). ``differentiable`` names the
  entries of ``aux`` that get gradients (in "store").
  """

  @property
  def differentiable(self) -> tuple: ...

  def __call__(self, out: dict, aux: dict) -> jax.Array: ...

  def terms(self, out: dict, aux: dict) -> dict: ...


@dataclasses.dataclass(frozen=True)
class WeightedRows:
  """``weight_i · out[name]_i`` (0 where the weight is 0): a kernel row as the per-token loss.

  A `TokenLoss` of one coefficient, ``aux["weight"]``: the rows' weights, 0
  on those that do not count (NaN marks a bad one); no gradient flows into it.
  """

  name: str
  differentiable = ()

  def __call__(self, out: dict, aux: dict) -> jax.Array:
    weight = aux["weight"].astype(out[self.name].dtype)
    return jnp.where(weight != 0, weight * out[self.name], 0.0)

  def terms(self, out: dict, aux: dict) -> dict:
    return {"weight": self(out, aux)}


def run_tokens(call: Call, kernel: Kernel) -> dict:
  """The kernel's rows over `call`'s tiles (strategy "recompute"), gradient only where it has one.

  The rows that are not in ``kernel.differentiable`` (the row maximum, the
  argmax, ...) are returned through `lax.stop_gradient`.
  """
  out = run_recompute(call.ops, kernel, call.tiling)
  return {k: v if k in kernel.differentiable else lax.stop_gradient(v) for k, v in out.items()}


def counted_only(values, status: LabelStatus):
  """`values` on the tokens that count, 0 on the others, NaN on a bad one (a label out of range)."""
  values = jnp.where(status.counted, values, 0.0)
  return values * jnp.where(status.bad, jnp.nan, 1.0).astype(values.dtype)


def mean_denominators(own: dict, denominator) -> dict:
  """The denominators of ``"mean"``: each term's `own`, or the caller's `denominator` for all."""
  return own if denominator is None else dict.fromkeys(own, denominator)


def add(terms):
  """The sum of `terms` (no ``0 +`` in the program, unlike the builtin `sum`)."""
  return functools.reduce(jnp.add, terms)


def reduce_terms(terms: dict, reduction: str, denominators: dict, batch_shape: tuple):
  """``"none"`` (the sum of the per-token `terms`, in the batch shape), ``"sum"`` or ``"mean"``.

  The mean of each term divides by its denominator, NaN (zero gradient) where that is 0.
  """
  if reduction == "none":
    return add(terms.values()).reshape(batch_shape)
  if reduction == "sum":
    return jnp.sum(add(terms.values()))
  return add(mean_or_nan(jnp.sum(terms[k]), denominators[k]) for k in terms)


def run_and_reduce(
  call: Call,
  kernel: Kernel,
  token_loss: TokenLoss,
  aux: dict,
  strategy: str,
  reduction: str,
  denominators: Callable[[], dict],
  keep: tuple = (),
):
  """`(loss, rows)`: `token_loss` over `call`'s tokens, run by `strategy`, reduced by `reduction`.

  Args:
    call: the checked call (tokens, tiling, operands).
    kernel: the kernel whose rows `token_loss` reads.
    token_loss: a `TokenLoss`; its coefficients are entries of `aux`.
    aux: the per-token operands of `token_loss`.
    strategy: ``"recompute"`` or ``"store"`` (``reduction`` ``"mean"`` or ``"sum"``).
    reduction: ``"none"``, ``"sum"`` or ``"mean"``.
    denominators: gives ``{coefficient name: denominator}`` of ``"mean"``
      (`mean_denominators`); called for ``"mean"`` only (before the sweep
      with "store", after it with "recompute").
    keep: with "store", the kernel rows to return (without gradient).

  Returns:
    The loss, and the kernel's rows: all of them with "recompute" (`run_tokens`),
    those in `keep` with "store".
  """
  if strategy == "store":
    dens = denominators() if reduction == "mean" else {}
    ops = dataclasses.replace(call.ops, aux=aux)
    return store_and_reduce(ops, call.tiling, kernel, token_loss, dens, keep)
  out = run_tokens(call, kernel)
  terms = token_loss.terms(out, aux)
  dens = denominators() if reduction == "mean" else {}
  return reduce_terms(terms, reduction, dens, call.tokens.batch_shape), out


def store_and_reduce(
  ops: Operands,
  tiling: Tiling,
  kernel: Kernel,
  token_loss: TokenLoss,
  denominators: dict,
  keep: tuple = (),
):
  """`(loss, kept rows)` of strategy "store": `token_loss` summed over `ops` in one sweep.

  Each coefficient ``ops.aux[name]`` that has a ``denominators[name]`` (those
  of ``"mean"``; none for ``"sum"``) is divided by it beforehand (by 1 where it
  is 0), so that the sweep's sum is the mean; the loss is NaN where a
  denominator is 0 (the empty-mean rule). `keep` as in `run_and_reduce`. An
  entry point without a `Call` (the sigmoid contrastive loss) calls it directly.
  """
  scaled = {k: ops.aux[k] / jnp.where(d == 0, 1.0, d) for k, d in denominators.items()}
  ops = dataclasses.replace(ops, aux={**ops.aux, **scaled})
  total, kept = run_store(ops, kernel, tiling, token_loss, keep)
  empty = functools.reduce(
    jnp.logical_or, [d == 0 for d in denominators.values()], jnp.bool_(False)
  )
  return jnp.where(empty, jnp.nan, total), lax.stop_gradient(kept)
