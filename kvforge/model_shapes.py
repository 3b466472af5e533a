"""Model shapes: the one built-in table and the one ``config.json`` reader.

:data:`MODEL_SHAPES` holds the KV-relevant part of well-known Hugging Face
configs, so that ``kvforge plan --model llama-3-8b``, ``kvforge simulate
--model qwen2.5-7b`` and ``CacheConfig.for_model("mistral-7b")`` size a
cache without a checkpoint on disk. :func:`read_hf_config` is the only
reader of a checkpoint's ``config.json`` (the engine's
:func:`~kvforge.engine.model_config.read_config` calls it), and
:func:`resolve_model` turns a built-in name or a path into a config dict, so
every built-in name works everywhere a model is asked for.

:func:`check_hf_config` is the one check of a config's fields: the shape
reader here and the engine's ``ModelConfig.from_hf`` both call it, so a
malformed field (a string, null, bool or float where an integer belongs,
zero or 2**62 heads, heads that do not divide, an unknown RoPE type, ...)
is a :class:`~kvforge.errors.ConfigError` naming the field wherever the
config is read, never a TypeError, KeyError or ZeroDivisionError later.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any, Mapping

import torch

from kvforge.config import resolve_dtype
from kvforge.errors import ConfigError

__all__ = ["MODEL_SHAPES", "read_hf_config", "read_json_object", "check_hf_config", "check_eos_token_id",
           "resolve_model", "resolve_model_shape", "model_shape", "ROPE_TYPES"]

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


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in the file at ``path``.

    Raises :class:`~kvforge.errors.ConfigError` naming the file when it cannot
    be read, is not UTF-8, is not valid JSON (a key given twice and a nesting
    thousands deep are refused too), or holds a list, string, number or null
    instead of an object. NaN, Infinity and integers of thousands of digits
    are parsed (as floats, and as :class:`HugeInt`) so that the field check
    refuses them naming their field."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {file!r}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{file}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_int=_parse_int)
    except _DuplicateKey as exc:
        raise ConfigError(f"{file}: not valid JSON (key {exc.args[0]!r} is given twice)") from None
    except RecursionError:
        raise ConfigError(f"{file}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {_json_kind(data)}")
    return data


class HugeInt:
    """An integer literal of more digits than Python converts: no field takes one."""

    __slots__ = ("digits",)

    def __init__(self, digits: str) -> None:
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {len(self.digits.lstrip('-'))} digits>"


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_int(digits: str) -> int | HugeInt:
    return HugeInt(digits) if len(digits) > 1000 else int(digits)


def _json_kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def read_hf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder, or of a ``config.json`` path.

    Raises :class:`~kvforge.errors.ConfigError` naming the file when it is
    missing or not a JSON object (see :func:`read_json_object`). The fields
    are checked by :func:`check_hf_config`, which :func:`model_shape` and the
    engine's ``ModelConfig.from_hf`` call."""
    file = os.fspath(path)
    if os.path.isdir(file):
        file = os.path.join(file, "config.json")
    if not os.path.isfile(file):
        raise ConfigError(f"no config.json at {file!r}: expected a Hugging Face checkpoint folder or its config.json")
    return read_json_object(file)


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
    through their ``text_config``. Every field is checked first
    (:func:`check_hf_config`): a malformed one is a
    :class:`~kvforge.errors.ConfigError` naming it."""
    if isinstance(model, Mapping):
        cfg: Mapping[str, Any] = model
        where = "the given config"
    elif isinstance(model, (str, os.PathLike)):
        where, cfg = resolve_model(model)
    else:
        raise ConfigError(f"a model is a built-in name, a checkpoint folder, a config.json path or a "
                          f"config dict, got {type(model).__name__}")
    check_hf_config(cfg, where, required=("num_hidden_layers", "num_attention_heads"))
    text_cfg = cfg.get("text_config")
    if isinstance(text_cfg, Mapping) and "num_hidden_layers" not in cfg:
        cfg = {**cfg, **text_cfg}
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads  # check_hf_config: one of them is there
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
    try:
        dtype = resolve_dtype(dtype_name, "torch_dtype")
    except ConfigError:
        dtype = resolve_dtype("float16")
    return {
        "num_kv_heads": cfg.get("num_key_value_heads") or num_heads,
        "head_dim": head_dim,
        "num_layers": cfg["num_hidden_layers"],
        "dtype": dtype,
        "max_position_embeddings": cfg.get("max_position_embeddings") or 4096,
        "model_type": cfg.get("model_type") or "unknown",
    }


# ------------------------------------------------------------------ field checks
#: integer fields: (least, most). The upper bounds are far above any real model; they
#: are there so that a value such as 2**62 heads fails here, naming its field, instead
#: of overflowing a tensor size or an int32 index later.
INT_FIELDS: dict[str, tuple[int, int]] = {
    "num_hidden_layers": (1, 2**16),
    "num_attention_heads": (1, 2**16),
    "num_key_value_heads": (1, 2**16),
    "head_dim": (1, 2**16),
    "hidden_size": (1, 2**20),
    "intermediate_size": (1, 2**24),
    "vocab_size": (1, 2**24),
    "max_position_embeddings": (1, 2**31 - 1),
    "sliding_window": (0, 2**31 - 1),  # 0 (like null) means no window
    "max_window_layers": (0, 2**31 - 1),
}
#: number fields: (least, most, whether the least is allowed)
FLOAT_FIELDS: dict[str, tuple[float, float, bool]] = {
    "rms_norm_eps": (0.0, 1.0, False),
    "rope_theta": (0.0, math.inf, False),
    "initializer_range": (0.0, math.inf, True),
    "partial_rotary_factor": (0.0, 1.0, False),
}
BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
STR_FIELDS = ("model_type", "hidden_act", "torch_dtype", "dtype")
OBJECT_FIELDS = ("quantization_config", "text_config")
#: rope_type -> the keys it needs (as transformers checks them; ``rope_theta`` may be top-level)
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (), "linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"), "su": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "mrope": ("mrope_section",), "proportional": (),
}
_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast", "beta_slow",
                 "mscale", "mscale_all_dim")
_ROPE_LAYER_TYPES = ("full_attention", "sliding_attention")


def check_hf_config(cfg: Any, where: str = "config.json", *, required: tuple[str, ...] = ()) -> None:
    """Check every field of a Hugging Face ``config.json`` that kvforge reads.

    Each field, where present and not null, must have its JSON type (no bool
    for an int, no float or string for an int, no string for a bool) and lie
    in its range (:data:`INT_FIELDS`, :data:`FLOAT_FIELDS`);
    ``num_attention_heads`` must be a multiple of ``num_key_value_heads``, and
    ``hidden_size`` of ``num_attention_heads`` when there is no ``head_dim``;
    ``rope_scaling`` / ``rope_parameters`` must be of a known ``rope_type``
    with the keys it needs; ``eos_token_id`` an id or a list of ids;
    ``layer_types`` one name per layer. ``required`` fields must be present.
    A multimodal config is checked through its ``text_config``. Raises
    :class:`~kvforge.errors.ConfigError` naming ``where`` and the field."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {_json_kind(cfg)}")
    for name in OBJECT_FIELDS:
        if cfg.get(name) is not None and not isinstance(cfg[name], Mapping):
            raise ConfigError(f"{where}: {name} must be an object, got {_show(cfg[name])}")
    text_cfg = cfg.get("text_config")
    if isinstance(text_cfg, Mapping) and "num_hidden_layers" not in cfg:
        cfg = {**cfg, **text_cfg}
        where = f"{where} (text_config)"
    for name in required:
        if cfg.get(name) is None:
            got = "null" if name in cfg else "no such field"
            raise ConfigError(f"{where}: {name!r} is required ({got})")
    for name, (least, most) in INT_FIELDS.items():
        _int(cfg.get(name), name, least, most, where)
    for name, (least, most, closed) in FLOAT_FIELDS.items():
        _number(cfg.get(name), name, least, most, closed, where)
    for name in BOOL_FIELDS:
        if cfg.get(name) is not None and not isinstance(cfg[name], bool):
            raise ConfigError(f"{where}: {name} must be true or false, got {_show(cfg[name])}")
    for name in STR_FIELDS:
        if name in ("torch_dtype", "dtype") and isinstance(cfg.get(name), torch.dtype):
            continue  # a config dict made in Python may hold the dtype itself
        if cfg.get(name) is not None and not isinstance(cfg[name], str):
            raise ConfigError(f"{where}: {name} must be a string, got {_show(cfg[name])}")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"{where}: architectures must be a list of names, got {_show(archs)}")
    heads, kv_heads = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if heads is not None and not cfg.get("head_dim"):
        hidden = cfg.get("hidden_size")
        if hidden is None:
            raise ConfigError(f"{where}: has neither 'head_dim' nor 'hidden_size'")
        if hidden % heads:
            raise ConfigError(f"{where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads} "
                              f"(and there is no head_dim)")
    check_eos_token_id(cfg.get("eos_token_id"), where)
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise ConfigError(f"{where}: layer_types must be a list of names, got {_show(layer_types)}")
        layers = cfg.get("num_hidden_layers")
        if layers is not None and len(layer_types) != layers:
            raise ConfigError(f"{where}: layer_types has {len(layer_types)} entries for "
                              f"num_hidden_layers={layers}")
    for name in ("rope_scaling", "rope_parameters"):
        _rope(cfg.get(name), name, where)


