"""Sphinx extension for xentjax's site: API pages, CLI help and the notebooks' table.

Read from the package and the notebooks themselves, so the site cannot go stale:

- `builder-inited`: writes one API page per public module into `docs/api/`
  (generated, git-ignored): the module docstring, an autosummary table of its
  public names and one autodoc entry per name. The public modules are `xentjax`
  and every non-underscore submodule (found on disk and among the package's
  attributes); a module's public names are its `__all__` when it has one, else
  its non-underscore attributes that it defines (functions, classes, constants),
  not the ones it imports.
- the `xentjax-cli-help` directive: the `--help` text of `xentjax` or one of its
  subcommands, formatted by the real argparse parser.
- the `xentjax-notebooks` directive: the notebooks page's table, one row per
  notebook found in ``notebooks/``.
- `doctree-resolved`: a warning (an error under ``-W``) for prose that shows
  Markdown or TeX as text (a pipe table, ``$...$``) instead of rendering it.
- MathJax 3 served from the site itself (`_static/mathjax/`), copied from the
  files that the `sphinx-mathjax-offline` package ships, so the math renders
  with no network at view time. (That package's own Sphinx hook does the same
  copy but does not declare itself parallel-safe, which would force `-j auto`
  into a serial read; so conf.py does not load it as an extension.)
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import shutil
import textwrap
import types
from pathlib import Path
from typing import ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.pycode import ModuleAnalyzer, PycodeError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

PACKAGE = "xentjax"
logger = logging.getLogger(__name__)
# Values of these types count as public constants of a module without `__all__`
# (typing aliases such as `Params = dict[str, jax.Array]` do not).
_CONSTANT_TYPES = (bool, int, float, complex, str, bytes, tuple, frozenset)


# --- discovery -----------------------------------------------------------------


def public_modules() -> list[str]:
  """`xentjax` and its public submodules (recursively), sorted, the package first."""
  found = {PACKAGE}
  todo = [importlib.import_module(PACKAGE)]
  while todo:
    module = todo.pop()
    names = set()
    if hasattr(module, "__path__"):
      names |= {m.name for m in pkgutil.iter_modules(module.__path__)}
    names |= {
      n
      for n, v in vars(module).items()
      if isinstance(v, types.ModuleType) and v.__name__ == f"{module.__name__}.{n}"
    }
    for name in sorted(names):
      full = f"{module.__name__}.{name}"
      if name.startswith("_") or full in found:
        continue
      found.add(full)
      todo.append(importlib.import_module(full))
  return [PACKAGE, *sorted(found - {PACKAGE})]


def public_names(module: types.ModuleType) -> list[str]:
  """The names a module documents: `__all__`, else what it defines without an underscore."""
  if hasattr(module, "__all__"):
    return [n for n in module.__all__ if not isinstance(getattr(module, n), types.ModuleType)]
  is_package = hasattr(module, "__path__")
  names = []
  for name, value in vars(module).items():
    if name.startswith("_") or isinstance(value, types.ModuleType):
      continue
    owner = getattr(value, "__module__", None)
    if callable(value) and isinstance(owner, str):
      # A package re-exports from its private modules; a module documents what it defines.
      defined_here = owner == module.__name__
      reexported = is_package and owner.startswith(f"{module.__name__}._")
      if defined_here or reexported:
        names.append(name)
    elif isinstance(value, _CONSTANT_TYPES) and not callable(value):
      names.append(name)
  return names


def _kind(value) -> str:
  if inspect.isclass(value):
    return "class"
  if isinstance(value, (types.GenericAlias, types.UnionType)):
    return "data"  # a type alias (`LossFn = Callable[...]`) is documented as data, not called
  if callable(value):
    return "function"
  return "data"


def _origin_title(value) -> str:
  """Section title for a re-exported name: the first line of its defining module's docstring."""
  owner = importlib.import_module(getattr(value, "__module__", PACKAGE))
  doc = (owner.__doc__ or owner.__name__).strip().splitlines()[0].strip()
  return doc.rstrip(".")


# --- page generation -----------------------------------------------------------


def _heading(text: str, char: str) -> list[str]:
  return [text, char * len(text), ""]


