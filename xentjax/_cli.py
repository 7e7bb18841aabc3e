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


def own_demo_seed(args, flag: str, does: str) -> int:
  """The ``--seed`` of a demo that trains its own model (``--distill``, ``--contrastive``).

  Refuses the main demo's ``--compare`` and ``--loss``, which such a demo
  does not read (``does`` says what it does instead, for the message).
  """
  if getattr(args, "compare", False) or getattr(args, "loss", None) is not None:
    raise CommandError(f"{flag} {does}; leave out --compare and --loss")
  try:
    seed = int(getattr(args, "seed", 0) or 0)
  except ValueError:
    raise CommandError(f"--seed must be an integer >= 0, got {args.seed!r}") from None
  if seed < 0:
    raise CommandError(f"--seed must be an integer >= 0, got {args.seed!r}")
  return seed


def add_command(subparsers, name: str, *, help: str, description: str, epilog: str):
  """A subcommand whose description and epilog (examples) are printed as written."""
  return subparsers.add_parser(
    name,
    help=help,
    description=description,
    epilog=epilog,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )


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
  for name in _SUBCOMMANDS:
    importlib.import_module(f"xentjax._cli_{name}").register(sub)
  return parser


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
  from xentjax import _cli_evaluate

  _cli_evaluate.use_user_streams()  # a supervised `evaluate` child: see there
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
