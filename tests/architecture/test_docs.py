"""The documentation site: builds with no warnings, documents every public name.

The site is built once (`sphinx-build -W --keep-going`, so any warning fails) into a
temporary folder, or taken from `$XENTJAX_DOCS_HTML` when CI has just built it with
the same command. Its object inventory (`objects.inv`) must then hold every public
name of every public module, found here independently of the generator in
`docs/_ext/xentjax_docs.py`: a module's `__all__`, or, without one, the
non-underscore names it defines (functions, classes, constants).

Outside CI the test is skipped when the `docs` extra is not installed; in CI
(`CI` set) a missing Sphinx is a failure, since `.ci/run` installs the extra.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import types
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


# --- what must be documented ----------------------------------------------------


def public_modules() -> list[str]:
  """`xentjax` and every submodule with no underscore in its dotted path."""
  import xentjax

  names = {"xentjax"}
  for info in pkgutil.walk_packages(xentjax.__path__, "xentjax."):
    if not any(part.startswith("_") for part in info.name.split(".")[1:]):
      names.add(info.name)
  for attr, value in vars(xentjax).items():  # modules the package imports under a public name
    is_submodule = isinstance(value, types.ModuleType) and value.__name__.startswith("xentjax.")
    if (
      is_submodule
      and not attr.startswith("_")
      and not value.__name__.rpartition(".")[2].startswith("_")
    ):
      names.add(value.__name__)
  return sorted(names)


def public_names(module: types.ModuleType) -> list[str]:
  """Dotted names that the module's API page must document."""
  if hasattr(module, "__all__"):
    # A submodule listed in `__all__` may not be imported yet (xentjax.demos): import it.
    member = lambda n: getattr(module, n, None) or importlib.import_module(f"{module.__name__}.{n}")
    names = [n for n in module.__all__ if not isinstance(member(n), types.ModuleType)]
  else:
    is_package = hasattr(module, "__path__")
    names = []
    for name, value in vars(module).items():
      if name.startswith("_") or isinstance(value, types.ModuleType):
        continue
      owner = getattr(value, "__module__", None)
      if owner is None:
        if not callable(value):  # a constant: 10, "sha256...", ("ce", "mse")
          names.append(name)
      elif owner == module.__name__ or (is_package and owner.startswith(module.__name__ + "._")):
        names.append(name)
  return [f"{module.__name__}.{n}" for n in names]


# --- what is documented ----------------------------------------------------------


def read_inventory(path: Path) -> dict[str, tuple[str, str]]:
  """`objects.inv` (Sphinx's format, version 2) as {name: (domain:role, uri)}."""
  data = path.read_bytes()
  header_end = 0
  for _ in range(4):  # four '#' header lines, then a zlib stream
    header_end = data.index(b"\n", header_end) + 1
  assert data.startswith(b"# Sphinx inventory version 2"), data[:40]
  entries = {}
  for line in zlib.decompress(data[header_end:]).decode().splitlines():
    m = re.match(r"(.+?)\s+(\S+:\S+)\s+(-?\d+)\s+(\S*)\s+(.*)", line)
    if m:
      name, role, _, uri, _ = m.groups()
      if uri.endswith("$"):
        uri = uri[:-1] + name
      entries[name] = (role, uri)
  return entries


def undocumented(names: list[str], inventory: dict[str, tuple[str, str]], html: Path) -> list[str]:
  """Names with no Python entry in the inventory, or whose entry points at no anchor."""
  missing = []
  for name in names:
    entry = inventory.get(name)
    if entry is None or not entry[0].startswith("py:"):
      missing.append(name)
      continue
    page, _, anchor = entry[1].partition("#")
    target = html / page
    if not target.exists() or (anchor and f'id="{anchor}"' not in target.read_text()):
      missing.append(f"{name} (inventory points at {entry[1]}, which is not there)")
  return missing


def test_undocumented_finds_a_missing_name(tmp_path):
  # The checker itself: a module with two public names, a site documenting one.
  module = types.ModuleType("xentjax_fake")
  module.__all__ = ["documented", "forgotten"]
  module.documented = module.forgotten = lambda: None
  (tmp_path / "api.html").write_text('<dt id="xentjax_fake.documented">')
  inventory = {"xentjax_fake.documented": ("py:function", "api.html#xentjax_fake.documented")}
  names = public_names(module)
  assert names == ["xentjax_fake.documented", "xentjax_fake.forgotten"]
  assert undocumented(names, inventory, tmp_path) == ["xentjax_fake.forgotten"]
  inventory["xentjax_fake.forgotten"] = ("py:function", "gone.html#xentjax_fake.forgotten")
  assert undocumented(names, inventory, tmp_path) == [
    "xentjax_fake.forgotten (inventory points at gone.html#xentjax_fake.forgotten, which is not there)"
  ]


