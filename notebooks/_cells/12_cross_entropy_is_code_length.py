# %% [markdown]
# # 12. Cross-entropy is code length
#
# Notebook 01 said that 8 equally likely fruits carry 3 bits and 1,024 carry 10, and
# that entropy is the shortest average code length. Notebook 02 said that coding with
# the wrong distribution $q$ costs the cross-entropy $H(p, q)$. Here the codes are
# real: an arithmetic (range) coder turns a model's probabilities into bytes, and a
# sequence $x_1, \dots, x_n$ coded with the model's distributions $q_t$ takes
#
# $$L = \sum_{t=1}^{n} -\log_2 q_t(x_t) \ \text{bits}$$
#
# plus a few dozen bits for the whole message. That sum is the cross-entropy of the
# data under the model, summed over positions: every cross-entropy this library
# computes is, literally, a file size. `xentjax.coding` gives the three pieces:
# `ideal_bits(logits, symbols)` (the sum, in float64), `encode(logits, symbols)`
# (teacher-forced, `logits` is `[n, V]`) and `decode(data, logits, n)` or
# `decode(data, step, n, state)` (one symbol at a time, the way a compressor with a
# language model decodes). The coder is constriction's range coder
# (`pip install "xentjax[coding]"`).

# %%
# %matplotlib inline
import bz2
import gzip
import lzma
import math
import pathlib
import sysconfig

import matplotlib.pyplot as plt
import numpy as np

import xentjax
from xentjax import coding

plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (9.0, 3.6)})
print("xentjax", xentjax.__version__)

# %% [markdown]
# ## The fruit baskets, bit for bit
#
# With 8 equally likely fruits every position has the same uniform distribution, so
# each fruit costs $-\log_2 \tfrac18 = 3$ bits. For a uniform distribution over a
# power of two the range coder does nothing clever: its output **is** the fruits'
# 3-bit numbers written one after the other (then padding to a 32-bit word, then a
# 4-byte check word that `decode` verifies).

# %%
fruits = ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape", "honeydew"]
message = ["date", "banana", "elderberry", "banana", "fig", "cherry", "grape", "fig", "date", "fig"]
symbols = np.array([fruits.index(f) for f in message])
uniform = np.zeros((len(symbols), len(fruits)))  # equal logits: every fruit 1/8

data = coding.encode(uniform, symbols)
word = np.frombuffer(data[:4], "<u4")[0]
written = "".join(format(s, "03b") for s in symbols)
print("the fruits' numbers:", " ".join(format(s, "03b") for s in symbols))
print("the coded word:     ", format(int(word), "032b"))
print(f"ideal: {coding.ideal_bits(uniform, symbols):.1f} bits; data: {len(data)} bytes")
assert format(int(word), "032b").startswith(written)
assert coding.ideal_bits(uniform, symbols) == 3 * len(symbols)
assert [fruits[s] for s in coding.decode(data, uniform, len(symbols))] == message

# %% [markdown]
# One word holds at most ten fruits; a longer message shows the rate. The coded size
# per fruit approaches $\log_2 8 = 3$ and $\log_2 1024 = 10$ bits as the fixed cost
# (the coder's last word and the check word, 64 bits at most) spreads over more fruits.

# %%
rng = np.random.default_rng(0)
print("fruits  basket   ideal bits   coded bits   bits per fruit")
for basket in (8, 1024):
  for n in (10, 1_000, 100_000):
    s = rng.integers(0, basket, n)
    logits = np.broadcast_to(np.zeros(basket, np.float32), (n, basket))
    coded = 8 * len(coding.encode(logits, s))
    ideal = coding.ideal_bits(logits, s)
    print(f"{n:7,d}  {basket:6d}  {ideal:11,.0f}  {coded:11,d}   {coded / n:.4f}")
    assert math.isclose(ideal, n * math.log2(basket), rel_tol=1e-12)
    assert ideal - 1e-6 <= coded <= round(ideal) + 64  # whole bits: the sum is 3n or 10n
assert abs(coded / n - 10) < 1e-3

