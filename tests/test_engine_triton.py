"""The engine on its Triton path (paged kernels and fused ops) under the
Triton interpreter, in a subprocess: the interpreter must be chosen before
triton is first imported. The cases live in ``test_engine_triton_cases.py``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_engine_triton_path_under_interpreter() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs the interpreter: the cases run directly")
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
         str(root / "tests" / "test_engine_triton_cases.py")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
