"""RedisTier against a real ``redis-server`` (tests/redis_server.py): round trips, runs, isolation,
refusals of bad values, expiry, a full server, a dead, hung or restarted server, passwords, the writer queue.

Tiny payloads and short timeouts; the bound checks (a fetch from a dead server
returns within about its timeout) are bounds, not speed benchmarks.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

from kvforge.errors import ConfigError, InvalidBlockError, MissingExtraError
from kvforge.storage import redis_reader
from kvforge.storage.redis_tier import HEADER, MAGIC, RedisTier, RemoteStats, _redact
from kvforge.storage.remote import RemoteLayout, RemoteTier
from tests.redis_server import RedisServer

#: [num_layers=2, 2, block_size=4, num_kv_heads=1, head_dim=4] float16: 128 bytes a block
LAYOUT = RemoteLayout("tiny-model", "float16", 4, 2, 1, 4, 0, 1, 128)
TIMEOUT = 0.2
RETRY = 0.3
#: slack for a loaded 2-core machine on top of a timeout (a bound, not a benchmark)
MARGIN = 0.5


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def payload(i: int, nbytes: int = LAYOUT.block_bytes) -> bytes:
    return bytes((i * 7 + j) % 256 for j in range(nbytes))


#: where fetches run in tier_on's tiers (the ``reader`` fixture runs a test with each)
_reader = "auto"


@pytest.fixture(params=["process", "thread"])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(sys.modules[__name__], "_reader", request.param)
    return request.param


def tier_on(server: RedisServer, namespace: str = "t", layout: RemoteLayout = LAYOUT, **kw: object) -> RedisTier:
    kw.setdefault("reader", _reader)
    kw.setdefault("timeout", TIMEOUT)
    kw.setdefault("retry_after", RETRY)
    t = RedisTier(server.url(server.password), namespace, **kw)  # type: ignore[arg-type]
    t.bind(layout)
    assert t.wait_ready()  # timings below do not count the reader process's start
    return t


def publish_all(t: RedisTier, ids: list[int], nbytes: int = LAYOUT.block_bytes) -> None:
    t.publish([key(i) for i in ids], lambda: [payload(i, nbytes) for i in ids])
    assert t.flush(10)


@pytest.fixture
def tiers() -> Iterator[list[RedisTier]]:
    made: list[RedisTier] = []
    yield made
    for t in made:
        t.check_invariants()
        t.close()


@pytest.mark.usefixtures("reader")
def test_round_trip_and_counters(redis: RedisServer, tiers: list[RedisTier]) -> None:
    a = tier_on(redis, batch_size=2)
    b = tier_on(redis, batch_size=3)
    tiers += [a, b]
    assert isinstance(a, RemoteTier)
    publish_all(a, [0, 1, 2, 3, 4])
    got = b.fetch([key(i) for i in range(5)])
    assert [bytes(p) for p in got] == [payload(i) for i in range(5)]
    assert all(len(p) == LAYOUT.block_bytes and p.readonly for p in got)
    sa, sb = a.stats(), b.stats()
    assert (sa.publish_jobs, sa.blocks_written, sa.bytes_written) == (1, 5, 5 * (HEADER.size + 128))
    assert (sb.fetch_calls, sb.keys_asked, sb.hits, sb.misses, sb.bytes_read) == (1, 5, 5, 0, 5 * (HEADER.size + 128))
    raw = redis.client()
    assert sorted(raw.keys("kvforge:t:*")) == sorted(a.name_of(key(i)) for i in range(5))
    assert a.name_of(key(1)) == f"kvforge:t:{LAYOUT.fingerprint().hex()}:{key(1).hex()}".encode()
    assert raw.ttl(a.name_of(key(0))) == -1  # no ttl: no expiry
    # a second publish of the same blocks is skipped (written recently), the thunk not called
    a.publish([key(0), key(1)], lambda: pytest.fail("thunk called for blocks written recently"))
    assert a.flush(5)
    assert a.stats().skipped_blocks == 2 and a.stats().blocks_written == 5
    assert a.fetch([]) == [] and set(RemoteStats().to_dict()) == set(sa.to_dict())


@pytest.mark.usefixtures("reader")
def test_longest_run_stops_at_the_first_missing_key(redis: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier_on(redis, batch_size=2)
    tiers.append(t)
    publish_all(t, [0, 1, 3, 4])
    assert [bytes(p) for p in t.fetch([key(i) for i in range(5)])] == [payload(0), payload(1)]
    assert t.fetch([key(2), key(3)]) == []
    assert [bytes(p) for p in t.fetch([key(3), key(4), key(9)])] == [payload(3), payload(4)]
    s = t.stats()
    assert (s.fetch_calls, s.keys_asked, s.hits, s.misses) == (3, 10, 4, 6)
    assert s.bad_size == s.bad_header == s.bad_checksum == 0


def test_namespaces_layouts_and_models_isolate(redis: RedisServer, tiers: list[RedisTier]) -> None:
    a = tier_on(redis, "team-a")
    tiers.append(a)
    publish_all(a, [0, 1])
    others = [tier_on(redis, "team-b"),
              tier_on(redis, "team-a", LAYOUT._replace(model="other-model")),
              tier_on(redis, "team-a", LAYOUT._replace(dtype="bfloat16")),
              tier_on(redis, "team-a", LAYOUT._replace(tp_rank=1, tp_size=2))]
    tiers += others
    for t in others:
        assert t.fetch([key(0), key(1)]) == []  # another name: a plain miss, never another's bytes
        assert t.stats().misses == 2
    assert len(a.fetch([key(0), key(1)])) == 2
    # the model from the tier when the layout has none: the same fingerprint as a layout naming it
    c = RedisTier(redis.url(), "team-a", model="tiny-model", timeout=TIMEOUT)
    tiers.append(c)
    c.bind(LAYOUT._replace(model=""))
    assert [bytes(p) for p in c.fetch([key(0)])] == [payload(0)]


def test_bind_refuses_missing_or_conflicting_identity(redis: RedisServer, tiers: list[RedisTier]) -> None:
    t = RedisTier(redis.url(), "x", timeout=TIMEOUT)
    tiers.append(t)
    with pytest.raises(ConfigError, match="not bound"):
        t.fetch([key(0)])
    with pytest.raises(ConfigError, match="model identity is needed"):
        t.bind(LAYOUT._replace(model=""))
    with pytest.raises(ConfigError, match="differs"):
        RedisTier(redis.url(), "x", model="m1").bind(LAYOUT._replace(model="m2"))
    t.bind(LAYOUT)
    t.bind(LAYOUT)  # the same layout again: nothing changes
    with pytest.raises(ConfigError, match="already bound"):
        t.bind(LAYOUT._replace(block_size=8, block_bytes=256))
    with pytest.raises(InvalidBlockError):
        t.fetch([b"short"])
    for bad in ("", "a b", "a:b", "x*", "-lead", "é", "n" * 65, None):
        with pytest.raises(ConfigError, match="namespace"):
            RedisTier(redis.url(), bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="timeout"):
        RedisTier(redis.url(), timeout=0)


def _frame(t: RedisTier, k: bytes, data: bytes, *, magic: bytes = MAGIC, version: int = 1, flags: int = 0,
           fingerprint: bytes | None = None, stored_key: bytes | None = None, length: int | None = None,
           checksum: bytes | None = None) -> bytes:
    """A value as the tier frames it, any header field replaced."""
    good = t.frame(k, data)
    fields = list(HEADER.unpack_from(good))
    fields[0:3] = [magic, version, flags]
    fields[3] = fingerprint if fingerprint is not None else fields[3]
    fields[4] = stored_key if stored_key is not None else fields[4]
    fields[5] = length if length is not None else fields[5]
    fields[6] = checksum if checksum is not None else fields[6]
    return HEADER.pack(*fields) + data


@pytest.mark.usefixtures("reader")
@pytest.mark.parametrize("kind", ["truncated", "extended", "magic", "version", "flags", "fingerprint",
                                  "key", "length", "checksum", "payload_flip", "empty"])
def test_bad_values_are_refused_and_counted(redis: RedisServer, tiers: list[RedisTier], kind: str) -> None:
    t = tier_on(redis)
    tiers.append(t)
    publish_all(t, [0, 1, 2])
    good = t.frame(key(1), payload(1))
    bad = {
        "truncated": good[:-1],
        "extended": good + b"\0",
        "empty": b"",
        "magic": _frame(t, key(1), payload(1), magic=b"KVF0"),
        "version": _frame(t, key(1), payload(1), version=2),
        "flags": _frame(t, key(1), payload(1), flags=1),
        "fingerprint": _frame(t, key(1), payload(1), fingerprint=LAYOUT._replace(model="evil").fingerprint()),
        "key": t.frame(key(7), payload(1)),  # another block's value copied under this name
        "length": _frame(t, key(1), payload(1), length=127),
        "checksum": _frame(t, key(1), payload(1), checksum=bytes(16)),
        "payload_flip": good[:-1] + bytes([good[-1] ^ 1]),
    }[kind]
    counter = {"truncated": "bad_size", "extended": "bad_size", "empty": "bad_size", "magic": "bad_header",
               "version": "bad_header", "flags": "bad_header", "fingerprint": "bad_fingerprint",
               "key": "bad_key", "length": "bad_size", "checksum": "bad_checksum",
               "payload_flip": "bad_checksum"}[kind]
    redis.client().set(t.name_of(key(1)), bad)
    got = t.fetch([key(0), key(1), key(2)])
    assert [bytes(p) for p in got] == [payload(0)]  # the run stops at the refused value
    s = t.stats().to_dict()
    assert s[counter] == 1
    assert sum(s[c] for c in ("bad_size", "bad_header", "bad_fingerprint", "bad_key", "bad_checksum")) == 1
    # the refused key left the recent set: the next publish repairs it
    publish_all(t, [1])
    assert t.stats().blocks_written == 4
    assert [bytes(p) for p in t.fetch([key(0), key(1), key(2)])] == [payload(0), payload(1), payload(2)]


def test_ttl_expires_blocks(redis: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier_on(redis, ttl=0.2)
    tiers.append(t)
    publish_all(t, [0, 1])
    assert 0 < redis.client().pttl(t.name_of(key(0))) <= 200
    assert len(t.fetch([key(0), key(1)])) == 2
    time.sleep(0.35)
    assert t.fetch([key(0), key(1)]) == []
    # past half the ttl a key is no longer "recent": a publish writes (and refreshes) it
    publish_all(t, [0])
    assert t.stats().blocks_written == 3 and len(t.fetch([key(0)])) == 1


@pytest.mark.usefixtures("reader")
def test_full_server_counts_write_errors_and_keeps_serving(tiers: list[RedisTier]) -> None:
    big = LAYOUT._replace(block_size=512, block_bytes=64 * 1024)
    with RedisServer(maxmemory="3mb", maxmemory_policy="noeviction") as full:
        t = tier_on(full, layout=big, batch_size=4)
        tiers.append(t)
        n = 80  # 5 MiB: more than the server may hold
        t.publish([key(i) for i in range(n)], lambda: [payload(i, big.block_bytes) for i in range(n)])
        assert t.flush(10)
        s = t.stats()
        assert s.write_errors >= 1 and 1 <= s.blocks_written < n
        assert s.connection_errors == s.timeouts == 0 and not t.is_backing_off
        # writes pause for retry_after: this publish is dropped without a call
        t.publish([key(n)], lambda: [payload(n, big.block_bytes)])
        assert t.flush(5) and t.stats().dropped_jobs == 2
        # reads go on: what was written is served
        got = t.fetch([key(i) for i in range(n)])
        assert len(got) == s.blocks_written and bytes(got[-1]) == payload(len(got) - 1, big.block_bytes)
        t.close()


@pytest.mark.usefixtures("reader")
def test_dead_server_costs_one_timeout_then_backs_off(tiers: list[RedisTier]) -> None:
    with RedisServer() as s:
        t = tier_on(s)
        tiers.append(t)
        publish_all(t, [0])
        s.kill()
        t0 = time.monotonic()
        assert t.fetch([key(0)]) == []
        assert time.monotonic() - t0 < TIMEOUT + MARGIN
        st = t.stats()
        assert st.connection_errors + st.timeouts == 1 and t.is_backing_off
        t0 = time.monotonic()
        assert t.fetch([key(0)]) == [] and t.fetch([key(0)]) == []
        assert time.monotonic() - t0 < 0.05  # no call at all in back-off
        t.publish([key(1)], lambda: [payload(1)])
        st = t.stats()
        assert (st.backoff_fetches, st.dropped_jobs, st.connection_errors + st.timeouts) == (2, 1, 1)
        # after the back-off, one more try (refused again), then back-off again
        time.sleep(RETRY + 0.05)
        assert t.fetch([key(0)]) == [] and t.stats().connection_errors + t.stats().timeouts == 2
        assert t.flush(1)


@pytest.mark.usefixtures("reader")
def test_hung_server_times_out(tiers: list[RedisTier]) -> None:
    with RedisServer() as s:
        t = tier_on(s)
        tiers.append(t)
        publish_all(t, [0])
        s.pause()
        try:
            t0 = time.monotonic()
            assert t.fetch([key(0)]) == []
            elapsed = time.monotonic() - t0
            assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + MARGIN
            assert t.stats().timeouts == 1 and t.is_backing_off
            t.publish([key(1)], lambda: [payload(1)])  # dropped in back-off: the writer does not hang too
            assert t.flush(0.1) and t.stats().dropped_jobs == 1
        finally:
            s.resume()
        time.sleep(RETRY + 0.05)
        assert [bytes(p) for p in t.fetch([key(0)])] == [payload(0)]


@pytest.mark.usefixtures("reader")
def test_restarted_server_recovers_after_retry_after(tiers: list[RedisTier]) -> None:
    with RedisServer() as s:
        t = tier_on(s)
        tiers.append(t)
        publish_all(t, [0, 1])
        assert len(t.fetch([key(0), key(1)])) == 2
        s.restart()
        assert t.fetch([key(0)]) == []  # the old connection is gone: a fault, then back-off
        time.sleep(RETRY + 0.05)
        assert t.fetch([key(0), key(1)]) == []  # keys gone with the restart: plain misses
        assert not t.is_backing_off
        publish_all(t, [0, 1])  # the fetch misses took them out of the recent set: written again
        assert [bytes(p) for p in t.fetch([key(0), key(1)])] == [payload(0), payload(1)]
        assert t.stats().blocks_written == 4


SECRET = "s3cr3t-Pa55word"


@pytest.mark.usefixtures("reader")
def test_password_in_url_works_and_never_shows(tiers: list[RedisTier], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with RedisServer(requirepass=SECRET) as s:
        good = tier_on(s)
        tiers.append(good)
        publish_all(good, [0])
        assert [bytes(p) for p in good.fetch([key(0)])] == [payload(0)]
        assert good.stats().write_errors == 0
        texts = [repr(good), str(good)]
        wrong = RedisTier(s.url("not-" + SECRET), "t", timeout=TIMEOUT, retry_after=RETRY, reader=_reader)
        wrong.bind(LAYOUT)
        tiers.append(wrong)
        assert wrong.fetch([key(0)]) == []
        assert wrong.stats().connection_errors == 1
        none = RedisTier(s.url(), "t", timeout=TIMEOUT, retry_after=RETRY, reader=_reader)  # no password: NOAUTH
        none.bind(LAYOUT)
        tiers.append(none)
        assert none.fetch([key(0)]) == []
        assert none.stats().connection_errors + none.stats().server_errors == 1
        dead = RedisTier(f"redis://:{SECRET}@127.0.0.1:1/0", "t", timeout=TIMEOUT, reader=_reader)
        dead.bind(LAYOUT)
        tiers.append(dead)
        assert dead.fetch([key(0)]) == [] and dead.stats().connection_errors == 1
        for bad_url, bad_ns in ((f"redis://:{SECRET}@127.0.0.1:6379/0", "bad ns"),
                                (f"redis://:{SECRET}@127.0.0.1:notaport/0", "t"),
                                (f"http://:{SECRET}@127.0.0.1:6379/0", "t")):
            with pytest.raises(ConfigError) as info:
                RedisTier(bad_url, bad_ns)
            texts += [str(info.value), repr(info.value)]
            assert info.value.__cause__ is None
        texts += [repr(wrong), repr(dead)]
        for t in (good, wrong, dead):  # the reader process gets the URL on a pipe, not on its command line
            if t.reader_pid is not None:
                with open(f"/proc/{t.reader_pid}/cmdline", "rb") as f:
                    texts.append(f.read().decode(errors="replace"))
    assert any("redis_tier" in r.name and "Error" in r.getMessage() for r in caplog.records)  # it did log
    texts.append(caplog.text)
    assert "***" in repr(good)
    for text in texts:
        assert SECRET not in text and "cr3t" not in text, text


def test_redact() -> None:
    assert _redact("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert _redact("rediss://user:pw@h:1/0") == "rediss://user:***@h:1/0"
    assert _redact("redis://pw@h:1/0") == "redis://:***@h:1/0"  # a lone user info may be a password
    assert _redact("redis://h:1/0?password=pw&db=2") == "redis://h:1/0?password=***&db=2"
    assert _redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert _redact("unix://:pw@/tmp/r.sock?db=1") == "unix://:***@/tmp/r.sock?db=1"


def test_flush_waits_for_writes(redis: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier_on(redis)
    tiers.append(t)
    release = threading.Event()

    def slow() -> list[bytes]:
        release.wait(5)
        return [payload(0)]

    t.publish([key(0)], slow)
    assert t.flush(0.05) is False and t.num_pending == 1
    assert redis.client().exists(t.name_of(key(0))) == 0
    release.set()
    assert t.flush(5) is True and t.num_pending == 0
    assert redis.client().exists(t.name_of(key(0))) == 1  # flushed means written


def test_full_queue_drops_and_counts(redis: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier_on(redis, max_pending=2)
    tiers.append(t)
    started, release = threading.Event(), threading.Event()

    def blocked() -> list[bytes]:
        started.set()
        release.wait(5)
        return [payload(0)]

    t.publish([key(0)], blocked)
    assert started.wait(5)  # the writer holds job 0; two more fit in the queue
    for i in (1, 2, 3, 4):
        t.publish([key(i)], lambda i=i: [payload(i)])
    assert t.stats().dropped_jobs == 2 and t.stats().publish_jobs == 5
    release.set()
    assert t.flush(5)
    assert len(t.fetch([key(i) for i in range(5)])) == 3


def test_bad_thunks_are_counted_and_the_writer_lives_on(redis: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier_on(redis)
    tiers.append(t)

    def broken() -> list[bytes]:
        raise RuntimeError("device copy failed")

    t.publish([key(0)], broken)
    t.publish([key(1), key(2)], lambda: [payload(1)])  # one payload for two keys
    t.publish([key(3), key(4)], lambda: [payload(3), payload(4, 100)])  # the second of the wrong size
    t.publish([key(5)], lambda: [object()])  # not a buffer
    assert t.flush(5)
    s = t.stats()
    assert s.payload_errors == 4 and s.blocks_written == 1
    assert [bytes(p) for p in t.fetch([key(3), key(4)])] == [payload(3)]
    publish_all(t, [6])
    assert t.stats().blocks_written == 2


def test_close_stops_the_writer(redis: RedisServer) -> None:
    t = tier_on(redis)
    publish_all(t, [0])
    t.close()
    t.close()
    assert t._thread is not None and not t._thread.is_alive()
    assert t.fetch([key(0)]) == []
    t.publish([key(1)], lambda: pytest.fail("closed tier called a thunk"))
    assert t.flush(1) and t.stats().dropped_jobs == 1


@pytest.mark.usefixtures("reader")
def test_fetch_and_publish_from_two_threads(redis: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier_on(redis, batch_size=3)
    tiers.append(t)
    n = 40
    for i in range(n):
        t.publish([key(i)], lambda i=i: [payload(i)])
    seen = 0
    while t.num_pending:  # fetches on this thread while the writer writes
        got = t.fetch([key(i) for i in range(n)])
        assert [bytes(p) for p in got] == [payload(i) for i in range(len(got))]
        seen = max(seen, len(got))
        t.check_invariants()
    assert t.flush(5)
    assert len(t.fetch([key(i) for i in range(n)])) == n
    s = t.stats()
    assert s.connection_errors == s.timeouts == s.write_errors == 0


def test_missing_client_names_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis raises ImportError
    with pytest.raises(MissingExtraError, match="pip install redis"):
        RedisTier()


def test_import_kvforge_does_not_import_redis() -> None:
    code = "import sys, kvforge, kvforge.storage.redis_tier; assert 'redis' not in sys.modules, 'redis'; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_a_missing_redis_server_fails_and_names_make_test(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.redis_server as helper
    monkeypatch.setattr(helper.shutil, "which", lambda name: None)
    monkeypatch.setattr(helper, "_FALLBACKS", ())
    with pytest.raises(pytest.fail.Exception, match="make test"):  # a failure, never a skip
        helper.find_redis_server()


def test_checksums_of_a_large_batch_run_on_several_threads_and_still_refuse(redis: RedisServer, tiers) -> None:
    """A batch over 1 MiB is checked on the tier's check threads: the payloads come back
    exact, and a corrupted one is still refused (the run stops there)."""
    layout = RemoteLayout("m", "float32", 16, 2, 2, 16, 0, 1, 512 * 1024)
    t = RedisTier(redis.url(), "par", timeout=1.0, check_threads=3, reader="thread")
    tiers.append(t)
    t.bind(layout)
    keys = [bytes([i]) * 16 for i in range(6)]
    payloads = [bytes([i]) * layout.block_bytes for i in range(6)]
    t.publish(keys, lambda: payloads)
    assert t.flush(10.0)
    assert [bytes(p) for p in t.fetch(keys)] == payloads
    assert t._checkers is not None  # the parallel path ran
    client = redis.client()
    value = bytearray(client.get(t.name_of(keys[3])))
    value[-7] ^= 1
    client.set(t.name_of(keys[3]), bytes(value))
    assert [bytes(p) for p in t.fetch(keys)] == payloads[:3]
    assert t.stats().bad_checksum == 1
    with pytest.raises(ConfigError, match="check_threads"):
        RedisTier(redis.url(), check_threads=0)
    with pytest.raises(ConfigError, match="fetch_threads"):
        RedisTier(redis.url(), fetch_threads=0)
    with pytest.raises(ConfigError, match="lookup_timeout"):
        RedisTier(redis.url(), lookup_timeout=0)
    with pytest.raises(ConfigError, match="fetch_budget"):
        RedisTier(redis.url(), fetch_budget=0)


@pytest.mark.parametrize("threads", [1, 3])
def test_batches_in_flight_return_the_same_run_and_stop_at_a_miss(redis: RedisServer, tiers: list[RedisTier],
                                                                   threads: int) -> None:
    """With several MGETs in flight the payloads come back in key order; a missing
    block cuts the run there even when later batches were already on the wire."""
    t = tier_on(redis, f"in-flight-{threads}", batch_size=2, fetch_threads=threads, reader="thread")
    tiers.append(t)
    publish_all(t, [i for i in range(20) if i != 13])
    assert [bytes(p) for p in t.fetch([key(i) for i in range(13)])] == [payload(i) for i in range(13)]
    assert [bytes(p) for p in t.fetch([key(i) for i in range(20)])] == [payload(i) for i in range(13)]
    s = t.stats()
    assert (s.hits, s.misses) == (26, 7)
    assert (t._fetchers is not None) == (threads > 1)


def test_read_bandwidth_is_measured_on_fetches_of_a_mebibyte_or_more(redis: RedisServer,
                                                                     tiers: list[RedisTier]) -> None:
    layout = RemoteLayout("m", "float32", 16, 2, 2, 16, 0, 1, 256 * 1024)
    t = RedisTier(redis.url(), "bandwidth", timeout=2.0, batch_size=2)
    tiers.append(t)
    t.bind(layout)
    keys = [bytes([i]) * 16 for i in range(6)]
    t.publish(keys, lambda: [bytes([i]) * layout.block_bytes for i in range(6)])
    assert t.flush(10.0)
    assert t.read_bandwidth is None
    assert len(t.fetch(keys[:2])) == 2  # half a MiB: latency, not bandwidth
    assert t.read_bandwidth is None
    assert len(t.fetch(keys)) == 6
    first = t.read_bandwidth
    assert first is not None and first > 0
    assert len(t.fetch(keys)) == 6 and t.read_bandwidth != first  # a running mean


def test_lookup_counts_the_leading_run_the_server_holds(redis: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier_on(redis, "lookup")
    tiers.append(t)
    publish_all(t, [0, 1, 2, 4])
    assert t.lookup([key(i) for i in range(6)]) == 3
    assert t.lookup([key(4), key(0)]) == 2 and t.lookup([key(3), key(4)]) == 0 and t.lookup([]) == 0
    s = t.stats()
    assert (s.lookup_calls, s.fetch_calls, s.bytes_read) == (4, 0, 0)  # no value read
    # what a lookup found is not written again by a publish (another cache computed it instead)
    other = tier_on(redis, "lookup")
    tiers.append(other)
    assert other.lookup([key(i) for i in range(6)]) == 3
    assert other.needs_write([key(i) for i in range(6)]) == [False, False, False, True, True, True]
    redis.pause()
    try:
        start = time.monotonic()
        assert t.lookup([key(0)]) == 0 and t.stats().timeouts == 1  # hung: bounded by the lookup timeout
        assert t.lookup_timeout == 0.05 and time.monotonic() - start < t.lookup_timeout + MARGIN
        assert t.lookup([key(0)]) == 0 and t.stats().timeouts == 1  # then back-off: not asked
    finally:
        redis.resume()


def _wait_dead(pid: int, seconds: float = 5.0) -> bool:
    """Whether process ``pid`` is gone or a zombie with every thread exited, within ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        states = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    states.append(f.read().rsplit(") ", 1)[-1][:1])
        except (FileNotFoundError, ProcessLookupError):  # reaped, or a thread that exited while read
            if not os.path.exists(f"/proc/{pid}"):
                return True
            continue
        if all(state in "ZX" for state in states):  # killed, not reaped yet
            time.sleep(0.05)  # the leader is reapable once its last thread has gone
            return True
        time.sleep(0.01)
    return False


