"""The `xentjax` command line: one private module per subcommand, wired by `main`.

* `_main`: the parser and `main`, the entry point of the `xentjax` command
  (``[project.scripts]`` in pyproject.toml) and of ``python -m xentjax``;
* `_common`: the one-line user error and the parser helper that every
  subcommand imports (never `_main`, so there is no import cycle);
* `_explain`, `_demo`, `_evaluate`: the subcommands, each exposing
  `register(subparsers)`.

The command line parses, calls the library and prints; `--help` and `--version`
do not import JAX. docs/cli.md documents its options.
"""

from xentjax.cli._main import main as main

__all__ = ["main"]
