"""A cache's layer groups: each group after the first has its own block tables over the one pool.

When ``CacheConfig.kv_groups`` splits the layers (full-attention layers in
group 0, sliding-window layers in the others: :mod:`kvforge.core.groups`),
a :class:`~kvforge.storage.KVCache` keeps group 0 in its
:class:`~kvforge.core.BlockManager` and the others in :class:`LayerGroups`,
and every sequence call goes through both, all or nothing: an admission or
an append sizes every group first and raises :class:`OutOfBlocksError`
before anything changes; the blocks of the other groups are taken before
group 0's call and handed back if it fails. Window groups release what they
no longer read when a step is prepared (:meth:`LayerGroups.step_parts`): a
step computing a sequence's tokens from position ``p`` on reads nothing
before ``p - w + 1``, and no later step reads further back. Not at an
append: a sequence may take slots twice before one step computes them (an
admission's extra chunk, speculative drafts after the decode token).

Not with a host or remote tier, nor with slots reserved before their ids
(those calls raise for a grouped cache).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Sequence

import numpy as np

from kvforge.core.groups import GroupTables
from kvforge.core.ids import count_array, indexable
from kvforge.core.prefix import BlockKey
from kvforge.core.tables import blocks_for_tokens
from kvforge.errors import OutOfBlocksError, SequenceError

if TYPE_CHECKING:
    from kvforge.core.manager import BlockManager
    from kvforge.core.admission import _Admission

__all__ = ["LayerGroups"]

SeqId = Hashable


class LayerGroups:
    """The block tables of groups ``1..G-1`` of a cache's layers, kept in step with its manager."""

    def __init__(self, manager: BlockManager, groups: Sequence[tuple[int | None, int]],
                 copy_blocks: object) -> None:
        self.manager = manager
        self.copy_blocks = copy_blocks  # the storage's copy of (src, dst) block pairs (every slot)
        self.tables = [GroupTables(manager.pool, manager.prefix, manager.block_size, window, index)
                       for window, index in groups]
        manager.extra_refs = self.refs
        manager.on_relocate.append(self._relocate)

    # ----------------------------------------------------------- admission
    def _plan(self, num_tokens: int | None, prompt_token_ids: Sequence[int] | None,
              salt: Hashable | None) -> tuple[_Admission, int]:
        """The manager's plan with as many cached blocks as every group can reuse, and that count."""
        m = self.manager
        plan = m._plan_admission(num_tokens, prompt_token_ids, salt)
        h = len(plan.hits)
        while h:  # each group's condition depends on where computing starts: repeat until all agree
            low = min(g.max_hits(plan.keys, h) for g in self.tables)
            if low == h:
                break
            h = low
        if h < len(plan.hits):
            plan = m._plan_admission(num_tokens, prompt_token_ids, salt, h)
        return plan, h

    def _group_need(self, plan: _Admission, h: int) -> tuple[list[tuple[int, list[int]]], int, int]:
        """Each group's ``(first, cached blocks)``, the new blocks they take, and the cached ones they revive."""
        hits = [g.hit_blocks(plan.keys, h) for g in self.tables]
        nb = blocks_for_tokens(plan.num_tokens, self.manager.block_size)
        new = sum(nb - first - len(blocks) for first, blocks in hits)
        pool = self.manager.pool
        revived = len({b for _, blocks in hits for b in blocks if pool.ref_count(b) == 0})
        return hits, new, revived

    def num_blocks_needed(self, num_tokens: int | None, prompt_token_ids: Sequence[int] | None,
                          salt: Hashable | None, chunk_tokens: int | None = None) -> int:
        """Blocks an admission takes from the pool across every group; with ``chunk_tokens``,
        the most a prefill of the ``num_tokens`` in chunks of that many holds at once (a window
        group then holds its window and two chunks, not every block)."""
        plan, h = self._plan(num_tokens, prompt_token_ids, salt)
        hits, new, revived = self._group_need(plan, h)
        if chunk_tokens is not None:
            bs = self.manager.block_size
            nb = blocks_for_tokens(plan.num_tokens, bs)
            new = sum(min(nb - first - len(blocks), blocks_for_tokens(g.window - 1 + 2 * chunk_tokens, bs) + 1)
                      if g.window is not None else nb - first - len(blocks)
                      for g, (first, blocks) in zip(self.tables, hits))
        return plan.num_new + plan.num_revived + new + revived

    def add_sequence(self, seq_id: SeqId, prompt_token_ids: Sequence[int] | None, salt: Hashable | None,
                     num_tokens: int | None) -> object:
        m = self.manager
        m._check_new(seq_id)
        plan, h = self._plan(num_tokens, prompt_token_ids, salt)
        hits, new, revived = self._group_need(plan, h)
        pool = m.pool
        need = plan.num_new + plan.num_revived + new + revived
        if need > pool.num_available_blocks:
            raise OutOfBlocksError(
                f"sequence {seq_id!r} needs {need} blocks across its {len(self.tables) + 1} layer groups for "
                f"{plan.num_tokens} tokens; {pool.num_available_blocks} available",
                requested=need, available=pool.num_available_blocks)
        held = [b for _, blocks in hits for b in blocks]
        pool.incref(held)  # before anything allocates: eviction must not take them
        try:
            result = m.add_sequence(seq_id, prompt_token_ids, salt, num_tokens=num_tokens, max_cached_blocks=h)
        except BaseException:
            pool.free(held)
            raise
        row, chain = m._seqs.get(seq_id)
        n = m.tables.num_tokens(row)
        nb = blocks_for_tokens(n, m.block_size)
        try:
            fresh = pool.allocate(sum(nb - first - len(blocks) for first, blocks in hits))
        except BaseException:
            m.free_sequence(seq_id)
            pool.free(held)
            raise
        pos = 0
        for g, (first, blocks) in zip(self.tables, hits):
            k = nb - first - len(blocks)
            g.admit(row, first, blocks, fresh[pos:pos + k], n)
            g.register(row, chain.keys)
            pos += k
        return result

    # -------------------------------------------------------------- appends
    def append(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int] | np.ndarray,
               token_ids: Sequence[int] | np.ndarray | None, append: object) -> np.ndarray:
        """Run the manager's ``append(seq_ids, num_tokens, token_ids)`` with every group following."""
        m = self.manager
        seq_ids = indexable(seq_ids)
        rows = m._seqs.rows(seq_ids)
        counts = count_array(num_tokens, len(rows), "append_tokens_batch() num_tokens")
        start = m.tables.num_tokens_of(rows).copy()
        end = start + counts
        adds = [g.blocks_to_add(rows, end) for g in self.tables]
        cows = [g.shared_tails(rows, counts) for g in self.tables]
        total = int(sum(int(a.sum()) for a in adds)) + sum(len(c) for c in cows)
        pool = m.pool
        if total > pool.num_available_blocks:
            raise OutOfBlocksError(f"appending to {len(rows)} sequence(s) needs {total} blocks in the other "
                                   f"layer groups; {pool.num_available_blocks} available",
                                   requested=total, available=pool.num_available_blocks)
        fresh = pool.allocate(total) if total else []  # a decode step mostly needs none
        try:
            pos = 0
            cow_maps: list[dict[int, int]] = []
            pairs: list[tuple[int, int]] = []
            for g, cow in zip(self.tables, cows):
                cmap = {}
                for i in cow:
                    row = int(rows[i])
                    pairs.append((g.block_of(row, int(start[i]) - 1), fresh[pos]))
                    cmap[i] = fresh[pos]
                    pos += 1
                cow_maps.append(cmap)
            if pairs:
                self.copy_blocks(pairs)  # type: ignore[operator]
            slots = append(seq_ids, num_tokens, token_ids)  # type: ignore[operator]
        except OutOfBlocksError as exc:
            pool.free(fresh)
            raise OutOfBlocksError(str(exc), requested=exc.requested + total,
                                   available=exc.available + total) from None
        except BaseException:
            pool.free(fresh)
            raise
        for g, add, cmap in zip(self.tables, adds, cow_maps):
            k = int(add.sum())
            g.extend(rows, end, fresh[pos:pos + k], cmap)
            pos += k
        self._register(seq_ids, rows, end)
        return slots  # type: ignore[no-any-return]

    def _register(self, seq_ids: Sequence[SeqId], rows: np.ndarray, end: np.ndarray) -> None:
        if not self.manager.prefix.enabled:
            return
        full = end // self.manager.block_size
        cand = np.zeros(len(rows), dtype=bool)
        for g in self.tables:
            cand |= full > g._nkeyed[rows]
        for i in np.flatnonzero(cand).tolist():
            keys = self.manager._seqs.state(seq_ids[i]).keys
            for g in self.tables:
                g.register(int(rows[i]), keys)

    # ------------------------------------------------------- fork, free, cut
    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        m = self.manager
        parent = m._seqs.row(parent_id)
        m.fork(parent_id, child_id)
        child = m._seqs.row(child_id)
        for g in self.tables:
            g.fork(parent, child)

    def free(self, seq_id: SeqId) -> None:
        row = self.manager._seqs.row(seq_id)
        for g in self.tables:
            g.free(row)

    def check_truncate(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int] | np.ndarray) -> None:
        """Raise :class:`SequenceError`, before anything changes, if a group cannot go back that far."""
        rows = self.manager._seqs.rows(indexable(seq_ids))
        counts = count_array(num_tokens, len(rows), "truncate() num_tokens")
        for sid, row, n in zip(seq_ids, rows.tolist(), counts.tolist()):
            for g in self.tables:
                why = g.check_truncate(row, n)
                if why is not None:
                    raise SequenceError(f"truncate(): sequence {sid!r} cannot go back to {n} tokens: {why}")

    def truncate(self, seq_ids: Sequence[SeqId]) -> None:
        """Follow the manager's truncation of these sequences."""
        m = self.manager
        for sid in seq_ids:
            row = m._seqs.row(sid)
            n = m.tables.num_tokens(row)
            for g in self.tables:
                g.truncate(row, n)

    # --------------------------------------------------------------- views
    def step_parts(self, seq_ids: Sequence[SeqId], positions: np.ndarray, query_start_loc: np.ndarray,
                   width: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each group's ``(slots, tables)`` for a step over these sequences; first every window
        group releases what the step's first query of each sequence no longer reads."""
        rows = self.manager._seqs.rows(indexable(seq_ids))
        q_lens = np.diff(query_start_loc)
        computing = np.flatnonzero(q_lens)
        if len(computing):
            first = positions[query_start_loc[:-1][computing]]
            for g in self.tables:
                g.release(rows[computing], first)
        tok_rows = rows.repeat(q_lens)
        return [(g.slots_at(tok_rows, positions), g.tables_of(rows, width)) for g in self.tables]

    def cached_copies(self, keys: Sequence[BlockKey]) -> list[int]:
        """The other groups' cached blocks under the group keys of these prefix keys."""
        get = self.manager.prefix._blocks.get
        out = []
        for g in self.tables:
            for k in keys:
                b = get(g.group_key(k))
                if b is not None:
                    out.append(b)
        return out

    # -------------------------------------------------------------- upkeep
    def refs(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for g in self.tables:
            for b, k in g.refs().items():
                out[b] = out.get(b, 0) + k
        return out

    def _relocate(self, moves: list[tuple[int, int]], num_blocks: int) -> None:
        for g in self.tables:
            g.relocate(moves, num_blocks)

    def live_slots(self) -> int:
        return sum(g.live_slots() for g in self.tables)

    def check_invariants(self) -> None:
        m = self.manager
        rows = {row: m.tables.num_tokens(row) for _, row, _ in m._seqs.items()}
        for g in self.tables:
            g.check_invariants(rows)
