"""Tests for xentjax.coding: round trips, the size bound, quantization, errors, parity.

The reference figures are computed here from their definitions in float64
NumPy (log-softmax, the integer weights, CRC-32 with `zlib`) or by calling
constriction directly on tables built here.
"""

import math
import struct
import zlib

import constriction
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xentjax import coding

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _log2_softmax(z):
  z = np.asarray(z, dtype=np.float64)
  top = np.max(z, axis=-1, keepdims=True)
  return (z - top - np.log(np.sum(np.exp(z - top), axis=-1, keepdims=True))) / math.log(2)


def _draw(rng, row, n):
  """``n`` symbols drawn from ``softmax(row)``."""
  p = np.exp(_log2_softmax(row) * math.log(2))
  return rng.choice(len(p), size=n, p=p / p.sum())


def _weights(z):
  """The quantization the module docstring states, written again: floor(exp(z - max) 2^40) + 1."""
  z = np.asarray(z, dtype=np.float64)
  top = np.max(z, axis=-1, keepdims=True)
  top = np.where(np.isneginf(top), 0.0, top)
  return np.floor(np.exp(z - top) * 2.0**40) + 1.0


def _round_trip(logits, symbols):
  data = coding.encode(logits, symbols)
  back = coding.decode(data, logits, len(symbols))
  np.testing.assert_array_equal(back, symbols)
  assert back.dtype == np.int32
  return data


# ideal_bits.


def test_ideal_bits_is_the_summed_log2_softmax_in_float64():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(50, 37)) * 3
  s = rng.integers(0, 37, 50)
  expected = -_log2_softmax(z)[np.arange(50), s].sum()
  assert coding.ideal_bits(z, s) == pytest.approx(expected, rel=1e-13)
  z32 = z.astype(np.float32)
  expected32 = -_log2_softmax(z32.astype(np.float64))[np.arange(50), s].sum()
  assert coding.ideal_bits(jnp.asarray(z32), s) == pytest.approx(expected32, rel=1e-13)


def test_ideal_bits_counts_whole_bits_for_uniform_rows_and_inf_at_minus_inf():
  assert coding.ideal_bits(np.zeros((4, 8)), [0, 1, 2, 7]) == 12.0
  assert coding.ideal_bits(np.zeros((3, 1024)), [0, 5, 1023]) == 30.0
  assert coding.ideal_bits(np.zeros((0, 5)), np.zeros(0, int)) == 0.0
  assert coding.ideal_bits(np.zeros((2, 1)), [0, 0]) == 0.0
  z = np.array([[0.0, -np.inf, 1.0]])
  assert coding.ideal_bits(z, [1]) == math.inf
  assert coding.ideal_bits(np.full((1, 3), -np.inf), [0]) == math.inf
  assert math.isfinite(coding.ideal_bits(z, [2]))


# Round trips.


@pytest.mark.parametrize("vocab", [1, 2, 3, 256, 1024, 1025, 4099, 65536])
def test_round_trip_at_every_alphabet_size(vocab):
  rng = np.random.default_rng(vocab)
  n = 40 if vocab > 5000 else 200
  z = (rng.normal(size=(n, vocab)) * 4).astype(np.float32)
  s = rng.integers(0, vocab, n)
  _round_trip(z, s)
  _round_trip(z, np.array([_draw(rng, row, 1)[0] for row in z]))


def test_round_trip_with_ties_minus_inf_and_tiny_probabilities():
  vocab = 2000  # two stages
  z = np.zeros((9, vocab))
  z[1, :] = -np.inf
  z[2, 5] = -np.inf
  z[3, :] = -1e30
  z[3, 0] = 1e30  # every other symbol has probability 0 in float64
  z[4, :1000] = -np.inf  # a whole group at the floor
  z[5, 1] = 300.0  # symbol 0 at probability about e^-300
  z[6:, :] = np.arange(vocab) % 3  # ties in threes
  s = np.array([0, 17, 5, 1999, 3, 0, 1998, 2, 1001])
  data = _round_trip(z, s)
  assert coding.ideal_bits(z, s) == math.inf
  assert 8 * len(data) < 250  # each floored symbol costs at most about 48 bits
  _round_trip(z[:, :7], s % 7)  # one stage


