"""Memory and time of the contrastive losses against the materialized ``[B, B]`` computation.

Usage::

  python benchmarks/contrastive.py                 # memory at B=65,536 and time at B=8192
  python benchmarks/contrastive.py --small         # quick run at small sizes
  python benchmarks/contrastive.py --ring          # the ring on 8 simulated CPU devices

Prints markdown tables:

* temporary memory of ``jax.jit(jax.value_and_grad(loss, argnums=(a, b, scale)))``
  (``compiled.memory_analysis().temp_size_in_bytes``: deterministic, nothing
  is allocated) at B = 65,536, D = 768, float32, for the materialized
  computation (``scale * a @ b.T`` and two
  ``optax.softmax_cross_entropy_with_integer_labels``; for SigLIP the
  log-sigmoid of every pair) and for `xentjax.contrastive_loss` /
  `xentjax.sigmoid_contrastive_loss`;
* fwd+bwd time at B = 8192, D = 512 (``--small``: B = 1024, D = 128), median
  over repeats in which the functions run alternately after a warm-up;
* with ``--ring``: per-device temporary memory of the ring (``mesh=``) against
  the all-gather layout of open_clip and big_vision (each device gathers the
  other modality and builds its ``[B/n, B]`` logits) on 8 simulated devices,
  and, with ``--ring-time``, their time at a small size (simulated devices
  share the host's cores: only the memory is meaningful there).
"""

from __future__ import annotations

import os
import sys

if "--ring" in sys.argv:  # the device count is fixed when JAX starts
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  )

import pathlib
import statistics
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import xentjax
from benchmarks._common import machine, parser, print_header

MEMORY = (65536, 768)
TIMING = (8192, 512)
SMALL = (1024, 128)
RING = (65536, 768)
RING_TIME = (4096, 128)


def clip_materialized(a, b, scale):
  z = scale * a @ b.T
  y = jnp.arange(a.shape[0])
  ce = optax.softmax_cross_entropy_with_integer_labels
  return 0.5 * (ce(z, y).mean() + ce(z.T, y).mean())


def sigmoid_materialized(a, b, scale):
  z = scale * a @ b.T - 10.0
  sign = 2.0 * jnp.eye(a.shape[0], dtype=z.dtype) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(sign * z)) / a.shape[0]


def losses():
  return {
    "softmax (CLIP)": {
      "materialized": clip_materialized,
      "xentjax": lambda a, b, s: xentjax.contrastive_loss(a, b, scale=s),
    },
    "sigmoid (SigLIP)": {
      "materialized": sigmoid_materialized,
      "xentjax": lambda a, b, s: xentjax.sigmoid_contrastive_loss(a, b, scale=s, bias=-10.0),
      "xentjax recompute": lambda a, b, s: xentjax.sigmoid_contrastive_loss(
        a, b, scale=s, bias=-10.0, strategy="recompute"
      ),
    },
  }


def value_and_grad(loss):
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def temp_bytes(loss, *shapes):
  return value_and_grad(loss).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def fmt_bytes(b):
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if b >= scale:
      return f"{b / scale:.2f} {unit}"
  return f"{b} B"


def memory_table(n, d):
  x, s = jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)
  rows = [f"| loss (B={n}, D={d}, float32) | method | temp memory | vs materialized |"]
  rows.append("|---|---|---:|---:|")
  for family, fns in losses().items():
    base = None
    for name, loss in fns.items():
      b = temp_bytes(loss, x, x, s)
      base = b if base is None else base
      rows.append(f"| {family} | {name} | {fmt_bytes(b)} | {100 * b / base:.2f}% |")
  return "\n".join(rows)


def alternate(fns: dict, args, repeats, warmup):
  """Median and min seconds of each function, run alternately after a warm-up."""
  for f in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(f(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):  # alternate, so drifting load hits every method alike
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def time_table(n, d, repeats, warmup):
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, d), jnp.float32) / d**0.5
  b = jax.random.normal(kb, (n, d), jnp.float32) / d**0.5
  args = (a, b, jnp.float32(10.0))
  rows = [f"| loss (B={n}, D={d}, float32) | method | fwd+bwd median | min | vs materialized |"]
  rows.append("|---|---|---:|---:|---:|")
  for family, fns in losses().items():
    med = alternate({k: value_and_grad(f) for k, f in fns.items()}, args, repeats, warmup)
    base = med["materialized"][0]
    for name, (m, lo) in med.items():
      rows.append(f"| {family} | {name} | {m * 1e3:.1f} ms | {lo * 1e3:.1f} ms | {m / base:.3f}x |")
  return "\n".join(rows)