@pytest.mark.skipif(not redis_reader.available(), reason="the reader process needs os.memfd_create (Linux)")
def test_a_reader_process_that_dies_costs_one_fetch_then_a_new_one_serves(redis: RedisServer,
                                                                         tiers: list[RedisTier]) -> None:
    t = tier_on(redis, "reader-dies", reader="process", reader_processes=1)
    tiers.append(t)
    assert RedisTier(redis.url()).reader == "process"  # the default on Linux
    publish_all(t, [0, 1, 2])
    assert [bytes(p) for p in t.fetch([key(i) for i in range(3)])] == [payload(i) for i in range(3)]
    first = t.reader_pid
    assert first is not None and first != os.getpid() and t.stats().reader_starts == 2  # a reader, the writer
    os.kill(first, signal.SIGKILL)  # between fetches: the next one starts a new process first
    assert _wait_dead(first)
    assert [bytes(p) for p in t.fetch([key(i) for i in range(3)])] == [payload(i) for i in range(3)]
    second = t.reader_pid
    assert t.stats().reader_starts == 3 and t.stats().reader_errors == 0 and second not in (None, first)
    # during a fetch (blocked on a paused server, whose timeout is far off): noticed at once
    slow = tier_on(redis, "reader-dies", reader="process", reader_processes=1, timeout=5.0)
    tiers.append(slow)
    victim = slow.reader_pid
    assert victim is not None
    got: list[list[memoryview]] = []
    redis.pause()
    try:
        fetching = threading.Thread(target=lambda: got.append(slow.fetch([key(0)])))
        fetching.start()
        time.sleep(0.2)
        start = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        fetching.join(5.0)
        assert got == [[]] and time.monotonic() - start < 1.0  # the pipe closed, not the 5 s timeout
    finally:
        redis.resume()
    s = slow.stats()
    assert (s.reader_errors, s.misses, s.timeouts, s.connection_errors) == (1, 1, 0, 0) and slow.is_backing_off
    time.sleep(RETRY + 0.05)
    assert [bytes(p) for p in slow.fetch([key(0)])] == [payload(0)] and slow.stats().reader_starts == 3
    # the writer process: killed between publishes, the next one starts a new one and writes
    writer = slow.writer_pid
    assert writer is not None and writer not in slow.reader_pids
    os.kill(writer, signal.SIGKILL)
    assert _wait_dead(writer)
    publish_all(slow, [7])
    assert slow.stats().blocks_written == 1 and slow.writer_pid not in (None, writer)
    assert [bytes(p) for p in slow.fetch([key(7)])] == [payload(7)]
    t.close()
    assert _wait_dead(second) and t.reader_pid is None


