"""Vocabulary-parallel distillation on 8 simulated CPU devices (run as a subprocess).

`tests/vocab/test_distillation.py::test_parallel_checks` runs this file with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is
fixed when the backend starts) and asserts on the JSON it prints: one entry
per named check, "ok" or the failure message. Every check runs
`xentjax.linear_distillation_loss` / `xentjax.linear_topk_distillation_loss`
on a 2 x 4 (data x vocab) mesh, with both heads sharded over the vocabulary,
and compares loss and gradients with the same call on one device; the
compiled programs are searched for all-gathers of vocabulary-sized arrays.
"""

import json
import os
import re

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from _harness import close, recorder
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import xentjax

jax.config.update("jax_numpy_rank_promotion", "raise")

D, D_T, V = 6, 10, 80  # 20 columns per device: chunks of 8, 8 and a tail of 4
V_LOCAL = V // 4
SHAPE = (4, 6)
CHUNKS = {
  "recompute": {"token_chunk_size": 4, "vocab_chunk_size": 8},
  "store": {"token_chunk_size": 4},
}
RESULTS = {}
check = recorder(RESULTS)


def vocab_sized_all_gathers(hlo_text):
  """All-gather instructions whose result has a vocabulary-sized dimension."""
  bad = []
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.*?)\sall-gather(?:-start)?\(", line)
    if m is None:
      continue
    dims = [int(d) for s in re.findall(r"\[([\d,]*)\]", m.group(1)) for d in s.split(",") if d]
    if any(d >= V_LOCAL and d % V_LOCAL == 0 for d in dims):
      bad.append(line.strip())
  return bad


MESH = jax.make_mesh((2, 4), ("data", "vocab"))
rng = np.random.default_rng(0)
X = rng.normal(size=(*SHAPE, D)).astype(np.float32)
W = (1.5 * rng.normal(size=(D, V))).astype(np.float32)
TX = rng.normal(size=(*SHAPE, D_T)).astype(np.float32)
TW = (2.0 * rng.normal(size=(V, D_T))).astype(np.float32)  # teacher in the tied layout
Y = rng.integers(0, V - 4, SHAPE)
Y[0, :2] = -100
WHERE = (np.arange(24).reshape(SHAPE) % 7) != 3
IDX = np.argsort(-rng.random((*SHAPE, V)), axis=-1)[..., :5]
LP = np.log(np.sort(rng.dirichlet(np.ones(V), SHAPE), -1)[..., ::-1][..., :5]).astype(np.float32)


def compare(loss_fn, strategy, hlo=False, **opts):
  """`loss_fn(x, w, **kw)` on the mesh vs one device: value, gradients, their shardings."""
  kw = dict(strategy=strategy, **CHUNKS[strategy], **opts)
  xs = jax.device_put(X, NamedSharding(MESH, P("data")))
  ws = jax.device_put(W, NamedSharding(MESH, P(None, "vocab")))

  def par(x, w):
    return loss_fn(x, w, mesh=MESH, data_axis="data", vocab_axis="vocab", **kw)

  vg = jax.jit(jax.value_and_grad(par, (0, 1)))
  loss, (gx, gw) = vg(xs, ws)
  loss1, (gx1, gw1) = jax.jit(jax.value_and_grad(lambda x, w: loss_fn(x, w, **kw), (0, 1)))(
    jnp.asarray(X), jnp.asarray(W)
  )
  close(loss, loss1, "loss")
  close(gx, gx1, "grad x")
  close(gw, gw1, "grad w")
  assert gw.sharding.is_equivalent_to(ws.sharding, 2), (gw.sharding, ws.sharding)
  if hlo:
    text = vg.lower(xs, ws).compile().as_text()
    bad = vocab_sized_all_gathers(text)
    assert not bad, bad
    assert "all-reduce" in text


def full(x, w, **kw):
  return xentjax.linear_distillation_loss(x, w, TX, TW, Y, teacher_w_layout="vd", where=WHERE, **kw)


def topk(x, w, **kw):
  return xentjax.linear_topk_distillation_loss(x, w, IDX, LP, Y, where=WHERE, **kw)


for _beta in (0.0, 0.4, 1.0):
  check(f"recompute_beta_{_beta}_hlo")(
    lambda b=_beta: compare(full, "recompute", hlo=True, beta=b, temperature=2.0, hard_weight=0.3)
  )
check("store_jsd_hlo")(
  lambda: compare(
    full, "store", hlo=True, beta=0.4, temperature=0.5, hard_weight=0.2, reduction="sum"
  )
)
check("padded_vocabulary")(
  lambda: compare(full, "recompute", beta=0.0, vocab_size=V - 4, hard_weight=0.5)
)
check("topk_recompute_hlo")(
  lambda: compare(topk, "recompute", hlo=True, temperature=2.0, hard_weight=0.3)
)
check("topk_store")(lambda: compare(topk, "store", temperature=1.0))


check("tvd_recompute_hlo")(
  lambda: compare(full, "recompute", hlo=True, divergence="tvd", temperature=2.0, hard_weight=0.3)
)
check("tvd_store")(
  lambda: compare(
    full, "store", divergence="tvd", temperature=0.5, hard_weight=0.2, reduction="sum"
  )
)
check("jsd_scaled_recompute")(
  lambda: compare(full, "recompute", divergence="jsd_scaled", beta=1e-4, temperature=2.0)
)
B = rng.normal(size=(V,)).astype(np.float32)
TB = (2.0 * rng.normal(size=(V,))).astype(np.float32)


@check("biases_and_components")
def _biases():
  """Both biases sharded over the vocabulary; the student's gets its gradient; the components."""
  xs = jax.device_put(X, NamedSharding(MESH, P("data")))
  ws = jax.device_put(W, NamedSharding(MESH, P(None, "vocab")))
  bs = jax.device_put(B, NamedSharding(MESH, P("vocab")))
  tbs = jax.device_put(TB, NamedSharding(MESH, P("vocab")))
  for strategy in ("recompute", "store"):
    kw = dict(strategy=strategy, **CHUNKS[strategy], beta=0.4, temperature=1.5, hard_weight=0.3)

    def f(x, w, b, tb, kw=kw, **mesh_kw):
      return full(x, w, bias=b, teacher_bias=tb, return_components=True, **kw, **mesh_kw)

    vg = jax.value_and_grad(f, (0, 1, 2), has_aux=True)
    (loss, comp), g = jax.jit(lambda *a, vg=vg: vg(*a, mesh=MESH))(xs, ws, bs, tbs)
    (loss1, comp1), g1 = jax.jit(vg)(X, W, B, TB)
    close(loss, loss1, f"loss {strategy}")
    close(comp.soft, comp1.soft, f"soft {strategy}")
    close(comp.hard, comp1.hard, f"hard {strategy}")
    for name, a, b in zip(("x", "w", "bias"), g, g1):
      close(a, b, f"grad {name} {strategy}")
    assert g[2].sharding.is_equivalent_to(bs.sharding, 1), (g[2].sharding, bs.sharding)


@check("none_reduction_sharded_over_data")
def _none():
  xs = jax.device_put(X, NamedSharding(MESH, P("data")))
  ws = jax.device_put(W, NamedSharding(MESH, P(None, "vocab")))
  out = jax.jit(lambda x, w: full(x, w, reduction="none", mesh=MESH))(xs, ws)
  close(out, full(X, W, reduction="none"), "per-token")


@check("explicit_shardings_without_mesh_argument")
def _explicit():
  """Explicitly sharded inputs and no `mesh=`: the layout is read from `x` and `w`."""
  xs = jax.device_put(X, NamedSharding(MESH, P("data")))
  ws = jax.device_put(W, NamedSharding(MESH, P(None, "vocab")))
  kw = dict(beta=0.0, temperature=2.0, hard_weight=0.3, **CHUNKS["recompute"])
  loss, (gx, gw) = jax.jit(jax.value_and_grad(lambda x, w: full(x, w, **kw), (0, 1)))(xs, ws)
  loss1, (gx1, gw1) = jax.value_and_grad(lambda x, w: full(x, w, **kw), (0, 1))(X, W)
  close(loss, loss1, "loss")
  close(gx, gx1, "grad x")
  close(gw, gw1, "grad w")


@check("hlo_checker_detects_vocab_gather")
def _detector():
  line = "  %all-gather.3 = f32[6,80]{1,0} all-gather(f32[6,20]{1,0} %p), dimensions={1}"
  assert vocab_sized_all_gathers(line) == [line.strip()]
  assert not vocab_sized_all_gathers("  %all-gather.4 = f32[12,6]{1,0} all-gather(%q)")


@check("errors")
def _errors():
  try:
    full(X, W[:, :78], mesh=MESH, vocab_size=70)
  except ValueError as e:
    assert "vocabularies differ" in str(e) or "divisible" in str(e), e
  else:
    raise AssertionError("no error for a vocabulary not divisible by the mesh")
  try:
    xentjax.linear_distillation_loss(X[:1, :3], W, TX[:1, :3], TW, teacher_w_layout="vd", mesh=MESH)
  except ValueError as e:
    assert "not divisible" in str(e) and "data" in str(e), e
  else:
    raise AssertionError("no error for tokens not divisible by the data axis")


print("RESULTS=" + json.dumps(RESULTS))
