"""The corpus: the Python standard library's own source files, split by file."""

from __future__ import annotations

import hashlib
import pathlib
import sys
import sysconfig

# Every HELD_OUT_EVERY-th file of the sorted list is held out (about 10%).
HELD_OUT_EVERY = 10
_SKIP = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def source_files() -> list[pathlib.Path]:
  """The standard library's `.py` files (no installed packages), sorted by relative path."""
  root = stdlib_dir()
  files = [f for f in root.rglob("*.py") if not _SKIP & set(f.relative_to(root).parts)]
  return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def split(files: list[pathlib.Path]) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """Deterministic train / held-out split by file: every tenth file is held out."""
  train = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
  held = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
  return train, held


def read(f: pathlib.Path) -> str:
  return f.read_text(encoding="utf-8", errors="replace")


def fingerprint(files: list[pathlib.Path]) -> str:
  """A short hash of the Python version and the file list (names and sizes): the cache key."""
  h = hashlib.sha256(f"{sys.version_info[:2]}".encode())
  root = stdlib_dir()
  for f in files:
    h.update(f"{f.relative_to(root).as_posix()}:{f.stat().st_size}\n".encode())
  return h.hexdigest()[:10]
