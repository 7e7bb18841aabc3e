"""How `xentjax.evaluate` feeds memory-mapped batches: pages touched before their step, where batches are read."""

import threading

import numpy as np
import pytest

import xentjax
from xentjax.evaluation import _stream as _evaluation


@pytest.mark.parametrize(
  "prefetch, thread", [(0, "MainThread"), (2, "xentjax-evaluate")]
)  # the default reads in the loop; a feeding thread (`_Prefetcher`) where asked
def test_every_numpy_array_of_a_batch_is_touched_where_batches_are_read(
  tmp_path, monkeypatch, prefetch, thread
):
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
  got = xentjax.evaluate(batches, progress=False, prefetch=prefetch)
  assert sorted(seen) == sorted([((100, 6), thread), ((100,), thread), ((100,), thread)] * 3)
  # The memory-mapped batches give the numbers of the same arrays in memory.
  monkeypatch.setattr(_evaluation, "_touch_pages", original)
  want = xentjax.evaluate(
    [{"logits": logits[i : i + 100], "labels": labels[i : i + 100],
      "byte_counts": np.ones(100, np.int64)} for i in range(0, 300, 100)],
    progress=False,
  )  # fmt: skip
  assert got == want


def test_pages_are_mapped_in_one_call_for_any_slice_of_a_memory_map(tmp_path):
  """`_populate` page-aligns the start itself: an unaligned slice maps like the whole file.

  Where the kernel has no MADV_POPULATE_READ (or outside Linux) both calls
  return False and `_touch_pages` reads a byte per page instead; the data is
  never changed either way.
  """
  data = np.arange(5000, dtype=np.float32).reshape(1000, 5)
  np.save(tmp_path / "z.npy", data)
  z = np.load(tmp_path / "z.npy", mmap_mode="r")
  whole = _evaluation._populate(z)
  assert _evaluation._populate(z[3:517]) == whole  # starts mid-page
  assert _evaluation._populate(z[999:]) == whole  # a few bytes at the end
  for piece in (z, z[3:517], z[999:]):
    _evaluation._touch_pages(piece)
  np.testing.assert_array_equal(z, data)


def _fake_caches(root, caches):
  """A sysfs-like ``cache`` folder: ``(level, type, size)`` per ``indexN``."""
  for i, (level, kind, size) in enumerate(caches):
    d = root / f"index{i}"
    d.mkdir(parents=True)
    (d / "level").write_text(f"{level}\n")
    (d / "type").write_text(f"{kind}\n")
    (d / "size").write_text(f"{size}\n")
  return str(root)


@pytest.mark.parametrize(
  "l2, want",
  [
    ("512K", 2 * 512 * 1024 // 4),  # Zen 3: 1 MiB chunks, as before
    ("1024K", 2 * 1024 * 1024 // 4),  # Zen 4: 2 MiB
    ("2M", 2 * 2 * 1024 * 1024 // 4),  # 2 MiB of L2: 4 MiB, the ceiling
    ("32M", 1 << 20),  # clamped to 4 MiB
    ("64K", 1 << 16),  # clamped to 256 KiB
  ],
)
def test_chunks_fill_twice_one_cores_l2_cache(tmp_path, l2, want):
  root = _fake_caches(
    tmp_path,
    [(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", l2), (3, "Unified", "32768K")],
  )
  assert _evaluation._chunk_logits(root) == want


@pytest.mark.parametrize("caches", [[], [(1, "Data", "32K")], [(2, "Unified", "lots")]])
def test_chunks_default_to_a_mebibyte_where_the_l2_size_is_unknown(tmp_path, caches):
  root = _fake_caches(tmp_path / "cache", caches) if caches else str(tmp_path / "missing")
  assert _evaluation._chunk_logits(root) == 1 << 18


@pytest.mark.parametrize(
  "batch_bytes, want",
  [
    (50_000 * 64 * 4, (8, 2)),  # the benchmark's 12.8 MB batches: eight steps, drained to two
    (64 << 20, (4, 1)),  # 256 MiB of batches: four
    (100 << 20, (2, 2)),  # two at least, one wait per step as before
    (1 << 34, (2, 2)),
  ],
)
def test_steps_in_flight_are_bounded_by_count_and_bytes(batch_bytes, want):
  assert _evaluation._depths(batch_bytes) == want


@pytest.mark.parametrize("budget, most, resume", [(1 << 28, 8, 2), (1, 2, 2)])
def test_the_loop_waits_for_steps_in_bursts(monkeypatch, budget, most, resume):
  """Never more than ``most`` steps queue; a wait drains the queue to ``resume``."""
  monkeypatch.setattr(_evaluation, "_IN_FLIGHT_BYTES", budget)
  queued = []  # steps in flight at each wait of the loop (not of the final drain)
  original, finish = _evaluation._Run._retire, _evaluation._Run.finish

  def retire(self):
    if not getattr(self, "finishing", False):
      queued.append(len(self.in_flight))
    original(self)

  def finishing(self):
    self.finishing = True
    return finish(self)

  monkeypatch.setattr(_evaluation._Run, "_retire", retire)
  monkeypatch.setattr(_evaluation._Run, "finish", finishing)
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((30 * 40, 5)).astype(np.float32)
  labels = rng.integers(0, 5, 30 * 40)
  batches = [(logits[i : i + 40], labels[i : i + 40]) for i in range(0, len(labels), 40)]
  got = xentjax.evaluate(batches, progress=False)
  burst = list(range(most + 1, resume, -1))  # a step was just added when the loop waits
  assert len(queued) >= 2 * len(burst) and len(queued) % len(burst) == 0, queued
  assert queued == burst * (len(queued) // len(burst)), queued
  want = xentjax.evaluate([(logits, labels)], progress=False)
  assert abs(got.cross_entropy - want.cross_entropy) <= 1e-6 * want.cross_entropy
