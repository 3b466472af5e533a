"""Checks of command-line values, before any work starts.

Every check raises :class:`~kvforge.errors.ConfigError` naming the flag and
the value, which the entry point prints as one line (``kvforge demo: error:
--requests must be an integer >= 1, got 0``). Subcommands call them first
thing, so that a mistake fails before a model loads or a workload runs.
"""
from __future__ import annotations

import math
import os

from kvforge.errors import ConfigError

__all__ = ["check_int", "check_float", "check_bytes", "check_out_dir"]


def check_int(flag: str, value: int | None, lo: int = 1, hi: int | None = None) -> int | None:
    """``value`` if it lies in [lo, hi] (None passes: the flag was not given)."""
    if value is None:
        return None
    if value < lo or (hi is not None and value > hi):
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ConfigError(f"{flag} must be an integer {want}, got {value}")
    return value


def check_float(flag: str, value: float | None, lo: float, hi: float = math.inf, *,
                lo_open: bool = False) -> float | None:
    """``value`` if it is a finite number in [lo, hi] ((lo, hi] with ``lo_open``);
    nan and infinities are refused."""
    if value is None:
        return None
    above = value > lo if lo_open else value >= lo
    if not (math.isfinite(value) and above and value <= hi):
        if math.isfinite(hi):
            want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        else:
            want = f"{'>' if lo_open else '>='} {lo:g}"
        raise ConfigError(f"{flag} must be a finite number {want}, got {value!r}")
    return value


def check_bytes(flag: str, text: str | None, *, positive: bool = True) -> int | None:
    """A byte size (``'24GiB'``) read with :func:`~kvforge.config.parse_bytes`, named by its flag."""
    from kvforge.config import parse_bytes  # imports torch: not at module level (parsers import this module)

    if text is None:
        return None
    try:
        value = parse_bytes(text)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
    if positive and value <= 0:
        raise ConfigError(f"{flag} must be a positive byte size such as 24GiB, got {text!r}")
    return value


def check_out_dir(flag: str, path: str) -> str:
    """Create the output folder ``path`` (and its parents) now, and check that files
    can be written into it, so that a long run does not fail at its very end."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {path!r}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r}: not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path!r}: the folder is not writable")
    return path
