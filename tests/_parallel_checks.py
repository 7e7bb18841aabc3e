"""Checks of `xentjax.parallel` on 8 simulated CPU devices (run as a subprocess).

`tests/vocab/test_vocabulary_parallel.py` runs this file with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the device count is
fixed when the backend starts, hence a separate process) and asserts on the
JSON it prints: one entry per named check, "ok" or the failure message.
"""

import json
import os
import re
import sys

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
import xentjax.parallel as par
from xentjax import linear_softmax_cross_entropy as fused_ce

jax.config.update("jax_numpy_rank_promotion", "raise")

N_DATA, N_VOCAB = 2, 4
D, V = 12, 80  # V / 4 = 20 columns per device: two chunks of 8 and a tail of 4
V_LOCAL = V // N_VOCAB
CHUNKS = {
  "recompute": {"token_chunk_size": 4, "vocab_chunk_size": 8},
  "store": {"token_chunk_size": 4},
}
# Gradient filtering: "store" never skips a partial filter tile, so its tiles
# divide a shard's 20 columns.
FILTER_CHUNKS = {**CHUNKS, "store": {"token_chunk_size": 4, "vocab_chunk_size": 4}}

RESULTS = {}
check = recorder(RESULTS)


def inputs(v=V, w_layout="dv", seed=0):
  kx, kw, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = np.asarray(jax.random.normal(kx, (4, 6, D), jnp.float32))
  w = np.asarray(0.5 * jax.random.normal(kw, (v, D) if w_layout == "vd" else (D, v)))
  y = np.array(jax.random.randint(ky, (4, 6), 0, v))
  return x, w, y


def vocab_sized_all_gathers(hlo_text):
  """All-gather instructions whose result has a vocabulary-sized dimension."""
  bad = []
  for line in hlo_text.splitlines():
    if "all-gather" not in line or "=" not in line:
      continue
    lhs = line.split("all-gather", 1)[0]
    dims = [int(d) for shape in re.findall(r"\[([\d,]*)\]", lhs) for d in shape.split(",") if d]
    if any(d in (V, V_LOCAL) or (d >= V_LOCAL and d % V_LOCAL == 0) for d in dims):
      bad.append(line.strip())
  return bad


def run_case(
  mesh, strategy, opts, *, w_layout="dv", cotangent=False, data_axis="data", jit=True, hlo=False
):
  """Parallel value and gradients vs the single-device kernel on plain arrays."""
  x, w, y = inputs(w_layout=w_layout)
  where = opts.pop("_where", None)
  if opts.pop("_ignore", False):
    y[0, :3] = -100
  cot = np.asarray(jax.random.normal(jax.random.PRNGKey(9), y.shape)) if cotangent else None
  kw = dict(strategy=strategy, w_layout=w_layout, **CHUNKS[strategy], **opts)
  wspec = P("vocab", None) if w_layout == "vd" else P(None, "vocab")
  xs = jax.device_put(x, NamedSharding(mesh, P(data_axis)))
  ws = jax.device_put(w, NamedSharding(mesh, wspec))

  def scalar(loss):
    return jnp.sum(loss * cot) if cotangent else loss

  def par_loss(x, w):
    return scalar(
      par.linear_softmax_cross_entropy(
        x, w, y, where=where, mesh=mesh, data_axis=data_axis, vocab_axis="vocab", **kw
      )
    )

  def one_loss(x, w):
    return scalar(fused_ce(x, w, y, where=where, **kw))

  vg = jax.value_and_grad(par_loss, (0, 1))
  f = jax.jit(vg) if jit else vg
  loss, (gx, gw) = f(xs, ws)
  loss1, (gx1, gw1) = jax.jit(jax.value_and_grad(one_loss, (0, 1)))(jnp.asarray(x), jnp.asarray(w))
  close(loss, loss1, "loss")
  close(gx, gx1, "grad x")
  close(gw, gw1, "grad w")
  assert gx.sharding.is_equivalent_to(xs.sharding, x.ndim), (gx.sharding, xs.sharding)
  assert gw.sharding.is_equivalent_to(ws.sharding, w.ndim), (gw.sharding, ws.sharding)
  if hlo:
    text = jax.jit(vg).lower(xs, ws).compile().as_text()
    bad = vocab_sized_all_gathers(text)
    assert not bad, bad
    assert "all-reduce" in text  # the lse really is combined across devices


