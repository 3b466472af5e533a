"""Layer groups on the GPU: the Triton kernels read each group's own tables (released
blocks are -1) and give what they give over every block, in bf16 and fp16."""
from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA/ROCm device", allow_module_level=True)
pytest.importorskip("triton")

from tests.test_layer_groups import Pair, grouped_against_plain  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_grouped_cache_reads_what_keeping_every_block_reads_on_the_gpu(dtype: torch.dtype) -> None:
    p = Pair(device="cuda", dtype=dtype, tol=2e-2)
    assert p.grouped.backend == "auto" and p.grouped.device.type == "cuda"
    grouped_against_plain(p)