@pytest.mark.skipif(not redis_reader.available(), reason="the reader process needs os.memfd_create (Linux)")
def test_a_hung_reader_process_is_bounded_killed_and_replaced(redis: RedisServer, tiers: list[RedisTier]) -> None:
    budget = 0.3
    t = tier_on(redis, "reader-hangs", reader="process", reader_processes=1, fetch_budget=budget)
    tiers.append(t)
    publish_all(t, [0, 1])
    assert len(t.fetch([key(0), key(1)])) == 2
    pid = t.reader_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        assert t.fetch([key(0), key(1)]) == []
        elapsed = time.monotonic() - start
        # the bound: the budget, each batch's socket timeout, and the grace for a loaded machine
        assert elapsed < budget + 2 * TIMEOUT + redis_reader.GRACE + MARGIN
        assert t.stats().reader_errors == 1 and t.is_backing_off
        assert _wait_dead(pid)  # killed, not left behind stopped
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    time.sleep(RETRY + 0.05)
    assert [bytes(p) for p in t.fetch([key(0), key(1)])] == [payload(0), payload(1)]
    assert t.stats().reader_starts == 3


def test_reader_choice_is_checked(redis: RedisServer) -> None:
    assert RedisTier(redis.url(), reader="thread").reader == "thread"
    with pytest.raises(ConfigError, match="reader must be"):
        RedisTier(redis.url(), reader="fork")  # type: ignore[arg-type]


