"""Sequences over a block pool: the bookkeeping an engine talks to.

:class:`BlockManager` composes a :class:`~kvforge.core.pool.BlockPool` (block
ids), a :class:`~kvforge.core.tables.BlockTables` (one row per sequence: its
blocks, counts and token ids) and a :class:`~kvforge.core.prefix.PrefixIndex`
(full blocks by key). It never touches device memory: when data must move
(copy-on-write after a fork) it queues the ``(src, dst)`` block pair in
:attr:`BlockManager.pending_copies`, and the storage layer copies before the
new slots are written.

Prefix caching: a full block whose token ids are known is registered when it
is reserved (the caller computes it in the same step, before anything reads
it). :meth:`~BlockManager.add_sequence` with a prompt reuses the longest
cached run of full blocks, never the block holding the prompt's last token
(its logits are needed).

Not thread-safe by itself (one scheduler thread drives it); the pool under it is.
"""
from __future__ import annotations

import sys
from array import array
from typing import Callable, Hashable, NamedTuple, Sequence

import numpy as np

from kvforge.core import usage
from kvforge.core.compaction import CompactionPlan, plan_compaction
from kvforge.core.ids import SequenceRows, count_array, is_int, last_counts, token_array
from kvforge.core.pool import BlockPool
from kvforge.core.prefix import BlockKey, NullPrefixIndex, PrefixIndex
from kvforge.core.tables import BlockTables, StepView, blocks_for_tokens
from kvforge.errors import OutOfBlocksError, SequenceError

__all__ = ["AddSequenceResult", "BlockManager", "SequenceBlockTable", "StepView", "blocks_for_tokens"]

SeqId = Hashable


class AddSequenceResult(NamedTuple):
    """What :meth:`BlockManager.add_sequence` did: ``num_cached_tokens`` prompt tokens
    were in the prefix cache (no computing needed); ``slots`` (int64) are those of
    tokens ``num_cached_tokens ..`` that were reserved; ``block_ids`` the sequence's table."""

    seq_id: SeqId
    num_cached_tokens: int
    slots: np.ndarray
    block_ids: list[int]


class SequenceBlockTable(NamedTuple):
    """One sequence's table (:meth:`BlockManager.sequence_table`): block ids in position
    order and the tokens with a slot (``len(block_ids) == ceil(num_tokens / block_size)``)."""

    seq_id: SeqId
    block_ids: list[int]
    num_tokens: int


class _Chain:
    """A sequence's prefix-key chain: its salt and the keys of its leading full blocks
    (key ``i`` names block ``i`` and every token before it)."""

    __slots__ = ("salt", "keys")

    def __init__(self, salt: Hashable | None, keys: list[BlockKey]) -> None:
        self.salt, self.keys = salt, keys


