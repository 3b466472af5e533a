"""Prometheus metrics for an embedded kvforge cache (and engine), read at scrape time.

Nothing is sampled in the background and nothing is added to the cache's hot
path: a :class:`KVForgeCollector` reads the cache's counters and gauges
when Prometheus scrapes. Names are prefixed ``kvforge_``; counters end in
``_total`` in the exposition.

Cache metrics (a :class:`~kvforge.storage.cache.KVCache`, or a bare
:class:`~kvforge.core.manager.BlockManager`): usage, blocks used / free /
evictable / backed / max / peak, device bytes and live key/value bytes,
internal and external fragmentation, memory efficiency, prefix hit rate and
its query/hit token counters, allocations, failed allocations, evictions,
compactions, blocks moved, bytes returned, time and duration of the last
compaction, active sequences and tokens.

Tier metrics: per tier, with a ``tier`` label (``device``, and ``host`` when
the cache has a host tier, ``CacheConfig(host_memory=...)``), the use, the
capacity, used and cached blocks and the bytes allocated
(:meth:`~kvforge.storage.KVCache.tier_usage`); the host tier's counters
(:meth:`~kvforge.storage.KVCache.host_stats`): blocks spilled, spills that
reused a host copy, blocks onboarded, blocks dropped, failed tier copies,
prompt tokens served from the host, blocks swapped (``direction`` ``out`` /
``in``) and bytes moved (``direction`` ``to_host`` / ``to_device``), and the
swapped-out sequences. The counters exist, at 0, without a host tier (so do
the device tier's series); the ``tier="host"`` series only with one. A bare
BlockManager has no memory: its bytes read 0.

Engine metrics: any object with a ``stats()`` method (or ``stats`` attribute)
returning a mapping (or an object with ``to_dict()``, such as
:class:`~kvforge.engine.EngineStats`). Its ``preemptions`` (or
``num_preemptions``) entry is exported as the counter
``kvforge_preemptions_total`` (0 when there is no engine or no such entry,
so the series always exists); every other numeric
entry ``key`` as ``kvforge_engine_<key>`` (a counter when the key ends in
``_total``, otherwise a gauge; booleans as 0/1; one level of nested mappings
is flattened with ``_``). Other values are not exportable and are left out.

A :class:`~kvforge.engine.Engine` may be passed in the cache's place
(``render(engine)``, ``serve(0, engine)``): an object with a ``cache`` and no
``pool`` is taken as the engine, its ``cache`` as the cache and its
``step_lock`` as the lock.

Threads: the scrape runs on the HTTP server's thread while the engine keeps
mutating the cache. Pass the ``lock`` the engine holds around a step to get
consistent snapshots; without one, a read that races a mutation is retried.

``prometheus-client`` is needed (``pip install "kvforge[metrics]"``); it is
imported on first use, so importing this module never fails.
"""
from __future__ import annotations

import errno
import logging
import numbers
import re
import threading
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from kvforge.errors import AddressInUseError, ConfigError, MissingExtraError, ServeError
from kvforge.tools.extras import install_hint

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

__all__ = ["KVForgeCollector", "MetricsServer", "make_registry", "render", "serve", "check_port", "METRIC_NAMES",
           "HOST_TIER_METRIC_NAMES", "REMOTE_METRIC_NAMES"]

log = logging.getLogger(__name__)

_PREEMPTION_KEYS = ("preemptions", "num_preemptions")

