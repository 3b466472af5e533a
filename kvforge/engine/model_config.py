"""``ModelConfig``: the parts of a Hugging Face ``config.json`` the engine runs.

One frozen description covers the Llama family the engine implements:
Llama (with Llama 3 RoPE scaling), Mistral (sliding window), Qwen2 (q/k/v
bias) and Qwen3 (q/k RMSNorm). Anything else is refused with a
:class:`~kvforge.errors.ModelError` that names the architecture, so a
checkpoint never runs through the wrong forward pass.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from kvforge.errors import ConfigError, ModelError
from kvforge.model_shapes import read_hf_config

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "read_config"]

#: architecture name -> model_type; the engine runs these and no others.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ROPE_TYPES = ("default", "llama3", "linear")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder (or of a ``config.json`` path).

    :func:`kvforge.model_shapes.read_hf_config` reads it; its ConfigError
    (missing, not JSON, not an object) is raised as a :class:`ModelError`."""
    try:
        return read_hf_config(path)
    except ConfigError as exc:
        raise ModelError(str(exc)) from None


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Shape and options of one Llama-family decoder.

    ``sliding_windows`` holds one entry per layer (None = full attention);
    ``rope_scaling`` is the normalised RoPE parameter dict (``rope_type``
    one of ``default``, ``llama3``, ``linear``).
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype
    initializer_range: float = 0.02
    #: Llama/Qwen3 ``attention_bias`` also puts a bias on ``o_proj``; Llama's ``mlp_bias`` on the MLP
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def q_size(self) -> int:
        """Width of the query projection: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (or value) projection: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None) -> ModelConfig:
        """Read a parsed ``config.json`` (and optionally ``generation_config.json``)."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch is None:
            by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(str(cfg.get("model_type")))
        if arch not in SUPPORTED_ARCHITECTURES:
            name = arch or f"model_type={cfg.get('model_type')!r}"
            raise ModelError(f"architecture {name} is not supported by the kvforge engine "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        model_type = SUPPORTED_ARCHITECTURES[arch]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"{arch}: hidden_act={act!r} is not supported (only 'silu')")
        try:
            hidden = int(cfg["hidden_size"])
            num_heads = int(cfg["num_attention_heads"])
            num_layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
            inter = int(cfg["intermediate_size"])
        except KeyError as exc:
            raise ModelError(f"{arch} config has no {exc.args[0]!r}") from None
        head_dim = int(cfg.get("head_dim") or hidden // num_heads)
        num_kv = int(cfg.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv:
            raise ModelError(f"{arch}: num_attention_heads={num_heads} is not a multiple of "
                             f"num_key_value_heads={num_kv}")
        theta, scaling = _rope(cfg, arch)
        dtype_name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").removeprefix("torch.")
        eos = _eos_ids((generation_config or {}).get("eos_token_id", cfg.get("eos_token_id")))
        return cls(
            architecture=arch, model_type=model_type, vocab_size=vocab, hidden_size=hidden,
            intermediate_size=inter, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv,
            head_dim=head_dim, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=scaling, max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3")
                                               and bool(cfg.get("attention_bias", False))),
            qk_norm=model_type == "qwen3", sliding_windows=_windows(cfg, model_type, num_layers),
            eos_token_ids=eos, dtype=_DTYPES.get(dtype_name, torch.float32),
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            o_bias=model_type in ("llama", "qwen3") and bool(cfg.get("attention_bias", False)),
            mlp_bias=model_type == "llama" and bool(cfg.get("mlp_bias", False)),
        )


def _rope(cfg: Mapping[str, Any], arch: str) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 writes "rope_parameters"; older configs "rope_theta" + "rope_scaling"
    params = dict(cfg.get("rope_parameters") or {})
    if cfg.get("rope_scaling"):
        params = {**dict(cfg["rope_scaling"]), **params}
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ModelError(f"{arch}: rope_type={rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ModelError(f"{arch}: partial_rotary_factor is not supported")
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    return theta, params


def _windows(cfg: Mapping[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if not window:
        return (None,) * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types:
        return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window", False):
            return (None,) * num_layers
        first = int(cfg.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers
