"""Vocabulary-parallel cross-entropy over a device mesh (the Megatron recipe).

When the output layer is sharded over its vocabulary (tensor parallelism),
no device should ever hold a whole row of logits. Each device computes, on
its own vocabulary shard, the row maximum, the sum of exponentials and (where
the label falls in its shard) the label logit; three all-reductions over the
vocabulary axis (`lax.pmax`, then `lax.psum` of the rescaled sums and of the
label logits) give every device the global log-sum-exp, and the backward pass
needs only the local softmax shard. The fused version runs
`xentjax.linear_softmax_cross_entropy`'s tiled kernels on each shard of `w`,
so neither the logits nor the vocabulary are ever gathered: the only
collectives are all-reductions of per-token vectors, of the ``[tokens, D]``
gradient of `x` (over the vocabulary axis) and of each ``[D, vocab_chunk]``
block of the gradient of `w` (over the data axis).

Both functions use `jax.shard_map` over a `jax.sharding.Mesh` and work inside
or outside `jit`. Inputs are resharded to the layout below if they are not
already in it; gradients come back in that layout.

* ``x`` / ``logits`` and ``labels``: leading (batch) axis sharded over
  ``data_axis`` (``None``: replicated), ``logits`` last axis over ``vocab_axis``.
* ``w``: vocabulary axis sharded over ``vocab_axis``, replicated over ``data_axis``.

Multi-host use: call ``jax.distributed.initialize()`` on every host first
(with ``coordinator_address``, ``num_processes`` and ``process_id``, or
without arguments on Cloud TPU and SLURM where they are detected), build the
mesh from ``jax.devices()`` (all hosts' devices, e.g. with
``jax.make_mesh((n_data, n_vocab), ("data", "vocab"))``), and pass global
arrays (``jax.make_array_from_process_local_data`` or
``jax.make_array_from_single_device_arrays``); every host runs the same
program. Put ``vocab_axis`` on devices within one host (fast interconnect):
it carries all-reductions in every step, the data axis only the gradient of
``w``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from xentjax import _validation as V
from xentjax._fused import Strategy, WLayout, linear_ce_impl, place

__all__ = ["linear_softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels"]


def _axis_sizes(mesh, data_axis, vocab_axis) -> tuple[int, int]:
  """Sizes of the two mesh axes; a clear error when the mesh lacks them."""
  names = getattr(mesh, "axis_names", None)
  if names is None:
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  shape = dict(mesh.shape)

  def size(arg, axis):
    axes = axis if isinstance(axis, tuple) else (axis,)
    for a in axes:
      if a not in shape:
        raise ValueError(
            f"`{arg}`={axis!r} is not an axis of the mesh, whose axes are "
            f"{dict(shape)}. Pass the name of an existing mesh axis."
        )
    return math.prod(shape[a] for a in axes)

  if vocab_axis is None:
    raise ValueError("`vocab_axis` must name a mesh axis (the vocabulary is sharded over it).")
  n_vocab = size("vocab_axis", vocab_axis)
  n_data = 1 if data_axis is None else size("data_axis", data_axis)
  if data_axis is not None and set(V.as_sequence(data_axis)) & set(V.as_sequence(vocab_axis)):
    raise ValueError(f"`data_axis`={data_axis!r} and `vocab_axis`={vocab_axis!r} must differ.")
  return n_data, n_vocab


def linear_softmax_cross_entropy(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    mesh: jax.sharding.Mesh,
    data_axis: str | None = "data",
    vocab_axis: str = "vocab",
    reduction: str = "mean",
    ignore_index: int = -100,
    where: jax.typing.ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_soft_cap: float | None = None,
    return_lse: bool = False,
    strategy: Strategy = "recompute",
    w_layout: WLayout = "dv",
    vocab_size: int | None = None,
    token_chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    precision: Any = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""`xentjax.linear_softmax_cross_entropy` with `w` sharded over its vocabulary.

  Same loss, options and results as the single-device function (see there for
  the formula, the options and the edge cases); only the placement differs.
  Device :math:`(i, k)` of the mesh holds tokens shard :math:`i` and
  vocabulary shard :math:`k` (columns :math:`[kV/K, (k+1)V/K)`) and computes
  its local running maximum :math:`m_k`, scaled sum :math:`s_k`, label logit
  and logit sum; then

  .. math::

    m = \max_k m_k, \qquad
    \mathrm{lse} = m + \log \sum_k s_k\, e^{m_k - m}

  (`lax.pmax`, `lax.psum` over ``vocab_axis``). The backward pass recomputes
  (or, with ``strategy="store"``, reuses) the local softmax shard; the
  gradient of ``x`` is a `lax.psum` over ``vocab_axis`` and the gradient of
  ``w`` a `lax.psum` over ``data_axis``, per vocabulary chunk, in float32.

  Args:
    x: hidden states ``[B, ..., D]``; ``B * ...`` (the number of tokens) must
      be divisible by the size of ``data_axis``.
    w: ``[D, V]`` (or ``[V, D]`` with ``w_layout="vd"``); ``V`` must be
      divisible by the size of ``vocab_axis``: otherwise pad ``w`` with zero
      columns and pass ``vocab_size`` (the error message says by how much).
    labels: integer classes ``[B, ...]``.
    mesh: the `jax.sharding.Mesh` to run on.
    data_axis: mesh axis (or tuple of axes) the tokens are sharded over, or
      ``None`` for replicated tokens.
    vocab_axis: mesh axis (or tuple of axes) the vocabulary is sharded over.
    reduction, ignore_index, where, label_smoothing, z_loss: as in
      `xentjax.linear_softmax_cross_entropy`.
    logit_soft_cap, return_lse, strategy, w_layout, vocab_size: likewise.
    token_chunk_size, vocab_chunk_size, precision: likewise; chunk sizes
      refer to the per-device shard.

  Returns:
    As `xentjax.linear_softmax_cross_entropy`: a scalar (replicated) for
    ``"mean"``/``"sum"``, per-token ``[B, ...]`` sharded over ``data_axis``
    for ``"none"``; ``(loss, lse)`` with ``return_lse=True``. The gradients of
    ``x`` and ``w`` are sharded like the layout above.

  Note:
    The vocabulary is never gathered: the compiled program contains no
    all-gather of ``w`` or of logits (checked in the test suite on 8 CPU
    devices). Out-of-range labels give NaN and all-ignored batches 0 with zero
    gradients, as on one device.

  References:
    Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language
    Models Using Model Parallelism", 2019 (vocabulary-parallel cross-entropy).
  """
  n_data, n_vocab = _axis_sizes(mesh, data_axis, vocab_axis)
  return linear_ce_impl(
      x, w, labels, reduction=reduction, ignore_index=ignore_index, where=where,
      label_smoothing=label_smoothing, z_loss=z_loss, logit_soft_cap=logit_soft_cap,
      return_lse=return_lse, strategy=strategy, w_layout=w_layout, vocab_size=vocab_size,
      token_chunk_size=token_chunk_size, vocab_chunk_size=vocab_chunk_size,
      precision=precision, mesh=mesh, data_axis=data_axis, vocab_axis=vocab_axis,
      vocab_shards=n_vocab, data_shards=n_data,
  )


