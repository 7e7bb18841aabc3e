"""Adaptive gradient filtering and vocabulary sorting (`filter_eps=`, `vocab_order=`).

Each gradient is checked against the exact one of the materialized logits in
float64 NumPy: columns the filter cannot touch must match it, the rest must
stay within the documented bound (each dropped entry of the logit gradient
is below ``|g| filter_eps``, so ``|dW error| <= sum_i |x_i| |g| filter_eps``).
That the adaptive rule runs a chunk unfiltered, and that a chunk worth
filtering really is filtered, is read from which tiles' contributions are
present in the gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xentjax import linear_softmax_cross_entropy as fused_ce
from xentjax._vocab import tiles

N, D, V, TC, VC = 128, 16, 256, 16, 32  # 8 token tiles x 8 column chunks
EPS = 4e-3


def reference(x, w, b, y):
  """`(loss, dx, dw, db)` of the mean cross-entropy of `x @ w + b` in float64 NumPy."""
  x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
  y = np.asarray(y)
  z = x @ w + b
  z = z - z.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  n = len(y)
  loss = -logp[np.arange(n), y].mean()
  dz = np.exp(logp)
  dz[np.arange(n), y] -= 1.0
  dz /= n
  return loss, dz @ w.T, x.T @ dz, dz.sum(0)


def tile_part(x, w, b, y, rows, cols):
  """The part of the exact `dw[:, cols]` that the tokens `rows` contribute."""
  _, _, dw, _ = reference(x, w, b, y)
  keep = np.zeros(len(y), bool)
  keep[rows] = True
  _, _, dw_rows, _ = reference(np.where(keep[:, None], x, 0.0), w, b, y)
  # Zeroed x still adds its softmax term through the bias alone to dz, but x = 0
  # multiplies it away in dw = x^T dz; only `rows` remain (scaled by the same 1/N).
  return dw_rows[:, cols], dw[:, cols]


def mixed(seed=0):
  """Columns 0..31 carry every token's mass; 32..255 are below `EPS` for every token.

  The labels put tokens 0..111 (token tiles 0..6) in chunk 1 (columns
  32..63) and tokens 112..127 (tile 7) in chunk 2 (columns 64..95): chunk 1
  keeps 7 of its 8 tiles (1/8 skippable, below `tiles.FILTER_MIN_SKIP`:
  unfiltered), chunk 2 keeps 1 (7/8 skippable: filtered), chunks 3..7 none.
  """
  kx, kw, ky = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(kx, (N, D))
  w = 0.1 * jax.random.normal(kw, (D, V))
  b = jnp.where(jnp.arange(V) < 32, 4.0, -1.5)
  y = jnp.where(jnp.arange(N) < 112, 32, 64) + jax.random.randint(ky, (N,), 0, 32)
  return x, w, b, y


def spread_heavy(seed):
  """A permutation of the classes that sends the heavy classes 0..31 to 4 per chunk."""
  heavy = (np.arange(32) % 8) * 32 + np.arange(32) // 8
  rest = np.setdiff1d(np.arange(V), heavy)
  np.random.default_rng(seed).shuffle(rest)
  return np.concatenate([heavy, rest])


@functools.partial(jax.jit, static_argnames=("filter_eps", "strategy"))
def value_and_grads(x, w, b, y, order=None, filter_eps=None, strategy="recompute"):
  def loss(x, w, b):
    return fused_ce(
      x,
      w,
      y,
      bias=b,
      strategy=strategy,
      filter_eps=filter_eps,
      vocab_order=order,
      token_chunk_size=TC,
      vocab_chunk_size=VC,
    )

  return jax.value_and_grad(loss, (0, 1, 2))(x, w, b)


def bound(x, eps):
  """The documented bound on `|dW error|`, entrywise: sum_i |x_i| (1/N) eps."""
  return np.abs(np.asarray(x, np.float64)).sum(0)[:, None] / N * eps


def test_the_example_has_the_skip_fractions_it_claims():
  x, w, b, _ = mixed()
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  assert p[:, 32:].max() < EPS and p[:, :32].min() > EPS
  assert 1 / 8 < tiles.FILTER_MIN_SKIP <= 7 / 8


def test_adaptive_filtering_runs_a_chunk_with_little_to_skip_unfiltered():
  x, w, b, y = mixed()
  v, (_, gw, _) = value_and_grads(x, w, b, y, filter_eps=EPS)
  loss, _, dw_ref, _ = reference(x, w, b, y)
  np.testing.assert_allclose(float(v), loss, rtol=1e-5)
  gw = np.asarray(gw, np.float64)
  # Chunk 1: tile 7's tokens put < EPS on it and no label in it, so a per-tile
  # filter would drop their part; the adaptive rule runs the chunk unfiltered.
  part, _ = tile_part(x, w, b, y, slice(112, 128), slice(32, 64))
  assert np.abs(part).max() > 1e-5  # large against float32 rounding of dw
  np.testing.assert_allclose(gw[:, 32:64], dw_ref[:, 32:64], rtol=1e-4, atol=1e-7)
  # Chunk 2: filtered; only tile 7 (which holds its labels) contributes.
  kept, _ = tile_part(x, w, b, y, slice(112, 128), slice(64, 96))
  np.testing.assert_allclose(gw[:, 64:96], kept, rtol=1e-4, atol=1e-7)
  assert np.abs(dw_ref[:, 64:96] - kept).max() > 1e-5
  # Chunks 3..7: nothing kept.
  assert not np.any(gw[:, 96:])
  assert np.all(np.abs(gw - dw_ref) <= bound(x, EPS) + 1e-7)


def test_automatic_tiles_filter_by_the_filter_tiles_inside_wider_forward_tiles():
  """Automatic tiles: the forward pass's 1024-column tiles record maxima per 512 columns.

  V=1800: forward tiles [0, 1024) and [1024, 1800); filter tiles of 512
  columns, the last one partial. Only columns 1024..1535 carry mass (and
  every label), so the filtered gradient of every other column is exactly 0
  (columns 1536.. share a forward tile with them) and theirs is exact.
  """
  n, v, eps = 512, 1800, 2.0**-12
  assert tiles.RECOMPUTE_VOCAB_CHUNK == 2 * tiles.FILTER_VOCAB_CHUNK == 1024
  heavy = slice(1024, 1536)
  kx, kw, ky = jax.random.split(jax.random.PRNGKey(7), 3)
  x, w = jax.random.normal(kx, (n, D)), 0.02 * jax.random.normal(kw, (D, v))
  b = jnp.zeros((v,)).at[heavy].set(4.0)
  y = 1024 + jax.random.randint(ky, (n,), 0, 512)
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
  logp = z - z.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  light = np.ones(v, bool)
  light[heavy] = False
  assert logp[:, light].max() < np.log(eps) < logp[:, heavy].min()

  def loss(x, w, b):
    return fused_ce(x, w, y, bias=b, filter_eps=eps)

  v_, (_, gw, _) = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(x, w, b)
  ref, _, dw_ref, _ = reference(x, w, b, y)
  np.testing.assert_allclose(float(v_), ref, rtol=1e-5)
  gw = np.asarray(gw, np.float64)
  assert not np.any(gw[:, light]) and np.abs(dw_ref[:, light]).min(1).max() > 0  # skipped
  assert np.abs(dw_ref[:, light]).max() > 1e-7
  np.testing.assert_allclose(gw[:, heavy], dw_ref[:, heavy], rtol=1e-4, atol=1e-7)
  assert np.all(np.abs(gw - dw_ref) <= bound(x, eps) * N / n + 1e-7)


@pytest.mark.parametrize("strategy", ["recompute", "store"])
def test_filtering_with_nothing_to_skip_is_the_unfiltered_call(strategy):
  """No tile below `filter_eps`: the value and every gradient are the unfiltered ones, bit for bit.

  ("recompute" runs the unfiltered backward program itself, "store" its
  unfiltered products, on the same tiles.)
  """
  kx, kw, ky = jax.random.split(jax.random.PRNGKey(5), 3)
  x, w = jax.random.normal(kx, (N, D)), 0.1 * jax.random.normal(kw, (D, V))
  b, y = jnp.zeros((V,)), jax.random.randint(ky, (N,), 0, V)
  eps = 1e-6
  z = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  assert np.exp(z - z.max(1, keepdims=True)).min() / V > eps  # every probability above eps
  vc = {"vocab_chunk_size": VC if strategy == "recompute" else None}  # "store": whole rows

  def loss(x, w, b, filter_eps=None):
    chunks = {**vc, "vocab_chunk_size": VC} if filter_eps else vc  # the filter tiles' columns
    return fused_ce(
      x, w, y, bias=b, strategy=strategy, filter_eps=filter_eps, token_chunk_size=TC, **chunks
    )

  plain = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(x, w, b)
  filtered = jax.jit(jax.value_and_grad(functools.partial(loss, filter_eps=eps), (0, 1, 2)))(
    x, w, b
  )
  for a, f in zip(jax.tree.leaves(plain), jax.tree.leaves(filtered)):
    np.testing.assert_array_equal(np.asarray(f), np.asarray(a))


@pytest.mark.parametrize("filtered", [False, True])
def test_vocab_order_gives_the_unsorted_values_and_gradients(filtered):
  x, w, b, y = mixed()
  # An order that sweeps the heavy classes 4 to a chunk of 32 (so no tile is negligible).
  order = jnp.asarray(np.argsort(spread_heavy(0)))
  eps = EPS if filtered else None
  v, g = value_and_grads(x, w, b, y, order, filter_eps=eps)
  v0, _ = value_and_grads(x, w, b, y, filter_eps=eps)
  loss, dx_ref, dw_ref, db_ref = reference(x, w, b, y)
  np.testing.assert_allclose(float(v), loss, rtol=1e-5)
  np.testing.assert_allclose(float(v), float(v0), rtol=1e-6)
  if not filtered:  # a permutation of the same sums
    for a, r in zip(g, (dx_ref, dw_ref, db_ref)):
      np.testing.assert_allclose(np.asarray(a, np.float64), r, rtol=1e-4, atol=1e-7)
    return
  assert np.all(np.abs(np.asarray(g[1], np.float64) - dw_ref) <= bound(x, EPS) + 1e-7)
  # Scattered this way, the mass lies in every chunk: nothing is skipped.
  np.testing.assert_allclose(np.asarray(g[1], np.float64), dw_ref, rtol=1e-4, atol=1e-7)


def test_sorting_clusters_what_the_filter_skips():
  """Heavy columns spread over every chunk, then sorted back together by `vocab_order`."""
  x, w, b, y = mixed()
  perm = spread_heavy(1)  # class perm[k] takes column k's role: 4 heavy ones per chunk
  inv = np.argsort(perm)
  ws, bs, ys = w[:, inv], b[inv], jnp.asarray(perm)[y]  # the same problem, classes scattered
  loss, dx_ref, dw_ref, db_ref = reference(x, ws, bs, ys)
  v_as_is, (_, gw_as_is, _) = value_and_grads(x, ws, bs, ys, filter_eps=EPS)
  order = jnp.asarray(perm)  # sweep column k is class perm[k]: the original layout
  v, (gx, gw, gb) = value_and_grads(x, ws, bs, ys, order, filter_eps=EPS)
  np.testing.assert_allclose([float(v), float(v_as_is)], [loss, loss], rtol=1e-5)
  # As is, every chunk holds heavy columns: nothing is skipped, the gradient is exact.
  np.testing.assert_allclose(np.asarray(gw_as_is, np.float64), dw_ref, rtol=1e-4, atol=1e-7)
  # Sorted, the light classes' chunks are skipped: their gradient is 0, in the
  # caller's column order, and everything stays within the bound.
  gw = np.asarray(gw, np.float64)
  light = perm[96:]  # classes the sorted sweep puts in chunks 3..7
  assert not np.any(gw[:, light]) and np.any(dw_ref[:, light])
  assert np.all(np.abs(gw - dw_ref) <= bound(x, EPS) + 1e-7)
  # dx_i loses sum_j dz_ij w_j over dropped j, each |dz_ij| < eps / N; db_j at most N eps / N.
  dx_bound = np.abs(np.asarray(ws, np.float64)).sum(1)[None, :] / N * EPS
  assert np.all(np.abs(np.asarray(gx, np.float64) - dx_ref) <= dx_bound + 1e-7)
  assert np.all(np.abs(np.asarray(gb, np.float64) - db_ref) <= EPS + 1e-7)


def test_vocab_order_with_padding_class_weights_and_the_vd_layout():
  """Padding columns stay last; class weights and label smoothing follow the order."""
  kx, kw, ky, kc = jax.random.split(jax.random.PRNGKey(3), 4)
  x = jax.random.normal(kx, (2, 5, 8))
  table = jax.random.normal(kw, (40, 8))  # [V + padding, D]
  y = jax.random.randint(ky, (2, 5), 0, 33).at[0, 0].set(-100)
  cw = jax.random.uniform(kc, (33,), minval=0.5, maxval=2.0)
  order = jnp.asarray(np.random.default_rng(2).permutation(33))
  kw_ = {"w_layout": "vd", "vocab_size": 33, "class_weights": cw, "label_smoothing": 0.1}

  def loss(x, t, order=None):
    return fused_ce(x, t, y, vocab_order=order, vocab_chunk_size=8, **kw_)

  v, g = jax.value_and_grad(loss, (0, 1))(x, table, order)
  v0, g0 = jax.value_and_grad(loss, (0, 1))(x, table)
  np.testing.assert_allclose(float(v), float(v0), rtol=1e-5)
  for a, r in zip(g, g0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-6)
  assert not np.any(np.asarray(g[1])[33:])  # padding rows: no gradient


def test_vocab_order_with_strategy_store():
  x, w, b, y = mixed()
  order = jnp.asarray(np.random.default_rng(4).permutation(V))

  def loss(x, w, b):
    return fused_ce(x, w, y, bias=b, strategy="store", vocab_order=order, token_chunk_size=32)

  v, g = jax.value_and_grad(loss, (0, 1, 2))(x, w, b)
  ref = reference(x, w, b, y)
  np.testing.assert_allclose(float(v), ref[0], rtol=1e-5)
  for a, r in zip(g, ref[1:]):
    np.testing.assert_allclose(np.asarray(a, np.float64), r, rtol=1e-4, atol=1e-7)


def store_filtered(*args):
  return value_and_grads(*args, filter_eps=EPS, strategy="store")


def check_heavy_and_parts(x, w, b, y, v, grads, parts, visible):
  """A filtered "store" call on `mixed`-like inputs (mass on columns 0..31) against float64.

  The value, the heavy columns' weight gradient and the bias gradient are
  exact; each `(rows, cols)` of `parts` holds the part of those tokens only
  (the other tokens' part, above `visible`, is dropped); columns 96.. are
  exactly 0 (and would not be unfiltered); `dw` and `dx` are within the bound.
  """
  gx, gw, gb = grads
  n = len(y)
  loss, dx_ref, dw_ref, db_ref = reference(x, w, b, y)
  np.testing.assert_allclose(float(v), loss, rtol=1e-5)
  gw = np.asarray(gw, np.float64)
  np.testing.assert_allclose(gw[:, :32], dw_ref[:, :32], rtol=1e-4, atol=1e-7)
  for rows, cols in parts:
    kept, full = tile_part(x, w, b, y, rows, cols)
    np.testing.assert_allclose(gw[:, cols], kept, rtol=1e-4, atol=1e-7)
    assert np.abs(full - kept).max() > visible  # the dropped part is visible
  assert not np.any(gw[:, 96:]) and np.abs(dw_ref[:, 96:]).max() > visible
  assert np.all(np.abs(gw - dw_ref) <= bound(x, EPS) * N / n + 1e-7)
  dx_bound = np.abs(np.asarray(w, np.float64)).sum(1)[None, :] / n * EPS
  assert np.all(np.abs(np.asarray(gx, np.float64) - dx_ref) <= dx_bound + 1e-7)
  np.testing.assert_allclose(np.asarray(gb, np.float64), db_ref, rtol=1e-4, atol=1e-7)


def test_store_filters_each_whole_row_tile_by_its_own_chunks():
  """Strategy "store" decides per token tile: each tile of `mixed` skips 6 of its 8 chunks.

  Tiles 0..6 keep chunks 0 (mass) and 1 (their labels), tile 7 chunks 0 and
  2: so chunk 1 holds tiles 0..6's part only (where "recompute", deciding per
  column chunk, runs chunk 1 unfiltered), chunk 2 tile 7's, and chunks 3..7
  nothing. The value and the bias gradient are exact (the bias gradient sums
  the whole-row tile, which "store" holds anyway).
  """
  x, w, b, y = mixed()
  v, grads = store_filtered(x, w, b, y)
  parts = ((slice(0, 112), slice(32, 64)), (slice(112, 128), slice(64, 96)))
  check_heavy_and_parts(x, w, b, y, v, grads, parts, visible=1e-5)


def test_store_runs_a_tile_with_little_to_skip_unfiltered():
  """Tile 0's labels fill chunks 1..6, so only chunk 7 (1/8) is skippable: it runs whole."""
  x, w, b, y = mixed()
  y = y.at[:TC].set(32 * (1 + jnp.arange(TC) % 6) + 5)
  _, (_, gw, _) = store_filtered(x, w, b, y)
  gw = np.asarray(gw, np.float64)
  _, _, dw_ref, _ = reference(x, w, b, y)
  part, _ = tile_part(x, w, b, y, slice(0, TC), slice(224, 256))
  assert np.abs(part).max() > 1e-5
  np.testing.assert_allclose(gw[:, 224:], part, rtol=1e-4, atol=1e-7)  # tile 0's, and only it
  assert np.all(np.abs(gw - dw_ref) <= bound(x, EPS) + 1e-7)


