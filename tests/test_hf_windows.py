"""``KVForgeCache`` with sliding-window layers: window layers release their blocks in paged mode.

Tiny random models (float32, CPU, :mod:`tests.hf_models`) whose windows of 8
are shorter than the prompts. Gemma 2 and 3 mix a window layer with a full
one: in paged mode the window layer gets a layer group of its own and
releases every block before its window, and greedy output must still be
transformers' own (the model's default attention and cache). Mistral and
Phi-3 put the window on every layer: kvforge's layer groups need a
full-attention group 0, so they keep every block, and their output is
checked too. Dense mode, ``sliding_window_blocks="keep"``, beam search,
prompt-lookup decoding (crops inside the window layers) and the refusals
(a crop past a released window, dense mode on a grouped pool, a layer
reading further back than its group keeps) are tested here.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from kvforge.errors import ConfigError, KVForgeError, OutOfBlocksError, SequenceError
from tests.hf_models import attention, greedy, left_padded, model_of, tiny_model

pytest.importorskip("transformers")
from kvforge.integrations.hf import ATTENTION_NAME, KVForgeCache  # noqa: E402
from kvforge.integrations.hf.cache import layer_windows_of  # noqa: E402

PROMPTS = [[(7 * i + 3) % 120 + 3 for i in range(20)], [(5 * i + 11) % 120 + 3 for i in range(13)]]
NEW_TOKENS = 30
BS = 4
WINDOW = 8  # every tiny config's sliding_window

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {}


def held_bytes(cache: KVForgeCache) -> int:
    """Bytes of the pool's blocks held now (every group's)."""
    kv = cache.kv_cache
    assert kv is not None
    return kv.pool.num_allocated_blocks * kv.config.bytes_per_block


def window_blocks(num_tokens: int, last_step_start: int) -> int:
    """Blocks a window group holds for a row of ``num_tokens`` whose last step started at
    ``last_step_start``: those from the one its first token read on."""
    return math.ceil(num_tokens / BS) - max(last_step_start - WINDOW + 1, 0) // BS


def test_layer_windows_come_from_the_config(models: dict[str, Any]) -> None:
    import transformers

    assert layer_windows_of(model_of(models, "gemma2").config, 2) == (WINDOW, None)
    assert layer_windows_of(model_of(models, "gemma3").config, 2) == (WINDOW, None)
    assert layer_windows_of(model_of(models, "mistral").config, 2) == (WINDOW, WINDOW)
    assert layer_windows_of(model_of(models, "phi3").config, 2) == (WINDOW, WINDOW)
    assert layer_windows_of(transformers.LlamaConfig(num_hidden_layers=3), 3) == (None, None, None)
    qwen = transformers.Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=16,
                                    max_window_layers=1)
    assert layer_windows_of(qwen, 3) == (None, 16, 16)
    assert layer_windows_of(transformers.Qwen2Config(num_hidden_layers=2), 2) == (None, None)
    with pytest.raises(ConfigError, match="sliding_window_blocks must be 'free' or 'keep'"):
        KVForgeCache(model_of(models, "gemma2").config, sliding_window_blocks="drop")


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral", "phi3"])
def test_greedy_equals_transformers_and_window_layers_release_blocks(family: str, models: dict[str, Any]) -> None:
    """A left-padded batch of two through paged mode ("free" and "keep") and dense mode: the
    tokens are transformers' own; Gemma's window layer holds only its window's blocks."""
    model = model_of(models, family)
    expected = greedy(model, PROMPTS, NEW_TOKENS)
    assert len(set(map(tuple, expected))) == 2
    dense = KVForgeCache(model.config, block_size=BS)
    assert greedy(model, PROMPTS, NEW_TOKENS, cache=dense) == expected
    with attention(model, ATTENTION_NAME):
        free = KVForgeCache(model.config, block_size=BS)
        assert greedy(model, PROMPTS, NEW_TOKENS, cache=free) == expected
        keep = KVForgeCache(model.config, block_size=BS, sliding_window_blocks="keep")
        assert greedy(model, PROMPTS, NEW_TOKENS, cache=keep) == expected
    for cache in (dense, free, keep):
        cache.check_invariants()
    lens = [len(p) + NEW_TOKENS - 1 for p in PROMPTS]
    assert [free.kv_cache.seq_len(s) for s in free.seq_ids] == lens
    every_block = sum(math.ceil(n / BS) for n in lens)
    assert keep.kv_cache.pool.num_allocated_blocks == every_block and len(keep.kv_cache.config.kv_groups) == 1
    assert len(dense.kv_cache.config.kv_groups) == 1  # dense mode reads every layer's whole history
    if family in ("mistral", "phi3"):
        # a window on every layer: no full-attention group 0 to split from, so one group keeps every block
        assert free.kv_cache.config.kv_groups == keep.kv_cache.config.kv_groups
        assert held_bytes(free) == held_bytes(keep)
        return
    groups = free.kv_cache.config.kv_groups
    assert [(g.window, g.layers) for g in groups] == [(None, (1,)), (WINDOW, (0,))]
    # group 0 every block, the window group from the block its last token read (the last step
    # was one decode token, at position n - 1)
    assert free.kv_cache.pool.num_allocated_blocks == every_block + sum(window_blocks(n, n - 1) for n in lens)
    assert 2 * free.kv_cache.config.bytes_per_block == keep.kv_cache.config.bytes_per_block  # one layer a block
    assert held_bytes(free) < 0.7 * held_bytes(keep)  # 30 blocks of one layer against 24 of two
    with pytest.raises(KVForgeError, match="layer 0 has a sliding window of 8 tokens and released"):
        free.gather(0, 0)
    assert free.gather(1, 1)[0].shape == (lens[1], 2, 16)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_prompt_lookup_decoding_crops_the_window_layers(family: str, models: dict[str, Any]) -> None:
    """Prompt-lookup decoding verifies drafts and crops the rejected ones: the crops go back no
    further than the verifying step's first token, so they work after the window released blocks."""
    model = model_of(models, family)
    prompt = torch.tensor([[10 + (i % 6) for i in range(30)]])
    mask = torch.ones_like(prompt)
    crops: list[tuple[int, int]] = []

    class Recording(KVForgeCache):
        def crop(self, tokens_to_remove: int) -> None:
            kv = self.kv_cache
            if tokens_to_remove and kv is not None:
                crops.append((kv.seq_len(self.seq_ids[0]), -tokens_to_remove))
            super().crop(tokens_to_remove)

    with torch.no_grad():
        want = model.generate(prompt, attention_mask=mask, max_new_tokens=24, do_sample=False)
        with attention(model, ATTENTION_NAME):
            cache = Recording(model.config, block_size=BS)
            got = model.generate(prompt, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                 prompt_lookup_num_tokens=4, cache=cache)
    assert torch.equal(got, want)
    assert crops and all(length > WINDOW + BS for length, _ in crops)  # every crop after blocks were released
    kv = cache.kv_cache
    n = got.shape[1] - 1
    assert kv.seq_len(cache.seq_ids[0]) == cache.get_seq_length() == n
    assert kv.pool.num_allocated_blocks < 2 * math.ceil(n / BS) - 3
    cache.check_invariants()


