"""Admitting a sequence: how many blocks it needs, and reserving them with prefix reuse.

:meth:`SequenceAdmission.add_sequence` with a prompt reuses the longest
cached run of the prompt's full blocks, never the block holding its last
token (its logits are needed), takes references on the hits (reviving
evictable ones), allocates the rest, records the token ids and registers the
full blocks it reserved. :meth:`SequenceAdmission.num_blocks_needed` counts
the same blocks without changing anything, so a scheduler asks before it
acts; both go through one :meth:`SequenceAdmission._plan_admission`, so they
always agree, and it checks every argument before anything is looked up (the
prefix index is then asked through its unchecked calls: the ids are checked).
:class:`SequenceAdmission` is that part of
:class:`~kvforge.core.manager.BlockManager`.
"""
from __future__ import annotations

import logging
from array import array
from typing import Callable, Hashable, NamedTuple, Sequence

import numpy as np

from kvforge.core.chains import KeyChain
from kvforge.core.host_tier import HostTier
from kvforge.core.ids import as_int, token_array
from kvforge.core.sequences import SequenceRows
from kvforge.core.pool import BlockPool
from kvforge.core.keys import root_key
from kvforge.core.prefix import BlockKey, PrefixIndex
from kvforge.core.tables import BlockTables, blocks_for_tokens
from kvforge.errors import OutOfBlocksError, SequenceError

log = logging.getLogger(__name__)

__all__ = ["AddSequenceResult", "SequenceAdmission"]

SeqId = Hashable


class AddSequenceResult(NamedTuple):
    """What :meth:`~kvforge.core.manager.BlockManager.add_sequence` did: ``num_cached_tokens``
    prompt tokens were in the prefix cache (no computing needed); ``slots`` (int64) are those
    of tokens ``num_cached_tokens ..`` that were reserved; ``block_ids`` the sequence's table."""

    seq_id: SeqId
    num_cached_tokens: int
    slots: np.ndarray
    block_ids: list[int]


class _Admission(NamedTuple):
    """What an admission would do (nothing changed yet): the prompt's ids (None: none
    given), the tokens to reserve, the keys of the prompt's full blocks before its last
    token, the cached device blocks reused, the host blocks that continue them (copied
    into new device blocks), and how many blocks it takes new / revives."""

    tokens: array[int] | None
    num_tokens: int
    keys: list[BlockKey]
    hits: list[int]
    host_hits: list[int]
    num_new: int
    num_revived: int


