"""The engine on its Triton path (paged kernels and fused ops) under the
Triton interpreter, in a subprocess: the interpreter must be chosen before
triton is first imported. The cases live in ``test_engine_triton_cases.py``."""
from __future__ import annotations

import os

import pytest

from tests.interpreter import run_under_interpreter


def test_engine_triton_path_under_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter: the cases run directly")
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    run_under_interpreter("test_engine_triton_cases.py", OMP_NUM_THREADS="1")