def _constant_doc(modname: str, name: str) -> list[str]:
  """The `#:` comment above a module-level constant, if the source has one."""
  try:
    docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
  except PycodeError:
    return []
  return [line for line in docs.get(("", name), []) if line.strip()]


def _entries(modname: str, names: list[str], module) -> list[str]:
  """An autosummary table, then one autodoc entry per name.

  Constants are written as `py:data` with their value (autodoc would show the
  docstring of their type, e.g. `int`'s) and the `#:` comment when there is one.
  """
  kinds = {n: _kind(getattr(module, n)) for n in names}
  code = [n for n in names if kinds[n] != "data"]
  lines = []
  if code:
    lines += [".. autosummary::", "   :nosignatures:", ""]
    lines += [f"   {n}" for n in code]
    lines.append("")
  for name in names:
    kind = kinds[name]
    if kind == "data":
      lines.append(f".. py:data:: {name}")
      value = repr(getattr(module, name))
      value = re.sub(r"jax\.[\w.]*\.Array\b", "jax.Array", value)  # the public name of the type
      lines.append(f"   :value: {value}")
      lines.append("")
      lines += [f"   {line}" for line in _constant_doc(modname, name)]
    else:
      lines.append(f".. auto{kind}:: {modname}.{name}")
      if kind == "class":
        lines.append("   :members:")
    lines.append("")
  return lines


def render_module_page(modname: str, submodules: list[str]) -> str:
  """The RST source of one module's API page."""
  module = importlib.import_module(modname)
  names = public_names(module)
  lines = _heading(f"``{modname}``", "=")
  lines += [f".. automodule:: {modname}", "", f".. currentmodule:: {modname}", ""]
  children = [m for m in submodules if m.rpartition(".")[0] == modname]
  if children:
    lines += ["Public submodules, each on its own page:", ""]
    lines += [f"- :doc:`{m}`" for m in children]
    lines.append("")
  if modname == PACKAGE:
    # The package re-exports from its private modules: one section per topic, in the
    # order of `__init__.py` (first appearance), titled by the topic module's docstring.
    sections: dict[str, list[str]] = {}
    for name in names:
      sections.setdefault(_origin_title(getattr(module, name)), []).append(name)
    for title, group in sections.items():
      lines += _heading(title, "-")
      lines += _entries(modname, group, module)
  else:
    lines += _heading("Public names", "-")
    lines += _entries(modname, names, module)
  return "\n".join(lines).rstrip() + "\n"


def render_index(modules: list[str]) -> str:
  lines = _heading("API reference", "=")
  lines += [
    "One page per public module, generated from the package at build time: every name",
    "in a module's ``__all__`` (or, without one, every public name it defines) is listed",
    "and documented from its docstring.",
    "",
    ".. autosummary::",
    "",
  ]
  lines += [f"   {m}" for m in modules]
  lines += ["", ".. toctree::", "   :hidden:", ""]
  lines += [f"   {m}" for m in modules]
  return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
  if not path.exists() or path.read_text() != text:
    path.write_text(text)


def generate_api_pages(app) -> None:
  out = Path(app.srcdir) / "api"
  out.mkdir(exist_ok=True)
  modules = public_modules()
  wanted = {f"{m}.rst" for m in modules} | {"index.rst"}
  for stale in out.glob("*.rst"):
    if stale.name not in wanted:
      stale.unlink()
  _write_if_changed(out / "index.rst", render_index(modules))
  for modname in modules:
    _write_if_changed(out / f"{modname}.rst", render_module_page(modname, modules))


# --- CLI help ------------------------------------------------------------------


def _find_parser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
  for word in path:
    subactions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    choices = {k: v for a in subactions for k, v in a.choices.items()}
    if word not in choices:
      raise ValueError(
        f"`xentjax {' '.join(path)}`: no subcommand {word!r} (have {sorted(choices)})"
      )
    parser = choices[word]
  return parser


@contextlib.contextmanager
def _columns(width: int):
  old = os.environ.get("COLUMNS")
  os.environ["COLUMNS"] = str(width)
  try:
    yield
  finally:
    if old is None:
      del os.environ["COLUMNS"]
    else:
      os.environ["COLUMNS"] = old


