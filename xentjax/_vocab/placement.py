"""Where a sweep runs: one device, or a mesh with tokens and vocabulary sharded.

A `Placement` is part of the static description of a call (`tiles.Tiling`).
On one device the engine's local functions run as they are; on a mesh they
run under `jax.shard_map`, with

* the tokens (``x``, every per-token operand and output) over ``data_axis``;
* the vocabulary (the columns of ``w``, ``bias`` and every per-column operand
  or output) over ``vocab_axis``;
* a per-token statistic combined across vocabulary shards by the kernel's
  ``finish`` with the helpers below (`vocab_max`, `vocab_sum`), and a
  per-column one across token shards with `data_sum`.

Nothing vocabulary-sized is ever gathered. The `PartitionSpec` of every
array the engine passes through `shard_map` follows from where it sits
(`Layout`, `layout_specs`): a field of the `Operands` (`operand_specs`), a per-token row, a
per-column row, or a gradient of one of them; never from its name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from xentjax import _validation as V


class Placement(NamedTuple):
  """Where one call runs: a mesh with its token and vocabulary axes, or one device."""

  mesh: Any = None
  data_axis: Any = None
  vocab_axis: Any = None
  data_shards: int = 1
  vocab_shards: int = 1
  # A ring: the columns are sharded over `data_axis` like the tokens, and the
  # engine passes each device's shard of them around (`engine.over_vocabulary`).
  ring: bool = False

  @property
  def column_axis(self):
    """The mesh axis the columns of the head are sharded over."""
    return self.data_axis if self.ring else self.vocab_axis


@dataclasses.dataclass(frozen=True, kw_only=True)
class Operands:
  """What a sweep takes: its fields fix each array's layout, never a name inside them.

  ``x`` ``[n, D]`` (tokens over the data axis), ``w`` the head (columns over
  the column axis; ``[V, D]`` with ``vd``), ``bias`` ``[V]``, the teacher's
  ``teacher_x``, ``teacher_w`` (``teacher_vd``) and ``teacher_bias``;
  ``rows``: per-token operands (``[n, ...]``, over the data axis),
  ``cols``: per-column operands (``[V, ...]``, over the column axis), and
  for strategy "store" ``aux``: the per-token operands of the loss.

  A pytree (`jax.tree_util.register_dataclass`): every field is data, and
  an absent optional head (None) has no leaves, so a tree of specs
  (`operand_specs`) or of cotangents has None in the same places. Frozen:
  a new record comes from `dataclasses.replace`, `with_rows` or `with_cols`.
  """

  x: Any
  w: Any
  rows: dict[str, Any] = dataclasses.field(default_factory=dict)
  cols: dict[str, Any] = dataclasses.field(default_factory=dict)
  bias: Any = None
  teacher_x: Any = None
  teacher_w: Any = None
  teacher_bias: Any = None
  aux: dict[str, Any] = dataclasses.field(default_factory=dict)

  def with_rows(self, **rows) -> Operands:
    """The same operands with the per-token operands ``rows`` added (or replaced)."""
    return dataclasses.replace(self, rows={**self.rows, **rows})

  def with_cols(self, **cols) -> Operands:
    """The same operands with the per-column operands ``cols`` added (or replaced)."""
    return dataclasses.replace(self, cols={**self.cols, **cols})


# Every field is data, flattened in the order of the names, as the dict the
# record replaced was (`jax` sorts a dict's keys): the leaves, and with them
# the compiled programs, keep their order.
jax.tree_util.register_dataclass(
  Operands, data_fields=sorted(f.name for f in dataclasses.fields(Operands)), meta_fields=[]
)


class Layout(NamedTuple):
  """The `PartitionSpec` of each kind of array a sweep takes or returns."""

  x: P  # [tokens, features]
  w: P  # the head
  teacher_w: P
  cols: P  # [columns]
  tile: P  # [tokens, vocabulary tiles] (each device its own tiles)
  scalar: P
  tokens: P  # [tokens, ...]


def layout_specs(placement: Placement, vd: bool = False, teacher_vd: bool = False) -> Layout:
  """The specs of a placement (every one ``P()`` on one device's terms)."""
  d, v, c = placement.data_axis, placement.vocab_axis, placement.column_axis
  head = lambda vd: P(c, None) if vd else P(None, c)
  return Layout(P(d, None), head(vd), head(teacher_vd), P(c), P(d, v), P(), P(d))


def operand_specs(
  ops: Operands, placement: Placement, vd: bool, teacher_vd: bool = False, tile_rows=()
) -> Operands:
  """The specs of a sweep's operands: an `Operands` of `PartitionSpec`, field by field.

  Every per-token row (``rows``, ``aux``) is ``[tokens, ...]`` except the
  ``rows`` named in ``tile_rows`` (a kernel's ``tile_saved``: ``[tokens,
  vocabulary tiles]``); every per-column operand is ``[columns]``; an absent
  optional field stays None.
  """
  s = layout_specs(placement, vd, teacher_vd)
  given = lambda a, spec: None if a is None else spec
  return Operands(
    x=s.x,
    w=s.w,
    rows={k: s.tile if k in tile_rows else s.tokens for k in ops.rows},
    cols=dict.fromkeys(ops.cols, s.cols),
    bias=given(ops.bias, s.cols),
    teacher_x=given(ops.teacher_x, s.x),
    teacher_w=given(ops.teacher_w, s.teacher_w),
    teacher_bias=given(ops.teacher_bias, s.cols),
    aux=dict.fromkeys(ops.aux, s.tokens),
  )


def sharded(fn, placement: Placement, in_specs, out_specs):
  """`fn` itself on one device; `shard_map(fn)` over the placement's mesh otherwise.

  The collectives inside the kernels are explicit and nothing is
  differentiated through `shard_map` (the `custom_vjp` sits outside it), so the
  replication checker is not needed.
  """
  if placement.mesh is None:
    return fn
  return jax.shard_map(
    fn, mesh=placement.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
  )


def has_explicit_axes(mesh) -> bool:
  """Whether `mesh` (a `Mesh` or `AbstractMesh`, or None) has an `Explicit` axis."""
  explicit = jax.sharding.AxisType.Explicit
  return any(t == explicit for t in getattr(mesh, "axis_types", ()))


def explicitly_typed(a) -> bool:
  """Whether the type of array `a` carries an `Explicit` mesh (its layout is part of it)."""
  sharding = getattr(jax.typeof(a), "sharding", None)
  m = getattr(sharding, "mesh", None)
  return m is not None and not getattr(m, "empty", True) and has_explicit_axes(m)


def working_mesh(mesh, *arrays):
  """The mesh a call runs on: `mesh`, or the same devices with `Auto` axes.

  Outside a mesh context (`jax.set_mesh`), a result typed with an `Explicit`
  mesh cannot be differentiated eagerly: `jax.grad` makes the output's unit
  cotangent from its type, which names the mesh but not its devices, and JAX
  then fails ("Length of device assignment 1 is not equal to the size of the
  mesh"). So when `mesh` has `Explicit` axes (the default of `jax.make_mesh`),
  no mesh context is set and none of `arrays` is typed with an `Explicit`
  mesh, the call runs on the `Auto` twin of `mesh`: the same devices and
  layouts, results typed without a mesh, differentiable eagerly, under `jit`
  and under `jax.set_mesh` alike. Inside a mesh context, or on arrays the
  caller placed on an `Explicit` mesh, the call keeps `mesh` (its results mix
  with the caller's arrays, as `jax.reshard` outputs would).
  """
  if (
    not isinstance(mesh, jax.sharding.Mesh)
    or not has_explicit_axes(mesh)
    or not jax.sharding.get_abstract_mesh().empty
    or any(a is not None and explicitly_typed(a) for a in arrays)
  ):
    return mesh
  auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=auto)


