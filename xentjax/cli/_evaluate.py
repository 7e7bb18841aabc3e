"""`xentjax evaluate`: stream logits and labels from files through `evaluate`.

Reads `.npy` files by memory map, `.npz` archives into memory, and any other
file as raw binary described by `--shape`/`--dtype` and `--labels-dtype`;
checks the files eagerly (labels in chunks), then prints
`xentjax.evaluate`'s table or its JSON.

Several processes (`--coordinator`, `--num-processes`, `--process-id`, or
`--distributed` for JAX's cluster detection) join one `jax.distributed` job;
each reads its share of the files and process 0 prints the global result.
Such a process runs as a child of this command (`_supervise`), so that the
fatal errors JAX raises from C++ while joining or when a peer dies become one
line and a non-zero exit instead of a page of log.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import zipfile

import numpy as np

from xentjax.cli._common import CommandError, add_command

_CHECK_CHUNK = 1 << 22  # values examined per chunk by the eager checks
_WORKER_ENV = "_XENTJAX_EVALUATE_FDS"  # in a supervised child: "stdout_fd,stderr_fd" of the user
DEFAULT_TIMEOUT = 60
PLACEHOLDER = "{process}"


_HELP = "cross-entropy, perplexity, accuracy and calibration of saved logits"
_DESCRIPTION = textwrap.fill(
  "Stream logits and labels from .npy files (memory-mapped), .npz archives or raw "
  "binary files through xentjax.evaluate and print cross-entropy, perplexity, "
  "accuracy, top-k accuracy and expected calibration error. Labels are integer "
  "class indices [N, ...] or soft labels with the logits' shape. Repeat --logits "
  "and --labels to evaluate several files as one data set. Several processes "
  "(--coordinator/--num-processes/--process-id) evaluate one data set together: "
  "each reads its share of the files and process 0 prints the result.",
  width=78,
)
_EPILOG = (
  "Two processes on one machine, each with half of the files:\n"
  "  xentjax evaluate --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0 \\\n"
  "    --logits a.npy --labels a_y.npy --logits b.npy --labels b_y.npy &\n"
  "  xentjax evaluate --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 1 \\\n"
  "    --logits a.npy --labels a_y.npy --logits b.npy --labels b_y.npy\n"
  + textwrap.fill(
    "File pair i goes to process i mod N; a path with {process} names each "
    "process's own file instead (--logits part{process}.npy).",
    width=78,
  )
)


def register(subparsers) -> None:
  p = add_command(subparsers, "evaluate", help=_HELP, description=_DESCRIPTION, epilog=_EPILOG)
  _add_file_options(p)
  _add_metric_options(p)
  _add_calibration_options(p)
  _add_raw_options(p)
  _add_output_options(p)
  _add_job_options(p)
  p.set_defaults(func=run)


def _add_file_options(p) -> None:
  p.add_argument(
    "--logits", action="append", required=True,
    help="logits [N, ..., C]: .npy, .npz (FILE.npz or FILE.npz:KEY), or raw with --shape; "
    "repeat for several files",
  )  # fmt: skip
  _add_per_file(p, "--labels", "labels [N, ...] (.npy, .npz, or raw binary)", required=True)
  _add_per_file(
    p,
    "--bytes",
    "integer byte counts [N, ...], the UTF-8 bytes each token decodes to",
    ": also report bits per byte (counted tokens only, in both sums)",
    default=[],
    metavar="FILE",
  )
  p.add_argument(
    "--per-document", metavar="OUT.csv", default=None,
    help="write each document's tokens, bytes and NLL sum to this CSV file; documents are "
    "the --documents ids, or else one per --logits file",
  )  # fmt: skip
  _add_per_file(
    p,
    "--documents",
    "integer document ids [N, ...]",
    " (with --per-document)",
    default=[],
    metavar="FILE",
  )


def _add_per_file(p, flag: str, what: str, note: str = "", **options) -> None:
  """An option repeated once per ``--logits`` file, in the same order: ``what``, then ``note``."""
  p.add_argument(flag, action="append", help=f"{what}, one per --logits{note}", **options)


def _add_metric_options(p) -> None:
  p.add_argument("--batch-size", type=int, default=50_000, help="rows per batch (default 50000)")
  p.add_argument("--top-k", type=int, default=5, help="k of the top-k accuracy (default 5)")
  p.add_argument("--num-bins", type=int, default=15, help="calibration bins (default 15)")
  p.add_argument(
    "--plot", metavar="FILE.png", default=None,
    help="also write the reliability diagram of the ECE's bins to this image (matplotlib)",
  )  # fmt: skip
  p.add_argument(
    "--temperature", action="store_true",
    help="also fit the temperature T of temperature scaling (softmax(logits / T)) in the "
    "same pass; it evaluates the loss at 20 temperatures, so it takes longer",
  )  # fmt: skip
  p.add_argument("--base", type=float, default=None, help="log base of the cross-entropy")
  p.add_argument(
    "--ignore-index", type=int, default=-100, help="label value not counted (default -100)"
  )


_CALIBRATION_METHODS = ("temperature", "vector", "matrix", "dirichlet")  # calibration.METHODS


def _add_calibration_options(p) -> None:
  p.add_argument(
    "--calibrate", choices=_CALIBRATION_METHODS, default=None, metavar="METHOD",
    help="also fit a calibration map (temperature, vector, matrix or dirichlet: "
    "xentjax.calibration.fit) on the rows, held in memory, and report the cross-entropy, "
    "ECE, ACE and smooth ECE before and after it (on the same rows: in-sample)",
  )  # fmt: skip
  p.add_argument(
    "--odir", default=None, metavar="LAMBDA,MU",
    help="ODIR regularization of --calibrate matrix or dirichlet (dirichletcal's "
    "reg_lambda, reg_mu)",
  )  # fmt: skip


def _odir(text: str | None) -> tuple[float, float] | None:
  if text is None:
    return None
  try:
    lam, mu = (float(t) for t in text.split(","))
  except ValueError:
    raise CommandError(f"--odir must be two numbers LAMBDA,MU, got {text!r}") from None
  if not (0 <= lam < math.inf and 0 <= mu < math.inf):
    raise CommandError(f"--odir LAMBDA,MU must be finite and >= 0, got {text!r}")
  return lam, mu


def _add_raw_options(p) -> None:
  p.add_argument(
    "--shape", default=None,
    help="shape of raw logits, e.g. 1000000,64 (--shape=-1,64: rows from the file size)",
  )  # fmt: skip
  p.add_argument("--dtype", default=None, help="dtype of raw logits (default float32)")
  p.add_argument("--labels-dtype", default=None, help="dtype of raw labels (default int64)")
  p.add_argument(
    "--bytes-dtype", default=None,
    help="dtype of raw --bytes and --documents files (default int64)",
  )  # fmt: skip


def _add_output_options(p) -> None:
  p.add_argument(
    "--json", action="store_true",
    help="print the result as JSON (non-finite numbers as null)",
  )  # fmt: skip
  bar = p.add_mutually_exclusive_group()
  bar.add_argument(
    "--progress", dest="progress", action="store_true", default=None,
    help="show a progress bar with examples/s on stderr (default: when stderr is a terminal)",
  )  # fmt: skip
  bar.add_argument(
    "--no-progress", dest="progress", action="store_false", help="never show the progress bar"
  )


def _add_job_options(p) -> None:
  job = p.add_argument_group(
    "several processes",
    textwrap.fill(
      "join a jax.distributed job; the environment variables JAX_COORDINATOR_ADDRESS, "
      "JAX_NUM_PROCESSES and JAX_PROCESS_ID stand for the options",
      width=76,
    ),
  )
  job.add_argument("--coordinator", default=None, help="HOST:PORT of process 0, which serves it")
  job.add_argument("--num-processes", type=int, default=None, help="processes in the job")
  job.add_argument("--process-id", type=int, default=None, help="this process, 0 .. N-1")
  job.add_argument(
    "--distributed", action="store_true",
    help="join even without the options: JAX detects SLURM, Open MPI or a Cloud TPU",
  )  # fmt: skip
  job.add_argument(
    "--timeout", type=int, default=DEFAULT_TIMEOUT,
    help=f"seconds to wait for every process to join, and for a silent process before "
    f"it is declared dead (default {DEFAULT_TIMEOUT})",
  )  # fmt: skip


# ---------------------------------------------------------------------------
# Options.


def _dtype(text: str | None, flag: str, default: str) -> np.dtype:
  try:
    dt = np.dtype(default if text is None else text)
  except TypeError:
    raise CommandError(f"{flag}: unknown dtype {text!r}") from None
  if dt.kind not in "biuf" or dt.itemsize == 0:
    raise CommandError(f"{flag}: expected a numeric dtype such as float32 or int64, got {text!r}")
  return dt


def _shape(text: str) -> tuple[int, ...]:
  parts = re.split(r"[,x]", text.strip())
  try:
    shape = tuple(int(s) for s in parts)
  except ValueError:
    shape = ()
  ok = bool(shape) and all(d > 0 for d in shape[1:]) and (shape[0] > 0 or shape[0] == -1)
  if not ok or len(shape) < 2:
    raise CommandError(
      f"--shape: expected two or more positive integers like 1000000,64 (the first may be -1), "
      f"got {text!r}"
    )
  return shape


@dataclasses.dataclass(frozen=True)
class _Job:
  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  detect: bool
  timeout: int


def _env_int(name: str) -> int | None:
  text = os.environ.get(name)
  if text is None or text == "":
    return None
  try:
    return int(text)
  except ValueError:
    raise CommandError(f"environment variable {name} must be an integer, got {text!r}") from None


def _job(args) -> _Job | None:
  """The job to join, or None for a single process."""
  coordinator = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num = args.num_processes if args.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  pid = args.process_id if args.process_id is not None else _env_int("JAX_PROCESS_ID")
  if not args.distributed and coordinator is None and num is None and pid is None:
    return None
  if args.timeout < 1:
    raise CommandError(f"--timeout must be >= 1 second, got {args.timeout}")
  if not args.distributed:
    missing = [
      flag
      for flag, v in (
        ("--coordinator", coordinator),
        ("--num-processes", num),
        ("--process-id", pid),
      )
      if v is None
    ]
    if missing:
      raise CommandError(
        f"joining a job needs --coordinator, --num-processes and --process-id; missing "
        f"{', '.join(missing)} (or pass --distributed to let JAX detect the cluster)"
      )
  if num is not None and num < 1:
    raise CommandError(f"--num-processes must be >= 1, got {num}")
  if pid is not None and (pid < 0 or (num is not None and pid >= num)):
    raise CommandError(f"--process-id must be in 0..{(num or 1) - 1}, got {pid}")
  if coordinator is not None and not re.fullmatch(r".+:\d{1,5}", coordinator):
    raise CommandError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
  return _Job(coordinator, num, pid, args.distributed, args.timeout)


# ---------------------------------------------------------------------------
# Files.


@dataclasses.dataclass
class _Source:
  logits_path: str
  labels_path: str
  logits: np.ndarray
  labels: np.ndarray
  byte_counts: np.ndarray | None = None
  documents: np.ndarray | None = None  # per-token ids, or None
  index: int = 0  # the file pair's document id when there are no --documents


def _check_path(path: str, what: str) -> None:
  if os.path.isdir(path):
    raise CommandError(f"{what} path {path!r} is a directory; pass a file")
  if not os.path.exists(path):
    raise CommandError(f"{what} file not found: {path}")


def _open_npy(path: str, what: str) -> np.ndarray:
  try:
    with open(path, "rb") as f:
      magic = f.read(6)
  except OSError as e:
    raise CommandError(f"cannot read {what} file {path!r}: {e.strerror or e}") from None
  if len(magic) == 0:
    raise CommandError(f"{what} file {path!r} is empty (0 bytes), not a .npy file")
  if magic != b"\x93NUMPY":
    raise CommandError(
      f"{what} file {path!r} is not a .npy file (it lacks the .npy header); raw binary "
      "files need another extension, e.g. .bin, with --shape/--dtype"
    )
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise CommandError(f"cannot read {what} file {path!r} as .npy: {e}") from None


def _open_npz(path: str, key: str | None, what: str) -> np.ndarray:
  try:
    with np.load(path, allow_pickle=False) as z:
      names = list(z.files)
      if key is None:
        if what in names and len(names) > 1:
          key = what
        elif len(names) == 1:
          key = names[0]
        else:
          raise CommandError(
            f"{what} archive {path!r} holds {len(names)} arrays {names}; name one as {path}:NAME"
          )
      if key not in names:
        raise CommandError(f"{what} archive {path!r} has no array {key!r}; it has {names}")
      return z[key]
  except CommandError:
    raise
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise CommandError(f"cannot read {what} file {path!r} as .npz: {e}") from None


def _open_raw(path: str, what: str, dtype: np.dtype, shape: tuple[int, ...] | None):
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise CommandError(f"cannot read {what} file {path!r}: {e.strerror or e}") from None
  if shape is None or shape[0] == -1:  # rows from the file size
    row = dtype.itemsize * (1 if shape is None else int(np.prod(shape[1:], dtype=np.int64)))
    if size % row:
      raise CommandError(
        f"{what} file {path!r} has {size} bytes, not a multiple of "
        + (
          f"{dtype} ({dtype.itemsize})"
          if shape is None
          else f"a row of {shape[1:]} {dtype} ({row})"
        )
      )
    shape = (size // row,) + (() if shape is None else tuple(shape[1:]))
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if expected != size:
    raise CommandError(
      f"{what} file {path!r} has {size} bytes but shape {shape} of {dtype} needs {expected}"
    )
  try:
    if size == 0:
      with open(path, "rb"):  # readable?
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)
  except OSError as e:
    raise CommandError(f"cannot read {what} file {path!r}: {e.strerror or e}") from None


def _is_raw(path: str) -> bool:
  low = path.lower()
  return not (low.endswith((".npy", ".npz")) or ".npz:" in low)


def _open(path: str, what: str, args, *, raw_shape=None) -> np.ndarray:
  """Open one file; raw files get `raw_shape` (logits: from --shape; labels: derived)."""
  key = None
  if ".npz:" in path.lower() and not os.path.exists(path):
    cut = path.lower().rindex(".npz:") + 4
    path, key = path[:cut], path[cut + 1 :]
  _check_path(path, what)
  flag = {"logits": "--dtype", "labels": "--labels-dtype"}.get(what, "--bytes-dtype")
  given_dtype = getattr(args, flag[2:].replace("-", "_"), None)
  given_shape = args.shape if what == "logits" else None
  if _is_raw(path):
    if what == "logits" and args.shape is None:
      raise CommandError(f"raw logits file {path!r} needs --shape N,C (and --dtype)")
    default = "float32" if what == "logits" else "int64"
    return _open_raw(path, what, _dtype(given_dtype, flag, default), raw_shape)
  a = _open_npy(path, what) if path.lower().endswith(".npy") else _open_npz(path, key, what)
  # A .npy/.npz file carries its shape and dtype: options that disagree are errors.
  if given_shape is not None:
    want = _shape(given_shape)
    if len(want) != a.ndim or any(w not in (-1, s) for w, s in zip(want, a.shape)):
      raise CommandError(f"--shape {given_shape} is for raw files; {path!r} holds shape {a.shape}")
  if given_dtype is not None and _dtype(given_dtype, flag, "float32") != a.dtype.newbyteorder("="):
    raise CommandError(f"{flag} {given_dtype} is for raw files; {path!r} holds {a.dtype}")
  return a


def _check_label_range(labels: np.ndarray, num_classes: int, ignore_index, path: str) -> None:
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
        + f") in {path!r}"
      )


def _dtype_hint(size_bytes: int, count: int, dtype: np.dtype) -> str:
  """Which integer dtype would give `count` labels from a raw file of `size_bytes`."""
  if count and size_bytes % count == 0 and size_bytes // count in (1, 2, 4, 8):
    k = size_bytes // count
    if k != dtype.itemsize:
      return (
        f"; the file's {size_bytes} bytes are {count} labels of {k} bytes: "
        f"try --labels-dtype int{8 * k}"
      )
  return ""


def open_source(logits_path: str, labels_path: str, args) -> _Source:
  """Open and check one pair of files; raises `CommandError` on any user error."""
  shape = None if args.shape is None else _shape(args.shape)
  logits = _open(logits_path, "logits", args, raw_shape=shape)
  if logits.ndim < 2:
    raise CommandError(f"logits must have shape [N, ..., C], got shape {logits.shape}")
  if not np.issubdtype(logits.dtype, np.floating):
    raise CommandError(f"logits must be floating point, got dtype {logits.dtype}")
  num_classes = logits.shape[-1]
  if num_classes == 0:
    raise CommandError(f"logits {logits_path!r} have 0 classes (shape {logits.shape})")
  if args.top_k > num_classes:
    raise CommandError(
      f"--top-k {args.top_k} is more than the {num_classes} classes of {logits_path!r}"
    )
  raw_labels = _is_raw(labels_path)
  labels = _open(labels_path, "labels", args)
  if raw_labels:  # 1-D from the file: give it the logits' row shape when the sizes agree
    if np.issubdtype(labels.dtype, np.floating) and labels.size == logits.size:
      labels = labels.reshape(logits.shape)
    elif labels.size == math.prod(logits.shape[:-1]):
      labels = labels.reshape(logits.shape[:-1])
  if labels.ndim == 0 or labels.shape[0] != logits.shape[0]:
    hint = ""
    if raw_labels and np.issubdtype(labels.dtype, np.integer):
      hint = _dtype_hint(labels.nbytes, math.prod(logits.shape[:-1]), labels.dtype)
    raise CommandError(
      f"logits have {logits.shape[0]} rows but labels have "
      f"{labels.shape[0] if labels.ndim else 0} (shapes {logits.shape} and {labels.shape})" + hint
    )
  if np.issubdtype(labels.dtype, np.integer):
    if labels.shape != logits.shape[:-1]:
      raise CommandError(
        f"integer labels must have shape {logits.shape[:-1]} (logits without the class axis), "
        f"got {labels.shape}"
      )
    _check_label_range(labels, num_classes, args.ignore_index, labels_path)
  elif np.issubdtype(labels.dtype, np.floating):
    if labels.shape != logits.shape:
      hint = ""
      if labels.shape == logits.shape[:-1]:  # one number per row: class indices saved as floats
        hint = (
          f"; floating labels of shape {labels.shape} look like class indices saved as "
          f"floats: cast them to integers (labels.astype(np.int64)) and save them again"
        )
      raise CommandError(
        f"soft labels must have the logits' shape {logits.shape}, got {labels.shape}" + hint
      )
  else:
    raise CommandError(f"labels must be integer or floating point, got dtype {labels.dtype}")
  return _Source(logits_path, labels_path, logits, labels)


def open_pair(pair: tuple, args) -> _Source:
  """`open_source` of ``(logits, labels, bytes, documents, index)`` paths, with the extras."""
  logits_path, labels_path, bytes_path, documents_path, index = pair
  s = open_source(logits_path, labels_path, args)
  rows = s.labels.shape[:-1] if np.issubdtype(s.labels.dtype, np.floating) else s.labels.shape
  if bytes_path is not None:
    s.byte_counts = _open_per_token(bytes_path, "bytes", rows, args)
  if documents_path is not None:
    s.documents = _open_per_token(documents_path, "documents", rows, args)
  s.index = index
  return s


def _open_per_token(path: str, what: str, rows: tuple, args) -> np.ndarray:
  """An integer array with one entry per token (the labels' row shape), checked."""
  a = _open(path, what, args)
  if _is_raw(path) and a.size == math.prod(rows):
    a = a.reshape(rows)
  if not np.issubdtype(a.dtype, np.integer):
    raise CommandError(f"{what} file {path!r} must hold integers, got dtype {a.dtype}")
  if a.shape != rows:
    raise CommandError(
      f"{what} file {path!r} has shape {a.shape}; it needs one entry per token, shape {rows}"
    )
  if what == "bytes":
    flat = a.reshape(-1)
    for start in range(0, flat.shape[0], _CHECK_CHUNK):
      lo = int(np.min(flat[start : start + _CHECK_CHUNK]))
      if lo < 0:
        raise CommandError(f"bytes file {path!r} holds a negative count ({lo})")
  return a


def _native(a) -> np.ndarray:
  """A batch in native byte order (JAX takes no big-endian arrays)."""
  a = np.asarray(a)
  return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def _pairs(args, process_id: int, num_processes: int) -> list[tuple]:
  """This process's ``(logits, labels, bytes, documents, index)`` files (None: not given).

  ``index`` is the pair's document id without --documents: its place on the
  command line, or with {process} paths (each process its own files)
  ``place * num_processes + process_id``.
  """
  n = len(args.logits)
  given = lambda paths: paths or [None] * n
  pairs = list(zip(args.logits, args.labels, given(args.bytes), given(args.documents), range(n)))
  if any(PLACEHOLDER in p for pair in pairs for p in pair[:4] if p):  # each its own files
    sub = lambda p: None if p is None else p.replace(PLACEHOLDER, str(process_id))
    return [(*map(sub, pair[:4]), pair[4] * num_processes + process_id) for pair in pairs]
  return pairs[process_id::num_processes]


def _first_bad_row(sources: list[_Source], ignore_index) -> str | None:
  """The first counted row whose cross-entropy is NaN, with why: where it is and what it holds."""
  for s in sources:
    z = s.logits.reshape(-1, s.logits.shape[-1])
    soft = np.issubdtype(s.labels.dtype, np.floating)
    y = s.labels.reshape(z.shape[0], -1) if soft else s.labels.reshape(-1)
    step = max(1, _CHECK_CHUNK // max(1, z.shape[1]))
    for start in range(0, z.shape[0], step):
      chunk = np.asarray(z[start : start + step], np.float64)
      yc = np.asarray(y[start : start + step])
      causes = [(~np.isfinite(chunk.max(axis=-1)), "logits that hold NaN, +inf or only -inf")]
      if soft:
        causes += [
          (np.isnan(yc).any(axis=-1), "a NaN soft label"),
          (
            (yc < 0).any(axis=-1),
            "a negative soft label (soft labels are probabilities: >= 0)",
          ),
        ]
      elif ignore_index is not None:
        causes = [(bad & (yc != ignore_index), why) for bad, why in causes]
      bad = np.logical_or.reduce([b for b, _ in causes])
      if bad.any():
        flat = start + int(np.argmax(bad))
        why = next(why for b, why in causes if b[flat - start])
        index = np.unravel_index(flat, s.logits.shape[:-1])
        return f"row {list(map(int, index))} of {s.logits_path!r} has {why}"
  return None


# ---------------------------------------------------------------------------
# Output.


def _json_safe(d: dict) -> dict:
  return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _describe(s: _Source) -> str:
  shape = s.logits.shape
  rows = math.prod(shape[:-1])
  dims = " x ".join(f"{d:,}" for d in shape)
  per = "" if len(shape) == 2 else f" ({' x '.join(f'{d:,}' for d in shape[:-1])} positions)"
  return f"{s.logits_path}: logits {dims}: {rows:,} examples{per} x {shape[-1]:,} classes"


# ---------------------------------------------------------------------------
# Running.


def _check_options(args) -> None:
  if args.batch_size < 1:
    raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.top_k < 1:
    raise CommandError(f"--top-k must be >= 1, got {args.top_k}")
  if args.num_bins < 1:
    raise CommandError(f"--num-bins must be >= 1, got {args.num_bins}")
  if args.base is not None and not (args.base > 0 and args.base != 1 and np.isfinite(args.base)):
    raise CommandError(f"--base must be a finite number > 0 and != 1, got {args.base}")
  if args.shape is not None:
    _shape(args.shape)
  for flag, paths in (
    ("--labels", args.labels),
    ("--bytes", args.bytes),
    ("--documents", args.documents),
  ):
    if (flag == "--labels" or paths) and len(paths) != len(args.logits):
      raise CommandError(
        f"give one {flag} per --logits, got {len(args.logits)} --logits and {len(paths)} {flag}"
      )
  if args.documents and args.per_document is None:
    raise CommandError("--documents needs --per-document OUT.csv (where to write the sums)")
  _dtype(args.dtype, "--dtype", "float32")
  _dtype(args.labels_dtype, "--labels-dtype", "int64")
  _dtype(args.bytes_dtype, "--bytes-dtype", "int64")
  if args.odir is not None and args.calibrate not in ("matrix", "dirichlet"):
    raise CommandError("--odir applies to --calibrate matrix or --calibrate dirichlet")
  _odir(args.odir)


def run(args) -> int:
  _check_options(args)
  job = _job(args)
  if job is not None and args.calibrate:
    raise CommandError("--calibrate fits its map in one process: run it without a job")
  if job is None:
    pairs = _pairs(args, 0, 1)
    sources = [open_pair(pair, args) for pair in pairs]  # every check before JAX starts
    return _evaluate(args, sources=sources, pairs=pairs, job=None)
  if os.environ.get(_WORKER_ENV) is None:
    return _supervise(args, job)
  return _worker(args, job)


def _evaluate(args, *, sources, pairs, job) -> int:
  """Evaluate the files; `sources` already opened (one process) or None (opened lazily)."""
  from xentjax.evaluation._stream import evaluate  # imports JAX: only once the files are good

  opened: list[_Source] = [] if sources is None else list(sources)

  def batches():
    bs = args.batch_size
    for i, pair in enumerate(pairs):
      s = sources[i] if sources is not None else open_pair(pair, args)
      if sources is None:
        opened.append(s)
      n = s.logits.shape[0]
      for start in range(0, n, bs):
        yield _batch(s, slice(start, start + bs), args)

  leader = job is None or _process_index() == 0
  total = sum(s.logits.shape[0] for s in sources) if sources is not None else None
  result = evaluate(
    batches(),
    top_k=args.top_k,
    num_bins=args.num_bins,
    base=args.base,
    ignore_index=args.ignore_index,
    progress=args.progress if leader else False,
    total=total,
    temperature=args.temperature,
  )
  _check_result(result, opened, args, job)
  if not leader:
    return 0
  calibration = _calibrate(args, opened) if args.calibrate else None
  _print_result(result, opened, args, job, calibration)
  if args.plot:
    _write_plot(result, args.plot)
  if args.per_document:
    _write_documents(result.per_document, args, job)
  return 0


def _batch(s: _Source, rows: slice, args):
  """A ``(logits, labels)`` tuple, or a dict with the byte counts and document ids."""
  logits, labels = _native(s.logits[rows]), _native(s.labels[rows])
  if s.byte_counts is None and args.per_document is None:
    return logits, labels
  batch = {"logits": logits, "labels": labels}
  if s.byte_counts is not None:
    batch["byte_counts"] = _native(s.byte_counts[rows])
  if args.per_document is not None:
    ids = s.documents[rows] if s.documents is not None else None
    shape = labels.shape[:-1] if np.issubdtype(labels.dtype, np.floating) else labels.shape
    batch["document_ids"] = _native(ids) if ids is not None else np.full(shape, s.index)
  return batch


def _write_documents(docs, args, job) -> None:
  """The per-document sums as CSV: one row per document id, ascending."""
  import csv

  files = None
  if not args.documents:  # a document per file pair: name its logits file
    n = 1 if job is None else _process_count()
    files = {}
    for i, path in enumerate(args.logits):
      for p in range(n) if PLACEHOLDER in path else (None,):
        files[i if p is None else i * n + p] = path.replace(PLACEHOLDER, str(p))
  bpb = docs.bits_per_byte
  try:
    with open(args.per_document, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["document", "tokens", "bytes", "nll_nats", "bits_per_byte", "file"])
      for j, doc in enumerate(docs.ids.tolist()):
        b = float(bpb[j])
        w.writerow([
          doc, int(docs.count[j]), int(docs.byte_count[j]) if args.bytes else "",
          repr(float(docs.negative_log_likelihood_sum[j])),
          repr(b) if args.bytes and math.isfinite(b) else "",
          "" if files is None else files.get(doc, ""),
        ])  # fmt: skip
  except OSError as e:
    raise CommandError(
      f"cannot write --per-document {args.per_document}: {e.strerror or e}"
    ) from None
  print(f"wrote {args.per_document} ({len(docs.ids):,} documents)", file=sys.stderr)


def _check_result(result, opened: list[_Source], args, job) -> None:
  """One CommandError line for a result that has nothing to say: no examples, or NaN."""
  where = "" if job is None else " in any process"
  if result.count == 0:
    rows = sum(math.prod(s.logits.shape[:-1]) for s in opened)
    raise CommandError(
      f"no examples to evaluate{where}: "
      + (
        f"every one of the {rows:,} labels is ignored (--ignore-index {args.ignore_index})"
        if rows and job is None
        else f"the files have 0 rows, or every label equals --ignore-index {args.ignore_index}"
      )
    )
  if math.isnan(result.cross_entropy):
    bad = _first_bad_row(opened, args.ignore_index)
    if bad is None:  # not in this process's files
      bad = (
        "a row of another process's files has logits that hold NaN, +inf or only -inf, "
        "or a NaN or negative soft label"
        if job is not None
        else "a counted row's logits or soft labels hold NaN or an infinity"
      )
    raise CommandError(f"the cross-entropy is NaN: {bad}")


def _print_result(result, opened: list[_Source], args, job, calibration=None) -> None:
  if args.json:  # the numbers, and the unit of each logarithmic one (`--base` moves only one)
    out = {**_json_safe(result.to_dict()), "units": result.units()}
    if calibration is not None:
      out["calibration"] = {
        k: _json_safe(v) if isinstance(v, dict) else v for k, v in calibration.items()
      }
    print(json.dumps(out, indent=2, allow_nan=False))
    return
  if job is not None:
    import jax

    print(
      f"{jax.process_count()} processes, {jax.device_count()} devices; process 0 read "
      f"{len(opened)} of the files:"
    )
  for s in opened:
    print(_describe(s))
  print(result)
  if calibration is not None:
    print(_calibration_table(calibration))


# ---------------------------------------------------------------------------
# --calibrate: a calibration map fitted on the rows in memory.


def _rows_in_memory(opened: list[_Source], ignore_index):
  """All the files' rows as ``[n, C]`` logits, labels and a mask of the counted rows."""
  z = np.concatenate([_native(s.logits).reshape(-1, s.logits.shape[-1]) for s in opened])
  soft = np.issubdtype(opened[0].labels.dtype, np.floating)
  shape = (-1, z.shape[-1]) if soft else (-1,)
  y = np.concatenate([_native(s.labels).reshape(shape) for s in opened])
  keep = np.ones(len(z), bool) if soft else y != ignore_index
  return z, (y if soft else np.where(keep, y, 0)), keep


def _calibration_numbers(z, y, keep, num_bins: int) -> dict:
  import xentjax
  from xentjax import calibration as C

  if np.issubdtype(np.asarray(y).dtype, np.floating):
    nll = float(np.mean(np.asarray(xentjax.softmax_cross_entropy(z, y))))
  else:
    nll = float(xentjax.metrics.cross_entropy_rate(z, y, where=keep))
  return {
    "cross_entropy": nll,
    "ece": float(C.expected_calibration_error(z, y, num_bins=num_bins, where=keep)),
    "ace": float(C.adaptive_calibration_error(z, y, num_bins=num_bins, where=keep)),
    "smooth_ece": float(C.smooth_ece(z, y, where=keep)),
  }


def _calibrate(args, opened: list[_Source]) -> dict:
  """Fit `calibration.fit(method=args.calibrate)` and the numbers before and after it."""
  from xentjax import calibration as C

  z, y, keep = _rows_in_memory(opened, args.ignore_index)
  odir = _odir(args.odir)
  cal = C.fit(z, y, args.calibrate, odir, where=keep)
  if not np.all(np.isfinite(np.asarray(cal.weight))):
    raise CommandError(f"--calibrate {args.calibrate}: the fit is NaN (see the checks above)")
  out = {"method": args.calibrate, "odir": None if odir is None else list(odir)}
  out["rows"] = int(keep.sum())
  if args.calibrate == "temperature":
    out["temperature"] = float(cal.weight)
  out["before"] = _calibration_numbers(z, y, keep, args.num_bins)
  out["after"] = _calibration_numbers(np.asarray(cal(z)), y, keep, args.num_bins)
  return out


def _calibration_table(c: dict) -> str:
  odir = "" if c["odir"] is None else f", odir={tuple(c['odir'])}"
  t = f", T = {c['temperature']:.4g}" if "temperature" in c else ""
  lines = [
    f"calibration map: {c['method']}{odir}{t}, fitted on the {c['rows']:,} rows above "
    "(in-sample: fit on held-out logits to judge it)",
    f"  {'':8s} {'cross-entropy':>13s} {'ECE':>8s} {'ACE':>8s} {'smooth ECE':>10s}",
  ]
  for when in ("before", "after"):
    d = c[when]
    lines.append(
      f"  {when:8s} {d['cross_entropy']:13.5f} {d['ece']:8.5f} {d['ace']:8.5f} "
      f"{d['smooth_ece']:10.5f}"
    )
  return "\n".join(lines)


def _write_plot(result, path: str) -> None:
  """The reliability diagram of `result`'s bins, saved to `path`."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise CommandError("--plot needs matplotlib: pip install 'xentjax[plots]'") from None
  diagram = result.reliability_diagram()
  title = f"reliability: ECE {diagram.ece:.4f}"
  if result.temperature is not None:  # fitted only with --temperature
    title += f", T = {result.temperature:.3g}"
  ax = diagram.plot(title=title)
  try:
    ax.figure.savefig(path, dpi=100, bbox_inches="tight")
  except OSError as e:
    raise CommandError(f"cannot write --plot {path}: {e.strerror or e}") from None
  finally:
    plt.close(ax.figure)
  print(f"wrote {path}", file=sys.stderr)


def _process_index() -> int:
  import jax

  return jax.process_index()


def _process_count() -> int:
  import jax

  return jax.process_count()


# ---------------------------------------------------------------------------
# Several processes: a supervised child joins the job.


def _worker(args, job: _Job) -> int:
  """Join the job, evaluate this process's files; exit at once on failure."""
  import xentjax.distributed as dist

  try:
    dist.initialize(
      job.coordinator, job.num_processes, job.process_id,
      timeout=job.timeout, heartbeat_timeout=job.timeout,
    )  # fmt: skip
  except (ValueError, TypeError, RuntimeError) as e:  # e.g. no cluster detected
    hint = " (no cluster detected: pass --coordinator, --num-processes, --process-id)"
    _fail(args, f"xentjax evaluate: error: cannot join the job: {e}" + hint * job.detect, 2)
  import jax

  pid, n = jax.process_index(), jax.process_count()
  try:
    # Round-robin shares are only right when every process has the same list.
    lists = dist.allgather([args.logits, args.labels, args.bytes, args.documents])
    if any(other != lists[0] for other in lists):
      raise CommandError(
        "the processes were given different --logits/--labels lists; give every process "
        "the same list (file pair i goes to process i mod N), or name each process's own "
        f"files with {PLACEHOLDER} in the path"
      )
    pairs = _pairs(args, pid, n)
    return _evaluate(args, sources=None, pairs=pairs, job=job)
  except CommandError as e:
    _fail(args, f"xentjax evaluate: error: {e}" + ("" if n == 1 else f" (process {pid} of {n})"), 2)
  except dist.ProcessFailedError as e:
    _fail(args, f"xentjax evaluate: error: {e}", 1)
  except ValueError as e:  # the processes were given different options
    _fail(args, f"xentjax evaluate: error: {e}", 2)
  except Exception as e:
    _fail(args, f"xentjax evaluate: error: process {pid} of {n}: {type(e).__name__}: {e}", 1)
  return 0  # not reached


def _fail(args, message: str, code: int):
  """Print one line and leave without JAX's shutdown barrier (the peers are failing too)."""
  print(message.splitlines()[0] if message else message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)


_FATAL = re.compile(r"^F\d{4} [\d:.]+\s+\d+ \S+\] (.*)$")


def _summarize_fatal(log: str, job: _Job) -> str:
  """One line for the fatal error JAX ended the child with."""
  lines = log.splitlines()
  fatal = next((m.group(1) for line in reversed(lines) if (m := _FATAL.match(line))), None)
  text = "\n".join(lines[-40:])
  who = "" if job.process_id is None else f"process {job.process_id}: "
  if "RegisterTask" in text or ("DEADLINE_EXCEEDED" in text and "connect" in text.lower()):
    everyone = (
      "all processes" if job.num_processes is None else f"all {job.num_processes} processes"
    )
    return (
      f"{who}could not join the job within --timeout {job.timeout} s: the coordinator "
      f"{job.coordinator or '(detected)'} is unreachable, or not {everyone} started"
    )
  if "heartbeat" in text.lower() or "unhealthy" in text.lower():
    return f"{who}another process of the job stopped responding (died or hung) for {job.timeout} s"
  if fatal:
    return f"{who}JAX ended the process: {fatal[:300]}"
  return f"{who}the process ended abnormally"


def _supervise(args, job: _Job) -> int:
  """Run this command again as a child that joins the job; one line if JAX kills it.

  The child's Python `sys.stdout`/`sys.stderr` are this process's (passed as
  extra file descriptors); its fds 1 and 2, where JAX's C++ runtime and gloo
  write their logs, go to a log file that is kept only when the child fails.
  """
  argv = list(getattr(args, "argv", None) or sys.argv[1:])
  if args.progress is None:
    argv.append("--progress" if _isatty(sys.stderr) else "--no-progress")
  sys.stdout.flush()
  sys.stderr.flush()
  user = (os.dup(sys.stdout.fileno()), os.dup(sys.stderr.fileno()))
  # Kept past this function when the child fails (its path is in the message).
  log = tempfile.NamedTemporaryFile(prefix="xentjax-evaluate-", suffix=".log", delete=False)  # noqa: SIM115
  env = dict(os.environ, **{_WORKER_ENV: f"{user[0]},{user[1]}"})
  try:
    child = subprocess.Popen(
      [sys.executable, "-m", "xentjax", *argv],
      env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=user,
    )  # fmt: skip
  finally:
    for fd in user:
      os.close(fd)

  def forward(signum, frame):
    del frame
    child.send_signal(signum)

  # Ctrl-C reaches the child directly (same process group); SIGTERM is passed on.
  old = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
         signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}  # fmt: skip
  try:
    code = child.wait()
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    log.close()
  if code >= 0:
    os.unlink(log.name)
    return code
  with open(log.name, errors="replace") as f:
    text = f.read()
  print(
    f"xentjax evaluate: error: {_summarize_fatal(text, job)} (JAX's log: {log.name})",
    file=sys.stderr,
  )
  return 1


def _isatty(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def use_user_streams() -> None:
  """In a supervised child: Python's stdout/stderr are the user's, fds 1 and 2 the log file."""
  fds = os.environ.get(_WORKER_ENV)
  if fds is not None:
    out, err = (int(fd) for fd in fds.split(","))
    sys.stdout = open(out, "w", buffering=1, closefd=False)  # noqa: SIM115 -- for the process's life
    sys.stderr = open(err, "w", buffering=1, closefd=False)  # noqa: SIM115
