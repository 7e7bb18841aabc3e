"""`xentjax.parallel` on a 2 x 4 (data x vocab) mesh of 8 simulated CPU devices.

The device count of the CPU backend is fixed when JAX starts, so the checks
run in one subprocess (`tests/_parallel_checks.py`, with
``--xla_force_host_platform_device_count=8``) that reports each named check;
every check compares values and gradients with the single-device kernel (or
optax on materialized logits), checks that gradients come back sharded like
their inputs, and inspects the compiled HLO for all-gathers of
vocabulary-sized arrays. `JAX_ENABLE_X64` is inherited, so both settings of
the suite cover it.
"""

import pytest
from _harness import shared_checks

import xentjax.parallel as par

CHECKS = [
  "recompute_mean_hlo",
  "recompute_sum_all_options",
  "recompute_none_cotangent",
  "store_mean_all_options_hlo",
  "auto_mesh_vd_layout",
  "auto_mesh_store_eager",
  "replicated_tokens",
  "padded_vocabulary",
  "sharded_logits_hlo",
  "single_device_api_on_explicitly_sharded_inputs",
  "hlo_checker_detects_vocab_gather",
  "weights_class_weights_bias_temperature",
  "token_stats_hlo",
  "sequence_logprobs",
  "argmax_ties_across_shards",
  "gradient_filtering",
  "errors",
  "ring_engine_matches_one_device",
  "stats_class_weighted_z_loss_denominator",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return shared_checks("_parallel_checks.py", tmp_path_factory)


@pytest.mark.parametrize("name", CHECKS)
def test_parallel_check(results, name):
  assert name in results, f"check {name!r} did not run; got {sorted(results)}"
  assert results[name] == "ok", results[name]


def test_every_check_is_listed(results):
  assert sorted(results) == sorted(CHECKS)


def test_mesh_errors_in_process():
  """Argument errors need no devices: a one-device mesh without the axes."""
  import jax
  import numpy as np

  mesh = jax.make_mesh((1,), ("batch",))
  x = np.zeros((2, 4), np.float32)
  w = np.zeros((4, 8), np.float32)
  y = np.zeros((2,), np.int32)
  with pytest.raises(ValueError, match=r"vocab_axis.*'vocab'.*'batch'"):
    par.linear_softmax_cross_entropy(x, w, y, mesh=mesh)
  with pytest.raises(ValueError, match=r"data_axis.*'data'"):
    par.linear_softmax_cross_entropy(x, w, y, mesh=mesh, vocab_axis="batch")
  with pytest.raises(TypeError, match="Mesh"):
    par.softmax_cross_entropy_with_integer_labels(x @ w, y, mesh="not a mesh")