# (name, type, help); values are filled in by KVForgeCollector._cache_values
_CACHE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("kvforge_cache_usage_ratio", "gauge", "Blocks held by sequences over blocks backed by device memory."),
    ("kvforge_blocks_used", "gauge", "Blocks with a positive reference count."),
    ("kvforge_blocks_free", "gauge", "Blocks on the free list."),
    ("kvforge_blocks_evictable", "gauge", "Cached blocks nobody references (reusable, evicted when needed)."),
    ("kvforge_blocks_capacity", "gauge", "Blocks backed by device memory now."),
    ("kvforge_blocks_max", "gauge", "Most blocks the pool may hold."),
    ("kvforge_blocks_peak", "gauge", "Most blocks ever held at once."),
    ("kvforge_cache_bytes", "gauge", "Device bytes the cache's storage holds."),
    ("kvforge_live_kv_bytes", "gauge", "Bytes holding live keys and values."),
    ("kvforge_internal_fragmentation_ratio", "gauge", "Reserved token slots holding no token over reserved slots."),
    ("kvforge_external_fragmentation_ratio", "gauge",
     "Free blocks trapped below the highest block in use over free blocks."),
    ("kvforge_memory_efficiency_ratio", "gauge", "Bytes of live keys/values over bytes held on the device."),
    ("kvforge_prefix_cache_hit_rate", "gauge", "Prompt tokens found in the prefix cache over prompt tokens looked up."),
    ("kvforge_sequences_active", "gauge", "Sequences in the cache."),
    ("kvforge_tokens_active", "gauge", "Tokens with a reserved slot, over all sequences."),
    ("kvforge_last_compaction_timestamp_seconds", "gauge", "Unix time of the last compaction (0: none)."),
    ("kvforge_last_compaction_duration_seconds", "gauge", "Duration of the last compaction."),
    ("kvforge_block_allocations", "counter", "Blocks handed out."),
    ("kvforge_block_deallocations", "counter", "Blocks whose reference count returned to zero."),
    ("kvforge_failed_allocations", "counter", "Allocations refused for lack of blocks."),
    ("kvforge_evictions", "counter", "Cached blocks evicted to make room."),
    ("kvforge_compactions", "counter", "Compactions run."),
    ("kvforge_compaction_blocks_moved", "counter", "Blocks moved by compactions."),
    ("kvforge_bytes_returned", "counter", "Device bytes handed back (compaction and shrinking)."),
    ("kvforge_prefix_cache_queries", "counter", "Prefix cache lookups."),
    ("kvforge_prefix_cache_query_tokens", "counter", "Prompt tokens looked up in the prefix cache."),
    ("kvforge_prefix_cache_hit_tokens", "counter", "Prompt tokens found in the prefix cache."),
)

# the host tier's unlabelled figures (0 without one), filled in by _host_values
_HOST_METRICS: tuple[tuple[str, str, str], ...] = (
    ("kvforge_sequences_swapped", "gauge", "Sequences swapped out to the host tier."),
    ("kvforge_host_spilled_blocks", "counter", "Cached device blocks evicted and copied to the host tier."),
    ("kvforge_host_spill_reuses", "counter", "Evicted device blocks whose host copy existed (nothing copied)."),
    ("kvforge_host_onboarded_blocks", "counter", "Host blocks copied back to the device for a prefix hit."),
    ("kvforge_host_dropped_blocks", "counter", "Host blocks dropped for good because the host tier was full."),
    ("kvforge_failed_tier_copies", "counter",
     "Copies between the device and the host tier that raised (nothing live was lost)."),
    ("kvforge_prefix_cache_host_hit_tokens", "counter",
     "Prompt tokens served from the host tier (counted in the prefix cache hit tokens too)."),
)

# (name, type, help, label, label values); one sample per label value, filled in by _labelled_values.
# The tier label's values are the tiers the cache has: "device", then "host" with a host tier.
_LABELLED_METRICS: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("kvforge_tier_usage_ratio", "gauge", "Blocks of the tier holding data (referenced or cached) over its "
     "capacity blocks.", "tier", ("device", "host")),
    ("kvforge_tier_blocks_capacity", "gauge", "Blocks the tier holds: the device's backed blocks, the host "
     "tier's budget.", "tier", ("device", "host")),
    ("kvforge_tier_blocks_used", "gauge", "Blocks of the tier holding data (referenced or cached).",
     "tier", ("device", "host")),
    ("kvforge_tier_blocks_cached", "gauge", "Blocks of the tier holding a prefix key (on the host also "
     "copies of cached device blocks).", "tier", ("device", "host")),
    ("kvforge_tier_allocated_bytes", "gauge", "Bytes allocated for the tier now (the host tier allocates "
     "on first use, pinned on a GPU machine).", "tier", ("device", "host")),
    ("kvforge_tier_bytes_moved", "counter", "Bytes copied between the device and the host tier.",
     "direction", ("to_host", "to_device")),
    ("kvforge_swapped_blocks", "counter", "Blocks copied by swaps: out to the host tier, in to the device.",
     "direction", ("out", "in")),
)

_PREEMPTIONS = ("kvforge_preemptions", "counter", "Requests preempted (blocks freed, recomputed later).")


