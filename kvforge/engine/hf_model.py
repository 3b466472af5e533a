"""A transformers model driven by the engine (``model_impl="transformers"``).

:class:`TransformersModel` wraps a transformers causal LM so that the engine's
scheduler, cache and sampler run around transformers' own forward: prefix
reuse, chunked prefill, preemption (recompute or swap), ``n > 1`` forks and
compaction are the engine's, the layers are the model's. Each engine step is
one forward over the flattened ragged batch (batch dim 1, every sequence's new
tokens concatenated, ``position_ids`` from the step), whose attention layers
read the step's paged metadata (:mod:`kvforge.engine.hf_attention`). Only the
rows that sample get logits: ``logits_to_keep`` selects them before the model's
own head, so a final soft-cap or logit scaling (Gemma 2, Granite) is the
model's too.

A model is refused, with a :class:`~kvforge.errors.ModelError` saying why,
when it is an encoder-decoder, has cross-attention, recurrent, linear or
state-space layers, no attention heads, or layers sharing keys/values; and when
a one-token probe forward, run at construction on a scratch cache, does not
go through the attention interface in every layer exactly once (a model with
its own attention code), or raises (attention sinks, bidirectional layers, keys
and values of different head dims). Checkpoints load with safetensors only,
from the local folder (no network, no custom code).

transformers is imported only here, lazily: ``import kvforge.engine`` never
imports it.
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from kvforge.config import CacheConfig
from kvforge.engine.kv_scales import is_kv_scale_name
from kvforge.errors import KVForgeError, MissingExtraError, ModelError
from kvforge.storage import KVCache, StepBatch

__all__ = ["TransformersModel", "TransformersModelConfig", "check_supported", "import_transformers", "model_class",
           "read_hf_config"]

log = logging.getLogger(__name__)

#: layer types whose layers the engine's kernels run
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def import_transformers(why: str) -> Any:
    """The transformers module (5.x), or :class:`MissingExtraError` saying ``why`` it is needed."""
    try:
        import transformers
        from transformers import AttentionInterface  # noqa: F401  (transformers >= 5)
    except ImportError as exc:
        raise MissingExtraError(f"{why} needs Hugging Face transformers 5 ({exc}): pip install 'kvforge[hf]' "
                                f"(or 'transformers>=5')") from exc
    return transformers


@dataclass(frozen=True, slots=True)
class TransformersModelConfig:
    """What the engine reads of a transformers model's config (its decoder text config).

    ``sliding_windows``: one entry per layer (None = full attention), as the
    model's ``layer_types`` and ``sliding_window`` say (the layers pass their
    own window to the kernels; this is for reports). ``dtype``: the
    checkpoint's."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    sliding_windows: tuple[int | None, ...]
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def from_hf(cls, config: Any, eos_token_id: Any = None) -> TransformersModelConfig:
        """Read a transformers ``PretrainedConfig`` (checked by :func:`check_supported` first)."""
        check_supported(config)
        text = _text_config(config)
        arch = _architecture(config)
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        layer_types = list(getattr(text, "layer_types", None) or [])
        window = getattr(text, "sliding_window", None)
        num_layers = int(text.num_hidden_layers)
        if layer_types:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        else:
            windows = (window,) * num_layers if window else (None,) * num_layers
        eos = eos_token_id if eos_token_id is not None else getattr(text, "eos_token_id", None)
        eos_ids = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
        raw_dtype = getattr(config, "dtype", None) or getattr(text, "dtype", None)
        name = str(raw_dtype).removeprefix("torch.") if raw_dtype is not None else "float32"
        return cls(architecture=arch, model_type=str(text.model_type), vocab_size=int(text.vocab_size),
                   hidden_size=int(text.hidden_size), num_layers=num_layers, num_heads=heads,
                   num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
                   max_position_embeddings=int(getattr(text, "max_position_embeddings", None) or 4096),
                   sliding_windows=windows, eos_token_ids=eos_ids, dtype=_DTYPES.get(name, torch.float32))


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _architecture(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    return str(archs[0]) if archs else f"model_type={getattr(config, 'model_type', None)!r}"


#: RoPE variants whose frequencies transformers picks from the forward's longest position
#: (``max(position_ids)``): past their original length they change with the batch
LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def _rope_parameters(config: Any) -> dict[str, Any]:
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if isinstance(params, dict):
            return params
    return {}


def rope_type(config: Any) -> str | None:
    """The config's RoPE variant (``rope_parameters`` in transformers 5, ``rope_scaling`` before)."""
    params = _rope_parameters(config)
    kind = params.get("rope_type") or params.get("type")
    return str(kind) if kind else None


def fixed_rope_positions(config: Any) -> int | None:
    """For a RoPE whose frequencies depend on the forward's longest position (``dynamic``,
    ``longrope``): the positions over which they stay fixed (the original context length);
    None for every other RoPE. The engine runs all of a step's sequences in one forward, so
    beyond this length a sequence's keys would depend on what it is batched with, and the
    prefix cache would keep them: the engine's context stops here."""
    if rope_type(config) not in LENGTH_DEPENDENT_ROPE:
        return None
    params = _rope_parameters(config)
    original = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings",
                                                                           None)
    return int(original or config.max_position_embeddings)


