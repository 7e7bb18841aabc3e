"""The package keeps small named steps: no function over 60 lines of code.

Lines of code are the lines of a function (its signature included) that hold
a token other than a comment or a string: docstrings, comments and blank
lines do not count.
"""

import ast
import io
import pathlib
import tokenize

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "xentjax"
LIMIT = 60


def code_lines(source: str) -> set[int]:
  lines = set()
  skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type not in skip and tok.type != tokenize.STRING:
      lines.update(range(tok.start[0], tok.end[0] + 1))
  return lines


def long_functions(source: str, limit: int = LIMIT) -> list[tuple[str, int]]:
  counted = code_lines(source)
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      n = sum(1 for line in range(node.lineno, node.end_lineno + 1) if line in counted)
      if n > limit:
        out.append((node.name, n))
  return out


def test_the_counter_counts_code_not_docstrings():
  body = "\n".join(f"  x{i} = {i}" for i in range(61))
  doc = '  """' + "\n".join("text" for _ in range(100)) + '"""\n'
  assert long_functions(f"def f():\n{doc}  # a comment\n\n{body}\n") == [("f", 62)]
  assert long_functions(f"def g():\n{doc}" + "\n".join(f"  y{i} = {i}" for i in range(59))) == []


def test_no_function_in_the_package_is_over_60_lines_of_code():
  found = {
    f"{path.name}:{name}": n
    for path in sorted(PACKAGE.rglob("*.py"))
    for name, n in long_functions(path.read_text())
  }
  assert found == {}, f"functions over {LIMIT} lines of code: {found}"


# The large-vocabulary engine (`xentjax/_vocab/`): one loop, kernels without loops.
VOCAB = PACKAGE / "_vocab"
FAMILY = [*sorted(VOCAB.rglob("*.py")), PACKAGE / "parallel.py"]


def calls(path: pathlib.Path, name: str) -> int:
  """How many times `path` calls or decorates with something named `name` (`a.b.name` too)."""
  n = 0
  for node in ast.walk(ast.parse(path.read_text())):
    if (isinstance(node, ast.Attribute) and node.attr == name) or (
      isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
    ):
      n += 1
  return n


def test_the_kernels_hold_no_loop_and_no_custom_vjp():
  kernels = sorted((VOCAB / "kernels").glob("*.py"))
  assert len(kernels) >= 3
  for path in kernels:
    for name in ("fori_loop", "while_loop", "scan", "fold", "custom_vjp", "custom_jvp", "cond"):
      assert calls(path, name) == 0, f"{path.name} calls {name}"


def test_the_engine_loops_once():
  found = {
    p.name: calls(p, "fori_loop") + calls(p, "while_loop") + calls(p, "scan") for p in FAMILY
  }
  # `tiles.fold` (static lengths) and `tiles.repeat` (lengths decided at run time).
  assert {k: v for k, v in found.items() if v} == {"tiles.py": 2}
  vjps = {p.name: calls(p, "custom_vjp") for p in FAMILY}
  # The engine's two strategies, and its sweep of logits given as they are (no loop).
  assert {k: v for k, v in vjps.items() if v} == {"engine.py": 3}


def is_module(dotted: str) -> bool:
  path = PACKAGE.parent.joinpath(*dotted.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_the_family_imports_no_underscored_name():
  # A private module (`from xentjax import _core`) is shared by its plain names.
  for path in FAMILY:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module != "__future__":
        private = [
          a.name
          for a in node.names
          if a.name.startswith("_") and not is_module(f"{node.module}.{a.name}")
        ]
        assert not private, f"{path.relative_to(PACKAGE)} imports {private} from {node.module}"
