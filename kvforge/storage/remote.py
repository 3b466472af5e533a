"""The remote tier's contract: what a :class:`~kvforge.storage.KVCache` asks of a shared block store.

A remote tier holds full, keyed blocks that several cache instances (engine
processes, machines) share: one instance publishes a block's keys and values
under its prefix key, another finds them by the same key and copies them in
instead of computing them. :class:`RemoteTier` states what the cache calls;
:class:`~kvforge.storage.redis_tier.RedisTier` is the implementation on a
Redis server.

Keys and layout. A block's prefix key (:mod:`kvforge.core.keys`: the chained,
salted BLAKE2b digest of every token up to the block's end) is the same in
every process. A :class:`RemoteLayout` says what a payload's bytes mean (the
model, dtype, block size, layers, KV heads, head dim, tensor-parallel rank);
the tier folds its fingerprint into every stored key and every value, so
instances of another layout never see, let alone use, each other's blocks.

Payloads. One block's keys and values, ``[num_layers, 2, block_size,
num_kv_heads, head_dim]`` in the cache's dtype, as raw bytes
(``layout.block_bytes`` of them): exactly a host-tier block
(:mod:`kvforge.storage.host`). The tier adds and checks its own framing
(header, checksum); the cache sees only whole, checked payloads.

Failures never reach the cache as exceptions: a tier that cannot answer in
its timeout answers with fewer blocks (a miss) and counts why; a write that
cannot be done is dropped and counted. The cache then computes what it did
not get, so a broken, slow or wiped server costs speed, never correctness.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple, Protocol, Sequence, runtime_checkable

__all__ = ["HeldPayloads", "HeldRun", "RemoteLayout", "RemoteStats", "RemoteTier"]


class RemoteLayout(NamedTuple):
    """What a payload's bytes mean. ``model`` names the weights (a checkpoint path,
    name or hash: two models of one shape must not share KV)."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    tp_rank: int
    tp_size: int
    block_bytes: int
    #: what a quantized payload's bytes are scaled by (an fp8 cache: a digest of every layer's
    #: scales, so caches with other scales never share bytes); "" when unscaled
    quant: str = ""

    def fingerprint(self) -> bytes:
        """16 bytes naming the layout (the same in every process)."""
        text = "|".join(str(x) for x in (self if self.quant else self[:-1]))
        return hashlib.blake2b(text.encode(), digest_size=16, person=b"kvforge-layout").digest()


@runtime_checkable
class RemoteTier(Protocol):
    """A shared store of full blocks, as the cache uses it."""

    def bind(self, layout: RemoteLayout) -> None:
        """Called once by the cache before any other call: the layout of its payloads.
        Binding one tier object to two caches of different layouts is refused."""

    def fetch(self, keys: Sequence[bytes]) -> list[bytes]:
        """The payloads of the longest run of ``keys``, from the first, that the store
        holds and that pass every check (possibly none); at most the tier's timeout of
        waiting. Never raises for a server problem."""

    def publish(self, keys: Sequence[bytes], payloads: Callable[[], Sequence[bytes]]) -> None:
        """Store these blocks, in the background. ``payloads()`` is called later, on the
        tier's writer thread, and returns one payload per key (it may wait for a device
        copy to finish). Returns at once; a full queue drops the write (counted)."""

    # optional: ``lookup(keys) -> int``, how many of the keys from the first the store holds,
    # cheaper than a fetch; the cache asks it before prefetching (RedisTier has it)
    # optional: ``needs_write(keys) -> list[bool]``, whether a publish would write each key;
    # the cache then copies only those blocks off the device (RedisTier has it)
    # optional: ``fetch_held(keys) -> HeldPayloads | None``, the run of ``fetch`` left in the
    # tier's own memory and lent (None: the tier has none to lend; the cache calls ``fetch``),
    # and ``set_memory_hooks(register, unregister)``: the tier calls ``register(view)`` on each
    # region it lends from (a page-locking hook: its result is handed to ``unregister`` before
    # the region is unmapped; None: not registered) (RedisTier has both, with reader processes)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every publish issued so far was written (or dropped); False on timeout."""

    def close(self) -> None:
        """Flush with the tier's timeout, stop the writer, close connections."""


