"""``EngineConfig``: the engine's scheduling and runtime policy (frozen)."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Any

import torch

from kvforge.errors import ConfigError
from kvforge.units import is_fp8, parse_bytes, resolve_kv_dtype

__all__ = ["EngineConfig", "DEFAULT_GRAPH_SIZES", "MODEL_IMPLS", "PREEMPTION_MODES", "REMOTE_FETCH_MODES"]

#: the values of ``EngineConfig.preemption_mode``
PREEMPTION_MODES = ("auto", "swap", "recompute")
#: the values of ``EngineConfig.remote_fetch``
REMOTE_FETCH_MODES = ("auto", "always")
#: the values of ``EngineConfig.model_impl``
MODEL_IMPLS = ("auto", "native", "transformers")

#: Decode batch sizes captured as CUDA graphs (those up to ``max_num_seqs``, plus it).
DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                       320, 384, 448, 512, 640, 768, 896, 1024)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How the engine batches and runs.

    - ``max_num_seqs``: sequences running at once (decode batch limit);
    - ``max_num_batched_tokens``: tokens computed per step (prefill chunks
      and decodes together); long prompts are prefilled in chunks of it;
    - ``max_model_len``: longest sequence (prompt + output); default the
      model's ``max_position_embeddings``, always capped by the cache;
    - ``block_size``, ``enable_prefix_caching``, ``enable_compaction``:
      used when the engine sizes the cache itself;
    - ``kv_memory_fraction``: on a GPU without a given size, the share of
      the free device memory (after weights) the KV cache takes;
    - ``watermark``: share of blocks kept free when admitting a new
      sequence while others run, so running decodes rarely preempt;
    - ``use_cuda_graphs``, ``max_graph_batch_size``: decode CUDA graphs;
    - ``seed``: seeds requests that bring none (and random weights);
    - ``backend``: kernel backend passed to the cache (``auto``, ``triton``,
      ``torch``);
    - ``fused_ops``: the decoder's Triton RMSNorm/RoPE/SiLU kernels (None =
      on CUDA only; True on the CPU needs ``TRITON_INTERPRET=1``);
    - ``host_memory``: the host tier's budget (bytes or ``"64GiB"``; 0 = none)
      when the engine sizes the cache; a given cache config keeps its own;
    - ``preemption_mode``: how a running sequence gives up its blocks:
      ``"auto"`` swaps it to the host tier when moving its blocks out and
      back costs less than recomputing its tokens (:mod:`kvforge.engine.preemption`),
      ``"swap"`` swaps whenever the host tier has room, ``"recompute"`` never swaps;
    - ``remote_fetch``: with a remote tier, ``"auto"`` fetches a prompt's blocks
      from it when that is faster than computing them (both rates measured:
      :mod:`kvforge.engine.fetch_policy`), ``"always"`` whenever it holds them;
    - ``model_impl``: which code runs the model: ``"native"`` kvforge's own
      Llama-family decoder (Llama, Mistral, Qwen2, Qwen3), ``"transformers"``
      the checkpoint's transformers model under the engine
      (:mod:`kvforge.engine.hf_model`), ``"auto"`` native for the architectures
      the native decoder implements, transformers for every other one;
    - ``kv_dtype``: how the KV cache stores keys and values: None or ``"auto"``
      in the model dtype; ``"fp8_e4m3"`` (``"fp8"``) or ``"fp8_e5m2"`` (or the
      torch float8 dtypes) in one byte an element, quantized with the
      checkpoint's per-layer ``k_scale`` / ``v_scale`` (1.0 without them), so
      the same ``kv_memory`` holds twice the blocks (``docs/fp8.md``); a model
      dtype's name is accepted when it is the model's dtype;
    - ``speculative_tokens``: prompt-lookup speculative decoding: up to this
      many draft tokens a decoding sequence takes from an earlier occurrence of
      its last ``speculative_ngram`` (or fewer) tokens, checked in one step;
      greedy output is plain decoding's (:mod:`kvforge.engine.speculative`);
      0 (the default) turns it off;
    - ``sliding_window_blocks``: ``"free"`` (the default) gives a model that mixes
      full-attention and sliding-window layers (Gemma 2 and 3, GPT-OSS) one block
      table per layer group, and the window layers release the blocks they no
      longer read (``CacheConfig.layer_windows``, :mod:`kvforge.core.groups`);
      ``"keep"`` keeps every block for every layer. Without a host or remote tier
      only (with one, every block is kept); decode CUDA graphs are not captured
      for a grouped cache;
    - ``tensor_parallel_size``: ranks the native decoder's heads, MLP and KV
      cache are split over (:mod:`kvforge.engine.parallel`; 1 = one device).
      ``kv_memory`` is then the budget of all ranks together;
    - ``async_scheduling``: schedule and prepare step t+1 while the device runs
      step t, reading step t's tokens after launching t+1
      (:mod:`kvforge.engine.overlap`); outputs equal the synchronous engine's,
      and :meth:`~kvforge.engine.Engine.step` returns each step's tokens one
      call later. Off by default.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_compaction: bool = False
    kv_memory_fraction: float = 0.85
    watermark: float = 0.01
    use_cuda_graphs: bool = True
    max_graph_batch_size: int | None = None
    seed: int = 0
    backend: str = "auto"
    fused_ops: bool | None = None
    host_memory: int | str = 0
    preemption_mode: str = "auto"
    remote_fetch: str = "auto"
    model_impl: str = "auto"
    kv_dtype: str | torch.dtype | None = None
    speculative_tokens: int = 0
    speculative_ngram: int = 3
    sliding_window_blocks: str = "free"
    tensor_parallel_size: int = 1
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            _int(name, getattr(self, name), 1)
        if self.max_model_len is not None:
            _int("max_model_len", self.max_model_len, 2)
        if self.max_graph_batch_size is not None:
            _int("max_graph_batch_size", self.max_graph_batch_size, 1)
        _int("seed", self.seed, 0)
        _int("speculative_tokens", self.speculative_tokens, 0)
        _int("speculative_ngram", self.speculative_ngram, 1)
        _int("tensor_parallel_size", self.tensor_parallel_size, 1)
        if self.tensor_parallel_size > 64:
            raise ConfigError(f"EngineConfig.tensor_parallel_size must be 1..64, got {self.tensor_parallel_size}")
        for name, lo, hi in (("kv_memory_fraction", 0.0, 1.0), ("watermark", 0.0, 0.5)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo <= float(v) <= hi:
                raise ConfigError(f"EngineConfig.{name} must lie in [{lo}, {hi}], got {v!r}")
        for name in ("enable_prefix_caching", "enable_compaction", "use_cuda_graphs", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"EngineConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.fused_ops is not None and not isinstance(self.fused_ops, bool):
            raise ConfigError(f"EngineConfig.fused_ops must be True, False or None, got {self.fused_ops!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ConfigError(f"EngineConfig.preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                              f"got {self.preemption_mode!r}")
        if self.sliding_window_blocks not in ("free", "keep"):
            raise ConfigError(f"EngineConfig.sliding_window_blocks must be 'free' or 'keep', "
                              f"got {self.sliding_window_blocks!r}")
        if self.remote_fetch not in REMOTE_FETCH_MODES:
            raise ConfigError(f"EngineConfig.remote_fetch must be one of {', '.join(REMOTE_FETCH_MODES)}, "
                              f"got {self.remote_fetch!r}")
        if self.model_impl not in MODEL_IMPLS:
            raise ConfigError(f"EngineConfig.model_impl must be one of {', '.join(MODEL_IMPLS)}, "
                              f"got {self.model_impl!r}")
        hm = self.host_memory
        if isinstance(hm, bool) or not isinstance(hm, (numbers.Integral, str)) or parse_bytes(hm) < 0:
            raise ConfigError(f"EngineConfig.host_memory must be a byte count >= 0 or a size such as '64GiB', "
                              f"got {hm!r}")
        if not _is_auto(self.kv_dtype):
            try:
                resolve_kv_dtype(self.kv_dtype, "kv_dtype")
            except ConfigError as exc:
                raise ConfigError(f"EngineConfig.{exc} ('auto' or None: the model dtype)") from None
        if self.backend not in ("auto", "triton", "torch"):
            raise ConfigError(f"EngineConfig.backend must be 'auto', 'triton' or 'torch', got {self.backend!r}")

    @classmethod
    def from_options(cls, **options: Any) -> EngineConfig:
        """Build from keyword options, naming any unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown engine option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**options)

    @property
    def resolved_kv_dtype(self) -> torch.dtype | None:
        """The KV storage dtype asked for: a torch dtype, or None for the model dtype."""
        if _is_auto(self.kv_dtype):
            return None
        return resolve_kv_dtype(self.kv_dtype, "kv_dtype")

    @property
    def is_fp8(self) -> bool:
        """Whether the engine's KV cache is fp8 (``kv_dtype`` an fp8 format)."""
        dt = self.resolved_kv_dtype
        return dt is not None and is_fp8(dt)

    def graph_sizes(self) -> tuple[int, ...]:
        """Decode batch sizes to capture: the defaults up to the limit, and the limit."""
        top = min(self.max_num_seqs, self.max_graph_batch_size or self.max_num_seqs)
        return tuple(sorted({s for s in DEFAULT_GRAPH_SIZES if s < top} | {top}))


def _is_auto(kv_dtype: Any) -> bool:
    return kv_dtype is None or (isinstance(kv_dtype, str) and kv_dtype.strip().lower() == "auto")


def _int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ConfigError(f"EngineConfig.{name} must be an integer >= {low}, got {v!r}")
