"""The ``kvforge`` entry point: parser assembly, logging setup, error handling.

Each subcommand lives in its own module with a ``register(subparsers)``
that sets its handler as ``func``: :mod:`~kvforge.tools.plan`,
:mod:`~kvforge.tools.simulate.cli`, :mod:`~kvforge.tools.generate`,
:mod:`~kvforge.tools.demo`. Those modules import nothing heavy at module
level (torch, triton, matplotlib, the engine), so ``kvforge --help`` and
``kvforge <cmd> --help`` answer at once and work whatever extras are
installed; every command checks the extras it needs first thing
(:mod:`~kvforge.tools.extras`).

User errors never show a traceback: a kvforge error a handler raises, and an
``OSError`` (a path that cannot be read or written), print one line
``kvforge <command>: error: ...`` to stderr and exit with status 2, as do
argument errors (one line, then a pointer to ``--help``). An interrupt
prints one line and exits with 130. Anything else is a bug in kvforge and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, NoReturn, Sequence

from kvforge import __version__
from kvforge.errors import KVForgeError
from kvforge.tools import demo, generate, plan
from kvforge.tools.args import HelpFormatter
from kvforge.tools.output import error_line, format_table, one_line
from kvforge.tools.simulate import cli as simulate_cli

__all__ = ["main", "build_parser", "error_line", "format_table"]

log = logging.getLogger(__name__)

#: the subcommands' modules, in the order ``kvforge --help`` lists them
_COMMANDS = (plan, simulate_cli, generate, demo)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line and whose help shows
    every option's default (subcommands inherit both)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``kvforge`` argument parser with every subcommand (imports no torch)."""
    parser = _Parser(prog="kvforge", description="A paged KV cache for LLM inference.")
    parser.add_argument("--version", action="version", version=f"kvforge {__version__}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvforge`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (KVForgeError, OSError) as exc:
        log.debug("kvforge %s failed", args.command, exc_info=True)
        print(error_line(args.command, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kvforge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
