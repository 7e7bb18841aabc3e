"""Vocabulary-parallel cross-entropy over a device mesh (the Megatron recipe).

When the output layer is sharded over its vocabulary (tensor parallelism),
no device should ever hold a whole row of logits. Each device computes, on
its own vocabulary shard, the row maximum, the sum of exponentials and (where
the label falls in its shard) the label logit; three all-reductions over the
vocabulary axis (`lax.pmax`, then `lax.psum` of the rescaled sums and of the
label logits) give every device the global log-sum-exp, and the backward pass
needs only the local softmax shard. The fused version runs
`xentjax.linear_softmax_cross_entropy`'s tiled sweep on each shard of `w`,
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

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from xentjax import _core
from xentjax import _validation as V
from xentjax._api import public, public_like
from xentjax._vocab import cross_entropy, token_stats
from xentjax._vocab.engine import recompute_logits
from xentjax._vocab.kernels.softmax_stats import SoftmaxStats
from xentjax._vocab.options import validators
from xentjax._vocab.placement import Placement, place, require_vocab_axis, working_mesh
from xentjax._vocab.tiles import Tiling

__all__ = [
  "linear_softmax_cross_entropy",
  "linear_token_stats",
  "softmax_cross_entropy_with_integer_labels",
]


def vocab_parallel(single, returns: str):
  """Declare the vocabulary-parallel version of the public `single`, named and documented by a stub.

  The declared function takes `single`'s arguments with the placement
  keywords first (``mesh`` required, ``data_axis`` and ``vocab_axis``
  defaulting to "data" and "vocab"; `xentjax._api.public_like` derives the
  signature), checks the placement (`placement.require_vocab_axis`) and calls
  `single` with them. The stub gives its name and docstring; `returns` is the
  return annotation.
  """

  def deco(stub):
    def placed(
      x,
      w,
      labels,
      *,
      mesh: jax.sharding.Mesh,
      data_axis: Any = "data",
      vocab_axis: Any = "vocab",
      **options,
    ):
      require_vocab_axis(mesh, data_axis, vocab_axis)
      return single(x, w, labels, mesh=mesh, data_axis=data_axis, vocab_axis=vocab_axis, **options)

    for name in ("__module__", "__name__", "__qualname__", "__doc__"):
      setattr(placed, name, getattr(stub, name))
    placed.__annotations__ = {**placed.__annotations__, "return": returns}
    return public_like(single, validators=validators())(placed)

  return deco


@vocab_parallel(cross_entropy.linear_softmax_cross_entropy, returns="jax.Array | tuple")
def linear_softmax_cross_entropy():
  r"""`xentjax.linear_softmax_cross_entropy` with `w` sharded over its vocabulary.

  The single-device function with its placement keywords first and
  required (``mesh``; ``data_axis`` and ``vocab_axis`` default to "data" and
  "vocab"); every other keyword is the single-device function's, with the same
  formula, results and edge cases.
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
    reduction: and every keyword after it (``ignore_index``, ``where``,
      ``weights``, ``class_weights``, ``denominator``, ``label_smoothing``,
      ``z_loss``, ``logit_soft_cap``, ``temperature``, ``bias``, ``filter_eps``,
      ``vocab_order`` (only with a ``vocab_axis`` of one device), ``return_lse``,
      ``return_stats``, ``strategy``, ``w_layout``, ``vocab_size``,
      ``token_chunk_size``, ``vocab_chunk_size``, ``precision``): as in
      `xentjax.linear_softmax_cross_entropy`; chunk sizes refer to the
      per-device shard.

  Returns:
    As `xentjax.linear_softmax_cross_entropy`: a scalar (replicated) for
    ``"mean"``/``"sum"``, per-token ``[B, ...]`` sharded over ``data_axis``
    for ``"none"``; ``(loss, lse)`` with ``return_lse=True``, ``(loss, stats)``
    with ``return_stats=True`` (per-token statistics sharded over
    ``data_axis``, combined across vocabulary shards from per-token numbers). The gradients of
    ``x`` and ``w`` are sharded like the layout above.

  Note:
    The vocabulary is never gathered: the compiled program contains no
    all-gather of ``w`` or of logits (checked in the test suite on 8 CPU
    devices).

  References:
    Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language
    Models Using Model Parallelism", 2019 (vocabulary-parallel cross-entropy).
  """


@vocab_parallel(token_stats.linear_token_stats, returns="token_stats.TokenStats")
def linear_token_stats():
  """`xentjax.linear_token_stats` with `w` sharded over its vocabulary.

  The single-device function with its placement keywords first and required
  (``mesh``; ``data_axis`` and ``vocab_axis`` default to "data" and "vocab");
  every other keyword is the single-device function's. Entropy, argmax and top-k are combined across
  vocabulary shards from per-token vectors (the top-k from ``k`` candidates
  per shard, all-gathered: ``k`` numbers per token and shard), never from
  gathered logits.

  Args:
    x, w, labels: as in `xentjax.linear_token_stats`.
    mesh: the `jax.sharding.Mesh` to run on.
    data_axis: mesh axis (or axes) of the tokens, or ``None``.
    vocab_axis: mesh axis (or axes) of the vocabulary.
    temperature: and every keyword after it (``top_k``, ``bias``,
      ``ignore_index``, ``where``, ``logit_soft_cap``, ``support``, ``w_layout``,
      ``vocab_size``, ``token_chunk_size``, ``vocab_chunk_size``,
      ``precision``): as in `xentjax.linear_token_stats`.

  Returns:
    As `xentjax.linear_token_stats`.
  """


# ----------------------------------------------------------------------------
# Logits already sharded over the vocabulary: one tile per device.


@public(static=("mesh", "data_axis", "vocab_axis"))
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
  n_data, n_vocab = require_vocab_axis(mesh, data_axis, vocab_axis)
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
  mesh = working_mesh(mesh, logits, labels)
  placement = Placement(mesh, data_axis, vocab_axis)
  tiling = Tiling(
    num_classes,
    num_classes,
    vd=False,
    token_chunk=1,
    vocab_chunk=1,
    placement=placement,
    cdt=V.compute_dtype(logits.dtype),
  )
  status = _core.label_status(labels, num_classes)
  logits = place(logits.reshape(n, num_classes), mesh, P(data_axis, vocab_axis))
  index = place(status.index.reshape(n), mesh, P(data_axis))
  out = recompute_logits(logits, {"labels": index}, SoftmaxStats(), tiling)
  loss = out["log_s"] - out["zy"]
  return (loss * jnp.where(status.bad.reshape(n), jnp.nan, 1.0)).reshape(batch_shape)
