"""Sequences over a block pool: the bookkeeping an engine talks to.

:class:`BlockManager` composes a :class:`~kvforge.core.pool.BlockPool` (block
ids), a :class:`~kvforge.core.tables.BlockTables` (one row per sequence: its
blocks, counts and token ids) and a :class:`~kvforge.core.prefix.PrefixIndex`
(full blocks by key), and maps sequence ids to rows. Its calls live with
their concept: admission and its sizing (:mod:`~kvforge.core.admission`),
appends and copy-on-write (:mod:`~kvforge.core.appends`), slots reserved
before their ids and truncation (:mod:`~kvforge.core.reservations`),
swapping (:mod:`~kvforge.core.swap`); here are the
queries, fork and free, the batched views, metrics and compaction. It never
touches device memory: when data must move (copy-on-write after a fork) it
copies through the storage's ``copy_blocks`` or queues the ``(src, dst)``
block pair in :attr:`BlockManager.pending_copies`, and the storage layer
copies before the new slots are written.

Prefix caching: a full block whose token ids are known is registered when it
is reserved (the caller computes it in the same step, before anything reads
it). :meth:`~BlockManager.add_sequence` with a prompt reuses the longest
cached run of full blocks, never the block holding the prompt's last token
(its logits are needed).

Not thread-safe by itself (one scheduler thread drives it); the pool under it is.
"""
from __future__ import annotations

import sys
from typing import Callable, Hashable, NamedTuple, Sequence

import numpy as np

from kvforge.core import usage
from kvforge.core.admission import AddSequenceResult, SequenceAdmission
from kvforge.core.appends import SequenceAppends
from kvforge.core.chains import KeyChain
from kvforge.core.compaction import CompactionPlan, plan_compaction
from kvforge.core.host_tier import HostTier, NullHostTier
from kvforge.core.ids import as_flag, as_int, block_id_list, indexable, is_int, last_counts
from kvforge.core.reservations import SequenceReservations
from kvforge.core.sequences import SequenceRows
from kvforge.core.swap import SequenceSwap
from kvforge.core.pool import BlockPool
from kvforge.core.prefix import BlockKey, NullPrefixIndex, PrefixIndex
from kvforge.core.tables import BlockTables, StepView, blocks_for_tokens
from kvforge.errors import InvalidBlockError, SequenceError

__all__ = ["AddSequenceResult", "BlockManager", "SequenceBlockTable", "StepView", "blocks_for_tokens"]

SeqId = Hashable
#: the largest block size (tokens per block), as the config allows
MAX_BLOCK_SIZE = 2**20
#: the largest multiple a step view pads its table width to
MAX_WIDTH_MULTIPLE = 2**16


class SequenceBlockTable(NamedTuple):
    """One sequence's table (:meth:`BlockManager.sequence_table`): block ids in position
    order and the tokens with a slot (``len(block_ids) == ceil(num_tokens / block_size)``)."""

    seq_id: SeqId
    block_ids: list[int]
    num_tokens: int


