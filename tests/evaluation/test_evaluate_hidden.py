"""`xentjax.evaluate(batches, head=w, bias=b)`: every figure from hidden states, no logits.

The references are float64 NumPy computations on ``hidden @ w + b`` (ties
counted by comparing the logits, as in tests/evaluation/test_evaluate.py), plus the
dense path on the same logits. Inputs on a coarse grid (small integers, or
multiples of 1/4) make the logits exact in float32 whatever the order of a
matmul's sums, so ties are real ties in every computation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax
from xentjax import _core
from xentjax._vocab.evaluation import evaluation_rows
from xentjax._vocab.kernels.evaluation import _blocks, _label_logit, _largest, _top_candidates
from xentjax.evaluation import _stream as _evaluation


def make(n, d, v, seed=0, grid=True):
  rng = np.random.default_rng(seed)
  h = rng.integers(-2, 3, (n, d)).astype(np.float32)
  w = (rng.integers(-3, 4, (d, v)) / 4).astype(np.float32)
  b = (rng.integers(-4, 5, v) / 4).astype(np.float32)
  if not grid:
    h, w, b = (rng.standard_normal(a.shape).astype(np.float32) for a in (h, w, b))
  y = rng.integers(0, v, n)
  y[rng.random(n) < 0.1] = -100
  mask = rng.random(n) < 0.9
  return h, w, b, y, mask


def tie_credit(z, z_t, k):
  """Expected top-k hit with ties broken at random: the target's place is uniform over g+1..g+t."""
  out = []
  for row, zt in zip(z, z_t):
    g, t = int((row > zt).sum()), int((row == zt).sum())
    out.append(sum(g + j <= k for j in range(1, t + 1)) / t)
  return np.array(out)


def reference(z, y, mask, *, top_k=5, num_bins=15, byte_counts=None):
  z = np.asarray(z, np.float64)
  keep = mask & (y != -100)
  z, y = z[keep], y[keep]
  rows = np.arange(len(y))
  m = z.max(-1)
  lse = m + np.log(np.exp(z - m[:, None]).sum(-1))
  p = np.exp(z - lse[:, None])
  nll = lse - z[rows, y]
  correct = tie_credit(z, z[rows, y], 1)
  conf = p.max(-1)
  bins = np.minimum((conf * num_bins).astype(int), num_bins - 1)
  ece = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(num_bins))
  onehot = np.eye(z.shape[1])[y]
  out = {
    "count": len(y),
    "cross_entropy": nll.mean(),
    "accuracy": correct.mean(),
    "top_k_accuracy": tie_credit(z, z[rows, y], top_k).mean(),
    "expected_calibration_error": ece / len(y),
    "brier_score": ((p - onehot) ** 2).sum(-1).mean(),
  }
  if byte_counts is not None:
    out["bits_per_byte"] = nll.sum() / math.log(2) / byte_counts[keep].sum()
  return out


def check(result, ref):
  assert result.count == ref["count"]
  for name, want in ref.items():
    if name != "count":
      np.testing.assert_allclose(getattr(result, name), want, rtol=2e-6, atol=1e-7, err_msg=name)


def dict_batches(key, x, y, mask, size=50, **extra):
  out = []
  for i in range(0, len(y), size):
    s = slice(i, i + size)
    out.append({key: x[s], "labels": y[s], "mask": mask[s], **{k: v[s] for k, v in extra.items()}})
  return out


