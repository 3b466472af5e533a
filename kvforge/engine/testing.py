"""Tiny random Hugging Face checkpoints for the engine's equality tests.

Builds a small model of each supported architecture with transformers,
re-draws every weight (norm scales and biases too, so that no option is
trivially the identity) from a seeded generator, and writes it with
``save_pretrained`` (safetensors), so tests exercise the real loading path.
Needs ``transformers``; imported only by tests and benchmarks.
"""
from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["TINY_CONFIGS", "tiny_hf_model", "randomize_weights", "save_tiny_checkpoint", "add_kv_scales", "hf_greedy",
           "drain_steps", "run_steps", "teacher_forced_logits"]

_BASE: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: Per architecture: the tiny config's options. Llama uses Llama 3 RoPE
#: scaling and tied embeddings; Mistral a sliding window shorter than the
#: prompts; Qwen2 has q/k/v biases and Qwen3 q/k norms by construction.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "MistralForCausalLM": dict(sliding_window=12),
    "Qwen2ForCausalLM": dict(),
    "Qwen3ForCausalLM": dict(),
}


def tiny_hf_model(arch: str, seed: int = 0, **overrides: Any) -> Any:
    """A float32 transformers model of ``arch`` with random weights (eval mode)."""
    import transformers

    cls = getattr(transformers, arch)
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(**{**_BASE, **TINY_CONFIGS[arch], **overrides})
    torch.manual_seed(seed)
    return randomize_weights(cls(cfg).float().eval(), seed)


def randomize_weights(model: Any, seed: int = 0) -> Any:
    """Give a transformers model seeded random weights large enough that greedy
    decoding depends on every layer (norm scales in [0.5, 1.5), the rest N(0, 0.2));
    return it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def save_tiny_checkpoint(arch: str, folder: str | os.PathLike[str], seed: int = 0, **overrides: Any) -> Any:
    """Write a tiny checkpoint of ``arch`` to ``folder`` (safetensors); return the model."""
    model = tiny_hf_model(arch, seed, **overrides)
    model.save_pretrained(os.fspath(folder), safe_serialization=True)
    return model


def add_kv_scales(folder: str | os.PathLike[str], scales: dict[int, tuple[Any, Any]],
                  names: str = "self_attn.{kv}_scale") -> None:
    """Add fp8 KV cache scales to a checkpoint written by :func:`save_tiny_checkpoint`
    (its single ``model.safetensors``): layer -> (k_scale, v_scale), each a number (saved
    as a 0-d float32 tensor, as vLLM-style checkpoints hold it) or a tensor, under
    ``model.layers.N.`` + ``names`` (``{kv}`` is ``k`` / ``v``; e.g.
    ``"self_attn.{kv}_proj.output_scale"``). With ``names`` = ``"self_attn.kv_scale"``
    the key scale is written once, for both."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(os.fspath(folder), "model.safetensors")
    tensors = load_file(path)
    for layer, pair in scales.items():
        for kv, value in zip("kv", pair):
            t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value), dtype=torch.float32)
            tensors[f"model.layers.{layer}." + names.format(kv=kv)] = t.contiguous()
            if "{kv}" not in names:
                break
    save_file(tensors, path, metadata={"format": "pt"})


@torch.no_grad()
def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy ``generate`` for one prompt: the new token ids
    (ending at the end-of-sequence token when one is produced)."""
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


def run_steps(engine: Any, prompts: list[list[int]], params: list[Any],
              compact: bool = False) -> list[list[int]]:
    """Drive ``engine`` step by step to the end; ``check_invariants()`` after every
    step and, with ``compact``, a forced compaction between steps. Returns each
    request's token ids in prompt order."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = drain_steps(engine, compact)
    return [done[r] for r in rids]


def drain_steps(engine: Any, compact: bool = False) -> dict[str, list[int]]:
    """Step ``engine`` until no request is left, with ``check_invariants()`` after every step
    (and, with ``compact``, a forced compaction between steps); the token ids of each request
    that finished, by request id."""
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        engine.check_invariants()
        if compact:
            engine.cache.compact_cache()
            engine.check_invariants()
    return done


def teacher_forced_logits(engine: Any, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Float32 logits ``[len(tokens) + 1, vocab]`` of ``prompt`` followed by ``tokens`` fed one
    at a time (teacher forcing): row 0 after the prompt, row i after ``tokens[:i]``. Runs on an
    idle ``engine``'s own cache and model (a sequence of its own, freed at the end), so two
    engines (an fp8 and a float32 cache) compare on the same inputs at every step."""
    cache, sid = engine.cache, -1
    cache.add_sequence(sid)
    try:
        cache.append_tokens(sid, len(prompt))
        rows = [engine.runner.logits(cache.prepare_step([sid], len(prompt), input_ids=prompt,
                                                        logits_indices=[len(prompt) - 1]))]
        for t in tokens:
            cache.append_tokens(sid, 1)
            rows.append(engine.runner.logits(cache.prepare_step([sid], 1, input_ids=[t])))
    finally:
        cache.free_sequence(sid)
    return torch.cat(rows).float()
