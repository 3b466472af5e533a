"""Continuous batching: which sequences compute which tokens this step.

Every step has a token budget (``max_num_batched_tokens``) and a sequence
limit (``max_num_seqs``). The scheduler fills it in this order:

1. **Decodes**: every running sequence whose next token to compute is its
   last sampled one, oldest first, in one batched
   :meth:`~kvforge.storage.cache.KVCache.append_tokens_batch` call.
2. **Prefill chunks** of running sequences whose prompt is only partly
   computed (chunked prefill), oldest first.
3. **Admissions** from the waiting queue (first come, first served, with
   preempted sequences at its head) while the cache says the whole prompt
   fits (:meth:`~kvforge.storage.KVCache.num_blocks_needed`, which
   counts prefix-cache hits as free) with ``watermark_blocks`` to spare. A
   new sequence's first chunk starts after its cached prefix; only uncached
   tokens are computed.

The cache is the one record of how far each running sequence is: its
``seq_len`` (tokens with a slot, computed by the end of the step) and its
pending prompt tokens (known, not reserved yet). A sequence is *prefilling*
while it has pending tokens; otherwise it decodes: its last sampled token is
the one token it computes next.

Preemption: when a decode finds no free block, the most recently admitted
running sequence is preempted: its blocks are freed (its full blocks stay in
the prefix cache, so the recompute is mostly hits) and it goes back to the
head of the waiting queue, to be re-admitted with its prompt and generated
tokens as the new prompt. The oldest sequence therefore always progresses:
a sequence never outgrows the cache (``max_model_len`` is at most the
cache's capacity), so preempting every newer one makes room. Prefill chunks
that find no blocks preempt only newer sequences not already scheduled in
this step, else wait a step.

With a host tier, a decoding victim may be *swapped* instead
(:mod:`kvforge.engine.preemption` decides): its blocks move to the host and
it waits in ``swapped``, ahead of every waiting sequence; each step first
swaps back in the oldest swapped sequences that fit (with ``watermark_blocks``
to spare), and admits nothing new while any remain swapped. A swap that
fails (no room on the host, a failed copy) falls back to recompute; a
swap-in whose copy fails frees the sequence and recomputes it.

With a remote tier the step loop never waits for the network: a waiting
sequence's blocks beyond its local hits are first prefetched in the
background (:meth:`~kvforge.storage.KVCache.prefetch_remote`, unless the
engine's fetch policy says computing them is faster), and the sequence is
passed over, keeping its place in the queue, until the fetch is done; those
behind it are admitted meanwhile. Its admission then copies the fetched
blocks in.

Every token reserved in a step is computed in that step (the prefix index
registers full blocks when they are reserved), and block ids are never kept
across steps, so compaction between steps is safe.

Asynchronous scheduling (``schedule(in_flight=...)``): the engine schedules
step t+1 while step t runs, before t's sampled tokens are known. The decodes
whose input token is still in flight get slots without ids
(:meth:`~kvforge.storage.KVCache.reserve_tokens_batch`; the engine commits
the ids once it reads them), the others are committed at once. Such a step
preempts nothing and swaps nothing in: when its decodes do not fit, or a
sequence is swapped out, :meth:`schedule` returns None having changed
nothing, and the engine reads step t's tokens first and schedules as usual.
Prefill chunks that find no blocks wait a step instead of preempting.
"""
from __future__ import annotations

import concurrent.futures
import logging
from collections import deque
from typing import Collection, NamedTuple


from kvforge.storage import KVCache
from kvforge.engine.preemption import PreemptionPolicy
from kvforge.engine.request import Sequence, SequenceStatus
from kvforge.errors import KVForgeError, OutOfBlocksError

__all__ = ["Scheduler", "SchedulerOutput", "ScheduledChunk"]

log = logging.getLogger(__name__)

#: ``Sequence.remote_fetch`` once admission may proceed without waiting (nothing to fetch, or taken)
_NO_FETCH = object()


