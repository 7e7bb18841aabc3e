"""The large-vocabulary engine: every loss that sweeps ``[tokens x vocabulary]`` tiles.

For N tokens and a vocabulary of V words the logits ``x @ w`` hold N·V
numbers (8 GiB in float32 at N = 8192, V = 262,144) and their gradient as
many again. Cross-entropy, per-token statistics and distillation need only a
few numbers per token, so they are computed tile by tile and the logits are
never formed. The package, bottom up (each module names its own helpers
without a leading underscore; privacy is the package's, as in optimistix):

``placement``
  Where a sweep runs: one device, or a mesh with the tokens over a data axis
  and the vocabulary over a vocabulary axis (`jax.shard_map` specs from
  where an array sits in the `placement.Operands`, never from its name,
  `place`, and the collectives a kernel combines its shards with).
``tiles``
  The logit tile ``a = c tanh((x w + b) / c) / T`` with padding at ``-inf``
  (bias, soft cap, temperature and padding applied here only), the cotangent
  back through them (including ``dL/dT`` for a traced temperature), the
  gradient matmuls, the tile sizes and `tiles.fold`, the one chunked loop.
``kernel``
  The typed kernel interface: the abstract class `kernel.Kernel`, the types
  of its rows, state and tile cotangent, and `kernel.LogSumExp`.
``engine``
  The sweep, written once: the forward passes, the recompute backward pass
  (a `jax.custom_vjp`), strategy "store" (loss and gradients in one pass),
  gradient filtering and the placement. It takes a `kernel.Kernel`.
``kernels``
  What is computed: `kernels.softmax_stats.SoftmaxStats` (cross-entropy and
  token statistics), `kernels.distillation` (forward/reverse KL,
  generalized JSD and its scaled form, total variation, top-k logits) and
  `kernels.contrastive` (CLIP, SigLIP, NT-Xent); `kernels.rowwise.RowFunction`,
  the whole-row adapter, runs any function of a token's row of logits, its
  tile cotangent from `jax.vjp`. A kernel has no loop and no custom VJP.
``options``, ``inputs``
  The option checks the entry points share (the contrastive and distillation
  modules check their own options), and `inputs.prepare_call`: the checked, flattened
  tokens, the static `tiles.Tiling` and the operands of a sweep.
``reduce``
  The step the entry points share: `reduce.run_and_reduce` runs a kernel by
  strategy ("recompute" or "store") and reduces a per-token loss (``"none"``,
  ``"sum"``, ``"mean"`` over its own denominators or the caller's
  ``denominator``, NaN for a mean over nothing); `reduce.run_tokens` and
  `reduce.counted_only` for the entry points that return per-token values.
``cross_entropy``, ``token_stats``, ``distillation``, ``contrastive``, ``rowwise``
  The public entry points: checks, one kernel, and ordinary differentiable
  JAX code on the kernel's per-token outputs (masks, weights, mixing,
  reduction). `xentjax.parallel` forwards to the first two with a required
  mesh (its signatures derived from theirs: `xentjax._api.public_like`).

The kernel interface (``kernel``: the abstract class `kernel.Kernel`, the
types of its rows and state, and `kernel.LogSumExp`, the online
log-sum-exp state the kernels share). A kernel is a frozen dataclass
(hashable: static) deriving from `kernel.Kernel`, and says

* ``init(p, n, n_cols, tiling, cdt)``: the state pass ``p`` accumulates, a
  per-token dict and a per-column dict;
* ``update(p, state, tile, rows)``: the state after one more `tiles.Tile`
  (``tile.a`` the tempered logits, ``tile.z`` the untempered ones,
  ``tile.b`` a teacher's, ``tile.col`` the column indices, ``tile.cols`` the
  per-column operands; ``rows`` the tile's per-token operands);
* ``finish(p, state, rows, tiling)``: per-token rows of the whole vocabulary,
  the shards combined with `kernel.LogSumExp.combine` (or
  `placement.vocab_sum`/...);
* ``outputs``, ``differentiable``, ``saved``: what the caller gets, which of
  those carry cotangents, what the backward pass reads;
* ``cotangent(tile, rows)``: the cotangent of the tile's logits from the
  outputs' cotangents (`kernel.grad` ``(rows, name)``).

Adding a quantity is one kernel of about 80 lines and one entry point::

  out = reduce.run_tokens(call, MyKernel(...))  # {name: [n]}
  loss = my_per_token_formula(out)  # ordinary JAX, differentiable

(`reduce.run_and_reduce` reduces a per-token loss by either strategy; with
"store" it runs inside the engine's one-pass sweep, `engine.run_store`.)
A quantity that is one function of a whole row of logits needs no kernel of
its own: ``RowFunction(fn, operands)`` (`kernels.rowwise`) runs it, and
`xentjax.linear_row_loss` is its entry point.
Operands (`placement.Operands`, a frozen dataclass registered as a pytree,
whose fields fix each array's sharding): ``Operands(x=[n, D], w=head,
rows={per-token [n, ...]}, cols={per-column [V, ...]}, bias=[V]?,
teacher_x=?, teacher_w=?, teacher_bias=[V]?, aux={per-token, "store"})``,
updated with `dataclasses.replace`, ``ops.with_rows(...)`` and
``ops.with_cols(...)``;
``rows[tiles.TEMPERATURE]`` (``[n]``, `tiles.traced_temperature`) is a traced
temperature, and gets a gradient. The compute dtype is ``tiling.cdt``.

Contrastive losses (``scale * a @ b.T``) are built this way
(`kernels.contrastive`, entry points in ``contrastive``): the head is ``b``
in the "vd" layout (the columns are the candidates), the scale a traced
temperature ``T = 1/scale``. The CLIP kernel keeps per-column log-sum-exps in
the per-column state (both directions from one sweep), NT-Xent runs two
passes, SigLIP runs with strategy "store". With a mesh they use the ring
placement (``Placement(ring=True)``: ``a`` and ``b`` both sharded over the
data axis, ``b``'s shards passed around with `lax.ppermute` with their column
state, and in the backward pass their gradient).
"""
