"""Optional dependencies: which extra brings each one, and the check a command makes first.

kvforge installs with torch and numpy only; everything else is an extra
(``pip install "kvforge[plot]"``). A command that needs one calls
:func:`require` before any work starts, so that a missing package is one
line naming the extra (``kvforge demo: error: the demo's block maps need
matplotlib: pip install "kvforge[plot]"``, exit status 2), never a traceback
halfway through a run.
"""
from __future__ import annotations

import importlib

from kvforge.errors import MissingExtraError

__all__ = ["EXTRAS", "install_hint", "require"]

#: extra -> (import name, distribution name) of each package it brings
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "triton": (("triton", "triton"),),
    "engine": (("safetensors", "safetensors"), ("tokenizers", "tokenizers")),
    "plot": (("matplotlib", "matplotlib"),),
    "metrics": (("prometheus_client", "prometheus-client"),),
    "remote": (("redis", "redis"), ("hiredis", "hiredis")),
}


def install_hint(extra: str) -> str:
    """``pip install "kvforge[extra]"`` (double quotes: the same line works in POSIX shells and cmd.exe)."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r} (known: {', '.join(EXTRAS)})")
    return f'pip install "kvforge[{extra}]"'


def require(module: str, extra: str, why: str, *, alternative: str = "") -> None:
    """Import ``module`` or raise :class:`~kvforge.errors.MissingExtraError`
    ``"<why>: pip install "kvforge[<extra>]""`` (then `` (or <alternative>)``
    when there is a way to do without, such as ``"pass --no-plots"``).

    The module is really imported (not merely looked up), so that a package
    that is installed but broken counts as missing too; callers need it
    next anyway. ``why`` says who needs it (``"the demo's block maps need
    matplotlib"``)."""
    hint = install_hint(extra)
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{why}: {hint}" + (f" (or {alternative})" if alternative else "")) from exc
