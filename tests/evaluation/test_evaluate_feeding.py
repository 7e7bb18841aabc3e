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
