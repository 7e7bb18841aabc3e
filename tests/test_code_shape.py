"""The package keeps small named steps: no function over 60 lines of code.

Lines of code are the lines of a function (its signature included) that hold
a token other than a comment or a string: docstrings, comments and blank
lines do not count (issue 8's rule).
"""

import ast
import io
import pathlib
import tokenize

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "xentjax"
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
