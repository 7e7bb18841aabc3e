"""Tests for `xentjax.evaluate`: exactness, padding, masks, soft labels, models."""

import dataclasses
import itertools
import json
import math
import sys
import weakref

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xentjax
from xentjax.evaluation import _stream as _evaluation

# ---------------------------------------------------------------------------
# Float64 NumPy reference (independent of the implementation).


def tie_credit(z, z_t, k):
  """Expected top-k hit with ties broken uniformly at random, by counting places.

  With g classes strictly above the target and t equal to it (target
  included), the target's place is uniform over g+1, ..., g+t.
  """
  out = []
  for row, zt in zip(z, z_t):
    g, t = int((row > zt).sum()), int((row == zt).sum())
    out.append(sum(g + j <= k for j in range(1, t + 1)) / t)
  return np.array(out, np.float64)


def reference(logits, labels, mask=None, *, top_k=5, num_bins=15, ignore_index=-100):
  """Dataset metrics in float64 by boolean indexing; labels integer or soft."""
  z = np.asarray(logits, np.float64)
  c = z.shape[-1]
  z = z.reshape(-1, c)
  labels = np.asarray(labels)
  soft = np.issubdtype(labels.dtype, np.floating)
  keep = np.ones(z.shape[0], bool) if mask is None else np.asarray(mask, bool).reshape(-1)
  if soft:
    y = labels.reshape(-1, c).astype(np.float64)[keep]
    target = y.argmax(-1)
  else:
    target = labels.reshape(-1)
    keep = keep & (target != ignore_index)
    target = target[keep]
  z = z[keep]
  m = z.max(-1)
  lse = m + np.log(np.exp(z - m[:, None]).sum(-1))
  logp = z - lse[:, None]
  rows = np.arange(z.shape[0])
  nll = -(y * logp).sum(-1) if soft else -logp[rows, target]
  z_t = z[rows, target]
  correct = tie_credit(z, z_t, 1)
  conf = np.exp(m - lse)
  bins = np.minimum((conf * num_bins).astype(int), num_bins - 1)
  ece = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(num_bins))
  n = z.shape[0]
  return {
    "count": n,
    "nll_sum": nll.sum(),
    "cross_entropy": nll.mean(),
    "accuracy": correct.mean(),
    "top_k_accuracy": tie_credit(z, z_t, top_k).mean(),
    "expected_calibration_error": ece / n,
  }


def batched(*arrays, size):
  n = arrays[0].shape[0]
  return [tuple(a[i : i + size] for a in arrays) for i in range(0, n, size)]


def assert_matches(result, ref, rtol=1e-6):
  assert result.count == ref["count"]
  np.testing.assert_allclose(result.cross_entropy, ref["cross_entropy"], rtol=rtol)
  np.testing.assert_allclose(result.negative_log_likelihood_sum, ref["nll_sum"], rtol=rtol)
  # Credits are 0/1 (exact) without ties; a shared tie's 1/t is rounded to
  # the logits' precision (float32: 6e-8 relative) before it is summed.
  np.testing.assert_allclose(result.accuracy, ref["accuracy"], rtol=2e-7)
  np.testing.assert_allclose(result.top_k_accuracy, ref["top_k_accuracy"], rtol=2e-7)
  np.testing.assert_allclose(
    result.expected_calibration_error, ref["expected_calibration_error"], rtol=1e-5, atol=1e-7
  )


# Most tests share one compiled step: 8 classes, batches of 64 (the first
# batch fixes the compiled size), default options.
C, B = 8, 64


def make_data(n, c=C, seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal((n, c)) * scale).astype(np.float32)
  labels = rng.integers(0, c, n)
  return logits, labels


# ---------------------------------------------------------------------------
# Exactness.


