"""Strict JAX for the suite, fast compiles, and the `slow` mark of the heavy end-to-end tests."""

import gc
import os
import signal
import subprocess
import sys
import threading

# The suite is compile-bound: thousands of small programs, each run once or
# twice. XLA's CPU backend spends most of a compile in LLVM's optimization
# passes, which change how fast a program runs and, in the last bits, how some
# sums are ordered (vectorized reductions), not what it computes (no
# fast-math at any level). Off, the quick suite takes about a third less
# time. Of what is left, XLA's MLIR fusion emitters take about 40%: with
# `--xla_cpu_use_fusion_emitters=false` the CPU backend emits each fusion
# through its LLVM IR elemental emitter instead (the same HLO, the same
# operations in the same float types; only code generation differs), and the
# vocabulary-engine tests compile in about half the time (measured:
# tests/vocab/test_distillation_options.py, 45 s -> 24 s of CPU time).
# A test that compares this process with a subprocess to the last bits
# must give it these flags (they are inherited unless a test replaces them). Set before any JAX backend starts (workers
# of pytest-xdist import this file first too); the subprocesses the tests
# start inherit it. XENTJAX_TEST_FULL_OPT=1 keeps XLA's defaults (`.ci/run`
# runs its 64-bit subset so, and the benchmarks always run so).
# XLA aborts the process on a flag it does not know, and flags come and go
# between jaxlib releases (jaxlib 0.12 has no `--xla_cpu_use_fusion_emitters`),
# so the flags are tried once in a subprocess, longest set first, and the
# choice is handed to pytest-xdist's workers in XENTJAX_TEST_XLA_FLAGS.
FAST_COMPILE_CHOICES = (
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  " --xla_cpu_use_fusion_emitters=false",
  "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
  "",
)


def _xla_starts_with(flags: str) -> bool:
  """Whether this jaxlib's CPU backend starts with ``flags`` added to XLA_FLAGS."""
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
  try:
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=300)
  except subprocess.TimeoutExpired:
    return False
  return done.returncode == 0


if os.environ.get("XENTJAX_TEST_FULL_OPT") != "1":
  if "XENTJAX_TEST_XLA_FLAGS" not in os.environ:
    os.environ["XENTJAX_TEST_XLA_FLAGS"] = next(
      f for f in FAST_COMPILE_CHOICES if not f or _xla_starts_with(f)
    )
  FAST_COMPILE = os.environ["XENTJAX_TEST_XLA_FLAGS"]
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402  (after XLA_FLAGS is set)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# `_*.py` files here are scripts that tests run in subprocesses, not test
# modules: importing them for doctest collection would run them (set their XLA
# flags, read their command line) in this process.
collect_ignore_glob = ["_*.py"]

# The heavy end-to-end tests, marked `slow` here in one list (a file, or a test of
# it with all its parameters): notebooks executed from a clean kernel, several
# processes joined by jax.distributed, the command-line demos that train models,
# the subprocesses with 8 simulated devices, a million-example evaluation and the
# documentation build. The README's quick command skips them (-m "not slow");
# CI (.ci/run) runs them with everything else.
SLOW = (
  "tests/architecture/test_notebooks.py::test_notebook_executes_from_a_clean_kernel",
  "tests/evaluation/test_evaluate_multiprocess.py",
  "tests/cli/test_cli_demo.py::test_default_demo",
  "tests/cli/test_cli_demo.py::test_compare",
  "tests/cli/test_cli_demo.py::test_other_loss_and_optimizer_without_plot",
  "tests/vocab/test_vocabulary_parallel.py::test_parallel_check",
  "tests/vocab/test_vocabulary_parallel.py::test_every_check_is_listed",
  "tests/evaluation/test_evaluate_multidevice.py::test_eight_simulated_devices_match_one_and_float64",
  "tests/vocab/test_distillation.py::test_parallel_checks",
  "tests/vocab/test_distillation.py::test_demo_distill_prints_the_comparison",
  "tests/evaluation/test_evaluate.py::test_exact_against_float64_on_a_million_examples_any_batch_size",
  "tests/architecture/test_docs.py::test_site_builds_and_documents_every_public_name",
  "tests/architecture/test_docs.py::test_every_page_renders_its_markdown_and_tex",
  "tests/architecture/test_docs.py::test_every_notebook_is_in_the_notebooks_table",
  "tests/architecture/test_docs.py::test_every_page_starts_in_a_valid_theme_mode",
  "tests/architecture/test_docs.py::test_display_math_fits_the_desktop_column",
  "tests/vocab/test_contrastive_parallel.py",
  "tests/vocab/test_mesh_modes.py",
  "tests/vocab/test_rowwise_adapter.py::test_two_data_shards_match_one_device",
  "tests/cli/test_cli_demo.py::test_contrastive_demo",
  "tests/cli/test_cli_demo.py::test_demo_distill_is_deterministic_and_float32_under_x64",
)


def is_slow(nodeid: str) -> bool:
  """Whether a test id (`tests/test_x.py::name[params]`) is in `SLOW`."""
  path, _, name = nodeid.partition("::")
  return path in SLOW or f"{path}::{name.split('[')[0]}" in SLOW


def pytest_collection_modifyitems(config, items):
  for item in items:
    if is_slow(item.nodeid):
      item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session):
  """A pytest-xdist worker's tests are done: free its compiled programs, then ignore SIGINT.

  When the controller ends the run, execnet gives each worker 5 s to finish and then
  the worker sends itself SIGINT. A worker of this suite holds thousands of compiled
  programs, and its last garbage collection (pytest collects once more when it
  unconfigures, to report unraisable exceptions) can outlast that on a loaded
  machine; the KeyboardInterrupt then surfaces in the first Python code the
  collection runs, hypothesis's gc callback, as a `PytestUnraisableExceptionWarning`
  (no test sends SIGINT). So the collection runs here, before the worker reports that
  it has finished, and what follows cannot be interrupted: a Ctrl-C still reaches the
  controller, which stops the run.
  """
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    return
  jax.clear_caches()
  gc.collect()
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _memory_maps() -> tuple[int, int] | None:
  """``(mappings of this process, the kernel's limit vm.max_map_count)``, or None off Linux."""
  try:
    with open("/proc/self/maps", "rb") as f:
      count = sum(1 for _ in f)
    with open("/proc/sys/vm/max_map_count") as f:
      return count, int(f.read())
  except (OSError, ValueError):
    return None


def pytest_runtest_teardown(item, nextitem):
  """After a test module: free the compiled programs when they hold a third of the map limit.

  Every program XLA compiles for the CPU keeps its machine code in memory
  mappings of its own (about three per program), and JAX keeps every program
  it compiled. A worker of this suite compiles thousands: about 160 new
  mappings a second, so in 7 minutes one process would pass Linux's limit of
  65,530 mappings (``vm.max_map_count``), after which the next compile's
  ``mmap`` fails and XLA crashes with a segmentation fault inside
  ``backend_compile_and_load`` (seen twice, in unrelated tests, late in a run).
  Clearing JAX's caches releases them (measured: 300 programs, 1,414 mappings
  before, 509 after). Checked once per module, so a module's own programs
  are never recompiled.
  """
  if nextitem is not None and nextitem.path == item.path:
    return
  maps = _memory_maps()
  if maps is not None and maps[0] > maps[1] // 3:
    jax.clear_caches()
    gc.collect()