def place(a, mesh, spec):
  """Put `a` in the layout `spec` of `mesh` (a no-op when it is there already).

  With `Explicit` mesh axes (the default of `jax.make_mesh`) the layout is part
  of the type and `shard_map` only accepts matching arguments, so this is
  `jax.reshard`; with `Auto` axes it is a sharding constraint, or, for an
  array typed with an `Explicit` mesh (see `working_mesh`), `jax.device_put`.
  All are differentiable: the cotangent goes back to the caller's layout.
  """
  sharding = jax.sharding.NamedSharding(mesh, spec)
  if has_explicit_axes(mesh):
    return jax.reshard(a, sharding)
  if explicitly_typed(a):
    return jax.device_put(a, sharding)
  return lax.with_sharding_constraint(a, sharding)


def place_tree(ops: Operands, placement: Placement, vd: bool, teacher_vd: bool = False) -> Operands:
  """Every operand of a sweep in the layout it expects (unchanged on one device)."""
  if placement.mesh is None:
    return ops
  return jax.tree.map(
    lambda a, s: place(a, placement.mesh, s),
    ops,
    operand_specs(ops, placement, vd, teacher_vd),
    is_leaf=lambda s: isinstance(s, P),
  )


# ----------------------------------------------------------------------------
# Collectives of the kernels' `finish` (identities on one device): `vocab_*`
# combine a per-token state over the vocabulary shards, `column_*` a
# per-column state over the token shards.


