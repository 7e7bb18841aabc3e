"""Strict JAX for the suite: implicit rank promotion is an error."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# Not a test module: a script the parallel tests run in a subprocess (importing
# it for doctest collection would set its XLA flags in this process).
collect_ignore = ["_parallel_checks.py"]
