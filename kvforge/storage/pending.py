"""Slots before token ids, and taking tokens back, as a :class:`~kvforge.storage.KVCache` shows them.

:class:`PendingMethods` is that part of the cache: thin calls into the
bookkeeping (:mod:`kvforge.core.reservations`, which states the semantics).
A reservation allocates like an append (the pool grows by chunks when the
config allows); a commit and a truncation allocate nothing and move no data
(a truncation into a block others share leaves the copy to the next append,
which makes it before anything is written).

*Uncommitted* tokens are not the cache's *pending* tokens: those are prompt
tokens whose ids are known and whose slots are not reserved yet (a chunked
prefill, :meth:`~kvforge.storage.KVCache.num_pending_tokens`); these have
slots and wait for their ids. A step over uncommitted tokens has no input ids
in the cache: pass ``prepare_step(..., input_ids=...)`` (e.g. the ids the last
step sampled, still on the device).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

import numpy as np

from kvforge.errors import KVForgeError

if TYPE_CHECKING:
    from kvforge.core.manager import BlockManager
    from kvforge.storage.layer_groups import LayerGroups

__all__ = ["PendingMethods"]

SeqId = Hashable


class PendingMethods:
    """``reserve_tokens_batch`` / ``commit_token_ids`` / ``truncate`` / ``truncate_batch`` of a
    :class:`~kvforge.storage.KVCache` (a mixin)."""

    manager: BlockManager
    groups: LayerGroups | None
    _growing: Callable[..., Any]

    def _refuse_groups(self, what: str) -> None:
        if self.groups is not None:
            raise KVForgeError(f"{what}: slots reserved before their ids are not built for a cache whose layers "
                               f"are split into groups (layer_windows); append with the ids instead")

    def reserve_tokens_batch(self, seq_ids: Sequence[SeqId],
                             num_tokens: int | Sequence[int] | np.ndarray = 1) -> np.ndarray:
        """Slot mapping (int64) for ``num_tokens`` new tokens of each sequence (an int: the
        same for all) whose ids are not known yet, sequence after sequence, as
        :meth:`append_tokens_batch` gives it; the ids follow through
        :meth:`commit_token_ids`. All or nothing; see
        :meth:`kvforge.core.BlockManager.reserve_tokens_batch`."""
        self._refuse_groups("reserve_tokens_batch()")
        return self._growing(self.manager.reserve_tokens_batch, seq_ids, num_tokens)

    def commit_token_ids(self, seq_ids: Sequence[SeqId], token_ids: Sequence[int] | np.ndarray,
                         num_tokens: int | Sequence[int] | np.ndarray = 1) -> None:
        """The ids of each sequence's oldest ``num_tokens`` uncommitted tokens (one each by
        default), sequence after sequence; blocks that fill are registered for prefix
        reuse now. All or nothing; see :meth:`kvforge.core.BlockManager.commit_token_ids`."""
        self._refuse_groups("commit_token_ids()")
        self.manager.commit_token_ids(seq_ids, token_ids, num_tokens)

    def truncate(self, seq_id: SeqId, num_tokens: int) -> None:
        """Take a sequence back to its first ``num_tokens`` tokens (rejected draft tokens,
        uncommitted ones too): whole blocks past the end are released, a block others
        share is left to them. All or nothing; see :meth:`kvforge.core.BlockManager.truncate`.
        A sliding-window layer group cannot go back before the blocks it released."""
        if self.groups is not None:
            self.groups.check_truncate([seq_id], num_tokens)
        self.manager.truncate(seq_id, num_tokens)
        if self.groups is not None:
            self.groups.truncate([seq_id])

    def truncate_batch(self, seq_ids: Sequence[SeqId], num_tokens: int | Sequence[int] | np.ndarray) -> None:
        """:meth:`truncate` of many sequences in one vectorised call (sequence ``i`` keeps its
        first ``num_tokens[i]``; an int: the same for all). All or nothing."""
        if self.groups is not None:
            self.groups.check_truncate(seq_ids, num_tokens)
        self.manager.truncate_batch(seq_ids, num_tokens)
        if self.groups is not None:
            self.groups.truncate(seq_ids)

    def num_uncommitted_tokens(self, seq_id: SeqId) -> int:
        """The sequence's last tokens whose slots are reserved and whose ids are not committed yet."""
        return self.manager.num_uncommitted_tokens(seq_id)