def vocab_offset(placement: Placement, local_columns: int):
  """Global index of this device's first column (0 when the columns are not sharded)."""
  if placement.column_axis is None:
    return 0
  return lax.axis_index(placement.column_axis) * local_columns


def vocab_max(a, placement: Placement):
  return a if placement.vocab_axis is None else lax.pmax(a, placement.vocab_axis)


def vocab_min(a, placement: Placement):
  return a if placement.vocab_axis is None else lax.pmin(a, placement.vocab_axis)


def vocab_sum(a, placement: Placement):
  return a if placement.vocab_axis is None else lax.psum(a, placement.vocab_axis)


def vocab_gather(a, placement: Placement):
  """`[n, k]` candidates of every vocabulary shard side by side: `[n, k * shards]`."""
  if placement.vocab_axis is None:
    return a
  return lax.all_gather(a, placement.vocab_axis, axis=1, tiled=True)


def data_sum(a, placement: Placement):
  return a if placement.data_axis is None else lax.psum(a, placement.data_axis)


def anywhere(pred, placement: Placement):
  """`pred` (a bool scalar) true on any device of the call: the same on every device."""
  for axis in (placement.data_axis, placement.vocab_axis):
    if axis is not None:
      pred = lax.pmax(pred.astype(jnp.int32), axis) > 0
  return pred


def column_sum(a, placement: Placement):
  """A per-column state summed over the token shards (on a ring it came home complete)."""
  return a if placement.ring else data_sum(a, placement)


def column_max(a, placement: Placement):
  if placement.ring or placement.data_axis is None:
    return a
  return lax.pmax(a, placement.data_axis)


# ----------------------------------------------------------------------------
# Reading and checking a placement.


def explicit_layout(x, w, vd: bool):
  """`(mesh, data_axis, vocab_axis)` read from `Explicit` shardings, or None.

  With `Explicit` mesh axes the sharding is part of an array's type and the
  single-device kernels cannot mix sharded slices with unsharded carries, so a
  call on such arrays runs through `shard_map` instead: tokens stay sharded
  over the axes of the leading axis of `x`, and the vocabulary over the axes
  of the vocabulary axis of `w` (when they differ from the tokens' axes).
  """
  mesh = None
  found = []
  for a in (x, w):
    if not explicitly_typed(a):
      found.append(())
      continue
    sharding = jax.typeof(a).sharding
    mesh = mesh or sharding.mesh
    found.append(tuple(sharding.spec))
  if mesh is None:
    return None
  sx, sw = found
  data_axis = sx[0] if sx else None
  vdim = 0 if vd else 1
  vocab_axis = sw[vdim] if len(sw) > vdim else None
  if (
    vocab_axis is not None
    and data_axis is not None
    and (set(V.as_sequence(vocab_axis)) & set(V.as_sequence(data_axis)))
  ):
    vocab_axis = None
  return getattr(mesh, "abstract_mesh", mesh), data_axis, vocab_axis


def axis_size(mesh, axis) -> int:
  if axis is None:
    return 1
  return math.prod(dict(mesh.shape)[a] for a in V.as_sequence(axis))


def mesh_axes(mesh, data_axis, vocab_axis) -> tuple[int, int]:
  """Sizes of the two mesh axes; a clear error when the mesh lacks them."""
  if getattr(mesh, "axis_names", None) is None:
    raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  shape = dict(mesh.shape)
  for arg, axis in (("vocab_axis", vocab_axis), ("data_axis", data_axis)):
    for a in () if axis is None else V.as_sequence(axis):
      if a not in shape:
        raise ValueError(
          f"`{arg}`={axis!r} is not an axis of the mesh, whose axes are "
          f"{dict(shape)}. Pass the name of an existing mesh axis."
        )
  if (
    data_axis is not None
    and vocab_axis is not None
    and (set(V.as_sequence(data_axis)) & set(V.as_sequence(vocab_axis)))
  ):
    raise ValueError(f"`data_axis`={data_axis!r} and `vocab_axis`={vocab_axis!r} must differ.")
  return axis_size(mesh, data_axis), axis_size(mesh, vocab_axis)


def require_vocab_axis(mesh, data_axis, vocab_axis) -> tuple[int, int]:
  """`mesh_axes`, with `vocab_axis` required (the `xentjax.parallel` functions)."""
  if vocab_axis is None:
    raise ValueError("`vocab_axis` must name a mesh axis (the vocabulary is sharded over it).")
  return mesh_axes(mesh, data_axis, vocab_axis)
