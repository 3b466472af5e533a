"""kvforge inside transformers: greedy output equals transformers' own ``generate``.

Every family of :data:`tests.hf_models.FAMILIES` runs a left-padded batch of
two prompts (20 and 13 tokens, longer than the windows of 8) four ways and
must produce exactly the tokens of the model's default attention with a
``DynamicCache``: ``KVForgeCache`` under the default attention (dense mode),
``attn_implementation="kvforge"`` with transformers' cache (scratch pool) and
with ``KVForgeCache`` (paged mode: the kernels read the pool). Float32 on
the CPU, so the torch reference kernels run.
"""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from kvforge.engine.testing import hf_greedy, save_tiny_checkpoint
from kvforge.errors import ConfigError, KVForgeError, MissingExtraError, OutOfBlocksError
from tests.hf_models import FAMILIES, attention, greedy, left_padded, model_of, tiny_model

pytest.importorskip("transformers")
from kvforge.integrations.hf import ATTENTION_NAME, KVForgeCache  # noqa: E402

PROMPTS = [[(7 * i + 3) % 120 + 3 for i in range(20)], [(5 * i + 11) % 120 + 3 for i in range(13)]]
NEW_TOKENS = 10

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_batch_equals_transformers_through_both_entry_points(family: str, models: dict[str, Any]) -> None:
    model = model_of(models, family)
    expected = greedy(model, PROMPTS, NEW_TOKENS)
    assert len(set(map(tuple, expected))) == 2  # the rows differ: a row mix-up would show

    dense = KVForgeCache(model.config)
    assert greedy(model, PROMPTS, NEW_TOKENS, cache=dense) == expected
    assert dense.is_paged is False
    dense.check_invariants()
    with attention(model, ATTENTION_NAME):
        assert greedy(model, PROMPTS, NEW_TOKENS) == expected  # transformers' DynamicCache, kvforge kernels
        paged = KVForgeCache(model.config)
        assert greedy(model, PROMPTS, NEW_TOKENS, cache=paged) == expected
    assert paged.is_paged is True
    paged.check_invariants()
    total = len(PROMPTS[0]) + NEW_TOKENS
    # paged mode stores no padding; the last generated token's keys were never computed
    assert [paged.kv_cache.seq_len(s) for s in paged.seq_ids] == [len(p) + NEW_TOKENS - 1 for p in PROMPTS]
    assert [dense.kv_cache.seq_len(s) for s in dense.seq_ids] == [total - 1] * 2


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_one_prompt_takes_the_unpadded_path(family: str, models: dict[str, Any]) -> None:
    model = model_of(models, family)
    expected = greedy(model, PROMPTS[:1], NEW_TOKENS)
    with attention(model, ATTENTION_NAME):
        cache = KVForgeCache(model.config, block_size=4)
        assert greedy(model, PROMPTS[:1], NEW_TOKENS, cache=cache) == expected
    assert cache.kv_cache.config.block_size == 4 and len(cache.kv_cache.block_table(cache.seq_ids[0])) == 8


@pytest.mark.parametrize("family,option", [("mistral", "sliding_window"), ("gemma2", "sliding_window"),
                                           ("gemma2", "attn_logit_softcapping"), ("phi3", "sliding_window")])
def test_the_window_and_soft_cap_change_these_outputs(family: str, option: str, models: dict[str, Any]) -> None:
    """The equality above would hold for a backend that ignored them: it does not here."""
    other = tiny_model(family, **{option: None if option == "attn_logit_softcapping" else 64})
    assert greedy(other, PROMPTS, NEW_TOKENS) != greedy(model_of(models, family), PROMPTS, NEW_TOKENS)


def test_keys_and_values_live_in_the_kvforge_pool(models: dict[str, Any]) -> None:
    model = model_of(models, "qwen2")
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=True).cache
        dense = KVForgeCache(model.config)
        model(ids, attention_mask=mask, cache=dense, use_cache=True)
        with attention(model, ATTENTION_NAME):
            paged = KVForgeCache(model.config)
            model(ids, attention_mask=mask, cache=paged, use_cache=True)
    for layer in range(model.config.num_hidden_layers):
        ref_k, ref_v = ref.layers[layer].keys, ref.layers[layer].values  # [B, H, L, D]
        for row, p in enumerate(PROMPTS):
            k, v = dense.gather(row, layer)  # every cell, padding included: bit for bit
            assert torch.equal(k, ref_k[row].transpose(0, 1)) and torch.equal(v, ref_v[row].transpose(0, 1))
            k, v = paged.gather(row, layer)  # the real tokens only
            want_k, want_v = ref_k[row, :, -len(p):].transpose(0, 1), ref_v[row, :, -len(p):].transpose(0, 1)
            assert k.shape == want_k.shape == (len(p), 2, 16)
            if layer == 0:  # the same arithmetic on the same inputs
                assert torch.equal(k, want_k) and torch.equal(v, want_v)
            else:  # inputs went through kvforge's attention in layer 0
                torch.testing.assert_close(k, want_k, rtol=1e-4, atol=1e-5)
    assert dense.get_seq_length() == paged.get_seq_length() == ids.shape[1]


