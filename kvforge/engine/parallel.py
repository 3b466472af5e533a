"""Tensor parallelism: one engine, its model and KV cache split by heads over N ranks.

``Engine(model_dir, tensor_parallel_size=N)`` (native decoder only) runs rank
0 in the engine's own process and ranks 1..N-1 in spawned worker processes,
joined in one ``torch.distributed`` process group (NCCL on GPUs, gloo on the
CPU) made from a private ``TCPStore``, so the process's default group is
never touched.

**The split** (:func:`shard_model`): each rank holds ``1/N`` of every layer's
query, key and value heads and of its MLP's intermediate columns; the output
and down projections are split by their inputs and all-reduced (two
all-reduces a layer), their biases added by rank 0 alone. Embeddings, norms
and the head are replicated; only rank 0 computes logits and samples. Each
rank's :class:`~kvforge.storage.KVCache` holds its KV heads' share of every
block: the same block ids, ``1/N`` of the bytes.

**One bookkeeping.** Rank 0 alone runs the scheduler, the block tables,
prefix reuse, preemption and compaction. Before every forward it broadcasts
the step (:meth:`TensorParallel.send_step`): a fixed 16-word header (the
shape of the step, how many block copies and storage chunks to follow), then
one flat int32 tensor holding the block copies rank 0 made since the last
step (copy-on-write, compaction moves: rank 0's storage reports each one)
and the step's kernel inputs (token ids, positions, slots, tables, context
lengths, query starts). Workers apply the copies, follow the chunk count and
run the same forward on their shard. Cost per step: two broadcasts (one of
16 int64, one of about ``3T + B (W + 2)`` int32 words) on top of the
model's ``2 x layers`` all-reduces of ``[T, hidden]``.

**Budgets are global**: ``kv_memory`` is the bytes of all ranks together;
each rank holds ``1/N`` of it.

**Faults.** A worker that raises sends its error down a pipe and exits; its
peers' next collective fails at once (the connection closes) or within the
group's ``timeout``, and rank 0 raises :class:`TensorParallelError` naming the
rank and its error. After any failure inside a step the group is broken:
rank 0 stops the workers (terminating any that do not exit) and every later
step raises. No rank is left waiting longer than the timeout.

An fp8 cache works as on one device: a checkpoint's per-KV-head scales are
split with the heads (:func:`shard_scales`), a per-tensor one serves every rank.

Not yet: CUDA graphs, the host and remote tiers, sliding-window layer groups
(the engine keeps every block) and transformers models under tensor
parallelism (each refused with why, or kept whole).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from kvforge.errors import ConfigError, KVForgeError

__all__ = ["TensorParallel", "TensorParallelError", "shard_model", "TP_TIMEOUT_S"]

log = logging.getLogger(__name__)

#: how long a collective waits for its peers before it fails (seconds)
TP_TIMEOUT_S = 60.0
#: tests' fault injection: ``"RANK:STEPS"`` makes worker RANK raise after STEPS steps
FAULT_ENV = "KVFORGE_TP_FAULT"
_HEADER = 16
_OP_STOP, _OP_STEP, _OP_FETCH, _OP_MOVES = 0, 1, 2, 3
#: kinds of the block moves replayed before a step (a chunk count too: compaction copies, then drops)
_COPY, _TO_HOST, _TO_DEVICE, _PUBLISH, _CHUNKS = 0, 1, 2, 3, 4


class TensorParallelError(KVForgeError):
    """A rank of a tensor-parallel engine failed; the engine has stopped."""


# ------------------------------------------------------------------ the split
def check_divisible(config: Any, size: int) -> None:
    """Refuse a model whose heads or MLP do not split evenly over ``size`` ranks."""
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(config, name)
        if value % size:
            raise ConfigError(f"tensor_parallel_size={size}: the model's {name}={value} does not split evenly "
                              f"over {size} ranks")


def shard_model(model: Any, rank: int, size: int) -> Any:
    """Rank ``rank``'s share (of ``size``) of a :class:`~kvforge.engine.models.llama.LlamaModel`,
    on the same device: its heads and MLP columns; norms, embeddings and head replicated."""
    from kvforge.engine.models.llama import LayerWeights, LlamaModel

    c = model.config
    check_divisible(c, size)
    hq, hkv, inter, d = c.num_heads // size, c.num_kv_heads // size, c.intermediate_size // size, c.head_dim
    qs, ks = slice(rank * hq * d, (rank + 1) * hq * d), slice(rank * hkv * d, (rank + 1) * hkv * d)
    ms = slice(rank * inter, (rank + 1) * inter)

    def qkv_rows(t: Tensor) -> Tensor:
        q, k, v = t.split([c.q_size, c.kv_size, c.kv_size])
        return torch.cat([q[qs], k[ks], v[ks]]).contiguous()

    def gate_up_rows(t: Tensor) -> Tensor:
        gate, up = t.split(c.intermediate_size)
        return torch.cat([gate[ms], up[ms]]).contiguous()

    layers = [LayerWeights(
        input_norm=lw.input_norm, qkv=qkv_rows(lw.qkv),
        qkv_bias=None if lw.qkv_bias is None else qkv_rows(lw.qkv_bias),
        q_norm=lw.q_norm, k_norm=lw.k_norm, o_proj=lw.o_proj[:, qs].contiguous(), post_norm=lw.post_norm,
        gate_up=gate_up_rows(lw.gate_up), down=lw.down[:, ms].contiguous(),
        o_bias=lw.o_bias if rank == 0 else None,
        gate_up_bias=None if lw.gate_up_bias is None else gate_up_rows(lw.gate_up_bias),
        down_bias=lw.down_bias if rank == 0 else None,
    ) for lw in model.layers]
    config = dataclasses.replace(c, num_heads=hq, num_kv_heads=hkv, intermediate_size=inter)
    out = LlamaModel(config, model.embed, layers, model.norm, model.lm_head,
                     max_positions=model.rope.max_positions, fused=model.fused)
    out.identity = getattr(model, "identity", "")
    return out


def tp_rank0(model: Any, size: int, device: torch.device) -> Any:
    """Rank 0's shard of a whole model built on the CPU, moved to ``device``."""
    from kvforge.engine.models.llama import LlamaModel

    shard = shard_model(model, 0, size)
    return _to_device(shard, device, LlamaModel)


