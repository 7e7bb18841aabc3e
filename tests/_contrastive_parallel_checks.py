"""The contrastive losses on a ring of 8 simulated CPU devices (run as a subprocess).

`tests/vocab/test_contrastive_parallel.py` runs this file and asserts on the JSON
it prints: one entry per named check, "ok" or the failure. Each check
compares the ring (``mesh=``, ``data_axis=``) with the one-device result,
values and gradients; the HLO checks look for all-gathers in the compiled
program, and the memory checks compare per-device temporary memory with the
all-gather layout that open_clip and big_vision use.
"""

import json
import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _harness import close, recorder
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import xentjax

jax.config.update("jax_numpy_rank_promotion", "raise")

N = 8
B, D = 48, 6  # 6 rows per device: tiles of 4 leave a ragged tail of 2
TILES = {"row_chunk_size": 4, "column_chunk_size": 4}
RESULTS = {}
check = recorder(RESULTS)
rng = np.random.default_rng(0)
A = rng.normal(size=(B, D)).astype(np.float32)
BB = rng.normal(size=(B, D)).astype(np.float32)
KEEP = np.arange(B) % 7 != 3
EXPLICIT = jax.make_mesh((N,), ("data",), axis_types=(AxisType.Explicit,))
AUTO = jax.make_mesh((N,), ("data",), axis_types=(AxisType.Auto,))


def sharded(x, mesh):
  return jax.device_put(x, NamedSharding(mesh, P("data", *([None] * (np.ndim(x) - 1)))))


def compare(loss, params: dict, mesh, *, jit=True):
  """``loss(a, b, **params, **ring)`` equals the one-device loss, value and gradients."""
  names = list(params)

  def f(ring, a, b, *ps):
    kw = {"mesh": mesh, "data_axis": "data"} if ring else {}
    return loss(a, b, **dict(zip(names, ps, strict=True)), **kw, **TILES)

  argnums = tuple(range(2 + len(names)))
  one = jax.value_and_grad(lambda *x: f(False, *x), argnums)(A, BB, *params.values())
  ring = jax.value_and_grad(lambda *x: f(True, *x), argnums)
  ring = jax.jit(ring) if jit else ring
  got = ring(sharded(A, mesh), sharded(BB, mesh), *(jnp.float32(p) for p in params.values()))
  close(got[0], one[0], "value")
  for name, g, g1 in zip(["a", "b", *names], got[1], one[1], strict=True):
    close(g, g1, f"grad {name}")
  for g, x in zip(got[1][:2], ("a", "b"), strict=True):  # gradients come back sharded by rows
    assert g.sharding.spec[0] == "data", (x, g.sharding)


def all_gathers(fn, *args):
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  return [line.strip() for line in hlo.splitlines() if "all-gather" in line and "=" in line]


def allgather_clip(a, b, scale, mesh):
  """The all-gather layout (open_clip, big_vision): each device gathers the other modality."""

  def local(a, b, s):
    a_all = jax.lax.all_gather(a, "data", tiled=True)
    b_all = jax.lax.all_gather(b, "data", tiled=True)
    y = jax.lax.axis_index("data") * a.shape[0] + jnp.arange(a.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    loss = ce(s * a @ b_all.T, y).sum() + ce(s * b @ a_all.T, y).sum()
    return jax.lax.psum(loss, "data") / (2 * a_all.shape[0])

  return jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=P())(
    a, b, scale
  )


