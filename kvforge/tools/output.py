"""What the tools print: aligned tables and progress of long work.

Every table a tool prints goes through :func:`format_table`; every progress
display is a :class:`Progress`. On a terminal a progress bar redraws one line
with carriage returns; anywhere else (a log file, a pipe, CI) it writes a
plain line now and then instead, so that logs never hold a ``\\r``.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence, TextIO

__all__ = ["format_table", "Progress", "error_line", "one_line"]


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines too) made one space."""
    return " ".join(str(text).split())


def error_line(command: str, exc: BaseException) -> str:
    """The one line a failed ``kvforge <command>`` prints for ``exc``: a kvforge
    error's message, or an ``OSError``'s reason and the path(s) it names."""
    from kvforge.errors import KVForgeError

    if isinstance(exc, OSError) and not isinstance(exc, KVForgeError):
        what = exc.strerror or str(exc)
        where = " -> ".join(repr(os.fsdecode(f)) for f in (exc.filename, exc.filename2) if f is not None)
        text = f"{where}: {what}" if where else what
    else:
        text = str(exc)
    return f"kvforge {command}: error: {one_line(text) or type(exc).__name__}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """An aligned text table: the header row, a rule of dashes, the rows.

    Without ``align`` numbers are right-aligned and everything else (headers
    too) left-aligned. ``align`` gives one letter per column, ``l`` or ``r``,
    applied to the headers and every row alike. Trailing spaces are dropped.
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if align is not None and (len(align) != len(headers) or set(align) - {"l", "r"}):
        raise ValueError(f"align must give 'l' or 'r' for each of {len(headers)} columns, got {align!r}")

    def fmt(row: Sequence[str], raw: Sequence[object] | None) -> str:
        out = []
        for i, c in enumerate(row):
            if align is not None:
                right = align[i] == "r"
            else:
                right = raw is not None and isinstance(raw[i], (int, float))
            out.append(c.rjust(widths[i]) if right else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(cells[0], None), "  ".join("-" * w for w in widths)]
    lines += [fmt(c, r) for c, r in zip(cells[1:], rows)]
    return "\n".join(lines)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress of ``total`` units of work (requests, by default) on a stream (stderr).

    Call :meth:`update` (or the object itself, ``progress(done, total)``, as
    :func:`~kvforge.tools.simulate.simulate` does) as often as convenient: it
    draws at most once per ``interval`` seconds, and always when the work is
    done. On a terminal it redraws a bar in place (``\\r``) every 0.2 s by
    default and ends the line when done. Elsewhere it writes a plain line
    every 10 s by default, and a last one when done, but only if it wrote
    any: short work leaves a log untouched. ``enabled=False`` draws nothing.
    """

    def __init__(self, label: str, total: int = 0, *, unit: str = "requests", enabled: bool = True,
                 stream: TextIO | None = None, interval: float | None = None, width: int = 30) -> None:
        self.label, self.total, self.unit, self.enabled, self.width = label, total, unit, enabled, width
        self.stream = stream if stream is not None else sys.stderr
        self.is_terminal = _is_terminal(self.stream)
        self.interval = interval if interval is not None else (0.2 if self.is_terminal else 10.0)
        self.start = time.perf_counter()
        self._last = self.start
        self._num_drawn = 0
        self._line_len = 0
        self._finished = False

    def due(self) -> bool:
        """Whether the next :meth:`update` of unfinished work would draw (lets a
        caller skip computing what it would show)."""
        return self.enabled and not self._finished and time.perf_counter() - self._last >= self.interval

    def update(self, done: int, total: int | None = None, note: str = "") -> None:
        """Report ``done`` of ``total`` units (default: the total given before);
        ``note`` is appended (a rate, say)."""
        if total is not None:
            self.total = total
        if not self.enabled or self._finished:
            return
        final = done >= self.total
        if not final and not self.due():
            return
        if final:
            self._finished = True
            if not self.is_terminal and not self._num_drawn:
                return
        self._draw(done, note, final)

    __call__ = update

    def close(self) -> None:
        """End a bar left unfinished (work stopped early) so the next output starts a new line."""
        if self.enabled and self.is_terminal and self._num_drawn and not self._finished:
            self.stream.write("\n")
            self.stream.flush()
        self._finished = True

    def _draw(self, done: int, note: str, final: bool) -> None:
        now = time.perf_counter()
        elapsed = now - self.start
        tail = f"  {note}" if note else ""
        if self.is_terminal:
            frac = min(1.0, done / self.total) if self.total else 1.0
            bar = "#" * int(self.width * frac)
            line = f"{self.label} [{bar:<{self.width}}] {done}/{self.total} {self.unit} {elapsed:5.1f}s{tail}"
            # pad over the rest of a longer previous line
            self.stream.write(f"\r{line:<{self._line_len}}" + ("\n" if final else ""))
            self._line_len = len(line)
        else:
            pct = f" ({done / self.total:.0%})" if self.total else ""
            self.stream.write(f"{self.label}: {done}/{self.total} {self.unit}{pct} {elapsed:.1f}s{tail}\n")
        self.stream.flush()
        self._last = now
        self._num_drawn += 1
