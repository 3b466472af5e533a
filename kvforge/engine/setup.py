"""Building an engine: its config, device and dtype, KV budget and cache config, prompt limits.

Everything here runs before a request is queued or a tensor is allocated,
so a bad argument is refused with a clear error and nothing to undo.
Cache sizing itself is :class:`~kvforge.config.CacheConfig`'s
(:meth:`~kvforge.config.CacheConfig.for_memory`); this module only picks
the budget.
"""
from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Mapping

import torch

from kvforge.config import CacheConfig, is_fp8, parse_bytes, resolve_dtype
from kvforge.engine.config import EngineConfig
from kvforge.engine.model_config import ModelConfig, ModelConfigError, is_native_architecture
from kvforge.errors import ConfigError, ModelError, OutOfBlocksError
from kvforge.storage import resolve_device

if TYPE_CHECKING:
    from kvforge.engine.engine import Engine
    from kvforge.engine.hf_model import TransformersModel
    from kvforge.engine.models.llama import LlamaModel

__all__ = ["MODEL_DTYPES", "cache_config_for", "check_prompt", "engine_config", "kv_budget", "max_len",
           "checkpoint_dtype", "resolve_placement", "uses_native"]

log = logging.getLogger(__name__)

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: a GPU's KV budget leaves this much of the free memory to activations and graphs
GPU_HEADROOM_BYTES = 2 * 2**30
#: the CPU's default KV budget
CPU_DEFAULT_KV_BYTES = 512 * 2**20


def kv_budget(cache_config: Any, kv_memory: int | str | None,
              num_blocks: int | None) -> tuple[CacheConfig | None, int | str | None]:
    """Split the second positional argument into (CacheConfig, KV budget); check the budget early."""
    if cache_config is not None and not isinstance(cache_config, CacheConfig):
        if isinstance(cache_config, bool) or not isinstance(cache_config, (numbers.Integral, str)):
            raise ConfigError(f"the second argument must be a CacheConfig or a KV memory budget (bytes or "
                              f"'4GiB'), got {type(cache_config).__name__} {cache_config!r:.60}")
        if kv_memory is not None or num_blocks is not None:
            given = "kv_memory" if kv_memory is not None else "num_blocks"
            raise ConfigError(f"the KV cache size is given twice: {cache_config!r} and {given}=")
        cache_config, kv_memory = None, cache_config
    if kv_memory is not None:
        if cache_config is not None:
            raise ConfigError("give a CacheConfig or kv_memory=, not both")
        if parse_bytes(kv_memory) <= 0:
            raise ConfigError(f"the KV memory budget must be positive, got {kv_memory!r}")
    return cache_config, kv_memory


def engine_config(config: EngineConfig | None, options: dict[str, Any]) -> EngineConfig:
    """``config`` with ``options`` applied, or an EngineConfig of the options alone."""
    if config is not None and not isinstance(config, EngineConfig):
        raise ConfigError(f"config must be an EngineConfig, got {type(config).__name__}")
    if config is None:
        return EngineConfig.from_options(**options)
    return replace(config, **options) if options else config


def uses_native(model_impl: str, hf_config: Mapping[str, Any], generation_config: Mapping[str, Any] | None = None,
                where: str = "config.json") -> bool:
    """Whether ``model_impl`` (``"auto"``, ``"native"``, ``"transformers"``) runs this
    ``config.json`` on kvforge's native decoder.

    ``"auto"`` does for the architectures the native decoder implements
    (:data:`~kvforge.engine.model_config.SUPPORTED_ARCHITECTURES`), and leaves
    every other one to transformers. A native architecture whose config the
    native decoder refuses (an option it does not implement) raises that
    :class:`ModelError` with ``"native"`` and ``"auto"`` alike, naming
    ``model_impl='transformers'`` as the way to run it; a malformed field raises
    :class:`~kvforge.engine.model_config.ModelConfigError`."""
    if model_impl == "transformers":
        return False
    try:
        ModelConfig.from_hf(hf_config, generation_config)
    except ModelConfigError as exc:
        raise ModelConfigError(f"{where}: {exc}") from None
    except ModelError as exc:
        if model_impl == "auto" and not is_native_architecture(hf_config):
            return False
        raise ModelError(f"{where}: {exc} (model_impl='{model_impl}'; model_impl='transformers' runs it through "
                         f"its transformers model)") from None
    return True


