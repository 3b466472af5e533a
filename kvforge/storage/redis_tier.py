"""The remote tier on a Redis server: :class:`RedisTier`, the :class:`~kvforge.storage.remote.RemoteTier` it implements.

The wire format (keys, the value header and checksum) and the URL's secrets
are in :mod:`kvforge.storage.redis_wire`.

Reads. :meth:`RedisTier.fetch` asks in batches of ``batch_size`` keys (one
``MGET`` each, ``fetch_threads`` of them in flight: one connection's parsing
overlaps the server's sending and the checks of another) and stops at the
first value that is missing or fails a check (size, header, fingerprint,
key, length, checksum: each refusal is counted), so it returns the longest
valid run from the first key, each payload a read-only :class:`memoryview`
of ``layout.block_bytes`` bytes. With ``reader="process"`` (the default on
Linux) the reads, the parsing and the checks run in a child process of
their own (:mod:`kvforge.storage.redis_reader`), which hands the checked
payloads over in shared memory: in the engine's process they would take
turns with the step loop for the GIL. :meth:`RedisTier.fetch_held` lends
them where they lie instead of copying them out (the cache uploads straight
from there, and registers that memory as page-locked through
:meth:`RedisTier.set_memory_hooks` on a GPU). ``reader="thread"`` reads on
threads of this process.

Writes. :meth:`RedisTier.publish` queues a job (bounded: ``max_pending``
jobs; a full queue drops the job, counted) for one daemon writer thread,
which calls the job's payload thunk, frames the values and writes them with
pipelined ``SET`` (``PX`` the ttl when one is given). With
``reader="process"`` the thread only copies the payloads into a writer
process's shared memory (without the GIL); that process frames, checksums
and sends them, so publishing costs the engine's interpreter next to
nothing. Plain ``SET``, not
``SET NX``: a rewrite refreshes a hot block's expiry and repairs a corrupt
value. Rewrites are kept rare by a bounded LRU of the keys this process
wrote recently (or, without a ttl, read), skipped while younger than half
the ttl. A key that a fetch finds missing or invalid leaves that set, and so
do the keys after it in that fetch; after a connection fault (the server may
have restarted empty) every key does; the next publish writes them again.
The thunk may not be called at all (every key recent, job dropped, tier
closed).

Faults. Every server call has a socket timeout (connect and read) of
``timeout`` seconds and no retries. A connection error or a timeout puts the
tier in back-off for ``retry_after`` seconds: fetches answer ``[]`` at once
and publishes are dropped, so a dead or hung server costs each thread at
most one timeout per back-off period. A full server (``maxmemory`` with the
``noeviction`` policy: ``OOM`` replies) fails writes, which are counted and
pause writing (not reading) for ``retry_after``. A restarted server has lost
its keys: plain misses. Nothing the server does raises into the cache;
caller mistakes (unbound tier, keys that are not block keys, a second,
different layout) raise kvforge errors.

Expiry and eviction. ``ttl`` (seconds) expires blocks nobody rewrites;
without it blocks live until the server evicts them: run the server with
``maxmemory`` and an ``allkeys-lru`` (or ``allkeys-lfu``) policy for a cache
that keeps the hot prefixes, or ``volatile-*`` with a ttl.

Secrets. The URL may carry a password (``rediss://`` for TLS); it never
appears in a log line, repr or exception message.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict, deque
from dataclasses import fields
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from kvforge.core.keys import DIGEST, check_keys
from kvforge.errors import ConfigError, MissingExtraError
from kvforge.storage import redis_reader
from kvforge.storage.redis_wire import FORMAT_VERSION, HEADER, MAGIC, NAMESPACE, Refusal, check_value, digest_of
from kvforge.storage.redis_wire import frame as frame_value
from kvforge.storage.redis_wire import redact as _redact
from kvforge.storage.redis_wire import secrets_of as _secrets_of
from kvforge.storage.remote import HeldPayloads, HeldRun, RemoteLayout, RemoteStats

__all__ = ["FORMAT_VERSION", "HEADER", "MAGIC", "RedisTier", "RemoteStats"]

log = logging.getLogger(__name__)

_STAT_NAMES = tuple(f.name for f in fields(RemoteStats))

#: seconds between two log lines of one kind of fault
_LOG_EVERY = 30.0
#: bytes a fetch connection reads from its socket at once (redis-py's default is 64 KiB): every read
#: gives up and takes back the GIL, and each take-back can wait a switch interval behind the step loop
_READ_SIZE = 4 << 20
#: fetches of fewer value bytes say more about latency than bandwidth: not measured
_MEASURE_BYTES = 1 << 20
#: the least value bytes a reader process is given of a fetch split over several
_PART_BYTES = 16 << 20
#: weight of the newest fetch in the running mean of the read bandwidth
_EMA_WEIGHT = 0.3


class _Job(NamedTuple):
    keys: list[bytes]
    payloads: Callable[[], Sequence[Any]]


def _import_redis() -> Any:
    try:
        import redis
        import redis.backoff
        import redis.retry
    except ImportError as exc:
        raise MissingExtraError('RedisTier needs the redis client: pip install redis '
                                '(or pip install "kvforge[remote]")') from exc
    return redis


def _releaser(runs: list[tuple[redis_reader.ReaderProcess, int, int]]) -> Callable[[Any], None]:
    """The release of a :class:`HeldPayloads` over ``runs``: each slot back to its process."""
    def release(ready: Callable[[], bool] | None) -> None:
        for proc, slot, _ in runs:
            proc.release_slot(slot, ready)
    return release


class RedisTier:
    """A :class:`~kvforge.storage.remote.RemoteTier` on a Redis server (see the module docstring).

    Owns three connection pools (one for :meth:`fetch`, one for :meth:`lookup`
    with the shorter ``lookup_timeout``, one for the writer thread), the writer
    thread and its queue, and with ``reader="process"`` (``"auto"``: where the
    platform allows, Linux) the reader process that fetches.
    ``model`` names the weights when the cache's layout does not; ``ttl`` is
    in seconds (None: no expiry); ``timeout`` bounds every server call;
    ``max_pending`` publish jobs may wait; ``batch_size`` keys go in one
    ``MGET`` or pipeline, and a fetch keeps ``fetch_threads`` such ``MGET`` in
    flight; ``retry_after`` seconds of back-off follow a connection fault.
    ``reader`` (``"auto"``, ``"process"``, ``"thread"``) says where fetches run,
    ``reader_processes`` how many reader processes a large fetch is split over
    (None: a quarter of the cores, 1 to 4). Nothing connects before the first
    call; the reader processes start at :meth:`bind` (:meth:`wait_ready`)."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", namespace: str = "default", *,
                 model: str | None = None, ttl: float | None = None, timeout: float = 0.25,
                 max_pending: int = 256, batch_size: int = 32, retry_after: float = 1.0,
                 recent_keys: int = 65536, fetch_budget: float = 2.0, check_threads: int = 4,
                 fetch_threads: int = 2, lookup_timeout: float = 0.05, reader: str = "auto",
                 reader_processes: int | None = None) -> None:
        self._url = url
        self._options = dict(url=url, namespace=namespace, model=model, ttl=ttl, timeout=timeout,
                             max_pending=max_pending, batch_size=batch_size, retry_after=retry_after,
                             recent_keys=recent_keys, fetch_budget=fetch_budget, check_threads=check_threads,
                             fetch_threads=fetch_threads, lookup_timeout=lookup_timeout, reader=reader,
                             reader_processes=reader_processes)
        self._secrets = _secrets_of(url)
        where = f"RedisTier({_redact(url)!r})"
        if type(namespace) is not str or not NAMESPACE.fullmatch(namespace):
            raise ConfigError(f"{where}: namespace {namespace!r} is not a safe name: 1 to 64 letters, digits, "
                              f"'.', '_' or '-', starting with a letter or digit")
        if model is not None and (type(model) is not str or not model):
            raise ConfigError(f"{where}: model must be a non-empty string or None, got {model!r}")
        if ttl is not None and not (isinstance(ttl, (int, float)) and ttl >= 0.001):
            raise ConfigError(f"{where}: ttl must be None or at least 0.001 seconds, got {ttl!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ConfigError(f"{where}: timeout must be a positive number of seconds, got {timeout!r}")
        if not (isinstance(lookup_timeout, (int, float)) and lookup_timeout > 0):
            raise ConfigError(f"{where}: lookup_timeout must be a positive number of seconds, got {lookup_timeout!r}")
        if not (isinstance(fetch_budget, (int, float)) and fetch_budget > 0):
            raise ConfigError(f"{where}: fetch_budget must be a positive number of seconds, got {fetch_budget!r}")
        for name, value in (("check_threads", check_threads), ("fetch_threads", fetch_threads)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{where}: {name} must be an int >= 1, got {value!r}")
        if reader not in ("auto", "process", "thread"):
            raise ConfigError(f"{where}: reader must be 'auto', 'process' or 'thread', got {reader!r}")
        if reader_processes is not None and (type(reader_processes) is not int or reader_processes < 1):
            raise ConfigError(f"{where}: reader_processes must be None or an int >= 1, got {reader_processes!r}")
        if reader == "process" and not redis_reader.available():
            raise ConfigError(f"{where}: reader='process' needs os.memfd_create (Linux); use reader='thread'")
        if not (isinstance(retry_after, (int, float)) and retry_after >= 0):
            raise ConfigError(f"{where}: retry_after must be >= 0 seconds, got {retry_after!r}")
        for name, value in (("max_pending", max_pending), ("batch_size", batch_size), ("recent_keys", recent_keys)):
            if type(value) is not int or value < 1:
                raise ConfigError(f"{where}: {name} must be a positive int, got {value!r}")
        self.namespace = namespace
        self.model = model
        self.ttl = ttl
        self.timeout = float(timeout)
        self.lookup_timeout = min(float(lookup_timeout), self.timeout)
        self.fetch_budget = float(fetch_budget)
        self.check_threads = check_threads
        self._checkers: ThreadPoolExecutor | None = None  # checksums of a batch in parallel (made on first use)
        self.fetch_threads = fetch_threads
        self._fetchers: ThreadPoolExecutor | None = None  # batches in flight at once (made on first use)
        self._read_bandwidth: float | None = None
        #: where fetches run: "process" (a child process, :mod:`kvforge.storage.redis_reader`) or "thread"
        self.reader = ("process" if redis_reader.available() else "thread") if reader == "auto" else reader
        #: reader processes a large fetch is split over (None: a quarter of the cores, 1 to 4)
        self.reader_processes = (max(1, min(4, (os.cpu_count() or 1) // 4)) if reader_processes is None
                                 else reader_processes)
        self._processes: list[redis_reader.ReaderProcess] = []  # made at bind
        #: ``(register, unregister)`` for the reader processes' regions (:meth:`set_memory_hooks`)
        self._memory_hooks: tuple[Callable[[memoryview], Any], Callable[[Any], None]] | None = None
        self._writer_process: redis_reader.ReaderProcess | None = None  # frames and writes, for the writer thread
        self._read_lock = threading.Lock()  # one fetch at a time through the reader processes
        self._write_lock = threading.Lock()  # the writer process: the writer thread's, and wait_ready's
        self.retry_after = float(retry_after)
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.recent_keys = recent_keys
        self.layout: RemoteLayout | None = None
        self._fingerprint = b""
        self._prefix = b""

        redis = _import_redis()
        self._errors = redis.exceptions
        options = dict(socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                       retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), health_check_interval=0)
        try:  # two pools: a slow pipeline of the writer never holds up a fetch
            self._reader = redis.from_url(url, socket_read_size=_READ_SIZE, **options)
            self._writer = redis.from_url(url, **options)
            # lookups run on the scheduler's thread: a hung server may cost it only a short wait
            self._looker = redis.from_url(url, **dict(options, socket_timeout=self.lookup_timeout,
                                                      socket_connect_timeout=self.lookup_timeout))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: not a Redis URL ({self._scrub(str(exc))})") from None

        self._lock = threading.Lock()  # counters, back-off times, the recent set
        self._counts = dict.fromkeys(_STAT_NAMES, 0)
        self._down_until = 0.0  # back-off: no call to the server before this (monotonic)
        self._writes_paused_until = 0.0  # server full: no writes before this
        self._last_log: dict[str, float] = {}
        self._recent: OrderedDict[bytes, float] = OrderedDict()  # key -> when written or read
        self._jobs: queue.Queue[_Job | None] = queue.Queue(max_pending)
        self._idle = threading.Condition()
        self._num_pending = 0  # jobs queued or being written
        self._closed = False
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"RedisTier(url={_redact(self._url)!r}, namespace={self.namespace!r})"

    # ------------------------------------------------------------------ binding
    def options(self) -> dict[str, Any]:
        """The arguments this tier was built with, the URL (and so its password) included: what
        another process needs to open the same tier (tensor parallelism's ranks; never logged)."""
        return dict(self._options)

    def bind(self, layout: RemoteLayout) -> None:
        """Take the cache's layout (its empty ``model`` filled from the tier's); start the writer.
        Binding again with the same layout does nothing; with another, ConfigError."""
        if not isinstance(layout, RemoteLayout):
            raise ConfigError(f"{self!r}.bind: expected a RemoteLayout, got {type(layout).__name__}")
        if type(layout.block_bytes) is not int or layout.block_bytes < 1:
            raise ConfigError(f"{self!r}.bind: block_bytes must be a positive int, got {layout.block_bytes!r}")
        if layout.model and self.model and layout.model != self.model:
            raise ConfigError(f"{self!r}.bind: the cache's model {layout.model!r} differs from the tier's "
                              f"model {self.model!r}")
        model = layout.model or self.model
        if not model:
            raise ConfigError(f"{self!r}.bind: a model identity is needed (the layout has none): "
                              f"pass RedisTier(..., model=<checkpoint name or hash>)")
        layout = layout._replace(model=model)
        if self.layout is not None:
            if layout != self.layout:
                raise ConfigError(f"{self!r}.bind: already bound to {self.layout}, refused {layout}")
            return
        if self._closed:
            raise ConfigError(f"{self!r}.bind: the tier is closed")
        self.layout = layout
        self._fingerprint = layout.fingerprint()
        self._prefix = f"kvforge:{self.namespace}:{self._fingerprint.hex()}:".encode()
        self._thread = threading.Thread(target=self._write_loop, name=f"kvforge-redis-{self.namespace}",
                                        daemon=True)
        self._thread.start()
        if self.reader == "process":
            self._start_processes(layout)

    def _start_processes(self, layout: RemoteLayout) -> None:
        """Make and start the reader and writer processes for ``layout``'s names."""
        self._processes = [redis_reader.ReaderProcess(
            self._url, block_bytes=layout.block_bytes, fingerprint=self._fingerprint, prefix=self._prefix,
            timeout=self.timeout, batch_size=self.batch_size, fetch_threads=self.fetch_threads,
            check_threads=self.check_threads, read_size=_READ_SIZE) for _ in range(self.reader_processes)]
        self._writer_process = redis_reader.ReaderProcess(
            self._url, block_bytes=layout.block_bytes, fingerprint=self._fingerprint, prefix=self._prefix,
            timeout=self.timeout, batch_size=self.batch_size, fetch_threads=1,
            check_threads=self.check_threads, read_size=_READ_SIZE,
            slot_bytes=self.batch_size * layout.block_bytes)
        for proc in self._processes + [self._writer_process]:
            if not self._start_reader(proc):
                break

    def set_memory_hooks(self, register: Callable[[memoryview], Any], unregister: Callable[[Any], None]) -> None:
        """Have every region that :meth:`fetch_held` lends from registered: ``register(view)``
        (a writable view of the whole region) is called once per region, now and for regions
        made later (a rebind), and its result, unless None (not registered), is handed to
        ``unregister`` before the region is unmapped. The cache passes page-locking hooks
        (``cudaHostRegister``) so that its uploads from lent payloads run asynchronously."""
        with self._read_lock:
            self._memory_hooks = (register, unregister)
            for proc in self._processes:
                self._register_region(proc)

    def _register_region(self, proc: redis_reader.ReaderProcess) -> None:
        hooks = self._memory_hooks
        if hooks is None or proc.pinned is not None or proc.region is None:
            return
        try:
            proc.pinned = hooks[0](memoryview(proc.region))
        except Exception as exc:  # a hook that fails leaves the region unregistered: uploads are staged
            self._log("register", f"{self!r}: registering a reader region failed: {type(exc).__name__}: {exc}")

    def _close_process(self, proc: redis_reader.ReaderProcess) -> None:
        hooks = self._memory_hooks
        try:
            proc.close(None if hooks is None else hooks[1])
        except Exception as exc:  # unregistering failed: the region stays mapped
            self._log("register", f"{self!r}: closing a reader region failed: {type(exc).__name__}: {exc}")

    @property
    def unused(self) -> bool:
        """Whether no fetch, lookup or publish was asked of the tier yet (it may be bound again)."""
        with self._lock:
            c = self._counts
            return not (c["fetch_calls"] or c["lookup_calls"] or c["publish_jobs"])

    def rebind(self, layout: RemoteLayout) -> None:
        """Bind again to another layout (a cache whose fp8 scales were set after it bound the
        tier) while the tier is still :attr:`unused`; its reader and writer processes start
        again with the new names. ConfigError once it was used, or when closed."""
        self._check_bound("rebind")
        if not isinstance(layout, RemoteLayout):
            raise ConfigError(f"{self!r}.rebind: expected a RemoteLayout, got {type(layout).__name__}")
        if not self.unused:
            raise ConfigError(f"{self!r}.rebind: the tier was used with {self.layout}; it cannot change layout")
        if self._closed:
            raise ConfigError(f"{self!r}.rebind: the tier is closed")
        assert self.layout is not None
        if layout == self.layout:
            return
        probe = layout._replace(model=layout.model or self.layout.model, quant=self.layout.quant)
        if probe != self.layout:
            raise ConfigError(f"{self!r}.rebind: only the quantization scales may change "
                              f"({self.layout} -> {layout})")
        layout = layout._replace(model=probe.model)
        with self._read_lock, self._write_lock:
            for proc in self._processes + ([self._writer_process] if self._writer_process else []):
                self._close_process(proc)
            self.layout = layout
            self._fingerprint = layout.fingerprint()
            self._prefix = f"kvforge:{self.namespace}:{self._fingerprint.hex()}:".encode()
            if self.reader == "process":
                self._start_processes(layout)

    def name_of(self, key: bytes) -> bytes:
        """The Redis key a block key is stored under (bound tiers only)."""
        self._check_bound("name_of")
        return self._prefix + key.hex().encode()

    def frame(self, key: bytes, payload: Any) -> bytes:
        """The value stored for one payload (header + payload bytes)."""
        return frame_value(self._fingerprint, key, payload)

    # ------------------------------------------------------------------ reads
    def fetch(self, keys: Sequence[bytes]) -> list[memoryview]:
        """The payloads of the longest valid run of ``keys`` from the first (read-only
        memoryviews of ``layout.block_bytes`` bytes); ``[]`` in back-off, when closed,
        or on any server fault. Waits at most about ``fetch_budget + timeout``: no batch
        starts after ``fetch_budget`` seconds, and each call has its own socket timeout
        (a dead or hung server costs one ``timeout``, then back-off). Up to
        ``fetch_threads`` batches are in flight at once; checksums of a batch are
        computed on ``check_threads`` threads while the next batches arrive."""
        self._check_bound("fetch")
        check_keys(keys, "RedisTier.fetch keys")
        keys = list(keys)
        self._add(fetch_calls=1, keys_asked=len(keys))
        out: list[memoryview] = []
        if not keys or self._closed:
            self._add(misses=len(keys))
            return out
        start = time.monotonic()
        if start < self._down_until:
            self._add(backoff_fetches=1, misses=len(keys))
            return out
        if self._processes:
            return self._fetch_in_process(keys, start, hold=False)  # type: ignore[return-value]
        nbytes = 0
        batches = [keys[lo:lo + self.batch_size] for lo in range(0, len(keys), self.batch_size)]
        for lo, (batch, values) in zip(range(0, len(keys), self.batch_size),
                                       self._batches(batches, start + self.fetch_budget)):
            if values is None:  # a fault, or the budget spent
                break
            run = 0
            digests = self._digests(values)
            for key, value, digest in zip(batch, values, digests):
                if value is None:
                    break
                nbytes += len(value)
                payload = self._check(key, value, digest)
                if payload is None:
                    break
                out.append(payload)
                run += 1
            if run < len(batch):  # the rest of the chain is useless without this block: write it all again
                self._forget(keys[lo + run:])
                break
        self._add(hits=len(out), misses=len(keys) - len(out), bytes_read=nbytes)
        self._measure(nbytes, time.monotonic() - start)
        if self.ttl is None:  # with a ttl, a read says nothing of when the value expires
            self._remember(keys[:len(out)])
        return out

    def fetch_held(self, keys: Sequence[bytes]) -> HeldPayloads | None:
        """:meth:`fetch`'s run, left where the reader processes checked it and lent
        (:class:`~kvforge.storage.remote.HeldPayloads`: the borrower releases it, with the
        ``ready`` of its last copy from it); None when the tier has no reader processes
        (``reader="thread"``) or the keys are more than half of what the free slots hold:
        call :meth:`fetch` then (copied out in rounds). Until released, the lent slots are
        not reused: a fetch that finds none free for a round stops there (``slots_full``)."""
        self._check_bound("fetch_held")
        if not self._processes:
            return None
        if len(keys) > sum(p.num_free_slots * p.blocks_per_slot for p in self._processes) // 2:
            return None
        check_keys(keys, "RedisTier.fetch_held keys")
        keys = list(keys)
        self._add(fetch_calls=1, keys_asked=len(keys))
        if not keys or self._closed:
            self._add(misses=len(keys))
            return HeldPayloads([], True, None)
        start = time.monotonic()
        if start < self._down_until:
            self._add(backoff_fetches=1, misses=len(keys))
            return HeldPayloads([], True, None)
        got = self._fetch_in_process(keys, start, hold=True)
        assert isinstance(got, HeldPayloads)
        return got

    def _fetch_in_process(self, keys: list[bytes], start: float, hold: bool) -> list[memoryview] | HeldPayloads:
        """:meth:`fetch` (or with ``hold``, :meth:`fetch_held`) through the reader processes:
        the keys split in contiguous parts of at least ``batch_size`` (one process each, all at
        once; those with the most free slots first); the run is the parts' payloads up to the
        first part that came back short. Outcomes are counted as in-process fetches count theirs."""
        with self._read_lock:
            for proc in self._processes:  # one that died since is restarted by its part (its pipe says)
                if not proc.is_started and not self._start_reader(proc):
                    self._add(misses=len(keys))
                    return HeldPayloads([], True, None) if hold else []
            # a part per process, of at least a batch and _PART_BYTES: each costs this side a few GIL hand-offs
            assert self.layout is not None
            per = max(self.batch_size, -(-_PART_BYTES // self.layout.block_bytes))
            k = max(1, min(len(self._processes), len(keys) // per))
            bounds = [len(keys) * i // k for i in range(k + 1)]
            parts = [keys[bounds[i]:bounds[i + 1]] for i in range(k)]
            procs = sorted(self._processes, key=lambda p: -p.num_free_slots)[:k] if hold else self._processes[:k]
            outcomes = redis_reader.fetch_parts(procs, parts, self.fetch_budget, hold=hold)
        out: list[memoryview] = []
        runs: list[tuple[redis_reader.ReaderProcess, int, int]] = []  # hold: (process, slot, blocks)
        nbytes = found = 0
        short = False
        for lo, part, proc, got in zip(bounds, parts, procs, outcomes):
            nbytes += got.nbytes
            if got.restarted:
                self._add(reader_starts=1)
            if got.stop == "refused":
                self._refuse(got.kind, part[got.num_blocks], got.what)
            elif got.stop == "fault" and got.kind == "server_errors":
                self._add(server_errors=1)
                self._log("server_error", f"{self!r}: fetch: {self._scrub(got.what)}")
            elif got.stop in ("fault", "reader"):
                self._back_off(got.kind, "fetch", got.what)
            elif got.stop == "slots":
                self._add(slots_full=1)
            if short:  # after a gap: useless, only counted (and its slots handed back)
                for slot, _ in got.runs:
                    proc.release_slot(slot)
                continue
            out += got.payloads
            runs += [(proc, slot, n) for slot, n in got.runs]
            found += got.num_blocks
            if got.num_blocks < len(part):
                short = True
                if got.stop in ("miss", "refused"):  # the rest of the chain is useless without this block
                    self._forget(keys[lo + got.num_blocks:])
        self._add(hits=found, misses=len(keys) - found, bytes_read=nbytes)
        self._measure(nbytes, time.monotonic() - start)
        if self.ttl is None:
            self._remember(keys[:found])
        if not hold:
            return out
        return HeldPayloads([HeldRun(proc.slot_view(slot, n), n) for proc, slot, n in runs],
                            all(proc.pinned is not None for proc, _, _ in runs),
                            _releaser(runs) if runs else None)

    def _start_reader(self, proc: redis_reader.ReaderProcess) -> bool:
        """Start a reader process (counted); False (counted, back-off) when it cannot be."""
        try:
            proc.start()
        except OSError as exc:
            self._back_off("reader_errors", "starting the reader process", f"{type(exc).__name__}: {exc}")
            return False
        self._add(reader_starts=1)
        if proc in self._processes:
            self._register_region(proc)
        return True

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the reader process is up (it starts at :meth:`bind`, in the
        background, and takes a fraction of a second); True at once for ``reader="thread"``.
        A fetch before it is ready waits for it; a benchmark or a test of timings calls this first."""
        self._check_bound("wait_ready")
        deadline = time.monotonic() + timeout
        with self._read_lock:
            if not all(p.alive and p.wait_ready(max(0.0, deadline - time.monotonic())) for p in self._processes):
                return False
        writer = self._writer_process
        if writer is None:
            return True
        with self._write_lock:
            return writer.alive and writer.wait_ready(max(0.0, deadline - time.monotonic()))

    @property
    def reader_pid(self) -> int | None:
        """The first reader process's id (None: reads run on threads, or it is not running)."""
        return self._processes[0].pid if self._processes else None

    @property
    def writer_pid(self) -> int | None:
        """The writer process's id (None: writes run on this process's writer thread, or it is not running)."""
        return None if self._writer_process is None else self._writer_process.pid

    @property
    def reader_pids(self) -> list[int | None]:
        """Every reader process's id (None where one is not running); [] with ``reader="thread"``."""
        return [p.pid for p in self._processes]

    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys``, from the first, the server holds now: one round trip of
        pipelined ``EXISTS``, no value read or checked (a fetch may still refuse one);
        0 in back-off, when closed, or on a fault. Its socket timeout is
        ``lookup_timeout`` (50 ms, at most ``timeout``): a hung server costs the
        caller that, then back-off. The engine asks this before it
        decides whether fetching is worth it, so a prompt the tier lacks waits for nothing.
        Without a ttl the keys found join the recent set: a cache that computes them
        instead of fetching does not write them again."""
        self._check_bound("lookup")
        check_keys(keys, "RedisTier.lookup keys")
        keys = list(keys)
        self._add(lookup_calls=1)
        if not keys or self._closed or time.monotonic() < self._down_until:
            return 0

        def exists() -> list[int]:
            pipe = self._looker.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self.name_of(key))
            return pipe.execute()
        found = self._call("lookup", exists)
        n = 0
        for present in found or ():
            if not present:
                break
            n += 1
        if self.ttl is None:  # the server has them: a publish need not write them (unless a fetch refuses one)
            self._remember(keys[:n])
        return n

    def _batches(self, batches: list[list[bytes]], deadline: float) -> Iterator[tuple[list[bytes], Any]]:
        """``(batch, values)`` in order, values None after a fault or once ``deadline``
        passed before the batch started (never for the first); ``fetch_threads``
        batches in flight. The caller stops reading at the first miss: batches not
        started then are cancelled, those on the wire are discarded."""
        def get(i: int) -> Any:
            if i and time.monotonic() > deadline:
                return None
            return self._call("fetch", self._reader.mget, [self.name_of(k) for k in batches[i]])
        if self.fetch_threads == 1 or len(batches) == 1:
            for i, batch in enumerate(batches):
                values = get(i)
                yield batch, values
                if values is None:
                    return
            return
        if self._fetchers is None:
            with self._lock:  # fetch may run on several threads (the cache's, a prefetcher)
                if self._fetchers is None:
                    self._fetchers = ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="kvforge-redis-fetch")
        pending = deque(self._fetchers.submit(get, i) for i in range(min(self.fetch_threads, len(batches))))
        try:
            for i, batch in enumerate(batches):
                values = pending.popleft().result()
                if values is not None and i + len(pending) + 1 < len(batches):
                    pending.append(self._fetchers.submit(get, i + len(pending) + 1))
                yield batch, values
                if values is None:
                    return
        finally:
            for future in pending:
                future.cancel()

    def _measure(self, nbytes: int, seconds: float) -> None:
        """Fold a fetch of at least :data:`_MEASURE_BYTES` into :attr:`read_bandwidth`."""
        if nbytes < _MEASURE_BYTES or seconds <= 0:
            return
        rate = nbytes / seconds
        with self._lock:
            old = self._read_bandwidth
            self._read_bandwidth = rate if old is None else (1 - _EMA_WEIGHT) * old + _EMA_WEIGHT * rate

    @property
    def read_bandwidth(self) -> float | None:
        """Bytes per second of recent fetches (value bytes over the time from the call to
        the checked payloads), a running mean over fetches of at least 1 MiB; None
        before the first. The engine compares it with its prefill rate to decide
        whether fetching a prompt's blocks beats computing them."""
        return self._read_bandwidth

    def _digests(self, values: Sequence[bytes | None]) -> list[bytes | None]:
        """BLAKE2b-128 of each value's payload (None: no value), computed in parallel:
        ``hashlib`` releases the GIL on large buffers, so a batch's checks use several cores."""
        digest = digest_of
        big = sum(len(v) for v in values if v is not None) > 1 << 20
        if self.check_threads == 1 or not big:
            return [digest(v) for v in values]
        if self._checkers is None:
            with self._lock:
                if self._checkers is None:
                    self._checkers = ThreadPoolExecutor(self.check_threads, thread_name_prefix="kvforge-redis-check")
        return list(self._checkers.map(digest, values))

    def _check(self, key: bytes, value: bytes, digest: bytes | None) -> memoryview | None:
        """The payload of ``value`` if every check passes; None (refusal counted) otherwise."""
        assert self.layout is not None
        got = check_value(value, key, self._fingerprint, self.layout.block_bytes, digest)
        if isinstance(got, Refusal):
            return self._refuse(got.kind, key, got.what)
        return got

    def _refuse(self, kind: str, key: bytes, what: str) -> None:
        self._add(**{kind: 1})
        self._log(kind, f"{self!r}: refused the value of block {key.hex()} ({kind}: {what})")
        return None

    # ------------------------------------------------------------------ writes
    def publish(self, keys: Sequence[bytes], payloads: Callable[[], Sequence[Any]]) -> None:
        """Queue these blocks for the writer thread; returns at once. ``payloads()``
        (called on the writer thread, maybe never) returns one payload per key, each
        a buffer of ``layout.block_bytes`` bytes. Dropped (counted) when the queue is
        full, in back-off, while the server is full, or after :meth:`close`."""
        self._check_bound("publish")
        check_keys(keys, "RedisTier.publish keys")
        if not callable(payloads):
            raise ConfigError(f"{self!r}.publish: payloads must be a callable returning the payloads")
        self._add(publish_jobs=1)
        if not keys:
            return
        now = time.monotonic()
        if self._closed or now < self._down_until or now < self._writes_paused_until:
            self._add(dropped_jobs=1)
            return
        with self._idle:
            self._num_pending += 1
        try:
            self._jobs.put_nowait(_Job(list(keys), payloads))
        except queue.Full:
            self._add(dropped_jobs=1)
            self._done()
            self._log("queue_full", f"{self!r}: publish queue full ({self.max_pending} jobs), dropping writes")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every publish issued so far was written or dropped; False when
        ``timeout`` seconds pass first (None: no limit; each job is itself bounded by
        the server timeouts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._num_pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self) -> None:
        """Flush (waiting at most ``timeout``), stop the writer (jobs left are dropped,
        counted), close the connections. Later fetches answer ``[]``, publishes drop."""
        if self._closed:
            return
        self.flush(self.timeout)
        self._closed = True
        if self._thread is not None:
            try:  # the writer drops what is queued (closed), so room comes at once
                self._jobs.put(None, timeout=self.timeout + 1.0)
            except queue.Full:
                pass
            self._thread.join(self.timeout + 1.0)
        with self._read_lock:
            for proc in self._processes:
                self._close_process(proc)
        if self._writer_process is not None:
            with self._write_lock:
                self._writer_process.close()
        for client in (self._reader, self._writer, self._looker):
            try:
                client.close()
            except Exception:  # closing a broken connection must not raise from close()
                pass
        for pool in (self._checkers, self._fetchers):
            if pool is not None:
                pool.shutdown(wait=False)

    def _write_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            try:
                if self._closed:
                    self._add(dropped_jobs=1)
                else:
                    self._write(job)
            except Exception as exc:  # never let the writer die: count it and go on
                self._add(write_errors=len(job.keys))
                self._log("writer", f"{self!r}: writer failed on a job: {type(exc).__name__}: "
                          f"{self._scrub(str(exc))}")
            finally:
                self._done()
        while True:  # closed: whatever is left is dropped
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._add(dropped_jobs=1)
                self._done()

    def _write(self, job: _Job) -> None:
        now = time.monotonic()
        if now < self._down_until or now < self._writes_paused_until:
            self._add(dropped_jobs=1)
            return
        todo = [i for i, key in enumerate(job.keys) if not self._is_recent(key, now)]
        self._add(skipped_blocks=len(job.keys) - len(todo))
        if not todo:
            return
        assert self.layout is not None
        try:
            payloads = job.payloads()
            if len(payloads) != len(job.keys):
                raise ValueError(f"{len(payloads)} payloads for {len(job.keys)} keys")
            views = {i: memoryview(payloads[i]).cast("B") for i in todo}
        except Exception as exc:  # the cache's thunk (a device copy) failed: nothing to write
            self._add(payload_errors=1)
            self._log("payload", f"{self!r}: a publish's payloads failed: {type(exc).__name__}: {exc}")
            return
        px = None if self.ttl is None else max(1, int(self.ttl * 1000))
        for lo in range(0, len(todo), self.batch_size):
            names, values, keys = [], [], []
            for i in todo[lo:lo + self.batch_size]:
                data = views[i]
                if data.nbytes != self.layout.block_bytes:
                    self._add(payload_errors=1)
                    self._log("payload", f"{self!r}: payload of block {job.keys[i].hex()} has {data.nbytes} "
                              f"bytes, the layout {self.layout.block_bytes}")
                    continue
                keys.append(job.keys[i])
                names.append(self.name_of(job.keys[i]))
                # with a writer process, the payload goes there and is framed there
                values.append(data if self._writer_process is not None else self.frame(job.keys[i], data))
            if not names:
                continue
            if self._writer_process is not None:
                results = self._set_in_process(keys, values, px)
            else:
                pipe = self._writer.pipeline(transaction=False)
                for name, value in zip(names, values):
                    pipe.set(name, value, px=px)
                results = self._call("publish", pipe.execute, raise_on_error=False)
                values = [len(v) for v in values]
            if results is None:  # connection fault: in back-off now, the rest of the job is dropped
                self._add(dropped_jobs=1)
                return
            ok = [k for k, r in zip(keys, results) if not isinstance(r, Exception)]
            errors = [r for r in results if isinstance(r, Exception)]
            self._add(blocks_written=len(ok), write_errors=len(errors),
                      bytes_written=sum(n for n, r in zip(values, results) if not isinstance(r, Exception)))
            self._remember(ok)
            if errors:
                full = any(str(e).startswith("OOM") or isinstance(e, getattr(self._errors, "OutOfMemoryError", ()))
                           for e in errors)
                if full:
                    self._writes_paused_until = time.monotonic() + self.retry_after
                self._log("write_error", f"{self!r}: the server refused {len(errors)} writes: "
                          f"{self._scrub(str(errors[0]))}" + (f"; writes paused {self.retry_after} s" if full else ""))
                if full:
                    self._add(dropped_jobs=1)
                    return

    def _set_in_process(self, keys: list[bytes], payloads: list[Any], px: int | None) -> list[Any] | None:
        """One batch through the writer process: per key an exception (the server refused it) or
        the value's size; None after a fault (counted; connection faults and a dead or hung
        writer process back off). ``payloads`` becomes the value sizes."""
        proc = self._writer_process
        assert proc is not None
        with self._write_lock:
            if not proc.alive and not self._start_reader(proc):
                return None
            batches = -(-len(keys) // self.batch_size)
            reply = proc.write(keys, payloads, px, (batches + 1) * self.timeout + redis_reader.GRACE)
        if reply is None:
            self._back_off("reader_errors", "publish", "the writer process died or hung")
            return None
        if reply["stop"] == "fault":
            if reply["kind"] == "server_errors":
                self._add(server_errors=1)
                self._log("server_error", f"{self!r}: publish: {self._scrub(reply['what'])}")
            else:
                self._back_off(reply["kind"], "publish", reply["what"])
            return None
        payloads[:] = [HEADER.size + len(p) for p in payloads]
        errors = self._errors
        kinds = {"OutOfMemoryError": getattr(errors, "OutOfMemoryError", errors.ResponseError)}
        return [None if e is None else kinds.get(e[0], errors.ResponseError)(e[1]) for e in reply["errors"]]

    # ------------------------------------------------------------------ faults
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)``, or None after a fault (counted; connection faults start a back-off)."""
        errors = self._errors
        try:
            return fn(*args, **kwargs)
        except errors.TimeoutError as exc:
            self._back_off("timeouts", what, f"{type(exc).__name__}: {exc}")
        except (errors.ConnectionError, OSError) as exc:
            self._back_off("connection_errors", what, f"{type(exc).__name__}: {exc}")
        except errors.RedisError as exc:
            self._add(server_errors=1)
            self._log("server_error", f"{self!r}: {what}: server error: {self._scrub(str(exc))}")
        return None

    def _back_off(self, kind: str, what: str, message: str) -> None:
        self._add(**{kind: 1})
        self._down_until = time.monotonic() + self.retry_after
        if kind != "reader_errors":  # the server may come back empty (restarted): nothing written counts as there
            with self._lock:
                self._recent.clear()
        self._log(kind, f"{self!r}: {what}: {self._scrub(message)}; no calls for {self.retry_after} s")

    def _scrub(self, text: str) -> str:
        """``text`` without any secret of the URL (server and client messages may quote it)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _log(self, kind: str, message: str) -> None:
        """A warning, at most one per kind every :data:`_LOG_EVERY` seconds."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_log.get(kind, -_LOG_EVERY) < _LOG_EVERY:
                return
            self._last_log[kind] = now
        log.warning("%s", self._scrub(message))

    # ------------------------------------------------------------------ bookkeeping
    def stats(self) -> RemoteStats:
        """A snapshot of the counters."""
        with self._lock:
            return RemoteStats(**self._counts)

    @property
    def is_backing_off(self) -> bool:
        """Whether the tier is in back-off after a connection fault (no server calls)."""
        return time.monotonic() < self._down_until

    @property
    def num_pending(self) -> int:
        """Publish jobs queued or being written."""
        return self._num_pending

    def check_invariants(self) -> None:
        with self._lock:
            c = dict(self._counts)
            assert all(v >= 0 for v in c.values()), c
            assert c["keys_asked"] == c["hits"] + c["misses"], c
            assert len(self._recent) <= self.recent_keys
        assert 0 <= self._num_pending <= self.max_pending + 1
        if self.layout is not None:
            assert self._fingerprint == self.layout.fingerprint() and len(self._fingerprint) == DIGEST

    def _check_bound(self, what: str) -> None:
        if self.layout is None:
            raise ConfigError(f"{self!r}.{what}: the tier is not bound (KVCache calls bind(layout) first)")

    def _add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                self._counts[name] += n

    def _done(self) -> None:
        with self._idle:
            self._num_pending -= 1
            if not self._num_pending:
                self._idle.notify_all()

    def needs_write(self, keys: Sequence[bytes]) -> list[bool]:
        """For each key, whether a publish would write it (False: this process wrote or
        read it recently). Lets the cache skip copying blocks off the device for nothing."""
        now = time.monotonic()
        return [not self._is_recent(key, now) for key in keys]

    def _is_recent(self, key: bytes, now: float) -> bool:
        with self._lock:
            when = self._recent.get(key)
            if when is None:
                return False
            if self.ttl is not None and now - when >= self.ttl / 2:
                del self._recent[key]
                return False
            self._recent.move_to_end(key)
            return True

    def _remember(self, keys: Sequence[bytes]) -> None:
        if not keys:
            return
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._recent[key] = now
                self._recent.move_to_end(key)
            while len(self._recent) > self.recent_keys:
                self._recent.popitem(last=False)

    def _forget(self, keys: Sequence[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._recent.pop(key, None)
