"""``ModelConfig``: the parts of a Hugging Face ``config.json`` the engine runs.

One frozen description covers the Llama family the engine implements:
Llama (with Llama 3 RoPE scaling), Mistral (sliding window), Qwen2 (q/k/v
bias) and Qwen3 (q/k RMSNorm). Anything else is refused with a
:class:`~kvforge.errors.ModelError` that names the architecture, so a
checkpoint never runs through the wrong forward pass.

Every field is checked by :func:`kvforge.model_shapes.check_hf_config`
before it is used; a malformed one raises :class:`ModelConfigError` (a
:class:`~kvforge.errors.ConfigError` naming the field that is also a
:class:`~kvforge.errors.ModelError`, what the engine's callers catch). The
config also says which tensors a checkpoint must hold:
:meth:`ModelConfig.expected_tensors` and :func:`check_tensors` hold every
tensor's name, shape and dtype against it before a model is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch

from kvforge.engine.kv_scales import check_kv_scale_specs, is_kv_scale_name
from kvforge.errors import ConfigError, ModelError
from kvforge.model_shapes import check_eos_token_id, check_hf_config, read_hf_config

__all__ = ["ModelConfig", "ModelConfigError", "SUPPORTED_ARCHITECTURES", "SUPPORTED_QUANTIZATION",
           "WEIGHT_DTYPES", "ExpectedTensor", "TensorSpec", "check_tensors", "is_native_architecture", "read_config"]

#: architecture name -> model_type; the engine runs these and no others.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
#: quantized weight formats (``quantization_config.quant_method``) the engine loads: none yet
SUPPORTED_QUANTIZATION: tuple[str, ...] = ()
#: checkpoint dtypes the engine casts to the model dtype; integer, bool and float8 tensors are refused
WEIGHT_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32", "float64")
_ROPE_TYPES = ("default", "llama3", "linear")
_LAYER_TYPES = ("full_attention", "sliding_attention")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size")


class ModelConfigError(ModelError, ConfigError):
    """A checkpoint's ``config.json`` (or ``generation_config.json``) is malformed.

    A :class:`~kvforge.errors.ConfigError` that names the field, and a
    :class:`~kvforge.errors.ModelError`: the checkpoint cannot be loaded."""


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder (or of a ``config.json`` path).

    :func:`kvforge.model_shapes.read_hf_config` reads it; its ConfigError
    (missing, not UTF-8, not JSON, not an object) is raised as a
    :class:`ModelConfigError`. The fields are checked by
    :meth:`ModelConfig.from_hf`."""
    try:
        return read_hf_config(path)
    except ConfigError as exc:
        raise ModelConfigError(str(exc)) from None


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class ExpectedTensor(NamedTuple):
    """A tensor a checkpoint holds: its shape from the config, and whether it must be there."""

    shape: tuple[int, ...]
    required: bool = True


