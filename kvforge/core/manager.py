"""Sequence block tables over a block pool: the bookkeeping an engine talks to.

:class:`BlockManager` composes a :class:`~kvforge.core.pool.BlockPool`, one block
table per sequence and a prefix index. It never touches device memory: when
an operation needs data moved (copy-on-write after a fork) it queues the
``(src, dst)`` block pair in :attr:`BlockManager.pending_copies`, and the
storage layer applies the queue before the new slots are written.

Per-sequence state lives in numpy arrays indexed by a *row* (created once and
grown by doubling), so the batched decode-step calls
(:meth:`~BlockManager.append_tokens_batch`, :meth:`~BlockManager.block_table_array`)
are a handful of vectorised operations for the whole batch.

Slots: token ``pos`` of a sequence lives in block ``table[pos // block_size]``
at offset ``pos % block_size``; its slot id is ``block_id * block_size + offset``.

Prefix caching: a full block whose token ids are known is registered in the
prefix index when it is reserved (the caller computes it in the same step,
before anything reads it). :meth:`~BlockManager.add_sequence` with a prompt
reuses the longest cached run of full blocks, never the block holding the
prompt's last token (its logits are needed).

Not thread-safe by itself (one scheduler thread drives it); the pool under it is.
"""
from __future__ import annotations

import math
import operator
from array import array
from collections import deque
from typing import Hashable, NamedTuple, Sequence

import numpy as np

from kvforge.core.compaction import CompactionPlan, plan_compaction
from kvforge.errors import OutOfBlocksError, SequenceError
from kvforge.core.pool import BlockPool
from kvforge.core.prefix import BlockKey, NullPrefixIndex, PrefixIndex

__all__ = ["AddSequenceResult", "BlockManager", "SequenceBlockTable"]

SeqId = Hashable


class AddSequenceResult(NamedTuple):
    """What :meth:`BlockManager.add_sequence` did.

    ``num_cached_tokens`` prompt tokens were found in the prefix cache; their
    keys/values need no computing. ``slots`` are the slot ids of the tokens
    ``num_cached_tokens .. num_cached_tokens + len(slots) - 1`` (int64).
    ``block_ids`` is the sequence's block table after the call.
    """

    seq_id: SeqId
    num_cached_tokens: int
    slots: np.ndarray
    block_ids: list[int]


class _Seq:
    """Python-side state of one sequence (the numbers live in the manager's arrays)."""

    __slots__ = ("row", "token_ids", "keys", "salt", "hashable")

    def __init__(self, row: int, token_ids: array[int] | None, salt: Hashable | None) -> None:
        self.row = row
        self.token_ids = token_ids      # every known token id (reserved or pending), int64
        self.keys: list[BlockKey] = []  # keys of the sequence's leading full blocks
        self.salt = salt
        self.hashable = token_ids is not None