def test_store_runs_columns_every_token_tile_keeps_over_all_rows():
  """Automatic "store" tiles: one whole-row tile of 512 tokens, two filter tiles of 256.

  Columns 0..31 carry every token's mass: both token tiles keep chunk 0, which
  runs as one product over all 512 rows. The labels of tokens 0..255 lie in
  chunk 1 and those of 256..511 in chunk 2: each of these is kept by one
  token tile only, and runs tile by tile. Chunks 3..7 are skipped.
  """
  n = 512
  assert tiles.FILTER_TOKEN_CHUNK == 256 and n <= tiles.STORE_TILE // V  # one whole-row tile
  kx, kw, ky = jax.random.split(jax.random.PRNGKey(3), 3)
  x, w = jax.random.normal(kx, (n, D)), 0.1 * jax.random.normal(kw, (D, V))
  b = jnp.where(jnp.arange(V) < 32, 4.0, -1.5)
  y = jnp.where(jnp.arange(n) < 256, 32, 64) + jax.random.randint(ky, (n,), 0, 32)

  def loss(x, w, b):
    return fused_ce(x, w, y, bias=b, strategy="store", filter_eps=EPS, vocab_chunk_size=VC)

  v, grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(x, w, b)
  parts = ((slice(0, 256), slice(32, 64)), (slice(256, 512), slice(64, 96)))
  check_heavy_and_parts(x, w, b, y, v, grads, parts, visible=1e-6)