def shard_scales(scales: dict[int, Any], rank: int, size: int) -> dict[int, Any]:
    """An fp8 checkpoint's scales for rank ``rank``'s KV heads (a per-tensor scale serves every rank)."""
    from kvforge.engine.kv_scales import LayerKVScales

    def part(s: Tensor | None) -> Tensor | None:
        return s if s is None or s.numel() == 1 else s.reshape(size, -1)[rank].clone()

    return {layer: LayerKVScales(part(s.k_scale), part(s.v_scale)) for layer, s in scales.items()}


def refuse_tp(econf: Any) -> None:
    """Tensor parallelism runs the native decoder only."""
    if econf.tensor_parallel_size > 1:
        raise ConfigError(f"tensor_parallel_size={econf.tensor_parallel_size}: tensor parallelism runs kvforge's "
                          f"native decoder (Llama, Mistral, Qwen2, Qwen3), not a transformers model")


def check_tp_options(econf: Any, remote: Any, cache_config: Any) -> None:
    """Refuse, with why, what tensor parallelism does not do yet."""
    n = econf.tensor_parallel_size
    why = None
    if remote is not None and not callable(getattr(remote, "options", None)):
        why = f"a {type(remote).__name__} remote tier (each rank opens its own: a RedisTier, whose options() it copies)"
    elif cache_config is not None:
        why = "a given cache_config (pass kv_memory or num_blocks: the engine sizes each rank's share)"
    if why is not None:
        raise ConfigError(f"tensor_parallel_size={n} with {why} is not supported yet")


