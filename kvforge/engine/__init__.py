"""kvforge's reference engine: continuous batching over a paged :class:`~kvforge.storage.cache.KVCache`.

Llama-family Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3) loaded
from a local folder with safetensors, run by kvforge's own forward pass and
paged kernels. See ``docs/engine.md``.

>>> from kvforge.engine import Engine, SamplingParams
>>> engine = Engine("path/to/checkpoint", kv_memory="4GiB")           # doctest: +SKIP
>>> out = engine.generate(["Hello"], SamplingParams(max_tokens=32))   # doctest: +SKIP
>>> out[0].text, out[0].finish_reason, out[0].metrics.ttft            # doctest: +SKIP
"""
from __future__ import annotations

from kvforge.engine.config import EngineConfig
from kvforge.engine.engine import Engine, Prompt
from kvforge.engine.loader import Checkpoint, load_checkpoint
from kvforge.engine.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from kvforge.engine.preemption import PreemptionPolicy
from kvforge.engine.request import CompletionOutput, RequestMetrics, RequestOutput
from kvforge.engine.sampling import SamplingParams
from kvforge.engine.stats import EngineStats

__all__ = [
    "Checkpoint",
    "CompletionOutput",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "ModelConfig",
    "PreemptionPolicy",
    "Prompt",
    "RequestMetrics",
    "RequestOutput",
    "SUPPORTED_ARCHITECTURES",
    "SamplingParams",
    "load_checkpoint",
]
