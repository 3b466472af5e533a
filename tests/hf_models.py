"""Tiny random transformers models of many families, for the integration's equality tests.

Every model is float32 on the CPU, 2 layers, hidden size 64, 4 query heads
over 2 KV heads of dim 16 (where the family lets the head dim be set; the
others derive 64 / 4 = 16), with every weight re-drawn from a seeded
generator (norm scales too, so no option is trivially the identity), as
:func:`kvforge.engine.testing.tiny_hf_model` does for the engine's families.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from kvforge.engine.testing import randomize_weights

__all__ = ["FAMILIES", "HEAD_DIM_96", "tiny_model", "save_tiny_model", "left_padded", "greedy"]

BASE: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: family -> (model class, config class, the tiny config's options). Windows of 8 are
#: shorter than the prompts, so that they matter.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict()),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict()),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        sliding_window=8, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"])),
    "olmo2": ("Olmo2ForCausalLM", "Olmo2Config", dict()),
    "stablelm": ("StableLmForCausalLM", "StableLmConfig", dict(partial_rotary_factor=0.5, use_qkv_bias=True)),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(
        embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5, logits_scaling=2.0)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(sliding_window=8)),
}


#: Phi-3 at head dim 96 (2 query heads over 1 KV head)
HEAD_DIM_96: dict[str, Any] = dict(hidden_size=192, num_attention_heads=2, num_key_value_heads=1, head_dim=96)


def tiny_model(family: str, seed: int = 0, **overrides: Any) -> Any:
    """A float32 eval-mode model of ``family`` with random weights."""
    import transformers

    model_cls, config_cls, options = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{**BASE, **options, **overrides})
    torch.manual_seed(seed)
    return randomize_weights(getattr(transformers, model_cls)(cfg).float().eval(), seed)


def save_tiny_model(family: str, folder: str | os.PathLike[str], seed: int = 0, **overrides: Any) -> Any:
    """Write :func:`tiny_model` to ``folder`` with ``save_pretrained`` (safetensors); return the model."""
    model = tiny_model(family, seed, **overrides)
    model.save_pretrained(os.fspath(folder), safe_serialization=True)
    return model


def left_padded(prompts: list[list[int]], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[len(prompts), longest]``, padded on the left."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def greedy(model: Any, prompts: list[list[int]], max_new_tokens: int, **generate_kwargs: Any) -> list[list[int]]:
    """transformers' own greedy ``generate`` on a left-padded batch: each row's new tokens
    (``max_new_tokens`` of them: no early stop, so rows compare position by position)."""
    ids, mask = left_padded(prompts, model.config.pad_token_id)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=model.config.pad_token_id, **generate_kwargs)
    return out[:, ids.shape[1]:].tolist()


@contextlib.contextmanager
def attention(model: Any, name: str) -> Iterator[Any]:
    """The model with ``attn_implementation=name`` for the block, its own afterwards."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)


def model_of(models: dict[str, Any], family: str) -> Any:
    """``models[family]``, the family's tiny model built on first use (a module's cache of them)."""
    if family not in models:
        models[family] = tiny_model(family)
    return models[family]