def test_exact_against_float64_on_a_million_examples_any_batch_size():
  n, c = 1_000_000, 8
  logits, labels = make_data(n, c, seed=1)
  # Per-example losses around 30: a running float32 sum drifts by far more than 1e-6.
  logits[np.arange(n), labels] -= 28.0
  ref = reference(logits, labels)

  z = logits.astype(np.float64)
  nll32 = (
    np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1) - z[np.arange(n), labels]
  ).astype(np.float32)
  naive = np.cumsum(nll32, dtype=np.float32)[-1] / n  # sequential float32 accumulation
  assert abs(naive - ref["cross_entropy"]) / ref["cross_entropy"] > 1e-6  # the test has teeth

  results = []
  for size in (1000, 4096, 65536):
    r = xentjax.evaluate(batched(logits, labels, size=size), progress=False)
    assert r.count == n
    np.testing.assert_allclose(r.cross_entropy, ref["cross_entropy"], rtol=1e-6)
    np.testing.assert_allclose(r.negative_log_likelihood_sum, ref["nll_sum"], rtol=1e-6)
    results.append(r)
  assert_matches(results[-1], ref)
  # Independent of the batch size beyond rounding.
  for r in results[1:]:
    np.testing.assert_allclose(r.cross_entropy, results[0].cross_entropy, rtol=1e-9)
    assert r.accuracy == results[0].accuracy
    assert r.top_k_accuracy == results[0].top_k_accuracy


def test_all_metrics_against_reference_with_ragged_last_batch():
  logits, labels = make_data(1003, seed=2)
  r = xentjax.evaluate(batched(logits, labels, size=B), top_k=3, num_bins=10, progress=False)
  assert_matches(r, reference(logits, labels, top_k=3, num_bins=10))
  np.testing.assert_allclose(r.perplexity, math.exp(r.cross_entropy), rtol=1e-12)
  np.testing.assert_allclose(r.bits_per_token, r.cross_entropy / math.log(2), rtol=1e-12)


def float64_brier(logits, labels, keep):
  z = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])[keep]
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(z.shape[-1])[np.asarray(labels).reshape(-1)[keep]]
  return ((p - onehot) ** 2).sum(-1).mean()


def test_a_batch_folded_in_chunks_matches_float64_and_one_chunk(monkeypatch):
  # The step folds a batch in cache-sized chunks of rows (`_fold_chunks`): with
  # 24-row chunks a [40, 5] batch of 200 rows is 8 chunks and a tail of 8.
  rng = np.random.default_rng(12)
  logits = (rng.standard_normal((120, 5, C)) * 3).astype(np.float32)
  labels = rng.integers(0, C, (120, 5))
  labels[rng.random((120, 5)) < 0.1] = -100
  mask = rng.random((120, 5)) < 0.85
  keep = (mask & (labels != -100)).reshape(-1)

  def run():
    _evaluation._step.clear_cache()
    try:
      return xentjax.evaluate(batched(logits, labels, mask, size=40), top_k=3, progress=False)
    finally:
      _evaluation._step.clear_cache()

  whole = run()  # 200 rows: below the default chunk, one piece
  monkeypatch.setattr(_evaluation, "_MIN_CHUNK_ROWS", 8)
  monkeypatch.setattr(_evaluation, "_CHUNK_LOGITS", 24 * C)
  chunked = run()
  ref = reference(logits, labels, mask, top_k=3)
  for r in (whole, chunked):
    assert_matches(r, ref)
    np.testing.assert_allclose(r.brier_score, float64_brier(logits, labels, keep), rtol=1e-6)
  assert (chunked.count, chunked.accuracy, chunked.top_k_accuracy) == (
    whole.count,
    whole.accuracy,
    whole.top_k_accuracy,
  )
  for key in ("cross_entropy", "expected_calibration_error", "brier_score"):
    np.testing.assert_allclose(getattr(chunked, key), getattr(whole, key), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["soft labels", "temperature"])
def test_chunks_of_soft_labels_and_the_temperature_fit_match_one_chunk(monkeypatch, kind):
  # Integer labels fold only their passes over the logits per chunk and the
  # per-row arithmetic once per batch; soft labels fold whole rows per chunk,
  # and the temperature statistics are summed chunk by chunk. Each way, the
  # chunked totals are the one-chunk totals.
  rng = np.random.default_rng(13)
  logits = (rng.standard_normal((200, C)) * 3).astype(np.float32)
  labels = rng.integers(0, C, 200)
  options = {"top_k": 3, "progress": False}
  if kind == "soft labels":
    labels = np.asarray(jax.nn.softmax(rng.standard_normal((200, C)) * 2), np.float32)
  else:
    options["temperature"] = True

  def run():
    _evaluation._step.clear_cache()
    try:
      return xentjax.evaluate(batched(logits, labels, size=100), **options).to_dict()
    finally:
      _evaluation._step.clear_cache()

  whole = run()  # 100 rows per batch: below the default chunk, one piece
  monkeypatch.setattr(_evaluation, "_MIN_CHUNK_ROWS", 8)
  monkeypatch.setattr(_evaluation, "_CHUNK_LOGITS", 24 * C)  # 4 chunks and a tail of 4
  chunked = run()
  assert chunked.keys() == whole.keys()
  # The two programs may round a row's float32 sums differently in the last
  # bit (XLA fuses the passes otherwise); a row lost or counted twice would
  # move every total by about 1/200.
  for key, value in whole.items():
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      np.testing.assert_allclose(chunked[key], value, rtol=1e-6, atol=1e-9, err_msg=key)
  if kind == "temperature":
    assert np.isfinite(whole["temperature"]) and whole["temperature"] > 0


