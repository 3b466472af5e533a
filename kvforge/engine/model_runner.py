"""Batched forward passes over the paged cache: one step in, logits out.

:class:`ModelRunner` turns a step's host-side arrays (:class:`StepInputs`)
into device tensors with a single host-to-device copy from a reusable
staging buffer (pinned on GPUs), runs the model and returns the float32
logits of the rows that sample. A step of one new token per sequence (all
decodes) attends through :func:`~kvforge.kernels.paged_decode_attention`
and, on CUDA, replays a captured graph (:mod:`kvforge.engine.cuda_graphs`);
any other step runs eagerly through
:func:`~kvforge.kernels.paged_prefill_attention` (decode rows are query
length 1 there).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from kvforge.storage.cache import KVCache
from kvforge.engine.cuda_graphs import DecodeGraphs
from kvforge.engine.models.llama import AttentionInputs, LlamaModel

__all__ = ["ModelRunner", "StepInputs", "Staging"]


class StepInputs(NamedTuple):
    """Host arrays of one step: ``T`` tokens of ``B`` sequences.

    ``input_ids``, ``positions``, ``slot_mapping``: ``[T]``; ``query_lens``
    and ``context_lens`` (tokens in the cache after this step): ``[B]``;
    ``logits_indices``: ``[S]`` rows of ``T`` whose logits are wanted.
    ``num_decodes``: the first sequences, one token each. ``is_decode``:
    every sequence is a decode and ``logits_indices`` is ``arange(B)``."""

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_ids: Sequence[int]
    query_lens: np.ndarray
    context_lens: np.ndarray
    logits_indices: np.ndarray
    num_decodes: int
    is_decode: bool


class Staging:
    """One int32 host buffer (pinned on GPUs) and its device twin, grown on demand.

    :meth:`upload` packs arrays, copies them in one transfer and returns
    device views. The host buffer is reused each step; the engine reads the
    sampled tokens (a sync) before the next step refills it."""

    def __init__(self, device: torch.device, size: int = 1 << 16) -> None:
        self.device = device
        self._alloc(size)

    def _alloc(self, size: int) -> None:
        pin = self.device.type == "cuda"
        self.host = torch.empty(size, dtype=torch.int32, pin_memory=pin)
        self.host_np = self.host.numpy()
        self.dev = self.host if self.device.type == "cpu" else torch.empty(size, dtype=torch.int32, device=self.device)

    def upload(self, parts: Sequence[np.ndarray]) -> list[Tensor]:
        """Device int32 views of ``parts`` (each copied into the buffer, flattened).

        Every part starts 64-byte aligned, so Triton's pointer-alignment
        specialisation is the same every step (no recompiles)."""
        starts = []
        total = 0
        for p in parts:
            starts.append(total)
            total += -(-p.size // 16) * 16
        if total > self.host_np.size:
            self._alloc(max(total, 2 * self.host_np.size))
        for p, off in zip(parts, starts):
            self.host_np[off: off + p.size] = p.reshape(-1)
        if self.device.type != "cpu":
            self.dev[:total].copy_(self.host[:total], non_blocking=True)
        out = [self.dev[off: off + p.size].view(p.shape) for p, off in zip(parts, starts)]
        if self.device.type == "cpu":
            out = [t.clone() for t in out]  # the host buffer is the device buffer: detach from reuse
        return out


class ModelRunner:
    """Runs :class:`StepInputs` through a model over a :class:`~kvforge.storage.cache.KVCache`.

    ``graph_batch_sizes`` (CUDA only; empty = eager) are the decode batch
    sizes captured; a decode step of ``B`` sequences replays the smallest
    captured size ``>= B`` with padding rows that store and read nothing."""

    def __init__(self, model: LlamaModel, cache: KVCache, *, max_model_len: int,
                 graph_batch_sizes: Sequence[int] = ()) -> None:
        self.model = model
        self.cache = cache
        self.device = model.device
        self.staging = Staging(self.device)
        self.max_blocks = -(-max_model_len // cache.config.block_size)
        self.graphs: DecodeGraphs | None = None
        if graph_batch_sizes and self.device.type == "cuda":
            self.graphs = DecodeGraphs(model, cache, sorted(graph_batch_sizes), self.max_blocks)

    def capture(self) -> None:
        """Capture the decode graphs now (otherwise at first use)."""
        if self.graphs is not None:
            self.graphs.capture_all()

    @torch.inference_mode()
    def execute(self, step: StepInputs) -> Tensor:
        """Float32 logits ``[S, vocab]`` of the rows in ``step.logits_indices``."""
        tables = self.cache.manager.block_table_array(step.seq_ids)
        if step.is_decode and self.graphs is not None and self.graphs.fits(len(step.seq_ids)):
            return self.graphs.run(step, tables)
        w = tables.shape[1]
        if w % 16:  # a table row stride that is a multiple of 16: one Triton specialisation
            tables = np.concatenate([tables, np.full((tables.shape[0], 16 - w % 16), -1, np.int32)], axis=1)
        nd = step.num_decodes
        slots = step.slot_mapping.astype(np.int32)
        if step.is_decode:
            ids, pos, slots_t, ctx, tab = self.staging.upload(
                [step.input_ids, step.positions, slots, step.context_lens, tables])
            hidden = self.model.forward(ids, pos, AttentionInputs(slots_t, tab, ctx), self.cache)
            return self.model.compute_logits(hidden)
        cu = np.zeros(len(step.seq_ids) - nd + 1, dtype=np.int32)
        np.cumsum(step.query_lens[nd:], out=cu[1:])
        ids, pos, slots_t, idx, cu_t, ctx_p, tab_p, ctx_d, tab_d = self.staging.upload(
            [step.input_ids, step.positions, slots, step.logits_indices.astype(np.int32), cu,
             step.context_lens[nd:], tables[nd:], step.context_lens[:nd], tables[:nd]])
        attn = AttentionInputs(slots_t, tab_d if nd else None, ctx_d if nd else None, tab_p, ctx_p, cu_t)
        hidden = self.model.forward(ids, pos, attn, self.cache)
        return self.model.compute_logits(hidden[idx])
