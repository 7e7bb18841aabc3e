"""The `xentjax` command line: parses, calls the library, prints.

Each subcommand lives in its own module of `xentjax.cli` (`_explain`, `_demo`,
`_evaluate`) exposing `register(subparsers)`; this module only wires them, by
explicit import. User errors are raised as `xentjax.cli._common.CommandError`
and printed as one line with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from xentjax.cli import _demo, _evaluate, _explain
from xentjax.cli._common import CommandError

_SUBCOMMANDS = (_explain, _demo, _evaluate)


def _version() -> str:
  from importlib import metadata

  from xentjax import __version__

  try:
    jax_version = metadata.version("jax")
  except metadata.PackageNotFoundError:
    jax_version = "not installed"
  return f"xentjax {__version__} (jax {jax_version}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="xentjax",
    description="Cross-entropy, explained and demonstrated (JAX).",
  )
  parser.add_argument("--version", action="version", version=_version())
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  for command in _SUBCOMMANDS:
    command.register(sub)
  return parser


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  _evaluate.use_user_streams()  # a supervised `evaluate` child: see there
  parser = build_parser()
  args, extra = parser.parse_known_args(argv)
  if extra:  # the subcommand's own usage, not the top level's
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subparsers.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
  args.argv = argv
  try:
    return int(args.func(args) or 0)
  except CommandError as e:
    print(f"xentjax {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