class CliHelp(SphinxDirective):
  """``.. xentjax-cli-help:: [SUBCOMMAND ...]``: the `--help` of that command, as text."""

  optional_arguments = 8
  option_spec: ClassVar = {"width": directives.positive_int}

  def run(self):
    from xentjax.cli._main import build_parser

    width = self.options.get("width", 76)
    with _columns(width):  # argparse wraps to $COLUMNS
      parser = build_parser()
      try:
        text = _find_parser(parser, list(self.arguments)).format_help()
      except ValueError as e:
        raise self.error(str(e)) from None
    block = nodes.literal_block(text, text)
    block["language"] = "text"
    return [block]


# --- the notebooks' table ----------------------------------------------------------


def notebook_heading(path: Path) -> tuple[str, str]:
  """`(title, first sentence)` of a notebook: its first cell's heading and what follows."""
  import json

  cells = json.loads(path.read_text())["cells"]
  source = next(("".join(c["source"]) for c in cells if c["cell_type"] == "markdown"), "")
  title, _, rest = source.strip().partition("\n")
  intro = " ".join(rest.strip().split("\n\n", 1)[0].split())
  sentence = re.split(r"(?<=[.!?])\s", intro, maxsplit=1)[0]
  return title.lstrip("# ").strip() or path.stem, sentence


class NotebookTable(SphinxDirective):
  """``xentjax-notebooks``: one table row per notebook of ``notebooks/``, found at build time.

  A row links the notebook's page by its title (the heading of its first cell)
  and says what it derives: the body line ``NN: text`` for notebook ``NN`` (Markdown),
  else the first sentence of the notebook's introduction. So a new notebook is
  listed without editing the page, and a line for a notebook that does not exist is
  an error.
  """

  has_content = True

  def run(self):
    books = sorted((Path(self.env.srcdir) / "notebooks").glob("[0-9]*.ipynb"))
    numbers = {b.stem.split("_")[0]: b for b in books}
    notes = {}
    for line in self.content:
      key, sep, text = line.partition(":")
      if line.strip() and (not sep or key.strip() not in numbers):
        raise self.error(
          f"xentjax-notebooks: {line.strip()!r} is not `NN: text` for a notebook of "
          f"notebooks/ (have {sorted(numbers)})"
        )
      if line.strip():
        notes[key.strip()] = text.strip()
    rows = ["| notebook | what it derives |", "|---|---|"]
    for number, book in numbers.items():
      self.env.note_dependency(str(book))
      title, sentence = notebook_heading(book)
      text = notes.get(number, sentence).replace("|", "\\|")
      rows.append(f"| {{doc}}`{title} <notebooks/{book.stem}>` | {text} |")
    return self.parse_text_to_nodes("\n".join(rows))


# --- MathJax, served locally ----------------------------------------------------

MATHJAX_PATH = "mathjax/tex-chtml.js"  # relative to _static/: set as conf.py's mathjax_path


def _mathjax_source() -> Path:
  spec = importlib.util.find_spec("sphinx-mathjax-offline")
  if spec is None or spec.origin is None:
    raise RuntimeError(
      "the docs need the `sphinx-mathjax-offline` package (MathJax 3 served locally): "
      'pip install -e ".[docs]"'
    )
  return Path(spec.origin).parent / "static" / "mathjax"


def copy_mathjax(app, exception) -> None:
  if exception is not None or app.builder.format != "html":
    return
  target = Path(app.outdir) / "_static" / "mathjax"
  if not (target / "tex-chtml.js").exists():
    # Everything tex-chtml.js may load (TeX extensions, fonts, menu, speech), not
    # the other combined builds (SVG output, MathML input), which it never loads.
    unused = shutil.ignore_patterns(
      "mml-*.js", "tex-svg*.js", "tex-mml-*.js", "tex-chtml-full*.js", "node-main.js", "svg"
    )
    shutil.copytree(_mathjax_source(), target, ignore=unused, dirs_exist_ok=True)


