"""Model shapes: the one built-in table and the one ``config.json`` reader.

:data:`MODEL_SHAPES` holds the KV-relevant part of well-known Hugging Face
configs, so that ``kvforge plan --model llama-3-8b``, ``kvforge simulate
--model qwen2.5-7b`` and ``CacheConfig.for_model("mistral-7b")`` size a
cache without a checkpoint on disk. :func:`read_hf_config` is the only
reader of a checkpoint's ``config.json`` (the engine's
:func:`~kvforge.engine.model_config.read_config` calls it), and
:func:`resolve_model` turns a built-in name or a path into a config dict, so
every built-in name works everywhere a model is asked for.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from kvforge.config import _positive_int, resolve_dtype
from kvforge.errors import ConfigError

__all__ = ["MODEL_SHAPES", "read_hf_config", "resolve_model", "resolve_model_shape", "model_shape"]

#: name -> a minimal Hugging Face config.json (the fields :func:`model_shape` reads)
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
    "llama-3-70b": dict(model_type="llama", num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, hidden_size=8192, torch_dtype="bfloat16",
                        max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, hidden_size=4096, torch_dtype="bfloat16",
                       max_position_embeddings=32768),
    "qwen2-7b": dict(model_type="qwen2", num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, hidden_size=3584, torch_dtype="bfloat16",
                     max_position_embeddings=32768),
    "qwen2.5-7b": dict(model_type="qwen2", num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, hidden_size=3584, torch_dtype="bfloat16",
                       max_position_embeddings=32768),
}


def read_hf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder, or of a ``config.json`` path.

    Raises :class:`~kvforge.errors.ConfigError` naming the file when it is
    missing, not valid JSON, or not a JSON object."""
    file = os.fspath(path)
    if os.path.isdir(file):
        file = os.path.join(file, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"no config.json at {file!r}: expected a Hugging Face checkpoint folder or its config.json")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {file!r}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def resolve_model(name_or_path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """``(label, config dict)`` for a built-in name (:data:`MODEL_SHAPES`, any case)
    or a checkpoint folder / ``config.json`` path.

    A built-in name wins over a folder of the same name. Raises
    :class:`~kvforge.errors.ConfigError` when it is neither (the message lists
    the built-in names) or when the file cannot be read."""
    text = os.fspath(name_or_path)
    key = text.strip().lower()
    if key in MODEL_SHAPES:
        return key, dict(MODEL_SHAPES[key])
    if not os.path.exists(text):
        raise ConfigError(f"{text!r} is neither a built-in model shape ({', '.join(MODEL_SHAPES)}) "
                          f"nor an existing checkpoint folder or config.json")
    return text, read_hf_config(text)


#: the name this module's resolver had before :func:`resolve_model` (kept importable)
resolve_model_shape = resolve_model


def model_shape(model: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """The KV-relevant shape of a model: a built-in name, a checkpoint folder, a
    ``config.json`` path, or the parsed config dict.

    Returns ``num_kv_heads``, ``head_dim``, ``num_layers``, ``dtype`` (a torch
    dtype; float16 when the config names none the cache stores),
    ``max_position_embeddings`` and ``model_type``. Multimodal configs are read
    through their ``text_config``."""
    if isinstance(model, Mapping):
        cfg: Mapping[str, Any] = model
        where = "the given config"
    else:
        where, cfg = resolve_model(model)
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else None
    if text_cfg and "num_hidden_layers" not in cfg:
        cfg = {**cfg, **text_cfg}
    try:
        num_layers = cfg["num_hidden_layers"]
        num_heads = cfg["num_attention_heads"]
    except KeyError as exc:
        raise ConfigError(f"{where} has no {exc.args[0]!r}") from None
    num_kv_heads = cfg.get("num_key_value_heads") or num_heads
    head_dim = cfg.get("head_dim")
    if not head_dim:
        if "hidden_size" not in cfg:
            raise ConfigError(f"{where} has neither 'head_dim' nor 'hidden_size'")
        head_dim = cfg["hidden_size"] // num_heads
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
    try:
        dtype = resolve_dtype(dtype_name, "torch_dtype")
    except ConfigError:
        dtype = resolve_dtype("float16")
    return {
        "num_kv_heads": _positive_int("num_key_value_heads", num_kv_heads),
        "head_dim": _positive_int("head_dim", head_dim),
        "num_layers": _positive_int("num_hidden_layers", num_layers),
        "dtype": dtype,
        "max_position_embeddings": int(cfg.get("max_position_embeddings") or 4096),
        "model_type": str(cfg.get("model_type", "unknown")),
    }
