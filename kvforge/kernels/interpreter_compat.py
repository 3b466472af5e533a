"""A fix for the Triton interpreter under NumPy >= 2.4 (CPU testing only).

Triton 3.6's interpreter converts a scalar tensor to a Python int with
``int(handle.data)``, where ``handle.data`` is a one-element 1-D array;
NumPy 2.4 made that an error, so any ``range()`` with tensor bounds fails
(triton-lang/triton#9171, fixed upstream by squeezing first). This module
applies the same one-line fix to the interpreter, once, when the kernels are
about to run interpreted. Compiled (GPU) kernels never go through it.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ensure_interpreter_index_fix"]

_applied = False


def ensure_interpreter_index_fix() -> None:
    """Makes interpreted ``tensor.__index__`` accept one-element arrays."""
    global _applied
    if _applied:
        return
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # a Triton without this hook: nothing to fix
        _applied = True
        return

    def patch_lang_tensor(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    _applied = True
