"""Checks that keep the package's architecture.

* Privacy lives at the module boundary: no module under ``xentjax/`` uses an
  underscored name of another module (importing a private *module*, such as
  ``from xentjax import _core``, and using its plain names is the way to share).
* The vocabulary engine's loops and custom derivatives exist once: the
  kernels hold no `lax` loop and no `jax.custom_vjp`.
* Every public function is declared one way (`xentjax._api.public` or
  `public_like`), with the exceptions listed here and why.
* No function is over 60 lines of code (``tests/architecture/test_code_shape.py``).
* Every kernel of the vocabulary engine implements the typed interface
  `xentjax._vocab.kernel.Kernel`: a frozen dataclass deriving from it, every
  abstract method implemented with the interface's parameters, and its
  differentiable rows among its outputs.

Each check parses the source with `ast` (or inspects the imported package), and
each has a test that feeds it a known violation, so it can fail.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pathlib
import pkgutil
import types

import xentjax
from xentjax import _api

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "xentjax"


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _sources() -> dict[str, tuple[pathlib.Path, str]]:
  """Every module of the package: dotted name -> (path, source)."""
  return {_module_name(p): (p, p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _is_private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


# ---------------------------------------------------------------------------
# 1. No module uses another module's underscored names.
# ---------------------------------------------------------------------------


def private_uses(module: str, source: str, modules: set[str], is_package: bool = False) -> list:
  """The other modules' underscored names that ``module``'s source imports or reads.

  Finds ``from xentjax.m import _name`` (absolute or relative), and
  ``alias._name`` where ``alias`` is bound to another xentjax module by
  ``import xentjax.m as alias``, ``from xentjax import m`` or ``from . import
  m`` (dotted chains such as ``xentjax._core._x`` included). ``modules`` is
  the set of the package's dotted module names, so that importing a private
  *module* (``from xentjax import _core``) is told apart from importing a
  private name.
  """
  tree = ast.parse(source)
  package = module if is_package else module.rpartition(".")[0]
  aliases: dict[str, str] = {}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
      if not base.startswith("xentjax"):
        continue
      for a in node.names:
        full = f"{base}.{a.name}"
        if full in modules:
          aliases[a.asname or a.name] = full
        elif _is_private(a.name) and base != module:
          found.append(f"from {base} import {a.name}")
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("xentjax"):
          aliases[a.asname or a.name.split(".")[0]] = (a.asname and a.name) or "xentjax"
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
      continue
    chain, value = [], node.value
    while isinstance(value, ast.Attribute):
      chain.insert(0, value.attr)
      value = value.value
    if not isinstance(value, ast.Name) or value.id not in aliases:
      continue
    owner = ".".join([aliases[value.id], *chain])
    if f"{owner}.{node.attr}" in modules:
      continue  # a private module reached as an attribute: `xentjax._core`
    if owner in modules and owner != module:
      found.append(f"{owner}.{node.attr}")
  return sorted(set(found))


def test_the_private_name_check_finds_each_form():
  modules = {"xentjax", "xentjax._core", "xentjax._softmax", "xentjax.info", "xentjax.sub"}
  modules |= {"xentjax.sub.a", "xentjax.sub.b"}
  bad = """