class TensorSpec(NamedTuple):
    """What a checkpoint says of one tensor before it is read: shape, dtype name
    (``"bfloat16"``, ``"int8"``, as torch spells it) and the file that holds it."""

    shape: tuple[int, ...]
    dtype: str
    file: str | None = None


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

    def expected_tensors(self) -> dict[str, ExpectedTensor]:
        """Every tensor (Hugging Face name) a checkpoint of this config holds, with its shape.

        ``lm_head.weight`` is optional with tied embeddings; biases and q/k
        norms are there exactly when the config's options say so. Nothing
        else may be in the checkpoint (``rotary_emb.inv_freq`` buffers aside)."""
        h, q, kv, inter = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        out: dict[str, ExpectedTensor] = {}
        for i in range(self.num_layers):
            a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            shapes: dict[str, tuple[int, ...]] = {
                f"model.layers.{i}.input_layernorm.weight": (h,),
                a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
                a + "o_proj.weight": (h, q),
                f"model.layers.{i}.post_attention_layernorm.weight": (h,),
                m + "gate_proj.weight": (inter, h), m + "up_proj.weight": (inter, h), m + "down_proj.weight": (h, inter),
            }
            if self.qkv_bias:
                shapes.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
            if self.o_bias:
                shapes[a + "o_proj.bias"] = (h,)
            if self.qk_norm:
                shapes.update({a + "q_norm.weight": (self.head_dim,), a + "k_norm.weight": (self.head_dim,)})
            if self.mlp_bias:
                shapes.update({m + "gate_proj.bias": (inter,), m + "up_proj.bias": (inter,), m + "down_proj.bias": (h,)})
            out.update((name, ExpectedTensor(shape)) for name, shape in shapes.items())
        out["model.embed_tokens.weight"] = ExpectedTensor((self.vocab_size, h))
        out["model.norm.weight"] = ExpectedTensor((h,))
        out["lm_head.weight"] = ExpectedTensor((self.vocab_size, h), required=not self.tie_word_embeddings)
        return out

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None) -> ModelConfig:
        """Read a parsed ``config.json`` (and optionally ``generation_config.json``).

        Raises :class:`ModelConfigError` naming a malformed field, and
        :class:`~kvforge.errors.ModelError` for an architecture, activation,
        RoPE type or quantization the engine does not run."""
        if not isinstance(cfg, Mapping):
            raise ModelConfigError(f"config.json: expected a JSON object, got {type(cfg).__name__}")
        arch = _architecture(cfg)
        model_type = SUPPORTED_ARCHITECTURES[arch]
        try:
            check_hf_config(cfg, f"{arch} config.json", required=_REQUIRED)
            if generation_config is not None:
                if not isinstance(generation_config, Mapping):
                    raise ConfigError(f"generation_config.json: expected a JSON object, "
                                      f"got {type(generation_config).__name__}")
                check_eos_token_id(generation_config.get("eos_token_id"), "generation_config.json")
        except ModelConfigError:
            raise
        except ConfigError as exc:
            raise ModelConfigError(str(exc)) from None
        quant = cfg.get("quantization_config")
        if quant is not None:
            method = quant.get("quant_method", "unnamed")
            raise ModelError(f"{arch}: config.json declares quantization_config (quant_method={method!r}); "
                             f"the kvforge engine loads float16/bfloat16/float32 weights only and supports "
                             f"no quantized format ({', '.join(SUPPORTED_QUANTIZATION) or 'none yet'})")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"{arch}: hidden_act={act!r} is not supported (only 'silu')")
        hidden = cfg["hidden_size"]
        num_heads = cfg["num_attention_heads"]
        num_layers = cfg["num_hidden_layers"]
        head_dim = cfg.get("head_dim") or hidden // num_heads
        if head_dim % 2:
            raise ModelConfigError(f"{arch}: head_dim={head_dim} is odd (RoPE rotates pairs of dimensions)")
        num_kv = cfg.get("num_key_value_heads") or num_heads
        theta, scaling = _rope(cfg, arch)
        dtype_name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").removeprefix("torch.")
        eos = _eos_ids((generation_config or {}).get("eos_token_id", cfg.get("eos_token_id")))
        attention_bias = bool(cfg.get("attention_bias") or False)
        return cls(
            architecture=arch, model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"], num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=num_kv, head_dim=head_dim, rms_norm_eps=float(_get(cfg, "rms_norm_eps", 1e-6)),
            rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings") or 4096,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings") or False),
            qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and attention_bias),
            qk_norm=model_type == "qwen3", sliding_windows=_windows(cfg, arch, model_type, num_layers),
            eos_token_ids=eos, dtype=_DTYPES.get(dtype_name, torch.float32),
            initializer_range=float(_get(cfg, "initializer_range", 0.02)),
            o_bias=model_type in ("llama", "qwen3") and attention_bias,
            mlp_bias=model_type == "llama" and bool(cfg.get("mlp_bias") or False),
        )


def _get(cfg: Mapping[str, Any], name: str, default: Any) -> Any:
    value = cfg.get(name)
    return default if value is None else value


