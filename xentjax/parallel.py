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

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from xentjax import _core, _fused, _token_stats
from xentjax import _validation as V
from xentjax._tiles import _mesh_axes, place

__all__ = [
  "linear_softmax_cross_entropy",
  "linear_token_stats",
  "softmax_cross_entropy_with_integer_labels",
]


def _require_vocab_axis(mesh, data_axis, vocab_axis):
  if vocab_axis is None:
    raise ValueError("`vocab_axis` must name a mesh axis (the vocabulary is sharded over it).")
  return _mesh_axes(mesh, data_axis, vocab_axis)


def _on_mesh(fn, doc: str):
  """`fn` with the placement keywords required, defaulting to "data" and "vocab"."""

  def placed(
    x: jax.typing.ArrayLike,
    w: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    mesh: jax.sharding.Mesh,
    data_axis: Any = "data",
    vocab_axis: Any = "vocab",
    **options: Any,
  ):
    _require_vocab_axis(mesh, data_axis, vocab_axis)
    return fn(x, w, labels, mesh=mesh, data_axis=data_axis, vocab_axis=vocab_axis, **options)

  placed.__name__ = placed.__qualname__ = fn.__name__
  placed.__doc__ = doc
  return placed


linear_softmax_cross_entropy = _on_mesh(
  _fused.linear_softmax_cross_entropy,
  r"""`xentjax.linear_softmax_cross_entropy` with `w` sharded over its vocabulary.

  ``linear_softmax_cross_entropy(x, w, labels, *, mesh, data_axis="data",
  vocab_axis="vocab", **options)``: the single-device function with its
  placement options required; every other keyword (``reduction``, ``where``,
  ``weights``, ``class_weights``, ``bias``, ``temperature``, ``filter_eps``,
  ...) is passed through, with the same formula, results and edge cases.
  Device :math:`(i, k)` of the mesh holds tokens shard :math:`i` and
  vocabulary shard :math:`k` (columns :math:`[kV/K, (k+1)V/K)`) and runs the
  fused engine on it; its local running maximum :math:`m_k` and scaled sum
  :math:`s_k` combine as

  .. math::

    m = \max_k m_k, \qquad
    \mathrm{lse} = m + \log \sum_k s_k\, e^{m_k - m}

  (`lax.pmax`, `lax.psum` over ``vocab_axis``), and so do the label logit and
  the other statistics. The backward pass recomputes (or, with
  ``strategy="store"``, reuses) the local softmax shard; the gradient of
  ``x`` is a `lax.psum` over ``vocab_axis`` and the gradient of ``w`` a
  `lax.psum` over ``data_axis``, per vocabulary chunk, in float32.

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
    **options: the keyword options of `xentjax.linear_softmax_cross_entropy`;
      chunk sizes refer to the per-device shard.

  Returns:
    As `xentjax.linear_softmax_cross_entropy`: a scalar (replicated) for
    ``"mean"``/``"sum"``, per-token ``[B, ...]`` sharded over ``data_axis``
    for ``"none"``; ``(loss, lse)`` with ``return_lse=True``. The gradients of
    ``x`` and ``w`` are sharded like the layout above.

  Note:
    The vocabulary is never gathered: the compiled program contains no
    all-gather of ``w`` or of logits (checked in the test suite on 8 CPU
    devices).

  References:
    Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language
    Models Using Model Parallelism", 2019 (vocabulary-parallel cross-entropy).
  """,
)

linear_token_stats = _on_mesh(
  _token_stats.linear_token_stats,
  """`xentjax.linear_token_stats` with `w` sharded over its vocabulary.

  ``linear_token_stats(x, w, labels, *, mesh, data_axis="data",
  vocab_axis="vocab", **options)``: the single-device function with its
  placement options required. Entropy, argmax and top-k are combined across
  vocabulary shards from per-token vectors (the top-k from ``k`` candidates
  per shard, all-gathered: ``k`` numbers per token and shard), never from
  gathered logits.
  """,
)


# ----------------------------------------------------------------------------
# Logits already sharded over the vocabulary.


def _logits_config(mesh, data_axis, vocab_axis, num_classes) -> _fused._Config:
  """The engine's configuration for logits given as one tile per device."""
  return _fused._Config(
    num_classes=num_classes,
    num_columns=num_classes,
    soft_cap=None,
    vd=False,
    token_chunk=1,
    vocab_chunk=1,
    precision=None,
    mesh=mesh,
    data_axis=data_axis,
    vocab_axis=vocab_axis,
  )


def _specs(cfg: _fused._Config):
  return P(cfg.data_axis, cfg.vocab_axis), P(cfg.data_axis)


def _logits_fwd_local(z, labels, cfg: _fused._Config):
  """`(lse - z_y, lse)` of local logits `[n, V/K]`, from the engine's shifted statistics."""
  z = z.astype(V.compute_dtype(z.dtype))
  col = _fused._vocab_offset(cfg, z.shape[1]) + lax.broadcasted_iota(jnp.int32, (1, z.shape[1]), 1)
  st = _fused._update(
    _fused._init_state(z.shape[0], cfg, z.dtype, 1), z, col, labels, None, 0.0, 0, cfg
  )
  stats, _ = _fused._finish(st, None, cfg)
  return stats.log_s - stats.zy, stats.m + stats.log_s


def _logits_bwd_local(logits, labels, lse, g, cfg: _fused._Config):
  z = logits.astype(lse.dtype)
  col = _fused._vocab_offset(cfg, z.shape[1]) + lax.broadcasted_iota(jnp.int32, (1, z.shape[1]), 1)
  p = jnp.exp(z - lse[:, None])
  dz = g.astype(lse.dtype)[:, None] * (p - (col == labels[:, None]).astype(p.dtype))
  return dz.astype(logits.dtype)


def _shard(fn, cfg, in_specs, out_specs):
  return jax.shard_map(
    functools.partial(fn, cfg=cfg),
    mesh=cfg.mesh,
    in_specs=in_specs,
    out_specs=out_specs,
    check_vma=False,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sharded_ce(logits, labels, cfg: _fused._Config):
  return _sharded_ce_fwd(logits, labels, cfg)[0]


def _sharded_ce_fwd(logits, labels, cfg: _fused._Config):
  zs, ts = _specs(cfg)
  loss, lse = _shard(_logits_fwd_local, cfg, (zs, ts), (ts, ts))(logits, labels)
  return loss, (logits, labels, lse)


def _sharded_ce_bwd(cfg: _fused._Config, res, g):
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
  n_data, n_vocab = _require_vocab_axis(mesh, data_axis, vocab_axis)
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
  cfg = _logits_config(mesh, data_axis, vocab_axis, num_classes)
  zs, ts = _specs(cfg)
  status = _core.label_status(labels, num_classes)
  logits = place(logits.reshape(n, num_classes), mesh, zs)
  index = place(status.index.reshape(n), mesh, ts)
  loss = _sharded_ce(logits, index, cfg)
  return (loss * jnp.where(status.bad.reshape(n), jnp.nan, 1.0)).reshape(batch_shape)
