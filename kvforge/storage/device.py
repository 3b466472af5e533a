"""Device resolution and the chunked device storage of a cache."""
from __future__ import annotations

import torch

from kvforge.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``'auto'`` -> the CUDA/ROCm device when present, else the CPU.

    Raises :class:`ConfigError` for a name torch does not know or a device
    this machine does not have."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r} (use 'cpu', 'cuda', 'cuda:N' or 'auto')") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device {device!r} is not available here "
                          f"({torch.cuda.device_count()} CUDA/ROCm device(s) visible)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: kvforge runs on 'cpu' and 'cuda' (CUDA or ROCm) devices")
    return dev
