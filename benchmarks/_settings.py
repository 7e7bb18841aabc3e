"""Named distributions of the logits `x @ w + b` that the fused benchmarks run on.

* ``random``: ``x ~ N(0, 1)``, ``w ~ N(0, 1/D)``, uniform labels, no bias (the
  benchmarks' original input: about log V nats of entropy, no skippable tile).
* ``concentrated``: a Zipf-sorted unigram bias ``b_j = -alpha log(1 + j)``
  (frequent columns first) and little context noise (``x @ w`` of scale 0.5):
  about 2.5 nats, the mass on the frequent columns, nearly every tail tile
  negligible.
* ``scattered``: the same bias plus per-token noise of scale 3: about 2.3
  nats, 99.7% of the probabilities below 2^-12, the rest spread over the whole
  vocabulary, so almost no tile is negligible for every token in it.
* ``real``: the hidden states and head of a small transformer trained on the
  Python standard library (`benchmarks/real_lm.py`, cached), on held-out text.

Synthetic labels are drawn from the distribution itself; the real labels are
the held-out next tokens. ``alpha`` was set (bisection, N=512) so the mean
entropy is 2.5 and 2.3 nats at V=32768.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

SYNTHETIC = {"concentrated": (1.653, 0.5), "scattered": (1.619, 3.0)}  # (alpha, noise)
NAMES = ("random", "concentrated", "scattered", "real")


@dataclasses.dataclass
class Setting:
  """One input: `x [N, D]`, `w [D, V]`, `b [V]` or None, labels `y [N]`, and what it is."""

  name: str
  x: jax.Array
  w: jax.Array
  b: jax.Array | None
  y: jax.Array
  note: str = ""
  # The column order by token frequency known before training (most frequent
  # first): what vocabulary sorting would use. None where there is none.
  frequency_order: np.ndarray | None = None

  @property
  def size(self) -> tuple[int, int, int]:
    return (self.x.shape[0], self.x.shape[1], self.w.shape[1])


def random(n, d, v, seed=0) -> Setting:
  kx, kw, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (n, d), jnp.float32)
  w = jax.random.normal(kw, (d, v), jnp.float32) / d**0.5
  return Setting("random", x, w, None, jax.random.randint(ky, (n,), 0, v))


def zipf(name, n, d, v, seed=0) -> Setting:
  """`concentrated` or `scattered`: Zipf-sorted bias plus context noise of a given scale."""
  alpha, noise = SYNTHETIC[name]
  kx, kw, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = noise * jax.random.normal(kx, (n, d), jnp.float32)
  w = jax.random.normal(kw, (d, v), jnp.float32) / d**0.5
  b = -alpha * jnp.log1p(jnp.arange(v, dtype=jnp.float32))
  y = jax.random.categorical(ky, x @ w + b, axis=-1)
  note = f"alpha={alpha}, noise={noise}"
  return Setting(name, x, w, b, y, note, np.arange(v))  # the bias is Zipf-sorted already


def real_variant() -> str:
  """Which cached model: `full` (V=32768), or `quick` when `XENTJAX_BENCH_REAL=quick`."""
  return os.environ.get("XENTJAX_BENCH_REAL", "full")


def _embed(x, w, b, d, seed):
  """Fold the bias in as a constant feature, then map `[x, 1]` isometrically into D dims.

  With `q [D, d + 1]` of orthonormal columns, `(x' = [x, 1] q^T) @ (w' = q [w; b])`
  equals `x @ w + b` (to float32 rounding): the same logits, at the matmul
  size of a D-wide model. `d=None` keeps the model's own width (d + 1).
  """
  xa = np.concatenate([x, np.ones((x.shape[0], 1), x.dtype)], axis=1)
  wa = np.concatenate([w, b[None, :]], axis=0)
  if d is None or d == xa.shape[1]:
    return xa, wa
  if d < xa.shape[1]:
    raise ValueError(f"D={d} is below the model's width + 1 ({xa.shape[1]}); use D=None")
  g = np.random.default_rng(seed).standard_normal((d, xa.shape[1]))
  q, _ = np.linalg.qr(g)
  return (xa @ q.T).astype(np.float32), (q @ wa).astype(np.float32)


def real_arrays(role="teacher"):
  """`(x [N, d], w [d, V], b [V], y [N], meta)` of the cached model (built on first use).

  The held-out windows (cached in stream order) come in a fixed shuffled
  order, whole windows at a time, so the first N tokens sample every part of
  the held-out files rather than the first few.
  """
  from benchmarks._real_lm import build

  arrays, meta = build.load(build.VARIANTS[real_variant()])
  windows, context = arrays["windows"].shape[0], arrays["windows"].shape[1] - 1
  order = np.random.default_rng(2).permutation(windows)
  idx = (order[:, None] * context + np.arange(context)).reshape(-1)
  x, y = arrays[f"{role}_x"][idx], arrays["labels"][idx]
  return x, arrays[f"{role}_w"], arrays[f"{role}_b"], y, meta


def real_frequency_order() -> np.ndarray:
  """The models' columns by training-set token count, most frequent first."""
  from benchmarks._real_lm import build

  arrays, _ = build.load(build.VARIANTS[real_variant()])
  return np.argsort(-arrays["unigram_counts"], kind="stable")


def real(n, d=None, role="teacher") -> Setting:
  """The first `n` held-out tokens; the bias folded into `w` and the width mapped to `d`."""
  x, w, b, y, meta = real_arrays(role)
  if n > x.shape[0]:
    raise ValueError(f"the cache holds {x.shape[0]} held-out tokens, asked for N={n}")
  xd, wd = _embed(x[:n], w, b, d, seed=0)
  note = f"{meta[role]['model']}, width {x.shape[1]} + bias mapped to D={xd.shape[1]}"
  y = jnp.asarray(y[:n])
  return Setting("real", jnp.asarray(xd), jnp.asarray(wd), None, y, note, real_frequency_order())


def make(name, n, d, v, seed=0) -> Setting:
  """The setting `name` at size N, D, V (the real one has its own V, and N up to its cache)."""
  if name == "random":
    return random(n, d, v, seed)
  if name in SYNTHETIC:
    return zipf(name, n, d, v, seed)
  if name == "real":
    return real(n, d)
  raise ValueError(f"unknown setting {name!r}; one of {NAMES}")


def teacher_student(name, n, d, v) -> tuple[Setting, Setting]:
  """Student and teacher inputs for distillation: the two cached models, or random heads."""
  if name == "real":
    return real(n, d, "student"), real(n, d, "teacher")
  if name != "random":
    raise ValueError("distillation runs on the `random` or the `real` setting")
  s, t = random(n, d, v, seed=0), random(n, d, v, seed=1)
  t.w = 2.0 * t.w  # a sharper teacher, as before
  return s, t
