"""The sharding of a sweep's operands follows from their place in `Operands`, never from a name."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xentjax._vocab.placement import Operands, Placement, layout_specs, operand_specs

MESH = Placement(data_axis="data", vocab_axis="vocab", data_shards=2, vocab_shards=4)


def test_every_field_has_its_layout():
  ops = Operands(
    x=np.zeros((8, 3)),
    w=np.zeros((3, 16)),
    bias=np.zeros(16),
    teacher_x=np.zeros((8, 5)),
    teacher_w=np.zeros((16, 5)),
    teacher_bias=np.zeros(16),
    rows={"labels": np.zeros(8)},
    cols={"u": np.zeros(16)},
    aux={"weights": np.zeros(8)},
  )
  got = operand_specs(ops, MESH, vd=False, teacher_vd=True)
  assert got == Operands(
    x=P("data", None),
    w=P(None, "vocab"),
    bias=P("vocab"),
    teacher_x=P("data", None),
    teacher_w=P("vocab", None),
    teacher_bias=P("vocab"),
    rows={"labels": P("data")},
    cols={"u": P("vocab")},
    aux={"weights": P("data")},
  )


def test_an_absent_head_has_no_spec():
  # None is an empty pytree: the specs have None where the operands do, so
  # `jax.tree.map` over both (`place_tree`) pairs every array with its spec.
  ops = Operands(x=np.zeros((8, 3)), w=np.zeros((3, 16)), rows={"labels": np.zeros(8)})
  got = operand_specs(ops, MESH, vd=True)
  assert (got.bias, got.teacher_x, got.teacher_w, got.teacher_bias) == (None,) * 4
  assert got.w == P("vocab", None)
  assert jax.tree.structure(got, is_leaf=lambda s: isinstance(s, P)) == jax.tree.structure(ops)


def test_a_rows_name_does_not_change_its_layout():
  # Names that were roles of arrays elsewhere (a scalar "total", a head "x" or
  # "w", a tile "logits") are per-token rows, or per-column ones, like any other.
  names = ("total", "x", "w", "logits", "tmax", "bias", "cols")
  ops = Operands(
    x=np.zeros((8, 3)),
    w=np.zeros((3, 16)),
    rows=dict.fromkeys(names, 0),
    cols=dict.fromkeys(names, 0),
    aux=dict.fromkeys(names, 0),
  )
  got = operand_specs(ops, MESH, vd=False)
  assert got.rows == dict.fromkeys(names, P("data"))
  assert got.cols == dict.fromkeys(names, P("vocab"))
  assert got.aux == dict.fromkeys(names, P("data"))
  # Only a kernel's declared tile rows (`Kernel.tile_saved`) are [tokens, vocabulary tiles].
  got = operand_specs(ops, MESH, vd=False, tile_rows=("tmax",))
  assert got.rows == {**dict.fromkeys(names, P("data")), "tmax": P("data", "vocab")}
  assert got.aux == dict.fromkeys(names, P("data"))  # the loss's operands are never tiles


def test_a_ring_shards_the_columns_over_the_data_axis():
  ring = Placement(data_axis="data", data_shards=4, ring=True)
  s = layout_specs(ring, vd=True)
  assert (s.x, s.w, s.cols, s.tokens) == (P("data", None), P("data", None), P("data"), P("data"))


def test_an_unknown_field_is_refused():
  with pytest.raises(TypeError, match="teacher"):
    Operands(x=np.zeros((2, 2)), w=np.zeros((2, 2)), teacher=np.zeros(2))  # type: ignore[call-arg]
