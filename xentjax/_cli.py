"""The `xentjax` command line: parses, calls the library, prints.

Each subcommand lives in its own module (`_cli_explain`, `_cli_demo`,
`_cli_evaluate`) exposing `register(subparsers)`; this file only wires them.
User errors are raised as `CommandError` and printed as one line with exit
status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_SUBCOMMANDS = ("explain", "demo", "evaluate")


class CommandError(Exception):
  """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="xentjax",
    description="Cross-entropy, explained and demonstrated (JAX).",
  )
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True
  for name in _SUBCOMMANDS:
    importlib.import_module(f"xentjax._cli_{name}").register(sub)
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
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