def _sample(name: str, kind: str, label: str | None = None, value: str | None = None) -> str:
    base = name + "_total" if kind == "counter" else name
    return base if label is None else f'{base}{{{label}="{value}"}}'


#: Sample names a cache always exports, as they appear in the text format (labelled
#: samples with their label, ``kvforge_tier_blocks_used{tier="device"}``).
METRIC_NAMES: tuple[str, ...] = (
    tuple(_sample(name, kind) for name, kind, _ in _CACHE_METRICS) + ("kvforge_preemptions_total",)
    + tuple(_sample(name, kind) for name, kind, _ in _HOST_METRICS)
    + tuple(_sample(name, kind, label, v) for name, kind, _, label, values in _LABELLED_METRICS
            for v in values if v != "host")
)

#: Sample names a cache exports only when it has a host tier (its ``tier="host"`` series).
HOST_TIER_METRIC_NAMES: tuple[str, ...] = tuple(_sample(name, kind, label, "host")
                                                for name, kind, _, label, values in _LABELLED_METRICS
                                                if "host" in values)

_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
    except ImportError as exc:
        raise MissingExtraError(f"metrics need prometheus-client: {install_hint('metrics')}") from exc
    return prometheus_client


def check_port(port: Any, what: str = "port") -> int:
    """``port`` as an int if it is an integer in [0, 65535] (0: any free port); else
    :class:`~kvforge.errors.ConfigError` naming ``what`` and the value (bools and
    floats are refused, not truncated)."""
    if isinstance(port, bool) or not isinstance(port, numbers.Integral) or not 0 <= port <= 65535:
        raise ConfigError(f"{what} must be an integer in [0, 65535] (0: any free port), got {port!r:.60}")
    return int(port)


def _family(name: str, kind: str, doc: str, value: float | None = None) -> Metric:
    core = _prometheus().core
    fam = core.CounterMetricFamily(name, doc) if kind == "counter" else core.GaugeMetricFamily(name, doc)
    if value is not None:
        fam.add_metric([], float(value))
    return fam


def _labelled_family(name: str, kind: str, doc: str, label: str,
                     samples: Mapping[str, float] | None = None) -> Metric:
    core = _prometheus().core
    cls = core.CounterMetricFamily if kind == "counter" else core.GaugeMetricFamily
    fam = cls(name, doc, labels=[label])
    for value, v in (samples or {}).items():
        fam.add_metric([value], float(v))
    return fam


class KVForgeCollector:
    """A prometheus-client collector reading a cache (and optionally an engine) per scrape.

    ``cache`` is a KVCache or a BlockManager (None: the engine's ``cache``
    attribute), or an engine in the cache's place (an object with a
    ``cache`` and no ``pool``). ``lock`` defaults to the engine's
    ``step_lock``. The collector holds references only; it never mutates them.
    """

    def __init__(self, cache: Any = None, engine: Any = None, *, lock: threading.Lock | None = None) -> None:
        if cache is not None and not hasattr(cache, "pool") and hasattr(cache, "cache"):
            if engine is not None and engine is not cache:
                raise ConfigError(f"got two engines: {type(cache).__name__} in the cache's place and "
                                  f"{type(engine).__name__}")
            cache, engine = None, cache  # an Engine passed first
        if cache is None and engine is not None:
            cache = getattr(engine, "cache", None)
        if cache is None and engine is None:
            raise ConfigError("KVForgeCollector needs a cache, an engine, or both")
        if lock is None and engine is not None:
            lock = getattr(engine, "step_lock", None)
        self.cache = cache
        self.engine = engine
        self.lock = lock

    def describe(self) -> Iterator[Metric]:
        """The fixed cache families (engine entries are dynamic and not described)."""
        if self.cache is not None:
            for name, kind, doc in _CACHE_METRICS + _HOST_METRICS:
                yield _family(name, kind, doc)
            for name, kind, doc, label, _ in _LABELLED_METRICS:
                yield _labelled_family(name, kind, doc, label)
        yield _family(*_PREEMPTIONS)

    def collect(self) -> Iterator[Metric]:
        """Read everything now and yield the metric families."""
        for attempt in range(3):
            try:
                if self.lock is not None:
                    with self.lock:
                        families = self._read()
                else:
                    families = self._read()
                break
            except RuntimeError:  # a dict changed size under us: the engine was mid-step
                if attempt == 2:
                    raise
        yield from families

    def _read(self) -> list[Metric]:
        families: list[Metric] = []
        if self.cache is not None:
            values = _cache_values(self.cache)
            families += [_family(name, kind, doc, values[name]) for name, kind, doc in _CACHE_METRICS]
            host = _host_values(self.cache)
            families += [_family(name, kind, doc, host[name]) for name, kind, doc in _HOST_METRICS]
            labelled = _labelled_values(self.cache)
            families += [_labelled_family(name, kind, doc, label, labelled[name])
                         for name, kind, doc, label, _ in _LABELLED_METRICS]
            families += _remote_families(self.cache)
        engine = _engine_families(self.engine) if self.engine is not None else []
        if not any(f.name == _PREEMPTIONS[0] for f in engine):
            engine.insert(0, _family(*_PREEMPTIONS, 0))
        return families + engine