def check_supported(config: Any) -> None:
    """Refuse, with a :class:`ModelError` saying why, a transformers config the engine cannot
    drive: an encoder-decoder, an architecture that is not one of transformers' causal LMs
    (or is not the one its ``model_type`` builds), cross-attention, layer types other than
    full and sliding attention (recurrent, linear or state-space layers), no attention
    heads, or layers that share keys/values."""
    model_class(config)
    arch = _architecture(config)
    why = None
    text = _text_config(config)
    layer_types = list(getattr(text, "layer_types", None) or [])
    odd = sorted({str(t) for t in layer_types if t not in ATTENTION_LAYER_TYPES})
    if getattr(text, "add_cross_attention", False) or getattr(text, "cross_attention_layers", None):
        why = "it has cross-attention layers; the engine runs decoder self-attention only"
    elif odd:
        why = (f"it has layers of type {', '.join(odd)} (recurrent, linear-attention or state-space layers keep "
               f"a state, not keys and values); the engine runs {' and '.join(ATTENTION_LAYER_TYPES)} layers")
    elif not isinstance(getattr(text, "num_attention_heads", None), int) or not text.num_attention_heads:
        why = "its config has no attention heads (num_attention_heads): a recurrent or state-space model?"
    elif getattr(text, "num_kv_shared_layers", 0):
        why = "some of its layers share keys/values with others (num_kv_shared_layers), which the cache cannot hold"
    elif not isinstance(getattr(text, "num_hidden_layers", None), int) or text.num_hidden_layers < 1:
        why = "its config has no num_hidden_layers"
    if why is not None:
        raise ModelError(f"{arch} cannot run on the kvforge engine through transformers: {why}")


def model_class(config: Any) -> type:
    """The transformers class that runs ``config``: the architecture its ``config.json``
    names (``architectures[0]``), else the causal LM of its ``model_type``. Raises
    :class:`ModelError` for an encoder-decoder, a name transformers does not have (custom
    code is never run), a class that is not a causal LM, or one whose config class is not
    the config's (a checkpoint must never run through another model's forward pass)."""
    tf = import_transformers("model_impl='transformers'")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = _architecture(config)
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    name = archs[0] if archs else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    why = None
    cls = getattr(tf, name, None) if isinstance(name, str) else None
    if getattr(config, "is_encoder_decoder", False) or getattr(_text_config(config), "is_encoder_decoder", False):
        why = "it is an encoder-decoder model; the engine runs decoder-only causal LMs"
    elif name is None:
        why = f"transformers has no causal LM for model_type {model_type!r} (the engine runs decoder-only causal LMs)"
    elif cls is None:
        why = f"transformers has no class {name} (custom model code is never run)"
    elif name not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        why = f"{name} is not one of transformers' causal LMs (the engine runs decoder-only causal LMs)"
    elif not isinstance(config, getattr(cls, "config_class", type(None))):
        why = (f"config.json names {name}, whose config is {getattr(cls.config_class, '__name__', '?')}, but its "
               f"model_type {model_type!r} reads as {type(config).__name__}")
    if why is not None:
        raise ModelError(f"{arch} cannot run on the kvforge engine through transformers: {why}")
    assert cls is not None
    return cls


