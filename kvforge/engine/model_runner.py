"""Batched forward passes over the paged cache: a scheduled step in, logits out.

:class:`ModelRunner` turns a :class:`~kvforge.engine.scheduler.SchedulerOutput`
into the step's inputs with one call of the cache
(:meth:`~kvforge.storage.KVCache.prepare_step`: positions, slots, context
lengths, block tables and query starts, built from the cache's own
bookkeeping and uploaded in one copy), runs the model and returns the
float32 logits of the rows that sample. A step of one new token per
sequence (all decodes) attends through
:func:`~kvforge.kernels.paged_decode_attention` and, on CUDA, replays a
captured graph (:mod:`kvforge.engine.cuda_graphs`); any other step runs
eagerly, decodes through the decode kernel and prefill chunks through
:func:`~kvforge.kernels.paged_prefill_attention`.

The model is kvforge's native decoder or a
:class:`~kvforge.engine.hf_model.TransformersModel`; the step inputs are the
same for both. The transformers model runs every step eagerly (no graphs), one
forward over the step's flattened tokens, its head applied to the sampling rows
only.
"""
from __future__ import annotations

from typing import Any, Hashable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from kvforge.engine.cuda_graphs import DecodeGraphs, warm_up_prefill
from kvforge.engine.hf_model import TransformersModel
from kvforge.engine.models.llama import LlamaModel
from kvforge.engine.parallel import TensorParallel
from kvforge.engine.scheduler import SchedulerOutput
from kvforge.storage import KVCache, StepBatch

__all__ = ["ModelRunner", "StepInputs"]


class ModelRunner:
    """Runs scheduled steps through a model over a :class:`~kvforge.storage.KVCache`.

    ``graph_batch_sizes`` (CUDA only; empty = eager) are the decode batch
    sizes captured; a decode step of ``B`` sequences replays the smallest
    captured size ``>= B`` with padding rows that store and read nothing."""

    def __init__(self, model: LlamaModel | TransformersModel, cache: KVCache, *, max_model_len: int,
                 graph_batch_sizes: Sequence[int] = (), tensor_parallel: TensorParallel | None = None) -> None:
        self.model = model
        self.cache = cache
        #: with tensor parallelism, every forward is broadcast to the other ranks first
        self.tensor_parallel = tensor_parallel
        self.device = model.device
        self.graphs: DecodeGraphs | None = None
        if graph_batch_sizes and self.device.type == "cuda" and isinstance(model, LlamaModel):
            max_blocks = -(-max_model_len // cache.config.block_size)
            self.graphs = DecodeGraphs(model, cache, sorted(graph_batch_sizes), max_blocks)

    def capture(self) -> None:
        """Capture the decode graphs now (otherwise at first use). An eager engine on a GPU
        compiles its prefill kernel variants instead, so that no request waits for one."""
        if self.graphs is not None:
            self.graphs.capture_all()
        elif self.device.type == "cuda":
            warm_up_prefill(self.model, self.cache)

    def uses_graph(self, out: SchedulerOutput) -> bool:
        """Whether this step replays a captured graph."""
        return not out.chunks and self.graphs is not None and self.graphs.fits(len(out.decodes))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, inputs: StepInputs | None = None) -> Tensor:
        """Float32 logits ``[S, vocab]``: one row per decode, then one per prefill
        chunk that ends its sequence's known tokens (``chunk.samples``), in order.
        ``inputs``: the step's input ids when some are still on the device (asynchronous
        scheduling); by default the cache's own."""
        seq_ids = [s.seq_id for s in out.decodes]
        if not out.chunks:
            if self.graphs is not None and self.graphs.fits(len(seq_ids)):
                return self.graphs.run(seq_ids, inputs)
            return self._logits(prepare(self.cache, inputs, seq_ids, 1))
        nd = len(seq_ids)
        q_lens = [1] * nd
        for c in out.chunks:
            seq_ids.append(c.seq.seq_id)
            q_lens.append(c.num_tokens)
        ends = np.cumsum(q_lens) - 1
        rows = list(range(nd)) + [int(ends[nd + i]) for i, c in enumerate(out.chunks) if c.samples]
        batch = prepare(self.cache, inputs, seq_ids, q_lens, num_decodes=nd, logits_indices=rows)
        assert batch.logits_indices is not None
        return self._logits(batch)

    @torch.inference_mode()
    def logits(self, batch: StepBatch) -> Tensor:
        """Float32 logits ``[rows, vocab]`` of a step built with :meth:`KVCache.prepare_step`
        outside the scheduler (measurements: the fp8 accuracy test); stores its keys/values."""
        return self._logits(batch)

    def _logits(self, batch: StepBatch) -> Tensor:
        """Float32 logits of ``batch``'s sampling rows (``logits_indices``; every row when None)."""
        model = self.model
        if not isinstance(model, LlamaModel):
            return model.logits(batch, self.cache)
        tp = self.tensor_parallel
        if tp is not None:
            def step() -> Tensor:
                tp.send_step(batch, self.cache.storage.num_chunks)
                return model.forward(batch, self.cache)
            hidden = tp.run(step)
        else:
            hidden = model.forward(batch, self.cache)
        if batch.logits_indices is not None:
            hidden = hidden[batch.logits_indices]
        return model.compute_logits(hidden)


class StepInputs(NamedTuple):
    """A step's input ids while some are still being sampled on the device (asynchronous
    scheduling, :mod:`kvforge.engine.overlap`): ``ids`` int64 ``[T]`` on the host, 0 where
    unknown; those rows (``rows``, int64 on the device) take ``tokens`` (the step before's
    sampled ids, on the device) once the inputs are uploaded."""

    ids: np.ndarray
    rows: Tensor
    tokens: Tensor

    def apply(self, batch: StepBatch) -> None:
        """Copy the in-flight ids into ``batch``'s uploaded input ids (on the device, in order)."""
        batch.input_ids.index_copy_(0, self.rows, self.tokens.to(batch.input_ids.dtype))


def prepare(cache: KVCache, inputs: StepInputs | None, seq_ids: Sequence[Hashable], num_new_tokens: Any,
            **kwargs: Any) -> StepBatch:
    """:meth:`KVCache.prepare_step` with ``inputs``' ids in place (None: the cache's own)."""
    if inputs is None:
        return cache.prepare_step(seq_ids, num_new_tokens, **kwargs)
    batch = cache.prepare_step(seq_ids, num_new_tokens, input_ids=inputs.ids, **kwargs)
    inputs.apply(batch)
    return batch