def _cache_values(target: Any) -> dict[str, float]:
    manager = getattr(target, "manager", target)
    pool, prefix = manager.pool, manager.prefix
    st = pool.stats
    ps = prefix.stats()
    if hasattr(target, "storage_bytes"):  # a KVCache
        device_bytes = target.storage_bytes
        live_bytes = target.live_kv_bytes()
        efficiency = target.memory_efficiency()
    else:  # bookkeeping only: count token slots
        device_bytes = live_bytes = 0
        slots = st.capacity_blocks * manager.block_size
        efficiency = manager.live_token_slots() / slots if slots else 0.0
    return {
        "kvforge_cache_usage_ratio": st.current_allocations / st.capacity_blocks if st.capacity_blocks else 0.0,
        "kvforge_blocks_used": st.current_allocations,
        "kvforge_blocks_free": st.free_blocks,
        "kvforge_blocks_evictable": st.evictable_blocks,
        "kvforge_blocks_capacity": st.capacity_blocks,
        "kvforge_blocks_max": st.num_blocks,
        "kvforge_blocks_peak": st.peak_allocations,
        "kvforge_cache_bytes": device_bytes,
        "kvforge_live_kv_bytes": live_bytes,
        "kvforge_internal_fragmentation_ratio": manager.internal_fragmentation(),
        "kvforge_external_fragmentation_ratio": pool.fragmentation_ratio(),
        "kvforge_memory_efficiency_ratio": efficiency,
        "kvforge_prefix_cache_hit_rate": ps.hit_rate,
        "kvforge_sequences_active": len(manager),
        "kvforge_tokens_active": manager.num_live_tokens(),
        "kvforge_last_compaction_timestamp_seconds": st.last_compaction_ms / 1e3,
        "kvforge_last_compaction_duration_seconds": st.last_compaction_duration_ms / 1e3,
        "kvforge_block_allocations": st.total_allocations,
        "kvforge_block_deallocations": st.total_deallocations,
        "kvforge_failed_allocations": st.failed_allocations,
        "kvforge_evictions": st.num_evictions,
        "kvforge_compactions": st.compaction_count,
        "kvforge_compaction_blocks_moved": st.total_blocks_moved,
        "kvforge_bytes_returned": st.total_bytes_returned,
        "kvforge_prefix_cache_queries": ps.queries,
        "kvforge_prefix_cache_query_tokens": ps.query_tokens,
        "kvforge_prefix_cache_hit_tokens": ps.hit_tokens,
    }


def _host_values(target: Any) -> dict[str, float]:
    manager = getattr(target, "manager", target)
    hs = manager.host.stats()  # all zero without a host tier
    return {
        "kvforge_sequences_swapped": hs.swapped_sequences,
        "kvforge_host_spilled_blocks": hs.spilled_blocks,
        "kvforge_host_spill_reuses": hs.spill_reuses,
        "kvforge_host_onboarded_blocks": hs.onboarded_blocks,
        "kvforge_host_dropped_blocks": hs.dropped_blocks,
        "kvforge_failed_tier_copies": hs.failed_copies,
        "kvforge_prefix_cache_host_hit_tokens": manager.prefix.stats().host_hit_tokens,
    }


_REMOTE_EVENTS = ("kvforge_remote_events", "counter",
                  "Remote tier counters (RemoteStats): reads, hits and misses, refusals of each kind, writes, "
                  "dropped jobs, write errors, connection errors, timeouts.", "event")
