"""Block tables of many sequences: rows of numpy arrays, the token id of every slot,
the batched views, the append path, uncommitted tokens and truncation.

:class:`BlockTables` is the parts of the tables together, each in its own
module: the rows and slot token ids (:mod:`~kvforge.core.rows`, which states
the invariants), the batched views of a step (:mod:`~kvforge.core.steps`:
:class:`StepView`), the append path (:mod:`~kvforge.core.append_plan`:
:class:`AppendPlan`) and the tokens whose ids come later, with truncation
(:mod:`~kvforge.core.uncommitted`).

It knows nothing of pools, prefixes or sequence ids: the
:class:`~kvforge.core.manager.BlockManager` maps ids to rows and hands over
block ids from the pool; everything else reads through the methods here.
"""
from __future__ import annotations

from kvforge.core.append_plan import AppendPlan, AppendPlanning
from kvforge.core.ids import as_int
from kvforge.core.steps import StepView, TableViews
from kvforge.core.uncommitted import UncommittedRows

__all__ = ["AppendPlan", "BlockTables", "StepView", "blocks_for_tokens"]


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens (``ceil(num_tokens / block_size)``, exact);
    both are integers (``num_tokens >= 0``, ``block_size >= 1``), else :class:`SequenceError`."""
    if type(num_tokens) is not int or type(block_size) is not int or num_tokens < 0 or block_size < 1:
        num_tokens = as_int(num_tokens, "num_tokens")
        block_size = as_int(block_size, "block_size", low=1)
    return -(-num_tokens // block_size)


class BlockTables(TableViews, AppendPlanning, UncommittedRows):
    """Rows of block ids and counts for the sequences over a pool of ``num_blocks`` blocks:
    :class:`~kvforge.core.rows.TableRows` with the step views, the append path, and
    uncommitted tokens and truncation.

    ``rows`` arguments are int64 arrays of live rows (distinct for an append):
    the manager guarantees that; nothing here validates caller input.
    """
