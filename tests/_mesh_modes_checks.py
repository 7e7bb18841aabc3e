"""Every `mesh=` entry point in every mode a user calls it in (run as a subprocess).

`tests/test_mesh_modes.py` runs this file with 8 simulated CPU devices and
asserts on the JSON it prints: one entry per entry point and mode, "ok" or
the failure. A mode is how the gradient is taken -- eagerly (`jax.grad` with
no `jit` and no mesh context), under `jax.jit`, or eagerly under
`jax.set_mesh` -- times the mesh's axis types (`jax.make_mesh`'s default,
`Explicit`, and `Auto`). Each compares the value and every gradient (of the
inputs, and of a learned log-scale, bias or temperature) with the same
function on one device, on plain (unplaced) inputs, as JAX's own examples
pass them.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from _harness import close, recorder
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import xentjax
import xentjax.parallel as par

jax.config.update("jax_numpy_rank_promotion", "raise")

RESULTS = {}
check = recorder(RESULTS)

MESHES = {
  "explicit": jax.make_mesh((2, 4), ("data", "vocab")),  # JAX's default axis types
  "auto": jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(AxisType.Auto,) * 2),
}
MODES = ("eager", "jit", "set_mesh")

R = np.random.default_rng(0)
T, D, V = 8, 6, 16  # 8 tokens over 2 data shards, 16 classes over 4 vocabulary shards
X = R.normal(size=(T, D)).astype(np.float32)
W = (0.5 * R.normal(size=(D, V))).astype(np.float32)
TW = (0.5 * R.normal(size=(D, V))).astype(np.float32)
Y = R.integers(0, V, size=T).astype(np.int32)
A = R.normal(size=(T, D)).astype(np.float32)
B = R.normal(size=(T, D)).astype(np.float32)
LOGITS = (2.0 * R.normal(size=(T, V))).astype(np.float32)
TOPK_INDICES = np.argsort(-(X[::-1] @ TW), axis=1)[:, :3].astype(np.int32)
TOPK_LOGPROBS = np.log(np.array([0.5, 0.3, 0.1], np.float32))[None].repeat(T, 0)
CHUNKS = {"token_chunk_size": 2, "vocab_chunk_size": 2}
RING = {"row_chunk_size": 2, "column_chunk_size": 2}


def summed(stats):
  """A scalar of every differentiable statistic of `xentjax.linear_token_stats`."""
  return jnp.sum(stats.logprob) + 0.5 * jnp.sum(stats.entropy) + jnp.sum(stats.top_k_logprobs)


# name -> (loss(*params, **placement), params, placement keywords): the loss
# is a scalar, differentiated with respect to every parameter.
ENTRY_POINTS = {
  "parallel_linear_softmax_cross_entropy": (
    lambda x, w, **m: (
      par.linear_softmax_cross_entropy(x, w, Y, **m, **CHUNKS)
      if m
      else xentjax.linear_softmax_cross_entropy(x, w, Y, **CHUNKS)
    ),
    (X, W),
    {"data_axis": "data", "vocab_axis": "vocab"},
  ),
  "parallel_linear_token_stats": (
    lambda x, w, log_t, **m: summed(
      (par.linear_token_stats if m else xentjax.linear_token_stats)(
        x, w, Y, temperature=jnp.exp(log_t), top_k=2, **m, **CHUNKS
      )
    ),
    (X, W, np.float32(0.2)),
    {"data_axis": "data", "vocab_axis": "vocab"},
  ),
  "parallel_softmax_cross_entropy_with_integer_labels": (
    lambda z, **m: jnp.sum(
      par.softmax_cross_entropy_with_integer_labels(z, Y, **m)
      if m
      else xentjax.softmax_cross_entropy_with_integer_labels(z, Y)
    ),
    (LOGITS,),
    {"data_axis": "data", "vocab_axis": "vocab"},
  ),
  "linear_distillation_loss": (
    lambda x, w, **m: xentjax.linear_distillation_loss(
      x, w, X[::-1], TW, Y, hard_weight=0.3, **m, **CHUNKS
    ),
    (X, W),
    {"data_axis": "data", "vocab_axis": "vocab"},
  ),
  "linear_topk_distillation_loss": (
    lambda x, w, **m: xentjax.linear_topk_distillation_loss(
      x, w, TOPK_INDICES, TOPK_LOGPROBS, Y, hard_weight=0.3, **m, **CHUNKS
    ),
    (X, W),
    {"data_axis": "data", "vocab_axis": "vocab"},
  ),
  "contrastive_loss_learned_log_scale": (
    lambda a, b, log_s, **m: xentjax.contrastive_loss(a, b, scale=jnp.exp(log_s), **m, **RING),
    (A, B, np.float32(0.7)),
    {"data_axis": "data"},
  ),
  "sigmoid_contrastive_loss_learned_log_scale_and_bias": (
    lambda a, b, log_s, bias, **m: xentjax.sigmoid_contrastive_loss(
      a, b, scale=jnp.exp(log_s), bias=bias, **m, **RING
    ),
    (A, B, np.float32(0.4), np.float32(-1.5)),
    {"data_axis": "data"},
  ),
  "mutual_information_bounds_learned_log_scale_and_bias": (
    lambda a, b, log_s, bias, **m: jnp.sum(
      jnp.asarray([1.0, 0.5, -0.25, 2.0])
      * jnp.stack(
        xentjax.info.mutual_information_bounds(a, b, scale=jnp.exp(log_s), bias=bias, **m, **RING)
      )
    ),
    (A, B, np.float32(0.4), np.float32(-1.5)),
    {"data_axis": "data"},
  ),
  "ntxent_learned_temperature": (
    lambda a, log_t, **m: xentjax.ntxent(a, Y % 3, temperature=jnp.exp(log_t), **m, **RING),
    (A, np.float32(-1.0)),
    {"data_axis": "data"},
  ),
}


def one_device(loss, params):
  """Value and gradients of every parameter on one device (no mesh)."""
  argnums = tuple(range(len(params)))
  return jax.jit(jax.value_and_grad(loss, argnums))(*map(jnp.asarray, params))


def on_mesh(loss, params, placement, mesh, mode):
  """Value and gradients of `loss` with `mesh=`, taken the way `mode` says."""
  argnums = tuple(range(len(params)))
  vg = jax.value_and_grad(lambda *p: loss(*p, mesh=mesh, **placement), argnums)
  if mode == "jit":
    vg = jax.jit(vg)
  context = jax.set_mesh(mesh) if mode == "set_mesh" else contextlib.nullcontext()
  with context:
    return vg(*map(jnp.asarray, params))


def compare(name, mesh_name, mode):
  loss, params, placement = ENTRY_POINTS[name]
  want_value, want_grads = one_device(loss, params)
  value, grads = on_mesh(loss, params, placement, MESHES[mesh_name], mode)
  close(value, want_value, f"{name} value")
  for i, (g, want) in enumerate(zip(grads, want_grads, strict=True)):
    close(g, want, f"{name} gradient of parameter {i}")
    assert g.shape == np.shape(params[i]), (g.shape, np.shape(params[i]))


def main():
  for name in ENTRY_POINTS:
    for mesh_name in MESHES:
      for mode in MODES:
        check(f"{name}/{mesh_name}/{mode}")(lambda n=name, m=mesh_name, o=mode: compare(n, m, o))

  @check("eager_result_mixes_with_plain_arrays")
  def _():
    """Outside a mesh context the results on a default mesh are ordinary arrays."""
    mesh = MESHES["explicit"]
    loss = par.linear_softmax_cross_entropy(X, W, Y, mesh=mesh) + jnp.sum(jnp.asarray(W))
    per_token = par.linear_softmax_cross_entropy(X, W, Y, mesh=mesh, reduction="none")
    want = xentjax.linear_softmax_cross_entropy(X, W, Y, reduction="none")
    close(loss, jnp.mean(want) + np.sum(W, dtype=np.float64), "loss + a plain array")
    close(jnp.mean(per_token), jnp.mean(want), "the mean of per-token losses")
    # ... and differentiate eagerly through the caller's own reduction too.
    g = jax.grad(
      lambda w: jnp.mean(par.linear_softmax_cross_entropy(X, w, Y, mesh=mesh, reduction="none"))
    )(jnp.asarray(W))
    close(g, jax.grad(lambda w: xentjax.linear_softmax_cross_entropy(X, w, Y))(W), "grad w")

  @check("explicitly_placed_inputs_keep_their_types")
  def _():
    """Inputs the caller placed on an `Explicit` mesh: the results mix with them (jit, and
    eager values), and the gradients come back in their layout."""
    mesh = MESHES["explicit"]
    xs = jax.device_put(X, NamedSharding(mesh, P("data")))
    ws = jax.device_put(W, NamedSharding(mesh, P(None, "vocab")))

    def f(x, w):
      return par.linear_softmax_cross_entropy(x, w, Y, mesh=mesh) + 0.1 * jnp.sum(w * w)

    want_value, (gx1, gw1) = jax.value_and_grad(
      lambda x, w: xentjax.linear_softmax_cross_entropy(x, w, Y) + 0.1 * jnp.sum(w * w), (0, 1)
    )(X, W)
    close(f(xs, ws), want_value, "eager value")
    for context in (contextlib.nullcontext(), jax.set_mesh(mesh)):
      with context:
        value, (gx, gw) = jax.jit(jax.value_and_grad(f, (0, 1)))(xs, ws)
      close(value, want_value, "value")
      close(gx, gx1, "grad x")
      close(gw, gw1, "grad w")
      assert gw.sharding.is_equivalent_to(ws.sharding, 2), gw.sharding

  @check("explicitly_placed_inputs_eager_gradient_works_or_says_set_mesh")
  def _():
    """Eagerly, outside a mesh context, JAX cannot differentiate a result typed with an
    `Explicit` mesh (any function of such arrays, `jnp.sum` included); the docs say to
    use `jax.set_mesh` or `jit` there. The error must say so, in one line (or work)."""
    mesh = MESHES["explicit"]
    xs = jax.device_put(X, NamedSharding(mesh, P("data")))
    ws = jax.device_put(W, NamedSharding(mesh, P(None, "vocab")))
    want = jax.grad(lambda w: xentjax.linear_softmax_cross_entropy(X, w, Y))(W)
    try:
      g = jax.grad(lambda w: par.linear_softmax_cross_entropy(xs, w, Y, mesh=mesh))(ws)
    except ValueError as e:
      first = str(e).splitlines()[0]
      assert "jax.set_mesh" in first, first
    else:
      close(g, want, "grad w")


if __name__ == "__main__":
  main()
  print("RESULTS=" + json.dumps(RESULTS))
  sys.exit(0)