@pytest.fixture
def max_step_traces(monkeypatch):
  """Give `evaluate` a fresh step that fails on its (n+1)-th trace (`chex.assert_max_traces`)."""

  def install(n: int) -> None:
    chex.clear_trace_counter()
    step = chex.assert_max_traces(_evaluation._step.__wrapped__, n=n)
    monkeypatch.setattr(_evaluation, "_step", jax.jit(step, static_argnames=("model", "config")))

  return install


def test_ragged_last_batch_does_not_recompile(max_step_traces):
  logits, labels = make_data(3 * 37 + 5, 11, seed=3)
  max_step_traces(1)  # the padded last batch reuses the first batch's program
  r = xentjax.evaluate(batched(logits, labels, size=37), progress=False)
  assert_matches(r, reference(logits, labels))


def test_larger_later_batches_are_split_to_the_first_size(max_step_traces):
  logits, labels = make_data(300, seed=4)
  cuts = [0, 64, 200, 203, 300]  # 64, then 136 (split into 64, 64, 8), 3, 97
  stream = [(logits[a:b], labels[a:b]) for a, b in itertools.pairwise(cuts)]
  max_step_traces(1)
  r = xentjax.evaluate(stream, progress=False)
  assert_matches(r, reference(logits, labels))


def test_base_changes_only_cross_entropy():
  logits, labels = make_data(300, seed=5)
  nats = xentjax.evaluate(batched(logits, labels, size=B), progress=False)
  bits = xentjax.evaluate(batched(logits, labels, size=B), base=2, progress=False)
  np.testing.assert_allclose(bits.cross_entropy, nats.cross_entropy / math.log(2), rtol=1e-12)
  np.testing.assert_allclose(bits.cross_entropy, bits.bits_per_token, rtol=1e-12)
  assert bits.perplexity == nats.perplexity
  assert bits.base == 2.0 and nats.base is None
  with pytest.raises(ValueError, match="base"):
    xentjax.evaluate([(logits, labels)], base=1, progress=False)


# ---------------------------------------------------------------------------
# Masks, ignore_index, soft labels, sequences.


def test_mask_triples_and_ignore_index_match_boolean_indexing(max_step_traces):
  logits, labels = make_data(500, seed=6)
  rng = np.random.default_rng(7)
  mask = rng.random(500) < 0.7
  labels = labels.copy()
  labels[rng.random(500) < 0.2] = -100
  r = xentjax.evaluate(batched(logits, labels, mask, size=B), progress=False)
  assert_matches(r, reference(logits, labels, mask))
  assert r.count == int((mask & (labels != -100)).sum())

  # A custom ignore_index; None counts every (in-range) label.
  labels2 = np.where(labels == -100, 3, labels)
  rn = xentjax.evaluate(batched(logits, labels2, size=B), ignore_index=None, progress=False)
  assert rn.count == 500
  max_step_traces(1)  # ignore_index is a traced value: one program for both calls
  xentjax.evaluate(batched(logits, labels2, size=B), progress=False)
  r3 = xentjax.evaluate(batched(logits, labels2, size=B), ignore_index=3, progress=False)
  assert_matches(r3, reference(logits, labels2, ignore_index=3))