def resolve_placement(device: str, dtype: Any, checkpoint_dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """The device and the model dtype (default: the checkpoint's on GPUs, float32 on the CPU)."""
    dev = resolve_device(device)
    dt = (checkpoint_dtype if dev.type == "cuda" else torch.float32) if dtype is None else resolve_dtype(dtype)
    if dt not in MODEL_DTYPES:
        raise ConfigError(f"dtype {dt} is not supported by the engine (float32, float16, bfloat16)")
    return dev, dt


def checkpoint_dtype(hf_config: Mapping[str, Any]) -> torch.dtype:
    """The weights' dtype a ``config.json`` declares (``torch_dtype`` or ``dtype``; float32
    when it declares none or another one)."""
    name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32").removeprefix("torch.")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.float32)


def max_len(econf: EngineConfig, mconf: ModelConfig) -> int:
    """The longest sequence the model allows under the engine's ``max_model_len``."""
    return min(econf.max_model_len or mconf.max_position_embeddings, mconf.max_position_embeddings)


def cache_config_for(model: LlamaModel | TransformersModel, econf: EngineConfig, given: CacheConfig | None,
                     kv_memory: int | str | None, num_blocks: int | None,
                     per_head_scales: bool = False, remote: bool = False) -> CacheConfig:
    """The cache config of an engine: ``given`` (set to the model's dtype and device),
    ``num_blocks`` blocks, or as many as the KV budget holds (``kv_memory``, else a
    share of the free GPU memory, else 512 MiB on the CPU).

    The storage dtype is ``econf.kv_dtype`` when set, else an fp8 ``given`` config's,
    else the model's; an fp8 cache takes the model's dtype as its ``model_dtype``, and its
    budget counts one byte an element (twice the blocks of the model dtype). With
    ``per_head_scales`` (a checkpoint's per-KV-head scales) it has ``kv_scale_granularity="head"``.
    Sliding-window layers get their own layer groups (``layer_windows``) with
    ``econf.sliding_window_blocks == "free"`` and neither a host tier nor a ``remote`` one."""
    m, dtype, device = model.config, model.dtype, model.device
    shape = (m.num_layers, m.num_kv_heads, m.head_dim)
    kv_dtype = econf.resolved_kv_dtype
    if kv_dtype is not None and not is_fp8(kv_dtype) and kv_dtype != dtype:
        raise ConfigError(f"kv_dtype={econf.kv_dtype!r}: a cache that is not fp8 stores keys and values in the "
                          f"model dtype ({str(dtype).removeprefix('torch.')}); use kv_dtype='auto', "
                          f"'fp8_e4m3' or 'fp8_e5m2', or dtype={str(kv_dtype).removeprefix('torch.')!r} for the model")
    if given is not None:
        if not isinstance(given, CacheConfig):
            raise ConfigError(f"cache_config must be a CacheConfig, got {type(given).__name__}")
        got = (given.num_layers, given.num_kv_heads, given.head_dim)
        if got != shape:
            raise ConfigError(f"cache_config has (layers, kv heads, head_dim) = {got}, the model needs {shape}")
        if kv_dtype is not None and given.is_fp8 and given.dtype != kv_dtype:
            raise ConfigError(f"the KV dtype is given twice: cache_config dtype {given.dtype} and kv_dtype="
                              f"{econf.kv_dtype!r}")
        store = kv_dtype if kv_dtype is not None else (given.dtype if given.is_fp8 else dtype)
        if given.dtype != store or resolve_device(given.device) != device:
            log.info("cache_config dtype/device set to %s on %s (model dtype %s)", store, device, dtype)
        if is_fp8(store):
            granularity = "head" if per_head_scales else given.kv_scale_granularity
            return given.replace(dtype=store, device=str(device), model_dtype=dtype, kv_scale_granularity=granularity)
        return given.replace(dtype=store, device=str(device), model_dtype=None, kv_scale_granularity="tensor")
    store = kv_dtype if kv_dtype is not None else dtype
    options = dict(block_size=econf.block_size, dtype=store, device=str(device),
                   enable_prefix_caching=econf.enable_prefix_caching, enable_compaction=econf.enable_compaction,
                   host_memory=econf.host_memory)
    if econf.sliding_window_blocks == "free" and not remote and not parse_bytes(econf.host_memory):
        options["layer_windows"] = tuple(m.sliding_windows)
    if is_fp8(store):
        options.update(model_dtype=dtype, kv_scale_granularity="head" if per_head_scales else "tensor")
    if num_blocks is not None:
        cfg = CacheConfig(num_blocks=num_blocks, num_layers=shape[0], num_kv_heads=shape[1], head_dim=shape[2],
                          **options)
    else:
        if kv_memory is not None:
            budget = parse_bytes(kv_memory)
        elif device.type == "cuda":
            torch.cuda.empty_cache()
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * econf.kv_memory_fraction) - GPU_HEADROOM_BYTES
        else:
            budget = CPU_DEFAULT_KV_BYTES
        cfg = CacheConfig.for_memory(budget, *shape, **options)
    # Without compaction a GPU pool is one allocation (the kernels skip the chunk table and
    # graph addresses never move); on the CPU the pool stays chunked so that it can start
    # small and grow as blocks are needed (KVCache zeroes only what it backs).
    if econf.enable_compaction or device.type == "cpu":
        return cfg
    return cfg.replace(chunk_blocks=cfg.num_blocks)