@pytest.mark.skipif(not redis_reader.available(), reason="the reader process needs os.memfd_create (Linux)")
def test_fetches_larger_than_a_slot_come_in_rounds_and_stop_at_a_refusal(redis: RedisServer,
                                                                          tiers: list[RedisTier]) -> None:
    """A fetch of more blocks than the shared region's slot holds is asked in rounds, two in
    flight; a value refused in a later round cuts the run there, as in one round."""
    layout = RemoteLayout("m", "float32", 16, 2, 2, 16, 0, 1, 4096)
    t = RedisTier(redis.url(), "rounds", timeout=1.0, batch_size=2, reader="process", reader_processes=1)
    tiers.append(t)
    t.bind(layout)
    t._processes[0].blocks_per_slot = 3  # rounds of 3 blocks (the region stays as large as it was)
    keys = [bytes([i + 1]) * 16 for i in range(11)]
    payloads = [bytes([i]) * layout.block_bytes for i in range(11)]
    t.publish(keys, lambda: payloads)
    assert t.flush(10.0)
    assert [bytes(p) for p in t.fetch(keys)] == payloads
    value = bytearray(redis.client().get(t.name_of(keys[7])))
    value[-1] ^= 1
    redis.client().set(t.name_of(keys[7]), bytes(value))
    assert [bytes(p) for p in t.fetch(keys)] == payloads[:7]
    assert t.stats().bad_checksum == 1
    assert [bytes(p) for p in t.fetch(keys[:5])] == payloads[:5]  # later answers are not mixed up