class TransformersModel:
    """A transformers causal LM, in eval mode on one device, that the engine drives.

    Build it with :meth:`from_pretrained` (a local checkpoint folder) or
    :meth:`random` (a ``config.json`` dict, random weights: benchmarks), or
    wrap a loaded model (``TransformersModel(hf_model)``: its attention
    implementation is set to the engine's). :attr:`hf_model` is the
    transformers model; :meth:`logits` runs one engine step."""

    def __init__(self, hf_model: Any, *, backend: str = "auto") -> None:
        from kvforge.engine.hf_attention import ENGINE_ATTENTION_NAME, register

        import_transformers("model_impl='transformers'")
        register()
        eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
        self.config = TransformersModelConfig.from_hf(hf_model.config, eos)
        first = next(hf_model.parameters())
        self.device = first.device
        self.dtype = first.dtype
        self.max_positions = self.config.max_position_embeddings
        fixed = fixed_rope_positions(_text_config(hf_model.config))
        if fixed is not None and fixed < self.max_positions:
            log.info("%s: its %s RoPE changes with the forward's longest position past %d positions; the "
                     "engine's context stops there", self.config.architecture, rope_type(_text_config(hf_model.config)),
                     fixed)
            self.max_positions = fixed
        self.identity = ""
        self._keeps_rows = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
        self.hf_model = hf_model
        #: the attention logits' soft cap its layers pass (Gemma 2), or None
        cap = getattr(_text_config(hf_model.config), "attn_logit_softcapping", None)
        self.attn_soft_cap: float | None = float(cap) if cap else None
        before, was_training = hf_model.config._attn_implementation, hf_model.training
        hf_model.set_attn_implementation(ENGINE_ATTENTION_NAME)
        hf_model.eval()
        try:
            self._probe(backend)
        except BaseException:  # a refused model is handed back as it came
            hf_model.set_attn_implementation(before)
            hf_model.train(was_training)
            raise

    # ------------------------------------------------------------- building
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], *, dtype: torch.dtype, device: torch.device,
                        backend: str = "auto") -> TransformersModel:
        """Load a local checkpoint folder (safetensors only, no network, no custom code).

        Raises :class:`ModelError` for a model the engine cannot drive (see
        :func:`check_supported`), and for a checkpoint that transformers cannot
        load or that misses tensors, holds tensors the model does not use, or
        holds tensors of the wrong shape (each named). KV cache scales
        (:mod:`kvforge.engine.kv_scales`) are not the model's: the engine reads them."""
        import_transformers("model_impl='transformers'")
        from kvforge.engine.hf_attention import ENGINE_ATTENTION_NAME, register

        path = os.fspath(folder)
        if not os.path.isdir(path):
            raise ModelError(f"model path {path!r} is not a folder (expected a local Hugging Face checkpoint)")
        config = read_hf_config(path)
        check_supported(config)
        register()
        place = {"device_map": {"": str(device)}} if device.type != "cpu" else {}
        hf_class = model_class(config)
        try:
            hf_model, info = hf_class.from_pretrained(
                path, config=config, dtype=dtype, attn_implementation=ENGINE_ATTENTION_NAME, use_safetensors=True,
                local_files_only=True, output_loading_info=True, **place)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise ModelError(f"transformers cannot load {path}: {type(exc).__name__}: {exc}") from exc
        for kind, what in (("missing_keys", "has no tensor"), ("mismatched_keys", "has tensors of the wrong shape:"),
                           ("unexpected_keys", "holds tensors the model would not use:")):
            keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind) or ())
            if kind == "unexpected_keys":  # fp8 KV cache scales: the engine reads them (kv_scales.py)
                keys = [k for k in keys if not is_kv_scale_name(k)]
            if keys:
                more = f" and {len(keys) - 4} more" if len(keys) > 4 else ""
                raise ModelError(f"{_architecture(config)} checkpoint {path} {what} {', '.join(keys[:4])}{more}")
        return cls(hf_model.to(device), backend=backend)

    @classmethod
    def random(cls, hf_config: Mapping[str, Any], *, dtype: torch.dtype, device: torch.device, seed: int = 0,
               backend: str = "auto") -> TransformersModel:
        """Random weights (transformers' own initialisation, seeded) for a ``config.json`` dict,
        made on the device. The global torch generator is left as it was."""
        tf = import_transformers("model_impl='transformers'")
        from kvforge.engine.hf_attention import ENGINE_ATTENTION_NAME, register

        options = {k: v for k, v in dict(hf_config).items() if k not in ("model_type", "torch_dtype", "dtype")}
        model_type = hf_config.get("model_type")
        try:
            config = tf.AutoConfig.for_model(model_type, **options)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"transformers cannot build a config for model_type {model_type!r}: {exc}") from exc
        check_supported(config)
        register()
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.device(device):
            torch.manual_seed(seed)
            hf_model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                           attn_implementation=ENGINE_ATTENTION_NAME)
        if type(hf_model) is not model_class(config):
            raise ModelError(f"{_architecture(config)}: transformers built a {type(hf_model).__name__} for this config")
        return cls(hf_model.to(device=device, dtype=dtype), backend=backend)

    def set_fused(self, fused: bool | None) -> None:
        """The native model's fused ops have no counterpart here: transformers' own layers run."""

    @property
    def fused(self) -> bool:
        return False

    @property
    def num_parameter_bytes(self) -> int:
        """Bytes of the weights on the device (tied tensors counted once)."""
        return sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in self.hf_model.parameters()}.values())

    # -------------------------------------------------------------- forward
    def logits(self, batch: StepBatch, cache: KVCache) -> Tensor:
        """Float32 logits ``[S, vocab]`` of one engine step: the rows ``batch.logits_indices``
        (every row of a pure decode step), computed by one forward of the model over the
        step's ``T`` tokens as a batch of one, keys/values written into ``cache``."""
        from kvforge.engine.hf_attention import attention_step

        rows = batch.logits_indices
        kwargs: dict[str, Any] = {}
        if self._keeps_rows:
            kwargs["logits_to_keep"] = 0 if rows is None else rows.long()
        with attention_step(cache, batch) as step:
            out = self.hf_model(input_ids=batch.input_ids.long().unsqueeze(0),
                                position_ids=batch.positions.long().unsqueeze(0), use_cache=False, return_dict=True,
                                **kwargs)
        step.check_complete(self.config.num_layers)
        logits = out.logits[0]
        if rows is not None and not self._keeps_rows:
            logits = logits[rows.long()]
        return logits.float()

    def _probe(self, backend: str) -> None:
        """One token through the model on a scratch one-block cache: every layer must attend
        through the engine's attention exactly once, with the cache's shape; else ModelError."""
        c = self.config
        cfg = CacheConfig(block_size=16, num_blocks=1, num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
                          head_dim=c.head_dim, dtype=self.dtype, device=str(self.device), enable_prefix_caching=False,
                          name="probe")
        scratch = KVCache(cfg, backend=backend)
        scratch.add_sequence(0)
        scratch.append_tokens(0, 1)
        batch = scratch.prepare_step([0], 1, input_ids=[0])
        declared = getattr(type(self.hf_model), "_supports_attention_backend", False)
        try:
            with torch.inference_mode():
                logits = self.logits(batch, scratch)
        except KVForgeError as exc:
            hint = "" if declared else f" ({type(self.hf_model).__name__} does not declare _supports_attention_backend)"
            raise ModelError(f"{c.architecture} cannot run on the kvforge engine through transformers: "
                             f"{exc}{hint}") from exc
        except Exception as exc:  # noqa: BLE001 - the model's own code failed on the engine's inputs
            raise ModelError(f"{c.architecture} cannot run on the kvforge engine through transformers: its forward "
                             f"over a flattened step failed: {type(exc).__name__}: {exc}") from exc
        if logits.shape[0] != 1 or logits.dim() != 2:
            raise ModelError(f"{c.architecture}: the probe step returned logits of shape {tuple(logits.shape)}, "
                             f"expected [1, vocab]")
        if not declared:
            log.info("%s does not declare _supports_attention_backend, but every layer attended through the "
                     "engine's attention in the probe step", type(self.hf_model).__name__)

    def __repr__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"TransformersModel({self.config.architecture}, {dtype} on {self.device})"


def read_hf_config(folder: str) -> Any:
    """transformers' config of a local checkpoint folder (no network, no custom code), or ModelError."""
    tf = import_transformers("model_impl='transformers'")
    try:
        return tf.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"transformers cannot read the config of {folder}: {type(exc).__name__}: {exc}") from exc
