"""One attention call over paged keys/values: the layout changes around kvforge's kernels.

transformers hands attention ``[batch, heads, seq, head_dim]`` tensors;
kvforge's kernels take the real (unpadded) tokens of a ragged batch as rows
``[num_tokens, heads, head_dim]`` with block tables and context lengths.
:func:`to_tokens` and :func:`from_tokens` convert between the two;
:func:`paged_attention` picks the decode kernel (one new token per
sequence) or the prefill kernel (ragged new tokens) and runs it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kvforge import kernels

__all__ = ["PagedInputs", "to_tokens", "from_tokens", "paged_attention", "counts_of", "cu_lens"]


class PagedInputs(NamedTuple):
    """The kernel inputs of one step, shared by every layer.

    ``slot_mapping`` ``[T]``: where each real new token's keys/values go.
    ``block_tables`` int32 ``[B, W]`` and ``context_lens`` int32 ``[B]``
    (tokens stored per sequence, this step's included). ``cu_query_lens``
    int32 ``[B + 1]``: sequence i's new tokens are rows
    ``cu_query_lens[i]:cu_query_lens[i + 1]``. ``real`` bool ``[B, S]``: the
    grid cells that are tokens (None: every cell). ``is_decode``: every
    sequence has exactly one new token (the decode kernel runs).

    A pool whose layers are split into groups (``CacheConfig.kv_groups``:
    sliding-window layers releasing their blocks) gives each group after the
    first its own ``slot_mapping`` and ``block_tables`` (-1 where a block was
    released): ``groups[g - 1]``, read through :meth:`for_group`; the other
    fields are every group's."""

    slot_mapping: Tensor
    block_tables: Tensor
    context_lens: Tensor
    cu_query_lens: Tensor
    real: Tensor | None
    is_decode: bool
    groups: tuple[PagedInputs, ...] = ()

    def for_group(self, group: int) -> PagedInputs:
        """The inputs layer group ``group`` reads (its slots and block tables; 0: these)."""
        return self.groups[group - 1] if group else self


def to_tokens(x: Tensor, real: Tensor | None) -> Tensor:
    """``[B, H, S, D]`` -> the real cells' rows ``[T, H, D]`` (batch-major, contiguous)."""
    b, h, s, d = x.shape
    x = x.transpose(1, 2)
    return x.reshape(b * s, h, d).contiguous() if real is None else x[real].contiguous()


def from_tokens(rows: Tensor, real: Tensor | None, batch: int, seq: int) -> Tensor:
    """Rows ``[T, H, D]`` -> ``[B, S, H, D]`` (what transformers' attention returns); cells
    that are padding get zeros (no real token ever reads them)."""
    if real is None:
        return rows.view(batch, seq, rows.shape[1], rows.shape[2])
    out = rows.new_zeros(batch, seq, rows.shape[1], rows.shape[2])
    out[real] = rows
    return out


def paged_attention(query: Tensor, k_cache: kernels.CacheView | Tensor, v_cache: Tensor | None,
                    inputs: PagedInputs, *, scale: float, sliding_window: int | None, soft_cap: float | None,
                    backend: str) -> Tensor:
    """Attention of the real new tokens' queries ``[T, Hq, D]`` (in the cache dtype) over
    their sequences' keys/values, stored before the call; ``[T, Hq, D]``. The cache is a
    :class:`~kvforge.kernels.CacheView` (``v_cache=None``) or two block tensors, as the
    kernels take it."""
    if inputs.is_decode:
        return kernels.paged_decode_attention(
            query, k_cache, v_cache, inputs.block_tables, inputs.context_lens, scale=scale,
            sliding_window=sliding_window, soft_cap=soft_cap, backend=backend)
    return kernels.paged_prefill_attention(
        query, k_cache, v_cache, inputs.block_tables, inputs.cu_query_lens, inputs.context_lens, scale=scale,
        sliding_window=sliding_window, soft_cap=soft_cap, backend=backend)


def counts_of(real: Tensor | None, batch: int, seq: int) -> list[int]:
    """New tokens per sequence: real cells per row of ``real`` ``[B, S]`` (None: ``seq`` each)."""
    if real is None:
        return [seq] * batch
    return real.sum(dim=1).tolist()


def cu_lens(counts: list[int], device: torch.device) -> Tensor:
    """``[B + 1]`` int32 running sums of ``counts``, from 0."""
    cu = [0]
    for n in counts:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)
