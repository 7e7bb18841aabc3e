"""Every Python example of the README and the documentation pages runs, and prints what it says.

The convention, for README.md and docs/*.md:

- Each fenced ```` ```python ```` block runs. The blocks of one file run in order in
  one namespace (a page is read top to bottom), with the README sections that a page
  includes (MyST ``{include}`` between ``<!-- docs:NAME -->`` markers) in their place.
- A line ending in ``# -> TEXT`` states what that statement prints: its standard
  output (a ``print``), or ``str()`` of a bare expression's value, must equal TEXT
  (trailing spaces aside). Round in the example (``.round(4)``, ``f"{x:.4f}"``) so
  that TEXT is what a reader gets, in float32 and with ``JAX_ENABLE_X64=1`` alike.
- A block written as a session (lines starting with ``>>> ``) is run by `doctest`
  in the same namespace, its output checked as doctest does.
- A block that cannot run here (a GPU, a cluster, files the reader has) says so on
  the line before its fence: ``<!-- example: not run: REASON -->``. Few may: see
  `MAX_NOT_RUN`. Shell (```` ```bash ````) and output (```` ```text ````) blocks are
  not Python and are not run.
"""

from __future__ import annotations

import ast
import contextlib
import doctest
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_NOT_RUN = 2
NOT_RUN = re.compile(r"<!--\s*example:\s*not run:\s*(.+?)\s*-->")
EXPECT = re.compile(r"#\s*->\s?(.*)$")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`]*)[^\n]*$")
INCLUDE = re.compile(
  r"^```\{include\}\s+(?P<path>\S+)\s*\n"
  r":start-after:\s*(?P<start>.+?)\s*\n"
  r":end-before:\s*(?P<end>.+?)\s*\n```\s*$",
  re.MULTILINE,
)


@dataclass
class Block:
  source: str
  line: int  # 1-based line of the fence in the (expanded) page
  not_run: str | None


def expand_includes(text: str, base: Path) -> str:
  """The page with each MyST `{include}` of a README section replaced by that section."""

  def section(m: re.Match) -> str:
    included = (base / m["path"]).read_text()
    start = included.index(m["start"]) + len(m["start"])
    return included[start : included.index(m["end"], start)]

  return INCLUDE.sub(section, text)


def python_blocks(text: str) -> list[Block]:
  """The fenced Python blocks of a Markdown text, with their not-run marks."""
  lines = text.splitlines()
  blocks, i = [], 0
  while i < len(lines):
    m = FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    fence, body, j = m["fence"], [], i + 1
    while j < len(lines) and not lines[j].strip().startswith(fence):
      body.append(lines[j][len(m["indent"]) :])
      j += 1
    if m["info"] in ("python", "py", "pycon"):
      before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
      mark = NOT_RUN.search(before)
      blocks.append(Block("\n".join(body) + "\n", i + 1, mark and mark[1]))
    i = j + 1
  return blocks


def run_block(block: Block, namespace: dict, where: str) -> None:
  """Run one block statement by statement, checking every `# -> TEXT`."""
  if re.search(r"^>>> ", block.source, re.MULTILINE):
    test = doctest.DocTestParser().get_doctest(block.source, namespace, where, where, block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    runner.run(test, out=report.write, clear_globs=False)
    assert not runner.failures, report.getvalue()
    return
  lines = block.source.splitlines()
  for node in ast.parse(block.source).body:
    expected = [EXPECT.search(lines[n - 1]) for n in range(node.lineno, node.end_lineno + 1)]
    expected = [m[1].rstrip() for m in expected if m]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      if isinstance(node, ast.Expr):
        value = eval(compile(ast.Expression(node.value), where, "eval"), namespace)
        if value is not None and expected:
          print(value)
      else:
        exec(compile(ast.Module([node], []), where, "exec"), namespace)
    if expected:
      got = "\n".join(line.rstrip() for line in printed.getvalue().rstrip("\n").splitlines())
      line = block.line + node.end_lineno
      assert got == expected[-1], (
        f"{where}, line {line}: prints {got!r}, the page says {expected[-1]!r}"
      )


def page_blocks(page: Path) -> list[Block]:
  return python_blocks(expand_includes(page.read_text(), page.parent))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_example_runs_and_prints_what_it_says(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
  namespace = {"__name__": "__example__"}
  printing = np.get_printoptions()  # an example may set them (jnp.set_printoptions)
  try:
    for block in page_blocks(page):
      if block.not_run is None:
        run_block(block, namespace, f"{page.relative_to(ROOT)}:{block.line}")
  finally:
    np.set_printoptions(**printing)  # the doctests run later in this process print as usual


def test_the_examples_are_found_and_few_are_not_run():
  blocks = {p.name: page_blocks(p) for p in PAGES}
  assert len(blocks["README.md"]) >= 8, "the README's tour blocks were not found"
  checked = sum(b.source.count("# ->") for bs in blocks.values() for b in bs)
  assert checked >= 20, f"only {checked} printed values are checked"
  not_run = [(name, b.line, b.not_run) for name, bs in blocks.items() for b in bs if b.not_run]
  assert len(not_run) <= MAX_NOT_RUN, f"too many examples marked not run: {not_run}"


def test_the_checker_catches_a_wrong_value_and_a_failing_block():
  # The checker itself: a stale `# ->`, a raising block and a failing session all fail.
  wrong = Block("x = 2\nprint(x + 1)  # -> 4\n", 1, None)
  with pytest.raises(AssertionError, match="prints '3', the page says '4'"):
    run_block(wrong, {}, "wrong")
  bare = Block("[1.5, 2]  # -> [1.5, 2]\n", 1, None)
  run_block(bare, {}, "bare")  # a bare expression is checked by its str()
  with pytest.raises(ZeroDivisionError):
    run_block(Block("1 / 0\n", 1, None), {}, "raises")
  with pytest.raises(AssertionError, match="Expected"):
    run_block(Block(">>> 1 + 1\n3\n", 1, None), {}, "session")
  text = "a\n<!-- example: not run: needs a GPU -->\n```python\nimport nothing\n```\n"
  (block,) = python_blocks(text)
  assert block.not_run == "needs a GPU" and block.source == "import nothing\n"


def test_includes_are_expanded():
  page = ROOT / "docs" / "getting_started.md"
  text = expand_includes(page.read_text(), page.parent)
  assert "{include}" not in text and "import xentjax as L" in text
