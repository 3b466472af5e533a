"""One step's kernel inputs, built from the bookkeeping in one pass and uploaded in one copy.

:meth:`kvforge.storage.KVCache.prepare_step` is the only path from block
tables to the kernels: it asks the manager for a
:class:`~kvforge.core.StepView` of the step's sequences (positions, slots,
context lengths, block tables, query starts and token ids, all numpy), packs
them into one int32 host buffer (pinned on GPUs) and copies that buffer to
the device once. Every part starts 64-byte aligned, so Triton's
pointer-alignment specialisation is the same every step (no recompiles).

Rows come in two groups: first ``num_decodes`` sequences of one new token
each (read by the decode kernel), then prefill chunks (ragged, read by the
prefill kernel through ``cu_query_lens``). Each group has its own block
table and context-length tensors.

On a GPU the upload alternates between two pinned host buffers, and before
refilling one it waits for that buffer's last copy (a CUDA event): so a step
can be prepared while the step before is still queued (asynchronous
scheduling, :mod:`kvforge.engine.overlap`) without overwriting inputs the
device has not copied yet. The device buffer is one: copies and kernels run
in order on the stream.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from kvforge.errors import KVForgeError

if TYPE_CHECKING:
    from kvforge.core import StepView

__all__ = ["FixedLayout", "StepBatch", "Staging", "build_step"]

#: block-table rows are padded to a multiple of this (one Triton specialisation)
TABLE_WIDTH_MULTIPLE = 16


class StepBatch(NamedTuple):
    """Device inputs of one forward step over a :class:`~kvforge.storage.KVCache`.

    ``T`` tokens of ``B = D + P`` sequences: ``input_ids``, ``positions``,
    ``slot_mapping`` ``[T]`` (int32; slots int64 when the pool has more slot
    ids than int32 holds; -1 = padding, stored nowhere). Decode rows
    ``0..D-1``: ``decode_block_tables`` int32 ``[D, W]``,
    ``decode_context_lens`` int32 ``[D]`` (tokens in the cache including this
    step's). Prefill rows from ``D`` on: ``prefill_block_tables`` ``[P, W]``,
    ``prefill_context_lens`` ``[P]``, ``cu_query_lens`` ``[P + 1]`` (from 0).
    An absent group has None tensors. ``logits_indices`` ``[S]``: the rows of
    ``T`` whose logits are wanted (None: every row, a pure decode step).

    A cache whose layers are split into groups (``CacheConfig.kv_groups``)
    gives each group after the first its own slots and tables: ``groups[g - 1]``
    is the batch that group ``g``'s layers read (:meth:`for_group`).
    """

    input_ids: Tensor
    positions: Tensor
    slot_mapping: Tensor
    decode_block_tables: Tensor | None
    decode_context_lens: Tensor | None
    prefill_block_tables: Tensor | None = None
    prefill_context_lens: Tensor | None = None
    cu_query_lens: Tensor | None = None
    logits_indices: Tensor | None = None
    num_decodes: int = 0
    num_prefills: int = 0
    groups: tuple[StepBatch, ...] = ()

    def for_group(self, group: int) -> StepBatch:
        """The inputs layer group ``group`` reads (its slots and block tables; 0: this batch)."""
        return self.groups[group - 1] if group else self

    @property
    def num_tokens(self) -> int:
        """Rows ``T`` (padding included)."""
        return int(self.input_ids.shape[0])

    @property
    def is_decode(self) -> bool:
        """Every sequence computes one token and every row samples."""
        return self.num_prefills == 0


class Staging:
    """An int32 host buffer (two, pinned, on GPUs) and its device twin, grown on demand.

    :meth:`upload` packs arrays (int32, or int64 stored as two words),
    copies them in one transfer and returns device views.
    :attr:`generation_id` is unique to each allocation of the buffers (a CUDA
    graph that reads them at captured addresses checks it)."""

    _ids = 0

    def __init__(self, device: torch.device, size: int = 1 << 16) -> None:
        self.device = device
        self._alloc(size)

    def _alloc(self, size: int) -> None:
        pin = self.device.type == "cuda"
        hosts = [torch.empty(size, dtype=torch.int32, pin_memory=pin) for _ in range(2 if pin else 1)]
        if hasattr(self, "_copied"):  # a buffer given up may still be copying: wait for it first
            for ev in self._copied:
                if ev is not None:
                    ev.synchronize()
        self._hosts = hosts
        self._hosts_np = [h.numpy() for h in hosts]
        self._copied: list[torch.cuda.Event | None] = [None] * len(hosts)
        self._turn = 0
        self.host = hosts[0]
        self.host_np = self._hosts_np[0]
        self.dev = self.host if self.device.type == "cpu" else torch.empty(size, dtype=torch.int32, device=self.device)
        Staging._ids += 1
        self.generation_id = Staging._ids  # unique per allocation: a moved buffer is never mistaken

    def _next_host(self) -> None:
        """Switch to the other host buffer, once its last copy to the device is done."""
        if len(self._hosts) > 1:
            self._turn ^= 1
            ev = self._copied[self._turn]
            if ev is not None:
                ev.synchronize()
            self.host = self._hosts[self._turn]
            self.host_np = self._hosts_np[self._turn]

    def upload(self, parts: Sequence[np.ndarray], starts: Sequence[int] | None = None) -> list[Tensor]:
        """Device views of ``parts`` (each int32 or int64, copied into the buffer).

        ``starts``: each part's word offset (multiples of 16); by default the
        parts are packed, each 64-byte aligned."""
        words = [p.view(np.int32).reshape(-1) if p.dtype == np.int64 else p.reshape(-1) for p in parts]
        if starts is None:
            starts, total = [], 0
            for w in words:
                starts.append(total)
                total += -(-w.size // 16) * 16
        else:
            total = max(off + w.size for off, w in zip(starts, words)) if words else 0
        if total > self.host_np.size:
            self._alloc(max(total, 2 * self.host_np.size))
        else:
            self._next_host()
        h = self.host_np
        for w, off in zip(words, starts):
            h[off: off + w.size] = w
        if self.device.type != "cpu":
            self.dev[:total].copy_(self.host[:total], non_blocking=True)
            ev = self._copied[self._turn]
            if ev is None:
                ev = self._copied[self._turn] = torch.cuda.Event()
            ev.record()
        out = []
        for p, w, off in zip(parts, words, starts):
            t = self.dev[off: off + w.size]
            if p.dtype == np.int64:
                t = t.view(torch.int64)
            t = t.view(p.shape)
            out.append(t.clone() if self.device.type == "cpu" else t)  # CPU: detach from buffer reuse
        return out


class FixedLayout(NamedTuple):
    """Where a padded decode step's parts sit in the fixed step buffer.

    The same for every bucket of up to ``rows`` sequences, so a captured graph
    of any bucket reads token ids where token ids are (and so on), whichever
    bucket wrote the buffer last: ids at 0, positions at ``stride``, slots at
    ``2 * stride`` (room for int64), context lengths at ``4 * stride``, block
    tables ``[bucket, width]`` from ``5 * stride``."""

    rows: int
    width: int

    @property
    def stride(self) -> int:
        return -(-self.rows // 16) * 16

    @property
    def size(self) -> int:
        return 5 * self.stride + self.rows * self.width

    @property
    def starts(self) -> list[int]:
        m = self.stride
        return [0, m, 2 * m, 4 * m, 5 * m]


def pad_rows(a: np.ndarray, rows: int, fill: int) -> np.ndarray:
    """``a`` with its first dim padded to ``rows`` by ``fill``."""
    if a.shape[0] == rows:
        return a
    out = np.full((rows,) + a.shape[1:], fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def pad_width(tables: np.ndarray, width: int) -> np.ndarray:
    """Block tables ``[B, w]`` padded with -1 to ``[B, width]``."""
    if tables.shape[1] == width:
        return tables
    out = np.full((tables.shape[0], width), -1, dtype=np.int32)
    out[:, : tables.shape[1]] = tables
    return out


def build_step(view: StepView, slot_dtype: type, stage: Callable[[], Staging],
               stage_fixed: Callable[[int, int], tuple[Staging, FixedLayout]], *, num_decodes: int | None,
               logits_indices: np.ndarray | Sequence[int] | None, input_ids: np.ndarray | Sequence[int] | None,
               pad_to: tuple[int, int] | None,
               group_parts: Sequence[tuple[np.ndarray, np.ndarray]] = ()) -> StepBatch:
    """A :class:`StepBatch` of a manager's :class:`~kvforge.core.StepView`, uploaded in one copy.

    ``stage()`` returns the eager staging buffer (grown on demand),
    ``stage_fixed(rows, width)`` the fixed one a CUDA graph reads and its
    :class:`FixedLayout`. ``group_parts``: the other layer groups' ``(slots,
    tables)``, as the view's. See :meth:`kvforge.storage.KVCache.prepare_step`."""
    if group_parts and pad_to is not None:
        raise KVForgeError("pad_to: a cache whose layers are split into groups has no fixed step layout "
                           "(CUDA graphs are not captured for it)")
    extra: list[np.ndarray] = []
    for g_slots, g_tables in group_parts:
        extra += [g_slots.astype(slot_dtype, copy=False), g_tables]
    batch = len(view.context_lens)
    q_lens = np.diff(view.query_start_loc)
    if num_decodes is None:
        num_decodes = batch if bool((q_lens == 1).all()) else 0
    if isinstance(num_decodes, bool) or not isinstance(num_decodes, (int, np.integer)) \
            or not 0 <= num_decodes <= batch or bool((q_lens[:num_decodes] != 1).any()):
        raise KVForgeError(f"num_decodes={num_decodes!r}: expected the number of leading sequences "
                           f"that compute one token each (0..{batch})")
    ids = view.input_ids
    if input_ids is not None:
        ids = np.asarray(input_ids)
        if ids.shape != view.positions.shape or (ids.size and ids.dtype.kind not in "iu"):
            raise KVForgeError(f"input_ids: expected {len(view.positions)} integer token ids, "
                               f"got {ids.dtype} of shape {ids.shape}")
    if ids is None:
        raise KVForgeError("prepare_step(): the token ids of some of these tokens are unknown to the cache "
                           "(appended without ids); pass input_ids=")
    slots = view.slot_mapping.astype(slot_dtype, copy=False)
    ids32, pos32 = ids.astype(np.int32, copy=False), view.positions.astype(np.int32, copy=False)
    nd = int(num_decodes)
    if nd == batch:  # a pure decode step
        if logits_indices is not None:
            raise KVForgeError("logits_indices: a pure decode step samples every row")
        ctx, tables = view.context_lens, view.block_tables
        staging = stage()
        if pad_to is not None:
            rows, width = pad_to
            if batch > rows or tables.shape[1] > width:
                raise KVForgeError(f"pad_to={pad_to}: the step has {batch} sequences and tables of "
                                   f"{tables.shape[1]} blocks")
            ids32, pos32 = pad_rows(ids32, rows, 0), pad_rows(pos32, rows, 0)
            slots, ctx = pad_rows(slots, rows, -1), pad_rows(ctx, rows, 0)
            tables = pad_rows(pad_width(tables, width), rows, -1)
            staging, layout = stage_fixed(rows, width)
            d_ids, d_pos, d_slots, d_ctx, d_tab = staging.upload([ids32, pos32, slots, ctx, tables], layout.starts)
            return StepBatch(d_ids, d_pos, d_slots, d_tab, d_ctx, num_decodes=rows)
        d_ids, d_pos, d_slots, d_ctx, d_tab, *d_extra = staging.upload([ids32, pos32, slots, ctx, tables] + extra)
        out = StepBatch(d_ids, d_pos, d_slots, d_tab, d_ctx, num_decodes=len(ctx))
        return _with_groups(out, d_extra)
    if pad_to is not None:
        raise KVForgeError("pad_to: only a pure decode step has a fixed layout")
    if logits_indices is None:
        rows_idx = view.query_start_loc[1:].astype(np.int32) - 1
    else:
        rows_idx = np.asarray(logits_indices, dtype=np.int64)
        if rows_idx.ndim != 1 or (rows_idx.size and (rows_idx.min() < 0 or rows_idx.max() >= len(ids32))):
            raise KVForgeError(f"logits_indices: expected row numbers in [0, {len(ids32)}), got {logits_indices!r}")
        rows_idx = rows_idx.astype(np.int32)
    cu = (view.query_start_loc[nd:] - view.query_start_loc[nd]).astype(np.int32)
    ctx, tables = view.context_lens, view.block_tables
    parts = [ids32, pos32, slots, rows_idx, cu, ctx[nd:], tables[nd:], ctx[:nd], tables[:nd]]
    d_ids, d_pos, d_slots, d_idx, d_cu, d_ctx_p, d_tab_p, d_ctx_d, d_tab_d, *d_extra = stage().upload(parts + extra)
    out = StepBatch(d_ids, d_pos, d_slots, d_tab_d if nd else None, d_ctx_d if nd else None,
                    d_tab_p, d_ctx_p, d_cu, d_idx, num_decodes=nd, num_prefills=batch - nd)
    return _with_groups(out, d_extra)


def _with_groups(batch: StepBatch, parts: list[Tensor]) -> StepBatch:
    """``batch`` with the other layer groups' batches: ``parts`` holds each group's slots and tables."""
    if not parts:
        return batch
    nd = batch.num_decodes
    groups = tuple(batch._replace(slot_mapping=parts[i], decode_block_tables=parts[i + 1][:nd] if nd else None,
                                  prefill_block_tables=parts[i + 1][nd:] if batch.num_prefills else None)
                   for i in range(0, len(parts), 2))
    return batch._replace(groups=groups)