from xentjax._softmax import _smooth, plain
from xentjax import _core
import xentjax._softmax as S
import xentjax
from . import info
x = _core._hidden + _core.shown + S._one + xentjax._core._two + info._three + S.__name__
"""
  assert private_uses("xentjax.metrics", bad, modules) == [
    "from xentjax._softmax import _smooth",
    "xentjax._core._hidden",
    "xentjax._core._two",
    "xentjax._softmax._one",
    "xentjax.info._three",
  ]
  relative = "from .b import _x, y\nfrom . import b\nz = b._w\nfrom ._core import _q\n"
  assert private_uses("xentjax.sub.a", relative, modules) == [
    "from xentjax.sub._core import _q",
    "from xentjax.sub.b import _x",
    "xentjax.sub.b._w",
  ]
  fine = "from xentjax import _core\nfrom xentjax._core import row_stats\ny = _core.label_status\n"
  assert private_uses("xentjax.metrics", fine, modules) == []
  # A module's own private names are its own business.
  assert private_uses("xentjax._core", "import xentjax._core as me\nme._x\n", modules) == []


def test_no_module_uses_another_modules_private_names():
  sources = _sources()
  modules = set(sources)
  found = {}
  for name, (path, source) in sources.items():
    uses = private_uses(name, source, modules, is_package=path.name == "__init__.py")
    if uses:
      found[name] = uses
  assert found == {}, f"underscored names used across modules: {found}"


# ---------------------------------------------------------------------------
# 2. The engine's loops and custom derivatives exist once.
# ---------------------------------------------------------------------------

LOOPS = {"fori_loop", "scan", "while_loop", "map"}

# Where the vocabulary sweep may loop over tiles and define its custom_vjp.
# `xentjax/_vocab/tiles.py` folds a tile function over the chunks; the engine
# (`xentjax/_vocab/engine.py`) owns the forward/backward sweeps.
LOOP_HOMES = {"xentjax._vocab.tiles", "xentjax._vocab.engine"}
CUSTOM_VJP_HOMES = {"xentjax._vocab.engine"}


def lax_loops_and_custom_vjps(source: str) -> tuple[set[str], set[str]]:
  """The `lax` loops (``lax.scan``, ``jax.lax.fori_loop``, an imported ``scan``) and the
  ``custom_vjp`` references (``jax.custom_vjp``, an imported ``custom_vjp``) of a source."""
  tree = ast.parse(source)
  loop_names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module in ("jax.lax", "jax._src.lax"):
      loop_names |= {a.asname or a.name for a in node.names if a.name in LOOPS}
  loops, vjps = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute):
      if node.attr == "custom_vjp":
        vjps.add(ast.unparse(node))
      value = node.value
      on_lax = (isinstance(value, ast.Name) and value.id == "lax") or (
        isinstance(value, ast.Attribute) and value.attr == "lax"
      )
      if node.attr in LOOPS and on_lax:
        loops.add(ast.unparse(node))
    elif isinstance(node, ast.Name):
      if node.id == "custom_vjp":
        vjps.add(node.id)
      elif node.id in loop_names:
        loops.add(node.id)
  return loops, vjps


def test_the_loop_check_finds_each_form():
  source = """
