"""Launching a compiled Triton kernel again without the JIT's per-call dispatch.

``kernel[grid](*args, **constexprs)`` binds every argument, specializes each
one (its type, 16-byte alignment of pointers, divisibility of ints), builds a
cache key from all of that and looks the compiled kernel up: 15-30 us of host
time per call for kernels of 30-40 arguments, more than many of their GPU
times. A :class:`Launch` is one fixed launch of one kernel — the grid, the
constexprs, the launch options and every scalar argument the same from call
to call; only the pointers change. Its first call goes through the JIT
(compiling if needed) and keeps the compiled kernel; later calls hand the
launcher raw pointers, which it passes on as they are.

That is sound because everything the JIT specializes on is fixed for a
launch except pointer alignment, and :meth:`Launch.fast` is only taken when
every pointer is 16-byte aligned and the JIT call was too (otherwise the JIT
runs again, as it would have anyway). Launch hooks (profilers such as
Proton), the CPU interpreter and a change of the current device also take
the JIT path. Callers own the rest: the scalars and the kinds of tensor
(dtype, strides) of a launch must be those it was built for.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import triton
from triton import knobs

__all__ = ["Launch", "aligned", "attention_scalars", "current_device", "current_stream", "is_capturing", "no_launch_hooks",
           "view_chunks", "view_pointers"]

_RUNTIME = knobs.runtime

try:  # what Triton's own driver uses: the raw handle, no Stream object
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - older torch or a build without CUDA/ROCm
    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


#: The current device's index and whether its current stream is capturing a graph, each
#: read straight from torch's binding (the ``torch.cuda`` functions wrap the same calls in
#: lazy-init checks that a launch, which follows a compiled one, no longer needs).
current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
is_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", torch.cuda.is_current_stream_capturing)


def current_stream(device_index: int) -> int:
    """The current stream's raw handle on device ``device_index``."""
    return _raw_stream(device_index)


def aligned(*pointers: int) -> bool:
    """Whether every pointer is 16-byte aligned (what the JIT specializes on)."""
    acc = 0
    for p in pointers:
        acc |= p
    return not acc & 15