def test_from_pretrained_with_the_kvforge_attention(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ref = save_tiny_checkpoint("LlamaForCausalLM", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTENTION_NAME, dtype=torch.float32)
    assert model.config._attn_implementation == "kvforge"
    prompt = PROMPTS[0]
    assert hf_greedy(model.eval(), prompt, 12) == hf_greedy(ref, prompt, 12)


@pytest.mark.parametrize("impl", ["sdpa", ATTENTION_NAME])
def test_beam_search_forks_rows(impl: str, models: dict[str, Any]) -> None:
    model = model_of(models, "llama")
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=3,
              num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **kw)
        with attention(model, impl):
            cache = KVForgeCache(model.config)
            got = model.generate(ids, cache=cache, **kw)
    assert torch.equal(got, expected)
    assert len(cache.seq_ids) == 6 and min(cache.seq_ids) >= 6  # the first 6 rows were forked away
    cache.check_invariants()


def test_a_second_generate_continues_the_cache(models: dict[str, Any]) -> None:
    model = model_of(models, "mistral")
    prompt = torch.tensor([PROMPTS[0]])
    with torch.no_grad(), attention(model, ATTENTION_NAME):
        cache = KVForgeCache(model.config)
        first = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                               cache=cache)
        longer = torch.cat([first, torch.tensor([[9, 10, 11]])], 1)
        got = model.generate(longer, attention_mask=torch.ones_like(longer), max_new_tokens=5, do_sample=False,
                             cache=cache)
    with torch.no_grad():
        expected = model.generate(longer, attention_mask=torch.ones_like(longer), max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)
    assert cache.kv_cache.seq_len(cache.seq_ids[0]) == longer.shape[1] + 4
    cache.reset()
    cache.check_invariants()
    assert cache.get_seq_length() == 0 and len(cache.kv_cache.seq_ids) == 0


