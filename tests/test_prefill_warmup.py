"""``kvforge.kernels.warm_up_prefill``: a no-op on the torch backend; on the Triton backend
one launch per prefill variant and batch size (under the interpreter: tests/prefill_warmup_cases.py)."""
from __future__ import annotations

import pytest
import torch

from kvforge.kernels import describe_cache, warm_up_prefill
from tests.interpreter import run_under_interpreter


def test_the_torch_backend_compiles_nothing() -> None:
    k = torch.randn(4, 8, 2, 16)
    view = describe_cache(k, k.clone())
    assert warm_up_prefill(view, 4) == 0  # auto on the CPU: the torch reference
    assert warm_up_prefill(view, 4, backend="torch") == 0


def test_the_triton_backend_launches_every_variant_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    run_under_interpreter("prefill_warmup_cases.py", timeout=300, OMP_NUM_THREADS="1")
