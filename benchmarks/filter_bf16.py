"""Gradient error of `filter_eps` with bfloat16 inputs, beside bfloat16's own rounding.

Usage: ``PYTHONPATH=. python benchmarks/filter_bf16.py`` (about a minute on CPU).

On the language-model-like logits of `benchmarks/token_stats.py` (N=1024,
D=256, V=8192), prints the relative L2 error of the gradients (x, w, bias) of
`linear_softmax_cross_entropy` with `filter_eps` and bfloat16 inputs against
the same call without filtering (the error filtering adds), and both against
the exact float32 gradient (the error bfloat16 itself brings).
"""

import math
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import token_stats as T

import xentjax

N, D, V = 1024, 256, 8192


def main():
  for name, alpha, beta in T.SETTINGS:
    x, w, b, y = T.lm_like(N, D, V, alpha, beta)

    def grads(dtype, eps, x=x, w=w, b=b, y=y):
      def loss(x, w, b):
        return xentjax.linear_softmax_cross_entropy(x, w, y, bias=b, filter_eps=eps)

      args = (x.astype(dtype), w.astype(dtype), b.astype(dtype))
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)

    exact = grads(jnp.float32, None)
    unfiltered = grads(jnp.bfloat16, None)
    up = [g.astype(jnp.float32) for g in unfiltered]
    print(f"{name}: unfiltered bf16 vs exact float32: {T.rel_error(unfiltered, exact):.1e}")
    for eps in (2.0**-12, 2.0**-8):
      f = grads(jnp.bfloat16, eps)
      print(
        f"{name}: filter_eps=2^{round(math.log2(eps))}, bf16: vs unfiltered bf16 "
        f"{T.rel_error(f, up):.1e}, vs exact float32 {T.rel_error(f, exact):.1e}"
      )


if __name__ == "__main__":
  main()