_REMOTE_HITS = ("kvforge_prefix_cache_remote_hit_tokens", "counter",
                "Prompt tokens copied in from the remote tier (counted in the prefix cache hit tokens too).")

#: Sample names a cache exports only when it has a remote tier
#: (``kvforge_remote_events_total{event="hits"}``, one per RemoteStats field).
REMOTE_METRIC_NAMES: tuple[str, ...] = (_sample(*_REMOTE_HITS[:2]),) + tuple(
    _sample(_REMOTE_EVENTS[0], "counter", "event", f) for f in
    ("fetch_calls", "lookup_calls", "keys_asked", "hits", "misses", "backoff_fetches", "bytes_read", "bad_size",
     "bad_header", "bad_fingerprint", "bad_key", "bad_checksum", "publish_jobs", "dropped_jobs", "skipped_blocks",
     "blocks_written", "bytes_written", "write_errors", "payload_errors", "connection_errors", "timeouts",
     "server_errors"))


def _remote_families(target: Any) -> list[Metric]:
    """The remote tier's counters, when the cache has one (none otherwise)."""
    remote = getattr(target, "remote", None)
    if remote is None or not hasattr(remote, "stats"):
        return []
    counts = {k: float(v) for k, v in remote.stats().to_dict().items()}
    hits = getattr(target, "manager", target).prefix.stats().remote_hit_tokens
    return [_family(*_REMOTE_HITS, hits), _labelled_family(*_REMOTE_EVENTS, counts)]


def _tiers(target: Any) -> list[tuple[str, int, int, int, int]]:
    """``(tier, capacity_blocks, used_blocks, cached_blocks, allocated_bytes)`` per tier: a
    KVCache's :meth:`~kvforge.storage.KVCache.tier_usage`, or a bare manager's blocks (no bytes)."""
    if hasattr(target, "tier_usage"):
        return [(t.tier, t.capacity_blocks, t.used_blocks, t.cached_blocks, t.allocated_bytes)
                for t in target.tier_usage()]
    pool, host = target.pool, target.host
    tiers = [("device", pool.capacity, pool.num_allocated_blocks + pool.num_evictable_blocks,
              pool.num_cached_blocks, 0)]
    if host.enabled:
        tiers.append(("host", host.num_blocks, host.num_used_blocks(), host.stats().cached_blocks, 0))
    return tiers


def _labelled_values(target: Any) -> dict[str, dict[str, float]]:
    tiers = _tiers(target)
    manager = getattr(target, "manager", target)
    hs = manager.host.stats()
    to_host, to_device = getattr(target, "host_bytes_moved", (0, 0))
    return {
        "kvforge_tier_usage_ratio": {t: used / cap if cap else 0.0 for t, cap, used, _, _ in tiers},
        "kvforge_tier_blocks_capacity": {t[0]: t[1] for t in tiers},
        "kvforge_tier_blocks_used": {t[0]: t[2] for t in tiers},
        "kvforge_tier_blocks_cached": {t[0]: t[3] for t in tiers},
        "kvforge_tier_allocated_bytes": {t[0]: t[4] for t in tiers},
        "kvforge_tier_bytes_moved": {"to_host": to_host, "to_device": to_device},
        "kvforge_swapped_blocks": {"out": hs.swapped_out_blocks, "in": hs.swapped_in_blocks},
    }


def _engine_stats(engine: Any) -> Mapping[str, Any]:
    stats = getattr(engine, "stats", None)
    if callable(stats):
        stats = stats()
    if stats is None:
        return {}
    if not isinstance(stats, dict) and hasattr(stats, "to_dict"):
        return stats.to_dict()  # nested snapshots as dicts, flattened below
    if not isinstance(stats, Mapping):
        if hasattr(stats, "_asdict"):
            return stats._asdict()
        raise ConfigError(f"engine.stats() must return a mapping, got {type(stats).__name__}")
    return stats


