"""Running a file of Triton test cases under the Triton interpreter, in a fresh interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported, which other
test modules (or torch) may already have done in the test process, so the cases
run in a subprocess with the flag set. The run must pass and skip nothing.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_under_interpreter(cases: str, timeout: int = 600, **env: str) -> None:
    """Run ``tests/<cases>`` with pytest and ``TRITON_INTERPRET=1`` (plus ``env``); assert that it
    passed and that nothing was skipped."""
    environ = dict(os.environ, TRITON_INTERPRET="1", **env, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
         str(ROOT / "tests" / cases)],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