def check_eos_token_id(value: Any, where: str, name: str = "eos_token_id") -> None:
    """``value`` must be null, a token id (an int >= 0) or a list of them."""
    ids = value if isinstance(value, list) else [value] if value is not None else []
    for v in ids:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
            raise ConfigError(f"{where}: {name} must be a token id (an integer >= 0) or a list of them, "
                              f"got {_show(value)}")


def _int(value: Any, name: str, least: int, most: int, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{where}: {name} must be an integer, got {_show(value)}")
    if not least <= value <= most:
        raise ConfigError(f"{where}: {name}={_show(value, bare=True)} is out of range "
                          f"(from {least} to {most})")


def _number(value: Any, name: str, least: float, most: float, closed: bool, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {name} must be a number, got {_show(value)}")
    try:
        v = float(value)
    except OverflowError:  # an int too large for a float
        v = math.inf
    low_ok = v >= least if closed else v > least
    if not (math.isfinite(v) and low_ok and v <= most):
        bound = "at least" if closed else "above"
        raise ConfigError(f"{where}: {name}={_show(value, bare=True)} is out of range ({bound} {least}, "
                          f"at most {most})")


def _rope(value: Any, name: str, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: {name} must be an object, got {_show(value)}")
    if value and "rope_type" not in value and "type" not in value and all(
            k in _ROPE_LAYER_TYPES and isinstance(v, Mapping) for k, v in value.items()):
        for layer_type, sub in value.items():  # transformers 5: one set per layer type
            _rope(sub, f"{name}.{layer_type}", where)
        return
    rope_type = value.get("rope_type", value.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}: {name}.rope_type={_show(rope_type, bare=True)} is not a known RoPE type "
                          f"(known: {', '.join(ROPE_TYPES)})")
    for key in ROPE_TYPES[rope_type]:
        if value.get(key) is None:
            raise ConfigError(f"{where}: {name} of rope_type {rope_type!r} needs {name}.{key}")
    for key in _ROPE_NUMBERS:
        _number(value.get(key), f"{name}.{key}", -math.inf if key.startswith("beta") else 0.0, math.inf,
                key in ("mscale", "mscale_all_dim", "attention_factor"), where)
    _number(value.get("rope_theta"), f"{name}.rope_theta", 0.0, math.inf, False, where)
    _number(value.get("partial_rotary_factor"), f"{name}.partial_rotary_factor", 0.0, 1.0, False, where)
    _int(value.get("original_max_position_embeddings"), f"{name}.original_max_position_embeddings",
         1, 2**31 - 1, where)
    for key in ("short_factor", "long_factor", "mrope_section"):
        seq = value.get(key)
        if seq is None:
            continue
        if not isinstance(seq, list) or not seq:
            raise ConfigError(f"{where}: {name}.{key} must be a non-empty list, got {_show(seq)}")
        for v in seq:
            if key == "mrope_section":
                _int(v, f"{name}.{key}", 1, 2**16, where)
            else:
                _number(v, f"{name}.{key}", 0.0, math.inf, False, where)


def _show(value: Any, bare: bool = False) -> str:
    """A short description of a bad value: its repr (cut short) and, unless ``bare``, its JSON type."""
    if isinstance(value, HugeInt):
        return repr(value)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        text = f"an integer of {value.bit_length()} bits"  # repr() of a huge int may itself raise
    else:
        text = repr(value)
        if len(text) > 60:
            text = text[:57] + "..."
    if bare:
        return text
    kind = {type(None): "null", bool: "a bool", str: "a string", float: "a float", int: "an integer",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
    return f"{text} ({kind})"
