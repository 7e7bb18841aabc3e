"""`xentjax.evaluate` with dict batches: bits per byte and per-document sums.

Every expected number comes from a float64 NumPy computation on the same
arrays (boolean indexing for masks and `ignore_index`, `np.unique` for the
documents), never from the implementation.
"""

import math

import jax
import numpy as np
import pytest

import xentjax
from xentjax.evaluation import _stream as _evaluation

C, B = 8, 64


def make(n, seed=0, n_docs=7, c=C):
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal((n, c)) * 2).astype(np.float32)
  labels = rng.integers(0, c, n)
  labels[rng.random(n) < 0.1] = -100
  mask = rng.random(n) < 0.85
  byte_counts = rng.integers(0, 6, n)
  # Documents run across batches (long runs), ids are not contiguous or sorted.
  ids = np.array([10**12, -3, 5, 0, 77, 9, 41])[:n_docs]
  docs = ids[np.minimum(np.arange(n) * n_docs // n, n_docs - 1)]
  return logits, labels, mask, byte_counts, docs


def dict_batches(logits, labels, mask, byte_counts, docs, size=B):
  out = []
  for i in range(0, len(labels), size):
    s = slice(i, i + size)
    batch = {"logits": logits[s], "labels": labels[s], "mask": mask[s]}
    if byte_counts is not None:
      batch["byte_counts"] = byte_counts[s]
    if docs is not None:
      batch["document_ids"] = docs[s]
    out.append(batch)
  return out


def float64_nll(logits, labels, mask, ignore_index=-100):
  """Per-row NLL in float64 and which rows count (not masked, not ignored)."""
  z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
  y = np.asarray(labels).reshape(-1)
  keep = np.asarray(mask, bool).reshape(-1) & (y != ignore_index)
  m = z.max(-1)
  lse = m + np.log(np.exp(z - m[:, None]).sum(-1))
  nll = np.where(keep, lse - z[np.arange(len(y)), np.where(keep, y, 0)], 0.0)
  return nll, keep


def per_document_reference(nll, keep, byte_counts, docs):
  ids = np.unique(docs)
  return {
    "ids": ids,
    "nll": np.array([nll[docs == d].sum() for d in ids]),
    "count": np.array([keep[docs == d].sum() for d in ids]),
    "bytes": np.array([byte_counts[(docs == d) & keep].sum() for d in ids]),
  }


def assert_documents(result, ref, rtol=1e-6):
  pd = result.per_document
  np.testing.assert_array_equal(pd.ids, ref["ids"])
  np.testing.assert_array_equal(pd.count, ref["count"])
  np.testing.assert_array_equal(pd.byte_count, ref["bytes"])
  np.testing.assert_allclose(pd.negative_log_likelihood_sum, ref["nll"], rtol=rtol, atol=1e-9)
  assert pd.ids.dtype == np.int64 and pd.count.dtype == np.int64
  assert pd.negative_log_likelihood_sum.dtype == np.float64


@pytest.mark.parametrize("x64", [False, True], ids=["x64-off", "x64-on"])
def test_bits_per_byte_and_documents_match_float64(x64):
  logits, labels, mask, byte_counts, docs = make(1000)
  nll, keep = float64_nll(logits, labels, mask)
  with jax.enable_x64(x64):
    r = xentjax.evaluate(
      dict_batches(logits, labels, mask, byte_counts, docs), progress=False, prefetch=0
    )
  assert r.count == keep.sum()
  assert r.byte_count == byte_counts[keep].sum()
  bpb = nll.sum() / math.log(2) / byte_counts[keep].sum()
  np.testing.assert_allclose(r.bits_per_byte, bpb, rtol=1e-6)
  assert_documents(r, per_document_reference(nll, keep, byte_counts, docs))
  # The documents partition the counted tokens: their sums add up to the totals.
  assert r.per_document.count.sum() == r.count
  assert r.per_document.byte_count.sum() == r.byte_count
  np.testing.assert_allclose(
    math.fsum(r.per_document.negative_log_likelihood_sum), r.negative_log_likelihood_sum, rtol=1e-12
  )


def test_masked_and_ignored_tokens_count_in_neither_sum():
  logits, labels, mask, byte_counts, docs = make(200, seed=3)
  base = xentjax.evaluate(dict_batches(logits, labels, mask, byte_counts, docs), progress=False)
  # Changing the byte counts of tokens that do not count changes nothing.
  _, keep = float64_nll(logits, labels, mask)
  changed = np.where(keep, byte_counts, 1000)
  again = xentjax.evaluate(dict_batches(logits, labels, mask, changed, docs), progress=False)
  assert again.byte_count == base.byte_count and again.bits_per_byte == base.bits_per_byte
  np.testing.assert_array_equal(again.per_document.byte_count, base.per_document.byte_count)


def test_empty_documents_are_listed_with_zeros():
  logits, labels, mask, byte_counts, _ = make(128, seed=4)
  docs = np.repeat([4, 8, 15, 16], 32)
  mask = mask.copy()
  mask[32:64] = False  # document 8: masked out
  labels = labels.copy()
  labels[64:96] = -100  # document 15: every label ignored
  r = xentjax.evaluate(dict_batches(logits, labels, mask, byte_counts, docs), progress=False)
  pd = r.per_document
  np.testing.assert_array_equal(pd.ids, [4, 8, 15, 16])
  np.testing.assert_array_equal(pd.count[1:3], [0, 0])
  np.testing.assert_array_equal(pd.byte_count[1:3], [0, 0])
  np.testing.assert_array_equal(pd.negative_log_likelihood_sum[1:3], [0.0, 0.0])
  assert np.isnan(pd.bits_per_byte[1]) and np.isfinite(pd.bits_per_byte[0])
  nll, keep = float64_nll(logits, labels, mask)
  assert_documents(r, per_document_reference(nll, keep, byte_counts, docs))


def test_ragged_batches_and_padding_add_no_document():
  logits, labels, mask, byte_counts, docs = make(203, seed=5)
  sizes = [64, 64, 50, 25]  # a smaller batch is padded to the first one's size
  batches, start = [], 0
  for size in sizes:
    batches += dict_batches(
      logits[start : start + size],
      labels[start : start + size],
      mask[start : start + size],
      byte_counts[start : start + size],
      docs[start : start + size],
      size=size,
    )
    start += size
  r = xentjax.evaluate(batches, progress=False)
  nll, keep = float64_nll(logits, labels, mask)
  assert_documents(r, per_document_reference(nll, keep, byte_counts, docs))


def test_sequence_batches_with_documents_per_token():
  rng = np.random.default_rng(6)
  logits = rng.standard_normal((12, 10, C)).astype(np.float32)
  labels = rng.integers(0, C, (12, 10))
  mask = rng.random((12, 10)) < 0.8
  byte_counts = rng.integers(1, 4, (12, 10))
  docs = np.cumsum(rng.random((12, 10)) < 0.1).reshape(12, 10)  # packed sequences
  batches = [
    {
      "logits": logits[i : i + 5],
      "labels": labels[i : i + 5],
      "mask": mask[i : i + 5],
      "byte_counts": byte_counts[i : i + 5],
      "document_ids": docs[i : i + 5],
    }
    for i in range(0, 12, 5)
  ]
  r = xentjax.evaluate(batches, progress=False)
  nll, keep = float64_nll(logits, labels, mask)
  ref = per_document_reference(nll, keep, byte_counts.reshape(-1), docs.reshape(-1))
  assert_documents(r, ref)
  np.testing.assert_allclose(
    r.bits_per_byte, nll.sum() / math.log(2) / byte_counts.reshape(-1)[keep].sum(), rtol=1e-6
  )


def test_document_sums_are_exact_two_float_sums():
  """A document's sum is the exact sum of the per-token values the library computed.

  Each token in its own document gives the float32 per-token values
  themselves; one document of all tokens must be their exact sum (`fsum`),
  where a float32 running sum of 20,000 values of mixed size is off by about
  1e-6 relative.
  """
  rng = np.random.default_rng(7)
  n = 20_000
  logits = (rng.standard_normal((n, C)) * rng.choice([0.01, 1.0, 30.0], (n, 1))).astype(np.float32)
  labels = rng.integers(0, C, n)
  ones = np.ones(n, bool)

  def run(docs):
    batches = dict_batches(logits, labels, ones, None, docs, size=1000)
    return xentjax.evaluate(batches, progress=False).per_document

  each = run(np.arange(n)).negative_log_likelihood_sum
  exact = math.fsum(each)
  whole = run(np.zeros(n, np.int64)).negative_log_likelihood_sum[0]
  assert abs(whole - exact) <= 1e-12 * exact
  naive = np.float32(0)
  for v in each.astype(np.float32):
    naive += v
  assert abs(float(naive) - exact) > 1e-9 * exact  # a float32 running sum fails the check


def test_documents_spanning_many_batches_and_compaction(monkeypatch):
  merged = []
  original = _evaluation._merge_documents

  def merge(tables):
    merged.append(len(tables))
    return original(tables)

  monkeypatch.setattr(_evaluation, "_DOC_COMPACT_ROWS", 4)  # merge the tables every few batches
  monkeypatch.setattr(_evaluation, "_merge_documents", merge)
  logits, labels, mask, byte_counts, _ = make(640, seed=8)
  docs = np.arange(640) % 3  # each document in every batch
  r = xentjax.evaluate(
    dict_batches(logits, labels, mask, byte_counts, docs, size=32), progress=False
  )
  assert len(merged) > 3
  nll, keep = float64_nll(logits, labels, mask)
  assert_documents(r, per_document_reference(nll, keep, byte_counts, docs))


def test_flush_keeps_bytes_and_documents(monkeypatch):
  monkeypatch.setattr(_evaluation, "_INT32_MAX", 300)  # fold the byte counter every few batches
  logits, labels, mask, byte_counts, docs = make(500, seed=9)
  r = xentjax.evaluate(dict_batches(logits, labels, mask, byte_counts, docs), progress=False)
  nll, keep = float64_nll(logits, labels, mask)
  assert r.byte_count == byte_counts[keep].sum()
  assert_documents(r, per_document_reference(nll, keep, byte_counts, docs))


def test_tuple_batches_are_unchanged_and_dicts_without_extras_equal_them():
  logits, labels, mask, _, _ = make(300, seed=10)
  tuples = [(logits[i : i + B], labels[i : i + B], mask[i : i + B]) for i in range(0, 300, B)]
  a = xentjax.evaluate(tuples, progress=False)
  b = xentjax.evaluate(dict_batches(logits, labels, mask, None, None), progress=False)
  assert a == b
  assert a.bits_per_byte is None and a.byte_count is None and a.per_document is None
  assert "bits_per_byte" not in a.to_dict() and "per_document" not in a.to_dict()
  assert "bits per byte" not in str(a)


def test_bits_per_byte_row_in_table_and_dict():
  logits, labels, mask, byte_counts, docs = make(100, seed=11)
  r = xentjax.evaluate(dict_batches(logits, labels, mask, byte_counts, docs), progress=False)
  assert "bits per byte" in str(r) and "documents" in str(r)
  d = r.to_dict()
  assert d["bits_per_byte"] == r.bits_per_byte and d["byte_count"] == r.byte_count
  cols = r.per_document.to_dict()
  assert cols["ids"] == r.per_document.ids.tolist()


def test_no_counted_bytes_give_nan_and_no_batches_give_empty_documents():
  logits, labels, mask, byte_counts, docs = make(64, seed=12)
  zero = xentjax.evaluate(
    dict_batches(logits, labels, mask, np.zeros_like(byte_counts), docs), progress=False
  )
  assert zero.byte_count == 0 and math.isnan(zero.bits_per_byte)
  empty = [{"logits": logits[:0], "labels": labels[:0], "document_ids": docs[:0]}]
  r = xentjax.evaluate(empty, progress=False)
  assert r.count == 0 and r.per_document is None  # no batch with rows: nothing was seen


@pytest.mark.parametrize(
  "change, error, match",
  [
    ({"byte_counts": np.ones(8, np.float32)}, TypeError, "byte_counts"),
    ({"byte_counts": -np.ones(8, np.int64)}, ValueError, ">= 0"),
    ({"byte_counts": np.ones(7, np.int64)}, ValueError, "row shape"),
    ({"document_ids": np.ones(8, np.float64)}, TypeError, "document_ids"),
    ({"document_ids": np.ones((8, 2), np.int64)}, ValueError, "row shape"),
    ({"weights": np.ones(8)}, ValueError, "unknown"),
    ({"labels": None}, ValueError, "missing"),
    ({"hidden": np.ones((8, 3), np.float32)}, ValueError, "hidden"),
  ],
)
def test_bad_dict_batches_raise(change, error, match):
  batch = {"logits": np.zeros((8, C), np.float32), "labels": np.zeros(8, np.int64)}
  batch.update(change)
  if change.get("labels", 0) is None:
    del batch["labels"]
  if "hidden" in change:
    del batch["logits"]
  with pytest.raises(error, match=match):
    xentjax.evaluate([batch], progress=False)


def test_batches_must_carry_the_same_extras():
  logits, labels, mask, byte_counts, docs = make(128, seed=13)
  batches = dict_batches(logits, labels, mask, byte_counts, docs)
  del batches[1]["byte_counts"]
  with pytest.raises(ValueError, match="same optional arrays"):
    xentjax.evaluate(batches, progress=False)