# --- the built site ----------------------------------------------------------------


def _require_docs_extra():
  if os.environ.get("CI"):
    import myst_nb  # noqa: F401  (CI installs the docs extra: missing is a failure)
    import sphinx  # noqa: F401
  else:
    pytest.importorskip(
      "sphinx", reason='the docs extra is not installed: pip install -e ".[docs]"'
    )
    pytest.importorskip(
      "myst_nb", reason='the docs extra is not installed: pip install -e ".[docs]"'
    )


def _built_site(tmp_path: Path) -> Path:
  prebuilt = os.environ.get("XENTJAX_DOCS_HTML")
  if prebuilt:
    html = Path(prebuilt)
    if not html.is_absolute():
      html = ROOT / html
    assert (html / "objects.inv").exists(), f"XENTJAX_DOCS_HTML={prebuilt} holds no built site"
    return html
  html = tmp_path / "html"
  cmd = [
    sys.executable,
    "-m",
    "sphinx",
    "-W",
    "--keep-going",
    "-q",
    "-b",
    "html",
    "-d",
    str(tmp_path / "doctrees"),
    str(DOCS),
    str(html),
  ]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  done = subprocess.run(
    cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, f"sphinx-build failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
  return html


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
  """The built site (CI's build, or one built here once for the module's tests)."""
  _require_docs_extra()
  return _built_site(tmp_path_factory.mktemp("docs"))


def test_site_builds_and_documents_every_public_name(site):
  html = site
  inventory = read_inventory(html / "objects.inv")

  modules = public_modules()
  assert {
    "xentjax",
    "xentjax.grads",
    "xentjax.info",
    "xentjax.metrics",
    "xentjax.parallel",
    "xentjax.train",
    "xentjax.datasets",
  } <= set(modules)
  missing = [m for m in modules if inventory.get(m, ("",))[0] != "py:module"]
  assert not missing, f"public modules without an API page: {missing}"
  for modname in modules:
    module = importlib.import_module(modname)
    names = public_names(module)
    # A package whose `__all__` lists only submodules (xentjax.demos) documents them on
    # their own pages, which this loop checks too.
    only_submodules = all(f"{modname}.{n}" in modules for n in getattr(module, "__all__", [0]))
    assert names or only_submodules, f"{modname} has no public names"
    missing = undocumented(names, inventory, html)
    assert not missing, f"public names of {modname} not in the built documentation: {missing}"

  # Notebooks: every one has a page showing each stored plot.
  for nb_path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    page = html / "notebooks" / f"{nb_path.stem}.html"
    assert page.exists(), f"no page for {nb_path.name}"
    plots = sum(
      "image/png" in out.get("data", {})
      for cell in json.loads(nb_path.read_text())["cells"]
      for out in cell.get("outputs", [])
    )
    shown = len(re.findall(r'<img[^>]+src="\.\./_images/[^"]+\.png"', page.read_text()))
    assert shown == plots, f"{page.name}: {shown} plots shown, the notebook stores {plots}"

  # The CLI page carries each subcommand's --help from the parser.
  from xentjax.cli._main import build_parser

  cli = (html / "cli.html").read_text()
  commands = [a for a in build_parser()._actions if hasattr(a, "choices") and a.choices]
  for name in commands[0].choices:
    assert f"usage: xentjax {name}" in cli, f"`xentjax {name} --help` is not on the CLI page"

  # Offline: the math is typeset by the MathJax copy inside the site, and no page
  # loads a script or a stylesheet from the network.
  assert (html / "_static" / "mathjax" / "tex-chtml.js").exists()
  api_page = (html / "api" / "xentjax.html").read_text()
  assert "_static/mathjax/tex-chtml.js" in api_page and r"\(" in api_page
  for page in html.rglob("*.html"):
    remote = re.findall(
      r'<(?:script|link)[^>]+(?:src|href)="(?:https?:)?//[^"]+"', page.read_text()
    )
    assert not remote, f"{page.relative_to(html)} loads {remote}"


# --- what a reader sees -------------------------------------------------------------

# Markdown or TeX printed as text instead of rendered: a pipe-table row or rule, or a
# `$...$` span (an independent copy of the rule docs/_ext/xentjax_docs.py applies to
# the doctree during the build).
_ROW = re.compile(r"^[ \t]*\|(?:[^|\n]*\|){2,}[ \t]*$", re.MULTILINE)
_RULE = re.compile(r"\|[ \t]*:?(?:-{3,}|[—–]+):?[ \t]*\|")
_DOLLARS = re.compile(r"(?<![\\$\w])\$(?=[^\s$])[^$\n]*?(?<=[^\s$])\$(?![\w$])")
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "wbr"}
_VOID |= {"param", "source", "track"}
_VERBATIM = {"script", "style", "pre", "code", "kbd", "samp", "textarea", "svg"}