@pytest.mark.parametrize("grid", [True, False], ids=["ties", "random"])
def test_every_figure_matches_float64_and_the_logits_path(grid):
  h, w, b, y, mask = make(230, 6, 40, grid=grid)
  rng = np.random.default_rng(1)
  byte_counts = rng.integers(1, 5, len(y))
  docs = np.arange(len(y)) // 37
  extra = {"byte_counts": byte_counts, "document_ids": docs}
  z = h @ w + b  # exact on the grid
  got = xentjax.evaluate(
    dict_batches("hidden", h, y, mask, **extra), head=w, bias=b, top_k=3, progress=False
  )
  check(got, reference(h.astype(np.float64) @ w + b, y, mask, top_k=3, byte_counts=byte_counts))
  dense = xentjax.evaluate(dict_batches("logits", z, y, mask, **extra), top_k=3, progress=False)
  assert got.count == dense.count and got.byte_count == dense.byte_count
  if grid:  # the same float32 logits: the credits are the same numbers
    assert got.accuracy == dense.accuracy and got.top_k_accuracy == dense.top_k_accuracy
    assert got.bin_count == dense.bin_count
  np.testing.assert_array_equal(got.per_document.ids, dense.per_document.ids)
  np.testing.assert_array_equal(got.per_document.count, dense.per_document.count)
  np.testing.assert_allclose(
    got.per_document.negative_log_likelihood_sum,
    dense.per_document.negative_log_likelihood_sum,
    rtol=1e-5,
  )


def test_tuple_batches_and_no_bias():
  h, w, _, y, mask = make(120, 5, 17, seed=2)
  tuples = [(h[i : i + 40], y[i : i + 40]) for i in range(0, 120, 40)]
  got = xentjax.evaluate(tuples, head=w, progress=False)
  check(got, reference(h.astype(np.float64) @ w, y, np.ones(len(y), bool)))
  triples = [(h[i : i + 40], y[i : i + 40], mask[i : i + 40]) for i in range(0, 120, 40)]
  check(
    xentjax.evaluate(triples, head=w, progress=False),
    reference(h.astype(np.float64) @ w, y, mask),
  )


def test_sequence_shaped_hidden_states():
  rng = np.random.default_rng(3)
  h = rng.standard_normal((6, 7, 4)).astype(np.float32)
  w = rng.standard_normal((4, 11)).astype(np.float32)
  y = rng.integers(0, 11, (6, 7))
  got = xentjax.evaluate([(h[:4], y[:4]), (h[4:], y[4:])], head=w, progress=False)
  z = h.reshape(-1, 4).astype(np.float64) @ w
  check(got, reference(z, y.reshape(-1), np.ones(42, bool)))


@pytest.mark.parametrize("k", [1, 2, 5, 13, 25])
def test_tie_shared_credit_over_many_tiles(k):
  """The one-sweep top-k with a tail count equals counting the ties, across tile borders.

  Ragged tiles of 3 and 7 columns (25 = 8 * 3 + 1 = 3 * 7 + 4), k above the
  tile width and k equal to the vocabulary, one tile of the whole vocabulary
  (the kernel's top-k unrolls k^2 selects: a vocabulary of 25 compiles in a
  third of the time 40 took, with the same cases).
  """
  rng = np.random.default_rng(k)
  n, d, v = 64, 3, 25
  h = rng.integers(-1, 2, (n, d)).astype(np.float32)
  w = rng.integers(-1, 2, (d, v)).astype(np.float32)  # few distinct logits: many ties
  y = rng.integers(0, v, n)
  status = _core.label_status(jnp.asarray(y), v)
  for chunks in ((8, 3), (64, 7), (16, 25)):
    rows = evaluation_rows(
      jnp.asarray(h), jnp.asarray(w), status, top_k=k, token_chunk_size=chunks[0],
      vocab_chunk_size=chunks[1],
    )  # fmt: skip
    z = h @ w
    zt = z[np.arange(n), y]
    np.testing.assert_allclose(rows.credit, tie_credit(z, zt, 1), rtol=1e-6)
    np.testing.assert_allclose(rows.credit_k, tie_credit(z, zt, k), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 5])