class BlockManager(SequenceAdmission, SequenceAppends, SequenceReservations, SequenceSwap):
    """Block tables of many sequences over one pool, with prefix reuse and fork.

    ``seq_id`` may be any hashable. Every failing call raises (a
    :class:`~kvforge.errors.KVForgeError`) and changes nothing.
    ``num_host_blocks`` > 0 adds a host tier (:mod:`~kvforge.core.host_tier`):
    evicted prefix blocks spill there, prefix hits there come back, and
    sequences swap out to it (:mod:`~kvforge.core.swap`).
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 capacity: int | None = None, pool: BlockPool | None = None, num_host_blocks: int = 0) -> None:
        self.block_size = as_int(block_size, "block_size", low=1, high=MAX_BLOCK_SIZE)
        enable_prefix_caching = as_flag(enable_prefix_caching, "enable_prefix_caching")
        if pool is None:
            pool = BlockPool(num_blocks, capacity)
        elif not isinstance(pool, BlockPool) or capacity is not None or \
                as_int(num_blocks, "num_blocks", InvalidBlockError) != pool.num_blocks:
            raise InvalidBlockError(f"pool must be a BlockPool of num_blocks={num_blocks!r} blocks (and no "
                                    f"capacity given), got {pool!r} with capacity={capacity!r}")
        self.pool = pool
        self.prefix: PrefixIndex = (PrefixIndex if enable_prefix_caching else NullPrefixIndex)(
            self.pool, self.block_size)
        self.tables = BlockTables(self.block_size, self.pool.num_blocks)
        self._seqs: SequenceRows[KeyChain] = SequenceRows()
        self.pending_copies: list[tuple[int, int]] = []
        #: the storage layer's block copy ``fn([(src, dst), ...])``; when set, copy-on-write
        #: copies through it before any table changes (:mod:`~kvforge.core.appends`)
        self.copy_blocks: Callable[[list[tuple[int, int]]], None] | None = None
        self.num_cow_copies = 0
        num_host_blocks = as_int(num_host_blocks, "num_host_blocks", InvalidBlockError, high=2**31 - 1)
        self.host: HostTier = HostTier(num_host_blocks) if num_host_blocks else NullHostTier()
        if self.host.enabled:
            self.prefix.tier = self.host
        self._seqs.swapped = self.host.swapped
        self.copy_to_host: Callable[[list[tuple[int, int]]], None] | None = None
        self.copy_to_device: Callable[[list[tuple[int, int]]], None] | None = None
        self.fetch_remote: Callable[[list[bytes]], int] | None = None
        self.copy_from_remote: Callable[[list[int]], None] | None = None
        #: the cache's other layer groups (:mod:`~kvforge.core.groups`) over the same pool: their
        #: references are counted by :meth:`check_invariants`, and they follow compaction moves
        self.extra_refs: Callable[[], dict[int, int]] | None = None
        self.on_relocate: list[Callable[[list[tuple[int, int]], int], None]] = []

    # ------------------------------------------------------------- queries
    def __contains__(self, seq_id: SeqId) -> bool:
        """Whether the sequence exists: running, or swapped out to the host tier."""
        return seq_id in self._seqs or seq_id in self.host.swapped

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def seq_ids(self) -> list[SeqId]:
        """Ids of the sequences present, in insertion order."""
        return self._seqs.ids()

    def num_tokens(self, seq_id: SeqId) -> int:
        """Tokens with a reserved slot in the sequence (swapped out or not)."""
        rec = self.host.swapped.get(seq_id) if self.host.swapped else None
        return rec.num_tokens if rec is not None else self.tables.num_tokens(self._seqs.row(seq_id))

    seq_len = num_tokens

    def num_pending_tokens(self, seq_id: SeqId) -> int:
        """Prompt tokens given to :meth:`add_sequence` that have no slot yet."""
        rec = self.host.swapped.get(seq_id) if self.host.swapped else None
        return rec.num_pending if rec is not None else self.tables.num_pending(self._seqs.row(seq_id))

    def token_ids(self, seq_id: SeqId) -> list[int] | None:
        """Known token ids, reserved then pending (None when some came without ids, or
        some reserved ones are not committed yet: :meth:`reserve_tokens_batch`)."""
        row = self._seqs.row(seq_id)
        return self.tables.token_ids(row).tolist() if self.tables.is_known(row) else None

    def block_table(self, seq_id: SeqId) -> list[int]:
        """The sequence's block ids in position order."""
        return self.tables.blocks(self._seqs.row(seq_id))

    def sequence_table(self, seq_id: SeqId) -> SequenceBlockTable:
        """The sequence's block ids and token count, read together."""
        row = self._seqs.row(seq_id)
        return SequenceBlockTable(seq_id, self.tables.blocks(row), self.tables.num_tokens(row))

    def keyed_blocks(self, seq_id: SeqId) -> tuple[list[BlockKey], list[int]]:
        """The prefix keys of the sequence's full blocks whose token ids are known, and
        those blocks, in position order (what a remote tier is given to share)."""
        row, chain = self._seqs.get(seq_id)
        keys = list(chain.keys)
        return keys, self.tables.blocks(row, 0, len(keys))

    def get_block_for_position(self, seq_id: SeqId, pos: int) -> tuple[int, int]:
        """``(block_id, offset)`` holding token ``pos`` of the sequence."""
        row = self._seqs.row(seq_id)
        n = self.tables.num_tokens(row)
        if not is_int(pos) or not 0 <= pos < n:
            raise SequenceError(f"position {pos!r} is outside sequence {seq_id!r} of {n} tokens")
        return self.tables.block_of(row, int(pos))

    def slot_of(self, seq_id: SeqId, pos: int) -> int:
        """Slot id of token ``pos`` of the sequence (where its keys/values are written)."""
        block, off = self.get_block_for_position(seq_id, pos)
        return block * self.block_size + off

    # ------------------------------------------------------------ mutation
    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """Start ``child_id`` sharing every block of ``parent_id`` (no data copied).

        The shared blocks gain one reference each; the first append into a
        shared partially filled last block copies that block (copy-on-write).
        A parent with uncommitted tokens (:meth:`reserve_tokens_batch`) is refused:
        commit their ids first.
        """
        parent_row, parent = self._seqs.get(parent_id)
        self._check_new(child_id)
        unc = self.tables.num_uncommitted(parent_row)
        if unc:
            raise SequenceError(f"fork(): sequence {parent_id!r} has {unc} reserved token(s) whose ids are not "
                                f"committed; commit_token_ids() them before forking it")
        self.pool.incref(self.tables.blocks(parent_row))
        self._seqs.add(child_id, self.tables.fork_row(parent_row), parent.fork())

    def _check_new(self, seq_id: SeqId) -> None:
        self._seqs.check_new(seq_id)
        if seq_id in self.host.swapped:
            raise SequenceError(f"sequence {seq_id!r} already exists (swapped out)")

    def free_sequence(self, seq_id: SeqId) -> None:
        """Drop the sequence (running or swapped out) and one reference from each of its blocks."""
        if self.host.swapped and self.is_swapped(seq_id):
            self._free_swapped(seq_id)
            return
        row = self._seqs.row(seq_id)
        self.pool.free(self.tables.blocks(row)[::-1])  # tail first: eviction takes it first
        self._seqs.remove(seq_id)
        self.tables.release_row(row)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """The queued ``(src, dst)`` copy-on-write pairs, emptied."""
        pairs, self.pending_copies = self.pending_copies, []
        return pairs

    # ------------------------------------------------------- batched views
    def step_view(self, seq_ids: Sequence[SeqId], num_new_tokens: int | Sequence[int] | np.ndarray = 1, *,
                  width_multiple: int = 1) -> StepView:
        """What one forward step of ``seq_ids`` reads, built in one pass (see :class:`StepView`).

        Sequence ``i`` computes its last ``num_new_tokens[i]`` tokens (an int:
        the same for all), each in ``[0, num_tokens]``, already reserved. The
        table width is a multiple of ``width_multiple``. Changes nothing.
        """
        width_multiple = as_int(width_multiple, "width_multiple", low=1, high=MAX_WIDTH_MULTIPLE)
        seq_ids = indexable(seq_ids)
        rows = self._seqs.rows(seq_ids)
        counts = last_counts(num_new_tokens, self.tables.num_tokens_of(rows), seq_ids, "num_new_tokens")
        return self.tables.step_view(rows, counts, width_multiple)

    def block_table_array(self, seq_ids: Sequence[SeqId], width: int | None = None) -> np.ndarray:
        """``[len(seq_ids), width]`` int32 block tables padded with -1; ``width`` defaults
        to the longest table among the sequences, and is never narrower than it."""
        seq_ids = indexable(seq_ids)
        rows = self._seqs.rows(seq_ids)
        if width is not None:
            width = as_int(width, "width", high=self.pool.num_blocks)
            over = self.tables.num_blocks_of(rows) > width
            if np.count_nonzero(over):
                i = int(np.flatnonzero(over)[0])
                raise SequenceError(f"width={width} is narrower than the table of sequence {seq_ids[i]!r} "
                                    f"({int(self.tables.num_blocks_of(rows[i:i + 1])[0])} blocks)")
        return self.tables.block_table_array(rows, width)

    def context_lens(self, seq_ids: Sequence[SeqId]) -> np.ndarray:
        """Reserved tokens of each sequence (int32)."""
        return self.tables.context_lens(self._seqs.rows(indexable(seq_ids)))

    def slot_mapping(self, seq_ids: Sequence[SeqId], num_last_tokens: int | Sequence[int] = 1) -> np.ndarray:
        """Slots of the last ``num_last_tokens`` tokens of each sequence, concatenated (int64)."""
        seq_ids = indexable(seq_ids)
        rows = self._seqs.rows(seq_ids)
        counts = last_counts(num_last_tokens, self.tables.num_tokens_of(rows), seq_ids, "num_last_tokens")
        return self.tables.slot_mapping(rows, counts)

    # ------------------------------------------------------------ metrics
    def usage(self) -> usage.BlockUsage:
        """Token and block counts over every sequence (:class:`~kvforge.core.usage.BlockUsage`)."""
        return usage.block_usage(self.tables)

    def num_live_tokens(self) -> int:
        """Tokens with a reserved slot, summed over sequences (a shared block counts per sequence)."""
        return usage.num_live_tokens(self.tables)

    def internal_fragmentation(self) -> float:
        """Token slots of the distinct allocated blocks that no sharer of the block fills,
        over all of those slots."""
        return self.usage().internal_fragmentation

    def live_token_slots(self) -> int:
        """Distinct token slots holding a token (shared blocks counted once)."""
        return self.usage().num_used_slots

    def metadata_bytes(self) -> int:
        """Host bytes of the bookkeeping: tables and token ids, pool, prefix index, key chains."""
        chains = sum(sys.getsizeof(c.keys) for _, _, c in self._seqs.items())
        return usage.metadata_bytes(self.tables, self.pool, self.prefix, self._seqs) + chains

    # ---------------------------------------------------------- compaction
    def held_blocks(self) -> list[int]:
        """Ids that hold data now: referenced or cached (evictable)."""
        return self.pool.held_blocks()

    def live_blocks(self) -> list[int]:
        """Ids referenced by at least one sequence."""
        return self.pool.live_blocks()

    def plan_compaction(self, keep_blocks: int | None = None) -> CompactionPlan:
        """A :func:`~kvforge.core.compaction.plan_compaction` of this pool: live blocks
        first, then cached blocks (most recently released kept) up to ``keep_blocks``."""
        return plan_compaction(self.live_blocks(), self.pool.capacity,
                               evictable=self.pool.evictable_blocks(), keep_blocks=keep_blocks)

    def apply_compaction(self, plan: CompactionPlan, *, evicted: bool = False) -> None:
        """Evict the plan's cached blocks (unless ``evicted``: done already), then move
        ownership of every moved block, phase by phase (the caller has copied the
        data). Sorts the free list. The whole plan is checked against the pool first
        (each phase as the earlier ones leave it): a bad plan changes nothing."""
        if not isinstance(plan, CompactionPlan):
            raise InvalidBlockError(f"plan must be a CompactionPlan, got {type(plan).__name__}")
        evicted = as_flag(evicted, "evicted", InvalidBlockError)
        pool = self.pool
        evict = block_id_list(plan.evict, "plan.evict", pool.num_blocks)
        if not evicted:
            pool.check_evictable(evict)
        freed = set() if evicted else set(evict)
        first = pool.check_moves(plan.moves, freed=freed)
        taken = {d for _, d in first}
        second = pool.check_moves(plan.cached_moves, freed=(freed | {s for s, _ in first}) - taken, taken=taken)
        if not evicted:
            pool.evict_blocks(evict)
        self._relocate(first)
        self._relocate(second)
        pool.sort_free_list()

    def relocate(self, moves: Sequence[tuple[int, int]]) -> None:
        """Apply compaction moves ``src -> dst`` to the pool, every table and the prefix index."""
        self._relocate(self.pool.check_moves(moves))

    def _relocate(self, moves: list[tuple[int, int]]) -> None:
        if not moves:
            return
        self.pool.relocate(moves)
        self.tables.relocate(moves, self.pool.num_blocks)
        mapping = dict(moves)
        self.pending_copies = [(mapping.get(a, a), mapping.get(b, b)) for a, b in self.pending_copies]
        self.prefix.relocate(mapping)
        self.host.relocate(mapping)
        for fn in self.on_relocate:
            fn(moves, self.pool.num_blocks)

    def check_invariants(self) -> None:
        """Assert consistency of the pool, the prefix index, the host tier, the tables and the key chains."""
        self.pool.check_invariants()
        self.prefix.check_invariants()
        if self.host.enabled:
            self.host.check_invariants(self.pool, self.prefix._blocks)
        self.tables.check_invariants(self.pool.capacity)
        live = self._seqs.items()
        assert sorted(row for _, row, _ in live) == self.tables.live_rows().tolist(), "rows differ from live rows"
        refs: dict[int, int] = {}
        tables, pool, bs = self.tables, self.pool, self.block_size
        for sid, row, chain in live:
            blocks = tables.blocks(row)
            for b in blocks:
                refs[b] = refs.get(b, 0) + 1
            n, unc = tables.num_tokens(row), tables.num_uncommitted(row)
            assert len(chain.keys) <= n // bs, f"sequence {sid!r}: keys past its full blocks"
            if tables.is_head_known(row) and self.prefix.enabled:  # every full block of known ids keyed, by its ids
                data = tables.block_tokens(blocks[: (n - unc) // bs])
                assert chain.keys == self.prefix.block_keys(np.frombuffer(data, np.int64), chain.salt), \
                    f"sequence {sid!r}: keys do not name its tokens"
            if n % bs:  # nobody else's tokens are in the block this sequence writes next, uncopied
                tail = blocks[-1]
                if pool.ref_count(tail) > 1 or pool.is_cached(tail):
                    assert tables.is_tail_shared(row), f"sequence {sid!r}: shared or keyed tail {tail} not flagged"
            for b in blocks[(n - unc) // bs:] if unc else ():  # uncommitted tokens: in its own unkeyed blocks
                assert pool.ref_count(b) == 1 and not pool.is_cached(b), \
                    f"sequence {sid!r}: block {b} holds uncommitted tokens and is shared or keyed"
        for rec in self.host.swapped.values():  # device blocks a swapped sequence shares with others
            for b in rec.device_blocks():
                refs[b] = refs.get(b, 0) + 1
            unc = rec.num_uncommitted
            assert 0 <= unc <= rec.num_tokens and not (unc and rec.num_pending), "swapped uncommitted tokens"
            assert rec.token_ids is None or len(rec.token_ids) == rec.num_tokens - unc + rec.num_pending, \
                "swapped token ids do not match its counts"
        if self.extra_refs is not None:
            for b, k in self.extra_refs().items():
                refs[b] = refs.get(b, 0) + k
        for b, k in refs.items():
            assert self.pool.ref_count(b) == k, f"block {b}: ref {self.pool.ref_count(b)} != {k} table entries"
        assert self.pool.num_allocated_blocks == len(refs), "held blocks not in any table"