def no_launch_hooks() -> bool:
    """Whether no launch hook is installed: Triton 3.4+ keeps them in (possibly empty)
    chains, earlier releases as one callable or None."""
    for hook in (_RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def attention_scalars(view: Any, query: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor, *,
                      scale: float, soft_cap: float | None, sliding_window: int | None, count: int) -> tuple:
    """The scalar arguments the decode and prefill kernels take after their pointers, in their
    order: softmax scale, soft cap (1.0 when off), window (0 when off), the view's chunk size
    and count, ``count`` (decode: splits; prefill: sequences), then the strides of the query,
    the cache rows, the block table and the output."""
    k0 = view.k_chunks[0]
    return (float(scale), float(soft_cap or 1.0), int(sliding_window or 0), view.chunk_blocks, view.num_chunks,
            count, query.stride(0), query.stride(1), k0.stride(0), k0.stride(1), k0.stride(2),
            block_tables.stride(0), out.stride(0), out.stride(1))


def view_pointers(view: Any) -> tuple[int, int, int, int, int]:
    """A :class:`~kvforge.kernels.CacheView`'s fixed pointers, as the kernels take them: the
    first key and value chunks, the chunk offset table (0 without one), the key and value
    scales (0 unless fp8). The view's serial pins them (see :mod:`kvforge.kernels.ops`)."""
    k0, v0 = view.k_chunks[0], view.v_chunks[0]
    fp8 = view.k_scale is not None
    return (k0.data_ptr(), v0.data_ptr(), view.offsets.data_ptr() if view.offsets is not None else 0,
            view.k_scale.data_ptr() if fp8 else 0, view.v_scale.data_ptr() if fp8 else 0)


def view_chunks(view: Any, as_bytes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The first key and value chunks of a view for a JIT launch, as uint8 views when the
    fp8 bytes are read (or written) by integer arithmetic rather than the compiler's fp8 type."""
    k0, v0 = view.k_chunks[0], view.v_chunks[0]
    if as_bytes:
        return k0.view(torch.uint8), v0.view(torch.uint8)
    return k0, v0


class Launch:
    """One kernel launch whose only per-call inputs are its pointers.

    ``fn``: the ``@triton.jit`` function; ``grid``: up to three ints;
    ``constexprs``: every constexpr argument by name; ``options``: JIT
    options (``num_warps``, ``num_stages``). Call :meth:`jit` with the
    kernel's runtime arguments (tensors for pointers) the first time and
    whenever the fast path does not hold; :meth:`fast` with the same
    arguments, pointers as ints, when it does: a kernel is kept
    (:attr:`device` >= 0) for the current device, :func:`no_launch_hooks`,
    and every pointer is :func:`aligned`.
    """

    __slots__ = ("fn", "grid", "constexprs", "options", "device", "_run", "_function", "_packed", "_tail", "_direct")

    def __init__(self, fn: Any, grid: tuple[int, ...], constexprs: dict[str, Any], **options: Any) -> None:
        kinds = [p.is_constexpr for p in getattr(fn, "params", ())]
        assert kinds == sorted(kinds), f"{fn}: constexpr parameters must come last (the fast path appends them)"
        self.fn = fn
        self.grid = (tuple(grid) + (1, 1))[:3]
        self.constexprs = constexprs
        self.options = options
        self.device = -1  # the device of the kept kernel; -1: none kept
        self._run: Callable[..., Any] | None = None
        self._function: Any = None
        self._packed: Any = None
        self._tail: tuple[Any, ...] = ()
        self._direct: tuple[Callable[..., Any], int, int] | None = None

    def jit(self, *args: Any, pointers_aligned: bool = False) -> None:
        """Launches through the JIT and keeps the compiled kernel for :meth:`fast` when
        ``pointers_aligned`` (the caller checked every pointer argument with :func:`aligned`)."""
        kernel = self.fn[self.grid](*args, **self.constexprs, **self.options)
        if kernel is None or not pointers_aligned or not hasattr(kernel, "packed_metadata"):
            return  # the interpreter, or alignment the fast path would not reproduce
        self._run = kernel.run
        self._function = kernel.function
        self._packed = kernel.packed_metadata
        # the launcher takes every parameter in order, constexprs included (it skips them)
        self._tail = tuple(self.constexprs[p.name] for p in self.fn.params if p.is_constexpr)
        self._direct = _direct_launch(kernel.run)
        self.device = current_device()

    def fast(self, stream: int, *args: Any) -> None:
        """Launches the kept kernel on ``stream``: ``args`` as for :meth:`jit`, every
        pointer 16-byte aligned (raw ints or tensors)."""
        assert self._run is not None, "Launch.fast before a kept JIT launch"
        g0, g1, g2 = self.grid
        if self._direct is not None:
            c_launch, cooperative, pdl = self._direct
            c_launch(g0, g1, g2, stream, self._function, cooperative, pdl, None, None, self._packed, None, None, None,
                     *args, *self._tail)
        else:
            self._run(g0, g1, g2, stream, self._function, self._packed, None, None, None, *args, *self._tail)


def _direct_launch(launcher: Any) -> tuple[Callable[..., Any], int, int] | None:
    """The C entry point under Triton 3.6's CUDA launcher, for a kernel that needs no global
    or profiling scratch: calling it directly skips the launcher's Python ``__call__``
    (about 1 us). Its argument layout is that release's; any other launcher or release
    goes through ``kernel.run``."""
    if not (triton.__version__.startswith("3.6.") and type(launcher).__name__ == "CudaLauncher"):
        return None
    try:
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            return None
        return launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl
    except AttributeError:
        return None