def test_jax_and_numpy_logits_give_the_same_bytes():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(30, 1500)).astype(np.float32)
  s = rng.integers(0, 1500, 30)
  data = coding.encode(z, s)
  assert coding.encode(jnp.asarray(z), s) == data
  assert coding.encode(z.astype(np.float64), s) == data
  assert coding.encode(np.asfortranarray(z), jnp.asarray(s)) == data
  np.testing.assert_array_equal(coding.decode(data, jnp.asarray(z), 30), s)
  bf16 = jnp.asarray(z, dtype=jnp.bfloat16)
  _round_trip(bf16, s)
  assert coding.encode(bf16, s) == coding.encode(np.asarray(bf16.astype(jnp.float32)), s)


@SETTINGS
@given(
  vocab=st.integers(1, 12),
  rows=st.lists(
    st.lists(
      st.one_of(st.floats(-60, 60, allow_nan=False), st.just(-math.inf)), min_size=12, max_size=12
    ),
    min_size=0,
    max_size=8,
  ),
  seed=st.integers(0, 2**16),
  two_stage=st.booleans(),
)
def test_round_trip_for_any_logits(vocab, rows, seed, two_stage):
  z = np.array(rows, dtype=np.float64).reshape(len(rows), 12)[:, :vocab]
  s = np.random.default_rng(seed).integers(0, vocab, len(rows))
  with pytest.MonkeyPatch.context() as patch:  # two stages from V = 3 on, to reach them cheaply
    patch.setattr(coding, "ONE_STAGE_MAX", 2 if two_stage else 1024)
    _round_trip(z, s)


def test_two_stages_split_the_alphabet_as_documented():
  assert coding._layout(1024) == (1024, 1024, 1, 1024)
  assert coding._layout(1025) == (1025, 64, 17, 64)
  assert coding._layout(65536) == (65536, 256, 256, 256)
  assert coding._layout(32768) == (32768, 256, 128, 256)
  assert coding._layout(2**24) == (2**24, 4096, 4096, 4096)


# Teacher-forced and autoregressive decoding quantize each row the same way.


def test_stacked_and_single_rows_quantize_bit_identically():
  rng = np.random.default_rng(4)
  for vocab in [7, 1500, 65536]:
    layout = coding._layout(vocab)
    z = (rng.normal(size=(12, vocab)) * 5).astype(np.float32)
    z[3, ::7] = -np.inf
    stacked = coding._weights(coding._rows(z, 0, 12), layout)
    for i in range(12):
      for row in (z[i], jnp.asarray(z)[i], z.T.copy().T[i], np.broadcast_to(z[i], (3, vocab))[1]):
        single = coding._weights(coding._rows(np.asarray(row)[None, :], 0, 1), layout)
        np.testing.assert_array_equal(single[0], stacked[i])
    ours = _weights(z.astype(np.float64))
    np.testing.assert_array_equal(stacked[:, :vocab], ours)


def _markov(rng, vocab, n):
  """A bigram model: the logits at t are a row chosen by the symbol at t - 1."""
  table = (rng.normal(size=(vocab + 1, vocab)) * 3).astype(np.float32)
  s = np.zeros(n, dtype=np.int64)
  for t in range(n):
    s[t] = _draw(rng, table[s[t - 1] if t else vocab], 1)[0]
  previous = np.concatenate([[vocab], s[:-1]])
  return table, s, table[previous]


@pytest.mark.parametrize("vocab", [1, 5, 300, 3000])
def test_step_decoding_inverts_teacher_forced_encoding(vocab):
  rng = np.random.default_rng(vocab)
  table, s, stacked = _markov(rng, vocab, 60)
  data = coding.encode(stacked, s)
  seen = []

  def step(state, previous):
    seen.append(previous)
    row = table[vocab if previous < 0 else previous]
    return jnp.asarray(row), state + 1

  back = coding.decode(data, step, 60, 0)
  np.testing.assert_array_equal(back, s)
  assert seen == [-1, *s[:-1].tolist()]