class HeldRun(NamedTuple):
    """``num_blocks`` checked payloads back to back in ``data`` (``num_blocks *
    block_bytes`` bytes of the tier's memory: read it, never write it)."""

    data: memoryview
    num_blocks: int


class HeldPayloads:
    """The run of a fetch, lent out of the tier's memory instead of copied
    (``fetch_held``): ``runs`` in key order, ``num_blocks`` in all. ``is_pinned``:
    every run lies in memory registered as page-locked (a device copy from it
    is asynchronous). The borrower calls :meth:`release` once, when it no longer
    reads the runs, with ``ready`` (e.g. an event's ``query``) when a copy from
    them may still be in flight: the tier reuses the memory only once
    ``ready()`` is True. A lease dropped unreleased is released when collected."""

    __slots__ = ("runs", "num_blocks", "is_pinned", "_release")

    def __init__(self, runs: Sequence[HeldRun], is_pinned: bool,
                 release: Callable[[Callable[[], bool] | None], None] | None) -> None:
        self.runs = list(runs)
        self.num_blocks = sum(r.num_blocks for r in self.runs)
        self.is_pinned = is_pinned
        self._release = release

    def release(self, ready: Callable[[], bool] | None = None) -> None:
        """Hand the memory back (again: nothing); the runs must not be read after."""
        release, self._release = self._release, None
        if release is not None:
            release(ready)

    def __del__(self) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"HeldPayloads({self.num_blocks} blocks in {len(self.runs)} runs, pinned={self.is_pinned})"


@dataclass(frozen=True, slots=True)
class RemoteStats:
    """Counters of a remote tier since it was made.

    Reads: ``fetch_calls``, ``lookup_calls`` (``lookup``: which keys exist),
    ``keys_asked`` (by fetches), ``hits`` (payloads returned),
    ``misses`` (keys asked and not returned: ``keys_asked == hits + misses``),
    ``backoff_fetches`` (answered ``[]`` in back-off), ``bytes_read`` (value
    bytes received). Refusals, each a value stored under a valid name that
    failed a check: ``bad_size`` (total size or length field),
    ``bad_header`` (magic, version, flags), ``bad_fingerprint``, ``bad_key``,
    ``bad_checksum``. Writes: ``publish_jobs`` (calls), ``dropped_jobs``
    (queue full, back-off, closed, or cut short by a connection fault),
    ``skipped_blocks`` (written recently, not rewritten), ``blocks_written``,
    ``bytes_written`` (value bytes, header included), ``write_errors``
    (blocks the server refused: ``OOM``...), ``payload_errors`` (a thunk that
    raised or returned the wrong payloads). Faults: ``connection_errors``,
    ``timeouts``, ``server_errors`` (error replies to reads: ``NOAUTH``...),
    ``reader_errors`` (one of RedisTier's reader or writer processes died,
    hung or could not start: back-off, then a new one), ``reader_starts``
    (reader and writer processes started), ``slots_full`` (fetch parts cut
    short because every shared-memory slot of their reader process held
    payloads not yet copied in: the rest is computed; no back-off)."""

    fetch_calls: int = 0
    lookup_calls: int = 0
    keys_asked: int = 0
    hits: int = 0
    misses: int = 0
    backoff_fetches: int = 0
    bytes_read: int = 0
    bad_size: int = 0
    bad_header: int = 0
    bad_fingerprint: int = 0
    bad_key: int = 0
    bad_checksum: int = 0
    publish_jobs: int = 0
    dropped_jobs: int = 0
    skipped_blocks: int = 0
    blocks_written: int = 0
    bytes_written: int = 0
    write_errors: int = 0
    payload_errors: int = 0
    connection_errors: int = 0
    timeouts: int = 0
    server_errors: int = 0
    reader_errors: int = 0
    reader_starts: int = 0
    slots_full: int = 0

    def to_dict(self) -> dict[str, int]:
        """The snapshot as a plain dict."""
        return asdict(self)