def test_a_crop_past_the_released_window_is_refused(models: dict[str, Any]) -> None:
    model = model_of(models, "gemma2")
    with attention(model, ATTENTION_NAME):
        free = KVForgeCache(model.config, block_size=BS)
        greedy(model, PROMPTS[:1], 12, cache=free)
        keep = KVForgeCache(model.config, block_size=BS, sliding_window_blocks="keep")
        greedy(model, PROMPTS[:1], 12, cache=keep)
    kv, n = free.kv_cache, len(PROMPTS[0]) + 11
    blocks = kv.pool.num_allocated_blocks
    with pytest.raises(SequenceError, match=r"crop\(-12\) goes back further.*sliding_window_blocks='keep'"):
        free.crop(-12)
    assert kv.seq_len(free.seq_ids[0]) == free.get_seq_length() == n  # the refused crop changed nothing
    assert kv.pool.num_allocated_blocks == blocks
    free.check_invariants()
    free.crop(-1)  # back to the last step's first token: always held
    assert kv.seq_len(free.seq_ids[0]) == free.get_seq_length() == n - 1
    keep.crop(-12)  # every block kept: any crop
    assert keep.kv_cache.seq_len(keep.seq_ids[0]) == n - 12
    for cache in (free, keep):
        cache.check_invariants()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_beam_search_forks_the_window_groups(family: str, models: dict[str, Any]) -> None:
    model = model_of(models, family)
    ids, mask = left_padded(PROMPTS)
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, num_beams=3,
              num_return_sequences=2, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **kw)
        with attention(model, ATTENTION_NAME):
            cache = KVForgeCache(model.config, block_size=BS)
            got = model.generate(ids, cache=cache, **kw)
    assert torch.equal(got, expected)
    assert len(cache.seq_ids) == 6 and len(cache.kv_cache.config.kv_groups) == 2
    cache.check_invariants()


