"""Strict JAX for the suite: implicit rank promotion is an error."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# `_*.py` files here are scripts that tests run in subprocesses, not test
# modules: importing them for doctest collection would run them (set their XLA
# flags, read their command line) in this process.
collect_ignore_glob = ["_*.py"]
