"""Page-locking host memory the cache did not allocate: the remote tier's shared regions.

A device copy from ordinary (pageable) host memory is synchronous: the driver
stages it through a pinned buffer of its own while the calling thread waits.
Memory registered with ``cudaHostRegister`` (``hipHostRegister`` on ROCm:
PyTorch's ``torch.cuda.cudart()`` binds the HIP calls under the same names
there) is copied by DMA, asynchronously, as from ``pin_memory=True``
tensors. :func:`register` locks a region and returns a token for
:func:`unregister`, or None where registration is unavailable (a CPU build,
no device) or refused (locked-memory limits): the caller then stages its
copies through its own pinned buffers, as before.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch

__all__ = ["Registration", "register", "unregister"]

log = logging.getLogger(__name__)


class Registration(NamedTuple):
    """A registered region: its address, size and the device whose context registered it."""

    ptr: int
    nbytes: int
    device: torch.device


def _succeeded(cudart: Any, rc: Any) -> bool:
    success = getattr(getattr(cudart, "cudaError", None), "success", 0)
    try:
        return rc == success or int(rc) == 0
    except (TypeError, ValueError):
        return False


def register(view: memoryview, device: torch.device) -> Registration | None:
    """Page-lock the memory under ``view`` (writable, page-aligned: an ``mmap``) for copies
    to ``device``; None when that is unavailable or fails (logged)."""
    if device.type != "cuda":
        return None
    try:
        cudart = torch.cuda.cudart()
        t = torch.frombuffer(view, dtype=torch.uint8)
        ptr, nbytes = t.data_ptr(), t.numel()
        del t
        with torch.cuda.device(device):
            rc = cudart.cudaHostRegister(ptr, nbytes, 0)
    except Exception as exc:  # no runtime bindings (a CPU build), no device
        log.info("page-locking %d bytes of shared memory is unavailable (%s): uploads are staged", len(view), exc)
        return None
    if not _succeeded(cudart, rc):
        log.warning("page-locking %d bytes of shared memory failed (%s): uploads are staged", nbytes, rc)
        return None
    return Registration(ptr, nbytes, device)


def unregister(reg: Registration) -> None:
    """Undo :func:`register` (before the memory is unmapped)."""
    cudart = torch.cuda.cudart()
    with torch.cuda.device(reg.device):
        rc = cudart.cudaHostUnregister(reg.ptr)
    if not _succeeded(cudart, rc):
        log.warning("unregistering %d bytes of shared memory failed (%s)", reg.nbytes, rc)