def _engine_families(engine: Any) -> list[Metric]:
    flat: dict[str, float] = {}
    for key, value in _engine_stats(engine).items():
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for sub, v in items:
            name = str(key) if sub is None else f"{key}_{sub}"
            if isinstance(v, bool):
                v = int(v)
            if isinstance(v, (int, float)):
                flat[_NAME_RE.sub("_", name).lower()] = float(v)
            else:
                log.debug("engine stat %r (%s) is not a number; not exported", name, type(v).__name__)
    families: list[Metric] = []
    for key in _PREEMPTION_KEYS:
        if key in flat:
            families.append(_family(*_PREEMPTIONS, flat.pop(key)))
            break
    for key, v in sorted(flat.items()):
        kind = "counter" if key.endswith("_total") else "gauge"
        families.append(_family(f"kvforge_engine_{key.removesuffix('_total')}", kind, f"Engine stat {key!r}.", v))
    return families


def make_registry(cache: Any = None, engine: Any = None, *, lock: threading.Lock | None = None) -> CollectorRegistry:
    """A fresh registry holding only a :class:`KVForgeCollector` (the global one is not touched)."""
    registry = _prometheus().CollectorRegistry(auto_describe=False)
    registry.register(KVForgeCollector(cache, engine, lock=lock))
    return registry


def render(cache: Any = None, engine: Any = None, *, lock: threading.Lock | None = None) -> str:
    """The metrics now, in the Prometheus text format."""
    return _prometheus().generate_latest(make_registry(cache, engine, lock=lock)).decode()


class MetricsServer:
    """A running metrics endpoint; :meth:`stop` (or leaving a ``with`` block) shuts it down."""

    def __init__(self, httpd: Any, thread: threading.Thread, registry: CollectorRegistry,
                 collector: KVForgeCollector | None = None) -> None:
        self._httpd = httpd
        self._thread = thread
        self.registry = registry
        self.collector = collector
        self.addr, self.port = httpd.server_address[:2]

    def attach(self, cache: Any = None, engine: Any = None, *, lock: threading.Lock | None = None) -> None:
        """Start exporting ``cache`` (and ``engine``) on an endpoint :func:`serve` opened
        without them (bind first, so that a taken port fails before slow work).

        Raises :class:`~kvforge.errors.ConfigError` when something is exported already."""
        if self.collector is not None:
            raise ConfigError(f"{self!r} already exports a cache; attach once")
        collector = KVForgeCollector(cache, engine, lock=lock)
        self.registry.register(collector)
        self.collector = collector

    @property
    def url(self) -> str:
        """``http://addr:port/metrics``."""
        host = f"[{self.addr}]" if ":" in str(self.addr) else self.addr
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MetricsServer({self.url})"


def serve(port: int, cache: Any = None, engine: Any = None, addr: str = "127.0.0.1", *,
          lock: threading.Lock | None = None) -> MetricsServer:
    """Serve the metrics of ``cache`` (and ``engine``) over HTTP on ``addr:port`` in a
    daemon thread; ``port=0`` picks a free port (see :attr:`MetricsServer.port`).

    Binds to the loopback address unless told otherwise. With neither
    ``cache`` nor ``engine`` the endpoint opens empty and
    :meth:`MetricsServer.attach` adds them later.

    Raises :class:`~kvforge.errors.ConfigError` for a port that is not an
    integer in [0, 65535], :class:`~kvforge.errors.AddressInUseError` (a
    :class:`~kvforge.errors.ServeError`, an ``OSError`` too) naming
    ``addr:port`` when another socket holds it, :class:`~kvforge.errors.ServeError`
    when the address cannot be bound otherwise (a privileged port, an unknown
    host), :class:`~kvforge.errors.MissingExtraError` without prometheus-client.
    """
    port = check_port(port)
    if not isinstance(addr, str) or not addr:
        raise ConfigError(f"addr must be a host name or IP address, got {addr!r:.60}")
    prometheus = _prometheus()
    collector = KVForgeCollector(cache, engine, lock=lock) if cache is not None or engine is not None else None
    registry = prometheus.CollectorRegistry(auto_describe=False)
    if collector is not None:
        registry.register(collector)
    try:
        httpd, thread = prometheus.start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        where = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"cannot serve metrics on {where}: the address is already in use "
                                    f"(pick another port, or 0 for any free one)", addr, port, exc.errno) from None
        raise ServeError(f"cannot serve metrics on {where}: {exc.strerror or exc}", addr, port, exc.errno) from None
    server = MetricsServer(httpd, thread, registry, collector)
    log.info("serving kvforge metrics on %s", server.url)
    return server