# ----------------------------------------------------------------------------
# Logits already sharded over the vocabulary.


@dataclasses.dataclass(frozen=True)
class _ShardedLogits:
  mesh: Any
  data_axis: Any
  vocab_axis: Any
  num_classes: int


def _specs(cfg: _ShardedLogits):
  return P(cfg.data_axis, cfg.vocab_axis), P(cfg.data_axis)


def _local_stats(z, labels, cfg: _ShardedLogits):
  """Global lse and label logit of local logits `[n, V/K]` (float32 or wider)."""
  offset = lax.axis_index(cfg.vocab_axis) * z.shape[1]
  col = offset + lax.broadcasted_iota(jnp.int32, (1, z.shape[1]), 1)
  m = lax.pmax(jnp.max(z, axis=1), cfg.vocab_axis)
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  s = jnp.sum(jnp.exp(z - m_safe[:, None]), axis=1)
  zy = jnp.sum(jnp.where(col == labels[:, None], z, 0.0), axis=1)
  s, zy = lax.psum((s, zy), cfg.vocab_axis)
  return m_safe + jnp.log(s), zy, col


def _bad(labels, cfg: _ShardedLogits):
  return (labels < 0) | (labels >= cfg.num_classes)


def _logits_fwd_local(logits, labels, cfg: _ShardedLogits):
  z = logits.astype(V.compute_dtype(logits.dtype))
  lse, zy, _ = _local_stats(z, labels, cfg)
  return jnp.where(_bad(labels, cfg), jnp.nan, lse - zy), lse


