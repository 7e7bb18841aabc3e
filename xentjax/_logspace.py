"""Logarithms of probabilities that survive XLA's flush of subnormals to zero.

XLA on CPU (and most accelerators) flushes subnormal floats to zero, on input
and on output: in float32 ``jnp.log(jnp.float32(1e-45))`` is ``-inf``, and so
is ``1e-38 == 0``. A probability that small is rare but real (``softmax`` of a
logit 87 below the maximum, ``1e-45`` typed by a user), and a cross-entropy
against it must be ``103.28`` nats, not ``+inf``.

`log_prob` reads a subnormal's value from its bits (``mantissa * 2**(emin -
nmant)``, exact) instead of through the floating-point unit, so it is correct
whatever the flush mode. Everything else stays in log space (`log_add`), where
no probability is ever formed from its logarithm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


@jax.custom_jvp
def log_prob(q: jax.Array) -> jax.Array:
  """``log(q)`` for ``q >= 0``, exact for subnormal ``q`` (``log 0 = -inf``).

  The derivative is ``1 / q`` formed as ``exp(-log q)`` (finite for every
  normal ``q``, and for subnormals down to ``1 / finfo.max``).
  """
  q = jnp.asarray(q)
  fi = jnp.finfo(q.dtype)
  if fi.bits not in (32, 64):  # 16-bit floats are computed in float32 by the callers
    return jnp.log(q)
  bits = lax.bitcast_convert_type(q, _UINT[q.dtype.itemsize])
  nmant = int(fi.nmant)
  mant = bits & np.array((1 << nmant) - 1, bits.dtype)
  top = bits >> np.array(nmant, bits.dtype)  # sign and exponent fields
  sub = (top == 0) & (mant != 0)  # positive subnormal
  neg_sub = (top == np.array(1 << int(fi.nexp), bits.dtype)) & (mant != 0)
  scale = float((int(fi.minexp) - nmant) * np.log(2.0))
  log_sub = jnp.log(jnp.where(sub, mant, 1).astype(q.dtype)) + jnp.asarray(scale, q.dtype)
  out = jnp.where(sub, log_sub, jnp.log(q))
  return jnp.where(neg_sub, jnp.nan, out)  # a negative probability is NaN, tiny or not


@log_prob.defjvp
def _log_prob_jvp(primals, tangents):
  (q,), (dq,) = primals, tangents
  out = log_prob(q)
  return out, dq * jnp.exp(-out)


def log_add(a: jax.Array, b: jax.Array) -> jax.Array:
  """``log(e^a + e^b)`` with a finite gradient when one (or both) is ``-inf``."""
  m = lax.stop_gradient(jnp.maximum(a, b))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  s = jnp.exp(a - m) + jnp.exp(b - m)
  empty = s == 0
  return jnp.where(empty, -jnp.inf, jnp.log(jnp.where(empty, 1.0, s)) + m)


def astype_exact(x: jax.Array, dtype) -> jax.Array:
  """``x.astype(dtype)``, keeping float32 subnormals when widening to float64.

  XLA's float32 -> float64 conversion flushes a subnormal input to 0 (the
  float64 result would be a normal number); here its value is rebuilt from
  its bits, ``mantissa * 2**-149``, which is exact in float64.
  """
  x = jnp.asarray(x)
  dtype = jnp.dtype(dtype)
  if x.dtype != jnp.float32 or dtype != jnp.float64:
    return x.astype(dtype)
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  mant = bits & np.uint32((1 << 23) - 1)
  top = bits >> np.uint32(23)
  sub = ((top == 0) | (top == np.uint32(256))) & (mant != 0)  # subnormal, either sign
  sign = jnp.where(top == 0, 1.0, -1.0).astype(dtype)
  value = sign * mant.astype(dtype) * jnp.asarray(2.0**-149, dtype)
  return jnp.where(sub, value, x.astype(dtype))
