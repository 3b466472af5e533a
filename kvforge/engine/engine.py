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
import numbers
import os
import random
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence as Seq

import numpy as np
import torch

from kvforge.storage import KVCache, resolve_device
from kvforge.config import CacheConfig, parse_bytes, resolve_dtype
from kvforge.engine.config import EngineConfig
from kvforge.engine.loader import Tokenizer, load_checkpoint
from kvforge.engine.model_config import ModelConfig
from kvforge.engine.model_runner import ModelRunner, StepInputs
from kvforge.engine.models.llama import LlamaModel
from kvforge.engine.prompts import Prompt, check_params, prompt_list, token_ids
from kvforge.engine.request import (
    CompletionOutput, Request, RequestMetrics, RequestOutput, Sequence, SequenceStatus,
)
from kvforge.engine.sampling import SamplingBatch, SamplingParams, sample
from kvforge.engine.scheduler import Scheduler, SchedulerOutput
from kvforge.engine.stats import EngineStats
from kvforge.errors import ConfigError, KVForgeError, ModelError, OutOfBlocksError, SequenceError

__all__ = ["Engine", "Prompt"]

log = logging.getLogger(__name__)


_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SEED_MASK = (1 << 62) - 1


class Engine:
    """A Llama-family model served with continuous batching over a paged KV cache.

    ``Engine(model_path, cache_config=None, *, kv_memory=None, num_blocks=None,
    device="auto", dtype=None, **options)``: ``model_path`` is a local Hugging
    Face folder. The second argument is a :class:`~kvforge.config.CacheConfig`
    (its dtype and device are set to the model's) or a KV memory budget
    (bytes or ``"4GiB"``, the same as ``kv_memory=``). Without a CacheConfig
    the cache is ``num_blocks`` blocks, else as many as the budget holds,
    else a share of the free GPU memory (``kv_memory_fraction``) or 512 MiB
    on the CPU. ``dtype`` defaults
    to the checkpoint's on GPUs and float32 on the CPU. ``options`` are
    :class:`~kvforge.engine.config.EngineConfig` fields.
    """

    def __init__(self, model_path: str | os.PathLike[str], cache_config: CacheConfig | int | str | None = None, *,
                 kv_memory: int | str | None = None, num_blocks: int | None = None, device: str = "auto",
                 dtype: Any = None, config: EngineConfig | None = None, **options: Any) -> None:
        cache_config, kv_memory = _kv_budget(cache_config, kv_memory, num_blocks)
        econf = _engine_config(config, options)
        ckpt = load_checkpoint(model_path)
        dev, dt = _resolve(device, dtype, ckpt.config)
        max_len = _max_len(econf, ckpt.config)
        model = LlamaModel.from_state_dict(ckpt.config, ckpt.weights, dtype=dt, device=dev, max_positions=max_len)
        self._setup(model, ckpt.tokenizer, econf, cache_config, kv_memory, num_blocks)

    @classmethod
    def from_config(cls, hf_config: Mapping[str, Any], cache_config: CacheConfig | int | str | None = None, *,
                    kv_memory: int | str | None = None, num_blocks: int | None = None, device: str = "auto",
                    dtype: Any = None, config: EngineConfig | None = None, **options: Any) -> Engine:
        """An engine over random weights for a ``config.json`` dict (benchmarks, demos).

        Weights are normal with the config's ``initializer_range`` (seeded by
        ``seed``), made directly on the device; there is no tokenizer."""
        cache_config, kv_memory = _kv_budget(cache_config, kv_memory, num_blocks)
        mconf = ModelConfig.from_hf(hf_config)
        econf = _engine_config(config, options)
        dev, dt = _resolve(device, dtype, mconf)
        model = LlamaModel.random(mconf, dtype=dt, device=dev, seed=econf.seed, max_positions=_max_len(econf, mconf))
        engine = cls.__new__(cls)
        engine._setup(model, None, econf, cache_config, kv_memory, num_blocks)
        return engine

    @classmethod
    def from_model(cls, model: LlamaModel, cache_config: CacheConfig | int | str | None = None, *,
                   tokenizer: Tokenizer | None = None, kv_memory: int | str | None = None,
                   num_blocks: int | None = None, config: EngineConfig | None = None, **options: Any) -> Engine:
        """An engine over an already built :class:`~kvforge.engine.models.llama.LlamaModel`
        (shared weights: e.g. several cache sizes for one model in a benchmark)."""
        if not isinstance(model, LlamaModel):
            raise ConfigError(f"model must be a LlamaModel, got {type(model).__name__}")
        cache_config, kv_memory = _kv_budget(cache_config, kv_memory, num_blocks)
        engine = cls.__new__(cls)
        engine._setup(model, tokenizer, _engine_config(config, options), cache_config, kv_memory, num_blocks)
        return engine

    def _setup(self, model: LlamaModel, tokenizer: Tokenizer | None, econf: EngineConfig,
               cache_config: CacheConfig | None, kv_memory: int | str | None, num_blocks: int | None) -> None:
        self.model = model
        #: held for each step; pass it to :func:`kvforge.tools.metrics.serve` (``lock=``)
        self.step_lock = threading.Lock()
        model.set_fused(econf.fused_ops)
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.config = econf
        self.device = model.device
        self.dtype = model.dtype
        ccfg = self._cache_config(cache_config, kv_memory, num_blocks)
        self.cache = KVCache(ccfg, backend=econf.backend)
        self.max_model_len = min(_max_len(econf, model.config), ccfg.num_blocks * ccfg.block_size,
                                 model.rope.max_positions)
        self.scheduler = Scheduler(self.cache, max_num_seqs=econf.max_num_seqs,
                                   max_num_batched_tokens=econf.max_num_batched_tokens,
                                   watermark_blocks=int(econf.watermark * ccfg.num_blocks))
        graphs = econf.graph_sizes() if econf.use_cuda_graphs and self.device.type == "cuda" else ()
        self.runner = ModelRunner(model, self.cache, max_model_len=self.max_model_len, graph_batch_sizes=graphs)
        self.runner.capture()
        self._rng = random.Random(econf.seed)
        self._requests: dict[str, Request] = {}
        self._next_seq = 0
        self._next_request = 0
        self._counters = dict(steps=0, decode_steps=0, graph_steps=0, requests=0, finished=0, prompt_tokens=0,
                              generated=0)
        self._eos = frozenset(model.config.eos_token_ids)
        self._num_unforked = 0  # requests with n > 1 whose completions are not forked yet
        self._num_random = 0  # unfinished sequences that sample (temperature > 0)
        self._forked: list[Sequence] = []  # this step's forks, dropped if the step fails
        log.info("engine ready: %s, %s on %s, %s, max_model_len=%d", model.config.architecture,
                 str(self.dtype).removeprefix("torch."), self.device, self.cache, self.max_model_len)

    def _cache_config(self, given: CacheConfig | None, kv_memory: int | str | None,
                      num_blocks: int | None) -> CacheConfig:
        m, e = self.model_config, self.config
        if given is not None:
            if not isinstance(given, CacheConfig):
                raise ConfigError(f"cache_config must be a CacheConfig, got {type(given).__name__}")
            shape = (given.num_layers, given.num_kv_heads, given.head_dim)
            if shape != (m.num_layers, m.num_kv_heads, m.head_dim):
                raise ConfigError(f"cache_config has (layers, kv heads, head_dim) = {shape}, the model needs "
                                  f"{(m.num_layers, m.num_kv_heads, m.head_dim)}")
            if given.dtype != self.dtype or resolve_device(given.device) != self.device:
                log.info("cache_config dtype/device set to the model's (%s on %s)", self.dtype, self.device)
            return given.replace(dtype=self.dtype, device=str(self.device))
        one = CacheConfig(block_size=e.block_size, num_blocks=1, num_layers=m.num_layers,
                          num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, dtype=self.dtype,
                          device=str(self.device), enable_prefix_caching=e.enable_prefix_caching,
                          enable_compaction=e.enable_compaction)
        if num_blocks is None:
            if kv_memory is not None:
                budget = parse_bytes(kv_memory)
            elif self.device.type == "cuda":
                torch.cuda.empty_cache()
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * e.kv_memory_fraction) - 2 * 2**30  # activations, graphs
            else:
                budget = 512 * 2**20
            num_blocks = budget // one.bytes_per_block
            if num_blocks < 1:
                raise ConfigError(f"a KV budget of {budget} bytes holds no block of {one.bytes_per_block} bytes")
        # without compaction the pool is one allocation (the kernels skip the chunk table)
        chunk = None if e.enable_compaction else num_blocks
        return one.replace(num_blocks=int(num_blocks), chunk_blocks=chunk)

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
        self._check_prompt(request_id if request_id is not None else f"req-{self._next_request}", ids)
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

    def _check_prompt(self, rid: str, ids: list[int]) -> None:
        vocab = self.model_config.vocab_size
        if not ids:
            raise ConfigError(f"request {rid!r}: empty prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            bad = min(ids) if min(ids) < 0 else max(ids)
            raise ConfigError(f"request {rid!r}: token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) < self.max_model_len:
            return
        bs, nb = self.cache.config.block_size, self.cache.config.num_blocks
        model_limit = _max_len(self.config, self.model_config)
        cache_bound = nb * bs <= model_limit
        limit = (f"the whole cache is {nb} blocks of {bs} tokens" if cache_bound
                 else f"the model allows {model_limit} positions")
        msg = (f"request {rid!r}: a prompt of {len(ids)} tokens can never run: a sequence holds at most "
               f"{self.max_model_len} tokens, prompt and output ({limit})")
        if cache_bound:
            raise OutOfBlocksError(msg, requested=-(-(len(ids) + 1) // bs), available=nb)
        raise ModelError(msg)

    def abort(self, request_id: str) -> None:
        """Stop a request and free every block it holds (finish reason ``'abort'``)."""
        req = self._requests.get(request_id)
        if req is None:
            raise SequenceError(f"unknown request id {request_id!r}")
        live = [s for s in req.seqs if not s.is_finished]
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
        """Whether any request still waits or runs."""
        return self.scheduler.has_work

    # ---------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one step; snapshots of the requests that got tokens or finished."""
        outputs = [self._output(r, detokenize=True) for r in self._step(want_touched=True)]
        for o in outputs:
            if o.finished:
                self._requests.pop(o.request_id, None)
        return outputs

    def _step(self, want_touched: bool = False) -> list[Request]:
        """One step; returns the requests that got tokens (``want_touched``) or else
        only those that finished. Holds :attr:`step_lock`, so that a metrics
        scrape from another thread sees the cache between steps."""
        with self.step_lock:
            return self._step_locked(want_touched)

    def _step_locked(self, want_touched: bool) -> list[Request]:
        self._forked = []
        try:
            out = self.scheduler.schedule()
            if not out.is_empty:
                inputs, targets, rows, forks = self._inputs(out)
                logits = self.runner.execute(inputs)
                if rows is not None:
                    logits = logits[torch.as_tensor(rows, device=logits.device)]
                tokens = sample(logits, self._sampling_batch(targets)).tolist()
        except BaseException:
            self._recover()
            raise
        if out.is_empty:
            if self.scheduler.waiting and not self.scheduler.running:
                head = self.scheduler.waiting[0]
                raise KVForgeError(f"sequence {head.seq_id} of {head.num_tokens} tokens cannot be admitted into an "
                                   f"idle cache of {self.cache.num_available_blocks} available blocks")
            return []
        now = time.perf_counter()
        c = self._counters
        c["steps"] += 1
        if inputs.is_decode:
            c["decode_steps"] += 1
            if self.runner.graphs is not None and self.runner.graphs.fits(len(out.decodes)):
                c["graph_steps"] += 1
        else:
            c["prompt_tokens"] += sum(ch.num_tokens for ch in out.chunks)
        c["generated"] += len(tokens)
        done = self._postprocess(targets, tokens, now, forks)
        self.cache.maybe_compact()
        if want_touched:
            return list({s.request.request_id: s.request for s in targets}.values())
        return done

    def _recover(self) -> None:
        """Undo a step that raised after reserving slots (a kernel error, an
        interrupt): slots were reserved, and full blocks registered in the
        prefix index, for tokens that were never computed. Every running
        sequence is preempted (it recomputes on a later step), the never
        computed cached blocks are evicted, and forks made for the step are
        dropped, so :meth:`check_invariants` holds and later steps are correct."""
        for req in {id(s.request): s.request for s in self._forked}.values():
            del req.seqs[1:]
            self._num_unforked += 1
        self._forked = []
        num = len(self.scheduler.preempt_all())
        for seq_id in self.cache.seq_ids:  # reserved but never adopted as running
            self.cache.free_sequence(seq_id)
        evicted = self.cache.reclaim_unused_blocks()  # blocks registered this step hold no keys/values
        log.warning("a step failed: %d running sequence(s) preempted to recompute, %d cached block(s) dropped",
                    num, evicted)

    def _inputs(self, out: SchedulerOutput
                ) -> tuple[StepInputs, list[Sequence], list[int] | None, list[Sequence]]:
        decodes, chunks = out.decodes, out.chunks
        nd = len(decodes)
        ctx_d = np.fromiter((s.num_computed_tokens for s in decodes), dtype=np.int32, count=nd)
        ids_d = np.fromiter((s.token_ids[-1] for s in decodes), dtype=np.int32, count=nd)
        targets = list(decodes)
        seq_ids = [s.seq_id for s in decodes]
        if not chunks:
            step = StepInputs(ids_d, ctx_d - 1, out.decode_slots, seq_ids, np.ones(nd, np.int32), ctx_d,
                              np.arange(nd), nd, True)
            return self._expand(step, targets)
        ids = [ids_d] + [np.asarray(c.seq.token_ids[c.start: c.start + c.num_tokens], dtype=np.int32) for c in chunks]
        pos = [ctx_d - 1] + [np.arange(c.start, c.start + c.num_tokens, dtype=np.int32) for c in chunks]
        q_lens = np.concatenate([np.ones(nd, np.int32), np.array([c.num_tokens for c in chunks], np.int32)])
        ctx = np.concatenate([ctx_d, np.array([c.start + c.num_tokens for c in chunks], np.int32)])
        ends = np.cumsum(q_lens) - 1
        rows = list(range(nd))
        for i, c in enumerate(chunks):
            seq_ids.append(c.seq.seq_id)
            if c.samples:
                rows.append(int(ends[nd + i]))
                targets.append(c.seq)
        step = StepInputs(np.concatenate(ids), np.concatenate(pos),
                          np.concatenate([out.decode_slots] + [c.slots for c in chunks]), seq_ids, q_lens, ctx,
                          np.asarray(rows, dtype=np.int64), nd, False)
        return self._expand(step, targets)

    def _expand(self, step: StepInputs, targets: list[Sequence]
                ) -> tuple[StepInputs, list[Sequence], list[int] | None, list[Sequence]]:
        """Add the ``n - 1`` siblings of a request's first sample (they share its
        logits row; they are forked from it once the step is done)."""
        rows: list[int] | None = None
        forks: list[Sequence] = []
        if not self._num_unforked:
            return step, targets, rows, forks
        for i, s in enumerate(list(targets)):
            req = s.request
            if req.params.n > 1 and len(req.seqs) == 1:
                if rows is None:
                    rows = list(range(len(targets)))
                self._num_unforked -= 1
                for j in range(1, req.params.n):
                    child = self._new_sequence(req, j, s.seed)
                    req.seqs.append(child)
                    self._forked.append(child)
                    targets.append(child)
                    forks.append(child)
                    rows.append(i)
        return step, targets, rows, forks

    def _sampling_batch(self, targets: list[Sequence]) -> SamplingBatch | None:
        if not self._num_random or all(s.request.params.temperature == 0.0 for s in targets):
            return None
        ps = [s.request.params for s in targets]
        return SamplingBatch([p.temperature for p in ps], [p.top_k for p in ps], [p.top_p for p in ps],
                             [s.seed for s in targets], [s.num_output_tokens for s in targets])

    def _postprocess(self, targets: list[Sequence], tokens: list[int], now: float,
                     forks: list[Sequence]) -> list[Request]:
        for s in forks:  # before the parent can finish and free its blocks
            parent = s.request.seqs[0]
            self.cache.fork(parent.seq_id, s.seq_id)
            s.num_computed_tokens = parent.num_computed_tokens
            s.num_known_tokens = parent.num_known_tokens
            s.num_cached_tokens = parent.num_cached_tokens
            self.scheduler.add_running(s)
        finished: list[Sequence] = []
        for s, tok in zip(targets, tokens):
            ids = s.token_ids
            ids.append(tok)
            s.token_times.append(now)
            req = s.request
            if tok in req.stop_ids:
                s.finish_reason = "stop"
            elif len(ids) >= req.max_total_tokens:
                s.finish_reason = "length"
            else:
                continue
            s.status = SequenceStatus.FINISHED
            finished.append(s)
        done: list[Request] = []
        if finished:
            self.scheduler.finish(finished)
            for s in finished:
                if s.request.params.temperature > 0.0:
                    self._num_random -= 1
                if s.request.finish_time is None and s.request.is_finished:
                    self._finish_request(s.request, now)
                    done.append(s.request)
        return done

    def _finish_request(self, req: Request, now: float | None = None) -> None:
        if req.finish_time is None:
            req.finish_time = now if now is not None else time.perf_counter()
            self._counters["finished"] += 1

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
                if pending and not self.scheduler.has_work:  # aborted from elsewhere
                    break
        finally:
            self._abort_unfinished(reqs)  # a step raised (or an interrupt): free what this call queued
        return [self._output(req, detokenize=True) for req in reqs]

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
                touched = self._step(want_touched=True) if self.scheduler.has_work else []
                for req in touched:
                    if live.pop(req.request_id, None) is not None:
                        if not req.is_finished:
                            live[req.request_id] = req
                        else:
                            self._requests.pop(req.request_id, None)
                        yield self._output(req, detokenize=True)
                for rid, req in list(live.items()):
                    if req.is_finished:  # aborted between steps
                        del live[rid]
                        self._requests.pop(rid, None)
                        yield self._output(req, detokenize=True)
                if live and not self.scheduler.has_work:  # pragma: no cover - every live request is queued
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
            self._check_prompt(f"#{i}", ids)
            checked.append((text, ids, sp))
        return [self._queue(text, ids, sp, None) for text, ids, sp in checked]

    # -------------------------------------------------------------- output
    def _output(self, req: Request, detokenize: bool) -> RequestOutput:
        comps = []
        for s in req.seqs:
            out = s.output_token_ids
            new = out[req.reported[s.index]:]
            req.reported[s.index] = len(out)
            text = self.tokenizer.decode(out) if detokenize and self.tokenizer is not None else None
            comps.append(CompletionOutput(s.index, out, new, text, s.finish_reason))
        s0 = req.seqs[0]
        first = s0.token_times[0] if s0.token_times else None
        gaps = np.diff(s0.token_times).tolist() if len(s0.token_times) > 1 else []
        metrics = RequestMetrics(req.arrival_time, first, req.finish_time,
                                 None if first is None else first - req.arrival_time,
                                 float(np.mean(gaps)) if gaps else None, gaps, s0.num_cached_tokens,
                                 sum(s.num_preemptions for s in req.seqs))
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), comps, req.is_finished, metrics)

    def get_output(self, request_id: str) -> RequestOutput:
        """A snapshot of a request added with :meth:`add_request`."""
        req = self._requests.get(request_id)
        if req is None:
            raise SequenceError(f"unknown request id {request_id!r}")
        return self._output(req, detokenize=True)

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
        )

    def check_invariants(self) -> None:
        """Assert the cache's bookkeeping and that every running sequence is in it."""
        self.cache.check_invariants()
        self.scheduler.check_invariants()
        for s in self.scheduler.running:
            assert s.seq_id in self.cache, f"running sequence {s.seq_id} is not in the cache"
            assert self.cache.seq_len(s.seq_id) == s.num_computed_tokens
        for s in self.scheduler.waiting:
            assert s.seq_id not in self.cache
        assert set(self.cache.seq_ids) == {s.seq_id for s in self.scheduler.running}

    def __repr__(self) -> str:
        return f"Engine({self.model_config.architecture}, device={self.device}, {self.cache})"


def _kv_budget(cache_config: Any, kv_memory: int | str | None,
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


def _engine_config(config: EngineConfig | None, options: dict[str, Any]) -> EngineConfig:
    if config is not None and not isinstance(config, EngineConfig):
        raise ConfigError(f"config must be an EngineConfig, got {type(config).__name__}")
    if config is None:
        return EngineConfig.from_options(**options)
    return replace(config, **options) if options else config


def _resolve(device: str, dtype: Any, mconf: ModelConfig) -> tuple[torch.device, torch.dtype]:
    dev = resolve_device(device)
    if dtype is None:
        dt = mconf.dtype if dev.type == "cuda" else torch.float32
    else:
        dt = resolve_dtype(dtype)
    if dt not in _MODEL_DTYPES:
        raise ConfigError(f"dtype {dt} is not supported by the engine (float32, float16, bfloat16)")
    return dev, dt


def _max_len(econf: EngineConfig, mconf: ModelConfig) -> int:
    return min(econf.max_model_len or mconf.max_position_embeddings, mconf.max_position_embeddings)
