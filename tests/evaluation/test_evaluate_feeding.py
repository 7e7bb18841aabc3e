"""How `xentjax.evaluate` feeds memory-mapped batches: pages touched in the feeding thread."""

import threading

import numpy as np

import xentjax
from xentjax.evaluation import _stream as _evaluation


def test_every_numpy_array_of_a_batch_is_touched_in_the_feeding_thread(tmp_path, monkeypatch):
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((300, 6)) * 2).astype(np.float32)
  labels = rng.integers(0, 6, 300)
  np.save(tmp_path / "z.npy", logits)
  z = np.load(tmp_path / "z.npy", mmap_mode="r")
  seen = []
  original = _evaluation._touch_pages

  def touch(a):
    if isinstance(a, np.ndarray):
      seen.append((a.shape, threading.current_thread().name))
    original(a)

  monkeypatch.setattr(_evaluation, "_touch_pages", touch)
  batches = [{"logits": z[i : i + 100], "labels": labels[i : i + 100],
              "byte_counts": np.ones(100, np.int64)} for i in range(0, 300, 100)]  # fmt: skip
  got = xentjax.evaluate(batches, progress=False)
  thread = "xentjax-evaluate"  # the feeding thread (`_Prefetcher`)
  assert sorted(seen) == sorted([((100, 6), thread), ((100,), thread), ((100,), thread)] * 3)
  # The memory-mapped batches give the numbers of the same arrays in memory.
  monkeypatch.setattr(_evaluation, "_touch_pages", original)
  want = xentjax.evaluate(
    [{"logits": logits[i : i + 100], "labels": labels[i : i + 100],
      "byte_counts": np.ones(100, np.int64)} for i in range(0, 300, 100)],
    progress=False,
  )  # fmt: skip
  assert got == want
