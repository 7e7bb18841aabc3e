"""The variational bounds on mutual information of `xentjax.info`, against TFP's definitions.

TensorFlow Probability's ``tfp.vi.mutual_information`` (tfp-nightly
0.26.0.dev20261027, ``tensorflow_probability/python/vi/mutual_information.py``)
runs only on TensorFlow: its JAX substrate has no ``mutual_information``
module. So its formulas are written here in float64 NumPy, step by step as
that file computes them (``lower_bound_info_nce``,
``lower_bound_nguyen_wainwright_jordan``, ``lower_bound_jensen_shannon``
with the default diagonal mask), and Donsker-Varadhan, which TFP lacks, as
Poole et al.'s code has it (``dv_upper_lower_bound``: the mean of the
diagonal minus ``logmeanexp_nodiag``). Gradients are central differences of
these references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

import xentjax
from xentjax.info import (
  dv_lower_bound,
  infonce_lower_bound,
  js_lower_bound,
  mutual_information_bounds,
  nwj_lower_bound,
)

RNG = np.random.default_rng(0)
B, D = 7, 3
A = RNG.normal(size=(B, D)).astype(np.float32)
BB = (0.6 * A + 0.8 * RNG.normal(size=(B, D))).astype(np.float32)
RAGGED = {"row_chunk_size": 3, "column_chunk_size": 2}  # 7 = 3+3+1 rows, 2+2+2+1 columns
NAMES = ("infonce", "nwj", "dv", "js")


# ----------------------------------------------------------------------------
# float64 references: TFP's formulas (and Poole et al.'s DV), over the last two axes.


def softplus(x):
  return np.logaddexp(0.0, x)


def tfp_info_nce(s):
  joint = np.mean(np.diagonal(s, axis1=-2, axis2=-1), axis=-1)
  marginal = np.mean(logsumexp(s, axis=-1), axis=-1) - np.log(s.shape[-1])
  return joint - marginal


def masked_logmeanexp(s, mask):
  masked = np.where(mask, s, -np.inf)
  return logsumexp(masked, axis=(-2, -1)) - np.log(np.sum(mask))


def tfp_nwj(s):
  joint = np.mean(np.diagonal(s, axis1=-2, axis2=-1), axis=-1)
  off = ~np.eye(s.shape[-2], s.shape[-1], dtype=bool)
  return joint - np.exp(masked_logmeanexp(s, off) - 1.0)


def tfp_js(s):
  diag = np.diagonal(s, axis1=-2, axis2=-1)
  joint_nll = -np.mean(softplus(-diag), axis=-1)
  n, m = s.shape[-2:]
  marginal_nll = (np.sum(softplus(s), axis=(-2, -1)) - np.sum(softplus(diag), axis=-1)) / (
    n * (m - 1.0)
  )
  return joint_nll - marginal_nll


def poole_dv(s):
  off = ~np.eye(s.shape[-1], dtype=bool)
  return np.mean(np.diagonal(s, axis1=-2, axis2=-1), axis=-1) - masked_logmeanexp(s, off)


REFS = {"infonce": tfp_info_nce, "nwj": tfp_nwj, "dv": poole_dv, "js": tfp_js}
MATRIX = {
  "infonce": lambda s, **kw: infonce_lower_bound(scores=s, **kw),
  "nwj": nwj_lower_bound,
  "dv": dv_lower_bound,
  "js": js_lower_bound,
}


def scores64(a, b, scale, bias):
  return scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64).T + bias


def numeric_grad(f, x, h=1e-6):
  x = np.array(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    up, dn = x.copy(), x.copy()
    up[i] += h
    dn[i] -= h
    g[i] = (f(up) - f(dn)) / (2 * h)
  return g


# ----------------------------------------------------------------------------
# The matrix forms.


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(5, 5), (2, 3, 4, 4)])
def test_matrix_form_matches_tfp(name, shape):
  s = RNG.normal(scale=2.0, size=shape)
  got = MATRIX[name](s.astype(np.float32))
  assert got.shape == shape[:-2] and got.dtype == jnp.float32
  np.testing.assert_allclose(got, REFS[name](s), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(MATRIX[name](s, base=2), REFS[name](s) / np.log(2), rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_matrix_form_under_x64_is_float64_and_exact(name):
  s = RNG.normal(scale=3.0, size=(6, 6))
  with jax.enable_x64(True):
    got = MATRIX[name](jnp.asarray(s))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, REFS[name](s), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_matrix_form_gradient(name):
  s = RNG.normal(size=(4, 4))
  got = jax.grad(MATRIX[name])(jnp.asarray(s, jnp.float32))
  np.testing.assert_allclose(got, numeric_grad(REFS[name], s), rtol=1e-4, atol=1e-5)


def test_infonce_scores_form_equals_the_loss_form():
  s = RNG.normal(size=(6, 6)).astype(np.float32)
  loss = np.mean(logsumexp(s.astype(np.float64), axis=1) - np.diag(s))
  # The bound is log K - L, a difference of two numbers near 2: in float32 each
  # form carries the rounding of L (a few ulps of 2, ~1e-7), which is more than
  # 1e-6 of a bound near 0.1. So the tolerance is in ulps of L.
  ulp = float(np.spacing(np.float32(abs(loss))))
  np.testing.assert_allclose(
    infonce_lower_bound(scores=s), infonce_lower_bound(loss, 6), rtol=1e-6, atol=4 * ulp
  )


def test_constant_critic():
  """S = c everywhere: InfoNCE 0, NWJ c - e^{c-1}, DV 0, JS -softplus(-c) - softplus(c)."""
  for c in (-3.0, 0.0, 2.5):
    s = np.full((5, 5), c, np.float32)
    want = {"infonce": 0.0, "nwj": c - np.exp(c - 1), "dv": 0.0}
    want["js"] = -softplus(-c) - softplus(c)
    for name in NAMES:
      np.testing.assert_allclose(MATRIX[name](s), want[name], atol=2e-6)


def test_batch_of_one():
  """No pair off the diagonal: InfoNCE log 1 - 0 = 0; the others NaN with a zero gradient."""
  s = jnp.asarray([[1.5]])
  assert float(infonce_lower_bound(scores=s)) == 0.0
  for name in ("nwj", "dv", "js"):
    assert np.isnan(MATRIX[name](s))
    assert float(jax.grad(MATRIX[name])(s)[0, 0]) == 0.0
  bounds = mutual_information_bounds(A[:1], BB[:1], scale=2.0)
  assert float(bounds.infonce) == 0.0 and all(np.isnan(bounds[1:]))


def test_minus_inf_scores():
  s = RNG.normal(size=(5, 5))
  s[0, 3] = s[2, 1] = -np.inf  # negatives of zero mass: finite, as the formulas give
  for name in NAMES:
    np.testing.assert_allclose(MATRIX[name](s.astype(np.float32)), REFS[name](s), rtol=1e-5)
  s[4, 4] = -np.inf  # a positive of zero mass: every bound is -inf
  for name in NAMES:
    assert MATRIX[name](s.astype(np.float32)) == -np.inf
  s[4, :] = -np.inf  # its whole row: the row's cross-entropy is still +inf, not NaN
  assert infonce_lower_bound(scores=s.astype(np.float32)) == -np.inf


def test_nan_row_gives_nan():
  s = RNG.normal(size=(5, 5)).astype(np.float32)
  s[2] = np.nan
  for name in NAMES:
    assert np.isnan(MATRIX[name](s))
  a = A.copy()
  a[2] = np.nan
  assert all(np.isnan(mutual_information_bounds(a, BB)))


def test_bad_scores():
  with pytest.raises(ValueError, match="square critic matrix"):
    nwj_lower_bound(np.zeros((3, 4), np.float32))
  with pytest.raises(ValueError, match="square critic matrix"):
    dv_lower_bound(np.zeros((3,), np.float32))
  with pytest.raises(TypeError, match="`scores`"):
    js_lower_bound(np.zeros((3, 3), np.int32))
  with pytest.raises(ValueError, match="not both"):
    infonce_lower_bound(1.0, 4, scores=np.zeros((4, 4), np.float32))
  with pytest.raises(ValueError, match="needs `loss` and `batch_size`"):
    infonce_lower_bound(1.0)


# ----------------------------------------------------------------------------
# infonce_lower_bound(loss, batch_size): its edges.


@pytest.mark.parametrize("batch_size", [0, -3, 0.5, float("nan"), np.array([4, 0]), jnp.asarray(0)])
def test_batch_size_below_one_is_an_error(batch_size):
  with pytest.raises(ValueError, match="`batch_size` must be >= 1"):
    infonce_lower_bound(1.0, batch_size)


def test_batch_size_must_be_a_number():
  with pytest.raises(TypeError, match="`batch_size`"):
    infonce_lower_bound(1.0, True)


def test_traced_batch_size_below_one_is_nan():
  got = jax.jit(lambda n: infonce_lower_bound(1.0, n))(jnp.asarray([4, 0, -2]))
  np.testing.assert_allclose(got[0], np.log(4) - 1.0, rtol=1e-6)
  assert np.all(np.isnan(got[1:]))


def test_integer_loss_is_a_number_of_nats():
  np.testing.assert_allclose(infonce_lower_bound(2, 16), np.log(16) - 2.0, rtol=1e-6)
  np.testing.assert_allclose(infonce_lower_bound(np.int64(0), 8, base=2), 3.0, rtol=1e-6)


def test_a_loss_above_log_b_gives_a_negative_vacuous_bound():
  assert float(infonce_lower_bound(np.log(8) + 0.5, 8)) == pytest.approx(-0.5, rel=1e-6)


# ----------------------------------------------------------------------------
# mutual_information_bounds: the matrix forms, from one sweep.


def bounds64(a, b, scale, bias):
  s = scores64(a, b, scale, bias)
  return {name: REFS[name](s) for name in NAMES}


@pytest.mark.parametrize("tiles", [{}, RAGGED])
def test_embeddings_equal_the_matrix_forms(tiles):
  for scale, bias in ((1.0, 0.0), (3.0, -2.0), (0.5, 4.0)):
    got = mutual_information_bounds(A, BB, scale=scale, bias=bias, **tiles)
    want = bounds64(A, BB, scale, bias)
    for name in NAMES:
      np.testing.assert_allclose(getattr(got, name), want[name], rtol=2e-5, atol=2e-5)
  got = mutual_information_bounds(A, BB, scale=2.0, base=2)
  want = bounds64(A, BB, 2.0, 0.0)
  for name in NAMES:
    np.testing.assert_allclose(getattr(got, name), want[name] / np.log(2), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", NAMES)
def test_embedding_gradients_in_a_b_scale_and_bias(name):
  """Value and gradients of each bound under jit, scale and bias traced."""
  plain = [A.astype(np.float64), BB.astype(np.float64), 2.0, -1.5]

  def f(a, b, s, c):
    return getattr(mutual_information_bounds(a, b, scale=s, bias=c, **RAGGED), name)

  args = (jnp.asarray(A), jnp.asarray(BB), jnp.float32(2.0), jnp.float32(-1.5))
  value, grads = jax.jit(jax.value_and_grad(f, (0, 1, 2, 3)))(*args)
  np.testing.assert_allclose(value, bounds64(*plain)[name], rtol=2e-5, atol=2e-5)
  for i, g in enumerate(grads):

    def along(x, i=i):
      return bounds64(*plain[:i], x, *plain[i + 1 :])[name]

    np.testing.assert_allclose(g, numeric_grad(along, plain[i]), rtol=1e-4, atol=1e-4)


def test_embeddings_under_x64():
  with jax.enable_x64(True):
    a, b = jnp.asarray(A, jnp.float64), jnp.asarray(BB, jnp.float64)
    got = mutual_information_bounds(a, b, scale=3.0, bias=0.5, **RAGGED)
    want = bounds64(A, BB, 3.0, 0.5)
    for name in NAMES:
      assert getattr(got, name).dtype == jnp.float64
      np.testing.assert_allclose(getattr(got, name), want[name], rtol=1e-10, atol=1e-10)


def test_embeddings_in_bfloat16_accumulate_in_float32():
  a, b = jnp.asarray(A, jnp.bfloat16), jnp.asarray(BB, jnp.bfloat16)
  got = mutual_information_bounds(a, b, scale=2.0)
  want = bounds64(np.asarray(a, np.float64), np.asarray(b, np.float64), 2.0, 0.0)
  for name in NAMES:
    assert getattr(got, name).dtype == jnp.float32
    np.testing.assert_allclose(getattr(got, name), want[name], rtol=1e-3, atol=1e-3)


def test_infonce_never_passes_log_b_at_scale_100():
  """Unit-norm, easily separated pairs at CLIP's largest scale, in float32, both forms."""
  for seed in range(4):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(96, 32))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = a + 0.01 * rng.normal(size=a.shape)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    a, b = a.astype(np.float32), b.astype(np.float32)
    ceiling = float(np.float32(np.log(96)))
    matrix = jax.jit(lambda a, b: infonce_lower_bound(scores=100.0 * a @ b.T))(a, b)
    sweep = mutual_information_bounds(a, b, scale=100.0, row_chunk_size=16, column_chunk_size=24)
    assert float(matrix) <= ceiling and float(sweep.infonce) <= ceiling


