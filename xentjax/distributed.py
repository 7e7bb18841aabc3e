"""Multi-process runs: joining a `jax.distributed` job, sharing data, combining totals.

JAX's own runtime is the engine: `jax.distributed.initialize` joins the
processes (one per host, or several on one machine), every process sees all
devices in `jax.devices()` and its own in `jax.local_devices()`, and
collectives run over the global device set (gloo over TCP on CPU, NCCL on
GPU, ICI/DCN on TPU). This module adds the few pieces xentjax needs on top:

* `initialize`: `jax.distributed.initialize` with a bounded wait and, on CPU,
  the gloo collectives that cross-process CPU computations need;
* `process_share`: the round-robin share of a list of files, shards or batch
  starts that belongs to this process;
* `allgather`: every process's host values (numbers, arrays, in dicts and
  lists), exactly, in every process;
* the combination of `xentjax.evaluate`'s per-process totals into one global
  result (used by `evaluate` itself when `jax.process_count() > 1`).

A data set is sharded across processes by giving each process its own
batches: ``xentjax.evaluate(my_batches)`` in every process returns the global
result in every process.

Example (two processes on one machine; run once with ``PROCESS=0`` and once
with ``PROCESS=1``)::

  import os, glob, xentjax
  xentjax.distributed.initialize("127.0.0.1:12345", 2, int(os.environ["PROCESS"]))
  mine = xentjax.distributed.process_share(sorted(glob.glob("shards/*.npz")))
  result = xentjax.evaluate(load(f) for f in mine)   # the same in both processes
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = ["ProcessFailedError", "allgather", "initialize", "process_share"]

# Seconds `initialize` waits for every process to join (JAX's default: a pod
# slice can take minutes to start all its workers).
DEFAULT_TIMEOUT = 300


class ProcessFailedError(RuntimeError):
  """Another process of the job failed, or the processes disagree on a call."""


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  timeout: int = DEFAULT_TIMEOUT,
  heartbeat_timeout: int | None = None,
  **kwargs: Any,
) -> None:
  """Join a `jax.distributed` job (call it first, before any other JAX call).

  The same as ``jax.distributed.initialize(coordinator_address,
  num_processes, process_id, initialization_timeout=timeout, ...)``, and it
  selects gloo as the CPU collectives implementation (unless one is already
  chosen), without which the CPU backend cannot run computations that span
  processes; GPU and TPU backends ignore that setting. With no arguments the
  cluster (SLURM, Open MPI, Cloud TPU) is detected by JAX.

  Args:
    coordinator_address: ``"host:port"`` of process 0, which serves it (None:
      ``JAX_COORDINATOR_ADDRESS`` or cluster detection).
    num_processes: number of processes in the job (None: detected).
    process_id: this process's index in ``[0, num_processes)`` (None: detected).
    timeout: seconds to wait for every process to join (default 300, JAX's);
      past it JAX ends the process from C++ (it does not raise; the
      `xentjax evaluate` command turns that into one line).
    heartbeat_timeout: seconds of silence after which a process is declared
      dead and the others end (None: JAX's default, 100).
    **kwargs: passed on to `jax.distributed.initialize`.

  Example:
    >>> import xentjax  # doctest: +SKIP
    >>> xentjax.distributed.initialize("127.0.0.1:12345", 2, 0)  # doctest: +SKIP
  """
  if getattr(jax.config, "jax_cpu_collectives_implementation", None) is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if heartbeat_timeout is not None:
    kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout)
  jax.distributed.initialize(
    coordinator_address, num_processes, process_id, initialization_timeout=int(timeout), **kwargs
  )


def process_share(
  items: Sequence, *, process_id: int | None = None, num_processes: int | None = None
) -> list:
  """This process's round-robin share of `items`: ``items[process_id::num_processes]``.

  Item ``i`` belongs to process ``i mod P``, so every item is read by exactly
  one process, shares differ in size by at most one item, and a process may
  get none (``xentjax.evaluate`` handles an empty stream). Give every process
  the same list in the same order.

  Args:
    items: files, shard names, batch start offsets, ... (any sequence).
    process_id: default `jax.process_index()`.
    num_processes: default `jax.process_count()`.

  Returns:
    A list of the items of this process, in their order.

  Example:
    >>> process_share(["a", "b", "c", "d", "e"], process_id=1, num_processes=2)
    ['b', 'd']
  """
  p = jax.process_index() if process_id is None else int(process_id)
  n = jax.process_count() if num_processes is None else int(num_processes)
  if n < 1 or not 0 <= p < n:
    raise ValueError(f"need 0 <= process_id < num_processes, got {p} and {n}.")
  return list(items)[p::n]


# ---------------------------------------------------------------------------
# Exchanging host values between processes (exactly, through JAX's collectives).


def _encode(tree) -> Any:
  """A JSON-able copy of a tree of dicts, lists, numbers and NumPy arrays (exact)."""
  if isinstance(tree, dict):
    return {"d": {str(k): _encode(v) for k, v in tree.items()}}
  if isinstance(tree, (list, tuple)):
    return {"l": [_encode(v) for v in tree]}
  if isinstance(tree, np.ndarray):
    a = tree  # tobytes() is C order for any layout; 0-d arrays stay 0-d
    return {"a": [a.dtype.str, list(a.shape), base64.b64encode(a.tobytes()).decode()]}
  if isinstance(tree, (bool, np.bool_)):
    return {"b": bool(tree)}
  if isinstance(tree, (int, np.integer)):
    return {"i": str(int(tree))}
  if isinstance(tree, (float, np.floating)):
    return {"f": float(tree).hex()}  # hex: exact, and NaN/inf survive
  if tree is None or isinstance(tree, str):
    return {"s": tree}
  raise TypeError(f"cannot send a {type(tree).__name__} between processes.")


def _decode(obj) -> Any:
  ((kind, v),) = obj.items()
  if kind == "d":
    return {k: _decode(x) for k, x in v.items()}
  if kind == "l":
    return [_decode(x) for x in v]
  if kind == "a":
    dtype, shape, data = v
    return np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype)).reshape(shape).copy()
  if kind == "b":
    return bool(v)
  if kind == "i":
    return int(v)
  if kind == "f":
    return float.fromhex(v)
  return v


def _allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order, in every process."""
  from jax.experimental import multihost_utils

  sizes = multihost_utils.process_allgather(np.asarray([len(data)], np.int32))
  sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
  buf = np.zeros(max(sizes), np.uint8)
  buf[: len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf))
  return [rows[i, : sizes[i]].tobytes() for i in range(len(sizes))]


def allgather(tree) -> list:
  """Every process's `tree` of host values, in process order, in every process.

  For :math:`P` processes holding :math:`t_0, \\dots, t_{P-1}`, every
  process gets ``[t_0, ..., t_{P-1}]``. The leaves may be Python numbers,
  strings, None, booleans and NumPy arrays of any shape and dtype (they may
  differ between processes), inside dicts and lists (tuples come back as
  lists). Exact: floats and arrays travel as their bytes (float64 stays
  float64 with x64 off, NaN and inf survive), in one byte collective of
  `jax.experimental.multihost_utils.process_allgather`. A collective: every
  process must call it, the same number of times.

  Example:
    >>> allgather({"rows": 3, "loss": [0.5, 1e-17]})  # one process
    [{'rows': 3, 'loss': [0.5, 1e-17]}]
  """
  if jax.process_count() == 1:
    return [_decode(_encode(tree))]
  blob = json.dumps(_encode(tree), separators=(",", ":")).encode()
  return [_decode(json.loads(b)) for b in _allgather_bytes(blob)]


# ---------------------------------------------------------------------------
# Combining `xentjax.evaluate`'s totals.


def merge_sums(trees: list, path: str = "totals") -> Any:
  """Merge per-process trees of partial sums (in process order, deterministic).

  Integers are added exactly, floats with `math.fsum`, NumPy arrays
  element-wise (shapes must match), lists are concatenated (a list holds
  terms that are summed later, such as the (hi, lo) parts of a compensated
  sum: keeping them apart keeps the sum exact), dicts merged key by key;
  strings, booleans and None must be equal in every process.
  """
  first = trees[0]
  if isinstance(first, dict):
    keys = [sorted(t) if isinstance(t, dict) else None for t in trees]
    if any(k != keys[0] for k in keys):
      raise ProcessFailedError(f"processes hold different fields at {path}: {keys}.")
    return {k: merge_sums([t[k] for t in trees], f"{path}.{k}") for k in first}
  if isinstance(first, list):
    return list(itertools.chain.from_iterable(trees))
  if isinstance(first, np.ndarray):
    if any(np.shape(t) != first.shape for t in trees):
      raise ProcessFailedError(
        f"processes hold arrays of different shapes at {path}: {[np.shape(t) for t in trees]}."
      )
    return sum(trees[1:], first.copy())
  if isinstance(first, bool) or first is None or isinstance(first, str):
    if any(t != first for t in trees):
      raise ProcessFailedError(f"processes disagree at {path}: {trees}.")
    return first
  if isinstance(first, int):
    return sum(trees)
  if isinstance(first, float):
    return math.fsum(trees) if all(math.isfinite(t) for t in trees) else sum(trees)
  raise TypeError(f"cannot merge {type(first).__name__} at {path}.")


_calls = itertools.count()


def combine_evaluation(totals, *, options: dict, failure: BaseException | None):
  """`evaluate`'s host totals merged over every process, the same in each.

  `totals` is an object whose attributes are partial sums (`merge_sums`
  says how each kind merges); a shallow copy with merged attributes is
  returned. Every process sends its options, its position in the sequence
  of `evaluate` calls, whether it failed, and its totals, in one collective.
  Then, in every process: a failure anywhere raises (the failing process
  re-raises its own exception, the others `ProcessFailedError` naming it);
  options that differ raise `ValueError` naming them; otherwise the merged
  totals come back. A collective that breaks (a process died) raises
  `ProcessFailedError`.
  """
  me, n = jax.process_index(), jax.process_count()
  payload = {
    "call": next(_calls),
    "options": options,
    "failure": None if failure is None else f"{type(failure).__name__}: {failure}",
    "totals": None if failure is not None else dict(vars(totals)),
  }
  try:
    everyone = allgather(payload)
  except Exception as e:
    raise ProcessFailedError(
      f"process {me} of {n}: lost contact with the other processes while combining "
      f"xentjax.evaluate's totals ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
    ) from e
  failed = [(i, p["failure"]) for i, p in enumerate(everyone) if p["failure"] is not None]
  if failed:
    if failure is not None:
      raise failure
    i, message = failed[0]
    raise ProcessFailedError(f"xentjax.evaluate failed in process {i} of {n}: {message}")
  calls = [p["call"] for p in everyone]
  if len(set(calls)) != 1:
    raise ProcessFailedError(
      f"the processes are at different xentjax.evaluate calls (call number per process: "
      f"{calls}); every process must make the same calls in the same order."
    )
  for key in options:
    values = [p["options"].get(key) for p in everyone]
    if any(v != values[0] for v in values):
      raise ValueError(
        f"`{key}` differs between processes ({', '.join(f'process {i}: {v!r}' for i, v in enumerate(values))}); "
        "every process must call xentjax.evaluate with the same options."
      )
  merged = merge_sums([p["totals"] for p in everyone])
  out = object.__new__(type(totals))
  out.__dict__.update({k: _like(getattr(totals, k), v) for k, v in merged.items()})
  return out


def _like(local, merged):
  """`merged` with the dict types of `local` (a `defaultdict` stays one)."""
  if isinstance(local, dict) and isinstance(merged, dict):
    items = {k: _like(local.get(k), v) for k, v in merged.items()}
    if isinstance(local, collections.defaultdict):
      return collections.defaultdict(local.default_factory, items)
    return items
  return merged