def test_store_never_skips_a_partial_tile():
  """Tiles of 48 tokens (48, 48, 32) and 48 columns (5 whole chunks, 16 columns left).

  Whole-row tiles 0 and 1 keep chunks 0 (mass) and 1 (labels) and skip
  chunks 2..4; tile 2 (32 tokens, fewer than a filter tile) and the last 16
  columns are partial and run unfiltered.
  """
  x, w, b, y = mixed()

  def loss(x, w, b):
    return fused_ce(
      x, w, y, bias=b, strategy="store", filter_eps=EPS, token_chunk_size=48, vocab_chunk_size=48
    )

  v, (gx, gw, gb) = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(x, w, b)
  loss_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, y)
  np.testing.assert_allclose(float(v), loss_ref, rtol=1e-5)
  gw = np.asarray(gw, np.float64)
  np.testing.assert_allclose(gw[:, 240:], dw_ref[:, 240:], rtol=1e-4, atol=1e-7)
  kept, full = tile_part(x, w, b, y, slice(96, 128), slice(96, 240))
  np.testing.assert_allclose(gw[:, 96:240], kept, rtol=1e-4, atol=1e-7)
  assert np.abs(full - kept).max() > 1e-5
  assert np.all(np.abs(gw - dw_ref) <= bound(x, EPS) + 1e-7)
  dx_bound = np.abs(np.asarray(w, np.float64)).sum(1)[None, :] / N * EPS
  assert np.all(np.abs(np.asarray(gx, np.float64) - dx_ref) <= dx_bound + 1e-7)
  np.testing.assert_allclose(np.asarray(gx, np.float64)[96:], dx_ref[96:], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gb, np.float64), db_ref, rtol=1e-4, atol=1e-7)