@pytest.mark.skipif(not redis_reader.available(), reason="the reader process needs os.memfd_create (Linux)")
def test_a_fetch_split_over_reader_processes_keeps_key_order_and_stops_at_the_first_gap(
        redis: RedisServer, tiers: list[RedisTier], monkeypatch: pytest.MonkeyPatch) -> None:
    """Three reader processes each fetch a contiguous part; the run is the parts in order up to
    the first part that came back short: a refused value in the second part cuts it there, even
    though the third part was fetched (and a refusal in it is counted too)."""
    from kvforge.storage import redis_tier
    monkeypatch.setattr(redis_tier, "_PART_BYTES", 0)  # parts of a batch: tiny blocks split too
    t = tier_on(redis, "parts", reader="process", reader_processes=3, batch_size=2)
    tiers.append(t)
    assert len(set(t.reader_pids)) == 3 and None not in t.reader_pids
    publish_all(t, list(range(12)))
    keys = [key(i) for i in range(12)]  # parts of 4 keys
    assert [bytes(p) for p in t.fetch(keys)] == [payload(i) for i in range(12)]
    assert [bytes(p) for p in t.fetch(keys[:3])] == [payload(i) for i in range(3)]  # a small fetch: one part
    client = redis.client()
    client.set(t.name_of(key(5)), t.frame(key(6), payload(6)))  # part 2: another block's value
    client.delete(t.name_of(key(9)))  # part 3: a gap
    assert [bytes(p) for p in t.fetch(keys)] == [payload(i) for i in range(5)]
    s = t.stats()
    assert (s.bad_key, s.hits, s.misses) == (1, 12 + 3 + 5, 7)
    # a dead process among them is replaced before the next fetch
    victim = t.reader_pids[1]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    assert _wait_dead(victim)
    publish_all(t, [5, 9])
    assert [bytes(p) for p in t.fetch(keys)] == [payload(i) for i in range(12)]
    assert t.stats().reader_starts == 5 and t.stats().reader_errors == 0 and victim not in t.reader_pids
    with pytest.raises(ConfigError, match="reader_processes"):
        RedisTier(redis.url(), reader_processes=0)