def test_step_state_is_threaded_and_zero_symbols_need_no_step():
  rng = np.random.default_rng(5)
  z = rng.normal(size=(6, 20))
  s = rng.integers(0, 20, 6)
  data = coding.encode(z, s)
  states = []

  def step(state, previous):
    states.append(state)
    return z[state], state + 1

  np.testing.assert_array_equal(coding.decode(data, step, 6, 0), s)
  assert states == list(range(6))
  empty = coding.encode(np.zeros((0, 20)), np.zeros(0, int))
  assert coding.decode(empty, lambda *_: pytest.fail("called"), 0).shape == (0,)


# The size of the code.


def _peaked_row(rng, vocab):
  """99% of the mass on one symbol, the rest spread so that most symbols are below 2^-24."""
  row = rng.normal(size=vocab) * 4.0
  row -= row.max()
  rest = np.exp(row).sum()
  row[7] = np.log(99 * rest)
  return row.astype(np.float32)


@pytest.mark.parametrize("kind", ["peaked", "near_uniform"])
def test_code_length_is_within_64_bits_and_1e3_per_symbol_of_the_cross_entropy(kind):
  # n = 10,000 positions at V = 65,536; every position has the same row (a
  # broadcast view, so that the test holds one row in memory), and the ideal
  # length is computed here from that row in float64.
  rng = np.random.default_rng(6)
  n, vocab = 10_000, 65_536
  row = _peaked_row(rng, vocab) if kind == "peaked" else (0.3 * rng.normal(size=vocab))
  row = row.astype(np.float32)
  s = _draw(rng, row, n)
  ideal = -_log2_softmax(row)[s].sum()
  data = coding.encode(np.broadcast_to(row, (n, vocab)), s)
  assert 8 * len(data) <= ideal + 64 + 1e-3 * n
  assert 8 * len(data) >= ideal  # no code beats the cross-entropy on its own samples by much
  # constriction's own range coder on the same probabilities, called directly.
  p = np.exp(_log2_softmax(row) * math.log(2))
  encoder = constriction.stream.queue.RangeEncoder()
  encoder.encode(s.astype(np.int32), constriction.stream.model.Categorical(p, perfect=False))
  assert 8 * len(data) <= 32 * len(encoder.get_compressed()) + 64 + 1e-3 * n


def test_one_stage_code_is_constrictions_range_code_of_the_integer_weights():
  rng = np.random.default_rng(7)
  z = rng.normal(size=(40, 100)) * 6
  z[::5, 3] = -np.inf
  s = rng.integers(0, 100, 40)
  encoder = constriction.stream.queue.RangeEncoder()
  family = constriction.stream.model.Categorical(perfect=False)
  encoder.encode(s.astype(np.int32), family, _weights(z))
  data = coding.encode(z, s)
  assert data[:-4] == encoder.get_compressed().astype("<u4").tobytes()


def test_two_stage_code_is_the_group_then_the_member():
  rng = np.random.default_rng(8)
  vocab, group = 1100, 64  # 18 groups of 64, the last one of 12
  z = rng.normal(size=(30, vocab)) * 6
  s = rng.integers(0, vocab, 30)
  w = np.pad(_weights(z), ((0, 0), (0, 18 * group - vocab))).reshape(30, 18, group)
  tables, coded = [], []
  for t in range(30):
    g, m = divmod(int(s[t]), group)
    tables += [np.pad(w[t].sum(-1), (0, group - 18)), w[t, g]]
    coded += [g, m]
  encoder = constriction.stream.queue.RangeEncoder()
  family = constriction.stream.model.Categorical(perfect=False)
  encoder.encode(np.array(coded, np.int32), family, np.array(tables))
  assert coding.encode(z, s)[:-4] == encoder.get_compressed().astype("<u4").tobytes()