def test_limits_raise_and_name_themselves(models: dict[str, Any]) -> None:
    model = model_of(models, "llama")
    cache = KVForgeCache(model.config)
    with pytest.raises(ConfigError, match="holds 0 columns"):
        cache.crop(-1)
    for bad, why in ((3, "negative count"), (1.5, "takes an int")):
        with pytest.raises(ConfigError, match=why):
            cache.crop(bad)  # type: ignore[arg-type]
    cache.crop(0)  # nothing to do
    for impl in ("sdpa", ATTENTION_NAME):
        with attention(model, impl):
            small = KVForgeCache(model.config, num_blocks=2)
            with pytest.raises(OutOfBlocksError, match="KVForgeCache is full.*num_blocks"):
                greedy(model, PROMPTS, 4, cache=small)
        small.check_invariants()  # the refused step left nothing behind
        assert small.get_seq_length() == 0 and small.kv_cache.num_available_blocks == 2
    hybrid = types.SimpleNamespace(num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    with pytest.raises(ConfigError, match="linear_attention"):
        KVForgeCache(hybrid)
    with pytest.raises(ConfigError, match="block_size"):
        KVForgeCache(model.config, block_size=0)
    with attention(model, ATTENTION_NAME):
        model.train()  # dropout is not supported; eval mode has none
        model.config.attention_dropout = 0.1
        try:
            for layer in model.model.layers:
                layer.self_attn.attention_dropout = 0.1
            with pytest.raises(KVForgeError, match="dropout"):
                model(torch.tensor([PROMPTS[0]]))
        finally:
            for layer in model.model.layers:
                layer.self_attn.attention_dropout = 0.0
            model.config.attention_dropout = 0.0
            model.eval()


def test_import_kvforge_does_not_import_transformers() -> None:
    code = ("import sys, kvforge, kvforge.integrations; kvforge.integrations.__all__; "
            "assert 'transformers' not in sys.modules, 'transformers'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_lazy_exports_are_the_hf_names() -> None:
    import kvforge.integrations as integrations
    import kvforge.integrations.hf as hf

    assert integrations.KVForgeCache is hf.KVForgeCache and integrations.ATTENTION_NAME == "kvforge"
    assert integrations.register_hf_attention is hf.register
    assert sorted(integrations.__all__) == ["ATTENTION_NAME", "KVForgeCache", "register_hf_attention"]


def test_missing_transformers_names_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m.split(".")[0] == "transformers" or m.startswith("kvforge.integrations.hf")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    with pytest.raises(MissingExtraError, match="pip install 'transformers>=5'"):
        import kvforge.integrations.hf  # noqa: F401


def test_an_fp8_pool_stores_bytes_and_reads_them_back_dequantized(models: dict[str, Any]) -> None:
    """``KVForgeCache(dtype="fp8_e4m3")`` in both modes: the pool is fp8 (one byte an element),
    layer 0's stored keys are exactly the fp8 rounding of transformers' own keys, read back
    (gather, dense mode's history, the paged kernels) dequantized in the model's dtype."""
    from kvforge.kernels.fp8 import dequantize, quantize

    model = model_of(models, "qwen2")
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=True).cache
        dense = KVForgeCache(model.config, dtype="fp8_e4m3")
        model(ids, attention_mask=mask, cache=dense, use_cache=True)
        with attention(model, ATTENTION_NAME):
            paged = KVForgeCache(model.config, dtype="fp8_e4m3")
            model(ids, attention_mask=mask, cache=paged, use_cache=True)
    for cache in (dense, paged):
        cfg = cache.kv_cache.config
        assert cfg.dtype == torch.float8_e4m3fn and cfg.resolved_model_dtype == torch.float32
        assert cfg.bytes_per_token == 2 * 2 * 2 * 16  # layers x (k, v) x kv heads x head dim, one byte each
    one = torch.ones(2)
    ref_k = ref.layers[0].keys
    for row, p in enumerate(PROMPTS):
        k, _ = dense.gather(row, 0)
        assert k.dtype == torch.float32
        assert torch.equal(k, dequantize(quantize(ref_k[row].transpose(0, 1), one, torch.float8_e4m3fn), one))
        k, _ = paged.gather(row, 0)
        want = ref_k[row, :, -len(p):].transpose(0, 1)
        assert torch.equal(k, dequantize(quantize(want, one, torch.float8_e4m3fn), one))
        assert not torch.equal(k, want)  # it was quantized: the equality above is not trivial
    # generation through both modes: the same tokens (the same dequantized values, attended
    # by transformers' sdpa and by the paged kernels), the first one that of the float32 cache
    # (this randomly weighted model amplifies any difference within a few tokens)
    expected = greedy(model, PROMPTS, NEW_TOKENS)
    got_dense = greedy(model, PROMPTS, NEW_TOKENS, cache=KVForgeCache(model.config, dtype="fp8_e4m3"))
    with attention(model, ATTENTION_NAME):
        got_paged = greedy(model, PROMPTS, NEW_TOKENS, cache=KVForgeCache(model.config, dtype="fp8_e4m3"))
    assert got_dense == got_paged
    assert [row[0] for row in got_paged] == [row[0] for row in expected]
    with pytest.raises(ConfigError, match="fp9"):
        KVForgeCache(model.config, dtype="fp9")


@pytest.mark.parametrize("impl", ["sdpa", ATTENTION_NAME])
def test_prompt_lookup_decoding_crops_the_cache_and_keeps_the_output(impl: str, models: dict[str, Any]) -> None:
    """transformers' prompt-lookup decoding drafts tokens from the prompt, verifies them and
    crops the rejected ones from the cache: with a KVForgeCache (dense and paged mode) the
    output is plain greedy decoding's, and the cache holds exactly the tokens kept."""
    model = model_of(models, "llama")
    prompt = torch.tensor([[10 + (i % 6) for i in range(30)]])
    mask = torch.ones_like(prompt)
    with attention(model, impl):
        want = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False)
        cache = KVForgeCache(model.config, block_size=4)
        got = model.generate(prompt, attention_mask=mask, max_new_tokens=12, do_sample=False,
                             prompt_lookup_num_tokens=4, past_key_values=cache)
    assert torch.equal(got, want)
    kv = cache.kv_cache
    assert kv is not None and kv.seq_len(cache.seq_ids[0]) == cache.get_seq_length() == got.shape[1] - 1
    cache.check_invariants()
    cache.crop(-3)
    assert kv.seq_len(cache.seq_ids[0]) == cache.get_seq_length() == got.shape[1] - 4
    with pytest.raises(ConfigError, match="holds"):
        cache.crop(-(got.shape[1] + 1))
    cache.check_invariants()