# %% [markdown]
# ## An adaptive byte model compressing Python source
#
# A model that predicts each byte from the two before it (order 2), trained by
# counting on part of the Python standard library and still counting as it reads the
# file it codes. Its probability of byte $x$ after the bytes $ab$ smooths the counts
# toward the shorter contexts (Dirichlet smoothing, the idea behind PPM and
# Kneser–Ney):
#
# $$\begin{aligned}
# q(x \mid ab) &= \frac{n_{abx} + 8\, q_1(x \mid b)}{n_{ab} + 8}, \\
# q_1(x \mid b) &= \frac{n_{bx} + 16\, q_0(x)}{n_{b} + 16}, \quad
# q_0(x) = \frac{n_x + 1}{n + 256}.
# \end{aligned}$$
#
# The held-out files are the same split as the benchmarks' language model uses
# (every tenth file of the sorted standard library).

# %%
root = pathlib.Path(sysconfig.get_paths()["stdlib"])
skip = {"site-packages", "dist-packages", "__pycache__"}
files = sorted(
  (f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts)),
  key=lambda f: f.relative_to(root).as_posix(),
)
held_out = files[9::10]
train = [f for i, f in enumerate(files) if i % 10 != 9]

corpus = np.frombuffer(b"".join(f.read_bytes() for f in train[::4])[:2_000_000], np.uint8)
x = corpus.astype(np.int64)
trigrams = np.bincount((x[:-2] << 16) | (x[1:-1] << 8) | x[2:], minlength=1 << 24)
trigrams = trigrams.reshape(1 << 16, 256).astype(np.float64)  # [context ab, next byte]
print(f"trained on {len(corpus):,} bytes of {len(train[::4])} files")


class Order2:
  """The counts of the training corpus, plus those of the file read so far."""

  def __init__(self):
    self.bigrams = trigrams.reshape(256, 256, 256).sum(axis=0)
    self.unigrams = self.bigrams.sum(axis=0)
    self.seen = {}

  def logits(self, a, b):
    q0 = (self.unigrams + 1) / (self.unigrams.sum() + 256)
    q1 = (self.bigrams[b] + 16 * q0) / (self.bigrams[b].sum() + 16)
    n = trigrams[a * 256 + b] + self.seen.get(a * 256 + b, 0)
    return np.log((n + 8 * q1) / (n.sum() + 8)).astype(np.float32)

  def update(self, a, b, x):
    self.seen.setdefault(a * 256 + b, np.zeros(256))[x] += 1
    self.bigrams[b, x] += 1
    self.unigrams[x] += 1


def model_logits(data):
  """Row t: the model's logits for byte t, having read bytes 0..t-1 (teacher-forced)."""
  model, a, b = Order2(), 10, 10  # the file starts after two newlines
  rows = np.empty((len(data), 256), np.float32)
  for t, byte in enumerate(data):
    rows[t] = model.logits(a, b)
    model.update(a, b, byte)
    a, b = b, byte
  return rows


# %% [markdown]
# Each held-out file is coded on its own (the model starts from the training counts
# every time), next to gzip -9, bz2 and lzma on the same bytes.

# %%
docs = [f for f in held_out if 20_000 <= f.stat().st_size <= 45_000][:6]
table = []
for f in docs:
  data = f.read_bytes()
  symbols = np.frombuffer(data, np.uint8)
  rows = model_logits(data)
  code = coding.encode(rows, symbols)
  table.append(
    {
      "file": f.relative_to(root).as_posix(),
      "bytes": len(data),
      "ideal": coding.ideal_bits(rows, symbols),
      "coded": 8 * len(code),
      "gzip -9": 8 * len(gzip.compress(data, compresslevel=9)),
      "bz2": 8 * len(bz2.compress(data)),
      "lzma": 8 * len(lzma.compress(data)),
    }
  )