class ScheduledChunk(NamedTuple):
    """``num_tokens`` prompt tokens of ``seq`` from position ``start`` (slots reserved);
    ``samples``: the chunk ends the sequence's known tokens, so its last logits pick a token."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool


class SchedulerOutput(NamedTuple):
    """One step's work: ``decodes`` (one token each), then prefill ``chunks``;
    ``preempted`` lists sequences sent back to waiting."""

    decodes: list[Sequence]
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        """Tokens computed in the step."""
        return len(self.decodes) + sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        """Nothing to compute."""
        return not self.decodes and not self.chunks


class Scheduler:
    """Waiting queue and running list over one :class:`~kvforge.storage.cache.KVCache`.

    ``running`` is ordered by admission (``Sequence.admit_order``). Not
    thread-safe: the engine's step loop drives it.
    """

    def __init__(self, cache: KVCache, *, max_num_seqs: int, max_num_batched_tokens: int,
                 watermark_blocks: int = 0, policy: PreemptionPolicy | None = None) -> None:
        self.cache = cache
        self.policy = policy if policy is not None else PreemptionPolicy("recompute", cache.config.bytes_per_block, 0.0)
        self.swapped: deque[Sequence] = deque()  # swapped out to the host tier, oldest first
        self.num_swaps_out = self.num_swaps_in = self.num_recomputes = 0
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = watermark_blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: list[Sequence] = []  # running, with prompt tokens not yet computed (admission order)
        self.num_preemptions = 0
        self.max_concurrent = 0
        self._next_admit = 0

    # -------------------------------------------------------------- queues
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (it is admitted by a later :meth:`schedule`)."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Adopt a sequence already in the cache (a fork) as the newest running one."""
        seq.status = SequenceStatus.RUNNING
        seq.admit_order = self._next_admit
        self._next_admit += 1
        self.running.append(seq)
        self.max_concurrent = max(self.max_concurrent, len(self.running))

    def finish(self, seqs: list[Sequence], publish: bool = True) -> None:
        """Drop finished sequences from the queues and free their blocks (``publish``: their
        full prompt blocks go to the remote tier, if any)."""
        done = {id(s) for s in seqs}
        for s in seqs:
            if s.seq_id in self.cache:
                self.cache.free_sequence(s.seq_id, publish=publish)
        self.running = [s for s in self.running if id(s) not in done]
        if self.swapped:
            self.swapped = deque(s for s in self.swapped if id(s) not in done)
        if self.prefilling:
            self.prefilling = [s for s in self.prefilling if id(s) not in done]
        if any(s in self.waiting for s in seqs):
            self.waiting = deque(s for s in self.waiting if id(s) not in done)

    @property
    def has_work(self) -> bool:
        """Whether any sequence waits, runs or is swapped out."""
        return bool(self.waiting or self.running or self.swapped)

    # ---------------------------------------------------------- scheduling
    def schedule(self, in_flight: Collection[int] | None = None,
                 skip: Collection[int] = ()) -> SchedulerOutput | None:
        """Reserve this step's slots; see the module docstring for the policy.

        ``in_flight`` (asynchronous scheduling): ``id()`` of the running sequences whose last
        token the step before is still computing; their slots are reserved without ids. Such
        a step preempts nothing; None when it cannot run without (nothing changed). ``skip``:
        ``id()`` of running sequences not to decode this step (they finish with the token in
        flight)."""
        budget = self.max_num_batched_tokens
        preempted: list[Sequence] = []
        deferred = in_flight is not None
        if self.swapped:
            if deferred:
                return None
            self._swap_in()
        if self.prefilling or skip:
            filling = {id(s) for s in self.prefilling}
            decodes = [s for s in self.running if id(s) not in filling and id(s) not in skip]
        else:
            decodes = list(self.running)
        if len(decodes) > budget:
            decodes = decodes[:budget]
        if decodes and deferred:
            assert in_flight is not None
            try:
                self.cache.reserve_tokens_batch([s.seq_id for s in decodes], 1)
            except OutOfBlocksError:
                return None  # all or nothing: nothing reserved
            known = [s for s in decodes if id(s) not in in_flight]
            if known:
                self.cache.commit_token_ids([s.seq_id for s in known], [s.token_ids[-1] for s in known])
        elif decodes:
            try:
                self.cache.append_tokens_batch([s.seq_id for s in decodes], 1, [s.token_ids[-1] for s in decodes])
            except OutOfBlocksError:
                decodes = self._decode_one_by_one(decodes, preempted)
        budget -= len(decodes)
        chunks = self._continue_prefills(budget, {s.seq_id for s in decodes}, preempted, not deferred) \
            if self.prefilling else []
        budget -= sum(c.num_tokens for c in chunks)
        if not self.swapped:  # swapped sequences come back before anything new is admitted
            chunks += self._admit(budget)
        self.max_concurrent = max(self.max_concurrent, len(self.running))
        return SchedulerOutput(decodes, chunks, preempted)

    def check_invariants(self) -> None:
        """Assert the queues agree with the sequences' states and the cache's lengths."""
        assert all(s.status is SequenceStatus.RUNNING for s in self.running)
        assert all(s.status is SequenceStatus.WAITING for s in self.waiting)
        assert all(s.status is SequenceStatus.SWAPPED and self.cache.is_swapped(s.seq_id) for s in self.swapped)
        orders = [s.admit_order for s in self.running]
        assert orders == sorted(orders), "running is in admission order"
        cache = self.cache
        assert self.prefilling == [s for s in self.running if cache.num_pending_tokens(s.seq_id)]
        for s in self.running:
            known = cache.seq_len(s.seq_id) + cache.num_pending_tokens(s.seq_id)
            assert known in (s.num_tokens, s.num_tokens - 1), \
                f"sequence {s.seq_id}: the cache knows {known} of its {s.num_tokens} tokens"

    def _decode_one_by_one(self, decodes: list[Sequence], preempted: list[Sequence]) -> list[Sequence]:
        """Slow path when the batch does not fit: oldest first, preempting the newest."""
        done: list[Sequence] = []
        for s in decodes:
            if s.status is not SequenceStatus.RUNNING:
                continue  # preempted for an older one
            appended = False
            while not appended:
                try:
                    self.cache.append_tokens(s.seq_id, 1, [s.token_ids[-1]])
                    appended = True
                except OutOfBlocksError:
                    victim = self.running[-1]
                    self._preempt(victim, preempted, may_swap=True)
                    if victim is s:
                        break
            if not appended:
                break  # s was the newest left: every later one is preempted too
            done.append(s)
        return done

    def _continue_prefills(self, budget: int, scheduled: set[int], preempted: list[Sequence],
                           may_preempt: bool = True) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        cache = self.cache
        for s in list(self.prefilling):
            if budget <= 0:
                break
            if s.status is not SequenceStatus.RUNNING:
                continue
            pending = cache.num_pending_tokens(s.seq_id)
            start = cache.seq_len(s.seq_id)
            n = min(pending, budget)
            if not self._append_preempting_newer(s, n, scheduled, preempted, may_preempt):
                continue
            chunks.append(ScheduledChunk(s, start, n, n == pending))
            scheduled.add(s.seq_id)
            budget -= n
            if n == pending:
                self.prefilling.remove(s)
        return chunks

    def _append_preempting_newer(self, s: Sequence, n: int, scheduled: set[int],
                                 preempted: list[Sequence], may_preempt: bool = True) -> bool:
        while True:
            try:
                self.cache.append_tokens(s.seq_id, n)
                return True
            except OutOfBlocksError:
                if not may_preempt:
                    return False
                victim = None
                for v in reversed(self.running):
                    if v is s:
                        break
                    if v.seq_id not in scheduled:
                        victim = v
                        break
                if victim is None:
                    return False  # wait for a later step
                self._preempt(victim, preempted, may_swap=True)

    def _admit(self, budget: int) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        cache = self.cache
        prefetch = cache.remote is not None and cache.remote_prefetching
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            s = self.waiting[i]
            if prefetch and not self._fetched(s):
                i += 1  # its blocks are on the way: admit those behind it meanwhile
                continue
            tokens = s.token_ids
            # the most its prefill holds at once (window layers keep their window and two chunks)
            need = cache.num_blocks_needed(len(tokens), tokens, chunk_tokens=self.max_num_batched_tokens)
            spare = self.watermark_blocks if self.running else 0
            if need + spare > cache.num_available_blocks:
                break
            r = cache.add_sequence(s.seq_id, tokens, num_tokens=min(len(tokens), budget))
            del self.waiting[i]
            cached = r.num_cached_tokens
            reserved = cached + len(r.slots)
            extra = min(len(tokens) - reserved, budget - len(r.slots))
            if extra > 0:
                try:
                    cache.append_tokens(s.seq_id, extra)
                    reserved += extra
                except OutOfBlocksError:  # pragma: no cover - the whole prompt was checked to fit
                    pass
            if s.admit_order < 0:
                s.num_cached_tokens = cached
            self.add_running(s)
            if reserved < len(tokens):
                self.prefilling.append(s)
            chunks.append(ScheduledChunk(s, cached, reserved - cached, reserved == len(tokens)))
            budget -= reserved - cached
        return chunks

    def _fetched(self, s: Sequence) -> bool:
        """Whether ``s`` may be admitted: its remote prefetch is done (kept for its
        admission), declined, or had nothing to ask; starts it on the first call."""
        f = s.remote_fetch
        if f is None:
            f = s.remote_fetch = self.cache.prefetch_remote(s.token_ids) or _NO_FETCH
        if f is _NO_FETCH:
            return True
        if not f.done():
            return False
        self.cache.take_prefetched(f)
        s.remote_fetch = _NO_FETCH
        return True

    @property
    def num_fetching(self) -> int:
        """Waiting sequences whose remote prefetch is still in flight."""
        return sum(1 for s in self.waiting if s.remote_fetch is not None and s.remote_fetch is not _NO_FETCH
                   and not s.remote_fetch.done())

    def wait_for_fetches(self, timeout: float) -> None:
        """Block until a waiting sequence's prefetch finishes, at most ``timeout`` seconds
        (the engine calls it when nothing else can run)."""
        futures = [s.remote_fetch.future for s in self.waiting
                   if s.remote_fetch is not None and s.remote_fetch is not _NO_FETCH]
        if futures:
            concurrent.futures.wait(futures, timeout, return_when=concurrent.futures.FIRST_COMPLETED)

    def preempt(self, seqs: list[Sequence]) -> list[Sequence]:
        """Preempt those of ``seqs`` that are running, newest first; return them."""
        running = {id(s) for s in self.running}
        victims = sorted((s for s in seqs if id(s) in running), key=lambda s: s.admit_order, reverse=True)
        preempted: list[Sequence] = []
        for victim in victims:
            self._preempt(victim, preempted, publish=False)
        return preempted

    def preempt_all(self) -> list[Sequence]:
        """Preempt every running sequence, newest first (so the oldest ends at the
        head of the waiting queue); return them. The engine's recovery from a
        failed step: it drops slots reserved for tokens that were never computed."""
        preempted: list[Sequence] = []
        for victim in reversed(list(self.running)):
            self._preempt(victim, preempted, publish=False)
        return preempted

    def _preempt(self, victim: Sequence, preempted: list[Sequence], may_swap: bool = False,
                 publish: bool = True) -> None:
        """Take ``victim``'s blocks: swap it out when ``may_swap`` and the policy says so
        (it has no slot reserved this step), else free them to recompute it later
        (sharing them with a remote tier unless ``publish`` is False: a failed step)."""
        if may_swap and victim not in self.prefilling and self._try_swap_out(victim):
            self.running.remove(victim)
            victim.status = SequenceStatus.SWAPPED
            victim.num_preemptions += 1
            self.num_preemptions += 1
            self.swapped.append(victim)
            preempted.append(victim)
            return
        self.num_recomputes += 1
        self.cache.free_sequence(victim.seq_id, publish=publish)
        self.running.remove(victim)
        if victim in self.prefilling:
            self.prefilling.remove(victim)
        victim.status = SequenceStatus.WAITING
        victim.remote_fetch = None  # its tokens grew: ask again
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        preempted.append(victim)
        log.debug("preempted sequence %s (%d tokens)", victim.seq_id, victim.num_tokens)

    # ------------------------------------------------------------- swapping
    def _try_swap_out(self, victim: Sequence) -> bool:
        cache = self.cache
        if not cache.has_host_tier:
            return False
        n = cache.seq_len(victim.seq_id)
        if not self.policy.should_swap(n, -(-n // cache.config.block_size)):
            return False
        try:
            cache.swap_out([victim.seq_id])
        except KVForgeError as exc:  # no room on the host: recompute instead
            log.debug("swap-out of sequence %s refused (%s); recomputing", victim.seq_id, exc)
            return False
        except Exception as exc:  # a failed copy changed nothing: recompute instead
            log.warning("swap-out of sequence %s failed (%s); recomputing", victim.seq_id, exc)
            return False
        self.num_swaps_out += 1
        log.debug("swapped out sequence %s (%d tokens)", victim.seq_id, n)
        return True

    def _swap_in(self) -> None:
        """Bring back the oldest swapped sequences that fit, as running decodes."""
        cache = self.cache
        while self.swapped and len(self.running) < self.max_num_seqs:
            s = self.swapped[0]
            need = cache.num_blocks_to_swap_in([s.seq_id]) + 1  # and a block for its next token
            spare = self.watermark_blocks if self.running else 0
            if need + spare > cache.num_available_blocks:
                return
            self.swapped.popleft()
            try:
                cache.swap_in([s.seq_id])
            except OutOfBlocksError:  # pragma: no cover - checked above
                self.swapped.appendleft(s)
                return
            except Exception as exc:  # the copy failed: the sequence recomputes
                log.warning("swap-in of sequence %s failed (%s); recomputing it", s.seq_id, exc)
                cache.free_sequence(s.seq_id)
                self.num_recomputes += 1
                s.status = SequenceStatus.WAITING
                s.remote_fetch = None
                self.waiting.appendleft(s)
                continue
            self.num_swaps_in += 1
            s.status = SequenceStatus.RUNNING
            self.running.append(s)
            self.running.sort(key=lambda q: q.admit_order)
