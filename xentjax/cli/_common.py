"""What the subcommands share: the one-line user error and the parser helper.

`xentjax.cli._main` wires the subcommands (`_explain`, `_demo`, `_evaluate`), each a
module of this package exposing `register(subparsers)`; they import this module,
never `main`, so the command line has no import cycle.
"""

from __future__ import annotations

import argparse


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