class _ProseText(HTMLParser):
  """The text of an HTML page outside code, math (class "math"), scripts and styles."""

  def __init__(self):
    super().__init__()
    self.open: list[tuple[str, bool]] = []  # (tag, verbatim)
    self.parts: list[str] = []

  def handle_starttag(self, tag, attrs):
    if tag in _VOID:
      return
    classes = (dict(attrs).get("class") or "").split()
    self.open.append((tag, tag in _VERBATIM or "math" in classes))

  def handle_endtag(self, tag):
    while any(t == tag for t, _ in self.open):  # unclosed children close with their parent
      if self.open.pop()[0] == tag:
        break

  def handle_data(self, data):
    if not any(verbatim for _, verbatim in self.open):
      self.parts.append(data)


def unrendered(page_html: str) -> list[str]:
  """The pieces of a page's prose that are Markdown table syntax or `$...$` TeX."""
  parser = _ProseText()
  parser.feed(page_html)
  text = "".join(parser.parts)
  return [m.group(0).strip() for p in (_ROW, _RULE, _DOLLARS) for m in p.finditer(text)]


def test_unrendered_finds_raw_tables_and_dollar_math():
  raw = "<p>| class | logit $z$ |\n|---|---|\n| dog | -3.44 |</p>"
  found = unrendered(raw)
  assert {"| class | logit $z$ |", "|---|---|", "| dog | -3.44 |", "$z$"} <= set(found)
  assert unrendered("<p>the mean of $x_i$, then</p>") == ["$x_i$"]
  rendered = (
    '<p>costs $5 and $10; <span class="math notranslate">\\(z_i\\)</span></p>'
    "<pre>| a | b | c |\n$ pip install $x$</pre><p>a <code>$HOME</code> | b</p>"
    "<table><tr><td>a</td><td>b</td></tr></table>"
  )
  assert unrendered(rendered) == []


def test_every_page_renders_its_markdown_and_tex(site):
  shown = {}
  for page in sorted(site.rglob("*.html")):
    found = unrendered(page.read_text())
    if found:
      shown[str(page.relative_to(site))] = found[:3]
  assert not shown, f"pages that print Markdown or TeX as text: {shown}"


def test_every_notebook_is_in_the_notebooks_table(site):
  text = (site / "notebooks.html").read_text()
  table = text[text.index("<table") : text.index("</table>")]
  for nb_path in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
    assert f'href="notebooks/{nb_path.stem}.html"' in table, f"{nb_path.name} is not in the table"


def test_every_page_starts_in_a_valid_theme_mode(site):
  # The theme's first script sets the mode from localStorage or this default; an
  # invalid one ("") makes its script log "Got invalid theme mode" on a first visit.
  for page in sorted(site.rglob("*.html")):
    modes = re.findall(r'localStorage\.getItem\("mode"\) \|\| "([^"]*)"', page.read_text())
    assert all(m in ("light", "dark", "auto") for m in modes), (page.name, modes)


def test_display_math_fits_the_desktop_column(site, tmp_path):
  # docs/_tools/math_width.py measures every display equation in headless Chromium at
  # 1280 px and exits 1 if one is wider than its column (only a phone may shrink it).
  if shutil.which("chromium") is None:
    if os.environ.get("CI"):
      raise AssertionError("CI needs chromium for the math width check (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium)")
  cmd = [
    sys.executable,
    str(DOCS / "_tools" / "math_width.py"),
    str(site),
    str(tmp_path / "w.json"),
  ]
  done = subprocess.run([*cmd, "1280"], check=False, capture_output=True, text=True, timeout=900)
  report = json.loads((tmp_path / "w.json").read_text()) if done.returncode in (0, 1) else []
  assert sum(len(r.get("items", [])) for r in report) > 100, (
    done.stdout[-2000:] + done.stderr[-2000:]
  )
  assert done.returncode == 0, done.stdout[-4000:]


def test_readme_links_point_at_files_that_exist():
  # The README sends readers to the site's pages (docs/*.md) and to sections of its
  # own; a page renamed or moved must not leave a dead link behind.
  readme = (ROOT / "README.md").read_text()
  links = re.findall(r"\]\(([^)\s]+)\)", readme)
  local = [link for link in links if not re.match(r"[a-z]+:", link)]
  assert any(link.startswith("docs/") for link in local), "the README links to no docs page"
  anchors = {
    re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
    for h in re.findall(r"^#+ (.+)$", readme, re.MULTILINE)
  }
  for link in local:
    path, _, anchor = link.partition("#")
    if path:
      assert (ROOT / path).exists(), f"README links to {link}, which does not exist"
    else:
      assert anchor in anchors, f"README links to #{anchor}, which is no heading of it"