# ------------------------------------------------------------------ the group
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Group:
    """A private process group (gloo or NCCL) and the collectives the engine uses."""

    def __init__(self, rank: int, size: int, port: int, backend: str, timeout: float) -> None:
        td = datetime.timedelta(seconds=timeout)
        self.store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timeout=td)
        if backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = td  # collectives fail after the group's timeout, not NCCL's default
            self.pg = dist.ProcessGroupNCCL(self.store, rank, size, opts)
        else:
            self.pg = dist.ProcessGroupGloo(self.store, rank, size, td)
        self.rank, self.size = rank, size

    def all_reduce(self, t: Tensor) -> Tensor:
        self.pg.allreduce([t]).wait()
        return t

    def all_min(self, t: Tensor) -> Tensor:
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([t], opts).wait()
        return t

    def broadcast(self, t: Tensor) -> Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()
        return t


# ------------------------------------------------------------------ rank 0
class TensorParallel:
    """Rank 0's side: the workers, the group, the step broadcast (see the module docstring).

    ``worker_spec``: what a worker needs to build its shard (:func:`_build_worker`);
    ``device``: rank 0's device (workers take ``cuda:rank`` on GPUs)."""

    def __init__(self, size: int, worker_spec: dict[str, Any], device: torch.device,
                 timeout: float = TP_TIMEOUT_S) -> None:
        import torch.multiprocessing as mp

        self.size = size
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.timeout = timeout
        self.broken: str | None = None
        #: block moves rank 0 made since the last step, in order: ``(kind, pairs)``, kind 0 a device
        #: copy, 1 device -> host, 2 host -> device (the host tier)
        self.pending_ops: list[tuple[int, np.ndarray]] = []
        self._fault = _fault()
        self._steps = 0
        self._zeros: Tensor | None = None  # the broadcast steps' padding words, on rank 0's device
        port = _free_port()
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        for rank in range(1, size):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker_main, args=(rank, size, port, self.backend, timeout, worker_spec, child),
                            daemon=True, name=f"kvforge-tp-rank{rank}")
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        try:
            self.group = _Group(0, size, port, self.backend, timeout)
            self._wait_ready()
        except BaseException as exc:
            err = self._error(exc)
            self.broken = str(err)
            self.stop()
            raise err from None
        self.device_index = device.index if device.type == "cuda" else None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout + 60.0
        for rank, conn in enumerate(self.conns, start=1):
            while not conn.poll(0.1):
                if not self.procs[rank - 1].is_alive() or time.monotonic() > deadline:
                    raise TensorParallelError(f"tensor-parallel rank {rank} did not start")
            kind, what = conn.recv()
            if kind != "ready":
                raise TensorParallelError(what)

    def _error(self, exc: BaseException) -> TensorParallelError:
        """The error to raise: a worker's own message when one sent it, else ``exc``'s."""
        if isinstance(exc, TensorParallelError):
            return exc
        for rank, conn in enumerate(self.conns, start=1):
            try:
                if conn.poll(0.5):
                    kind, what = conn.recv()
                    if kind == "error":
                        return TensorParallelError(f"tensor-parallel {what}")
            except (EOFError, OSError):
                pass
            if not self.procs[rank - 1].is_alive():
                return TensorParallelError(f"tensor-parallel rank {rank} exited (code "
                                           f"{self.procs[rank - 1].exitcode}) during a step: {exc}")
        return TensorParallelError(f"tensor-parallel rank 0 failed: {type(exc).__name__}: {exc}")

    # -------------------------------------------------------------- hooks
    def on_copy(self, pairs: np.ndarray) -> None:
        """Rank 0's storage copied blocks ``pairs`` ``[n, 2]``: the workers copy them before the next step."""
        self.on_transfer(0, pairs)

    def on_transfer(self, kind: int, pairs: np.ndarray) -> None:
        """Rank 0 moved blocks (``kind``: 0 device copy, 1 to the host tier, 2 from it): replayed in order."""
        self.pending_ops.append((kind, np.asarray(pairs, dtype=np.int64).reshape(-1)))

    def on_chunks(self, num_chunks: int) -> None:
        """Rank 0's storage now has ``num_chunks`` chunks (grown, or dropped after a compaction)."""
        self.pending_ops.append((_CHUNKS, np.asarray([num_chunks], dtype=np.int64)))

    def _take_ops(self) -> np.ndarray:
        """The pending moves as int64 words (``kind, n, words...`` each), cleared."""
        ops = np.concatenate([np.concatenate([[kind, len(w)], w]) for kind, w in self.pending_ops]) \
            if self.pending_ops else np.zeros(0, np.int64)
        self.pending_ops = []
        return np.ascontiguousarray(ops, dtype=np.int64)

    def on_publish(self, keys: list[bytes], blocks: list[int]) -> None:
        """Rank 0 published these blocks to the remote tier: every rank publishes its share."""
        words = np.concatenate([np.asarray(blocks, dtype=np.int64), _keys_words(keys)])
        self.pending_ops.append((_PUBLISH, words))

    def remote_copy(self, cache: Any) -> Callable[[list[int]], None]:
        """Rank 0's ``copy_from_remote`` for an admission's fetched run: its own share, then
        every rank fetches and writes its share at once; raises (the run is computed) unless
        every rank did."""
        def copy(device_blocks: list[int]) -> None:
            keys = list(cache._remote_keys[:len(device_blocks)])
            cache._copy_from_remote(device_blocks)
            if self.broken is not None:
                raise TensorParallelError(f"the tensor-parallel engine has stopped: {self.broken}")
            # the moves made before it first (spills of the blocks it overwrites, copies, chunks)
            ops = self._take_ops()
            words = np.concatenate([ops, np.asarray(device_blocks, dtype=np.int64), _keys_words(keys)])
            flat = torch.from_numpy(words.view(np.int32).copy())
            header = torch.tensor([_OP_FETCH, len(device_blocks), flat.numel(), len(ops)] + [0] * (_HEADER - 4),
                                  dtype=torch.int64)
            ok = torch.ones(1, dtype=torch.int32)
            try:
                g = self.group
                dev = self.device if self.backend == "nccl" else torch.device("cpu")
                g.broadcast(header.to(dev))
                g.broadcast(flat.to(dev))
                ok = g.all_min(ok.to(dev)).cpu()
            except Exception as exc:
                err = self._error(exc)
                self.broken = str(err)
                self.stop()
                raise err from exc
            if int(ok[0]) != 1:
                raise KVForgeError(f"a tensor-parallel worker rank could not fetch its share of {len(keys)} "
                                   f"block(s) from the remote tier (its server share is missing or a read failed)")
        return copy

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks in place (the model's output and down projections)."""
        return self.group.all_reduce(t)

    def run(self, fn: Callable[[], Tensor]) -> Tensor:
        """Run rank 0's part of a step; any failure stops the group and raises :class:`TensorParallelError`."""
        if self.broken is not None:
            raise TensorParallelError(f"the tensor-parallel engine has stopped: {self.broken}")
        try:
            return fn()
        except BaseException as exc:
            err = self._error(exc)
            self.broken = str(err)
            self.stop()
            raise err from exc

    def _pad(self, device: torch.device) -> Tensor:
        """:data:`_ALIGN_WORDS` int32 zeros on ``device``, made once."""
        if self._zeros is None or self._zeros.device != device:
            self._zeros = torch.zeros(_ALIGN_WORDS, dtype=torch.int32, device=device)
        return self._zeros

    def send_step(self, batch: Any, num_chunks: int) -> None:
        """Broadcast a step's inputs (and the block copies made since the last one)."""
        self._steps += 1
        if self._fault is not None and self._fault[0] == 0 and self._steps > self._fault[1]:
            raise RuntimeError(f"injected fault ({FAULT_ENV}) at step {self._steps}")
        parts: list[Tensor] = []
        ops = self._take_ops()
        dev = batch.input_ids.device
        parts.append(torch.from_numpy(ops.view(np.int32).copy()).to(dev))
        slot64 = batch.slot_mapping.dtype == torch.int64
        slots = batch.slot_mapping.view(torch.int32) if slot64 else batch.slot_mapping
        parts += [batch.input_ids, batch.positions, slots]
        nd, npf = batch.num_decodes, batch.num_prefills
        wd = wp = 0
        if batch.decode_block_tables is not None:
            parts += [batch.decode_block_tables.reshape(-1), batch.decode_context_lens]
            wd = batch.decode_block_tables.shape[1]
        if npf:
            parts += [batch.prefill_block_tables.reshape(-1), batch.prefill_context_lens, batch.cu_query_lens]
            wp = batch.prefill_block_tables.shape[1]
        ns = -1
        if batch.logits_indices is not None:
            parts.append(batch.logits_indices)
            ns = batch.logits_indices.shape[0]
        flat = torch.cat(_aligned_parts(parts, self._pad(dev)))
        header = torch.tensor([_OP_STEP, batch.num_tokens, nd, npf, wd, wp, ns, int(slot64), len(ops),
                               num_chunks, flat.numel(), int(batch.decode_block_tables is not None)] +
                              [0] * (_HEADER - 12), dtype=torch.int64)
        g = self.group
        g.broadcast(header.to(dev) if self.backend == "nccl" else header)
        g.broadcast(flat)

    def stop(self) -> None:
        """Tell the workers to exit and wait for them (terminating any still running after a few seconds)."""
        if getattr(self, "group", None) is not None and self.broken is None:
            dev = self.device if self.backend == "nccl" else torch.device("cpu")
            try:
                ops = self._take_ops()
                if len(ops):  # the last publishes (a finished request's blocks) reach every rank
                    flat = torch.from_numpy(ops.view(np.int32).copy())
                    header = torch.tensor([_OP_MOVES, 0, flat.numel(), len(ops)] + [0] * (_HEADER - 4),
                                          dtype=torch.int64)
                    self.group.broadcast(header.to(dev))
                    self.group.broadcast(flat.to(dev))
                header = torch.zeros(_HEADER, dtype=torch.int64)
                self.group.broadcast(header.to(dev))
            except Exception:  # a peer is gone: it is terminated below
                pass
        for p in self.procs:
            if self.broken is None:  # told to stop: they exit at once
                p.join(timeout=5.0)
            if p.is_alive():  # after a failure they may be waiting in a collective: end them now
                p.terminate()
                p.join(timeout=5.0)
        self.procs = [p for p in self.procs if p.is_alive()]
        if self.broken is None:
            self.broken = "stopped"

    def __del__(self) -> None:
        try:
            if self.procs:
                for p in self.procs:
                    p.terminate()
        except Exception:
            pass


# ------------------------------------------------------------------ workers
def _build_worker(spec: dict[str, Any], rank: int, size: int, group: _Group) -> tuple[Any, Any]:
    """A worker's model shard and its cache shard, from rank 0's spec."""
    from kvforge.engine.models.llama import LlamaModel
    from kvforge.storage import KVCache

    # on GPUs rank r takes the r-th device after rank 0's
    device = torch.device(spec["device"]) if spec["device"] != "cuda" else \
        torch.device("cuda", spec.get("device_index", 0) + rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    full = _full_model(spec)
    model = shard_model(full, rank, size)
    del full
    model = _to_device(model, device, LlamaModel)
    model.tp = group
    from kvforge.engine.kv_scales import apply_kv_scales

    cfg = spec["cache_config"].replace(device=str(device))
    remote = None
    if spec.get("remote") is not None:
        from kvforge.storage.redis_tier import RedisTier
        remote = RedisTier(**spec["remote"])
    cache = KVCache(cfg, backend=spec["backend"], remote=remote, model=spec.get("identity", ""),
                    tensor_parallel=(rank, size))
    apply_kv_scales(cache, shard_scales(spec.get("kv_scales") or {}, rank, size))
    if device.type == "cuda":  # as rank 0's runner does: no prefill tile compiles mid-serving
        from kvforge.engine.cuda_graphs import warm_up_prefill
        warm_up_prefill(model, cache)
    return model, cache


def _full_model(spec: dict[str, Any]) -> Any:
    """The whole model on the CPU, as rank 0 built it (the same checkpoint, or the same seed)."""
    from kvforge.engine.loader import load_checkpoint
    from kvforge.engine.models.llama import LlamaModel

    cpu = torch.device("cpu")
    if spec.get("folder"):
        ckpt = load_checkpoint(spec["folder"])
        return LlamaModel.from_state_dict(ckpt.config, ckpt.weights, dtype=spec["dtype"], device=cpu,
                                          max_positions=spec["max_positions"])
    return LlamaModel.random(spec["model_config"], dtype=spec["dtype"], device=cpu, seed=spec["seed"],
                             max_positions=spec["max_positions"])


def _to_device(model: Any, device: torch.device, cls: Any) -> Any:
    if device.type == "cpu":
        return model
    layers = [type(lw)(*(None if t is None else t.to(device) for t in lw)) for lw in model.layers]
    head = model.embed.to(device)
    lm = head if model.lm_head is model.embed else model.lm_head.to(device)
    out = cls(model.config, head, layers, model.norm.to(device), lm, max_positions=model.rope.max_positions)
    out.identity = getattr(model, "identity", "")
    return out


def _worker_main(rank: int, size: int, port: int, backend: str, timeout: float, spec: dict[str, Any],
                 conn: Any) -> None:
    """A worker rank: build its shard, then apply rank 0's steps until told to stop."""
    try:
        torch.set_num_threads(max(1, spec.get("threads") or 1))
        group = _Group(rank, size, port, backend, timeout)
        model, cache = _build_worker(spec, rank, size, group)
        conn.send(("ready", None))
        fault = _fault()
        steps = 0
        dev = cache.device
        header = torch.zeros(_HEADER, dtype=torch.int64, device=dev if backend == "nccl" else "cpu")
        with torch.inference_mode():
            while True:
                group.broadcast(header)
                h = header.tolist()
                if h[0] == _OP_STOP:
                    break
                if h[0] in (_OP_FETCH, _OP_MOVES):  # moves first, then an admission's remote run
                    flat = torch.empty(h[2], dtype=torch.int32, device=header.device)
                    group.broadcast(flat)
                    words = flat.cpu().numpy().view(np.int64)
                    _replay(words[:h[3]], cache)
                    if h[0] == _OP_FETCH:  # this rank's share of the run, then agree on it
                        blocks, keys = _blocks_and_keys(words[h[3]:])
                        ok = cache.copy_remote_run(keys, blocks) if cache.remote is not None else False
                        group.all_min(torch.tensor([int(ok)], dtype=torch.int32, device=header.device))
                    continue
                steps += 1
                if fault is not None and fault[0] == rank and steps > fault[1]:
                    raise RuntimeError(f"injected fault ({FAULT_ENV}) at step {steps}")
                flat = torch.empty(h[10], dtype=torch.int32, device=dev)
                group.broadcast(flat)
                batch = _unpack(h, flat, cache)
                model.forward(batch, cache)
        if cache.remote is not None:  # its last publishes written before the process ends
            cache.remote.flush(timeout=timeout)
        conn.send(("done", None))
    except BaseException as exc:  # noqa: BLE001 - every failure reaches rank 0, then the process ends
        try:
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))
        finally:
            os._exit(1)