def _architecture(cfg: Mapping[str, Any]) -> str:
    """The supported architecture ``cfg`` names (``architectures[0]``, else by ``model_type``)."""
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ModelConfigError(f"config.json: architectures must be a list of names, got {archs!r:.60}")
    model_type = cfg.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ModelConfigError(f"config.json: model_type must be a string, got {model_type!r:.60}")
    arch = archs[0] if archs else None
    if arch is None:
        by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
        arch = by_type.get(str(model_type))
    if arch not in SUPPORTED_ARCHITECTURES:
        name = arch or f"model_type={model_type!r}"
        raise ModelError(f"architecture {name} is not supported by the kvforge engine "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def is_native_architecture(cfg: Mapping[str, Any]) -> bool:
    """Whether ``config.json`` names an architecture of :data:`SUPPORTED_ARCHITECTURES`
    (``architectures[0]``, else by ``model_type``); a malformed field raises ModelConfigError."""
    try:
        _architecture(cfg)
    except ModelConfigError:
        raise
    except ModelError:
        return False
    return True


def _rope(cfg: Mapping[str, Any], arch: str) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 writes "rope_parameters"; older configs "rope_theta" + "rope_scaling"
    # (check_hf_config has checked both: objects of a known rope_type with the keys it needs)
    params = dict(cfg.get("rope_parameters") or {})
    if cfg.get("rope_scaling"):
        params = {**dict(cfg["rope_scaling"]), **params}
    if params and all(isinstance(v, Mapping) for v in params.values()) and "rope_type" not in params:
        raise ModelError(f"{arch}: RoPE parameters per layer type ({', '.join(params)}) are not supported")
    theta = float(_get(params, "rope_theta", _get(cfg, "rope_theta", 10000.0)))
    params.pop("rope_theta", None)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ModelError(f"{arch}: rope_type={rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    for where in (params, cfg):
        if float(_get(where, "partial_rotary_factor", 1.0)) != 1.0:
            raise ModelError(f"{arch}: partial_rotary_factor is not supported")
    if rope_type == "default":
        return theta, None
    params["rope_type"] = rope_type
    return theta, params


def _windows(cfg: Mapping[str, Any], arch: str, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")  # checked: one name per layer
    for i, kind in enumerate(layer_types or ()):
        if kind not in _LAYER_TYPES:
            raise ModelConfigError(f"{arch} config.json: layer_types[{i}]={kind!r:.40} is not supported "
                                   f"(supported: {', '.join(_LAYER_TYPES)})")
    if not window:
        return (None,) * num_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window", False):
            return (None,) * num_layers
        first = _get(cfg, "max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window,) * num_layers


def check_tensors(config: ModelConfig, specs: Mapping[str, TensorSpec], where: str = "checkpoint") -> None:
    """Hold every tensor of a checkpoint against ``config`` before anything is built.

    Checks, in this order, naming the tensor (and its file, when known): every
    dtype is one of :data:`WEIGHT_DTYPES` (integer, bool and float8 tensors
    are quantized or foreign weights, and no quantized format is supported);
    every tensor the config needs is there; no tensor is left over that the
    engine would not use (an option it does not implement); every shape is the
    one :meth:`ModelConfig.expected_tensors` gives. KV cache scales
    (:mod:`kvforge.engine.kv_scales`) are not weights: they are held to their
    own rules (float, ``[]`` / ``[1]`` / ``[num_kv_heads]``, a layer in range).
    Raises :class:`~kvforge.errors.ModelError`."""
    arch = config.architecture
    # KV cache scales (``self_attn.k_scale`` / ``v_scale`` and the other names vLLM reads) are
    # not weights: checked here by their own rules, read by the engine after the cache is built
    check_kv_scale_specs(specs, config.num_layers, config.num_kv_heads, f"{arch} {where}")
    specs = {name: spec for name, spec in specs.items() if not is_kv_scale_name(name)}
    for name, spec in specs.items():
        if spec.dtype not in WEIGHT_DTYPES:
            file = f" in {spec.file}" if spec.file else ""
            raise ModelError(f"{arch} {where}: tensor {name!r}{file} has dtype {spec.dtype}; the engine loads "
                             f"{'/'.join(WEIGHT_DTYPES)} weights (cast to the model dtype) and refuses integer "
                             f"and quantized tensors: no quantized format is supported "
                             f"({', '.join(SUPPORTED_QUANTIZATION) or 'none yet'})")
    expected = config.expected_tensors()
    missing = [n for n, e in expected.items() if e.required and n not in specs]
    if missing:
        if missing[0] == "lm_head.weight":
            raise ModelError(f"{arch} {where} has no tensor 'lm_head.weight' and tie_word_embeddings is false")
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise ModelError(f"{arch} {where} has no tensor {missing[0]!r}{more}")
    unused = sorted(n for n in specs if n not in expected and not n.endswith("rotary_emb.inv_freq"))
    if unused:
        more = f" and {len(unused) - 4} more" if len(unused) > 4 else ""
        raise ModelError(f"{arch} {where} has {len(unused)} tensor(s) the engine would not "
                         f"use: {', '.join(unused[:4])}{more} (an unsupported option; refusing to run "
                         f"without them)")
    for name, spec in specs.items():
        want = expected.get(name)
        if want is not None and tuple(spec.shape) != want.shape:
            file = f" in {spec.file}" if spec.file else ""
            raise ModelError(f"tensor {name!r}{file} has shape {tuple(spec.shape)}, expected {want.shape} "
                             f"from config.json")