class BlockManager:
    """Block tables of many sequences over one pool, with prefix reuse and fork.

    ``seq_id`` may be any hashable. Every failing call raises (a
    :class:`~kvforge.errors.KVForgeError`) and changes nothing.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 capacity: int | None = None, pool: BlockPool | None = None) -> None:
        if not is_int(block_size) or block_size <= 0:
            raise SequenceError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = int(block_size)
        self.pool = pool if pool is not None else BlockPool(num_blocks, capacity)
        self.prefix: PrefixIndex = (PrefixIndex if enable_prefix_caching else NullPrefixIndex)(
            self.pool, self.block_size)
        self.tables = BlockTables(self.block_size, self.pool.num_blocks)
        self._seqs: SequenceRows[_Chain] = SequenceRows()
        self.pending_copies: list[tuple[int, int]] = []
        #: the storage layer's block copy ``fn([(src, dst), ...])``; when set, copy-on-write
        #: copies through it before any table changes (see :meth:`_copy_on_write`)
        self.copy_blocks: Callable[[list[tuple[int, int]]], None] | None = None
        self.num_cow_copies = 0

    # ------------------------------------------------------------- queries
    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def seq_ids(self) -> list[SeqId]:
        """Ids of the sequences present, in insertion order."""
        return self._seqs.ids()

    def num_tokens(self, seq_id: SeqId) -> int:
        """Tokens with a reserved slot in the sequence."""
        return self.tables.num_tokens(self._seqs.row(seq_id))

    seq_len = num_tokens

    def num_pending_tokens(self, seq_id: SeqId) -> int:
        """Prompt tokens given to :meth:`add_sequence` that have no slot yet."""
        return self.tables.num_pending(self._seqs.row(seq_id))

    def token_ids(self, seq_id: SeqId) -> list[int] | None:
        """Known token ids, reserved then pending (None when some came without ids)."""
        row = self._seqs.row(seq_id)
        return self.tables.token_ids(row).tolist() if self.tables.is_known(row) else None

    def block_table(self, seq_id: SeqId) -> list[int]:
        """The sequence's block ids in position order."""
        return self.tables.blocks(self._seqs.row(seq_id))

    def sequence_table(self, seq_id: SeqId) -> SequenceBlockTable:
        """The sequence's block ids and token count, read together."""
        row = self._seqs.row(seq_id)
        return SequenceBlockTable(seq_id, self.tables.blocks(row), self.tables.num_tokens(row))

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

    def num_blocks_needed(self, num_tokens: int, prompt_token_ids: Sequence[int] | None = None,
                          salt: Hashable | None = None) -> int:
        """Blocks :meth:`add_sequence` would take from the pool for a new sequence
        (cached prefix blocks that are held by others cost nothing)."""
        if not is_int(num_tokens) or num_tokens < 0:
            raise SequenceError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
        hits = self._prefix_hits(prompt_token_ids, salt)[1] if prompt_token_ids is not None else []
        return blocks_for_tokens(num_tokens, self.block_size) - len(hits) + self._num_revived(hits)

    def can_add_sequence(self, num_tokens: int, prompt_token_ids: Sequence[int] | None = None,
                         salt: Hashable | None = None) -> bool:
        """Whether :meth:`add_sequence` of that many tokens would find the blocks."""
        return self.num_blocks_needed(num_tokens, prompt_token_ids, salt) <= self.pool.num_available_blocks

    def _prefix_hits(self, prompt: Sequence[int] | np.ndarray, salt: Hashable | None
                     ) -> tuple[list[BlockKey], list[int]]:
        """Keys of the prompt's full blocks before its last token, and the cached blocks
        of their longest cached run (nothing recorded)."""
        bs = self.block_size
        keys = self.prefix.block_keys(prompt[: max(0, (len(prompt) - 1) // bs) * bs], salt)
        return keys, self.prefix.lookup(keys, len(prompt), record=False)

    def _num_revived(self, hits: list[int]) -> int:
        return sum(1 for b in hits if self.pool.ref_count(b) == 0)

    # ------------------------------------------------------------ mutation
    def add_sequence(self, seq_id: SeqId, prompt_token_ids: Sequence[int] | None = None,
                     salt: Hashable | None = None, *, num_tokens: int | None = None) -> AddSequenceResult:
        """Start a sequence; with a prompt, reuse its longest cached prefix.

        Reserves slots for the first ``num_tokens`` prompt tokens (default:
        all; fewer for a chunked prefill, the rest follow through
        :meth:`append_tokens`). Raises :class:`OutOfBlocksError` when the
        blocks do not fit, :class:`SequenceError` on a duplicate id.
        """
        self._seqs.check_new(seq_id)
        if num_tokens is not None and (not is_int(num_tokens) or num_tokens < 0):
            raise SequenceError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
        bs, pool = self.block_size, self.pool
        tokens = token_array(prompt_token_ids) if prompt_token_ids is not None else None
        keys: list[BlockKey] = []
        hits: list[int] = []
        if tokens is not None:
            num_tokens = len(tokens) if num_tokens is None else num_tokens
            if not 0 <= num_tokens <= len(tokens):
                raise SequenceError(f"num_tokens={num_tokens} must lie in [0, {len(tokens)}] "
                                    f"for a prompt of {len(tokens)} tokens")
            keys, hits = self._prefix_hits(tokens, salt)
        cached = len(hits) * bs
        reserve = max(int(num_tokens or 0), cached)
        need, revived = blocks_for_tokens(reserve, bs) - len(hits), self._num_revived(hits)
        if need + revived > pool.num_available_blocks:
            raise OutOfBlocksError(
                f"sequence {seq_id!r} needs {need} new blocks (+{revived} cached to revive) for "
                f"{reserve} tokens; {pool.num_available_blocks} available",
                requested=need + revived, available=pool.num_available_blocks)
        if tokens is not None:  # counted only now: a refused request queried nothing
            self.prefix.record_query(len(tokens), len(hits))
        pool.incref(hits)
        ids = hits + pool.allocate(need)
        row = self.tables.new_row()
        slots = self.tables.assign(row, ids, reserve, None if tokens is None else np.frombuffer(tokens, np.int64),
                                   cached)
        known = min(reserve // bs, len(keys))  # keys of reserved full blocks: no hashing again
        chain = _Chain(salt, keys[:known])
        self._seqs.add(seq_id, row, chain)
        self.prefix.register_many(ids[len(hits):known], keys[len(hits):known])
        self._register_full_blocks(row, chain)
        return AddSequenceResult(seq_id, cached, slots, ids)

    def _register_full_blocks(self, row: int, chain: _Chain) -> None:
        """Key and register the known row's full blocks that have no key yet."""
        done, full = len(chain.keys), self.tables.num_tokens(row) // self.block_size
        if full > done and self.prefix.enabled and self.tables.is_known(row):
            blocks = self.tables.blocks(row, done, full)
            self.prefix.extend_chain(chain.keys, chain.salt, self.tables.block_tokens(blocks), blocks)

    def append_tokens(self, seq_id: SeqId, n: int, token_ids: Sequence[int] | None = None) -> np.ndarray:
        """Reserve slots for ``n`` more tokens; return their slot ids (int64), all or nothing.

        The batch of one of :meth:`append_tokens_batch`: pending prompt tokens
        (see :meth:`add_sequence`) come first; ``token_ids`` (length ``n``) let
        filled blocks enter the prefix cache; a shared, partially filled last
        block is copied first (copy-on-write, queued in :attr:`pending_copies`).
        """
        row = self._seqs.row(seq_id)
        if not is_int(n) or n < 0:
            raise SequenceError(f"append_tokens() needs a token count >= 0, got {n!r}")
        ids = token_array(token_ids) if token_ids is not None else None
        if ids is not None and len(ids) != n:
            raise SequenceError(f"append_tokens({seq_id!r}, {n}) got {len(ids)} token ids")
        if n == 0:
            return np.empty(0, dtype=np.int64)
        counts = None if n == 1 else np.array([n], dtype=np.int64)
        return self._append((seq_id,), np.array([row], dtype=np.int64), counts, ids, True)

    def append_token(self, seq_id: SeqId, token_id: int | None = None) -> int:
        """Reserve one slot; return its slot id."""
        return int(self.append_tokens(seq_id, 1, None if token_id is None else [token_id])[0])

    def append_tokens_batch(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int] | np.ndarray = 1,
                            token_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Reserve ``num_tokens`` more slots for each sequence (an int: the same for all);
        return the slot mapping (int64): each sequence's new slots, sequence after sequence.

        Vectorised, all or nothing. ``token_ids``: the new tokens' ids in that
        order (one per sequence in a decode step); sequences with pending
        prompt tokens take none. Copy-on-write as :meth:`append_tokens`, in
        batch order.
        """
        seq_ids = _indexable(seq_ids)
        rows = self._seqs.rows(seq_ids)
        if not self.tables.are_distinct(rows):
            raise SequenceError("append_tokens_batch() got the same sequence twice")
        counts = None if type(num_tokens) is int and num_tokens == 1 else \
            count_array(num_tokens, len(rows), "num_tokens")
        ids = token_array(token_ids) if token_ids is not None else None
        want = len(rows) if counts is None else int(counts.sum())
        if ids is not None and len(ids) != want:
            raise SequenceError(f"token_ids: expected one id per new token ({want}), got {len(ids)}")
        return self._append(seq_ids, rows, counts, ids, False)

    def _append(self, seq_ids: Sequence[SeqId], rows: np.ndarray, counts: np.ndarray | None,
                ids: array[int] | None, single: bool) -> np.ndarray:
        """The one append: ``counts[i]`` tokens (None: one each) to each of the distinct ``rows``."""
        tables, pool = self.tables, self.pool
        plan = tables.plan_append(rows, counts, pool.ref_count)
        if ids is not None and plan.pending is not None:
            stuck = (plan.pending > 0) if counts is None else (plan.pending > 0) & (counts > 0)
            if np.count_nonzero(stuck):
                i = int(np.flatnonzero(stuck)[0])
                raise SequenceError(f"sequence {seq_ids[i]!r} still has {int(plan.pending[i])} prompt tokens "
                                    f"pending; append them (without token ids) first")
        need, avail = plan.num_new_blocks + len(plan.cow_rows), pool.num_available_blocks
        if need > avail:
            subject = (f"sequence {seq_ids[0]!r} needs {need} more blocks for "
                       f"{1 if counts is None else int(counts[0])} tokens") if single else \
                f"the batch needs {need} more blocks"
            raise OutOfBlocksError(f"{subject}; {avail} available", requested=need, available=avail)
        if plan.cow_rows:
            self._copy_on_write(plan.cow_rows)
        new_blocks = pool.allocate(plan.num_new_blocks) if plan.num_new_blocks else []
        slots = tables.commit_append(plan, new_blocks, None if ids is None else np.frombuffer(ids, np.int64))
        filled = tables.filled_rows(plan) if self.prefix.enabled else None
        if filled:
            chains = [self._seqs.state(seq_ids[i]) for i in filled]
            if counts is None:  # a decode step: each filled the block its token went to
                blocks = tables.last_blocks(rows[filled])
                self.prefix.extend_chains([c.keys for c in chains], [c.salt for c in chains],
                                          tables.block_tokens(blocks), blocks)
            else:
                for i, chain in zip(filled, chains):
                    self._register_full_blocks(int(rows[i]), chain)
        return slots

    def _copy_on_write(self, rows: list[int]) -> None:
        """Give each row a private copy of its shared, partially filled last block.

        With :attr:`copy_blocks` set, the data is copied first and the tables
        change only after the copy succeeded: a copy that raises frees the new
        blocks and leaves every row as it was. Without it the pairs are queued
        in :attr:`pending_copies` for the caller to copy before anything reads
        the new blocks."""
        tables, pool = self.tables, self.pool
        fresh = pool.allocate(len(rows))
        pairs = list(zip(tables.last_blocks(rows), fresh))
        if self.copy_blocks is not None:
            try:
                self.copy_blocks(pairs)
            except BaseException:
                pool.free(fresh)
                raise
        for row, new_block in zip(rows, fresh):
            pool.free([tables.copy_on_write(row, new_block)])
        if self.copy_blocks is None:
            self.pending_copies += pairs
        self.num_cow_copies += len(rows)

    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """Start ``child_id`` sharing every block of ``parent_id`` (no data copied).

        The shared blocks gain one reference each; the first append into a
        shared partially filled last block copies that block (copy-on-write).
        """
        parent_row, parent = self._seqs.get(parent_id)
        self._seqs.check_new(child_id)
        self.pool.incref(self.tables.blocks(parent_row))
        self._seqs.add(child_id, self.tables.fork_row(parent_row), _Chain(parent.salt, list(parent.keys)))

    def free_sequence(self, seq_id: SeqId) -> None:
        """Drop the sequence and one reference from each of its blocks."""
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
        if not is_int(width_multiple) or width_multiple < 1:
            raise SequenceError(f"width_multiple must be a positive integer, got {width_multiple!r}")
        seq_ids = _indexable(seq_ids)
        rows = self._seqs.rows(seq_ids)
        counts = last_counts(num_new_tokens, self.tables.num_tokens_of(rows), seq_ids, "num_new_tokens")
        return self.tables.step_view(rows, counts, int(width_multiple))

    def block_table_array(self, seq_ids: Sequence[SeqId], width: int | None = None) -> np.ndarray:
        """``[len(seq_ids), width]`` int32 block tables padded with -1; ``width`` defaults
        to the longest table among the sequences."""
        return self.tables.block_table_array(self._seqs.rows(seq_ids), width)

    def context_lens(self, seq_ids: Sequence[SeqId]) -> np.ndarray:
        """Reserved tokens of each sequence (int32)."""
        return self.tables.context_lens(self._seqs.rows(seq_ids))

    def slot_mapping(self, seq_ids: Sequence[SeqId], num_last_tokens: int | Sequence[int] = 1) -> np.ndarray:
        """Slots of the last ``num_last_tokens`` tokens of each sequence, concatenated (int64)."""
        seq_ids = _indexable(seq_ids)
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
        data). Sorts the free list."""
        if not evicted:
            self.pool.evict_blocks(plan.evict)
        self.relocate(plan.moves)
        self.relocate(plan.cached_moves)
        self.pool.sort_free_list()

    def relocate(self, moves: Sequence[tuple[int, int]]) -> None:
        """Apply compaction moves ``src -> dst`` to the pool, every table and the prefix index."""
        if not moves:
            return
        self.pool.relocate(moves)
        self.tables.relocate(moves, self.pool.num_blocks)
        mapping = dict(moves)
        self.pending_copies = [(mapping.get(a, a), mapping.get(b, b)) for a, b in self.pending_copies]
        self.prefix.relocate(mapping)

    def check_invariants(self) -> None:
        """Assert consistency of the pool, the prefix index, the tables and the key chains."""
        self.pool.check_invariants()
        self.prefix.check_invariants()
        self.tables.check_invariants(self.pool.capacity)
        live = self._seqs.items()
        assert sorted(row for _, row, _ in live) == self.tables.live_rows().tolist(), "rows differ from live rows"
        refs: dict[int, int] = {}
        for sid, row, chain in live:
            blocks = self.tables.blocks(row)
            for b in blocks:
                refs[b] = refs.get(b, 0) + 1
            if self.tables.is_known(row) and self.prefix.enabled:  # every full block keyed, by its tokens
                data = self.tables.block_tokens(blocks[: self.tables.num_tokens(row) // self.block_size])
                assert chain.keys == self.prefix.block_keys(np.frombuffer(data, np.int64), chain.salt), \
                    f"sequence {sid!r}: keys do not name its tokens"
        for b, k in refs.items():
            assert self.pool.ref_count(b) == k, f"block {b}: ref {self.pool.ref_count(b)} != {k} table entries"
        assert self.pool.num_allocated_blocks == len(refs), "held blocks not in any table"


def _indexable(seq_ids: Sequence[SeqId]) -> Sequence[SeqId]:
    """A batch's ids as an indexable sequence (any iterable is accepted)."""
    return seq_ids if isinstance(seq_ids, (list, tuple)) else list(seq_ids)
