"""kvforge's exceptions.

Every caller mistake or exhausted resource raises a subclass of
:class:`KVForgeError`. Messages say what was asked, what was available and
which id was involved; the operation that raised has changed nothing.
"""
from __future__ import annotations

__all__ = [
    "KVForgeError",
    "ConfigError",
    "OutOfBlocksError",
    "InvalidBlockError",
    "SequenceError",
    "KernelError",
    "ModelError",
    "TraceError",
    "MissingExtraError",
    "ServeError",
    "AddressInUseError",
]


class KVForgeError(Exception):
    """Base class of every error kvforge raises on purpose."""


class ConfigError(KVForgeError, ValueError):
    """A configuration value is invalid (names the field and the value)."""


class OutOfBlocksError(KVForgeError, MemoryError):
    """Not enough free blocks (or device memory) for the request.

    ``requested`` and ``available`` are the block counts involved.
    """

    def __init__(self, message: str, requested: int = 0, available: int = 0) -> None:
        super().__init__(message)
        self.requested = requested
        self.available = available


class InvalidBlockError(KVForgeError, ValueError):
    """A block id is unknown, out of range, or in the wrong state."""


class SequenceError(KVForgeError, KeyError):
    """A sequence id is unknown or already present, or a position is out of range."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class KernelError(KVForgeError, ValueError):
    """A kernel was called with unsupported shapes, dtypes or strides."""


class ModelError(KVForgeError, ValueError):
    """A checkpoint cannot be loaded (unknown architecture, missing file, ...)."""


class TraceError(KVForgeError, ValueError):
    """A workload trace is malformed (names the line and the reason)."""


class MissingExtraError(KVForgeError, ImportError):
    """An optional dependency is not installed; the message names the extra to
    install (``pip install 'kvforge[plot]'``)."""


class ServeError(KVForgeError, OSError):
    """An endpoint could not be opened; names the address (``addr``, ``port``)."""

    def __init__(self, message: str, addr: str = "", port: int = 0, errno: int | None = None) -> None:
        super().__init__(message)
        self.addr = addr
        self.port = port
        self.errno = errno


class AddressInUseError(ServeError):
    """The address and port asked for are taken by another socket (``errno`` EADDRINUSE)."""
