"""``warm_up_prefill`` on the Triton backend, under the Triton interpreter (CPU).

Runs only with ``TRITON_INTERPRET=1`` set before triton is first imported:
``tests/test_prefill_warmup.py`` runs it so (the file is named so that pytest does
not collect it on its own).
"""
from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/prefill_warmup_cases.py needs TRITON_INTERPRET=1 before triton is imported "
                       "(tests/test_prefill_warmup.py runs it so)")

import torch  # noqa: E402

from kvforge.kernels import describe_cache, warm_up_prefill  # noqa: E402
from kvforge.kernels import triton_prefill  # noqa: E402


def test_every_variant_launches_once_per_batch_size_and_the_cache_is_untouched() -> None:
    k = torch.randn(4, 8, 2, 16)  # [blocks, block_size, kv_heads, head_dim]
    v = torch.randn(4, 8, 2, 16)
    k0, v0 = k.clone(), v.clone()
    view = describe_cache(k, v)
    num = len(triton_prefill.variants(view, 2))
    assert num == 1  # the interpreter's one tile shape
    assert warm_up_prefill(view, 4, backend="triton", batch_sizes=(1, 2, 16)) == 3 * num
    assert warm_up_prefill(view, 4, backend="triton", sliding_window=4) == num
    assert torch.equal(k, k0) and torch.equal(v, v0)
