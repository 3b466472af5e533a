"""Admitting a sequence: how many blocks it needs, and reserving them with prefix reuse.

:meth:`SequenceAdmission.add_sequence` with a prompt reuses the longest
cached run of the prompt's full blocks, never the block holding its last
token (its logits are needed), takes references on the hits (reviving
evictable ones), allocates the rest, records the token ids and registers the
full blocks it reserved. :meth:`SequenceAdmission.num_blocks_needed` counts
the same blocks without changing anything, so a scheduler asks before it
acts. :class:`SequenceAdmission` is that part of
:class:`~kvforge.core.manager.BlockManager`.
"""
from __future__ import annotations

from typing import Hashable, NamedTuple, Sequence

import numpy as np

from kvforge.core.chains import KeyChain
from kvforge.core.ids import SequenceRows, is_int, token_array
from kvforge.core.pool import BlockPool
from kvforge.core.prefix import BlockKey, PrefixIndex
from kvforge.core.tables import BlockTables, blocks_for_tokens
from kvforge.errors import OutOfBlocksError, SequenceError

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


class SequenceAdmission:
    """``add_sequence`` and its sizing (a mixin of :class:`~kvforge.core.manager.BlockManager`)."""

    block_size: int
    pool: BlockPool
    prefix: PrefixIndex
    tables: BlockTables
    _seqs: SequenceRows[KeyChain]

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

    def add_sequence(self, seq_id: SeqId, prompt_token_ids: Sequence[int] | None = None,
                     salt: Hashable | None = None, *, num_tokens: int | None = None) -> AddSequenceResult:
        """Start a sequence; with a prompt, reuse its longest cached prefix.

        Reserves slots for the first ``num_tokens`` prompt tokens (default:
        all; fewer for a chunked prefill, the rest follow through
        ``append_tokens``). Raises :class:`OutOfBlocksError` when the
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
        chain = KeyChain(salt, keys[:known])
        self._seqs.add(seq_id, row, chain)
        self.prefix.register_many(ids[len(hits):known], keys[len(hits):known])
        chain.register_full_blocks(self.prefix, self.tables, row)
        return AddSequenceResult(seq_id, cached, slots, ids)