import jax
from jax import lax
from jax.lax import scan as sweep
from jax import custom_vjp
a = lax.fori_loop(0, 2, f, 0) + jax.lax.while_loop(c, f, 0) + sweep(f, 0, xs)
b = jax.custom_vjp(f)
@custom_vjp
def g(x): return x
c = lax.psum(x, "v") + jnp.map  # neither a lax loop nor a custom_vjp
"""
  loops, vjps = lax_loops_and_custom_vjps(source)
  assert loops == {"lax.fori_loop", "jax.lax.while_loop", "sweep"}
  assert vjps == {"jax.custom_vjp", "custom_vjp"}
  assert lax_loops_and_custom_vjps("x = 'custom_vjp and lax.scan in a string'\n") == (set(), set())


def _kernel_modules(sources) -> list[str]:
  return [
    m for m in sources if m == "xentjax._vocab.kernels" or m.startswith("xentjax._vocab.kernels")
  ]


def test_the_engine_loops_exist_once():
  sources = _sources()
  # After the `_vocab` subpackage: its kernels say what is computed, never how
  # the tiles are swept (no loop, no custom_vjp: the engine owns both).
  kernels = _kernel_modules(sources)
  if "xentjax._vocab" in sources:
    assert kernels, "xentjax._vocab has no kernels module (kernels.py or kernels/)"
  in_kernels = {}
  for name in kernels:
    loops, vjps = lax_loops_and_custom_vjps(sources[name][1])
    if loops or vjps:
      in_kernels[name] = sorted(loops | vjps)
  assert in_kernels == {}, (
    f"a kernel holds a loop or a custom_vjp (they belong in the engine): {in_kernels}"
  )
  # The tile loops and the custom_vjps of the package live in the engine's
  # modules only, so there is no second engine.
  vocab = {m for m in sources if m.startswith("xentjax._vocab")} | {"xentjax.parallel"}
  loop_modules, vjp_modules = set(), set()
  for name, (_, source) in sources.items():
    loops, vjps = lax_loops_and_custom_vjps(source)
    if loops and name in vocab:
      loop_modules.add(name)
    if vjps:
      vjp_modules.add(name)
  assert vjp_modules and loop_modules  # the sweep exists, so the scan reads the right source
  assert vjp_modules <= CUSTOM_VJP_HOMES, vjp_modules - CUSTOM_VJP_HOMES
  assert loop_modules <= LOOP_HOMES, loop_modules - LOOP_HOMES


# ---------------------------------------------------------------------------
# 3. Every public function is declared one way.
# ---------------------------------------------------------------------------

# Public functions that are plain Python on purpose: they run on the host
# (stream batches, loop over epochs or Newton passes, read files, start
# processes, draw, raise eagerly) and call declared public functions inside.
HOST_FUNCTIONS = {
  "xentjax.evaluate": "streams batches from an iterator, dispatches steps, sums on the host",
  "xentjax.evaluation.evaluate": "the same function as `xentjax.evaluate`, in its wing",
  "xentjax.cli.main": "the command line: parses argv, calls the library, prints",
  "xentjax.check_labels": "an eager check that raises (it reads the values)",
  "xentjax.losses.check_labels": "the same function as `xentjax.check_labels`, in its wing",
  "xentjax.check_topk_teacher": "an eager check that raises (it reads the values)",
  "xentjax.calibration.fit_temperature_streaming": "one pass over the batches per Newton step",
  "xentjax.calibration.fit_streaming": "one pass over the batches per evaluation of the objective",
  "xentjax.calibration.temperature_grid": "NumPy on the host: the grid `evaluate` accumulates",
  "xentjax.calibration.temperature_from_statistics": "NumPy on the host: float64 bisection",
  "xentjax.calibration.reliability_diagram": "host NumPy arrays and an optional matplotlib plot",
  "xentjax.coding.ideal_bits": "a float64 NumPy sum on the host, row blocks at a time",
  "xentjax.coding.encode": "quantizes on the host and calls constriction's range coder",
  "xentjax.coding.decode": "calls the range coder and a Python step function symbol by symbol",
  "xentjax.calibration.fit": "dispatches by method to `fit_temperature` or one compiled L-BFGS fit",
  "xentjax.datasets.load_digits": "reads the bundled data file",
  "xentjax.datasets.load_digits_raw": "reads the bundled data file",
  "xentjax.datasets.stratified_split": "NumPy index bookkeeping on the host",
  "xentjax.distributed.initialize": "starts the JAX multi-process runtime",
  "xentjax.distributed.allgather": "moves host values between processes",
  "xentjax.distributed.process_share": "host bookkeeping of each process's rows",
  "xentjax.train.init_linear": "builds a parameter dict from a key and Python sizes",
  "xentjax.train.init_logistic": "builds a parameter dict from a key and Python sizes",
  "xentjax.train.make_loss": "a factory: returns a (public) loss by name",
  "xentjax.train.make_optimizer": "a factory: returns an optax transformation by name",
  "xentjax.train.make_train_step": "a factory: returns a jitted optax step for any loss and model",
  "xentjax.train.fit": "the training loop: epochs, callbacks, a progress bar",
  "xentjax.train.evaluate_classifier": "returns Python floats for a report",
  "xentjax.train.epochs_to_accuracy": "a host loop over training runs",
  "xentjax.train.logit_gradient_gap": "returns a Python float for a report",
}


# The worked examples (`xentjax.demos`) are programs a reader runs and reads (a
# model, a training loop, a table), not library functions: their public names
# are host code by nature and are not declared with `public`.
EXAMPLE_PACKAGES = ("xentjax.demos",)


def _public_modules() -> list[types.ModuleType]:
  """`xentjax` and every public submodule, found on disk (recursively)."""
  found, todo = [xentjax], [xentjax]
  while todo:
    module = todo.pop()
    for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
      if not info.name.startswith("_"):
        sub = importlib.import_module(f"{module.__name__}.{info.name}")
        found.append(sub)
        todo.append(sub)
  return found


def _is_type_alias(value) -> bool:
  return isinstance(value, (types.GenericAlias, types.UnionType)) or (
    type(value).__module__ in ("typing", "collections.abc") and hasattr(value, "__origin__")
  )


def undeclared(qualified: str, value) -> str | None:
  """Why ``value`` (a name of a public module's ``__all__``) breaks the rule, or None."""
  if inspect.isclass(value) or isinstance(value, types.ModuleType) or _is_type_alias(value):
    return None  # classes (NamedTuples, dataclasses), submodules, type aliases
  if not callable(value):
    return None  # constants
  if _api.is_public(value):
    return None
  if qualified in HOST_FUNCTIONS:
    return None
  kind = type(value).__name__
  return f"{kind} from {getattr(value, '__module__', '?')}, not declared with `public`"


def test_the_declaration_check_refuses_other_ways():
  import jax

  @_api.public()
  def declared(x):
    return x

  def plain(x):
    return x

  assert undeclared("m.declared", declared) is None
  assert "not declared" in undeclared("m.plain", plain)
  assert "PjitFunction" in undeclared("m.jitted", jax.jit(plain))
  assert undeclared("xentjax.evaluate", plain) is None  # a listed host function
  assert undeclared("m.Alias", dict[str, int]) is None
  assert undeclared("m.Kind", dataclasses.make_dataclass("Kind", ["a"])) is None


def test_every_public_function_is_declared_one_way():
  found = {}
  for module in _public_modules():
    assert hasattr(module, "__all__"), f"{module.__name__} has no __all__"
    if module.__name__.startswith(EXAMPLE_PACKAGES) and module.__name__ not in EXAMPLE_PACKAGES:
      continue
    for name in module.__all__:
      qualified = f"{module.__name__}.{name}"
      why = undeclared(qualified, getattr(module, name))
      if why:
        found[qualified] = why
  assert found == {}, found


def test_host_functions_listed_exist_and_are_not_declared():
  # The exceptions stay true: a listed name exists, and is not (any longer) declared.
  for qualified in HOST_FUNCTIONS:
    module, _, name = qualified.rpartition(".")
    value = getattr(importlib.import_module(module), name)
    assert callable(value) and not _api.is_public(value), qualified


def test_no_alias_of_public_and_no_gradient_renaming():
  # One decorator (and `public_like`), no second name for it; a closed-form
  # gradient keeps its own name and module (stack traces, profiles).
  names = [n for n, v in vars(_api).items() if v is _api.public]
  assert names == ["public"]
  for name in xentjax.grads.__all__:
    fn = getattr(xentjax.grads, name)
    assert fn.__name__ == f"{name}_grad" and fn.__module__ != "xentjax.grads", name


# ---------------------------------------------------------------------------
# 4. The 60-lines rule stays.
# ---------------------------------------------------------------------------


def test_the_sixty_lines_rule_stays():
  source = (ROOT / "tests" / "architecture" / "test_code_shape.py").read_text()
  tree = ast.parse(source)
  limits = [
    n.value.value
    for n in tree.body
    if isinstance(n, ast.Assign)
    and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["LIMIT"]
  ]
  assert limits == [60]
  assert "def test_no_function_in_the_package_is_over_60_lines_of_code" in source


# ---------------------------------------------------------------------------
# 5. Every kernel implements the typed kernel interface.
# ---------------------------------------------------------------------------

KERNEL_METHODS = ("init", "update", "finish", "cotangent")
# The fields a kernel needs to be built (the others have defaults).
KERNEL_ARGS: dict[str, dict] = {"RowFunction": {"fn": sum}}


def kernel_interface_violations(cls: type) -> list[str]:
  """What `cls` (a class that defines a kernel method) lacks of the `Kernel` interface."""
  from xentjax._vocab.kernel import Kernel

  name = cls.__qualname__
  if not issubclass(cls, Kernel):
    return [f"{name} does not derive from xentjax._vocab.kernel.Kernel"]
  found = []
  missing = sorted(getattr(cls, "__abstractmethods__", ()))
  if missing:
    found.append(f"{name} does not implement {missing}")
  for method in KERNEL_METHODS:
    want = list(inspect.signature(getattr(Kernel, method)).parameters)
    got = list(inspect.signature(getattr(cls, method)).parameters)
    if len(got) != len(want):
      found.append(f"{name}.{method} takes {got}, the interface {want}")
  params = getattr(cls, "__dataclass_params__", None)
  if not dataclasses.is_dataclass(cls) or params is None or not params.frozen:
    found.append(f"{name} is not a frozen dataclass (a kernel is static: hashable)")
  elif not missing:
    k = cls(**KERNEL_ARGS.get(name, {}))
    rows = ("outputs", "differentiable", "saved", "column_outputs", "column_differentiable")
    if not all(isinstance(getattr(k, r), tuple) for r in rows):
      found.append(f"{name}: the row names ({rows}) must be tuples")
    elif not set(k.differentiable) <= set(k.outputs):
      found.append(f"{name}: differentiable rows {k.differentiable} not among {k.outputs}")
    elif not set(k.column_differentiable) <= set(k.column_outputs):
      found.append(f"{name}: differentiable columns not among its column outputs")
  return found


def _kernel_classes() -> list[type]:
  """Every class of `xentjax._vocab.kernels` that defines one of the kernel methods."""
  import xentjax._vocab.kernels as package

  found = []
  for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
    module = importlib.import_module(info.name)
    for value in vars(module).values():
      if (
        inspect.isclass(value)
        and value.__module__ == module.__name__
        and any(m in vars(value) for m in KERNEL_METHODS)
      ):
        found.append(value)
  return found


def test_the_kernel_interface_check_finds_each_violation():
  from xentjax._vocab.kernel import Kernel

  class Untyped:  # the old convention: a plain class with the methods
    def cotangent(self, tile, rows):
      return {}

  class NoCotangent(Kernel):
    def init(self, p, n, n_cols, tiling, cdt):
      return {}, {}

    def update(self, p, state, tile, rows):
      return state

    def finish(self, p, state, rows, tiling):
      return {}, {}

  @dataclasses.dataclass(frozen=True)
  class WrongUpdate(NoCotangent):
    outputs = ("loss",)
    differentiable = ("loss", "other")

    def update(self, p, state, tile):  # type: ignore[override]
      return state

    def cotangent(self, tile, rows):
      return {}

  @dataclasses.dataclass  # not frozen: unhashable, so it cannot be a static argument
  class Mutable(NoCotangent):
    def cotangent(self, tile, rows):
      return {}

  assert kernel_interface_violations(Untyped) == [
    "test_the_kernel_interface_check_finds_each_violation.<locals>.Untyped does not derive from "
    "xentjax._vocab.kernel.Kernel"
  ]
  no_ct = " ".join(kernel_interface_violations(NoCotangent))
  assert "does not implement ['cotangent']" in no_ct and "not a frozen dataclass" in no_ct
  wrong = kernel_interface_violations(WrongUpdate)
  assert len(wrong) == 2, wrong
  assert "WrongUpdate.update takes ['self', 'p', 'state', 'tile']" in wrong[0]
  assert "differentiable rows ('loss', 'other') not among ('loss',)" in wrong[1]
  assert [v.split(" is ", 1)[1] for v in kernel_interface_violations(Mutable)] == [
    "not a frozen dataclass (a kernel is static: hashable)"
  ]


def test_every_kernel_implements_the_typed_interface():
  classes = _kernel_classes()
  names = {c.__name__ for c in classes}
  assert {"SoftmaxStats", "Divergence", "ContrastiveSoftmax", "NtXent"} <= names, names
  found = [v for c in classes for v in kernel_interface_violations(c)]
  assert found == [], found