def skip_namedtuple_fields(app, what, name, obj, skip, options):
  """A NamedTuple's fields come with "Alias for field number N": its Attributes say more."""
  if what == "class" and (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
    return True
  return None


class _Default:
  """A default value shown as its source text (``model=linear_logits``, not its repr)."""

  def __init__(self, text: str):
    self.text = text

  def __repr__(self) -> str:
    return self.text


def _source_defaults(fn) -> dict[str, str]:
  """The source text of each default of `fn`'s own ``def``, by parameter name."""
  try:
    source = textwrap.dedent(inspect.getsource(fn))
    node = ast.parse(source).body[0]
  except (OSError, TypeError, SyntaxError, IndexError):
    return {}
  if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
    return {}
  args = node.args
  positional = args.posonlyargs + args.args
  pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
  pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
  return {a.arg: ast.get_source_segment(source, d) for a, d in pairs}


def show_source_defaults(app, obj, bound_method) -> None:
  """Defaults as written in the source, matched by name (`autodoc_preserve_defaults`
  matches by position, which breaks on a signature that differs from its
  source's, as a wrapper's may). A function that forwards its ``**options`` to
  another (`xentjax._api.public_like`) takes the other's for those."""
  if not inspect.isfunction(obj):
    return
  model = getattr(obj, "__xentjax_forwards_to__", None)
  texts = _source_defaults(inspect.unwrap(model)) if model is not None else {}
  texts.update(_source_defaults(inspect.unwrap(obj)))
  sig = inspect.signature(obj)
  params = [
    p.replace(default=_Default(texts[name])) if name in texts and p.default is not p.empty else p
    for name, p in sig.parameters.items()
  ]
  obj.__signature__ = sig.replace(parameters=params)


# --- unrendered Markdown and TeX ---------------------------------------------------

# What Markdown or TeX looks like when a page prints it instead of rendering it (a
# notebook output emitted as Markdown that the renderer took for plain text, a
# docstring with `$x$` where RST needs :math:): a pipe-table row or rule, or a
# `$...$` span.
TABLE_ROW = re.compile(r"^[ \t]*\|(?:[^|\n]*\|){2,}[ \t]*$", re.MULTILINE)
TABLE_RULE = re.compile(r"\|[ \t]*:?(?:-{3,}|[—–]+):?[ \t]*\|")
DOLLAR_MATH = re.compile(r"(?<![\\$\w])\$(?=[^\s$])[^$\n]*?(?<=[^\s$])\$(?![\w$])")
# Text inside these is shown as written, on purpose (code, math, raw output).
VERBATIM = (nodes.FixedTextElement, nodes.literal, nodes.math, nodes.raw, nodes.comment)


def unrendered_markup(text: str) -> list[str]:
  """The pieces of `text` that are Markdown table syntax or `$...$` TeX, as written."""
  rows = list(TABLE_ROW.finditer(text))
  found = [m.group(0).strip() for m in rows]
  in_row = lambda m: any(r.start() <= m.start() < r.end() for r in rows)
  found += [m.group(0) for m in TABLE_RULE.finditer(text) if not in_row(m)]
  return found + [m.group(0) for m in DOLLAR_MATH.finditer(text)]


# The blocks whose text a reader reads as prose.
PROSE = (nodes.paragraph, nodes.title, nodes.rubric, nodes.term, nodes.caption)


def prose_text(block) -> str:
  """The text of `block` outside code and math (what is shown as prose)."""

  def shown(t) -> bool:
    node = t.parent
    while node is not None and node is not block:
      if isinstance(node, VERBATIM):
        return False
      node = node.parent
    return True

  return "".join(t.astext() for t in block.findall(nodes.Text) if shown(t))


def check_rendered(app, doctree, docname) -> None:
  """Warn (an error under `-W`) for each paragraph of a page that shows markup as text."""
  for block in doctree.findall(lambda n: isinstance(n, PROSE)):
    found = unrendered_markup(prose_text(block))
    if found:
      logger.warning(
        "unrendered Markdown or TeX shown as text: %s", "; ".join(found[:3]), location=block
      )


def setup(app):
  _mathjax_source()  # fail at start, not after the build, when the package is missing
  app.connect("builder-inited", generate_api_pages)
  app.connect("build-finished", copy_mathjax)
  app.connect("autodoc-skip-member", skip_namedtuple_fields)
  app.connect("autodoc-before-process-signature", show_source_defaults)
  app.connect("doctree-resolved", check_rendered)
  app.add_directive("xentjax-cli-help", CliHelp)
  app.add_directive("xentjax-notebooks", NotebookTable)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
