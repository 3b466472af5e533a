"""Built-in model shapes (the KV-relevant part of well-known configs).

Lets ``kvforge plan --model llama-3-8b`` and the simulator size a cache
without a checkpoint on disk.
"""
from __future__ import annotations

from typing import Any

from kvforge.config import model_shape
from kvforge.errors import ConfigError

__all__ = ["MODEL_SHAPES", "resolve_model_shape"]

#: name -> a minimal Hugging Face config.json
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": dict(model_type="llama", num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, hidden_size=2048, torch_dtype="bfloat16",
                           max_position_embeddings=2048),
    "llama-2-7b": dict(model_type="llama", num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, hidden_size=4096, torch_dtype="float16",
                       max_position_embeddings=4096),
    "llama-3-8b": dict(model_type="llama", num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, hidden_size=4096, torch_dtype="bfloat16",
                       max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, hidden_size=4096, torch_dtype="bfloat16",
                       max_position_embeddings=32768),
    "qwen2-7b": dict(model_type="qwen2", num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, hidden_size=3584, torch_dtype="bfloat16",
                     max_position_embeddings=32768),
    "llama-3-70b": dict(model_type="llama", num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, hidden_size=8192, torch_dtype="bfloat16",
                        max_position_embeddings=8192),
}


def resolve_model_shape(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """``(label, config dict)`` for a built-in shape name or a checkpoint folder / config.json."""
    key = name_or_path.lower()
    if key in MODEL_SHAPES:
        return key, MODEL_SHAPES[key]
    try:
        model_shape(name_or_path)
    except ConfigError as exc:
        raise ConfigError(f"{name_or_path!r} is neither a built-in shape ({', '.join(MODEL_SHAPES)}) "
                          f"nor a readable checkpoint: {exc}") from None
    import json
    import os
    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    with open(path, encoding="utf-8") as fh:
        return name_or_path, json.load(fh)