def test_tie_shared_credit_over_wide_tiles_from_the_best_blocks(k):
  """Tiles of >= 64k columns keep only their k best 32-column blocks as top-k candidates.

  Few distinct logits (ties inside and across blocks, the largest crowded
  into one block for some rows), tiles of 1024, 512 and 1000 columns (not a
  multiple of the block: the whole tile), all against counting the ties.
  """
  rng = np.random.default_rng(10 + k)
  n, d, v = 48, 3, 2048
  h = rng.integers(-1, 2, (n, d)).astype(np.float32)
  w = rng.integers(-2, 3, (d, v)).astype(np.float32)
  w[:, 64:70] = 4.0 * np.sign(rng.standard_normal((d, 1)))  # one block holds the largest
  y = rng.integers(0, v, n)
  y[:8] = np.arange(64, 72)
  z = h @ w
  zt = z[np.arange(n), y]
  status = _core.label_status(jnp.asarray(y), v)
  for vocab_chunk in (1024, 512, 1000):
    rows = evaluation_rows(
      jnp.asarray(h), jnp.asarray(w), status, top_k=k, token_chunk_size=16,
      vocab_chunk_size=vocab_chunk,
    )  # fmt: skip
    np.testing.assert_allclose(rows.credit, tie_credit(z, zt, 1), rtol=1e-6)
    np.testing.assert_allclose(rows.credit_k, tie_credit(z, zt, k), rtol=1e-6)