print(f"{'file':34s} {'bytes':>7s}  bits per byte: ideal  coded  gzip -9   bz2   lzma")
for r in table:
  per = {k: r[k] / r["bytes"] for k in ("ideal", "coded", "gzip -9", "bz2", "lzma")}
  print(f"{r['file']:34s} {r['bytes']:7,d}  {'':13s}" + "".join(f"{v:6.3f} " for v in per.values()))
total = {k: sum(r[k] for r in table) for k in table[0] if k != "file"}
print(
  f"{'all':34s} {total['bytes']:7,d}  {'':13s}"
  + "".join(
    f"{total[k] / total['bytes']:6.3f} " for k in ("ideal", "coded", "gzip -9", "bz2", "lzma")
  )
)
print(f"coded / ideal - 1 = {total['coded'] / total['ideal'] - 1:.5f}")
assert all(r["ideal"] <= r["coded"] <= r["ideal"] + 64 for r in table)
assert total["coded"] <= 1.001 * total["ideal"]

# %% [markdown]
# The coded size is the model's cross-entropy to within 0.1%: a better model is a
# smaller file, bit for bit. This model is a poor one: two bytes of context cannot see
# that `self.` or a function's name came up 40 lines ago, which gzip's dictionary of
# recent strings finds, so gzip wins here. Compression rates are cross-entropies, and a
# model with more context is how to lower them.
#
# ### Decoding is the model run forward
#
# The decoder has no logits in advance: `step(state, previous_byte)` updates the model
# with the byte just decoded and returns the next position's logits, exactly as the
# encoder saw them (each row is quantized on the host from its float values, so the
# two sides agree bit for bit).

# %%
f = min(docs, key=lambda f: f.stat().st_size)
data = f.read_bytes()
code = coding.encode(model_logits(data), np.frombuffer(data, np.uint8))


def step(state, previous):
  model, a, b = state
  if previous >= 0:
    model.update(a, b, previous)
    a, b = b, previous
  return model.logits(a, b), (model, a, b)


decoded = coding.decode(code, step, len(data), (Order2(), 10, 10))
assert decoded.astype(np.uint8).tobytes() == data
print(f"{f.name}: {len(data):,} bytes -> {len(code):,} bytes -> decoded back exactly")

# %% [markdown]
# ## Code length against cross-entropy, file by file

# %%
ideal = np.array([r["ideal"] for r in table])
coded = np.array([r["coded"] for r in table])
fig, (left, right) = plt.subplots(1, 2)
left.plot(ideal / 8e3, coded / 8e3, "o")
line = np.array([0, ideal.max() / 8e3 * 1.05])
left.plot(line, line, "k:", label="code length = cross-entropy")
left.set(xlabel="cross-entropy of the file (kB)", ylabel="coded size (kB)")
left.legend()
names = [r["file"].rsplit("/", 1)[-1] for r in table]
for i, key in enumerate(("coded", "gzip -9", "bz2", "lzma")):
  bpb = [r[key] / r["bytes"] for r in table]
  right.bar(np.arange(len(table)) + 0.2 * i, bpb, 0.2, label=key if key != "coded" else "order 2")
right.set_xticks(np.arange(len(table)) + 0.3, names, rotation=30, ha="right", fontsize=8)
right.set(ylabel="bits per byte", ylim=(0, 4.2))
right.legend(fontsize=8, ncols=4, loc="upper center")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## A language model
#
# The small transformers of `benchmarks/_real_lm` (a byte-level BPE vocabulary and
# causal transformers trained on the same standard-library split) are not built by
# the test suite: training takes minutes. With `pip install "xentjax[bench,coding]"`,
#
# ```bash
# python benchmarks/coding.py --real full    # builds and caches the models once
# python benchmarks/coding.py --real quick   # a tiny model (V = 4,096), about a minute
# ```
#
# codes the models' held-out windows with `coding.encode(logits, tokens)` exactly as
# the byte model's bytes were coded here, and prints bits per byte (the coded bits
# over the UTF-8 bytes the tokens decode to) against gzip -9, bz2 and lzma on the same
# text. Bits per byte is what makes models with different tokenizers comparable
# (Delétang et al., "Language Modeling Is Compression", 2024).