def check_prompt(engine: Engine, rid: str, ids: list[int]) -> None:
    """Refuse a prompt that is empty, leaves the vocabulary, or can never fit."""
    vocab = engine.model_config.vocab_size
    if not ids:
        raise ConfigError(f"request {rid!r}: empty prompt")
    if min(ids) < 0 or max(ids) >= vocab:
        bad = min(ids) if min(ids) < 0 else max(ids)
        raise ConfigError(f"request {rid!r}: token id {bad} is outside the vocabulary [0, {vocab})")
    if len(ids) < engine.max_model_len:
        return
    bs, nb = engine.cache.config.block_size, engine.cache.config.num_blocks
    model_limit = max_len(engine.config, engine.model_config)
    cache_bound = nb * bs <= model_limit
    limit = (f"the whole cache is {nb} blocks of {bs} tokens" if cache_bound
             else f"the model allows {model_limit} positions")
    msg = (f"request {rid!r}: a prompt of {len(ids)} tokens can never run: a sequence holds at most "
           f"{engine.max_model_len} tokens, prompt and output ({limit})")
    if cache_bound:
        raise OutOfBlocksError(msg, requested=-(-(len(ids) + 1) // bs), available=nb)
    raise ModelError(msg)


#: bytes read from each end of every weight file for a checkpoint's identity
IDENTITY_SAMPLE_BYTES = 1 << 20


def checkpoint_identity(folder: str) -> str:
    """A name for a checkpoint's weights that two copies of it share and two different
    checkpoints (a fine-tune of the same shape) do not: a digest of ``config.json`` and,
    for every weight file, its name, size and first and last MiB. What a remote tier's
    layout fingerprint uses, so instances never share KV across models."""
    h = hashlib.blake2b(digest_size=16, person=b"kvforge-model")
    names = sorted(n for n in os.listdir(folder) if n == "config.json" or n.endswith(".safetensors"))
    for name in names:
        path = os.path.join(folder, name)
        size = os.path.getsize(path)
        h.update(f"{name}|{size}|".encode())
        with open(path, "rb") as f:
            h.update(f.read(IDENTITY_SAMPLE_BYTES))
            if size > 2 * IDENTITY_SAMPLE_BYTES:
                f.seek(size - IDENTITY_SAMPLE_BYTES)
                h.update(f.read())
    return "ckpt:" + h.hexdigest()


def config_identity(hf_config: Mapping[str, Any], seed: int) -> str:
    """A name for random weights made from ``hf_config`` with ``seed`` (benchmarks, demos)."""
    text = json.dumps(dict(hf_config), sort_keys=True, default=str) + f"|seed={seed}"
    return "random:" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
