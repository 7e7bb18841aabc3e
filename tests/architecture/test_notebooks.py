"""The derivation notebooks run clean and are committed executed.

Each notebook asserts its key numbers in its own cells, so executing it is the
test: a failed assertion (or any other exception) in a cell raises
`CellExecutionError`. The notebooks are executed from fresh in-memory copies
(outputs cleared) in a new kernel whose working directory is a temporary
directory; the committed files are never rewritten. The kernel inherits this
process's environment, so `JAX_ENABLE_X64=1` on the pytest command line runs
the notebooks in 64-bit mode as well.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
import time

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
IDS = [path.stem for path in NOTEBOOKS]
SOURCES = sorted((NOTEBOOK_DIR / "_cells").glob("[0-9][0-9]_*.py"))

EXPECTED = [
  "01_information_and_entropy",
  "02_cross_entropy_and_kl",
  "03_softmax_and_logits",
  "04_gradients",
  "05_why_cross_entropy",
  "06_gradient_descent_with_optax",
  "07_large_vocabularies",
  "08_policy_gradients",
  "10_calibration",
  "11_contrastive_and_mutual_information",
  "12_cross_entropy_is_code_length",
]

# Inline math `$...$` or display math `$$...$$` containing at least one LaTeX command.
LATEX = re.compile(r"\$[^$]*\\[A-Za-z]+[^$]*\$")


def test_the_derivation_sequence_is_present():
  names = [path.stem for path in NOTEBOOKS]
  missing = [name for name in EXPECTED if name not in names]
  assert not missing, f"missing notebooks: {missing}"
  assert len(NOTEBOOKS) >= 6


def test_every_notebook_has_a_source_and_every_source_a_notebook():
  assert [path.stem for path in SOURCES] == IDS


@pytest.mark.parametrize("source", SOURCES, ids=[path.stem for path in SOURCES])
def test_committed_notebook_holds_the_cells_of_its_source(source):
  # notebooks/_build.py reads the percent-format source with jupytext; a source
  # edited without rebuilding its notebook fails here.
  expected = [(cell.cell_type, cell.source) for cell in jupytext.read(source).cells]
  nb = nbformat.read(NOTEBOOK_DIR / f"{source.stem}.ipynb", as_version=4)
  committed = [(cell.cell_type, cell.source) for cell in nb.cells]
  assert committed == expected, f"rebuild it: python notebooks/_build.py {source.stem[:2]}"
  assert nb.metadata["kernelspec"]["name"] == "python3"
  assert "jupytext" not in nb.metadata


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_notebook_is_executed_and_explained(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  markdown = [cell.source for cell in nb.cells if cell.cell_type == "markdown"]
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert markdown and markdown[0].lstrip().startswith("# "), "first cell should be a title"
  assert any(LATEX.search(source) for source in markdown), "no LaTeX in the markdown cells"
  assert code, "no code cells"
  # Committed with outputs: every code cell ran, in order, without an error output.
  counts = [cell.execution_count for cell in code]
  assert all(count is not None for count in counts), "notebook committed without executing"
  assert counts == sorted(counts), "cells were executed out of order"
  outputs = [out for cell in code for out in cell.outputs]
  assert outputs, "notebook committed without outputs"
  assert not [out for out in outputs if out.output_type == "error"]
  assert any(cell.source.count("assert") for cell in code), "notebook asserts nothing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes_from_a_clean_kernel(path, tmp_path, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      cell.outputs = []
      cell.execution_count = None
  # The kernel is a subprocess started from this environment: make sure it
  # imports the same xentjax as the suite, and runs the suite's interpreter.
  pythonpath = os.environ.get("PYTHONPATH")
  monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + pythonpath if pythonpath else ""))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # A last cell checks that the kernel really imported this checkout's xentjax.
  nb.cells.append(
    nbformat.v4.new_code_cell(
      "import os, xentjax\n"
      f"assert os.path.realpath(xentjax.__file__).startswith(os.path.realpath({str(ROOT)!r}))"
    )
  )
  client = NotebookClient(
    nb,
    timeout=120,
    kernel_name="python3",
    allow_errors=False,
    record_timing=False,
    resources={"metadata": {"path": str(tmp_path)}},
  )
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError on the first failing cell
  elapsed = time.perf_counter() - start
  print(f"{path.name}: {elapsed:.1f} s ({sys.executable})")
  assert all(cell.execution_count is not None for cell in nb.cells if cell.cell_type == "code")
