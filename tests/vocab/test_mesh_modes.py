"""Every `mesh=` entry point differentiated eagerly, under `jit` and under `jax.set_mesh`.

JAX's `jax.make_mesh` gives `Explicit` axes by default; `jax.grad` without
`jit` and outside a mesh context must work on such a mesh as on an `Auto`
one. The checks run in one subprocess with 8 simulated CPU devices
(`tests/_mesh_modes_checks.py`): for each entry point, each mesh (default
and `Auto` axes) and each mode (eager, `jit`, `set_mesh`), the value and
every gradient against the same function on one device.
"""

import itertools

import pytest
from _harness import shared_checks

ENTRY_POINTS = [
  "parallel_linear_softmax_cross_entropy",
  "parallel_linear_token_stats",
  "parallel_softmax_cross_entropy_with_integer_labels",
  "linear_distillation_loss",
  "linear_topk_distillation_loss",
  "contrastive_loss_learned_log_scale",
  "sigmoid_contrastive_loss_learned_log_scale_and_bias",
  "ntxent_learned_temperature",
  "mutual_information_bounds_learned_log_scale_and_bias",
]
CHECKS = [
  *(
    f"{name}/{mesh}/{mode}"
    for name, mesh, mode in itertools.product(
      ENTRY_POINTS, ("explicit", "auto"), ("eager", "jit", "set_mesh")
    )
  ),
  "eager_result_mixes_with_plain_arrays",
  "explicitly_placed_inputs_keep_their_types",
  "explicitly_placed_inputs_eager_gradient_works_or_says_set_mesh",
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  return shared_checks("_mesh_modes_checks.py", tmp_path_factory, devices=8)


@pytest.mark.parametrize("name", CHECKS)
def test_mesh_mode(results, name):
  assert results.get(name) == "ok", results.get(name, "missing")


def test_every_check_is_listed(results):
  assert sorted(results) == sorted(CHECKS)