def test_temporary_memory_is_linear_in_the_batch():
  """value_and_grad of the sweep holds no [B, B] buffer: 2048 more rows add [rows, D] ones."""
  d = 32

  def temp(n):
    x, s = jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32)
    tiles = {"row_chunk_size": 256, "column_chunk_size": 256}

    def total(a, b, scale, bias):
      return sum(mutual_information_bounds(a, b, scale=scale, bias=bias, **tiles))

    f = jax.jit(jax.value_and_grad(total, (0, 1, 2, 3)))
    return f.lower(x, x, s, s).compile().memory_analysis().temp_size_in_bytes

  small, large = temp(2048), temp(4096)
  assert large < 4096 * 4096 * 4 / 16  # far below the [B, B] float32 scores
  assert large - small < 4 * 2048 * d * 4  # a quadratic program would add 48 MiB or more


def test_batches_past_int32_pair_counts_trace():
  """B (B - 1) overflows an int32 from B = 46,341: the pair count must stay a float."""
  s = jax.ShapeDtypeStruct((65536, 65536), jnp.float32)
  x = jax.ShapeDtypeStruct((65536, 8), jnp.float32)
  for name in ("nwj", "js"):
    assert jax.eval_shape(MATRIX[name], s).shape == ()
  assert jax.eval_shape(lambda a, b: mutual_information_bounds(a, b).js, x, x).shape == ()


def test_a_traced_scale_that_is_not_positive_gives_nan():
  f = jax.jit(lambda s: mutual_information_bounds(A, BB, scale=s))
  for scale in (0.0, -1.0, np.inf):
    assert all(np.isnan(f(jnp.float32(scale))))


def test_bad_embeddings():
  with pytest.raises(ValueError, match="same width D"):
    mutual_information_bounds(A, BB[:, :2])
  with pytest.raises(ValueError, match="same length"):
    mutual_information_bounds(A, BB[:5])
  with pytest.raises(ValueError, match="`scale` must be > 0"):
    mutual_information_bounds(A, BB, scale=0.0)
  with pytest.raises(ValueError, match="`bias` must be a scalar"):
    mutual_information_bounds(A, BB, bias=np.zeros(3, np.float32))


def test_xentjax_info_lists_the_bounds():
  for name in ("nwj_lower_bound", "dv_lower_bound", "js_lower_bound", "mutual_information_bounds"):
    assert name in xentjax.info.__all__