def test_store_filtering_with_vocab_order_follows_the_sorted_columns():
  """Sorted back together by `vocab_order`, the light classes are skipped in "store" too."""
  x, w, b, y = mixed()
  perm = spread_heavy(1)
  inv = np.argsort(perm)
  ws, bs, ys = w[:, inv], b[inv], jnp.asarray(perm)[y]
  loss, _, dw_ref, _ = reference(x, ws, bs, ys)
  _, (_, gw_as_is, _) = store_filtered(x, ws, bs, ys)
  v, (_, gw, _) = store_filtered(x, ws, bs, ys, jnp.asarray(perm))
  np.testing.assert_allclose(float(v), loss, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gw_as_is, np.float64), dw_ref, rtol=1e-4, atol=1e-7)
  gw = np.asarray(gw, np.float64)
  assert not np.any(gw[:, perm[96:]]) and np.any(dw_ref[:, perm[96:]])
  assert np.all(np.abs(gw - dw_ref) <= bound(x, EPS) + 1e-7)


def test_vocab_order_errors():
  x, w, _, y = mixed()
  with pytest.raises(ValueError, match=r"vocab_order.*permutation"):
    fused_ce(x, w, y, vocab_order=np.zeros(V, np.int32))
  with pytest.raises(ValueError, match=r"vocab_order.*\(256,\)"):
    fused_ce(x, w, y, vocab_order=np.arange(V - 1))
  with pytest.raises(TypeError, match="vocab_order"):
    fused_ce(x, w, y, vocab_order=np.arange(V, dtype=np.float32))