def test_a_second_generate_continues_a_grouped_cache(models: dict[str, Any]) -> None:
    model = model_of(models, "gemma2")
    prompt = torch.tensor([PROMPTS[0]])
    with torch.no_grad(), attention(model, ATTENTION_NAME):
        cache = KVForgeCache(model.config, block_size=BS)
        first = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                               cache=cache)
        longer = torch.cat([first, torch.tensor([[9, 10, 11]])], 1)
        got = model.generate(longer, attention_mask=torch.ones_like(longer), max_new_tokens=6, do_sample=False,
                             cache=cache)
    with torch.no_grad():
        expected = model.generate(longer, attention_mask=torch.ones_like(longer), max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    cache.check_invariants()


def test_dense_mode_on_a_grouped_pool_and_a_wider_layer_are_refused(models: dict[str, Any]) -> None:
    model = model_of(models, "gemma2")
    with attention(model, ATTENTION_NAME):
        cache = KVForgeCache(model.config, block_size=BS)
        greedy(model, PROMPTS, 4, cache=cache)
    cache.reset()
    with pytest.raises(KVForgeError, match="built for paged mode.*needs every layer's whole history"):
        greedy(model, PROMPTS, 4, cache=cache)  # the model's own eager attention: dense mode
    cache.check_invariants()
    assert cache.is_paged is None and cache.get_seq_length() == 0  # the refusal changed nothing
    with attention(model, ATTENTION_NAME):
        assert greedy(model, PROMPTS, 4, cache=cache) == greedy(model, PROMPTS, 4)
        tiny = KVForgeCache(model.config, block_size=BS, num_blocks=3)
        with pytest.raises(OutOfBlocksError, match="is full.*3 blocks of 4 tokens, each holding 1 of the 2 layers"):
            greedy(model, PROMPTS, 4, cache=tiny)
    tiny.check_invariants()
    assert tiny.get_seq_length() == 0 and tiny.kv_cache.num_available_blocks == 3
    # a cache told the window layer keeps 4 tokens, for a layer that reads 8: refused, nothing reserved
    with attention(model, ATTENTION_NAME):
        narrow = copy.deepcopy(model.config)  # paged mode is read from the config's attention
        narrow.sliding_window = 4
        small = KVForgeCache(narrow, block_size=BS)
        with pytest.raises(KVForgeError, match="layer 0 attends to 8 past token.*last 4 are released"):
            greedy(model, PROMPTS, 4, cache=small)
    small.check_invariants()
    assert small.get_seq_length() == 0 and small.kv_cache.pool.num_allocated_blocks == 0


def test_several_window_groups_of_two_layers() -> None:
    """Six Gemma 3 layers, four of them windowed: groups of two layers (a block holds two), two
    window groups; the tokens are transformers' own, and an fp8 pool's are those of keeping
    every block (the same stored bytes, read through other tables)."""
    kinds = ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"] * 2
    model = tiny_model("gemma3", num_hidden_layers=6, layer_types=kinds)
    expected = greedy(model, PROMPTS, 20)
    with attention(model, ATTENTION_NAME):
        cache = KVForgeCache(model.config, block_size=BS)
        assert greedy(model, PROMPTS, 20, cache=cache) == expected
        fp8 = [greedy(model, PROMPTS, 20, cache=KVForgeCache(model.config, block_size=BS, dtype="fp8_e4m3",
                                                             sliding_window_blocks=mode)) for mode in ("free", "keep")]
    assert fp8[0] == fp8[1]
    cache.check_invariants()
    config = cache.kv_cache.config
    assert [(g.window, g.layers) for g in config.kv_groups] == [(None, (1, 3)), (WINDOW, (0, 2)), (WINDOW, (4, 5))]
    assert config.page_layers == 2 and cache.kv_cache.layer_groups == (1, 0, 1, 0, 2, 2)
    lens = [len(p) + 19 for p in PROMPTS]
    full = sum(math.ceil(n / BS) for n in lens)
    assert cache.kv_cache.pool.num_allocated_blocks == full + 2 * sum(window_blocks(n, n - 1) for n in lens)