class SequenceAdmission:
    """``add_sequence`` and its sizing (a mixin of :class:`~kvforge.core.manager.BlockManager`)."""

    block_size: int
    pool: BlockPool
    prefix: PrefixIndex
    tables: BlockTables
    host: HostTier
    _seqs: SequenceRows[KeyChain]
    copy_to_device: Callable[[list[tuple[int, int]]], None] | None
    #: the storage's remote tier: ``fetch_remote(keys) -> n`` (a run of the keys it holds,
    #: payloads kept) and ``copy_from_remote(device_blocks)`` (writes those payloads)
    fetch_remote: Callable[[list[BlockKey]], int] | None
    copy_from_remote: Callable[[list[int]], None] | None
    flush_spills: Callable[[], None]
    _check_new: Callable[[SeqId], None]

    def num_blocks_needed(self, num_tokens: int, prompt_token_ids: Sequence[int] | None = None,
                          salt: Hashable | None = None, *, max_cached_blocks: int | None = None) -> int:
        """Blocks :meth:`add_sequence` of ``num_tokens`` tokens would take from the pool for a
        new sequence (>= 0; cached prefix blocks held by others cost nothing, evictable ones
        count: they are revived). Checks its arguments as :meth:`add_sequence` does."""
        plan = self._plan_admission(as_int(num_tokens, "num_tokens"), prompt_token_ids, salt, max_cached_blocks)
        return plan.num_new + plan.num_revived

    def can_add_sequence(self, num_tokens: int, prompt_token_ids: Sequence[int] | None = None,
                         salt: Hashable | None = None) -> bool:
        """Whether :meth:`add_sequence` of that many tokens would find the blocks."""
        return self.num_blocks_needed(num_tokens, prompt_token_ids, salt) <= self.pool.num_available_blocks

    def _plan_admission(self, num_tokens: int | None, prompt_token_ids: Sequence[int] | None,
                        salt: Hashable | None, max_cached_blocks: int | None = None) -> _Admission:
        """Check every argument of an admission and size it; changes and records nothing.

        A sequence reserves ``max(num_tokens, cached tokens)``: a cached prefix longer
        than the first chunk is reused whole. ``max_cached_blocks`` caps the reused
        blocks (the cache's other layer groups hold fewer: :mod:`~kvforge.core.groups`)."""
        bs = self.block_size
        if num_tokens is not None:
            num_tokens = as_int(num_tokens, "num_tokens")
        tokens = token_array(prompt_token_ids, "prompt_token_ids") if prompt_token_ids is not None else None
        root = root_key(salt)  # checks the salt, with or without a prompt
        keys: list[BlockKey] = []
        hits: list[int] = []
        host_hits: list[int] = []
        if tokens is not None:
            num_tokens = len(tokens) if num_tokens is None else num_tokens
            if num_tokens > len(tokens):
                raise SequenceError(f"num_tokens={num_tokens} must lie in [0, {len(tokens)}] "
                                    f"for a prompt of {len(tokens)} tokens")
            full = max(0, (len(tokens) - 1) // bs) * bs  # never the block of the last token
            if full and self.prefix.enabled:
                keys = self.prefix._keys(tokens[:full].tobytes(), root)
                hits = self.prefix._lookup(keys)
                if max_cached_blocks is not None and len(hits) > max_cached_blocks:
                    del hits[max(0, max_cached_blocks):]
                else:
                    host_hits = self.host.lookup(keys[len(hits):])
        reserve = max(num_tokens or 0, (len(hits) + len(host_hits)) * bs)
        revived = sum(1 for b in hits if self.pool.ref_count(b) == 0) if hits else 0
        return _Admission(tokens, reserve, keys, hits, host_hits, blocks_for_tokens(reserve, bs) - len(hits),
                          revived)

    def remote_candidates(self, prompt_token_ids: Sequence[int], salt: Hashable | None = None) -> list[BlockKey]:
        """The keys of the prompt's full blocks after its local (device and host) hits: what
        an admission now would look for in the remote tier. Changes nothing."""
        plan = self._plan_admission(None, prompt_token_ids, salt)
        return plan.keys[len(plan.hits) + len(plan.host_hits):]

    def add_sequence(self, seq_id: SeqId, prompt_token_ids: Sequence[int] | None = None,
                     salt: Hashable | None = None, *, num_tokens: int | None = None,
                     max_cached_blocks: int | None = None) -> AddSequenceResult:
        """Start a sequence; with a prompt, reuse its longest cached prefix.

        Reserves slots for the first ``num_tokens`` prompt tokens (default:
        all; fewer for a chunked prefill, the rest follow through
        ``append_tokens``). Raises :class:`OutOfBlocksError` when the
        blocks do not fit, :class:`SequenceError` on a duplicate id or a bad
        argument; either way nothing changed.
        """
        self._check_new(seq_id)
        plan = self._plan_admission(num_tokens, prompt_token_ids, salt, max_cached_blocks)
        bs, pool, tokens, hits, keys = self.block_size, self.pool, plan.tokens, plan.hits, plan.keys
        need, revived, reserve = plan.num_new, plan.num_revived, plan.num_tokens
        if need + revived > pool.num_available_blocks:
            raise OutOfBlocksError(
                f"sequence {seq_id!r} needs {need} new blocks (+{revived} cached to revive) for "
                f"{reserve} tokens; {pool.num_available_blocks} available",
                requested=need + revived, available=pool.num_available_blocks)
        local = len(hits) + len(plan.host_hits)
        num_remote = self._ask_remote(keys[local:], local, reserve, need + revived) if self.fetch_remote else 0
        if num_remote:  # the remote blocks follow the local hits; the sequence reserves at least them
            reserve = max(reserve, (local + num_remote) * bs)
            need = blocks_for_tokens(reserve, bs) - len(hits)
        pool.incref(hits)
        self.host.pool.incref(plan.host_hits)  # before allocating: no spill may drop them
        new = pool.allocate(need)
        host_hits = self._onboard(plan.host_hits, new, hits) if plan.host_hits else plan.host_hits
        if num_remote and (len(host_hits) < len(plan.host_hits) or
                           not self._copy_remote(new[len(host_hits): len(host_hits) + num_remote])):
            num_remote = 0  # a gap before them, or their copy failed: those tokens are computed
        if len(host_hits) < len(plan.host_hits) or (reserve > plan.num_tokens and not num_remote):
            # fewer blocks came than were reserved for: reserve what the request asked for
            reserve = max(plan.num_tokens if len(host_hits) == len(plan.host_hits) else
                          (num_tokens if num_tokens is not None else len(tokens or ())), len(hits) * bs)
            surplus = len(hits) + len(new) - blocks_for_tokens(reserve, bs)
            if surplus > 0:
                pool.free(new[len(new) - surplus:])
                del new[len(new) - surplus:]
        num_fetched = len(host_hits) + num_remote
        if tokens is not None:  # counted only now: a refused request queried nothing
            self.prefix._record_query(len(tokens), len(hits) + num_fetched, len(host_hits), num_remote)
        ids = hits + new
        row = self.tables.new_row()
        cached = (len(hits) + num_fetched) * bs
        slots = self.tables.assign(row, ids, reserve, None if tokens is None else np.frombuffer(tokens, np.int64),
                                   len(hits) * bs)[num_fetched * bs:]
        known = min(reserve // bs, len(keys))  # keys of reserved full blocks: no hashing again
        chain = KeyChain(salt, keys[:known])
        self._seqs.add(seq_id, row, chain)
        # the onboarded blocks take their keys back from the host tier, whose blocks stay as their copies
        self.prefix._register_many(ids[len(hits):known], keys[len(hits):known])
        chain.register_full_blocks(self.prefix, self.tables, row)
        return AddSequenceResult(seq_id, cached, slots, ids)

    def _ask_remote(self, keys: list[BlockKey], local: int, reserve: int, need: int) -> int:
        """How many of ``keys`` (the prompt's full blocks after its ``local`` hits) the remote
        tier holds, as a run from the first; the storage keeps their payloads for
        :meth:`_copy_remote`. Only as many as the pool can take when they reach beyond
        the ``reserve`` tokens asked for (a chunked prefill's first chunk)."""
        if not keys:
            return 0
        try:
            n = self.fetch_remote(keys)  # type: ignore[misc]
        except Exception as exc:  # the tier never raises for the server's trouble; anything else: a miss
            log.warning("the remote tier's fetch failed (%s); the prompt is computed", exc)
            return 0
        bs = self.block_size
        extra = blocks_for_tokens(max(reserve, (local + n) * bs), bs) - blocks_for_tokens(reserve, bs)
        if extra and need + extra > self.pool.num_available_blocks:
            n = max(0, min(n, reserve // bs - local))  # only those the reservation covers already
        return n

    def _copy_remote(self, device_blocks: list[int]) -> bool:
        """Write the fetched payloads into ``device_blocks`` (after the queued spills); False if that raised."""
        try:
            self.flush_spills()
            self.copy_from_remote(device_blocks)  # type: ignore[misc]
        except Exception as exc:
            log.warning("copying %d block(s) from the remote tier failed (%s); they are recomputed",
                        len(device_blocks), exc)
            return False
        return True

    def _onboard(self, host_hits: list[int], new: list[int], hits: list[int]) -> list[int]:
        """Copy the host hits into the first new device blocks (after the queued spills,
        which may read those very blocks); return the host hits now on the device: all,
        or none when the copy raised (the request then computes those tokens)."""
        host = self.host  # the caller holds a reference on each host hit; released here
        try:
            self.flush_spills()
            if self.copy_to_device is not None:
                self.copy_to_device(list(zip(host_hits, new)))
        except Exception as exc:
            host.failed_copies += 1
            log.warning("onboarding %d block(s) from the host tier failed (%s); they are recomputed",
                        len(host_hits), exc)
            for h in host_hits:  # the recomputed device blocks take over their keys
                host.forget_key(h)
            return []
        except BaseException:
            self.pool.free(new + hits)
            raise
        finally:
            host.pool.free(host_hits)
        host.onboarded += len(host_hits)
        host.host_hit_tokens += len(host_hits) * self.block_size
        return host_hits
