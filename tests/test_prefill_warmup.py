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


@pytest.mark.parametrize("head_dim, dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (256, torch.float16),
                                             (96, torch.bfloat16), (128, torch.float32)])
@pytest.mark.parametrize("group", [1, 4, 8, 16])
def test_the_warm_up_covers_the_tile_of_every_row_count(head_dim: int, dtype: torch.dtype, group: int) -> None:
    """The GPU tile choice, for every rows-per-sequence count a step can have, is one of the
    variants the warm-up compiles (a count between two powers of two once picked a tile no
    power did, and compiled mid-serving)."""
    pytest.importorskip("triton")
    from kvforge.kernels import triton_prefill
    k = torch.zeros(4, 16, 2, head_dim, dtype=dtype)
    view = describe_cache(k, k.clone())._replace(device=torch.device("cuda"))  # the GPU's choices, no GPU needed
    compiled = set(triton_prefill.variants(view, group))
    missed = {rows: cfg for rows in range(1, 1 << 14) if (cfg := triton_prefill._config(view, group, rows)) not in compiled}
    assert not missed, f"tiles the warm-up does not compile: {dict(list(missed.items())[:5])}"