def ring_case():
  """The engine's ring placement (the contrastive layout: the head's columns sharded over the
  data axis like the tokens, passed around with `ppermute`) against one device: values and
  gradients of x, w and a traced temperature, and no all-gather of a `[*, D]` array."""
  import dataclasses

  from xentjax._vocab import engine, inputs
  from xentjax._vocab.kernels.softmax_stats import SoftmaxStats
  from xentjax._vocab.placement import Placement

  n_dev = N_DATA * N_VOCAB
  mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(AxisType.Explicit,))
  rng = np.random.default_rng(7)
  n, d = 3 * n_dev, 5
  a = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
  y = jnp.asarray(rng.permutation(n), jnp.int32)
  head = inputs.Head("vd", None, 2, 2)
  call = inputs.prepare_call(a, b, y, head, ignore_index=-100, where=None, temperature=0.5)
  kernel = SoftmaxStats(entropy=True, argmax=True, top_k=2)

  def f(a, b, t, tiling):
    ops = call.ops.with_rows(temperature=jnp.broadcast_to(t, (n,)))
    out = engine.run_recompute(dataclasses.replace(ops, x=a, w=b), kernel, tiling)
    loss = jnp.sum(out["log_s"] - out["zy"]) + 0.3 * jnp.sum(out["ent"])
    return loss, (out["amax"], out["topi"])

  vg = jax.value_and_grad(f, (0, 1, 2), has_aux=True)
  t = jnp.float32(0.7)
  (v1, aux1), g1 = vg(a, b, t, call.tiling)
  ring = dataclasses.replace(call.tiling, placement=Placement(mesh, "data", None, n_dev, 1, True))
  with jax.set_mesh(mesh):
    fn = jax.jit(vg, static_argnums=3)
    (v2, aux2), g2 = fn(a, b, t, ring)
    text = fn.lower(a, b, t, ring).compile().as_text()
  close(v2, v1, "ring loss")
  for name, x2, x1 in zip(("a", "b", "temperature"), g2, g1):
    close(x2, x1, f"ring d{name}")
  for x2, x1 in zip(aux2, aux1):
    np.testing.assert_array_equal(np.asarray(x2), np.asarray(x1))
  assert "collective-permute" in text
  gathers = [
    line for line in text.splitlines() if re.search(r"= f32\[\d+,\d+\][^=]*all-gather", line)
  ]
  assert not gathers, gathers


EVERYTHING = {
  "label_smoothing": 0.1,
  "z_loss": 1e-3,
  "logit_soft_cap": 2.0,
  "_ignore": True,
  "_where": np.arange(24).reshape(4, 6) % 5 != 2,
}