def _keys_words(keys: list[bytes]) -> np.ndarray:
    """16-byte prefix keys as int64 words, two a key."""
    return np.frombuffer(b"".join(keys), dtype=np.int64) if keys else np.zeros(0, np.int64)


def _blocks_and_keys(words: np.ndarray) -> tuple[list[int], list[bytes]]:
    """The inverse of ``concatenate([blocks, _keys_words(keys)])``: ``n`` blocks, then ``2n`` words."""
    n = len(words) // 3
    raw = np.ascontiguousarray(words[n:]).tobytes()
    return words[:n].tolist(), [raw[16 * i: 16 * (i + 1)] for i in range(n)]


def _fault() -> tuple[int, int] | None:
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    rank, steps = value.split(":")
    return int(rank), int(steps)


def _set_chunks(storage: Any, num_chunks: int) -> None:
    if num_chunks > storage.num_chunks:
        storage.add_chunks(num_chunks - storage.num_chunks)
    elif num_chunks < storage.num_chunks:
        storage.drop_chunks_from(num_chunks)


def _replay(ops: np.ndarray, cache: Any) -> None:
    """Apply rank 0's block moves (``kind, n, words...`` each) to this rank's share, in order."""
    storage = cache.storage  # a worker's storage follows rank 0's (its own bookkeeping is unused)
    i = 0
    while i < len(ops):
        kind, n = int(ops[i]), int(ops[i + 1])
        words = ops[i + 2: i + 2 + n]
        i += 2 + n
        if kind == _CHUNKS:
            _set_chunks(storage, int(words[0]))
        elif kind == _PUBLISH:
            blocks, keys = _blocks_and_keys(words)
            cache.publish_blocks(keys, blocks)
        elif kind == _COPY:
            pairs = words.reshape(-1, 2)
            storage.copy_blocks(pairs, min(storage.num_chunks * storage.chunk_blocks, cache.config.num_blocks))
        elif kind == _TO_HOST:
            cache.host_storage.to_host([tuple(p) for p in words.reshape(-1, 2).tolist()])
        else:
            cache.host_storage.to_device([tuple(p) for p in words.reshape(-1, 2).tolist()])


