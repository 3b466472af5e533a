"""The ``kvforge`` entry point: parser assembly, logging setup, error handling.

Each subcommand lives in its own module with a ``register(subparsers)``
that sets its handler as ``func``: :mod:`~kvforge.tools.plan`,
:mod:`~kvforge.tools.simulate`, :mod:`~kvforge.tools.generate`,
:mod:`~kvforge.tools.demo`.

User errors never show a traceback: a kvforge error a handler raises, and an
``OSError`` (a path that cannot be read or written), print one line
``kvforge <command>: error: ...`` to stderr and exit with status 2, as do
argument errors (one line, then a pointer to ``--help``). An interrupt
prints one line and exits with 130. Anything else is a bug in kvforge and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, NoReturn, Sequence

from kvforge.errors import KVForgeError
from kvforge.tools import plan
from kvforge.tools.output import error_line, format_table, one_line

__all__ = ["main", "build_parser", "error_line", "format_table"]

log = logging.getLogger(__name__)

#: subcommand modules that need optional extras (torch models, plotting): skipped when they do not import
_OPTIONAL_COMMANDS = ("kvforge.tools.simulate", "kvforge.tools.generate", "kvforge.tools.demo")


def _optional_registrars() -> list[Callable[[argparse._SubParsersAction], object]]:
    regs = []
    for module in _OPTIONAL_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:  # optional extras missing: the command says so when used
            log.debug("subcommand module %s unavailable: %s", module, exc)
            continue
        regs.append(mod.register)
    return regs


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``kvforge`` argument parser with every subcommand."""
    parser = _Parser(prog="kvforge", description="A paged KV cache for LLM inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    plan.register(sub)
    for register in _optional_registrars():
        register(sub)
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
