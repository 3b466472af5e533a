"""A sequence's chain of prefix keys.

Key ``i`` of a chain names block ``i`` of the sequence and every token before
it (:mod:`~kvforge.core.prefix`), so the chain grows by one key each time a
block of the sequence fills with known token ids, and a fork copies it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Hashable

from kvforge.core.prefix import BlockKey

if TYPE_CHECKING:
    from kvforge.core.prefix import PrefixIndex
    from kvforge.core.tables import BlockTables

__all__ = ["KeyChain"]


class KeyChain:
    """A sequence's salt and the keys of its leading full blocks."""

    __slots__ = ("salt", "keys")

    def __init__(self, salt: Hashable | None, keys: list[BlockKey]) -> None:
        self.salt, self.keys = salt, keys

    def fork(self) -> KeyChain:
        """A copy for a forked sequence (the keys list is not shared)."""
        return KeyChain(self.salt, list(self.keys))

    def register_full_blocks(self, prefix: PrefixIndex, tables: BlockTables, row: int) -> None:
        """Key and register the ``row``'s full blocks of known ids (those before its uncommitted
        tokens count: :meth:`~kvforge.core.uncommitted.UncommittedRows.keyable_tokens`) that
        have no key in the chain yet."""
        done, full = len(self.keys), tables.keyable_tokens(row) // tables.block_size
        if full > done and prefix.enabled:
            blocks = tables.blocks(row, done, full)
            prefix._extend_chain(self.keys, self.salt, tables.block_tokens(blocks), blocks)  # made here

    def truncate(self, num_full_blocks: int) -> None:
        """Keep the keys of the first ``num_full_blocks`` blocks only (a truncated sequence)."""
        del self.keys[num_full_blocks:]