def _logits_bwd_local(logits, labels, lse, g, cfg: _ShardedLogits):
  z = logits.astype(lse.dtype)
  col = lax.axis_index(cfg.vocab_axis) * z.shape[1] + lax.broadcasted_iota(
      jnp.int32, (1, z.shape[1]), 1)
  g = jnp.where(_bad(labels, cfg), jnp.nan, g.astype(lse.dtype))
  p = jnp.exp(z - lse[:, None])
  dz = g[:, None] * (p - (col == labels[:, None]).astype(p.dtype))
  return dz.astype(logits.dtype)


def _shard(fn, cfg, in_specs, out_specs):
  return jax.shard_map(
      functools.partial(fn, cfg=cfg), mesh=cfg.mesh, in_specs=in_specs,
      out_specs=out_specs, check_vma=False,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sharded_ce(logits, labels, cfg: _ShardedLogits):
  return _sharded_ce_fwd(logits, labels, cfg)[0]


def _sharded_ce_fwd(logits, labels, cfg: _ShardedLogits):
  zs, ts = _specs(cfg)
  loss, lse = _shard(_logits_fwd_local, cfg, (zs, ts), (ts, ts))(logits, labels)
  return loss, (logits, labels, lse)


def _sharded_ce_bwd(cfg: _ShardedLogits, res, g):
  logits, labels, lse = res
  zs, ts = _specs(cfg)
  dz = _shard(_logits_bwd_local, cfg, (zs, ts, ts, ts), zs)(logits, labels, lse, g)
  return dz, None


_sharded_ce.defvjp(_sharded_ce_fwd, _sharded_ce_bwd)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    mesh: jax.sharding.Mesh,
    data_axis: str | None = "data",
    vocab_axis: str = "vocab",
) -> jax.Array:
  r"""Per-example softmax cross-entropy of logits sharded over the vocabulary.

  The vocabulary-parallel counterpart of
  `optax.softmax_cross_entropy_with_integer_labels`:

  .. math::

    \ell = \log \sum_{j=1}^{V} e^{z_j} - z_y,

  computed from the local shards of ``logits`` with one `lax.pmax` and one
  `lax.psum` over ``vocab_axis``; the gradient ``softmax(z) - onehot(y)`` is
  formed shard by shard with no communication at all.

  Args:
    logits: ``[B, ..., V]``, ``B`` sharded over ``data_axis`` and ``V`` over
      ``vocab_axis`` (both must be divisible by the axis sizes).
    labels: integer classes ``[B, ...]``.
    mesh: the `jax.sharding.Mesh`.
    data_axis: mesh axis of the batch, or ``None`` (replicated batch).
    vocab_axis: mesh axis of the vocabulary.

  Returns:
    Per-example losses ``[B, ...]`` sharded over ``data_axis``, float32 for
    16-bit logits (else the logits' dtype). The gradient has the logits'
    sharding and dtype.

  Note:
    A label outside ``[0, V)`` gives NaN (loss and gradient), not the finite
    number optax returns. Reduce (mean over a mask, ...) with ordinary `jnp`
    operations on the result.

  References:
    Shoeybi et al., "Megatron-LM", 2019.
  """
  n_data, n_vocab = _axis_sizes(mesh, data_axis, vocab_axis)
  V.check_floating("logits", logits)
  V.check_integer("labels", labels)
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
    raise ValueError(
        f"`labels` must have the shape of `logits` without its last axis, got "
        f"labels.shape={labels.shape} and logits.shape={logits.shape}."
    )
  num_classes = logits.shape[-1]
  if num_classes % n_vocab:
    raise ValueError(
        f"The vocabulary of `logits` (logits.shape={logits.shape}, V={num_classes}) is not "
        f"divisible by the {n_vocab} devices of mesh axis {vocab_axis!r}; compute the logits "
        "from a vocabulary padded to a multiple of it and give padding columns the value -inf."
    )
  batch_shape = labels.shape
  n = math.prod(batch_shape)
  if n % n_data:
    raise ValueError(
        f"The {n} examples of `labels` (labels.shape={batch_shape}) are not divisible by the "
        f"{n_data} devices of mesh axis {data_axis!r}."
    )
  cfg = _ShardedLogits(mesh, data_axis, vocab_axis, num_classes)
  zs, ts = _specs(cfg)
  logits = place(logits.reshape(n, num_classes), mesh, zs)
  labels = place(labels.reshape(n).astype(jnp.int32), mesh, ts)
  loss = _sharded_ce(logits, labels, cfg)
  return loss.reshape(batch_shape)
