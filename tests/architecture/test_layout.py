"""The package's layout: wings, no import cycle, no private import from outside.

* **Wings.** The tree is the table of contents: the dense losses live in
  `xentjax/losses/`, the command line in `xentjax/cli/`, streaming evaluation in
  `xentjax/evaluation/`, the worked examples in `xentjax/demos/` and the
  vocabulary engine in `xentjax/_vocab/`; at most 20 modules sit directly in
  `xentjax/`.
* **No import cycle** among the package's modules. Imports under
  ``if TYPE_CHECKING:`` do not run, and `xentjax/__init__.py` imports its names
  lazily (PEP 562), so neither counts as an edge.
* **No private import from outside the package**: the notebooks, the benchmarks,
  the documentation and the README use public names only (``xentjax._x`` or
  ``xentjax.wing._x`` is for the package's own modules and its tests), but for
  two benchmarks that time internals, listed with their reasons in `ALLOWED`.

Each rule is a function of the source, with a test that feeds it a known violation.
"""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "xentjax"
WINGS = ("losses", "cli", "evaluation", "demos", "_vocab")
MAX_TOP_LEVEL_MODULES = 20


# ---------------------------------------------------------------------------
# Wings.
# ---------------------------------------------------------------------------


def layout_problems(package: pathlib.Path) -> list[str]:
  """What breaks the wings rule in ``package``: too many top-level modules, a missing wing."""
  problems = []
  top = sorted(p.name for p in package.glob("*.py"))
  if len(top) > MAX_TOP_LEVEL_MODULES:
    problems.append(f"{len(top)} modules directly in {package.name}/: {top}")
  for wing in WINGS:
    if not (package / wing / "__init__.py").is_file():
      problems.append(f"no wing {package.name}/{wing}/")
  return problems


def test_the_layout_check_finds_a_flat_package(tmp_path):
  for i in range(MAX_TOP_LEVEL_MODULES + 1):
    (tmp_path / f"_m{i}.py").write_text("")
  for wing in WINGS[1:]:
    (tmp_path / wing).mkdir()
    (tmp_path / wing / "__init__.py").write_text("")
  problems = layout_problems(tmp_path)
  assert len(problems) == 2
  assert "21 modules directly" in problems[0]
  assert problems[1].endswith("/losses/")


def test_the_package_is_in_wings():
  assert layout_problems(PACKAGE) == []


# ---------------------------------------------------------------------------
# No import cycle.
# ---------------------------------------------------------------------------


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(sources: dict[str, tuple[bool, str]]) -> dict[str, set[str]]:
  """Module -> the package modules it imports, from ``{name: (is_package, source)}``.

  Every import counts, at module level or inside a function (a lazy import is
  still a dependency), except those under ``if TYPE_CHECKING:``; the root
  package's own imports do not count (it loads its names on first use).
  """
  graph = {}
  for name, (is_package, source) in sources.items():
    tree = ast.parse(source)
    for node in ast.walk(tree):
      if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        node.body = []
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        found |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
          base = ".".join(parts + ([node.module] if node.module else []))
        for a in node.names:
          full = f"{base}.{a.name}"
          found.add(full if full in sources else base)
    root = "." not in name
    graph[name] = set() if root else {m for m in found if m in sources and m != name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_cycle_check_finds_a_lazy_cycle():
  sources = {
    "pkg": (True, "from pkg import _exports\n"),
    "pkg.cli": (True, ""),
    "pkg.cli.main": (False, "from pkg.cli import evaluate\n"),
    "pkg.cli.evaluate": (False, "def f():\n  from pkg.cli.main import g\n"),
    "pkg.typed": (
      False,
      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  import pkg.cli.main\n",
    ),
    "pkg._exports": (False, "import pkg.typed\n"),
  }
  assert cycles(import_graph(sources)) == [["pkg.cli.evaluate", "pkg.cli.main"]]
  sources["pkg.cli.evaluate"] = (False, "from . import helpers\n")
  assert cycles(import_graph(sources)) == []


def test_the_package_has_no_import_cycle():
  sources = {
    _module_name(p, ROOT): (p.name == "__init__.py", p.read_text())
    for p in sorted(PACKAGE.rglob("*.py"))
  }
  graph = import_graph(sources)
  assert graph["xentjax.cli._main"], "the scan reads the command line's imports"
  assert cycles(graph) == []


# ---------------------------------------------------------------------------
# No private import from outside the package.
# ---------------------------------------------------------------------------

_PRIVATE = re.compile(
  r"(?:from\s+(xentjax(?:\.\w+)*)\s+import\s+([\w ,()]+))|(?:import\s+(xentjax(?:\.\w+)+))"
)


def private_imports(text: str) -> list[str]:
  """The imports of a private xentjax module or name in ``text`` (code or Markdown)."""
  found = []
  for match in _PRIVATE.finditer(text):
    module = match.group(1) or match.group(3)
    names = [n.split(" as ")[0].strip(" ()") for n in (match.group(2) or "").split(",")]
    parts = module.split(".")[1:] + [n for n in names if n]
    if any(p.startswith("_") and not p.startswith("__") for p in parts):
      found.append(match.group(0).strip())
  return found


def test_the_private_import_check_finds_each_form():
  text = """
from xentjax import _demo_distill
from xentjax._vocab import tiles
import xentjax.evaluation._stream as S
from xentjax.losses import softmax_cross_entropy, _dense
from xentjax import info, metrics
import xentjax.demos.contrastive as demo
print(xentjax.__version__)
"""
  assert private_imports(text) == [
    "from xentjax import _demo_distill",
    "from xentjax._vocab import tiles",
    "import xentjax.evaluation._stream",
    "from xentjax.losses import softmax_cross_entropy, _dense",
  ]


def _outside_sources() -> dict[str, str]:
  paths = [
    *sorted((ROOT / "notebooks").glob("_cells/*.py")),
    *sorted((ROOT / "notebooks").glob("*.ipynb")),
    *sorted((ROOT / "benchmarks").rglob("*.py")),
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "README.md",
  ]
  return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


# The exceptions: the benchmarks' harness reads the engine's automatic filter tile,
# so that the tables that count skippable tiles follow the engine instead of a copy;
# and benchmarks/evaluate_step.py times `evaluate`'s compiled step itself (called
# directly, and recompiled without its compile options), which no public name exposes.
ALLOWED = {
  "benchmarks/_common.py": ["from xentjax._vocab import tiles"],
  "benchmarks/evaluate_step.py": ["from xentjax.evaluation import _stream"],
}


def test_nothing_outside_the_package_imports_a_private_module():
  sources = _outside_sources()
  assert any(k.startswith("benchmarks/") for k in sources) and "README.md" in sources
  found = {name: hits for name, text in sources.items() if (hits := private_imports(text))}
  for name, hits in ALLOWED.items():
    if found.get(name) == hits:
      del found[name]
  assert found == {}
