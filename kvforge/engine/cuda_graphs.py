"""CUDA graphs of the decode forward, one per batch-size bucket.

A decode step of a 1B model is a few hundred small kernels; launching them
from Python costs more than running them. :class:`DecodeGraphs` captures
``model.forward`` + ``compute_logits`` for one token per sequence at each
bucket size. The graph reads the cache's fixed step buffer
(:meth:`~kvforge.storage.KVCache.prepare_step` with ``pad_to=(bucket,
max_blocks)``), so a replay needs only that call's single host-to-device
copy. Padding rows (bucket size above the batch) have slot -1 and context
length 0: they store nothing and attend to nothing.

Before the first capture, :meth:`DecodeGraphs.capture_all` also compiles
every variant of the Triton prefill kernel the model can launch
(:func:`~kvforge.kernels.warm_up_prefill`: one per tile height, which follows
the rows per sequence): otherwise the first short prompt chunks over long
cached (or fetched) contexts compile theirs mid-serving, about a second each.

Graphs bake in device addresses: the cache's chunks and its fixed step
buffer. When either moves (:attr:`~kvforge.storage.KVCache.address_signature`:
an elastic pool grew, compaction released chunks), the graphs are dropped
and captured again at their next use.
"""
from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import torch
from torch import Tensor

from kvforge import kernels
from kvforge.engine.models.llama import LlamaModel
from kvforge.storage import KVCache, StepBatch

if TYPE_CHECKING:
    from kvforge.engine.model_runner import StepInputs

__all__ = ["DecodeGraphs", "warm_up_prefill"]

log = logging.getLogger(__name__)


class DecodeGraphs:
    """Captured decode steps for batch sizes ``sizes`` (ascending) over ``cache``."""

    def __init__(self, model: LlamaModel, cache: KVCache, sizes: Sequence[int], max_blocks: int) -> None:
        self.model = model
        self.cache = cache
        self.sizes = list(sizes)
        self.max_bs = self.sizes[-1]
        self.max_blocks = -(-max_blocks // 16) * 16  # the cache pads table rows to multiples of 16
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = None
        self._signature: tuple[int, int] | None = None
        self._prefill_warm = False

    def fits(self, batch: int) -> bool:
        """Whether a captured size holds ``batch`` sequences."""
        return batch <= self.max_bs

    def _check_addresses(self) -> None:
        sig = self.cache.address_signature
        if sig != self._signature:
            if self._graphs:
                log.info("KV storage or step buffer moved: dropping %d decode graphs", len(self._graphs))
            self._graphs.clear()
            self._pool = None
            self._signature = sig

    def _forward(self, batch: StepBatch) -> Tensor:
        return self.model.compute_logits(self.model.forward(batch, self.cache))

    def _capture(self, b: int) -> None:
        # the fixed buffer holds padding only (slot -1, context 0): warm-up and capture touch no block
        batch = self.cache.prepare_step([], pad_to=(b, self.max_blocks))
        self._check_addresses()  # the first capture of a larger bucket may have moved the buffer
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(batch)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._forward(batch)
        self._graphs[b] = (graph, out)

    def warm_up_prefill(self) -> int:
        """:func:`warm_up_prefill` for this model, once; the number of launches."""
        if self._prefill_warm:
            return 0
        self._prefill_warm = True
        return warm_up_prefill(self.model, self.cache)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Compile the prefill variants (:meth:`warm_up_prefill`), then capture every size, largest
        first (it sizes the step buffer; smaller graphs reuse its memory)."""
        self.warm_up_prefill()
        self._check_addresses()
        start = time.perf_counter()
        for b in reversed(self.sizes):
            if b not in self._graphs:
                self._capture(b)
        torch.cuda.synchronize()
        log.info("captured %d decode graphs in %.2f s", len(self.sizes), time.perf_counter() - start)

    def run(self, seq_ids: Sequence[Hashable], inputs: StepInputs | None = None) -> Tensor:
        """Replay the bucket for a decode step of ``seq_ids``; logits ``[B, vocab]``.
        ``inputs``: ids still on the device (:class:`~kvforge.engine.model_runner.StepInputs`)."""
        self._check_addresses()
        batch = len(seq_ids)
        b = self.sizes[bisect.bisect_left(self.sizes, batch)]
        if b not in self._graphs:
            with torch.inference_mode():
                self._capture(b)
        if inputs is None:
            self.cache.prepare_step(seq_ids, 1, pad_to=(b, self.max_blocks))
        else:
            inputs.apply(self.cache.prepare_step(seq_ids, 1, pad_to=(b, self.max_blocks), input_ids=inputs.ids))
        graph, out = self._graphs[b]
        graph.replay()
        return out[:batch]


def warm_up_prefill(model: Any, cache: KVCache) -> int:
    """Compile the prefill kernel's variants for each kind of layer of ``model`` (full
    attention, each sliding window; with or without a logit soft cap) once, graphs or not;
    the number of launches (0 on the torch backend). ``model``: the native decoder or a
    :class:`~kvforge.engine.hf_model.TransformersModel` (its ``attn_soft_cap``)."""
    c = model.config
    cap = getattr(model, "attn_soft_cap", None)
    start = time.perf_counter()
    launches = 0
    first_of: dict[int | None, int] = {}
    for layer, window in enumerate(c.sliding_windows):
        first_of.setdefault(window, layer)
    for window, layer in first_of.items():  # the scale is a runtime argument: any one compiles the variant
        launches += kernels.warm_up_prefill(cache.layer_view(layer), c.num_heads, scale=getattr(model, "scale", None),
                                            sliding_window=window, soft_cap=cap, backend=cache.backend)
    if launches:
        log.info("compiled %d prefill kernel launches in %.2f s", launches, time.perf_counter() - start)
    return launches
