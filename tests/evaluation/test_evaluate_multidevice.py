"""`xentjax.evaluate` over 8 simulated CPU devices equals the 1-device run.

The device count is fixed when JAX starts, so the check runs in a fresh
interpreter with `--xla_force_host_platform_device_count=8`; it prints JSON
that this test compares with a float64 NumPy reference.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
  """
    import json
    import jax
    import numpy as np
    jax.config.update("jax_numpy_rank_promotion", "raise")
    import xentjax
    from jax.sharding import Mesh
    from xentjax.evaluation import _stream as _evaluation

    devices = jax.local_devices()
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((1003, 12)) * 2).astype(np.float32)
    labels = rng.integers(0, 12, 1003)
    mask = rng.random(1003) < 0.9
    soft = rng.dirichlet(np.ones(12), 1003).astype(np.float32)
    np.savez("data.npz", logits=logits, labels=labels, mask=mask, soft=soft)

    def stream(y, size=100, with_mask=True):
      for i in range(0, 1003, size):
        yield (logits[i:i + size], y[i:i + size]) + ((mask[i:i + size],) if with_mask else ())

    # The batch really is sharded over every device.
    item = next(_evaluation._padded_batches(stream(labels), model=None, mesh=Mesh(np.asarray(devices), ("data",)), ignore_index=-100))
    shards = len(item.x.sharding.device_set)

    out = {"devices": len(devices), "shards": shards, "padded_rows": item.x.shape[0]}
    w = rng.standard_normal((12, 12)).astype(np.float32)
    for name, devs in (("all", devices), ("one", devices[:1])):
      hard = xentjax.evaluate(stream(labels), top_k=3, devices=devs, progress=False)
      soft_r = xentjax.evaluate(stream(soft), devices=devs, progress=False)
      model = xentjax.evaluate(
          ((x, y) for x, y in stream(labels, 64, with_mask=False)),
          model=lambda p, x: x @ p, params=w, devices=devs, progress=False,
      )
      nbytes, docs = np.arange(1003) % 5, np.arange(1003) // 70
      dicts = [
          {"hidden": logits[i:i + 100], "labels": labels[i:i + 100], "mask": mask[i:i + 100],
           "byte_counts": nbytes[i:i + 100], "document_ids": docs[i:i + 100]}
          for i in range(0, 1003, 100)
      ]
      fused = xentjax.evaluate(dicts, head=w, top_k=3, devices=devs, progress=False)
      out[name] = {"hard": hard.to_dict(), "soft": soft_r.to_dict(), "model": model.to_dict(),
                   "hidden": fused.to_dict(), "documents": fused.per_document.to_dict()}
    # Each device folds its 13 rows in chunks of 4 rows and a tail of 1 (`_fold_chunks`).
    _evaluation._MIN_CHUNK_ROWS, _evaluation._CHUNK_LOGITS = 4, 4 * 12
    _evaluation._step.clear_cache()
    out["chunked"] = xentjax.evaluate(stream(labels), top_k=3, devices=devices, progress=False).to_dict()
    # The rows' maximum the other way (per chunk, or over the whole sharded batch).
    _evaluation._WHOLE_BATCH_MAX = not _evaluation._WHOLE_BATCH_MAX
    _evaluation._step.clear_cache()
    out["chunked_other_max"] = xentjax.evaluate(stream(labels), top_k=3, devices=devices, progress=False).to_dict()
    # 64 classes: read folded on every device where `_WHOLE_BATCH_MAX` holds.
    wide = (rng.standard_normal((1003, 64)) * 3).astype(np.float32)
    wide_y = rng.integers(0, 64, 1003)
    wide_batches = [(wide[i:i + 100], wide_y[i:i + 100]) for i in range(0, 1003, 100)]
    for whole in (True, False):
      _evaluation._WHOLE_BATCH_MAX = whole
      out[f"wide_{whole}"] = xentjax.evaluate(wide_batches, top_k=3, devices=devices, progress=False).to_dict()
    out["wide"] = {"logits": wide.tolist(), "labels": wide_y.tolist()}
    out["w"] = w.tolist()
    print(json.dumps(out))
    """
)


def float64_metrics(logits, labels, mask=None, top_k=5):
  z = np.asarray(logits, np.float64)
  keep = np.ones(len(z), bool) if mask is None else mask
  z = z[keep]
  logp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
  labels = labels[keep]
  if np.issubdtype(labels.dtype, np.floating):
    nll = -(labels * logp).sum(-1)
    target = labels.argmax(-1)
  else:
    nll = -logp[np.arange(len(z)), labels]
    target = labels
  z_t = z[np.arange(len(z)), target]
  higher = (z > z_t[:, None]).sum(-1)
  return len(z), nll.mean(), (higher == 0).mean(), (higher < top_k).mean()


def check(result, ref, rtol=1e-6, atol=0.0):
  count, ce, acc, acc_k = ref
  assert result["count"] == count
  np.testing.assert_allclose(result["cross_entropy"], ce, rtol=rtol)
  np.testing.assert_allclose(result["accuracy"], acc, rtol=1e-12, atol=atol)
  np.testing.assert_allclose(result["top_k_accuracy"], acc_k, rtol=1e-12, atol=atol)


def test_eight_simulated_devices_match_one_and_float64(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  proc = subprocess.run(
      [sys.executable, "-c", SCRIPT], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=300,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  assert out["shards"] == 8
  assert out["padded_rows"] == 104  # 100 rows padded to a multiple of 8

  data = np.load(tmp_path / "data.npz")
  logits, labels, mask, soft = data["logits"], data["labels"], data["mask"], data["soft"]
  for name in ("all", "one"):
    check(out[name]["hard"], float64_metrics(logits, labels, mask, top_k=3))
    check(out[name]["soft"], float64_metrics(logits, soft, mask))
    w = np.asarray(out["w"], np.float32)
    # The model's float32 matmul may round a near-tie either way: allow one example.
    ref = float64_metrics(logits.astype(np.float64) @ w, labels)
    check(out[name]["model"], ref, rtol=1e-5, atol=1.5 / 1003)

    # From hidden states with a head, per-document sums and bytes included.
    z = logits.astype(np.float64) @ w
    check(
      out[name]["hidden"], float64_metrics(z, labels, mask, top_k=3), rtol=1e-5, atol=1.5 / 1003
    )
    keep = mask.copy()
    nll = np.logaddexp.reduce(z, axis=-1) - z[np.arange(len(z)), labels]
    nbytes, docs = np.arange(1003) % 5, np.arange(1003) // 70
    assert out[name]["hidden"]["byte_count"] == nbytes[keep].sum()
    d = out[name]["documents"]
    assert d["ids"] == list(range(15))
    assert d["count"] == [int(keep[docs == i].sum()) for i in range(15)]
    ref = [nll[keep & (docs == i)].sum() for i in range(15)]
    np.testing.assert_allclose(d["negative_log_likelihood_sum"], ref, rtol=1e-5)
  for key in ("count", "accuracy", "top_k_accuracy", "byte_count"):
    assert out["all"]["hidden"][key] == out["one"]["hidden"][key], key
  np.testing.assert_allclose(
    out["all"]["documents"]["negative_log_likelihood_sum"],
    out["one"]["documents"]["negative_log_likelihood_sum"],
    rtol=1e-6,
  )

  check(out["chunked"], float64_metrics(logits, labels, mask, top_k=3))
  assert out["chunked_other_max"] == out["chunked"]  # the same bits either way
  wide, wide_y = np.asarray(out["wide"]["logits"], np.float32), np.asarray(out["wide"]["labels"])
  folded, chunked = out["wide_True"], out["wide_False"]
  for r in (folded, chunked):
    check(r, float64_metrics(wide, wide_y, top_k=3))
  for key in ("count", "accuracy", "top_k_accuracy"):
    assert folded[key] == chunked[key], key
  for key in ("cross_entropy", "brier_score", "expected_calibration_error"):
    np.testing.assert_allclose(folded[key], chunked[key], rtol=1e-6, atol=1e-9, err_msg=key)
  for key in ("count", "accuracy", "top_k_accuracy"):
    assert out["chunked"][key] == out["all"]["hard"][key], key
  for key in ("cross_entropy", "expected_calibration_error", "brier_score"):
    np.testing.assert_allclose(out["chunked"][key], out["all"]["hard"][key], rtol=1e-9, atol=1e-12)

  # Sharded and single-device runs agree beyond the float64 tolerance above.
  for kind in ("hard", "soft", "model"):
    a, b = out["all"][kind], out["one"][kind]
    for key in ("count", "accuracy", "top_k_accuracy"):
      assert a[key] == b[key], (kind, key)
    for key in ("cross_entropy", "expected_calibration_error"):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12)