def temp_bytes(fn, *shapes):
  return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def main():
  @check("clip_explicit_mesh")
  def _():
    compare(xentjax.contrastive_loss, {"scale": 2.0}, EXPLICIT)

  @check("clip_not_symmetric_masked_auto_mesh_eager")
  def _():
    def loss(a, b, **kw):
      return xentjax.contrastive_loss(a, b, where=KEEP, symmetric=False, **kw)

    compare(loss, {"scale": 1.5}, AUTO, jit=False)

  @check("clip_retrieval_accuracy")
  def _():
    one = xentjax.contrastive_loss(A, BB, scale=2.0, retrieval_k=(1, 5), **TILES)
    ring = jax.jit(
      lambda a, b: xentjax.contrastive_loss(
        a, b, scale=2.0, retrieval_k=(1, 5), mesh=EXPLICIT, data_axis="data", **TILES
      )
    )(sharded(A, EXPLICIT), sharded(BB, EXPLICIT))
    for x, y in zip(jax.tree.leaves(ring), jax.tree.leaves(one), strict=True):
      close(x, y, "retrieval")

  @check("sigmoid_ring_equals_store_and_recompute")
  def _():
    # The ring recomputes; on one device it equals both strategies.
    for strategy in ("store", "recompute"):

      def loss(a, b, strategy=strategy, **kw):
        if "mesh" not in kw and strategy == "store":  # store sweeps whole rows
          kw.pop("column_chunk_size")
        else:
          strategy = "recompute"
        return xentjax.sigmoid_contrastive_loss(a, b, where=KEEP, strategy=strategy, **kw)

      compare(loss, {"scale": 2.0, "bias": -1.0}, EXPLICIT)

  @check("sigmoid_labels_none_reduction")
  def _():
    y = np.roll(np.arange(B), 5)

    def loss(a, b, **kw):
      per_row = xentjax.sigmoid_contrastive_loss(a, b, labels=y, reduction="none", **kw)
      return jnp.sum(per_row * jnp.arange(1.0, B + 1))

    compare(loss, {"scale": 0.5, "bias": 0.5}, AUTO)

  @check("ntxent_ring")
  def _():
    labels = np.arange(B) % 5

    def loss(a, b, temperature, **kw):
      return xentjax.ntxent(a + b, labels, temperature, **kw)

    compare(loss, {"temperature": 0.3}, EXPLICIT)

  @check("mi_bounds_ring")
  def _():
    weights = jnp.asarray([1.0, 0.5, -0.25, 2.0])

    def loss(a, b, **kw):  # every bound carries a gradient
      return jnp.sum(weights * jnp.stack(xentjax.info.mutual_information_bounds(a, b, **kw)))

    compare(loss, {"scale": 2.0, "bias": -0.5}, EXPLICIT)
    compare(loss, {"scale": 0.7, "bias": 1.0}, AUTO, jit=False)
    big = jax.jit(
      lambda a, b: (
        xentjax.info.mutual_information_bounds(
          a, b, scale=100.0, mesh=EXPLICIT, data_axis="data", **TILES
        ).infonce
      )
    )(sharded(A, EXPLICIT), sharded(A, EXPLICIT))
    assert float(big) <= float(np.float32(np.log(B))), float(big)

  @check("no_all_gather_in_hlo")
  def _():
    a, b = sharded(A, EXPLICIT), sharded(BB, EXPLICIT)
    ring = {"mesh": EXPLICIT, "data_axis": "data", **TILES}
    for loss in (xentjax.contrastive_loss, xentjax.sigmoid_contrastive_loss):
      f = jax.value_and_grad(lambda a, b, s, loss=loss: loss(a, b, scale=s, **ring), (0, 1, 2))
      assert not all_gathers(f, a, b, jnp.float32(2.0)), loss.__name__
      hlo = jax.jit(f).lower(a, b, jnp.float32(2.0)).compile().as_text()
      assert "collective-permute" in hlo, "the ring moves the shards with ppermute"
    # The detector finds the gathers of the all-gather layout (so it can fail).
    g = jax.value_and_grad(lambda a, b, s: allgather_clip(a, b, s, AUTO), (0, 1, 2))
    assert all_gathers(g, sharded(A, AUTO), sharded(BB, AUTO), jnp.float32(2.0))

  @check("allgather_layout_is_the_same_loss")
  def _():
    got = allgather_clip(sharded(A, AUTO), sharded(BB, AUTO), jnp.float32(2.0), AUTO)
    close(got, xentjax.contrastive_loss(A, BB, scale=2.0), "all-gather layout")

  @check("per_device_memory_linear_in_local_batch")
  def _():
    d, tiles = 64, {"row_chunk_size": 256, "column_chunk_size": 256}
    s = jax.ShapeDtypeStruct((), jnp.float32)

    def ring(n):
      x = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=NamedSharding(AUTO, P("data")))
      f = jax.value_and_grad(
        lambda a, b, s: xentjax.contrastive_loss(
          a, b, scale=s, mesh=AUTO, data_axis="data", **tiles
        ),
        (0, 1, 2),
      )
      return temp_bytes(f, x, x, s), x

    small, _ = ring(8 * 1024)
    large, x = ring(8 * 2048)
    local = 2048 * d * 4  # one device's [B/n, D] float32 block
    assert large - small < 8 * (local // 2), (small, large)  # O(B/n·D), not O(B·D)
    assert large < 16 * local + 8 * 256 * 256 * 4, (large, local)
    g = jax.value_and_grad(lambda a, b, s: allgather_clip(a, b, s, AUTO), (0, 1, 2))
    gathered = temp_bytes(g, x, x, s)
    assert large < gathered / 4, (large, gathered)

  @check("errors")
  def _():
    for call, match in (
      (
        lambda: xentjax.contrastive_loss(A[:44], BB[:44], mesh=EXPLICIT, data_axis="data"),
        "divide",
      ),
      (
        lambda: xentjax.contrastive_loss(
          A, BB, labels=np.arange(B), mesh=EXPLICIT, data_axis="data"
        ),
        "`labels` cannot be combined",
      ),
      (lambda: xentjax.ntxent(A, np.arange(B), mesh=EXPLICIT, data_axis="x"), "`data_axis`"),
    ):
      try:
        call()
      except ValueError as e:
        assert match in str(e), str(e)
      else:
        raise AssertionError(f"no error for {match}")

  print("RESULTS=" + json.dumps(RESULTS))


if __name__ == "__main__":
  main()