# ----------------------------------------------------------------------------
# The ring against the all-gather layout.


def allgather_layout(kind: str, mesh):
  """open_clip's / big_vision's layout: each device gathers the other modality's embeddings."""

  def local(a, b, s):
    a_all = jax.lax.all_gather(a, "data", tiled=True)
    b_all = jax.lax.all_gather(b, "data", tiled=True)
    y = jax.lax.axis_index("data") * a.shape[0] + jnp.arange(a.shape[0])
    if kind == "softmax (CLIP)":
      ce = optax.softmax_cross_entropy_with_integer_labels
      loss = 0.5 * (ce(s * a @ b_all.T, y).sum() + ce(s * b @ a_all.T, y).sum())
    else:
      z = s * a @ b_all.T - 10.0
      sign = jnp.where(y[:, None] == jnp.arange(b_all.shape[0])[None, :], 1.0, -1.0)
      loss = -jnp.sum(jax.nn.log_sigmoid(sign * z))
    return jax.lax.psum(loss, "data") / a_all.shape[0]

  spec = (P("data"), P("data"), P())
  return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=P())


def ring_losses(mesh):
  ring = {"mesh": mesh, "data_axis": "data"}
  return {
    "softmax (CLIP)": lambda a, b, s: xentjax.contrastive_loss(a, b, scale=s, **ring),
    "sigmoid (SigLIP)": lambda a, b, s: xentjax.sigmoid_contrastive_loss(
      a, b, scale=s, bias=-10.0, **ring
    ),
  }


def ring_table(n, d, mesh, *, time_args=None):
  sharding = NamedSharding(mesh, P("data"))
  x = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=sharding)
  s = jax.ShapeDtypeStruct((), jnp.float32)
  rows = [
    f"| loss (B={n}, D={d}, 8 devices) | layout | per-device temp memory | vs all-gather |",
    "|---|---|---:|---:|",
  ]
  for kind, ring in ring_losses(mesh).items():
    gathered = temp_bytes(allgather_layout(kind, mesh), x, x, s)
    mine = temp_bytes(ring, x, x, s)
    rows.append(f"| {kind} | all-gather (open_clip, big_vision) | {fmt_bytes(gathered)} | 100% |")
    rows.append(f"| {kind} | xentjax ring | {fmt_bytes(mine)} | {100 * mine / gathered:.2f}% |")
  return "\n".join(rows)


def ring_time_table(n, d, mesh, repeats, warmup):
  sharding = NamedSharding(mesh, P("data"))
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.device_put(jax.random.normal(ka, (n, d)) / d**0.5, sharding)
  b = jax.device_put(jax.random.normal(kb, (n, d)) / d**0.5, sharding)
  rows = [f"| loss (B={n}, D={d}, 8 simulated devices) | layout | fwd+bwd median | min |"]
  rows.append("|---|---|---:|---:|")
  for kind, ring in ring_losses(mesh).items():
    fns = {"all-gather": value_and_grad(allgather_layout(kind, mesh)), "ring": value_and_grad(ring)}
    for name, (m, lo) in alternate(fns, (a, b, jnp.float32(10.0)), repeats, warmup).items():
      rows.append(f"| {kind} | {name} | {m * 1e3:.1f} ms | {lo * 1e3:.1f} ms |")
  return "\n".join(rows)


def main(argv=None):
  p = parser(__doc__, SMALL, repeats=5)
  p.add_argument("--ring", action="store_true", help="the ring on 8 simulated devices")
  p.add_argument("--ring-time", action="store_true", help="with --ring: also time it")
  p.add_argument("--no-time", action="store_true", help="skip the time table")
  args = p.parse_args(argv)
  print_header()
  print()
  if args.ring:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    size = RING_TIME if args.small else RING
    print("Per-device temporary memory of jit(value_and_grad(loss, (a, b, scale))):")
    print()
    print(ring_table(*size, mesh))
    if args.ring_time:
      print()
      print(ring_time_table(*RING_TIME, mesh, args.repeats, args.warmup))
    return
  if not args.no_memory:
    size = SMALL if args.small else MEMORY
    print("Temporary memory of jit(value_and_grad(loss, (a, b, scale))) (compiled, not run):")
    print()
    print(memory_table(*size))
    print()
  if not args.no_time:
    n, d = SMALL if args.small else TIMING
    print(f"Time of one fwd+bwd, median of {args.repeats} alternating repeats after warm-up:")
    print()
    print(time_table(n, d, args.repeats, args.warmup))
    print()
    print(f"Machine at the end: {machine()}")


if __name__ == "__main__":
  main()
