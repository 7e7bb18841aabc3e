"""`xentjax evaluate`: stream logits and labels from files through `evaluate`.

Reads `.npy` files by memory map (any other file is raw binary, described by
`--shape`/`--dtype` and `--labels-dtype`), checks the labels eagerly in
chunks, then prints `xentjax.evaluate`'s table or its JSON.
"""

from __future__ import annotations

import json
import os

import numpy as np

from xentjax._cli import CommandError

_CHECK_CHUNK = 1 << 22  # labels examined per chunk by the range check


def register(subparsers) -> None:
  p = subparsers.add_parser(
    "evaluate",
    help="cross-entropy, perplexity, accuracy and calibration of saved logits",
    description=(
      "Stream logits and labels from .npy files (memory-mapped) or raw binary files "
      "through xentjax.evaluate and print cross-entropy, perplexity, accuracy, top-k "
      "accuracy and expected calibration error. Labels are integer class indices "
      "[N, ...] or soft labels with the logits' shape."
    ),
  )
  p.add_argument("--logits", required=True, help="logits [N, ..., C]: .npy, or raw with --shape")
  p.add_argument("--labels", required=True, help="labels [N, ...] (.npy, or raw binary)")
  p.add_argument("--batch-size", type=int, default=50_000, help="rows per batch (default 50000)")
  p.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracy (default 5)")
  p.add_argument("--num-bins", type=int, default=15, help="calibration bins (default 15)")
  p.add_argument("--base", type=float, default=None, help="log base of the cross-entropy")
  p.add_argument(
    "--ignore-index", type=int, default=-100, help="label value not counted (default -100)"
  )
  p.add_argument("--shape", default=None, help="shape of raw logits, e.g. 1000000,64")
  p.add_argument("--dtype", default="float32", help="dtype of raw logits (default float32)")
  p.add_argument("--labels-dtype", default="int64", help="dtype of raw labels (default int64)")
  p.add_argument("--json", action="store_true", help="print the result as JSON")
  bar = p.add_mutually_exclusive_group()
  bar.add_argument("--progress", dest="progress", action="store_true", default=None)
  bar.add_argument("--no-progress", dest="progress", action="store_false")
  p.set_defaults(func=run)


def _dtype(text: str, flag: str) -> np.dtype:
  try:
    return np.dtype(text)
  except TypeError:
    raise CommandError(f"{flag}: unknown dtype {text!r}") from None


def _shape(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
  except ValueError:
    shape = ()
  if not shape or any(d <= 0 for d in shape):
    raise CommandError(f"--shape: expected positive integers like 1000000,64, got {text!r}")
  return shape


def _open_npy(path: str, what: str) -> np.ndarray:
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as e:
    raise CommandError(f"cannot read {what} file {path!r} as .npy: {e}") from None


def _open_raw(path: str, what: str, dtype: np.dtype, shape: tuple[int, ...] | None):
  size = os.path.getsize(path)
  if shape is None:  # one dimension, from the file size
    if size % dtype.itemsize:
      raise CommandError(
        f"{what} file {path!r} has {size} bytes, not a multiple of {dtype} ({dtype.itemsize})"
      )
    shape = (size // dtype.itemsize,)
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if expected != size:
    raise CommandError(
      f"{what} file {path!r} has {size} bytes but shape {shape} of {dtype} needs {expected}"
    )
  if size == 0:
    return np.zeros(shape, dtype)
  return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def _open(path: str, what: str, dtype: np.dtype, shape) -> np.ndarray:
  if not os.path.isfile(path):
    raise CommandError(f"{what} file not found: {path}")
  if path.endswith(".npy"):
    return _open_npy(path, what)
  if what == "logits" and shape is None:
    raise CommandError(f"raw logits file {path!r} needs --shape N,C (and --dtype)")
  return _open_raw(path, what, dtype, shape)


def _check_label_range(labels: np.ndarray, num_classes: int, ignore_index: int | None) -> None:
  """Streaming min/max over the memory map, a chunk at a time."""
  flat = labels.reshape(-1)
  for start in range(0, flat.shape[0], _CHECK_CHUNK):
    chunk = np.asarray(flat[start : start + _CHECK_CHUNK])
    if ignore_index is not None:
      chunk = chunk[chunk != ignore_index]
    if chunk.size == 0:
      continue
    lo, hi = int(chunk.min()), int(chunk.max())
    if lo < 0 or hi >= num_classes:
      bad = lo if lo < 0 else hi
      raise CommandError(
        f"label {bad} is out of range for {num_classes} classes (valid 0..{num_classes - 1}"
        + ("" if ignore_index is None else f", or the ignore index {ignore_index}")
        + ")"
      )


def load(args) -> tuple[np.ndarray, np.ndarray]:
  """Open and check the two files; raises `CommandError` on any user error."""
  shape = None if args.shape is None else _shape(args.shape)
  logits = _open(args.logits, "logits", _dtype(args.dtype, "--dtype"), shape)
  labels = _open(args.labels, "labels", _dtype(args.labels_dtype, "--labels-dtype"), None)
  if logits.ndim < 2:
    raise CommandError(f"logits must have shape [N, ..., C], got shape {logits.shape}")
  if not np.issubdtype(logits.dtype, np.floating):
    raise CommandError(f"logits must be floating point, got dtype {logits.dtype}")
  if labels.ndim == 0 or labels.shape[0] != logits.shape[0]:
    raise CommandError(
      f"logits have {logits.shape[0]} rows but labels have "
      f"{labels.shape[0] if labels.ndim else 0} (shapes {logits.shape} and {labels.shape})"
    )
  if np.issubdtype(labels.dtype, np.integer):
    if labels.shape != logits.shape[:-1]:
      raise CommandError(
        f"integer labels must have shape {logits.shape[:-1]} (logits without the class axis), "
        f"got {labels.shape}"
      )
    _check_label_range(labels, logits.shape[-1], args.ignore_index)
  elif np.issubdtype(labels.dtype, np.floating):
    if labels.shape != logits.shape:
      raise CommandError(
        f"soft labels must have the logits' shape {logits.shape}, got {labels.shape}"
      )
  else:
    raise CommandError(f"labels must be integer or floating point, got dtype {labels.dtype}")
  return logits, labels


def run(args) -> int:
  if args.batch_size < 1:
    raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.top_k < 1:
    raise CommandError(f"--top-k must be >= 1, got {args.top_k}")
  if args.num_bins < 1:
    raise CommandError(f"--num-bins must be >= 1, got {args.num_bins}")
  if args.base is not None and not (args.base > 0 and args.base != 1 and np.isfinite(args.base)):
    raise CommandError(f"--base must be a finite number > 0 and != 1, got {args.base}")
  logits, labels = load(args)

  from xentjax._evaluation import evaluate  # imports JAX: only once the files are good

  n, bs = logits.shape[0], args.batch_size
  batches = ((logits[i : i + bs], labels[i : i + bs]) for i in range(0, n, bs))
  result = evaluate(
    batches,
    top_k=args.top_k,
    num_bins=args.num_bins,
    base=args.base,
    ignore_index=args.ignore_index,
    progress=args.progress,
    total=n,
  )
  if args.json:
    print(json.dumps(result.to_dict(), indent=2))
  else:
    print(f"{args.logits}: {n:,} rows x {logits.shape[-1]} classes")
    print(result)
  return 0
