"""Cross-entropy as code length: range coding with a model's logits.

A model that gives position :math:`t` the distribution
:math:`q_t = \\operatorname{softmax}(z_t)` can code a sequence of symbols
:math:`x_1, \\dots, x_n` in about

.. math::

   L = \\sum_{t=1}^{n} -\\log_2 q_t(x_t) \\text{ bits},

the cross-entropy of the data under the model, summed (`ideal_bits`). An
arithmetic coder makes the figure operational: `encode` turns the logits and
the symbols into bytes whose length is that sum plus a few dozen bits, and
`decode` gets the symbols back exactly, either from the same logits
(teacher-forced) or one symbol at a time from a `step` function, as a real
compressor with a language model works.

The coder is `constriction <https://bamler-lab.github.io/constriction/>`_'s
range coder (Rust, optional extra: ``pip install "xentjax[coding]"``). This
module is the bridge between JAX logits and the coder's integer probabilities:

* **Quantization, on the host, one row at a time in effect.** A row of logits
  is read as float64 (exact for every float dtype), its largest entry ``m`` is
  subtracted and each probability ``exp(z - m)`` becomes the integer weight
  ``floor(exp(z - m) * 2**40) + 1``: every symbol has a nonzero weight (a
  ``-inf`` logit gets weight 1, the floor), and from here on everything is
  exact integer arithmetic (sums of at most ``2**12`` weights below ``2**53``,
  exactly representable in float64, handed to constriction, which rescales
  them by a deterministic rule of its own). Each weight depends on its own
  logit and on the row's maximum only, both computed by the same NumPy
  elementwise operations whether the row comes from the stacked ``[n, V]``
  logits or from one `step` call, so encoder and decoder quantize each row
  bit-identically; the tests check it on rows given stacked, sliced, strided,
  as JAX arrays and as NumPy arrays.
* **Two stages past 1,024 symbols.** constriction quantizes to 24 bits and
  gives every symbol of an alphabet at least :math:`2^{-24}`; over
  :math:`V = 65{,}536` symbols these floors hold :math:`2^{-8}` of the mass,
  which costs a peaked row about 0.0056 bits per symbol. Here an alphabet of
  more than 1,024 symbols is coded as two symbols, its group (of
  :math:`G = 2^{\\lceil \\log_2 V / 2 \\rceil}` consecutive symbols) and its
  place in the group, each over at most :math:`\\max(G, \\lceil V/G \\rceil)`
  entries (256 for :math:`V = 65{,}536`). The floors then hold about
  :math:`2^{-16}` of each stage's mass: on peaked rows at
  :math:`V = 65{,}536` the measured loss is 3.6e-4 bits per symbol against
  constriction's 5.3e-3 (``benchmarks/coding.py``, figures in
  `docs/coding.md`). The price: a symbol the model
  gives (almost) no probability costs up to about 48 bits instead of 24.
* **A check word.** The data end with the CRC-32 of ``(n, symbols)``
  (4 bytes). Decoding data that were not produced for these logits, truncated
  or altered data, or the wrong ``n``, raises `ValueError` (the chance that
  a wrong sequence passes the check is :math:`2^{-32}`); a sequence that is
  returned is the one that was encoded. (A change to the last bits of the
  coder's final word can fall where the decoder does not look: those data
  decode to the encoded sequence, correctly.)

The coded size obeys :math:`8\\,|\\text{data}| \\le L + 64 + 10^{-3} n` for
:math:`n \\ge 10{,}000` and :math:`V \\le 65{,}536`, peaked and near-uniform
rows alike (about 32 bits for the coder's last word and its flush, 32 for the
check word, and the quantization loss, well below :math:`10^{-3}` bits per
symbol). Alphabets of up to :math:`2^{24}` symbols are accepted.

References:
  Shannon, "A Mathematical Theory of Communication", 1948.
  Witten, Neal and Cleary, "Arithmetic Coding for Data Compression", 1987.
  Bamler, "Understanding Entropy Coding With Asymmetric Numeral Systems
  (ANS): a Statistician's Perspective", 2022 (constriction).
  Delétang et al., "Language Modeling Is Compression", ICLR 2024.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from jax.typing import ArrayLike

__all__ = ["decode", "encode", "ideal_bits"]

WEIGHT_BITS = 40
"""A probability ``p`` (relative to the row's largest) becomes ``floor(p * 2**40) + 1``."""
ONE_STAGE_MAX = 1024
"""Alphabets up to this size are coded in one stage, larger ones in two."""
MAX_VOCAB = 2**24
"""The largest alphabet: two stages of at most 4,096 entries each."""
CHUNK_ELEMENTS = 2**18
"""Rows are read and quantized in blocks of about this many logits (2 MiB of float64).

Small enough for the temporaries to stay in cache: at V = 65,536, blocks of
2**18 logits encode about 6 times faster than blocks of 2**22 (measured
alternately in one process on a 2-core machine).
"""

Step = Callable[[Any, int], tuple[ArrayLike, Any]]


def _constriction():
  try:
    import constriction
  except ImportError as error:  # pragma: no cover - the test environment has it
    raise ImportError(
      'xentjax.coding needs constriction: pip install "xentjax[coding]" (or constriction>=0.4)'
    ) from error
  return constriction


# The alphabet's layout and the quantization (the part both directions share).


class _Layout(NamedTuple):
  """How a ``vocab``-symbol alphabet is coded: ``groups`` groups of ``group`` symbols.

  One stage (``groups == 1``) codes the symbol itself; two stages code
  ``symbol // group`` and then ``symbol % group``, each over ``width`` entries
  (the shorter table padded with zero weights).
  """

  vocab: int
  group: int
  groups: int
  width: int


def _layout(vocab: int) -> _Layout:
  if vocab > MAX_VOCAB:
    raise ValueError(f"xentjax.coding codes alphabets of at most 2**24 symbols, got V={vocab}")
  if vocab <= ONE_STAGE_MAX:
    return _Layout(vocab, vocab, 1, vocab)
  group = 2 ** math.ceil(math.log2(vocab) / 2)
  groups = -(-vocab // group)
  return _Layout(vocab, group, groups, max(group, groups))


def _rows(logits: Any, start: int, stop: int) -> np.ndarray:
  """Rows ``start:stop`` on the host, in float64 (exact for every float dtype), C order.

  C order matters: NumPy keeps the memory order of its input when it converts
  (a broadcast or transposed view becomes a column-major copy), and
  constriction 0.5 reads a probability table in memory order, whatever its
  strides say.
  """
  return np.asarray(logits[start:stop], dtype=np.float64, order="C")


def _maxima(block: np.ndarray) -> np.ndarray:
  """Each row's largest logit ``[k, 1]`` (0 for an all ``-inf`` row); refuses NaN and +inf."""
  top = block.max(axis=-1, keepdims=True)
  if not (top < np.inf).all():  # NaN or +inf (a NaN anywhere makes the maximum NaN)
    raise ValueError("logits must be finite or -inf (got NaN or +inf)")
  top[top == -np.inf] = 0.0
  return top


def _weights(block: np.ndarray, layout: _Layout) -> np.ndarray:
  """Integer weights ``[k, groups * group]``: ``floor(exp(z - max) * 2**40) + 1``, 0 past V.

  Float64 arrays holding integers below ``2**41``: exact, and so are the sums
  of up to ``2**12`` of them (below ``2**53``), in any order. Elementwise given
  the row's maximum (an all ``-inf`` row counts its maximum as 0, so that all
  its symbols get the floor weight 1).
  """
  weights = np.subtract(block, _maxima(block))
  np.exp(weights, out=weights)
  np.multiply(weights, 2.0**WEIGHT_BITS, out=weights)
  np.floor(weights, out=weights)
  np.add(weights, 1.0, out=weights)
  pad = layout.groups * layout.group - layout.vocab
  return np.pad(weights, ((0, 0), (0, pad))) if pad else weights


def _pad(table: np.ndarray, width: int) -> np.ndarray:
  pad = width - table.shape[-1]
  return np.pad(table, ((0, 0), (0, pad))) if pad else table


def _group_tables(weights: np.ndarray, layout: _Layout) -> np.ndarray:
  """The first stage's tables ``[k, width]`` (float64, exact): each group's total weight."""
  totals = weights.reshape(len(weights), layout.groups, layout.group).sum(axis=-1)
  return _pad(totals, layout.width)


def _member_tables(weights: np.ndarray, groups: np.ndarray, layout: _Layout) -> np.ndarray:
  """The second stage's tables ``[k, width]``: the weights inside each row's group."""
  members = weights.reshape(len(weights), layout.groups, layout.group)[
    np.arange(len(weights)), groups
  ]
  return _pad(members, layout.width)


def _block_rows(n: int, vocab: int) -> int:
  return max(1, CHUNK_ELEMENTS // max(vocab, 1))


# Checks of the arguments.


def _check_logits(logits: ArrayLike) -> tuple[int, int]:
  shape = np.shape(logits)
  if len(shape) != 2:
    raise ValueError(f"logits must be [n, V], got shape {shape}")
  if shape[1] < 1:
    raise ValueError("logits must have at least one symbol (V >= 1)")
  return shape[0], shape[1]


def _check_symbols(symbols: ArrayLike, n: int, vocab: int) -> np.ndarray:
  symbols = np.asarray(symbols)
  if symbols.shape != (n,):
    raise ValueError(f"symbols must have shape ({n},) to match the logits, got {symbols.shape}")
  if n and not np.issubdtype(symbols.dtype, np.integer):
    raise TypeError(f"symbols must be integers, got dtype {symbols.dtype}")
  bad = np.flatnonzero((symbols < 0) | (symbols >= vocab))
  if bad.size:
    raise ValueError(
      f"symbol {symbols[bad[0]]} at position {bad[0]} is outside the alphabet [0, {vocab})"
    )
  return symbols.astype(np.int64)


def _check_word(symbols: np.ndarray) -> bytes:
  """The CRC-32 of ``(n, symbols)``, 4 bytes, little-endian."""
  head = struct.pack("<q", len(symbols))
  crc = zlib.crc32(symbols.astype("<i4").tobytes(), zlib.crc32(head))
  return struct.pack("<I", crc)


# The public functions.


def ideal_bits(logits: ArrayLike, symbols: ArrayLike) -> float:
  """The code length the model promises: :math:`\\sum_t -\\log_2 \\mathrm{softmax}(z_t)[x_t]`.

  .. math::

     L = \\sum_{t=1}^{n} \\frac{\\operatorname{logsumexp}(z_t) - z_{t, x_t}}{\\ln 2}

  in bits, accumulated in float64 on the host: the summed cross-entropy of
  the symbols under the model, which `encode` attains within a few dozen bits.

  Args:
    logits: ``[n, V]`` floating logits (JAX or NumPy, any float dtype), row
      ``t`` the model's distribution at position ``t``.
    symbols: ``[n]`` integers in ``[0, V)``.

  Returns:
    A Python float, in bits; ``+inf`` when a symbol sits at a ``-inf`` logit
    (such a symbol is still codable, at the floor weight); 0.0 when ``n = 0``.

  Raises:
    ValueError: a shape mismatch, a symbol outside ``[0, V)``, a NaN or
      ``+inf`` logit. TypeError: non-integer symbols.

  Example:
    >>> import numpy as np
    >>> from xentjax import coding
    >>> coding.ideal_bits(np.zeros((4, 8)), [1, 2, 3, 4])  # 8 equally likely: 3 bits each
    12.0
  """
  n, vocab = _check_logits(logits)
  symbols = _check_symbols(symbols, n, vocab)
  total, rows = 0.0, _block_rows(n, vocab)
  for start in range(0, n, rows):
    block = _rows(logits, start, start + rows)
    picked = block[np.arange(len(block)), symbols[start : start + rows]]
    top = _maxima(block)
    with np.errstate(invalid="ignore", divide="ignore"):  # an all -inf row: log 0
      log_z = top[:, 0] + np.log(np.exp(block - top).sum(axis=-1))
      nats = np.where(np.isneginf(picked), np.inf, log_z - picked)
    total += math.fsum(nats.tolist())
  return total / math.log(2.0)


def encode(logits: ArrayLike, symbols: ArrayLike) -> bytes:
  """Code ``symbols`` with the model's distributions ``softmax(logits)``, teacher-forced.

  .. math::

     \\begin{aligned}
     8\\,|\\text{encode}(z, x)| &\\le \\sum_t -\\log_2 \\mathrm{softmax}(z_t)[x_t] + 64 + 10^{-3} n \\\\
     &\\quad (n \\ge 10^4,\\ V \\le 65{,}536)
     \\end{aligned}

  Each row is quantized on the host (see the module docstring) and the
  symbols are coded in order by constriction's range coder; the data end
  with a 4-byte check word. Rows are read in blocks, so a large ``[n, V]``
  JAX array is never copied to the host whole.

  Args:
    logits: ``[n, V]`` floating logits (finite or ``-inf``), ``V >= 1``.
    symbols: ``[n]`` integers in ``[0, V)``.

  Returns:
    The coded bytes. ``V = 1`` and ``n = 0`` code no information: the data
    are the check word alone.

  Raises:
    ValueError: a shape mismatch, a symbol ``>= V`` or negative (the error
      names its position), a NaN or ``+inf`` logit, ``V > 2**24``.
    TypeError: non-integer symbols. ImportError: constriction is missing.

  Example:
    >>> import numpy as np
    >>> from xentjax import coding
    >>> logits = np.zeros((8, 8))  # 8 equally likely fruits
    >>> data = coding.encode(logits, [3, 1, 4, 1, 5, 2, 6, 5])
    >>> len(data)  # 24 bits of message in one 32-bit word, then the check word
    8
    >>> coding.decode(data, logits, 8).tolist()
    [3, 1, 4, 1, 5, 2, 6, 5]
  """
  n, vocab = _check_logits(logits)
  symbols = _check_symbols(symbols, n, vocab)
  layout = _layout(vocab)
  constriction = _constriction()
  family = constriction.stream.model.Categorical(perfect=False)
  encoder = constriction.stream.queue.RangeEncoder()
  rows = _block_rows(n, vocab)
  for start in range(0, n if vocab > 1 else 0, rows):
    weights = _weights(_rows(logits, start, start + rows), layout)
    chunk = symbols[start : start + rows]
    if layout.groups == 1:
      encoder.encode(chunk.astype(np.int32), family, np.ascontiguousarray(weights))
      continue
    groups, members = np.divmod(chunk, layout.group)
    tables = np.stack(
      [_group_tables(weights, layout), _member_tables(weights, groups, layout)], axis=1
    )
    coded = np.stack([groups, members], axis=1).reshape(-1).astype(np.int32)
    encoder.encode(coded, family, np.ascontiguousarray(tables.reshape(-1, layout.width)))
  words = encoder.get_compressed().astype("<u4").tobytes()
  return words + _check_word(symbols)


class _Decoder:
  """One symbol at a time from the range decoder, each row quantized as `encode` does."""

  def __init__(self, data: bytes):
    if not isinstance(data, bytes | bytearray | memoryview):
      raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 4 or len(data) % 4:
      raise ValueError(
        f"corrupt or truncated data: {len(data)} bytes is not whole 32-bit words and a check word"
      )
    constriction = _constriction()
    self.data = data
    self.family = constriction.stream.model.Categorical(perfect=False)
    self.decoder = constriction.stream.queue.RangeDecoder(
      np.frombuffer(data[:-4], dtype="<u4").astype(np.uint32)
    )

  def symbols(self, tables: np.ndarray) -> np.ndarray:
    """The next ``len(tables)`` symbols, each from its row of ``tables`` ``[k, width]``."""
    try:
      return self.decoder.decode(self.family, np.ascontiguousarray(tables))
    except AssertionError as error:  # constriction's word for data its model cannot produce
      raise ValueError(f"corrupt data: {error}") from None

  def _one(self, table: np.ndarray) -> int:
    return int(self.symbols(table[None, :])[0])

  def symbol(self, weights: np.ndarray, layout: _Layout) -> int:
    """The next symbol, given its row's weights ``[groups * group]``."""
    if layout.vocab == 1:
      return 0
    if layout.groups == 1:
      return self._one(weights)
    group = self._one(_group_tables(weights[None, :], layout)[0])
    if group >= layout.groups:
      raise ValueError("corrupt data: it decodes to a group past the alphabet")
    member = self._one(_member_tables(weights[None, :], np.array([group]), layout)[0])
    symbol = group * layout.group + member
    if member >= layout.group or symbol >= layout.vocab:
      raise ValueError(f"corrupt data: it decodes to symbol {symbol} >= V={layout.vocab}")
    return symbol

  def finish(self, symbols: np.ndarray) -> np.ndarray:
    if self.decoder.maybe_exhausted() is False or _check_word(symbols) != self.data[-4:]:
      raise ValueError(
        "the data were not produced by encode for these logits and n (corrupt, truncated or"
        " foreign data: the check word does not match the decoded symbols)"
      )
    return symbols.astype(np.int32)


def _decode_known(coder: _Decoder, logits: ArrayLike, n: int) -> np.ndarray:
  rows, vocab = _check_logits(logits)
  if rows != n:
    raise ValueError(f"logits have {rows} rows but n={n} symbols are to be decoded")
  layout = _layout(vocab)
  symbols = np.zeros(n, dtype=np.int64)
  block = _block_rows(n, vocab)
  for start in range(0, n if vocab > 1 else 0, block):
    weights = _weights(_rows(logits, start, start + block), layout)
    if layout.groups == 1:
      decoded = coder.symbols(weights)
      symbols[start : start + len(weights)] = decoded
      continue
    for i, row in enumerate(weights):
      symbols[start + i] = coder.symbol(row, layout)
  if (symbols >= vocab).any():
    raise ValueError(f"corrupt data: it decodes to a symbol >= V={vocab}")
  return coder.finish(symbols)


def _decode_steps(coder: _Decoder, step: Step, n: int, state: Any) -> np.ndarray:
  symbols = np.zeros(n, dtype=np.int64)
  previous, layout = -1, None
  for t in range(n):
    logits, state = step(state, previous)
    row = np.asarray(logits)
    if row.ndim != 1 or (layout is not None and row.shape[0] != layout.vocab):
      raise ValueError(
        f"step must return logits of shape [V] (V the same at every step), got {row.shape}"
        f" at position {t}"
      )
    if layout is None:
      _check_logits(row[None, :])
      layout = _layout(row.shape[0])
    weights = _weights(_rows(row[None, :], 0, 1), layout)[0]
    previous = coder.symbol(weights, layout)
    symbols[t] = previous
  return coder.finish(symbols)


def decode(data: bytes, model: ArrayLike | Step, n: int, state: Any = None) -> np.ndarray:
  """Decode ``n`` symbols coded by `encode`: from the logits, or autoregressively.

  Two forms:

  * ``decode(data, logits, n)``: ``logits`` ``[n, V]`` are the rows that
    were encoded (teacher-forced), the exact inverse of `encode`.
  * ``decode(data, step, n, state)``: ``step(state, previous_symbol) ->
    (logits, state)`` gives position ``t``'s logits ``[V]`` from the symbol
    decoded at ``t - 1`` (``-1`` at the first position), as a compressor with
    a language model decodes. Each row is quantized exactly as `encode`
    quantized the same row of the stacked logits, so the step function only
    has to return the same float values (any layout, JAX or NumPy).

  .. math::

     \\text{decode}(\\text{encode}(z, x), z, n) = x

  Args:
    data: the bytes `encode` returned.
    model: ``[n, V]`` logits, or a ``step`` callable as above.
    n: the number of symbols to decode.
    state: the first state passed to ``step`` (the logits form ignores it).

  Returns:
    ``[n]`` int32 NumPy array of the symbols.

  Raises:
    ValueError: data that were not produced by `encode` for these logits and
      ``n`` (corrupt, truncated, extended or foreign data, the wrong ``n``):
      the check word of ``(n, symbols)`` does not match, or the data
      decode past the alphabet; a step's logits of another shape. A wrong
      sequence passes the check with probability :math:`2^{-32}`.

  Example:
    >>> import numpy as np
    >>> from xentjax import coding
    >>> table = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]))
    >>> data = coding.encode(table[[0, 0, 1, 1]], [0, 1, 1, 2])  # each row follows a symbol
    >>> step = lambda state, previous: (table[max(previous, 0)], state)
    >>> coding.decode(data, step, 4).tolist()
    [0, 1, 1, 2]
  """
  n = int(n)
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  coder = _Decoder(data)
  if callable(model):
    return _decode_steps(coder, model, n, state)
  return _decode_known(coder, model, n)
