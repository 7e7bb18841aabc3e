"""Writes the derivation notebooks and executes them so they are committed with outputs.

Usage (from the repository root):

    PYTHONPATH=. .venv/bin/python notebooks/_build.py            # all notebooks
    PYTHONPATH=. .venv/bin/python notebooks/_build.py 03 04      # some of them
    PYTHONPATH=. .venv/bin/python notebooks/_build.py --no-execute

The cell sources live in `notebooks/_cells/NN_*.py` in jupytext's "percent"
format: `# %% [markdown]` and `# %%` lines separate markdown and code cells, so
the derivations can be edited and diffed as text, and an IPython magic is
written commented out (`# %matplotlib inline`) so the sources stay valid
Python. jupytext reads them; the notebooks keep only the kernelspec as
metadata (jupytext's own bookkeeping is dropped) and stable cell ids, so a
rebuild does not churn the diff. Every notebook is executed by nbclient from a
clean kernel with `notebooks/` as the working directory; the outputs (printed
numbers and PNG plots) are stored in the .ipynb so the notebooks read well on a
code host. The test suite (`tests/architecture/test_notebooks.py`) checks that
each .ipynb holds the cells of its source, re-executes fresh copies and never
writes here.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CELLS = HERE / "_cells"

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def read_cells(source: pathlib.Path) -> list:
  """The notebook cells of a percent-format source, without jupytext's metadata."""
  cells = jupytext.read(source, fmt="py:percent").cells
  for cell in cells:
    # jupytext records how to write the text back (blank lines between cells);
    # the notebook does not need it.
    cell.metadata.pop("lines_to_next_cell", None)
  return cells


def build(source: pathlib.Path, execute: bool = True) -> float:
  nb = nbformat.v4.new_notebook()
  nb.metadata["kernelspec"] = KERNELSPEC
  nb.metadata["language_info"] = {"name": "python"}
  nb.cells = read_cells(source)
  for i, cell in enumerate(nb.cells):  # stable ids: rebuilding does not churn the diff
    cell.id = f"c{i:02d}"
  target = HERE / (source.stem + ".ipynb")
  elapsed = 0.0
  if execute:
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + env_path if env_path else "")
    start = time.perf_counter()
    NotebookClient(
      nb,
      timeout=120,
      kernel_name="python3",
      record_timing=False,
      coalesce_streams=True,
      resources={"metadata": {"path": str(HERE)}},
    ).execute()
    elapsed = time.perf_counter() - start
  nbformat.validate(nb)
  nbformat.write(nb, target)
  return elapsed


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("only", nargs="*", help="notebook number prefixes, e.g. 01 04")
  parser.add_argument("--no-execute", action="store_true")
  args = parser.parse_args(argv)
  sources = sorted(CELLS.glob("[0-9][0-9]_*.py"))
  if args.only:
    sources = [s for s in sources if any(s.name.startswith(p) for p in args.only)]
  for source in sources:
    elapsed = build(source, execute=not args.no_execute)
    print(f"{source.stem}.ipynb  {elapsed:6.1f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
