"""The ``kvforge`` entry point: parser assembly, logging setup, error handling.

Each subcommand lives in its own module with a ``register(subparsers)``
that sets its handler as ``func``: :mod:`~kvforge.tools.plan`,
:mod:`~kvforge.tools.simulate`, :mod:`~kvforge.tools.generate`,
:mod:`~kvforge.tools.demo`. A kvforge error a handler raises prints one line
and exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from kvforge.errors import KVForgeError
from kvforge.tools import plan
from kvforge.tools.output import format_table

__all__ = ["main", "build_parser", "format_table"]

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


def build_parser() -> argparse.ArgumentParser:
    """The ``kvforge`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="kvforge", description="A paged KV cache for LLM inference.")
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
    except KVForgeError as exc:
        print(f"kvforge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
