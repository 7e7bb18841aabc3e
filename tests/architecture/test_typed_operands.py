"""The vocabulary engine's operands are one typed record, not a string-keyed dict.

* `xentjax._vocab.placement.Operands` is a frozen dataclass registered as a
  pytree: it round-trips through `jax.tree.flatten`/`unflatten`, every array
  is a leaf, and an absent optional head (None) has no leaves.
* In ``xentjax/_vocab/``, every parameter named ``ops`` is annotated
  ``Operands`` (not ``dict``, not a union with ``dict``, not unannotated),
  and no code reads the operands by a string key (``ops["rows"]``,
  ``call.ops.get("bias")``): a field is an attribute.

The source rule is a function of the source, with a test that feeds it known
violations, so it can fail.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from xentjax._vocab.placement import Operands

ROOT = pathlib.Path(__file__).resolve().parents[2]
VOCAB = ROOT / "xentjax" / "_vocab"
OPERAND_NAME = "ops"
OPERAND_TYPE = "Operands"


def _operands(**more) -> Operands:
  return Operands(
    x=np.ones((4, 3)),
    w=np.ones((3, 8)),
    rows={"labels": np.arange(4), "temperature": np.full(4, 2.0)},
    cols={"u": np.ones(8)},
    **more,
  )


def test_operands_round_trip_as_a_pytree():
  ops = _operands(bias=np.zeros(8), aux={"weights": np.ones(4)})
  leaves, treedef = jax.tree.flatten(ops)
  assert len(leaves) == 7  # x, w, bias, two rows, one column, one aux row
  back = jax.tree.unflatten(treedef, leaves)
  assert isinstance(back, Operands)
  assert jax.tree.structure(back) == treedef
  for a, b in zip(jax.tree.leaves(back), leaves, strict=True):
    assert a is b
  # The leaves come in the order of the dict the record replaced (sorted
  # names), so the engine's compiled programs keep their arguments' order.
  as_dict = {f.name: getattr(ops, f.name) for f in dataclasses.fields(ops)}
  assert all(a is b for a, b in zip(leaves, jax.tree.leaves(as_dict), strict=True))
  doubled = jax.tree.map(lambda a: 2 * a, ops)
  np.testing.assert_array_equal(doubled.rows["temperature"], np.full(4, 4.0))


def test_an_absent_head_has_no_leaves():
  ops = _operands()
  assert len(jax.tree.leaves(ops)) == 5
  assert ops.bias is None and ops.teacher_x is None and ops.aux == {}
  with_bias = dataclasses.replace(ops, bias=np.zeros(8))
  assert jax.tree.structure(with_bias) != jax.tree.structure(ops)


def test_operands_are_frozen_and_updated_by_copy():
  ops = _operands()
  with pytest.raises(dataclasses.FrozenInstanceError):
    ops.x = np.zeros((4, 3))  # type: ignore[misc]
  more = ops.with_rows(idx=np.zeros(4)).with_cols(order=np.arange(8))
  assert set(more.rows) == {"labels", "temperature", "idx"}
  assert set(more.cols) == {"u", "order"}
  assert set(ops.rows) == {"labels", "temperature"} and set(ops.cols) == {"u"}


def untyped_operands(source: str) -> list[str]:
  """Where ``source`` passes the operands untyped: a loose ``ops`` parameter, a keyed read.

  A parameter named ``ops`` must be annotated ``Operands``; the operands
  (a name ``ops`` or an attribute ``.ops``) must not be subscripted or read
  with ``.get``.
  """
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
      a = node.args
      for arg in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg):
        if arg is None or arg.arg != OPERAND_NAME:
          continue
        note = None if arg.annotation is None else ast.unparse(arg.annotation)
        if note != OPERAND_TYPE:
          name = getattr(node, "name", "<lambda>")
          found.append((node.lineno, f"{name}({OPERAND_NAME}: {note})"))
    elif _keyed_read(node) and _is_operands(node.value):
      found.append((node.lineno, ast.unparse(node)))
  return [f"line {line}: {what}" for line, what in sorted(found)]


def _keyed_read(node: ast.AST) -> bool:
  """``a[...]`` or ``a.get``."""
  return isinstance(node, ast.Subscript) or (isinstance(node, ast.Attribute) and node.attr == "get")


def _is_operands(node: ast.expr) -> bool:
  if isinstance(node, ast.Name):
    return node.id == OPERAND_NAME
  return isinstance(node, ast.Attribute) and node.attr == OPERAND_NAME


def test_the_operand_rule_finds_each_violation():
  source = """
def bare(ops: dict, kernel): ...
def generic(ops: dict[str, Any]): ...
def untyped(x, ops): ...
def union(ops: Operands | dict): ...
def keyword(*, ops=None): ...
def keyed(call):
  return call.ops["rows"]
def read(ops: Operands):
  return ops.get("bias")
def fine(ops: Operands, rows: dict):
  return ops.rows["labels"], rows["x"]
"""
  found = untyped_operands(source)
  assert [f.split(": ", 1)[1] for f in found] == [
    "bare(ops: dict)",
    "generic(ops: dict[str, Any])",
    "untyped(ops: None)",
    "union(ops: Operands | dict)",
    "keyword(ops: None)",
    "call.ops['rows']",
    "ops.get",
  ]


def test_the_engine_passes_typed_operands():
  found = {
    str(p.relative_to(ROOT)): untyped_operands(p.read_text()) for p in sorted(VOCAB.rglob("*.py"))
  }
  assert {path: f for path, f in found.items() if f} == {}
  assert len(found) > 10  # the rule did read the engine's modules
