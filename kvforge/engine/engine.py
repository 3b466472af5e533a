"""``Engine``: continuous-batching generation on a :class:`~kvforge.storage.cache.KVCache`.

The engine owns one model, one cache, a :class:`~kvforge.engine.scheduler.Scheduler`
and a :class:`~kvforge.engine.model_runner.ModelRunner`. Each :meth:`Engine.step`
schedules (reserving slots in the cache), runs one batched forward, samples
on the device, reads the tokens back (the step's single sync), and then
updates the sequences: stop checks, forks for ``n > 1``, freeing finished
sequences, and, with the cache's ``auto_compact``, compaction. Nothing keeps
a block id across steps, so the cache may be compacted between any two steps.

Requests enter through :meth:`Engine.add_request`, :meth:`Engine.generate`
(blocking, results in prompt order) or :meth:`Engine.stream` (snapshots as
tokens arrive); :meth:`Engine.abort` frees everything a request holds.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence as Seq

import torch

from kvforge.config import CacheConfig, parse_bytes
from kvforge.engine.config import EngineConfig
from kvforge.engine.hf_model import TransformersModel, TransformersModelConfig  # transformers itself is lazy
from kvforge.engine.kv_scales import LayerKVScales, apply_kv_scales, needs_per_head, read_kv_scales
from kvforge.engine.loader import SafetensorsWeights, Tokenizer, load_checkpoint, load_tokenizer, read_model_config
from kvforge.engine.model_config import ModelConfig
from kvforge.engine.model_runner import ModelRunner
from kvforge.engine.models.llama import LlamaModel
from kvforge.engine.outputs import request_output
from kvforge.engine.parallel import TensorParallel, check_tp_options, refuse_tp, shard_scales, tp_rank0
from kvforge.engine.fetch_policy import RemoteFetchPolicy
from kvforge.engine.preemption import PreemptionPolicy, measure_tier_bandwidth
from kvforge.engine.prompts import Prompt, check_params, prompt_list, token_ids
from kvforge.engine.request import Request, RequestOutput, Sequence, SequenceStatus
from kvforge.engine.sampling import SamplingParams
from kvforge.engine.scheduler import Scheduler
from kvforge.engine.setup import (
    cache_config_for, check_prompt, checkpoint_dtype, checkpoint_identity, config_identity, engine_config, kv_budget,
    max_len, resolve_placement, uses_native,
)
from kvforge.engine.stats import EngineStats
from kvforge.engine.step_loop import StepLoop
from kvforge.errors import ConfigError, SequenceError
from kvforge.storage import KVCache
from kvforge.storage.remote import RemoteTier

__all__ = ["Engine", "Prompt"]

log = logging.getLogger(__name__)


_SEED_MASK = (1 << 62) - 1


class Engine(StepLoop):
    """A model served with continuous batching over a paged KV cache.

    ``Engine(model_path, cache_config=None, *, kv_memory=None, num_blocks=None,
    device="auto", dtype=None, **options)``: ``model_path`` is a local Hugging
    Face folder. The second argument is a :class:`~kvforge.config.CacheConfig`
    (its dtype and device are set to the model's) or a KV memory budget
    (bytes or ``"4GiB"``, the same as ``kv_memory=``). ``remote`` (a
    :class:`~kvforge.storage.remote.RemoteTier` such as ``kvforge.RedisTier``)
    shares full prompt blocks with other engine instances; the checkpoint's
    identity (:func:`~kvforge.engine.setup.checkpoint_identity`) keeps other
    models' blocks apart. Without a CacheConfig
    the cache is ``num_blocks`` blocks, else as many as the budget holds,
    else a share of the free GPU memory (``kv_memory_fraction``) or 512 MiB
    on the CPU. ``dtype`` defaults
    to the checkpoint's on GPUs and float32 on the CPU. ``options`` are
    :class:`~kvforge.engine.config.EngineConfig` fields.

    ``model_impl`` picks the code that runs the model: ``"native"``, kvforge's
    own Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, with fused ops and
    decode CUDA graphs); ``"transformers"``, the checkpoint's own transformers
    model under the engine's scheduler and cache
    (:class:`~kvforge.engine.hf_model.TransformersModel`: one forward per step
    over the flattened batch, kvforge's paged kernels in every attention
    layer); ``"auto"`` (default), native for the architectures the native
    decoder implements, transformers for every other one. :attr:`model_impl`
    says which one runs.
    """

    def __init__(self, model_path: str | os.PathLike[str], cache_config: CacheConfig | int | str | None = None, *,
                 kv_memory: int | str | None = None, num_blocks: int | None = None, device: str = "auto",
                 dtype: Any = None, config: EngineConfig | None = None, remote: RemoteTier | None = None,
                 **options: Any) -> None:
        cache_config, kv_memory = kv_budget(cache_config, kv_memory, num_blocks)
        econf = engine_config(config, options)
        folder = os.fspath(model_path)
        raw, gen = read_model_config(folder)
        model: LlamaModel | TransformersModel
        tp_spec = None
        if uses_native(econf.model_impl, raw, gen, f"checkpoint {folder}"):
            ckpt = load_checkpoint(folder)
            dev, dt = resolve_placement(device, dtype, ckpt.config.dtype)
            tp = econf.tensor_parallel_size
            model = LlamaModel.from_state_dict(ckpt.config, ckpt.weights, dtype=dt,
                                               device=dev if tp == 1 else torch.device("cpu"),
                                               max_positions=max_len(econf, ckpt.config))
            if tp > 1:
                tp_spec = dict(folder=folder, dtype=dt, max_positions=max_len(econf, ckpt.config))
                model = tp_rank0(model, tp, dev)
            tokenizer = ckpt.tokenizer
            weights: SafetensorsWeights = ckpt.weights  # type: ignore[assignment]
        else:
            dev, dt = resolve_placement(device, dtype, checkpoint_dtype(raw))
            refuse_tp(econf)
            model = TransformersModel.from_pretrained(folder, dtype=dt, device=dev, backend=econf.backend)
            weights = SafetensorsWeights(folder)  # headers only: the KV scales are read from it below
            tokenizer = load_tokenizer(folder)
        c = model.config
        # the checkpoint's scales name every KV head (a tensor-parallel rank's model holds 1/N of them)
        scales = read_kv_scales(weights, weights.specs, c.num_layers, c.num_kv_heads * econf.tensor_parallel_size,
                                f"checkpoint {folder}")
        model.identity = checkpoint_identity(folder) if remote is not None else ""
        self._setup(model, tokenizer, econf, cache_config, kv_memory, num_blocks, remote, scales, tp_spec)

    @classmethod
    def from_config(cls, hf_config: Mapping[str, Any], cache_config: CacheConfig | int | str | None = None, *,
                    kv_memory: int | str | None = None, num_blocks: int | None = None, device: str = "auto",
                    dtype: Any = None, config: EngineConfig | None = None, remote: RemoteTier | None = None,
                    **options: Any) -> Engine:
        """An engine over random weights for a ``config.json`` dict (benchmarks, demos).

        Weights are normal with the config's ``initializer_range`` (seeded by
        ``seed``), made directly on the device; there is no tokenizer. With
        ``model_impl="transformers"`` (or ``"auto"`` for an architecture the native
        decoder does not run) the transformers model is built, with transformers'
        own seeded initialisation."""
        cache_config, kv_memory = kv_budget(cache_config, kv_memory, num_blocks)
        econf = engine_config(config, options)
        model: LlamaModel | TransformersModel
        if uses_native(econf.model_impl, hf_config):
            mconf = ModelConfig.from_hf(hf_config)
            dev, dt = resolve_placement(device, dtype, mconf.dtype)
            tp = econf.tensor_parallel_size
            model = LlamaModel.random(mconf, dtype=dt, device=dev if tp == 1 else torch.device("cpu"),
                                      seed=econf.seed, max_positions=max_len(econf, mconf))
            if tp > 1:  # every rank makes the same weights on the CPU (one seed) and keeps its share
                tp_spec = dict(model_config=mconf, seed=econf.seed, dtype=dt, max_positions=max_len(econf, mconf))
                model = tp_rank0(model, tp, dev)
        else:
            refuse_tp(econf)
            dev, dt = resolve_placement(device, dtype, checkpoint_dtype(hf_config))
            model = TransformersModel.random(hf_config, dtype=dt, device=dev, seed=econf.seed, backend=econf.backend)
        model.identity = config_identity(hf_config, econf.seed)
        engine = cls.__new__(cls)
        engine._setup(model, None, econf, cache_config, kv_memory, num_blocks, remote,
                      tp_spec=tp_spec if econf.tensor_parallel_size > 1 else None)
        return engine

    @classmethod
    def from_model(cls, model: LlamaModel | TransformersModel, cache_config: CacheConfig | int | str | None = None, *,
                   tokenizer: Tokenizer | None = None, kv_memory: int | str | None = None,
                   num_blocks: int | None = None, config: EngineConfig | None = None,
                   remote: RemoteTier | None = None, kv_scales: Mapping[int, LayerKVScales] | None = None,
                   **options: Any) -> Engine:
        """An engine over an already built :class:`~kvforge.engine.models.llama.LlamaModel`
        or :class:`~kvforge.engine.hf_model.TransformersModel` (shared weights: e.g.
        several cache sizes for one model in a benchmark). ``kv_scales``: an fp8 cache's
        per-layer scales (:func:`~kvforge.engine.kv_scales.read_kv_scales`'s result; default 1.0)."""
        if not isinstance(model, (LlamaModel, TransformersModel)):
            raise ConfigError(f"model must be a LlamaModel or a TransformersModel, got {type(model).__name__}")
        cache_config, kv_memory = kv_budget(cache_config, kv_memory, num_blocks)
        econf = engine_config(config, options)
        if econf.tensor_parallel_size > 1:
            raise ConfigError("Engine.from_model() with tensor_parallel_size > 1: the other ranks cannot rebuild an "
                              "already built model; use Engine(model_dir, ...) or Engine.from_config(...)")
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, econf, cache_config, kv_memory, num_blocks, remote, kv_scales)
        return engine

    def _setup(self, model: LlamaModel | TransformersModel, tokenizer: Tokenizer | None, econf: EngineConfig,
               cache_config: CacheConfig | None, kv_memory: int | str | None, num_blocks: int | None,
               remote: RemoteTier | None = None, kv_scales: Mapping[int, LayerKVScales] | None = None,
               tp_spec: dict[str, Any] | None = None) -> None:
        native = isinstance(model, LlamaModel)
        tp = econf.tensor_parallel_size
        if tp > 1:
            check_tp_options(econf, remote, cache_config)
            if kv_memory is not None:  # the budget of all ranks: each holds 1/N of every block
                kv_memory = parse_bytes(kv_memory) // tp
            econf = replace(econf, sliding_window_blocks="keep", use_cuda_graphs=False,
                            host_memory=parse_bytes(econf.host_memory) // tp)  # the host tier's budget too
        self.model = model
        #: which code runs the model: ``"native"`` (kvforge's decoder) or ``"transformers"``
        self.model_impl = "native" if native else "transformers"
        self.model_config: ModelConfig | TransformersModelConfig = model.config
        #: held for each step; pass it to :func:`kvforge.tools.metrics.serve` (``lock=``)
        self.step_lock = threading.Lock()
        model.set_fused(econf.fused_ops)
        self.tokenizer = tokenizer
        self.config = econf
        self.device = model.device
        self.dtype = model.dtype
        kv_scales = dict(kv_scales or {})
        ccfg = cache_config_for(model, econf, cache_config, kv_memory, num_blocks, needs_per_head(kv_scales),
                                remote=remote is not None)
        self.cache = KVCache(ccfg, backend=econf.backend, remote=remote,
                             model=getattr(model, "identity", "") if remote is not None else "",
                             tensor_parallel=(0, tp))
        # before any write (warm-up, graph capture, requests): scales are fixed once keys are stored
        apply_kv_scales(self.cache, shard_scales(kv_scales, 0, tp) if tp > 1 else kv_scales)
        #: where an fp8 cache's scales came from: ``"checkpoint"`` or ``"default"`` (1.0); None: not fp8
        self.kv_scales_source = None if not ccfg.is_fp8 else ("checkpoint" if kv_scales else "default")
        self.max_model_len = min(max_len(econf, model.config), ccfg.max_context_length(econf.max_num_batched_tokens),
                                 model.rope.max_positions if native else model.max_positions)
        bandwidth = measure_tier_bandwidth(self.cache) if self.cache.has_host_tier else 0.0
        self.preemption = PreemptionPolicy(econf.preemption_mode, ccfg.bytes_per_block, bandwidth)
        self.remote_fetch = RemoteFetchPolicy(econf.remote_fetch, remote, self.preemption) if remote else None
        self.cache.remote_fetch_policy = self.remote_fetch
        self.cache.remote_prefetching = remote is not None  # the scheduler prefetches; steps never wait for it
        self.scheduler = Scheduler(self.cache, max_num_seqs=econf.max_num_seqs,
                                   max_num_batched_tokens=econf.max_num_batched_tokens,
                                   watermark_blocks=int(econf.watermark * ccfg.num_blocks), policy=self.preemption)
        # transformers' layers are not captured: their decode steps run eagerly
        # nor is a grouped cache's (its step has no fixed layout yet)
        graphs = econf.graph_sizes() if native and econf.use_cuda_graphs and self.device.type == "cuda" \
            and self.cache.groups is None else ()
        #: rank 0's side of a tensor-parallel engine (None on one device): :mod:`kvforge.engine.parallel`
        self.tensor_parallel: TensorParallel | None = None
        if tp > 1:
            assert tp_spec is not None and isinstance(model, LlamaModel)
            spec = dict(tp_spec, device=self.device.type if self.device.type == "cuda" else str(self.device),
                        cache_config=ccfg, backend=econf.backend, threads=max(1, torch.get_num_threads() // tp),
                        kv_scales=kv_scales, remote=remote.options() if remote is not None else None,  # type: ignore[attr-defined]
                        device_index=self.device.index or 0 if self.device.type == "cuda" else 0,
                        identity=getattr(model, "identity", "") if remote is not None else "")
            self.tensor_parallel = TensorParallel(tp, spec, self.device)
            self.cache.storage.on_copy = self.tensor_parallel.on_copy
            self.cache.storage.on_chunks = self.tensor_parallel.on_chunks
            if self.cache.host_storage is not None:
                self.cache.host_storage.on_transfer = self.tensor_parallel.on_transfer
            if remote is not None:  # every rank publishes and fetches its share of the same blocks
                self.cache.on_publish = self.tensor_parallel.on_publish
                self.cache.manager.copy_from_remote = self.tensor_parallel.remote_copy(self.cache)
            model.tp = self.tensor_parallel
        self.runner = ModelRunner(model, self.cache, max_model_len=self.max_model_len, graph_batch_sizes=graphs,
                                  tensor_parallel=self.tensor_parallel)
        self.runner.capture()
        self._rng = random.Random(econf.seed)
        self._requests: dict[str, Request] = {}
        self._next_seq = 0
        self._next_request = 0
        self._counters = dict(steps=0, decode_steps=0, graph_steps=0, requests=0, finished=0, prompt_tokens=0,
                              generated=0, draft_tokens=0, accepted_tokens=0, overlapped_steps=0)
        self._eos = frozenset(model.config.eos_token_ids)
        self._num_unforked = 0  # requests with n > 1 whose completions are not forked yet
        self._num_random = 0  # unfinished sequences that sample (temperature > 0)
        self._forked: list[Sequence] = []  # this step's forks, dropped if the step fails
        log.info("engine ready: %s (%s), %s on %s, %s, max_model_len=%d", model.config.architecture,
                 self.model_impl, str(self.dtype).removeprefix("torch."), self.device, self.cache, self.max_model_len)

    def close(self) -> None:
        """Stop the engine's worker ranks (tensor parallelism); the engine takes no step after it."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.stop()

    # ------------------------------------------------------------ requests
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; return its id. Raises before queueing anything when
        the prompt or params are invalid or the prompt can never fit (see
        :meth:`_check_prompt`)."""
        params = check_params(params, "params")
        if request_id is not None:
            if not isinstance(request_id, str):
                raise ConfigError(f"request_id must be a string, got {type(request_id).__name__}")
            if request_id in self._requests:
                raise SequenceError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        check_prompt(self, request_id if request_id is not None else f"req-{self._next_request}", ids)
        return self._queue(text, ids, params, request_id)

    def _queue(self, text: str | None, ids: list[int], params: SamplingParams, request_id: str | None) -> str:
        """Queue a checked request (nothing here can fail)."""
        rid = request_id
        while rid is None or rid in self._requests:  # an automatic id never takes a caller's
            rid = f"req-{self._next_request}"
            self._next_request += 1
        self._counters["requests"] += 1
        req = Request(rid, text, ids, params, time.perf_counter(), self._eos, self.max_model_len)
        base = params.seed if params.seed is not None else self._rng.getrandbits(62)
        req.seqs.append(self._new_sequence(req, 0, base))
        req.reported = [0] * params.n
        self._requests[rid] = req
        self.scheduler.add(req.seqs[0])
        if params.n > 1:
            self._num_unforked += 1
        if not params.is_greedy:
            self._num_random += params.n
        return rid

    def _new_sequence(self, req: Request, index: int, base_seed: int) -> Sequence:
        seed = base_seed if index == 0 else (base_seed * 0x9E3779B1 + index * 0x85EBCA77) & _SEED_MASK
        seq = Sequence(self._next_seq, req, index, list(req.prompt_token_ids), seed)
        self._next_seq += 1
        return seq

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this model has no tokenizer: pass prompts as token id lists")
            return prompt, self.tokenizer.encode(prompt)
        return None, token_ids(prompt)

    def abort(self, request_id: str) -> None:
        """Stop a request and free every block it holds (finish reason ``'abort'``)."""
        req = self._requests.get(request_id)
        if req is None:
            raise SequenceError(f"unknown request id {request_id!r}")
        live = [s for s in req.seqs if not s.is_finished]
        computing = self._abort_in_flight(live)  # asynchronous scheduling: a step in flight still computes these
        if computing:
            self.scheduler.finish(computing, publish=False)
        for s in live:
            s.status = SequenceStatus.FINISHED
            s.finish_reason = "abort"
        self.scheduler.finish(live)
        self._requests.pop(request_id, None)
        if req.params.n > 1 and len(req.seqs) < req.params.n:
            self._num_unforked -= 1
        if not req.params.is_greedy:
            self._num_random -= len(live) + req.params.n - len(req.seqs)
        while len(req.seqs) < req.params.n:  # never forked: the missing completions are aborted too
            s = self._new_sequence(req, len(req.seqs), 0)
            s.status, s.finish_reason = SequenceStatus.FINISHED, "abort"
            req.seqs.append(s)
        self._finish_request(req)

    def has_unfinished_requests(self) -> bool:
        """Whether any request still waits or runs (or a step's tokens are still in flight)."""
        return self._busy

    # ---------------------------------------------------------- high level
    def generate(self, prompts: Prompt | Iterable[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 on_step: Callable[[Engine], None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; one :class:`RequestOutput` per prompt, in order.

        ``prompts``: a text, a token id list, or a list of either.
        ``params``: one for all, or one per prompt. ``on_step(engine)`` is
        called after every step (monitoring, benchmarks)."""
        rids = self._add_all(prompts, params)
        reqs = [self._requests[r] for r in rids]
        pending = set(rids)
        try:
            while pending:
                for req in self._step():
                    pending.discard(req.request_id)
                if on_step is not None:
                    on_step(self)
                if pending and not self._busy:  # aborted from elsewhere
                    break
        finally:
            self._abort_unfinished(reqs)  # a step raised (or an interrupt): free what this call queued
        return [request_output(self.tokenizer, req, detokenize=True) for req in reqs]

    def _abort_unfinished(self, reqs: Iterable[Request]) -> None:
        """Abort those of ``reqs`` that still run or wait, and forget all of them."""
        for req in reqs:
            if req.request_id in self._requests and not req.is_finished:
                self.abort(req.request_id)
            self._requests.pop(req.request_id, None)

    def stream(self, prompts: Prompt | Iterable[Prompt],
               params: SamplingParams | Seq[SamplingParams] | None = None) -> Iterator[RequestOutput]:
        """Yield a snapshot of a request each time it gets tokens (``new_token_ids``
        in each completion), the last one with ``finished=True``.

        A request aborted meanwhile (:meth:`abort`) gets a last snapshot with
        finish reason ``'abort'``. Closing the iterator early (``close()``, a
        ``break``, or dropping it) aborts the requests it still has, freeing
        their blocks."""
        live = {r: self._requests[r] for r in self._add_all(prompts, params)}
        try:
            while live:
                touched = self._step(want_touched=True) if self._busy else []
                for req in touched:
                    if live.pop(req.request_id, None) is not None:
                        if not req.is_finished:
                            live[req.request_id] = req
                        else:
                            self._requests.pop(req.request_id, None)
                        yield request_output(self.tokenizer, req, detokenize=True)
                for rid, req in list(live.items()):
                    if req.is_finished:  # aborted between steps
                        del live[rid]
                        self._requests.pop(rid, None)
                        yield request_output(self.tokenizer, req, detokenize=True)
                if live and not self._busy:  # pragma: no cover - every live request is queued
                    break
        finally:
            self._abort_unfinished(live.values())

    def _add_all(self, prompts: Prompt | Iterable[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None) -> list[str]:
        """Check every prompt and params, then queue them all (or nothing)."""
        plist = prompt_list(prompts)
        if params is None or isinstance(params, SamplingParams):
            plist_params = [params] * len(plist)
        elif isinstance(params, (str, bytes, Mapping)) or not isinstance(params, Iterable):
            raise ConfigError(f"params must be SamplingParams or a list of them, got {type(params).__name__}")
        else:
            plist_params = list(params)
            if len(plist_params) != len(plist):
                raise ConfigError(f"got {len(plist_params)} SamplingParams for {len(plist)} prompts")
        checked = []
        for i, (p, sp) in enumerate(zip(plist, plist_params)):  # validate everything before queueing anything
            sp = check_params(sp, f"params[{i}]")
            text, ids = self._tokenize(p)
            check_prompt(self, f"#{i}", ids)
            checked.append((text, ids, sp))
        return [self._queue(text, ids, sp, None) for text, ids, sp in checked]

    # -------------------------------------------------------------- output
    def get_output(self, request_id: str) -> RequestOutput:
        """A snapshot of a request added with :meth:`add_request`."""
        req = self._requests.get(request_id)
        if req is None:
            raise SequenceError(f"unknown request id {request_id!r}")
        return request_output(self.tokenizer, req, detokenize=True)

    # --------------------------------------------------------------- stats
    def stats(self) -> EngineStats:
        """Engine counters and the cache's metrics now."""
        cache, c = self.cache, self._counters
        alloc = cache.stats
        pstats = cache.prefix_stats()
        cap = cache.config.num_blocks
        return EngineStats(
            num_steps=c["steps"], num_decode_steps=c["decode_steps"], num_graph_steps=c["graph_steps"],
            num_requests=c["requests"], num_finished_requests=c["finished"],
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            max_concurrent_seqs=self.scheduler.max_concurrent, num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens_computed=c["prompt_tokens"], num_generated_tokens=c["generated"],
            num_blocks=cap, block_size=cache.config.block_size, used_blocks=alloc.current_allocations,
            cache_usage=alloc.current_allocations / cap, peak_used_blocks=alloc.peak_allocations,
            kv_storage_bytes=cache.storage_bytes, peak_kv_bytes=alloc.peak_allocations * cache.config.bytes_per_block,
            fragmentation_ratio=cache.fragmentation_ratio(), internal_fragmentation=cache.internal_fragmentation(),
            prefix_hit_rate=pstats.hit_rate, prefix_hit_tokens=pstats.hit_tokens,
            num_compactions=alloc.compaction_count, num_blocks_moved=alloc.total_blocks_moved,
            bytes_returned=alloc.total_bytes_returned, memory_efficiency=cache.memory_efficiency(),
            num_evictions=pstats.evictions, allocation=alloc, prefix=pstats,
            num_swapped=len(self.scheduler.swapped), num_swaps_out=self.scheduler.num_swaps_out,
            num_swaps_in=self.scheduler.num_swaps_in, num_recompute_preemptions=self.scheduler.num_recomputes,
            prefix_host_hit_tokens=pstats.host_hit_tokens, prefix_remote_hit_tokens=pstats.remote_hit_tokens,
            num_remote_fetches=self.remote_fetch.num_fetched if self.remote_fetch else 0,
            num_remote_fetches_declined=self.remote_fetch.num_declined if self.remote_fetch else 0,
            num_draft_tokens=c["draft_tokens"], num_accepted_tokens=c["accepted_tokens"],
            draft_acceptance_rate=c["accepted_tokens"] / c["draft_tokens"] if c["draft_tokens"] else 0.0,
            host=cache.host_stats() if cache.has_host_tier else None, num_overlapped_steps=c["overlapped_steps"],
        )

    def check_invariants(self) -> None:
        """Assert the cache's bookkeeping and that every running sequence is in it."""
        self.cache.check_invariants()
        self.scheduler.check_invariants()
        for s in self.scheduler.running:
            assert s.seq_id in self.cache, f"running sequence {s.seq_id} is not in the cache"
        for s in self.scheduler.waiting:
            assert s.seq_id not in self.cache
        assert set(self.cache.seq_ids) == {s.seq_id for s in self.scheduler.running}
        assert set(self.cache.swapped_seq_ids) == {s.seq_id for s in self.scheduler.swapped}

    def __repr__(self) -> str:
        return f"Engine({self.model_config.architecture}, {self.model_impl}, device={self.device}, {self.cache})"