def main():
  explicit = jax.make_mesh(
    (N_DATA, N_VOCAB), ("data", "vocab"), axis_types=(AxisType.Explicit, AxisType.Explicit)
  )
  auto = jax.make_mesh(
    (N_DATA, N_VOCAB), ("data", "vocab"), axis_types=(AxisType.Auto, AxisType.Auto)
  )

  @check("recompute_mean_hlo")
  def _():
    run_case(explicit, "recompute", {}, hlo=True)

  @check("recompute_sum_all_options")
  def _():
    run_case(explicit, "recompute", {"reduction": "sum", **EVERYTHING})

  @check("recompute_none_cotangent")
  def _():
    run_case(explicit, "recompute", {"reduction": "none", "z_loss": 1e-2}, cotangent=True)

  @check("store_mean_all_options_hlo")
  def _():
    run_case(explicit, "store", dict(EVERYTHING), hlo=True)

  @check("auto_mesh_vd_layout")
  def _():
    run_case(auto, "recompute", {"label_smoothing": 0.2}, w_layout="vd")

  @check("auto_mesh_store_eager")
  def _():
    run_case(auto, "store", {"reduction": "sum"}, jit=False)

  @check("replicated_tokens")
  def _():
    run_case(explicit, "recompute", {"logit_soft_cap": 3.0}, data_axis=None)

  @check("padded_vocabulary")
  def _():
    # V = 78 is not divisible by 4 devices: pad w to 80 and pass vocab_size=78.
    x, w, y = inputs(v=78)
    w_pad = np.concatenate([w, np.zeros((D, 2), w.dtype)], axis=1)
    ws = jax.device_put(w_pad, NamedSharding(explicit, P(None, "vocab")))
    xs = jax.device_put(x, NamedSharding(explicit, P("data")))
    kw = dict(label_smoothing=0.1, **CHUNKS["recompute"])
    loss, (gx, gw) = jax.jit(
      jax.value_and_grad(
        lambda x, w: par.linear_softmax_cross_entropy(x, w, y, mesh=explicit, vocab_size=78, **kw),
        (0, 1),
      )
    )(xs, ws)
    loss1, (gx1, gw1) = jax.value_and_grad(lambda x, w: fused_ce(x, w, y, **kw), (0, 1))(
      jnp.asarray(x), jnp.asarray(w)
    )
    close(loss, loss1, "loss")
    close(gx, gx1, "grad x")
    gw = np.asarray(gw)
    close(gw[:, :78], gw1, "grad w")
    assert not np.any(gw[:, 78:]), "padding columns must get zero gradient"

  @check("sharded_logits_hlo")
  def _():
    x, w, y = inputs()
    logits = np.asarray(jnp.asarray(x) @ jnp.asarray(w))
    zs = jax.device_put(logits, NamedSharding(explicit, P("data", None, "vocab")))
    cot = np.asarray(jax.random.normal(jax.random.PRNGKey(3), y.shape))

    def f(z):
      loss = par.softmax_cross_entropy_with_integer_labels(z, y, mesh=explicit)
      return jnp.sum(loss * cot), loss

    vg = jax.jit(jax.value_and_grad(f, has_aux=True))
    (_, loss), gz = vg(zs)
    (_, loss1), gz1 = jax.value_and_grad(
      lambda z: (
        jnp.sum(optax.softmax_cross_entropy_with_integer_labels(z, y) * cot),
        optax.softmax_cross_entropy_with_integer_labels(z, y),
      ),
      has_aux=True,
    )(jnp.asarray(logits))
    close(loss, loss1, "loss")
    close(gz, gz1, "grad logits")
    assert gz.sharding.is_equivalent_to(zs.sharding, 3), gz.sharding
    bad = vocab_sized_all_gathers(vg.lower(zs).compile().as_text())
    assert not bad, bad
    y_bad = y.copy()
    y_bad[1, 1] = V
    out = np.asarray(par.softmax_cross_entropy_with_integer_labels(zs, y_bad, mesh=explicit))
    assert np.isnan(out[1, 1]) and np.isfinite(np.delete(np.asarray(out).ravel(), 7)).all()

  @check("single_device_api_on_explicitly_sharded_inputs")
  def _():
    # Data parallelism with an Explicit mesh through the single-device function:
    # it runs under shard_map over the tokens' axis; w stays replicated.
    x, w, y = inputs()
    xs = jax.device_put(x, NamedSharding(explicit, P("data")))
    ws = jax.device_put(w, NamedSharding(explicit, P()))
    kw = dict(z_loss=1e-3, **CHUNKS["recompute"])
    loss, (gx, gw) = jax.jit(jax.value_and_grad(lambda x, w: fused_ce(x, w, y, **kw), (0, 1)))(
      xs, ws
    )
    loss1, (gx1, gw1) = jax.jit(jax.value_and_grad(lambda x, w: fused_ce(x, w, y, **kw), (0, 1)))(
      jnp.asarray(x), jnp.asarray(w)
    )
    close(loss, loss1, "loss")
    close(gx, gx1, "grad x")
    close(gw, gw1, "grad w")
    assert gx.sharding.is_equivalent_to(xs.sharding, 3), gx.sharding

  @check("hlo_checker_detects_vocab_gather")
  def _():
    # The materialized computation with replicated logits gathers them: the
    # checker used above must see that (it is able to fail).
    x, w, _ = inputs()
    xs = jax.device_put(x, NamedSharding(auto, P("data")))
    ws = jax.device_put(w, NamedSharding(auto, P(None, "vocab")))
    f = jax.jit(
      lambda x, w: jax.nn.logsumexp(x @ w, axis=-1), out_shardings=NamedSharding(auto, P())
    )
    f2 = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(auto, P()))
    text = f.lower(xs, ws).compile().as_text() + f2.lower(xs, ws).compile().as_text()
    assert vocab_sized_all_gathers(text), "expected an all-gather of the logits"

  @check("weights_class_weights_bias_temperature")
  def _():
    rng = np.random.default_rng(1)
    opts = {
      "weights": rng.uniform(0.0, 2.0, (4, 6)).astype(np.float32),
      "class_weights": rng.uniform(0.2, 2.0, (V,)).astype(np.float32),
      "bias": rng.normal(size=(V,)).astype(np.float32),
      "temperature": 0.7,
      "label_smoothing": 0.1,
      "_ignore": True,
    }
    run_case(explicit, "recompute", dict(opts), hlo=True)
    run_case(explicit, "store", dict(opts))

  @check("token_stats_hlo")
  def _():
    x, w, y = inputs()
    b = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (V,)))
    adv = np.asarray(jax.random.normal(jax.random.PRNGKey(5), y.shape))
    where = np.arange(24).reshape(4, 6) % 5 != 2
    kw = dict(temperature=0.8, top_k=3, logit_soft_cap=2.5, where=where, **CHUNKS["recompute"])
    xs = jax.device_put(x, NamedSharding(explicit, P("data")))
    ws = jax.device_put(w, NamedSharding(explicit, P(None, "vocab")))
    bs = jax.device_put(b, NamedSharding(explicit, P("vocab")))

    def pg(stats):  # a policy-gradient loss with an entropy bonus
      return jnp.sum(-adv * stats.logprob - 0.1 * stats.entropy + 0.01 * stats.lse), stats

    def par_loss(x, w, b):
      return pg(par.linear_token_stats(x, w, y, bias=b, mesh=explicit, **kw))

    def one_loss(x, w, b):
      return pg(xentjax.linear_token_stats(x, w, y, bias=b, **kw))

    vg = jax.jit(jax.value_and_grad(par_loss, (0, 1, 2), has_aux=True))
    (_, s), g = vg(xs, ws, bs)
    (_, s1), g1 = jax.jit(jax.value_and_grad(one_loss, (0, 1, 2), has_aux=True))(
      jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)
    )
    for name in ("logprob", "entropy", "lse", "top_k_logprobs"):
      close(getattr(s, name), getattr(s1, name), name)
    for name in ("argmax", "top_k_indices"):
      np.testing.assert_array_equal(getattr(s, name), getattr(s1, name), err_msg=name)
    for a, r, what in zip(g, g1, ("grad x", "grad w", "grad bias")):
      close(a, r, what)
    assert g[2].sharding.is_equivalent_to(bs.sharding, 1), g[2].sharding
    bad = vocab_sized_all_gathers(vg.lower(xs, ws, bs).compile().as_text())
    assert not bad, bad

  @check("sequence_logprobs")
  def _():
    # linear_sequence_logprobs sums the engine's per-token outputs per segment on the mesh.
    x, w, y = inputs()
    seg = (np.arange(24).reshape(4, 6) * 5) % 7 - 1  # packed, interleaved, some padding
    xs = jax.device_put(x, NamedSharding(explicit, P("data")))
    ws = jax.device_put(w, NamedSharding(explicit, P(None, "vocab")))
    coef = np.linspace(-1.0, 1.0, 6).astype(np.float32)

    def seq_loss(x, w, **placement):
      sums, _ = xentjax.linear_sequence_logprobs(
        x, w, y, seg, num_segments=6, temperature=0.9, **CHUNKS["recompute"], **placement
      )
      return jnp.sum(sums * coef)

    on_mesh = {"mesh": explicit, "data_axis": "data", "vocab_axis": "vocab"}
    vg = jax.jit(jax.value_and_grad(lambda x, w: seq_loss(x, w, **on_mesh), (0, 1)))
    v, g = vg(xs, ws)
    v1, g1 = jax.jit(jax.value_and_grad(seq_loss, (0, 1)))(jnp.asarray(x), jnp.asarray(w))
    close(v, v1, "sequence sums")
    for a, r, name in zip(g, g1, ("grad x", "grad w")):
      close(a, r, name)
    bad = vocab_sized_all_gathers(vg.lower(xs, ws).compile().as_text())
    assert not bad, bad

  @check("argmax_ties_across_shards")
  def _():
    # Equal maxima on several vocabulary shards: the lowest global index wins.
    x = np.ones((8, 1), np.float32)
    w = np.zeros((1, V), np.float32)
    w[0, [7, 27, 47]] = 1.0  # shards 0, 1 and 2
    ws = jax.device_put(w, NamedSharding(explicit, P(None, "vocab")))
    s = par.linear_token_stats(x, ws, np.zeros(8, np.int32), mesh=explicit, top_k=3)
    np.testing.assert_array_equal(s.argmax, np.full(8, 7))
    np.testing.assert_array_equal(s.top_k_indices, np.tile([7, 27, 47], (8, 1)))

  @check("gradient_filtering")
  def _():
    x, w, y = inputs()
    b = np.where(np.arange(V) < 10, 3.0, -14.0).astype(np.float32)  # cols >= 10: p < 1e-6
    y = y % 10
    xs = jax.device_put(x, NamedSharding(explicit, P("data")))
    ws = jax.device_put(w, NamedSharding(explicit, P(None, "vocab")))
    for strategy in ("recompute", "store"):  # "store" filters with the same filter tiles
      f = jax.jit(
        jax.value_and_grad(
          lambda x, w, eps, strategy=strategy: par.linear_softmax_cross_entropy(
            x,
            w,
            y,
            bias=b,
            mesh=explicit,
            filter_eps=eps,
            strategy=strategy,
            **(FILTER_CHUNKS[strategy] if eps else CHUNKS[strategy]),
          ),
          (0, 1),
        ),
        static_argnums=2,
      )
      loss, (gx, gw) = f(xs, ws, 1e-5)
      loss1, (gx1, gw1) = f(xs, ws, None)
      close(loss, loss1, f"loss ({strategy})")
      close(gx, gx1, f"grad x ({strategy})", tol=1e-5)
      close(gw, gw1, f"grad w ({strategy})", tol=1e-5)
      gw = np.asarray(gw)
      skipped = not np.any(gw[:, 24:]) and np.any(np.asarray(gw1)[:, 24:])
      assert skipped, f"tiles were not skipped ({strategy})"

  @check("stats_class_weighted_z_loss_denominator")
  def _():
    # return_stats, the z-loss mean with class weights, and denominator= on the mesh,
    # against one device (itself checked against float64 in test_cross_entropy_training.py).
    rng = np.random.default_rng(3)
    x, w, y = inputs(seed=3)
    y[0, :2] = -100
    where = np.arange(24).reshape(4, 6) % 5 != 2
    base = {
      "bias": rng.normal(size=(V,)).astype(np.float32),
      "temperature": 0.8,
      "where": where,
      "return_stats": True,
    }
    cases = {
      "class_weights_z_loss": {
        "class_weights": rng.uniform(0.2, 2.0, (V,)).astype(np.float32),
        "z_loss": 0.05,
        "label_smoothing": 0.1,
      },
      "denominator": {"denominator": np.float32(37.0), "z_loss": 0.01},
    }
    xs = jax.device_put(x, NamedSharding(explicit, P("data")))
    ws = jax.device_put(w, NamedSharding(explicit, P(None, "vocab")))
    for strategy in ("recompute", "store"):
      for opts in cases.values():
        kw = {**base, **opts, "strategy": strategy, **CHUNKS[strategy]}

        def par_loss(x, w, kw=kw):
          return par.linear_softmax_cross_entropy(x, w, y, mesh=explicit, **kw)

        def one_loss(x, w, kw=kw):
          return fused_ce(x, w, y, **kw)

        (loss, s), g = jax.jit(jax.value_and_grad(par_loss, (0, 1), has_aux=True))(xs, ws)
        (loss1, s1), g1 = jax.jit(jax.value_and_grad(one_loss, (0, 1), has_aux=True))(
          jnp.asarray(x), jnp.asarray(w)
        )
        close(loss, loss1, f"{strategy} loss")
        close(g[0], g1[0], f"{strategy} grad x")
        close(g[1], g1[1], f"{strategy} grad w")
        for name in ("lse", "z_loss", "entropy", "correct"):
          close(getattr(s, name), getattr(s1, name), f"{strategy} {name}")
        np.testing.assert_array_equal(s.argmax, s1.argmax)
    # Tied maxima on three vocabulary shards: the label's credit is 1/3 there.
    x1 = np.ones((8, 1), np.float32)
    w1 = np.zeros((1, V), np.float32)
    w1[0, [7, 27, 47]] = 1.0
    w1s = jax.device_put(w1, NamedSharding(explicit, P(None, "vocab")))
    y1 = np.array([7, 27, 47, 0, 7, 27, 47, 3], np.int32)
    _, s = par.linear_softmax_cross_entropy(x1, w1s, y1, mesh=explicit, return_stats=True)
    np.testing.assert_array_equal(s.argmax, np.full(8, 7))
    close(s.correct, np.where(np.isin(y1, [7, 27, 47]), 1 / 3, 0.0), "credit across shards")
    # Distillation with a denominator on the mesh: microbatch losses add up.
    tw = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (D, V)))
    tws = jax.device_put(tw, NamedSharding(explicit, P(None, "vocab")))
    full = xentjax.linear_distillation_loss(xs, ws, xs, tws, y, mesh=explicit, beta=0.5)
    parts = [
      xentjax.linear_distillation_loss(
        x[sl], ws, x[sl], tws, y[sl], mesh=explicit, beta=0.5, denominator=float(np.sum(y != -100))
      )
      for sl in (slice(0, 2), slice(2, 4))
    ]
    close(sum(float(p) for p in parts), full, "distillation accumulated")

  @check("errors")
  def _():
    x, w, y = inputs()
    cases = [
      (
        lambda: par.linear_softmax_cross_entropy(x, w, y, mesh=jax.make_mesh((8,), ("model",))),
        "vocab_axis.*'vocab'.*'model'",
      ),
      (
        lambda: par.linear_softmax_cross_entropy(x, w, y, mesh=explicit, data_axis="batch"),
        "data_axis.*'batch'",
      ),
      (lambda: par.linear_softmax_cross_entropy(x, w[:, :78], y, mesh=explicit), r"vocab_size=78"),
      (
        lambda: par.linear_softmax_cross_entropy(x[:3, :5], w, y[:3, :5], mesh=explicit),
        "15 tokens",
      ),
      (lambda: par.linear_softmax_cross_entropy(x, w[:-1], y, mesh=explicit), "hidden size"),
      (
        lambda: par.softmax_cross_entropy_with_integer_labels(
          np.zeros((4, 78), np.float32), y[:, 0], mesh=explicit
        ),
        "V=78",
      ),
      (
        lambda: par.softmax_cross_entropy_with_integer_labels(
          np.zeros((4, 80), np.float32), y, mesh=explicit
        ),
        "labels.shape",
      ),
    ]
    for i, (fn, pattern) in enumerate(cases):
      try:
        fn()
      except (ValueError, TypeError) as e:
        assert re.search(pattern, str(e)), (i, pattern, str(e))
      else:
        raise AssertionError(f"case {i} did not raise")

  @check("ring_engine_matches_one_device")
  def _():
    ring_case()

  print("RESULTS=" + json.dumps(RESULTS))


if __name__ == "__main__":
  main()
  sys.exit(0)