#: every part of a broadcast step starts at a multiple of this many int32 words (64 bytes), as
#: rank 0's own step buffer's do: Triton specialises on pointer alignment, so the workers'
#: kernels then see the same alignment every step and compile nothing new
_ALIGN_WORDS = 16


def _aligned_parts(parts: list[Tensor], zeros: Tensor) -> list[Tensor]:
    """``parts`` as int32 words, each followed by as many of ``zeros`` (:data:`_ALIGN_WORDS`
    int32 zeros on their device) as pad it to a multiple of :data:`_ALIGN_WORDS`: one
    ``torch.cat`` of the list makes the broadcast step."""
    out: list[Tensor] = []
    for p in parts:
        flat = p.reshape(-1).to(torch.int32)
        out.append(flat)
        pad = -flat.numel() % _ALIGN_WORDS
        if pad:
            out.append(zeros[:pad])
    return out


def _unpack(h: list[int], flat: Tensor, cache: Any) -> Any:
    """A worker's :class:`~kvforge.storage.StepBatch` of a broadcast step (copies applied first)."""
    from kvforge.storage import StepBatch

    _, t, nd, npf, wd, wp, ns, slot64, nops, num_chunks, _, has_dec = h[:12]
    pos = 0

    def take(n: int) -> Tensor:
        nonlocal pos
        out = flat[pos:pos + n]
        pos += -(-n // _ALIGN_WORDS) * _ALIGN_WORDS
        return out

    if nops:  # rank 0's block moves since the last step, in its order
        _replay(take(2 * nops).cpu().numpy().view(np.int64), cache)
    _set_chunks(cache.storage, num_chunks)  # as rank 0 has them now (a check: the moves said so)
    ids, positions = take(t), take(t)
    slots = take(2 * t).view(torch.int64) if slot64 else take(t)
    dec_tab = dec_ctx = pre_tab = pre_ctx = cu = idx = None
    if has_dec:
        dec_tab, dec_ctx = take(nd * wd).view(nd, wd), take(nd)
    if npf:
        pre_tab, pre_ctx, cu = take(npf * wp).view(npf, wp), take(npf), take(npf + 1)
    if ns >= 0:
        idx = take(ns)
    return StepBatch(ids, positions, slots, dec_tab, dec_ctx, pre_tab, pre_ctx, cu, idx,
                     num_decodes=nd, num_prefills=npf)
