"""Strategy "store" adds each tile's weight gradient in column chunks (`engine.add_dw`).

At test sizes one chunk covers the whole vocabulary, so the chunk size is
made small here (several full chunks and a shorter last one), and the
gradients are compared with float64 NumPy on the materialized logits, for
both layouts of `w` and with a bias.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xentjax import linear_softmax_cross_entropy as fused_ce
from xentjax._vocab import engine


def reference(x, w, b, y):
  """`(loss, dx, dw, db)` of the summed cross-entropy of `x @ w + b` in float64 NumPy."""
  x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
  z = x @ w + b
  z = z - z.max(axis=1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  rows = np.arange(len(y))
  dz = np.exp(logp)
  dz[rows, np.asarray(y)] -= 1.0
  return -logp[rows, np.asarray(y)].sum(), dz @ w.T, x.T @ dz, dz.sum(0)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_store_weight_gradient_in_column_chunks(monkeypatch, layout):
  n, d, v = 24, 7, 43  # shapes of their own: no program compiled elsewhere is reused
  monkeypatch.setattr(engine, "RECOMPUTE_VOCAB_CHUNK", 4)
  monkeypatch.setattr(engine, "STORE_DW_ELEMENTS", 10 * d)  # 10 columns: 4 chunks and 3 more
  jax.clear_caches()
  kx, kw, kb, ky = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(kx, (n, d))
  w = jax.random.normal(kw, (d, v))
  b = jax.random.normal(kb, (v,))
  y = jax.random.randint(ky, (n,), 0, v)
  head = w if layout == "dv" else w.T

  def loss(x, head, b):
    return fused_ce(
      x, head, y, bias=b, strategy="store", reduction="sum", w_layout=layout, token_chunk_size=8
    )

  val, (gx, gw, gb) = jax.value_and_grad(loss, (0, 1, 2))(x, head, b)
  jax.clear_caches()
  ref, dx, dw, db = reference(x, w, b, y)
  gw = np.asarray(gw, np.float64)
  np.testing.assert_allclose(float(val), ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(gx, np.float64), dx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw if layout == "dv" else gw.T, dw, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gb, np.float64), db, rtol=1e-4, atol=1e-5)


def test_store_holds_no_weight_sized_product():
  """Compiled only: the temporary memory of value_and_grad stays below one `w`."""
  n, d, v = 512, 1024, 65536  # w: 256 MiB; the store tile: 256 tokens x V (64 MiB)
  s = jax.ShapeDtypeStruct
  args = (s((n, d), jnp.float32), s((d, v), jnp.float32), s((n,), jnp.int32))

  def loss(x, w, y):
    return fused_ce(x, w, y, strategy="store")

  compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < d * v * 4, temp