@pytest.mark.usefixtures("reader")
def test_rebind_changes_only_the_scales_and_only_while_unused(redis: RedisServer, tiers: list[RedisTier]) -> None:
    t = tier_on(redis, "rebind")
    tiers.append(t)
    assert t.unused
    scaled = LAYOUT._replace(quant="scales:" + "ab" * 16)
    t.rebind(scaled)
    assert t.layout == scaled and t.name_of(key(0)).startswith(f"kvforge:rebind:{scaled.fingerprint().hex()}".encode())
    assert scaled.fingerprint() != LAYOUT.fingerprint() and LAYOUT._replace(quant="").fingerprint() == LAYOUT.fingerprint()
    with pytest.raises(ConfigError, match="only the quantization scales"):
        t.rebind(scaled._replace(block_size=8))
    assert t.wait_ready()
    publish_all(t, [0])
    assert [bytes(p) for p in t.fetch([key(0)])] == [payload(0)]  # the processes use the new names
    assert not t.unused
    with pytest.raises(ConfigError, match="cannot change layout"):
        t.rebind(LAYOUT)
    assert t.layout == scaled


@pytest.mark.skipif(not redis_reader.available(), reason="the reader process needs os.memfd_create (Linux)")
def test_lent_payloads_keep_their_slots_until_released_and_their_copy_is_done(redis: RedisServer,
                                                                               tiers: list[RedisTier]) -> None:
    """fetch_held lends the checked run where the reader wrote it; a lent slot is not written
    again until it is released and the release's ready() says the copy from it is done; with
    every slot lent a fetch stops short (counted) instead of overwriting one; hooks register
    each region once and unregister it at close."""
    registered: list[int] = []
    unregistered: list[int] = []
    t = tier_on(redis, "lend", reader="process", reader_processes=1)
    tiers.append(t)
    t.set_memory_hooks(lambda view: registered.append(len(view)) or len(registered), unregistered.append)
    proc = t._processes[0]
    assert registered == [proc.num_slots * proc.slot_bytes]
    proc.blocks_per_slot = 2  # rounds of 2 blocks: a slot each
    publish_all(t, list(range(8)))
    held = t.fetch_held([key(i) for i in range(3)])
    assert held is not None and held.is_pinned and held.num_blocks == 3
    assert [r.num_blocks for r in held.runs] == [2, 1]
    assert [bytes(r.data) for r in held.runs] == [payload(0) + payload(1), payload(2)]
    assert proc.num_free_slots == proc.num_slots - 2
    done = [False]
    held.release(lambda: done[0])  # a copy still in flight: the slots stay taken
    assert proc.num_free_slots == proc.num_slots and len(proc._free) == proc.num_slots - 2  # not handed out yet
    runs = [held.runs[0].data, held.runs[1].data]
    other = t.fetch_held([key(i) for i in range(4, 6)])  # the third slot only
    assert other is not None and [bytes(r.data) for r in other.runs] == [payload(4) + payload(5)]
    assert bytes(runs[0]) == payload(0) + payload(1) and bytes(runs[1]) == payload(2)  # not overwritten
    empty = t.fetch_held([key(6)])  # no slot free: stops short (the prompt is computed), counted
    assert empty is not None and empty.num_blocks == 0 and t.fetch([key(6)]) == []
    assert t.stats().slots_full == 2
    done[0] = True  # the copy finished: the slots come back
    assert [bytes(p) for p in t.fetch([key(6), key(7)])] == [payload(6), payload(7)]
    other.release()
    assert proc.num_free_slots == proc.num_slots
    assert t.fetch_held([key(i) for i in range(8)]) is None  # more than half of what is free: fetch copies
    del held, other, runs
    t.close()
    assert unregistered == [1]