def test_the_data_end_with_the_crc32_of_n_and_the_symbols():
  s = np.array([3, 1, 4, 1, 5])
  data = coding.encode(np.zeros((5, 8)), s)
  crc = zlib.crc32(struct.pack("<q", 5) + s.astype("<i4").tobytes())
  assert data[-4:] == struct.pack("<I", crc)
  assert len(data) == 8  # 15 bits in one word, then the check word
  assert coding.encode(np.zeros((3, 1)), [0, 0, 0]) == struct.pack(
    "<I", zlib.crc32(struct.pack("<q", 3) + bytes(12))
  )


# Errors.


def test_symbols_outside_the_alphabet_and_bad_shapes_are_refused():
  z = np.zeros((3, 4))
  for fn in (coding.encode, coding.ideal_bits):
    with pytest.raises(ValueError, match="symbol 4 at position 1 is outside"):
      fn(z, [0, 4, 1])
    with pytest.raises(ValueError, match="symbol -1 at position 2 is outside"):
      fn(z, [0, 1, -1])
    with pytest.raises(TypeError, match="integers"):
      fn(z, [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
      fn(z, [0, 1])
    with pytest.raises(ValueError, match=r"\[n, V\]"):
      fn(np.zeros(4), [0])
    with pytest.raises(ValueError, match="V >= 1"):
      fn(np.zeros((2, 0)), [0, 0])
    for bad in (np.nan, np.inf):
      zz = z.copy()
      zz[1, 2] = bad
      with pytest.raises(ValueError, match="finite or -inf"):
        fn(zz, [0, 1, 2])
  with pytest.raises(ValueError, match="2\\*\\*24"):
    coding.encode(np.broadcast_to(np.float32(0), (1, 2**24 + 1)), [0])


def test_altered_truncated_extended_or_foreign_data_raise():
  rng = np.random.default_rng(9)
  z = rng.normal(size=(50, 1500)).astype(np.float32) * 2
  s = np.array([_draw(rng, row, 1)[0] for row in z])
  data = _round_trip(z, s)
  caught = 0
  for i in range(len(data)):  # a changed bit raises, or falls where the coder ignores it
    altered = bytearray(data)
    altered[i] ^= 1 << (i % 8)
    try:
      np.testing.assert_array_equal(coding.decode(bytes(altered), z, 50), s)
    except ValueError as error:
      assert "corrupt" in str(error)
      caught += 1
  assert caught >= len(data) - 4  # only the last coder word has bits the decoder ignores
  for cut in (data[:-1], data[:-4], data[4:], data + b"\0\0\0\0", b"", b"abc"):
    with pytest.raises(ValueError, match="corrupt"):
      coding.decode(cut, z, 50)
  with pytest.raises(ValueError, match="corrupt"):
    coding.decode(data, z[:49], 49)  # the wrong n
  with pytest.raises(ValueError, match="corrupt"):
    coding.decode(data, z[::-1], 50)  # other logits
  foreign = rng.bytes(len(data))
  with pytest.raises(ValueError, match="corrupt"):
    coding.decode(foreign, z, 50)
  with pytest.raises(ValueError, match="corrupt"):
    coding.decode(foreign, lambda state, previous: (z[0], state), 50)


def test_decode_argument_errors():
  z = np.zeros((3, 4))
  data = coding.encode(z, [1, 2, 3])
  with pytest.raises(TypeError, match="bytes"):
    coding.decode("text", z, 3)
  with pytest.raises(ValueError, match="3 rows but n=2"):
    coding.decode(data, z, 2)
  with pytest.raises(ValueError, match="n must be >= 0"):
    coding.decode(data, z, -1)
  shapes = iter([np.zeros(4), np.zeros(5)])
  with pytest.raises(ValueError, match=r"shape \[V\].*\(5,\) at position 1"):
    coding.decode(data, lambda state, previous: (next(shapes), state), 3)
