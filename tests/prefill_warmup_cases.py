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


def test_a_transformers_model_warms_up_its_windows_and_soft_cap(tmp_path, monkeypatch) -> None:
    """The engine's warm-up of a transformers model (Gemma 2: sliding-window and full layers,
    an attention soft cap) launches every prefill variant once per kind of layer, with the
    soft cap its layers pass, so none compiles mid-serving."""
    from kvforge.engine import Engine
    from kvforge.engine.cuda_graphs import warm_up_prefill as warm_engine
    from tests.hf_models import save_tiny_model

    save_tiny_model("gemma2", tmp_path)
    engine = Engine(str(tmp_path), num_blocks=16, block_size=8, model_impl="transformers", backend="triton",
                    device="cpu")
    assert engine.model.attn_soft_cap == 5.0
    seen = []
    launch = triton_prefill.launch_prefill

    def recording(*args, **kwargs):  # the real launch, its variant recorded
        seen.append((kwargs["sliding_window"], kwargs["soft_cap"]))
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_prefill, "launch_prefill", recording)
    num = len(triton_prefill.variants(engine.cache.layer_view(0), engine.model.config.num_heads
                                      // engine.model.config.num_kv_heads))
    assert warm_engine(engine.model, engine.cache) == 2 * num
    assert sorted(set(seen), key=str) == [(8, 5.0), (None, 5.0)]
