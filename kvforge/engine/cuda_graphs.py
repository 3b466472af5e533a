"""CUDA graphs of the decode forward, one per batch-size bucket.

A decode step of a 1B model is a few hundred small kernels; launching them
from Python costs more than running them. :class:`DecodeGraphs` captures
``model.forward`` + ``compute_logits`` for one token per sequence at each
bucket size, reading static device buffers (token ids, positions, slots,
context lengths, block tables ``[max_bs, max_blocks]``) that one
host-to-device copy refills before each replay. Padding rows (bucket size
above the batch) have slot -1 and context length 0: they store nothing and
attend to nothing.

Graphs bake in the cache's storage addresses. When the storage changes
(an elastic pool grew, or compaction released chunks), the graphs are
dropped and captured again at their next use.
"""
from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import Tensor

from kvforge.storage.cache import KVCache
from kvforge.engine.models.llama import AttentionInputs, LlamaModel

if TYPE_CHECKING:
    from kvforge.engine.model_runner import StepInputs

__all__ = ["DecodeGraphs"]

log = logging.getLogger(__name__)


class DecodeGraphs:
    """Captured decode steps for batch sizes ``sizes`` (ascending) over ``cache``."""

    def __init__(self, model: LlamaModel, cache: KVCache, sizes: Sequence[int], max_blocks: int) -> None:
        self.model = model
        self.cache = cache
        self.sizes = list(sizes)
        self.max_bs = self.sizes[-1]
        self.max_blocks = max_blocks
        m = self.stride = -(-self.max_bs // 16) * 16  # every buffer starts 64-byte aligned
        n = 4 * m + self.max_bs * max_blocks
        self.host = torch.zeros(n, dtype=torch.int32, pin_memory=True)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(n, dtype=torch.int32, device=model.device)
        self._reset_host()
        self.dev.copy_(self.host)
        self.ids, self.pos, self.slots, self.ctx = (self.dev[i * m:(i + 1) * m] for i in range(4))
        self.tables = self.dev[4 * m:].view(self.max_bs, max_blocks)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = None
        self._signature: tuple[int, ...] = ()

    def _reset_host(self) -> None:
        m = self.stride
        self.host_np[: 4 * m] = 0
        self.host_np[2 * m: 3 * m] = -1  # slots: store nothing

    def fits(self, batch: int) -> bool:
        """Whether a captured size holds ``batch`` sequences."""
        return batch <= self.max_bs

    def _storage_signature(self) -> tuple[int, ...]:
        return tuple(c.data_ptr() for c in self.cache.chunks)

    def _check_storage(self) -> None:
        sig = self._storage_signature()
        if sig != self._signature:
            if self._graphs:
                log.info("KV storage moved: dropping %d decode graphs", len(self._graphs))
            self._graphs.clear()
            self._pool = None
            self._signature = sig

    def _forward(self, b: int) -> Tensor:
        attn = AttentionInputs(self.slots[:b], self.tables[:b], self.ctx[:b])
        hidden = self.model.forward(self.ids[:b], self.pos[:b], attn, self.cache)
        return self.model.compute_logits(hidden)

    def _capture(self, b: int) -> None:
        # inputs hold padding (slot -1, context 0): warm-up and capture touch no cache block
        self._reset_host()
        self.dev.copy_(self.host)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(b)
        self._graphs[b] = (graph, out)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size, largest first (smaller graphs reuse its memory)."""
        self._check_storage()
        start = time.perf_counter()
        for b in reversed(self.sizes):
            if b not in self._graphs:
                self._capture(b)
        torch.cuda.synchronize()
        log.info("captured %d decode graphs in %.2f s", len(self.sizes), time.perf_counter() - start)

    def run(self, step: StepInputs, tables: np.ndarray) -> Tensor:
        """Replay the bucket for ``step`` (all decodes); logits ``[B, vocab]``."""
        self._check_storage()
        batch = len(step.seq_ids)
        b = self.sizes[bisect.bisect_left(self.sizes, batch)]
        if b not in self._graphs:
            with torch.inference_mode():
                self._capture(b)
        m = self.stride
        h = self.host_np
        h[:batch] = step.input_ids
        h[m: m + batch] = step.positions
        h[2 * m: 2 * m + batch] = step.slot_mapping
        h[2 * m + batch: 3 * m] = -1
        h[3 * m: 3 * m + batch] = step.context_lens
        h[3 * m + batch: 4 * m] = 0
        w = tables.shape[1]
        h[4 * m: 4 * m + batch * self.max_blocks].reshape(batch, self.max_blocks)[:, :w] = tables
        n = 4 * m + b * self.max_blocks
        self.dev[:n].copy_(self.host[:n], non_blocking=True)
        graph, out = self._graphs[b]
        graph.replay()
        return out[:batch]
