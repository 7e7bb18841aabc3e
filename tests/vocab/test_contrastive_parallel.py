"""The contrastive losses on a ring of 8 simulated CPU devices.

The device count of the CPU backend is fixed when JAX starts, so the checks
run in one subprocess (`tests/_contrastive_parallel_checks.py`) that reports
each named check: values and gradients equal the one-device result, the
compiled program has no all-gather, and per-device temporary memory grows
with B/n·D (and stays far below the all-gather layout's).
"""

import pytest
from _harness import shared_checks

CHECKS = [
  "clip_explicit_mesh",
  "clip_not_symmetric_masked_auto_mesh_eager",
  "clip_retrieval_accuracy",
  "sigmoid_ring_equals_store_and_recompute",
  "sigmoid_labels_none_reduction",
  "ntxent_ring",
  "mi_bounds_ring",
  "no_all_gather_in_hlo",
  "allgather_layout_is_the_same_loss",
  "per_device_memory_linear_in_local_batch",
  "errors",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return shared_checks("_contrastive_parallel_checks.py", tmp_path_factory, devices=8)


@pytest.mark.parametrize("name", CHECKS)
def test_ring_check(results, name):
  assert results.get(name) == "ok", results.get(name, "missing")


def test_every_check_is_listed(results):
  assert sorted(results) == sorted(CHECKS)