def test_sequence_logits_with_mask():
  rng = np.random.default_rng(8)
  logits = rng.standard_normal((21, 7, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (21, 7))
  mask = rng.random((21, 7)) < 0.8
  r = xentjax.evaluate(batched(logits, labels, mask, size=4), top_k=2, progress=False)
  assert_matches(r, reference(logits, labels, mask, top_k=2))


def test_soft_labels():
  rng = np.random.default_rng(9)
  logits = rng.standard_normal((301, C)).astype(np.float32)
  soft = rng.dirichlet(np.ones(C), 301).astype(np.float32)
  soft[::7] = 0.0
  soft[::7, 2] = 1.0  # some one-hot rows
  mask = rng.random(301) < 0.9
  r = xentjax.evaluate(batched(logits, soft, mask, size=B), progress=False)
  assert_matches(r, reference(logits, soft, mask))


def test_one_hot_soft_labels_equal_integer_labels():
  logits, labels = make_data(257, seed=10)
  one_hot = np.eye(C, dtype=np.float32)[labels]
  hard = xentjax.evaluate(batched(logits, labels, size=B), progress=False)
  soft = xentjax.evaluate(batched(logits, one_hot, size=B), progress=False)
  np.testing.assert_allclose(soft.cross_entropy, hard.cross_entropy, rtol=1e-6)
  assert (soft.count, soft.accuracy, soft.top_k_accuracy) == (
    hard.count,
    hard.accuracy,
    hard.top_k_accuracy,
  )


def test_soft_label_zero_target_on_minus_inf_logit_is_finite():
  logits = np.array([[0.0, -np.inf, 1.0]], np.float32)
  soft = np.array([[0.5, 0.0, 0.5]], np.float32)
  r = xentjax.evaluate([(logits, soft)], progress=False)
  expected = -0.5 * (0.0 - np.logaddexp(0, 1)) - 0.5 * (1.0 - np.logaddexp(0, 1))
  np.testing.assert_allclose(r.cross_entropy, expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# Edge cases.


def test_ties_are_shared():
  logits = np.array([[1.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.0, 1.0, 1.0]], np.float32)
  labels = np.array([1, 2, 0])
  r = xentjax.evaluate([(logits, labels)], top_k=2, progress=False)
  assert r.accuracy == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)  # a t-way tie at the top: 1/t
  assert r.top_k_accuracy == pytest.approx((1 + 2 / 3 + 0) / 3)  # row 2: two classes higher
  assert_matches(r, reference(logits, labels, top_k=2))


def test_a_constant_model_scores_one_over_k():
  logits = np.zeros((50, 10), np.float32)
  r = xentjax.evaluate([(logits, np.arange(50) % 10)], progress=False)
  assert r.accuracy == pytest.approx(0.1) and r.top_k_accuracy == pytest.approx(0.5)
  assert r.expected_calibration_error == pytest.approx(0.0, abs=1e-7)  # confidence 1/10 too


def test_non_finite_rows_follow_the_conventions():
  logits = np.array([[0.0, 1.0, 2.0], [-np.inf, -np.inf, -np.inf]], np.float32)
  r = xentjax.evaluate([(logits, np.array([2, 1]))], top_k=2, progress=False)
  # Every logit -inf: loss +inf, all classes tied (credit 1/3, 2/3), confidence 1/3.
  assert r.cross_entropy == math.inf
  assert r.accuracy == pytest.approx((1 + 1 / 3) / 2)
  assert r.top_k_accuracy == pytest.approx((1 + 2 / 3) / 2)
  assert math.isfinite(r.expected_calibration_error)


def test_negative_soft_labels_give_nan_not_a_negative_loss():
  logits = np.array([[0.0, 5.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
  soft = np.array([[1.5, -0.5, 0.0], [1.0, 0.0, 0.0]], np.float32)
  r = xentjax.evaluate([(logits, soft)], progress=False)
  assert math.isnan(r.cross_entropy) and math.isnan(r.accuracy)


def test_out_of_range_label_gives_nan():
  logits, labels = make_data(100, seed=11)
  labels = labels.copy()
  labels[17] = C
  r = xentjax.evaluate(batched(logits, labels, size=B), progress=False)
  assert r.count == 100
  for name in (
    "cross_entropy",
    "perplexity",
    "bits_per_token",
    "negative_log_likelihood_sum",
    "accuracy",
    "top_k_accuracy",
    "expected_calibration_error",
  ):
    assert math.isnan(getattr(r, name)), name
  labels[17] = -3  # negative, and not the ignore index
  assert math.isnan(xentjax.evaluate(batched(logits, labels, size=B), progress=False).cross_entropy)


def test_nan_logits_give_nan_metrics_unless_masked():
  logits, labels = make_data(100, seed=25)
  logits[40, 3] = np.nan
  r = xentjax.evaluate(batched(logits, labels, size=B), progress=False)
  assert math.isnan(r.cross_entropy) and math.isnan(r.accuracy)
  assert math.isnan(r.expected_calibration_error) and r.count == 100
  mask = np.arange(100) != 40
  r = xentjax.evaluate(batched(logits, labels, mask, size=B), progress=False)
  assert_matches(r, reference(logits, labels, mask))


def test_masked_out_of_range_label_is_not_counted():
  logits, labels = make_data(100, seed=12)
  labels = labels.copy()
  labels[3] = 99
  mask = np.ones(100, bool)
  mask[3] = False
  r = xentjax.evaluate(batched(logits, labels, mask, size=B), progress=False)
  assert_matches(r, reference(logits, labels, mask))


def test_all_masked_and_empty_give_zero_count():
  logits, labels = make_data(130, seed=13)
  r = xentjax.evaluate(batched(logits, labels, np.zeros(130, bool), size=B), progress=False)
  assert r.count == 0 and r.negative_log_likelihood_sum == 0.0
  assert math.isnan(r.cross_entropy) and math.isnan(r.accuracy)
  e = xentjax.evaluate([], progress=False)
  assert e.count == 0 and math.isnan(e.expected_calibration_error)
  z = xentjax.evaluate([(logits[:0], labels[:0]), *batched(logits, labels, size=B)], progress=False)
  assert_matches(z, reference(logits, labels))


def test_infinite_logits():
  logits = np.array([[0.0, -np.inf, 2.0], [1e4, -1e4, 0.0]], np.float32)
  r = xentjax.evaluate([(logits, np.array([0, 0]))], progress=False)
  np.testing.assert_allclose(r.cross_entropy, np.logaddexp(0, 2) / 2, rtol=1e-6)
  r = xentjax.evaluate([(logits, np.array([1, 0]))], progress=False)
  assert r.cross_entropy == math.inf and r.perplexity == math.inf


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_logits_computed_in_float32(dtype):
  logits, labels = make_data(300, seed=14)
  low = jnp.asarray(logits, dtype)
  r = xentjax.evaluate(batched(low, jnp.asarray(labels), size=B), progress=False)
  ref = reference(np.asarray(low.astype(jnp.float32)), labels)
  assert_matches(r, ref)


def test_jax_array_batches():
  logits, labels = make_data(333, seed=15)
  r = xentjax.evaluate(batched(jnp.asarray(logits), jnp.asarray(labels), size=B), progress=False)
  assert_matches(r, reference(logits, labels))


def test_model_mode_matches_precomputed_logits():
  rng = np.random.default_rng(16)
  x = rng.standard_normal((250, 4)).astype(np.float32)
  labels = rng.integers(0, 3, 250)
  params = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.ones(3, np.float32)}

  def model(p, inputs):
    return inputs["x"] @ p["w"] + p["b"].reshape(1, 3)

  r = xentjax.evaluate(
    [({"x": a}, b) for a, b in batched(x, labels, size=64)],
    model=model,
    params=params,
    top_k=2,
    progress=False,
  )
  logits = x.astype(np.float64) @ params["w"] + params["b"]
  assert_matches(r, reference(logits, labels, top_k=2), rtol=1e-5)


def test_flush_to_host_keeps_results(monkeypatch):
  logits, labels = make_data(1000, seed=17)
  ref = xentjax.evaluate(batched(logits, labels, size=B), progress=False)
  monkeypatch.setattr(_evaluation, "_FLUSH_ROWS", 150)  # fold after every 2 batches
  r = xentjax.evaluate(batched(logits, labels, size=B), progress=False)
  assert r.count == ref.count and r.accuracy == ref.accuracy
  np.testing.assert_allclose(r.cross_entropy, ref.cross_entropy, rtol=1e-9)
  np.testing.assert_allclose(
    r.expected_calibration_error, ref.expected_calibration_error, rtol=1e-9, atol=1e-12
  )


def test_with_and_without_the_prefetch_thread():
  logits, labels = make_data(400, seed=18)
  ref = reference(logits, labels)
  for prefetch in (0, 2):  # the default (no thread), and a feeding thread
    r = xentjax.evaluate(batched(logits, labels, size=B), prefetch=prefetch, progress=False)
    assert_matches(r, ref)


# ---------------------------------------------------------------------------
# Streaming behaviour.


def test_only_a_few_batches_alive():
  logits, labels = make_data(B * 60, seed=19)
  refs, most = [], [0]

  def stream():
    for a, b in batched(logits, labels, size=B):
      most[0] = max(most[0], sum(r() is not None for r in refs))
      a = a.copy()  # a fresh array per batch, tracked by a weak reference
      refs.append(weakref.ref(a))
      yield a, b

  r = xentjax.evaluate(stream(), progress=False)
  assert r.count == B * 60
  assert most[0] <= 8, most[0]


def test_errors_in_the_stream_reach_the_caller():
  logits, labels = make_data(128, seed=20)

  def stream():
    yield logits[:B], labels[:B]
    raise RuntimeError("disk on fire")

  with pytest.raises(RuntimeError, match="disk on fire"):
    xentjax.evaluate(stream(), progress=False)


def test_bad_batches_raise():
  logits, labels = make_data(10, seed=21)
  with pytest.raises(TypeError, match="tuple"):
    xentjax.evaluate([logits], progress=False)
  with pytest.raises(ValueError, match="rows"):
    xentjax.evaluate([(logits, labels[:5])], progress=False)
  with pytest.raises(ValueError, match="shape"):
    xentjax.evaluate([(logits, labels.reshape(10, 1))], progress=False)
  with pytest.raises(TypeError, match="floating"):
    xentjax.evaluate([(labels.reshape(10, 1), labels)], progress=False)
  with pytest.raises(TypeError, match="labels"):
    xentjax.evaluate([(logits, np.zeros(10, bool))], progress=False)
  with pytest.raises(ValueError, match="top_k"):
    xentjax.evaluate([(logits, labels)], top_k=0, progress=False)
  with pytest.raises(ValueError, match="num_bins"):
    xentjax.evaluate([(logits, labels)], num_bins=0, progress=False)


def test_progress_bar_reports_examples_per_second(capsys):
  pytest.importorskip("tqdm")
  logits, labels = make_data(300, seed=22)
  xentjax.evaluate(batched(logits, labels, size=B), progress=True, total=300)
  err = capsys.readouterr().err
  assert "300/300" in err and "ex/s" in err
  xentjax.evaluate(batched(logits, labels, size=B), progress=False)
  assert capsys.readouterr().err == ""


def test_no_tqdm_means_no_bar(capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # `import` now raises ImportError
  logits, labels = make_data(128, seed=24)
  r = xentjax.evaluate(batched(logits, labels, size=B), progress=True)
  assert r.count == 128 and capsys.readouterr().err == ""


# ---------------------------------------------------------------------------
# The result object.


def test_result_is_frozen_prints_a_table_and_serialises():
  logits, labels = make_data(120, seed=23)
  r = xentjax.evaluate(batched(logits, labels, size=B), top_k=3, num_bins=10, progress=False)
  assert isinstance(r, xentjax.EvaluationResult)
  with pytest.raises(dataclasses.FrozenInstanceError):
    r.count = 0
  text = str(r)
  for word in ("examples", "cross-entropy (nats)", "perplexity", "top-3 accuracy", "ECE"):
    assert word in text
  assert f"{r.count:,}" in text
  lines = text.splitlines()
  assert len({len(line) for line in lines}) == 1  # aligned columns
  d = json.loads(json.dumps(r.to_dict()))
  assert d["count"] == 120 and d["top_k"] == 3
  assert d["cross_entropy"] == r.cross_entropy
  assert all(isinstance(v, (int, float)) or v is None for v in d.values())
  assert type(r.count) is int and type(r.accuracy) is float


def _special_rows(kind: str, seed: int = 14, classes: int = C):
  """200 rows of logits and labels, with a few rows of one special ``kind``."""
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal((200, classes)) * 3).astype(np.float32)
  labels = rng.integers(0, classes, 200)
  labels[rng.random(200) < 0.1] = -100
  rows = [3, 57, 130]
  labels[rows] = 1
  if kind == "all -inf":
    logits[rows] = -np.inf
  elif kind == "some -inf":
    logits[rows, ::2] = -np.inf
  elif kind == "ties":
    logits[rows, :4] = np.float32(2.5)
  elif kind == "+inf":
    logits[rows, 2] = np.inf
  elif kind == "NaN":
    logits[rows, 0] = np.nan
  return logits, labels


@pytest.mark.parametrize("kind", ["plain", "all -inf", "some -inf", "ties", "+inf", "NaN"])
@pytest.mark.parametrize("chunk_rows", [None, 24])
def test_the_rows_maximum_per_chunk_or_per_batch_gives_the_same_bits(monkeypatch, kind, chunk_rows):
  # `_WHOLE_BATCH_MAX` moves the rows' maximum out of the chunk loop (one
  # pass over the batch) on the CPUs where that is faster; every figure is
  # the same either way, bit for bit, whatever the special rows.
  logits, labels = _special_rows(kind)
  if chunk_rows:
    monkeypatch.setattr(_evaluation, "_MIN_CHUNK_ROWS", 8)
    monkeypatch.setattr(_evaluation, "_CHUNK_LOGITS", chunk_rows * C)

  def run(whole: bool):
    monkeypatch.setattr(_evaluation, "_WHOLE_BATCH_MAX", whole)
    _evaluation._step.clear_cache()
    try:
      return xentjax.evaluate(batched(logits, labels, size=100), top_k=3, progress=False)
    finally:
      _evaluation._step.clear_cache()

  per_chunk, per_batch = run(False), run(True)
  a, b = per_chunk.to_dict(), per_batch.to_dict()
  assert b.keys() == a.keys()
  for key, value in a.items():
    np.testing.assert_array_equal(b[key], value, err_msg=key)
  if kind in ("plain", "some -inf", "ties"):  # finite losses: against float64 too
    assert_matches(per_batch, reference(logits, labels, top_k=3))
  else:  # an infinite or NaN loss
    assert not math.isfinite(per_batch.cross_entropy)


def test_cpu_vendor_reads_cpuinfo(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n")
  assert _evaluation._cpu_vendor(str(info)) == "GenuineIntel"
  info.write_text("processor\t: 0\n")
  assert _evaluation._cpu_vendor(str(info)) == ""
  assert _evaluation._cpu_vendor(str(tmp_path / "missing")) == ""


@pytest.mark.parametrize("kind", ["plain", "all -inf", "some -inf", "ties", "+inf", "NaN"])
def test_short_rows_folded_match_the_chunked_step(monkeypatch, kind):
  # Where `_WHOLE_BATCH_MAX` holds, 64-class batches are read folded
  # (`_core.forward_row_stats_folded`, the whole batch at once): the counts
  # are the same, the sums the same up to float32 rounding of each row.
  logits, labels = _special_rows(kind, classes=64)
  traced = []
  folded = _evaluation._core.forward_row_stats_folded

  def spy(*args):
    traced.append(args[0].shape)
    return folded(*args)

  monkeypatch.setattr(_evaluation._core, "forward_row_stats_folded", spy)

  def run(whole: bool):
    monkeypatch.setattr(_evaluation, "_WHOLE_BATCH_MAX", whole)
    return xentjax.evaluate(batched(logits, labels, size=100), top_k=3, progress=False)

  _evaluation._step.clear_cache()
  chunked = run(False)
  assert traced == []
  fold = run(True)
  assert traced == [(100, 64)]  # one trace, the whole batch
  a, b = chunked.to_dict(), fold.to_dict()
  for key in ("count", "accuracy", "top_k_accuracy"):
    assert b[key] == a[key] or (math.isnan(a[key]) and math.isnan(b[key])), key
  for key in ("cross_entropy", "brier_score", "expected_calibration_error", "perplexity"):
    np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-9, err_msg=key)
  if kind in ("plain", "some -inf", "ties"):
    assert_matches(fold, reference(logits, labels, top_k=3))


def test_which_batches_are_read_folded():
  config = _evaluation._StepConfig(5, 15, True, 1, False, whole_max=True)
  folds = _evaluation._folds
  assert folds(config, (50_000, 64), 0)
  assert folds(config, (8_192, 1024), 0)
  assert not folds(config._replace(whole_max=False), (50_000, 64), 0)  # not on this CPU
  assert not folds(config._replace(soft=True), (50_000, 64), 0)
  assert not folds(config, (50_000, 64), 20)  # the temperature fit reads chunks
  assert not folds(config, (50_000, 48), 0)  # below 64 classes
  assert not folds(config, (50_000, 72), 0)  # not a multiple of 16
  assert not folds(config, (1_000, 2048), 0)  # long rows: chunked
  assert not folds(config, (200_000, 64), 0)  # above 2**23 logits
  assert folds(config._replace(groups=2), (200_000, 64), 0)  # 2**23 per device