class BlockManager:
    """Block tables of many sequences over one pool, with prefix reuse and fork.

    ``seq_id`` may be any hashable. Every failing call raises (a
    :class:`~kvforge.errors.KVForgeError`) and changes nothing.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 capacity: int | None = None, pool: BlockPool | None = None) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
            raise SequenceError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = int(block_size)
        self.pool = pool if pool is not None else BlockPool(num_blocks, capacity)
        index_cls = PrefixIndex if enable_prefix_caching else NullPrefixIndex
        self.prefix: PrefixIndex = index_cls(self.pool, self.block_size)
        self._seqs: dict[SeqId, _Seq] = {}
        self._free_rows: list[int] = []
        rows, width = 64, 16
        self._tables = np.full((rows, width), -1, dtype=np.int32)
        self._nblk = np.zeros(rows, dtype=np.int64)
        self._ntok = np.zeros(rows, dtype=np.int64)
        self._npending = np.zeros(rows, dtype=np.int64)  # prompt tokens known but not reserved
        self._shared_tail = np.zeros(rows, dtype=bool)   # last block partial and possibly shared
        self._next_row = 0
        self.pending_copies: list[tuple[int, int]] = []
        self.num_cow_copies = 0
        self._batch_key: tuple | None = None  # memo of _batch()
        self._batch_seqs: list[_Seq] = []
        self._batch_rows = np.empty(0, dtype=np.int64)
        self._batch_distinct = True
        self._batch_arrays: list[array[int]] | None = None  # token-id arrays of that batch
        self._sink: array[int] = array("q")

    # ------------------------------------------------------------ capacity
    def _new_row(self) -> int:
        if self._free_rows:
            return self._free_rows.pop()
        row = self._next_row
        if row == len(self._nblk):
            n = 2 * row
            self._tables = np.concatenate([self._tables, np.full_like(self._tables, -1)])
            self._nblk = np.concatenate([self._nblk, np.zeros(row, np.int64)])
            self._ntok = np.concatenate([self._ntok, np.zeros(row, np.int64)])
            self._npending = np.concatenate([self._npending, np.zeros(row, np.int64)])
            self._shared_tail = np.concatenate([self._shared_tail, np.zeros(row, bool)])
            assert len(self._nblk) == n
        self._next_row += 1
        return row

    def _ensure_width(self, width: int) -> None:
        cur = self._tables.shape[1]
        if width > cur:
            new = max(width, 2 * cur)
            grown = np.full((self._tables.shape[0], new), -1, dtype=np.int32)
            grown[:, :cur] = self._tables
            self._tables = grown

    def _seq(self, seq_id: SeqId) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise SequenceError(f"unknown sequence {seq_id!r}") from None
        except TypeError:
            raise SequenceError(f"sequence id {seq_id!r} is not hashable") from None

    def _batch(self, seq_ids: Sequence[SeqId]) -> tuple[list[_Seq], np.ndarray, bool]:
        """States, rows (int64) and whether the ids are distinct, for a batch.

        The last batch is remembered: an engine asks for the same batch several
        times a step (append, block tables, context lengths), and a sequence's
        row never changes while it lives (the memo is dropped when one is freed).
        """
        key = tuple(seq_ids)
        if key == self._batch_key:
            return self._batch_seqs, self._batch_rows, self._batch_distinct
        seqs = self._lookup(key)
        row_list = [s.row for s in seqs]
        rows = np.array(row_list, dtype=np.int64)
        distinct = len(set(row_list)) == len(row_list)
        self._batch_key, self._batch_seqs, self._batch_rows, self._batch_distinct = key, seqs, rows, distinct
        self._batch_arrays = None
        return seqs, rows, distinct

    def _lookup(self, seq_ids: Sequence[SeqId]) -> list[_Seq]:
        """The states of ``seq_ids`` (a SequenceError names the first unknown id)."""
        seqs = self._seqs
        try:
            return [seqs[s] for s in seq_ids]
        except (KeyError, TypeError):
            return [self._seq(s) for s in seq_ids]

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------- queries
    def __contains__(self, seq_id: SeqId) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def seq_ids(self) -> list[SeqId]:
        """Ids of the sequences present, in insertion order."""
        return list(self._seqs)

    def num_tokens(self, seq_id: SeqId) -> int:
        """Tokens with a reserved slot in the sequence."""
        return int(self._ntok[self._seq(seq_id).row])

    seq_len = num_tokens

    def num_pending_tokens(self, seq_id: SeqId) -> int:
        """Prompt tokens given to :meth:`add_sequence` that have no slot yet."""
        return int(self._npending[self._seq(seq_id).row])

    def token_ids(self, seq_id: SeqId) -> list[int] | None:
        """The sequence's known token ids (None when some were appended without ids)."""
        s = self._seq(seq_id)
        return list(s.token_ids) if s.hashable and s.token_ids is not None else None

    def block_table(self, seq_id: SeqId) -> list[int]:
        """The sequence's block ids in position order."""
        row = self._seq(seq_id).row
        return self._tables[row, : self._nblk[row]].tolist()

    def get_block_for_position(self, seq_id: SeqId, pos: int) -> tuple[int, int]:
        """``(block_id, offset)`` holding token ``pos`` of the sequence."""
        row = self._seq(seq_id).row
        n = int(self._ntok[row])
        if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or not 0 <= pos < n:
            raise SequenceError(f"position {pos!r} is outside sequence {seq_id!r} of {n} tokens")
        return int(self._tables[row, pos // self.block_size]), int(pos % self.block_size)

    def slot_of(self, seq_id: SeqId, pos: int) -> int:
        """Slot id of token ``pos`` of the sequence."""
        block, off = self.get_block_for_position(seq_id, pos)
        return block * self.block_size + off

    def num_blocks_needed(self, num_tokens: int, prompt_token_ids: Sequence[int] | None = None,
                          salt: Hashable | None = None) -> int:
        """Blocks :meth:`add_sequence` would take from the pool for a new sequence
        (cached prefix blocks that are held by others cost nothing)."""
        need = self._blocks_for(num_tokens)
        if prompt_token_ids is not None and self.prefix.enabled:
            max_hit = (len(prompt_token_ids) - 1) // self.block_size
            keys = self.prefix.block_keys(prompt_token_ids[: max_hit * self.block_size], salt)
            hits = [self.prefix._blocks.get(k) for k in keys]
            n_hit = next((i for i, b in enumerate(hits) if b is None), len(hits))
            revived = sum(1 for b in hits[:n_hit] if self.pool.ref_count(b) == 0)
            need = need - n_hit + revived
        return need

    def can_add_sequence(self, num_tokens: int, prompt_token_ids: Sequence[int] | None = None,
                         salt: Hashable | None = None) -> bool:
        """Whether :meth:`add_sequence` of that many tokens would find the blocks."""
        return self.num_blocks_needed(num_tokens, prompt_token_ids, salt) <= self.pool.num_available_blocks

    # ------------------------------------------------------------ mutation
    def add_sequence(self, seq_id: SeqId, prompt_token_ids: Sequence[int] | None = None,
                     salt: Hashable | None = None, *, num_tokens: int | None = None) -> AddSequenceResult:
        """Start a sequence; with a prompt, reuse its longest cached prefix.

        Reserves slots for the first ``num_tokens`` prompt tokens (default:
        all; fewer for a chunked prefill, the rest follow through
        :meth:`append_tokens`). Raises :class:`OutOfBlocksError` when the
        blocks do not fit, :class:`SequenceError` on a duplicate id.
        """
        try:
            if seq_id in self._seqs:
                raise SequenceError(f"sequence {seq_id!r} already exists")
        except TypeError:
            raise SequenceError(f"sequence id {seq_id!r} is not hashable") from None
        bs = self.block_size
        tokens: array[int] | None = None
        hits: list[int] = []
        keys: list[BlockKey] = []
        if num_tokens is not None and (isinstance(num_tokens, bool) or
                                       not isinstance(num_tokens, (int, np.integer)) or num_tokens < 0):
            raise SequenceError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
        if prompt_token_ids is not None:
            tokens = _int_array(prompt_token_ids)
            if num_tokens is None:
                num_tokens = len(tokens)
            if not 0 <= num_tokens <= len(tokens):
                raise SequenceError(f"num_tokens={num_tokens} must lie in [0, {len(tokens)}] "
                                    f"for a prompt of {len(tokens)} tokens")
            max_hit = max(0, (len(tokens) - 1) // bs)
            keys = self.prefix.block_keys(tokens[: max_hit * bs], salt)
            hits = self.prefix.lookup(keys, len(tokens), record=False)
        elif num_tokens is None:
            num_tokens = 0
        num_tokens = int(num_tokens)
        num_cached = len(hits) * bs
        reserve = max(num_tokens, num_cached)
        need = self._blocks_for(reserve) - len(hits)
        revived = sum(1 for b in hits if self.pool.ref_count(b) == 0)
        if need + revived > self.pool.num_available_blocks:
            raise OutOfBlocksError(
                f"sequence {seq_id!r} needs {need} new blocks (+{revived} cached to revive) for "
                f"{reserve} tokens; {self.pool.num_available_blocks} available",
                requested=need + revived, available=self.pool.num_available_blocks)
        if tokens is not None:  # counted only now: a refused request queried nothing
            self.prefix.record_query(len(tokens), len(hits))
        self.pool.incref(hits)
        new_ids = self.pool.allocate(need)
        row = self._new_row()
        seq = _Seq(row, tokens, salt)
        # the lookup's keys of blocks that are now reserved and full need no hashing again
        known = min(reserve // bs, len(keys))
        seq.keys = keys[:known]
        self._seqs[seq_id] = seq
        ids = hits + new_ids
        self._ensure_width(len(ids))
        self._tables[row, :] = -1
        self._tables[row, : len(ids)] = ids
        self._nblk[row] = len(ids)
        self._ntok[row] = reserve
        self._npending[row] = (len(tokens) - reserve) if tokens is not None else 0
        self._shared_tail[row] = False
        for i in range(len(hits), known):
            self.prefix.register(ids[i], keys[i])
        self._register_full_blocks(seq, reserve)
        slots = self._slots(row, num_cached, reserve)
        return AddSequenceResult(seq_id, num_cached, slots, ids)

    def _slots(self, row: int, start: int, stop: int) -> np.ndarray:
        pos = np.arange(start, stop, dtype=np.int64)
        return self._tables[row, pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size

    def _register_full_blocks(self, seq: _Seq, num_tokens: int) -> None:
        if not seq.hashable or not self.prefix.enabled:
            return
        bs = self.block_size
        full = num_tokens // bs
        done = len(seq.keys)
        if full <= done:
            return
        tokens = seq.token_ids
        assert tokens is not None
        keys = seq.keys
        parent = keys[-1] if keys else None
        if full - done == 1:  # a decode step fills one block
            key = self.prefix.next_key(parent, tokens[done * bs: full * bs], seq.salt)
            keys.append(key)
            self.prefix.register(int(self._tables[seq.row, done]), key)
            return
        new_keys = self.prefix.block_keys(tokens[done * bs: full * bs], seq.salt, parent)
        register = self.prefix.register
        for block_id, key in zip(self._tables[seq.row, done:full].tolist(), new_keys):
            register(block_id, key)
        keys.extend(new_keys)

    def append_tokens(self, seq_id: SeqId, n: int, token_ids: Sequence[int] | None = None) -> np.ndarray:
        """Reserve slots for ``n`` more tokens; return their slot ids (int64), all or nothing.

        Pending prompt tokens (see :meth:`add_sequence`) are taken first.
        ``token_ids`` (length ``n``) lets filled blocks enter the prefix cache.
        Appending into a shared, partially filled last block first gives the
        sequence its own copy (copy-on-write, queued in :attr:`pending_copies`).
        """
        seq = self._seq(seq_id)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise SequenceError(f"append_tokens() needs a token count >= 0, got {n!r}")
        if token_ids is not None and len(token_ids) != n:
            raise SequenceError(f"append_tokens({seq_id!r}, {n}) got {len(token_ids)} token ids")
        ids_in = _int_array(token_ids) if token_ids is not None and seq.token_ids is not None else None
        row = seq.row
        old = int(self._ntok[row])
        if n == 0:
            return np.empty(0, dtype=np.int64)
        pending = int(self._npending[row])
        if token_ids is not None and pending:
            raise SequenceError(f"sequence {seq_id!r} still has {pending} prompt tokens pending; "
                                f"append them (without token ids) first")
        new = old + n
        cow = bool(self._shared_tail[row]) and old % self.block_size != 0 and \
            self.pool.ref_count(int(self._tables[row, self._nblk[row] - 1])) > 1
        need = self._blocks_for(new) - int(self._nblk[row]) + int(cow)
        if need > self.pool.num_available_blocks:
            raise OutOfBlocksError(f"sequence {seq_id!r} needs {need} more blocks for {n} tokens; "
                                   f"{self.pool.num_available_blocks} available",
                                   requested=need, available=self.pool.num_available_blocks)
        if cow:
            self._copy_on_write(row)
            need -= 1
        self._shared_tail[row] = False
        if need:
            ids = self.pool.allocate(need)
            nb = int(self._nblk[row])
            self._ensure_width(nb + need)
            self._tables[row, nb: nb + need] = ids
            self._nblk[row] = nb + need
        self._ntok[row] = new
        if pending:
            self._npending[row] = max(0, pending - n)
            if n > pending:
                seq.hashable = False  # tokens past the prompt came without ids
        elif token_ids is not None:
            if seq.token_ids is not None:
                seq.token_ids.extend(ids_in)  # type: ignore[arg-type]
        else:
            seq.hashable = False
        self._register_full_blocks(seq, new)
        return self._slots(row, old, new)

    def append_token(self, seq_id: SeqId, token_id: int | None = None) -> int:
        """Reserve one slot; return its slot id."""
        return int(self.append_tokens(seq_id, 1, None if token_id is None else [token_id])[0])

    def _copy_on_write(self, row: int) -> None:
        last = int(self._nblk[row]) - 1
        old_block = int(self._tables[row, last])
        (new_block,) = self.pool.allocate(1)
        self.pool.free([old_block])
        self._tables[row, last] = new_block
        self.pending_copies.append((old_block, new_block))
        self.num_cow_copies += 1

    def append_tokens_batch(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int] | np.ndarray = 1,
                            token_ids: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Reserve ``num_tokens`` more slots for each sequence; return the slot mapping.

        Vectorised over the batch, all or nothing. The result (int64) holds each
        sequence's new slots in order, sequence after sequence. ``token_ids``
        (one per sequence, only with ``num_tokens == 1``) feeds the prefix cache.
        """
        seqs, rows, distinct = self._batch(seq_ids)
        if not distinct:
            raise SequenceError("append_tokens_batch() got the same sequence twice")
        count = len(rows)
        if type(num_tokens) is int:
            n = np.asarray(num_tokens, dtype=np.int64)
        else:
            raw = np.asarray(num_tokens)
            if raw.dtype == bool or not (np.issubdtype(raw.dtype, np.integer) or raw.size == 0):
                raise SequenceError(f"num_tokens must be integers, got {num_tokens!r}")
            n = raw.astype(np.int64)
        # one token each (a decode step) takes the fast path: n stays None
        one = n.ndim == 0 and int(n) == 1
        if one:
            n = None
        else:
            if n.ndim == 0:
                n = np.full(count, int(n), dtype=np.int64)
            if n.shape != rows.shape or (count and n.min() < 0):
                raise SequenceError(f"num_tokens must be >= 0, one per sequence ({count}), got {num_tokens!r}")
        if token_ids is not None:
            if len(token_ids) != count or (count and not one and (n.max() != 1 or n.min() != 1)):
                raise SequenceError("token_ids needs num_tokens == 1 and one id per sequence")
            if self._npending[rows].any():
                sid = seq_ids[int(np.flatnonzero(self._npending[rows])[0])]
                raise SequenceError(f"sequence {sid!r} still has prompt tokens pending; "
                                    f"append them (without token ids) first")
        bs = self.block_size
        old = self._ntok[rows]
        if one:
            new = old + 1
            off = old % bs
            grow_rows = rows[off == 0]  # each opens one block
            need = None
            total = len(grow_rows)
        else:
            new = old + n
            need = (new + bs - 1) // bs - self._nblk[rows]
            total = int(need.sum())
        cow_rows: list[int] = []
        if self._shared_tail[rows].any():
            # as sequential appends would: every sharer in the batch copies but the
            # last one left holding the block (refs counted down as copies are planned)
            refs_left: dict[int, int] = {}
            ks = [1] * count if one else n.tolist()
            for r, o, k in zip(rows.tolist(), old.tolist(), ks):
                if k and self._shared_tail[r] and o % bs:
                    tail = int(self._tables[r, self._nblk[r] - 1])
                    left = refs_left.get(tail)
                    if left is None:
                        left = self.pool.ref_count(tail)
                    if left > 1:  # flags are cleared below, once the batch is sure to succeed
                        cow_rows.append(r)
                        refs_left[tail] = left - 1
        if total + len(cow_rows) > self.pool.num_available_blocks:
            raise OutOfBlocksError(f"the batch needs {total + len(cow_rows)} more blocks; "
                                   f"{self.pool.num_available_blocks} available",
                                   requested=total + len(cow_rows), available=self.pool.num_available_blocks)
        for r in cow_rows:
            self._copy_on_write(r)
        # a row that gains no token keeps its flag: its tail may still be shared
        self._shared_tail[rows if one or not count or n.min() > 0 else rows[n > 0]] = False
        if total:
            ids = self.pool.allocate(total)
            if one:
                start = self._nblk[grow_rows]
                self._ensure_width(int(start.max()) + 1)
                self._tables[grow_rows, start] = ids
                self._nblk[grow_rows] = start + 1
            else:
                grow = need > 0
                g_rows, g_need = rows[grow], need[grow]
                start = self._nblk[g_rows]
                self._ensure_width(int((start + g_need).max()))
                rep_rows = np.repeat(g_rows, g_need)
                offsets = np.arange(total) - np.repeat(np.cumsum(g_need) - g_need, g_need)
                self._tables[rep_rows, np.repeat(start, g_need) + offsets] = ids
                self._nblk[g_rows] = start + g_need
        self._ntok[rows] = new
        pend = self._npending[rows]
        has_pend = bool(pend.any())
        if has_pend:
            self._npending[rows] = np.maximum(0, pend - (1 if one else n))
        if token_ids is not None or has_pend or self.prefix.enabled:
            self._batch_tokens(seqs, old, new, pend if has_pend else None, token_ids)
        else:  # tokens without ids: those sequences no longer know all their ids
            for seq, k in zip(seqs, [1] * count if one else n.tolist()):
                if k:
                    seq.hashable = False
        if one:
            return self._tables[rows, old // bs].astype(np.int64) * bs + off
        tok_rows = np.repeat(rows, n)
        pos = np.repeat(old, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        return self._tables[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs

    def _batch_tokens(self, seqs: list[_Seq], old: np.ndarray, new: np.ndarray, pend: np.ndarray | None,
                      token_ids: Sequence[int] | np.ndarray | None) -> None:
        """Follow the token ids of a batched append; register the blocks it filled."""
        ids = None if token_ids is None else np.asarray(token_ids, dtype=np.int64).tolist()
        if pend is None:
            if ids is not None:  # one new token each (checked by the caller)
                # the batch's id arrays (memoised with the batch); sequences without
                # ids append to a sink. An unhashable sequence's ids are never read.
                arrays = self._batch_arrays
                if arrays is None or len(arrays) != len(seqs):
                    sink = self._sink
                    arrays = self._batch_arrays = [s.token_ids if s.token_ids is not None else sink
                                                   for s in seqs]
                deque(map(array.append, arrays, ids), maxlen=0)
                if self._sink:
                    del self._sink[:]
            else:
                for seq, k in zip(seqs, (new - old).tolist()):
                    if k:
                        seq.hashable = False
        else:
            for i, (seq, k, p) in enumerate(zip(seqs, (new - old).tolist(), pend.tolist())):
                if not seq.hashable:
                    continue
                if p:  # pending prompt tokens come first; their ids are known
                    if k > p:
                        seq.hashable = False
                elif ids is not None:
                    seq.token_ids.append(ids[i])  # type: ignore[union-attr]
                elif k:
                    seq.hashable = False
        if self.prefix.enabled:
            bs = self.block_size
            for i in np.flatnonzero(new // bs > old // bs).tolist():
                seq = seqs[i]
                if seq.hashable:
                    self._register_full_blocks(seq, int(new[i]))

    def fork(self, parent_id: SeqId, child_id: SeqId) -> None:
        """Start ``child_id`` sharing every block of ``parent_id`` (no data copied).

        The shared blocks gain one reference each; the first append into a
        shared partially filled last block copies that block (copy-on-write).
        """
        parent = self._seq(parent_id)
        try:
            if child_id in self._seqs:
                raise SequenceError(f"sequence {child_id!r} already exists")
        except TypeError:
            raise SequenceError(f"sequence id {child_id!r} is not hashable") from None
        prow = parent.row
        nb = int(self._nblk[prow])
        blocks = self._tables[prow, :nb].tolist()
        self.pool.incref(blocks)
        row = self._new_row()
        child = _Seq(row, parent.token_ids[:] if parent.token_ids is not None else None, parent.salt)
        child.keys = list(parent.keys)
        child.hashable = parent.hashable
        self._seqs[child_id] = child
        self._tables[row, :] = self._tables[prow, :]
        self._nblk[row] = nb
        self._ntok[row] = self._ntok[prow]
        self._npending[row] = self._npending[prow]
        partial = int(self._ntok[prow]) % self.block_size != 0
        self._shared_tail[row] = partial
        self._shared_tail[prow] = partial or bool(self._shared_tail[prow])

    def free_sequence(self, seq_id: SeqId) -> None:
        """Drop the sequence and one reference from each of its blocks."""
        seq = self._seq(seq_id)
        row = seq.row
        blocks = self._tables[row, : self._nblk[row]].tolist()
        self.pool.free(blocks[::-1])  # last block first, so eviction takes the tail first
        del self._seqs[seq_id]
        self._batch_key = None  # its row will be reused
        self._tables[row, : len(blocks)] = -1
        self._nblk[row] = 0
        self._ntok[row] = 0
        self._npending[row] = 0
        self._shared_tail[row] = False
        self._free_rows.append(row)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """The queued ``(src, dst)`` copy-on-write pairs, emptied."""
        pairs, self.pending_copies = self.pending_copies, []
        return pairs

    # ------------------------------------------------------- batched views
    def block_table_array(self, seq_ids: Sequence[SeqId], width: int | None = None) -> np.ndarray:
        """``[len(seq_ids), width]`` int32 block tables, padded with -1.

        ``width`` defaults to the longest table among the sequences.
        """
        rows = self._batch(seq_ids)[1]
        w = int(self._nblk[rows].max()) if len(rows) and width is None else (width or 0)
        if w > self._tables.shape[1]:
            self._ensure_width(w)
        return self._tables[rows, :w]

    def context_lens(self, seq_ids: Sequence[SeqId]) -> np.ndarray:
        """Reserved tokens of each sequence (int32)."""
        rows = self._batch(seq_ids)[1]
        return self._ntok[rows].astype(np.int32)

    def slot_mapping(self, seq_ids: Sequence[SeqId], num_last_tokens: int | Sequence[int] = 1) -> np.ndarray:
        """Slots of the last ``num_last_tokens`` tokens of each sequence, concatenated (int64)."""
        rows = self._batch(seq_ids)[1]
        n = np.asarray(num_last_tokens, dtype=np.int64)
        if n.ndim == 0:
            n = np.full(len(rows), int(n), dtype=np.int64)
        ntok = self._ntok[rows]
        if n.shape != rows.shape or (len(n) and (n.min() < 0 or (n > ntok).any())):
            raise SequenceError(f"num_last_tokens {num_last_tokens!r} exceeds a sequence's length or "
                                f"does not match {len(rows)} sequences")
        bs = self.block_size
        tok_rows = np.repeat(rows, n)
        pos = np.repeat(ntok - n, n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        return self._tables[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs

    # ------------------------------------------------------------ metrics
    def num_live_tokens(self) -> int:
        """Tokens with a reserved slot, summed over sequences (shared blocks counted once
        per sequence)."""
        return int(self._ntok[[s.row for s in self._seqs.values()]].sum()) if self._seqs else 0

    def internal_fragmentation(self) -> float:
        """Reserved token slots in allocated blocks that hold no token, over all reserved slots.

        Counts every distinct allocated block once; a token slot is used when
        any sequence holding the block has a token there."""
        if not self._seqs:
            return 0.0
        used: dict[int, int] = {}
        bs = self.block_size
        for s in self._seqs.values():
            nb, nt = int(self._nblk[s.row]), int(self._ntok[s.row])
            if nb == 0:
                continue
            tail = nt - (nb - 1) * bs
            for b in self._tables[s.row, : nb - 1].tolist():
                used[b] = bs
            last = int(self._tables[s.row, nb - 1])
            used[last] = max(used.get(last, 0), tail)
        reserved = len(used) * bs
        return 1.0 - sum(used.values()) / reserved if reserved else 0.0

    def live_token_slots(self) -> int:
        """Distinct token slots holding a token (shared blocks counted once)."""
        return int(round((1 - self.internal_fragmentation()) * self._distinct_blocks() * self.block_size))

    def _distinct_blocks(self) -> int:
        seen: set[int] = set()
        for s in self._seqs.values():
            seen.update(self._tables[s.row, : self._nblk[s.row]].tolist())
        return len(seen)

    # ---------------------------------------------------------- compaction
    def held_blocks(self) -> list[int]:
        """Ids that hold data now: referenced or cached (evictable)."""
        pool = self.pool
        return [b for b in range(pool.capacity) if pool._ref[b] or pool._cached[b]]

    def live_blocks(self) -> list[int]:
        """Ids referenced by at least one sequence."""
        ref = self.pool._ref
        return [b for b in range(self.pool.capacity) if ref[b]]

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
        remap = np.arange(self.pool.num_blocks, dtype=np.int32)
        for src, dst in moves:
            remap[src] = dst
        live = self._tables >= 0
        self._tables[live] = remap[self._tables[live]]
        self.pending_copies = [(int(remap[a]), int(remap[b])) for a, b in self.pending_copies]
        self.prefix.relocate(dict(moves))

    def check_invariants(self) -> None:
        """Assert consistency of the tables, the pool and the prefix index."""
        self.pool.check_invariants()
        self.prefix.check_invariants()
        refs: dict[int, int] = {}
        bs = self.block_size
        for sid, s in self._seqs.items():
            nb, nt = int(self._nblk[s.row]), int(self._ntok[s.row])
            assert nb == -(-nt // bs), f"sequence {sid!r}: {nb} blocks for {nt} tokens"
            row = self._tables[s.row, :nb]
            assert (row >= 0).all() and (row < self.pool.capacity).all(), f"sequence {sid!r}: bad block id"
            for b in row.tolist():
                refs[b] = refs.get(b, 0) + 1
            assert s.token_ids is not None or not s.hashable, f"sequence {sid!r}: hashable without ids"
            if s.token_ids is not None and s.hashable:
                assert len(s.token_ids) == nt + int(self._npending[s.row])
            assert len(s.keys) <= nt // bs or not s.hashable
        for b, k in refs.items():
            assert self.pool.ref_count(b) == k, f"block {b}: ref {self.pool.ref_count(b)} != {k} table entries"
        assert self.pool.num_allocated_blocks == len(refs), "held blocks not in any table"


class SequenceBlockTable(NamedTuple):
    """One sequence's table: its block ids and token count."""

    seq_id: SeqId
    block_ids: list[int]
    num_tokens: int


def _int_array(token_ids: Sequence[int] | np.ndarray) -> array[int]:
    """Token ids as an int64 ``array`` (compact, and hashed without conversion).

    Raises :class:`SequenceError` for anything but a flat sequence of integers."""
    if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__"):
        raise SequenceError(f"token ids must be a sequence of integers, got {type(token_ids).__name__}")
    if isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1 or not np.issubdtype(token_ids.dtype, np.integer):
            raise SequenceError(f"token ids must be a 1-D integer array, got {token_ids.dtype} {token_ids.shape}")
        out = array("q")
        out.frombytes(np.ascontiguousarray(token_ids, dtype=np.int64).tobytes())
        return out
    try:
        return array("q", token_ids)
    except (TypeError, OverflowError):  # numpy ints or 0-d tensors: convert one by one, exactly
        try:
            return array("q", [operator.index(t) for t in token_ids])
        except (TypeError, OverflowError):
            bad = next((t for t in token_ids if not _is_int(t)), None)
            raise SequenceError(f"token ids must be integers, got {bad!r}") from None


def _is_int(t: object) -> bool:
    try:
        operator.index(t)
        return True
    except TypeError:
        return False


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return math.ceil(num_tokens / block_size)


