"""The engine's Triton path on the CPU, under the Triton interpreter.

Runs only with ``TRITON_INTERPRET=1`` set before triton is imported
(``tests/test_engine_triton.py`` does that in a subprocess): the fused
RMSNorm/RoPE/SiLU kernels against their torch versions, and whole greedy
generations with the Triton paged kernels and fused ops (multi-chunk storage,
chunked prefill, preemption, compaction) against transformers.
"""
from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (run via tests/test_engine_triton.py)",
                allow_module_level=True)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvforge.engine.models.layers import RotaryEmbedding, rms_norm  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _interpreter_fix() -> None:
    from kvforge.kernels.interpreter_compat import ensure_interpreter_index_fix
    ensure_interpreter_index_fix()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_ops_match_torch(dtype: torch.dtype) -> None:
    from kvforge.engine.models import fused
    gen = torch.Generator().manual_seed(0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    x = torch.randn(5, 48, generator=gen).to(dtype)
    res = torch.randn(5, 48, generator=gen).to(dtype)
    w = (torch.rand(48, generator=gen) + 0.5).to(dtype)
    out, new_res = fused.add_rms_norm(x, res.clone(), w, 1e-6)
    torch.testing.assert_close(new_res, res + x, **tol)
    torch.testing.assert_close(out, rms_norm(res + x, w, 1e-6), **tol)
    out0, same = fused.add_rms_norm(x, None, w, 1e-6)
    assert same is x
    torch.testing.assert_close(out0, rms_norm(x, w, 1e-6), **tol)

    qkv = torch.randn(6, (4 + 2 + 2) * 16, generator=gen).to(dtype)
    q, k = qkv[:, :64].view(6, 4, 16), qkv[:, 64:96].view(6, 2, 16)
    rope = RotaryEmbedding(16, 64, 10000.0, None, dtype, torch.device("cpu"))
    pos = torch.tensor([0, 3, 9, 10, 40, 63], dtype=torch.int32)
    q_ref, k_ref = rope.apply(q.clone(), k.clone(), pos)
    v_before = qkv[:, 96:].clone()
    fused.rope_(q, k, rope.cos, rope.sin, pos)
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    assert torch.equal(qkv[:, 96:], v_before)

    gu = torch.randn(5, 2 * 40, generator=gen).to(dtype)
    g, u = gu.float().chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(gu).float(), F.silu(g) * u, **tol)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_engine_on_triton_matches_transformers(arch: str, tmp_path: str) -> None:
    pytest.importorskip("transformers")
    from kvforge.engine import Engine, SamplingParams
    from kvforge.engine.testing import hf_greedy, run_steps, save_tiny_checkpoint
    model = save_tiny_checkpoint(arch, tmp_path, eos_token_id=None)
    prompts = [[5, 17, 99, 3, 42, 8, 64, 11, 23], list(range(3, 24)), [77, 78]]
    expected = [hf_greedy(model, p, 8) for p in prompts]
    engine = Engine(str(tmp_path), num_blocks=6, block_size=8, max_num_batched_tokens=12, backend="triton",
                    fused_ops=True, enable_compaction=True)
    assert engine.model.fused and engine.cache.num_chunks > 1
    assert run_steps(engine, prompts, [SamplingParams(max_tokens=8)] * len(prompts), compact=True) == expected
    assert engine.stats().num_preemptions > 0