def test_largest_values_and_block_candidates_equal_lax_top_k():
  """`_largest` is `lax.top_k`'s values (multiplicity, -inf); the best blocks hold them."""
  rng = np.random.default_rng(4)
  for trial in range(60):
    c = int(rng.choice([5, 40, 320, 640, 1000]))
    k = int(rng.integers(1, 6))
    a = rng.standard_normal((9, c)) if trial % 2 else rng.integers(-3, 4, (9, c))
    a = a.astype(np.float32)
    a[rng.random(a.shape) < 0.2] = -np.inf
    a[0] = -np.inf
    want = np.asarray(jax.lax.top_k(jnp.asarray(a), k)[0])
    np.testing.assert_array_equal(_largest(jnp.asarray(a), k), want)
    blocks = _blocks(jnp.asarray(a), k)
    cand = _top_candidates(jnp.asarray(a), k, blocks)
    np.testing.assert_array_equal(_largest(cand, k), want)
    if blocks is not None:  # the row maximum, as `EvaluationStats.update` takes it
      np.testing.assert_array_equal(jnp.max(blocks[1], axis=1), a.max(axis=1))
    assert cand.shape[1] == (k * 32 if c % 32 == 0 and c // 32 >= 2 * k else c)


def test_the_label_logit_is_gathered_from_its_tile_only():
  """`_label_logit`: the tile's own number where the label is one of its columns, else 0."""
  z = np.array([[1.5, -np.inf, 3.0], [np.nan, 2.0, np.inf], [7.0, 8.0, 9.0]], np.float32)
  index = np.array([1, 0, 3], np.int32)  # -inf, NaN, outside the tile
  got = np.asarray(_label_logit(jnp.asarray(z), jnp.asarray(index)))
  assert got[0] == -np.inf and np.isnan(got[1]) and got[2] == 0.0
  got = np.asarray(_label_logit(jnp.asarray(z), jnp.asarray([-1, 2, 2], np.int32)))
  np.testing.assert_array_equal(got, [0.0, np.inf, 9.0])


def test_constant_and_minus_inf_rows_follow_the_dense_conventions():
  v = 6
  h = np.zeros((4, 2), np.float32)
  w = np.zeros((2, v), np.float32)
  bias = np.array([0, 0, -np.inf, -np.inf, 0, 0], np.float32)
  y = np.array([0, 2, 4, 5])
  got = xentjax.evaluate([(h, y)], head=w, bias=bias, top_k=2, progress=False)
  dense = xentjax.evaluate([(h @ w + bias, y)], top_k=2, progress=False)
  for name in ("count", "cross_entropy", "accuracy", "top_k_accuracy", "brier_score"):
    assert getattr(got, name) == pytest.approx(getattr(dense, name), rel=1e-6), name
  assert got.cross_entropy == math.inf  # label 2 sits at a -inf logit
  # Every logit -inf: all classes tied (credit k/V), loss +inf, as for logits.
  all_inf = np.full(v, -np.inf, np.float32)
  got = xentjax.evaluate([(h[:1], y[:1])], head=w, bias=all_inf, top_k=2, progress=False)
  dense = xentjax.evaluate([((h @ w + all_inf)[:1], y[:1])], top_k=2, progress=False)
  assert got.top_k_accuracy == pytest.approx(2 / v) == pytest.approx(dense.top_k_accuracy)
  assert got.cross_entropy == math.inf == dense.cross_entropy


def test_out_of_range_label_and_nan_hidden_give_nan():
  h, w, _, _, _ = make(10, 3, 8, seed=4)
  y = np.arange(10) % 8
  y[3] = 8
  assert math.isnan(xentjax.evaluate([(h, y)], head=w, progress=False).cross_entropy)
  h = h.copy()
  h[2, 0] = np.nan
  r = xentjax.evaluate([(h, y % 8)], head=w, progress=False)
  assert math.isnan(r.cross_entropy) and math.isnan(r.accuracy)
  mask = np.ones(10, bool)
  mask[2] = False  # a NaN row that does not count changes nothing
  assert not math.isnan(xentjax.evaluate([(h, y % 8, mask)], head=w, progress=False).accuracy)


def test_x64_and_bfloat16_hidden_states():
  h, w, b, y, mask = make(90, 4, 12, seed=5)
  with jax.enable_x64(True):
    r = xentjax.evaluate([(h, y, mask)], head=w, bias=b, prefetch=0, progress=False)
  check(r, reference(h.astype(np.float64) @ w + b, y, mask))
  hb = jnp.asarray(h, jnp.bfloat16)  # integers: exact in bfloat16
  r = xentjax.evaluate([(hb, y, mask)], head=jnp.asarray(w, jnp.bfloat16), progress=False)
  check(r, reference(h.astype(np.float64) @ w, y, mask))


def test_no_program_holds_the_logits():
  """At n = 8192, D = 2048, V = 262,144 the step's temporaries are under 2% of the logits."""
  n, d, v = 8192, 2048, 262_144
  s = jax.ShapeDtypeStruct
  acc = jax.tree.map(lambda a: s(a.shape, a.dtype), _evaluation._zero_accumulators(15, 0))
  config = _evaluation._StepConfig(5, 15, True, 1, False, documents=True, hidden=True)
  extras = {"byte_counts": s((n,), jnp.int32), "segments": s((n,), jnp.int32)}
  compiled = _evaluation._step.lower(
    acc,
    (s((d, v), jnp.float32), s((v,), jnp.float32)),
    s((n, d), jnp.float32),
    s((n,), jnp.int32),
    s((n,), jnp.bool_),
    extras,
    s((), jnp.int32),
    s((), jnp.int32),
    s((0,), jnp.float32),
    model=None,
    config=config,
  ).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert 0 < temp <= 0.02 * n * v * 4, temp


@pytest.mark.parametrize(
  "kwargs, batch, error, match",
  [
    ({"temperature": True}, None, ValueError, "temperature"),
    ({"model": lambda p, x: x}, None, ValueError, "not both"),
    ({"bias": np.zeros(5, np.float32)}, None, ValueError, "bias"),
    ({}, {"logits": np.zeros((4, 3), np.float32), "labels": np.zeros(4, int)}, ValueError, "head"),
    ({}, (np.zeros((4, 3), np.float32), np.zeros((4, 8), np.float32)), TypeError, "soft"),
    ({}, (np.zeros((4, 5), np.float32), np.zeros(4, int)), ValueError, "hidden size"),
    ({}, (np.zeros((4, 3), np.float32), np.zeros((4, 2), int)), ValueError, "feature axis"),
  ],
)
def test_bad_calls_raise(kwargs, batch, error, match):
  w = np.zeros((3, 8), np.float32)
  batch = batch if batch is not None else (np.zeros((4, 3), np.float32), np.zeros(4, int))
  with pytest.raises(error, match=match):
    xentjax.evaluate([batch], head=w, progress=False, **kwargs)
  with pytest.raises(ValueError, match="head"):
    xentjax.evaluate([batch], head=np.zeros(3, np.float32), progress=False)
