"""One process of a real `jax.distributed` job (started by `tests/evaluation/test_evaluate_multiprocess.py`).

    python tests/_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

joins a job of NUM_PROCESSES processes over the loopback interface (gloo
collectives, 4 simulated CPU devices each), runs the named checks, and
writes ``OUT_DIR/process_<id>.json``: per check "ok" or the failure, plus the
measured differences from the single-process and float64 references. Every
process runs the same checks in the same order (they are collectives).
"""

import json
import math
import os
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

PID, NPROC, PORT, OUT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

from _harness import recorder

import xentjax

xentjax.distributed.initialize(f"127.0.0.1:{PORT}", NPROC, PID, timeout=30, heartbeat_timeout=20)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

RESULTS: dict = {"process_index": jax.process_index(), "measured": {}}


check = recorder(RESULTS, limit=8)


def measure(name, got, want):
  """Largest absolute and relative difference; kept for the report."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  diff = np.abs(got - want)
  rel = diff / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
  prev = RESULTS["measured"].get(name, [0.0, 0.0])
  RESULTS["measured"][name] = [max(prev[0], float(diff.max())), max(prev[1], float(rel.max()))]


# ---------------------------------------------------------------------------
# Data: the same arrays in every process (the seed), each process reads its share.

N, C = 1003, 12
rng = np.random.default_rng(0)
LOGITS = (rng.standard_normal((N, C)) * 2).astype(np.float32)
LABELS = rng.integers(0, C, N)
LABELS[::37] = -100
MASK = rng.random(N) < 0.9
SOFT = rng.dirichlet(np.ones(C), N).astype(np.float32)
W_MODEL = rng.standard_normal((C, C)).astype(np.float32)


def float64_reference(logits, labels, mask, top_k):
  keep = mask & (labels != -100)
  z = logits[keep].astype(np.float64)
  y = labels[keep]
  logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
  z_y = z[np.arange(len(y)), y]
  higher = (z > z_y[:, None]).sum(-1)
  return {
    "count": int(keep.sum()),
    "cross_entropy": float(-logp[np.arange(len(y)), y].mean()),
    "accuracy": float((higher == 0).mean()),
    "top_k_accuracy": float((higher < top_k).mean()),
  }


def batches(rows, size, soft=False):
  y = SOFT if soft else LABELS
  for i in range(rows.start, rows.stop, size):
    j = min(i + size, rows.stop)
    yield LOGITS[i:j], y[i:j], MASK[i:j]


# Process 0: rows [0, 600) in batches of 100; process 1: [600, 1003) in batches of 64.
MINE = range(600) if PID == 0 else range(600, N)
MY_BATCH = 100 if PID == 0 else 64


# Confidences are summed per bin in float32 within a batch, so calibration
# figures depend on the batching at ~1e-10; everything else agrees to float64
# rounding, and every count exactly.
CALIBRATION_ATOL = 1e-9


def same_result(got, want, tag):
  """Every field of two results: integers equal, floats to float64 rounding."""
  got, want = got.to_dict(), want.to_dict()
  assert got.keys() == want.keys(), (got.keys(), want.keys())

  def same(key, g, w):
    if isinstance(w, (list, tuple)):
      assert len(g) == len(w), (tag, key, g, w)
      for a, b in zip(g, w):
        same(key, a, b)
    elif isinstance(w, float):
      assert math.isfinite(g) == math.isfinite(w), (tag, key, g, w)
      if math.isfinite(w):
        measure(f"evaluate_vs_single_process.{key}", g, w)
        atol = CALIBRATION_ATOL if "calibration" in key else 1e-13
        # The one-pass temperature interpolates on grids centred on each process's first
        # batch: it agrees with one process to the interpolation's accuracy, not to rounding.
        rtol = 1e-2 if key == "temperature" else 1e-12
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{tag} {key}")
    else:
      assert g == w, (tag, key, g, w)

  for key, w in want.items():
    same(key, got[key], w)


def main():
  @check("evaluate_split_unequal_batches")
  def _():
    got = xentjax.evaluate(batches(MINE, MY_BATCH), top_k=3, num_bins=10, progress=False)
    one = xentjax.evaluate(
      batches(range(N), 128), top_k=3, num_bins=10, progress=False, across_processes=False
    )
    same_result(got, one, "split")
    # The same batches in one process (process 0's, then process 1's): the
    # calibration sums are then the same float32 sums, and agree to float64 rounding.
    same = xentjax.evaluate(
      (*batches(range(600), 100), *batches(range(600, N), 64)),
      top_k=3, num_bins=10, progress=False, across_processes=False,
    )  # fmt: skip
    measure("evaluate_vs_same_batches.expected_calibration_error",
            got.expected_calibration_error, same.expected_calibration_error)  # fmt: skip
    np.testing.assert_allclose(
      got.expected_calibration_error, same.expected_calibration_error, rtol=1e-12, atol=1e-15
    )
    ref = float64_reference(LOGITS, LABELS, MASK, top_k=3)
    assert got.count == ref["count"]
    assert got.accuracy == ref["accuracy"] and got.top_k_accuracy == ref["top_k_accuracy"]
    measure("evaluate_vs_float64.cross_entropy", got.cross_entropy, ref["cross_entropy"])
    np.testing.assert_allclose(got.cross_entropy, ref["cross_entropy"], rtol=1e-6)
    RESULTS["split_result"] = got.to_dict()

  @check("evaluate_one_process_has_no_batches")
  def _():
    mine = range(N) if PID == 0 else range(0)
    got = xentjax.evaluate(batches(mine, 200, soft=True), base=2, progress=False)
    one = xentjax.evaluate(
      batches(range(N), 200, soft=True), base=2, progress=False, across_processes=False
    )
    same_result(got, one, "empty")
    assert got.count == int(MASK.sum())

  @check("evaluate_with_model")
  def _():
    def stream(rows):
      for i in range(rows.start, rows.stop, 50):
        yield LOGITS[i : i + 50], LABELS[i : min(i + 50, rows.stop)]

    model = lambda w, x: x @ w
    got = xentjax.evaluate(stream(MINE), model=model, params=W_MODEL, progress=False)
    one = xentjax.evaluate(
      stream(range(N)), model=model, params=W_MODEL, progress=False, across_processes=False
    )
    same_result(got, one, "model")

  @check("evaluate_bytes_and_documents_across_processes")
  def _():
    nbytes = np.random.default_rng(2).integers(0, 7, N)
    docs = np.arange(N) // 45  # document 13 spans rows 585..629: both processes

    def stream(rows, size):
      for i in range(rows.start, rows.stop, size):
        j = min(i + size, rows.stop)
        yield {"logits": LOGITS[i:j], "labels": LABELS[i:j], "mask": MASK[i:j],
               "byte_counts": nbytes[i:j], "document_ids": docs[i:j]}  # fmt: skip

    got = xentjax.evaluate(stream(MINE, MY_BATCH), progress=False)
    one = xentjax.evaluate(stream(range(N), 128), progress=False, across_processes=False)
    same_result(got, one, "documents")
    keep = MASK & (LABELS != -100)
    assert got.byte_count == int(nbytes[keep].sum())
    z = LOGITS.astype(np.float64)
    nll = np.logaddexp.reduce(z, axis=-1) - z[np.arange(N), np.where(keep, LABELS, 0)]
    nll = np.where(keep, nll, 0.0)
    pd = got.per_document
    assert pd.ids.tolist() == sorted(set(docs.tolist()))
    assert pd.count.tolist() == [int(keep[docs == d].sum()) for d in pd.ids]
    assert pd.byte_count.tolist() == [int(nbytes[keep & (docs == d)].sum()) for d in pd.ids]
    ref = [nll[docs == d].sum() for d in pd.ids]
    measure("documents_vs_float64.nll", pd.negative_log_likelihood_sum, ref)
    np.testing.assert_allclose(pd.negative_log_likelihood_sum, ref, rtol=1e-6)
    np.testing.assert_allclose(
      pd.negative_log_likelihood_sum, one.per_document.negative_log_likelihood_sum, rtol=1e-12
    )
    # A process without batches still learns that the others carried documents.
    none = xentjax.evaluate(stream(MINE if PID == 0 else range(0), 100), progress=False)
    assert none.per_document.ids.tolist() == sorted(set(docs[:600].tolist()))

  @check("evaluate_hidden_states_across_processes")
  def _():
    hidden = np.random.default_rng(3).standard_normal((N, 5)).astype(np.float32)
    head = np.random.default_rng(4).standard_normal((5, C)).astype(np.float32)

    def stream(rows, size):
      for i in range(rows.start, rows.stop, size):
        j = min(i + size, rows.stop)
        yield hidden[i:j], LABELS[i:j], MASK[i:j]

    got = xentjax.evaluate(stream(MINE, MY_BATCH), head=head, top_k=3, progress=False)
    one = xentjax.evaluate(
      stream(range(N), 128), head=head, top_k=3, progress=False, across_processes=False
    )
    same_result(got, one, "hidden")
    ref = float64_reference(hidden.astype(np.float64) @ head, LABELS, MASK, top_k=3)
    np.testing.assert_allclose(got.cross_entropy, ref["cross_entropy"], rtol=1e-6)
    assert got.count == ref["count"] and got.accuracy == ref["accuracy"]

  @check("evaluate_mismatched_options_raise_everywhere")
  def _():
    try:
      xentjax.evaluate(batches(MINE, 100), top_k=3 + PID, progress=False)
    except ValueError as e:
      assert "`top_k` differs between processes" in str(e) and "process 1: 4" in str(e), e
    else:
      raise AssertionError("no error for different top_k")

  @check("evaluate_failure_in_one_process_raises_everywhere")
  def _():
    def failing():
      yield from batches(range(200), 100)
      if PID == 1:
        raise OSError("disk vanished")
      yield from batches(range(200, 300), 100)

    try:
      xentjax.evaluate(failing(), progress=False)
    except OSError as e:
      assert PID == 1 and "disk vanished" in str(e), e
    except xentjax.distributed.ProcessFailedError as e:
      assert PID == 0 and "process 1 of 2" in str(e) and "disk vanished" in str(e), e
    else:
      raise AssertionError("no error although process 1 failed")

  @check("evaluate_after_failures_still_in_step")
  def _():
    got = xentjax.evaluate(batches(MINE, MY_BATCH), top_k=3, num_bins=10, progress=False)
    assert got.to_dict() == RESULTS["split_result"], (got.to_dict(), RESULTS["split_result"])

  # -------------------------------------------------------------------------
  # Vocabulary-parallel fused loss on a mesh spanning both processes.

  D, V, T = 8, 32, 24  # T tokens in all, T / 2 per process
  kx = np.random.default_rng(1)
  X = kx.standard_normal((T, D)).astype(np.float32)
  Y = kx.integers(0, V, T)
  Y[5] = Y[17] = -100
  W0 = (0.3 * kx.standard_normal((D, V))).astype(np.float32)

  devices = np.asarray(jax.devices()).reshape(NPROC, jax.local_device_count())
  mesh = Mesh(devices, ("data", "vocab"))  # data across processes, vocab within one
  rows = NamedSharding(mesh, P("data"))
  cols = NamedSharding(mesh, P(None, "vocab"))
  half = slice(PID * T // NPROC, (PID + 1) * T // NPROC)

  def global_inputs():
    x = jax.make_array_from_process_local_data(rows, X[half])
    y = jax.make_array_from_process_local_data(rows, Y[half])
    w = jax.make_array_from_process_local_data(cols, W0)  # every process holds all of w
    return x, y, w

  def loss_parallel(x, w, y):
    return xentjax.parallel.linear_softmax_cross_entropy(
      x, w, y, mesh=mesh, token_chunk_size=4, vocab_chunk_size=4
    )

  def float64_loss_and_grads(x, w, y):
    x, w = x.astype(np.float64), w.astype(np.float64)
    keep = y != -100
    z = x @ w
    p = np.exp(z - np.logaddexp.reduce(z, axis=-1, keepdims=True))
    onehot = np.eye(w.shape[1])[np.where(keep, y, 0)]
    nll = np.logaddexp.reduce(z, axis=-1) - (z * onehot).sum(-1)
    dz = (p - onehot) * keep[:, None] / keep.sum()
    return (nll * keep).sum() / keep.sum(), dz @ w.T, x.T @ dz

  @check("vocab_parallel_values_and_grads")
  def _():
    assert {d.process_index for d in mesh.devices[PID]} == {PID}
    x, y, w = global_inputs()
    loss, (gx, gw) = jax.jit(jax.value_and_grad(loss_parallel, argnums=(0, 1)))(x, w, y)
    assert gx.sharding.spec[0] == "data" and gw.sharding.spec[1] == "vocab"
    gx, gw = multihost_utils.process_allgather((gx, gw), tiled=True)
    # The same function on one device of this process, over all tokens.
    one = jax.local_devices()[0]
    lone, (gx1, gw1) = jax.jit(
      jax.value_and_grad(xentjax.linear_softmax_cross_entropy, argnums=(0, 1))
    )(*jax.device_put((X, W0, Y), one))
    ref = float64_loss_and_grads(X, W0, Y)
    for name, a, b1, b64 in (
      ("loss", loss, lone, ref[0]),
      ("grad_x", gx, gx1, ref[1]),
      ("grad_w", gw, gw1, ref[2]),
    ):
      a = np.asarray(multihost_utils.process_allgather(a, tiled=True) if name == "loss" else a)
      measure(f"vocab_parallel_vs_one_device.{name}", a, b1)
      measure(f"vocab_parallel_vs_float64.{name}", a, b64)
      np.testing.assert_allclose(a, b1, rtol=1e-5, atol=1e-6, err_msg=name)
      np.testing.assert_allclose(a, b64, rtol=1e-5, atol=1e-6, err_msg=name)

  @check("vocab_parallel_training_in_sync")
  def _():
    opt = optax.adam(0.05)
    x, y, w = global_inputs()

    @jax.jit
    def step(w, state, x, y):
      loss, g = jax.value_and_grad(loss_parallel, argnums=1)(x, w, y)
      updates, state = opt.update(g, state, w)
      return optax.apply_updates(w, updates), state, loss

    state = opt.init(w)
    losses = []
    for _ in range(4):
      w, state, loss = step(w, state, x, y)
      losses.append(float(np.asarray(multihost_utils.process_allgather(loss, tiled=True))))
    w_final = np.asarray(multihost_utils.process_allgather(w, tiled=True))

    # Reference: the materialized loss with optax on one device, all tokens.
    def ref_loss(w, x, y):
      keep = y != -100
      per = optax.softmax_cross_entropy_with_integer_labels(x @ w, jnp.where(keep, y, 0))
      return jnp.sum(jnp.where(keep, per, 0.0)) / jnp.sum(keep)

    @jax.jit
    def ref_step(w, state, x, y):
      loss, g = jax.value_and_grad(ref_loss)(w, x, y)
      updates, state = opt.update(g, state, w)
      return optax.apply_updates(w, updates), state, loss

    one = jax.local_devices()[0]
    wr, xr, yr = jax.device_put((W0, X, Y), one)
    sr = opt.init(wr)
    ref_losses = []
    for _ in range(4):
      wr, sr, lr = ref_step(wr, sr, xr, yr)
      ref_losses.append(float(lr))
    measure("training_vs_one_device.losses", losses, ref_losses)
    measure("training_vs_one_device.w", w_final, np.asarray(wr))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(w_final, np.asarray(wr), rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0]
    # In sync: every process holds bit-identical parameters (compared by the test).
    RESULTS["trained_w_sha"] = __import__("hashlib").sha256(w_final.tobytes()).hexdigest()
    RESULTS["losses"] = losses

  with open(os.path.join(OUT, f"process_{PID}.json"), "w") as f:
    json.dump(RESULTS, f)


main()
