"""The Redis tier's reader process: fetches, checks and lays blocks out in shared memory.

This module runs in a child process of :class:`~kvforge.storage.redis_reader.ReaderProcess`
and is loaded by its file path, without kvforge's package: it imports the
standard library, numpy and the ``redis`` client only (no torch: the
process is up in a fraction of a second), and is handed the wire module
(:mod:`kvforge.storage.redis_wire`, loaded the same way) by its bootstrap.

Why a process. A fetch moves hundreds of megabytes through the client: socket
reads, the reply parser building one ``bytes`` object a value, the
checksums. In the engine's process every one of those steps needs the GIL,
which the step loop holds most of the time, so a fetch thread waits up to a
switch interval (5 ms) for each take-back: on an H200 the tier read a third
of the bandwidth it reads alone. Here the client has an interpreter of its own,
and the engine's side only waits on a pipe and copies checked payloads out of
shared memory, both without the GIL.

Protocol: lines of JSON on stdin and stdout (names and numbers only, never a
value). The first line in is the set-up (the URL with any password comes
this way, not in the command line); the first line out is ``{"ready": true}``.
Then each request ``{"id", "slot", "keys": [hex], "budget"}`` (or
``{"cancel": id}``) is answered, in order, by ``{"id", "n", "bytes",
"stop", "kind", "what"}``: the first ``n`` blocks passed every check and lie
at ``slot``'s offset in the shared region, one ``block_bytes`` apart;
``stop`` says why the run ended (``end``, ``miss``, ``refused``, ``fault``,
``budget``, ``cancelled``), ``kind`` names the refusal or fault counter and
``what`` what was found (the parent scrubs secrets before it logs). A write
request ``{"id", "write": true, "slot", "keys", "px"}`` (the tier's writer
process) frames the payloads at ``slot`` and ``SET`` s them in one
pipeline; its answer lists each key's refusal (``errors``). The process
exits when stdin closes.
"""
from __future__ import annotations

import json
import mmap
import os
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def main(wire: Any) -> None:
    """Serve requests from stdin until it closes (see the module docstring)."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    setup = json.loads(stdin.readline())
    region = mmap.mmap(setup["fd"], setup["size"])
    os.close(setup["fd"])
    import redis
    import redis.backoff
    import redis.retry
    errors = redis.exceptions
    client = redis.from_url(setup["url"], socket_timeout=setup["timeout"], socket_connect_timeout=setup["timeout"],
                            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), health_check_interval=0,
                            socket_read_size=setup["read_size"])
    worker = _Worker(wire, region, client, errors, setup)
    requests: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def read_requests() -> None:  # a cancel must be seen while a request is served
        for line in stdin:
            msg = json.loads(line)
            if "cancel" in msg:
                worker.cancelled.add(msg["cancel"])
            else:
                requests.put(msg)
        requests.put(None)
    threading.Thread(target=read_requests, daemon=True).start()
    stdout.write(b'{"ready": true}\n')
    stdout.flush()
    while (req := requests.get()) is not None:
        reply = worker.write(req) if req.get("write") else worker.serve(req)
        worker.cancelled.discard(req["id"])
        stdout.write(json.dumps(reply).encode() + b"\n")
        stdout.flush()


class _Worker:
    def __init__(self, wire: Any, region: mmap.mmap, client: Any, errors: Any, setup: dict[str, Any]) -> None:
        self.wire = wire
        self.region = region
        self.client = client
        self.errors = errors
        self.block_bytes: int = setup["block_bytes"]
        self.slot_bytes: int = setup["slot_bytes"]
        self.fingerprint = bytes.fromhex(setup["fingerprint"])
        self.prefix: str = setup["prefix"]
        self.batch_size: int = setup["batch_size"]
        self.in_flight: int = setup["fetch_threads"]
        self.fetchers = ThreadPoolExecutor(self.in_flight)
        self.checkers = ThreadPoolExecutor(setup["check_threads"]) if setup["check_threads"] > 1 else None
        self.cancelled: set[int] = set()
        import numpy as np  # copies into the region without the GIL
        self.np = np
        self.slots = np.frombuffer(region, dtype=np.uint8)

    def serve(self, req: dict[str, Any]) -> dict[str, Any]:
        rid, hexkeys = req["id"], req["keys"]
        deadline = time.monotonic() + req["budget"]
        base = req["slot"] * self.slot_bytes
        names = [self.prefix + k for k in hexkeys]
        batches = [names[lo:lo + self.batch_size] for lo in range(0, len(names), self.batch_size)]
        first = req.get("first", True)

        def get(i: int) -> Any:
            if (i or not first) and time.monotonic() > deadline:
                return "budget"
            if rid in self.cancelled:
                return "cancelled"
            try:
                return self.client.mget(batches[i])
            except self.errors.TimeoutError as exc:
                return ("timeouts", f"{type(exc).__name__}: {exc}")
            except (self.errors.ConnectionError, OSError) as exc:
                return ("connection_errors", f"{type(exc).__name__}: {exc}")
            except self.errors.RedisError as exc:
                return ("server_errors", f"server error: {exc}")

        n = nbytes = 0
        stop, kind, what = "end", "", ""
        pending = deque(self.fetchers.submit(get, i) for i in range(min(self.in_flight, len(batches))))
        try:
            for i in range(len(batches)):
                values = pending.popleft().result()
                if isinstance(values, str):
                    stop = values
                    break
                if isinstance(values, tuple):
                    stop, (kind, what) = "fault", values
                    break
                if i + len(pending) + 1 < len(batches):
                    pending.append(self.fetchers.submit(get, i + len(pending) + 1))
                first_of_batch = n
                for value, got in zip(values, self._place(values, hexkeys, first_of_batch, base)):
                    if value is None:
                        stop = "miss"
                        break
                    nbytes += len(value)
                    if got is not None:
                        stop, kind, what = "refused", got.kind, got.what
                        break
                    n += 1
                if stop != "end":
                    break
        finally:
            for future in pending:
                future.cancel()
        return {"id": rid, "n": n, "bytes": nbytes, "stop": stop, "kind": kind, "what": what}

    def write(self, req: dict[str, Any]) -> dict[str, Any]:
        """Frame the payloads at ``slot`` (header and checksum) and ``SET`` them in one pipeline;
        per key None (written) or ``[class name, message]`` of the server's refusal."""
        rid, hexkeys, px = req["id"], req["keys"], req["px"]
        base = req["slot"] * self.slot_bytes
        bb = self.block_bytes
        view = memoryview(self.region)

        def frame(i: int) -> bytes:
            at = base + i * bb
            return self.wire.frame(self.fingerprint, bytes.fromhex(hexkeys[i]), view[at:at + bb])
        n = len(hexkeys)
        values = (list(self.checkers.map(frame, range(n))) if self.checkers is not None and n * bb > 1 << 20
                  else [frame(i) for i in range(n)])
        pipe = self.client.pipeline(transaction=False)
        for hk, value in zip(hexkeys, values):
            pipe.set(self.prefix + hk, value, px=px)
        del values  # the pipeline holds the framed values until it is sent
        try:
            results = pipe.execute(raise_on_error=False)
        except self.errors.TimeoutError as exc:
            return {"id": rid, "stop": "fault", "kind": "timeouts", "what": f"{type(exc).__name__}: {exc}"}
        except (self.errors.ConnectionError, OSError) as exc:
            return {"id": rid, "stop": "fault", "kind": "connection_errors", "what": f"{type(exc).__name__}: {exc}"}
        except self.errors.RedisError as exc:
            return {"id": rid, "stop": "fault", "kind": "server_errors", "what": f"server error: {exc}"}
        errors = [[type(r).__name__, str(r)] if isinstance(r, Exception) else None for r in results]
        return {"id": rid, "stop": "end", "kind": "", "what": "", "errors": errors}

    def _place(self, values: list[Any], hexkeys: list[str], first: int, base: int) -> list[Any]:
        """Check each value of a batch (the ``first``-th key's on) and copy its payload to its
        place in the slot; per value None (placed; or no value) or the Refusal. A large
        batch runs on the check threads: the checksum and the copy release the GIL."""
        bb = self.block_bytes
        wire = self.wire

        def place(i: int) -> Any:
            value = values[i]
            if value is None:
                return None
            got = wire.check_value(value, bytes.fromhex(hexkeys[first + i]), self.fingerprint, bb,
                                   wire.digest_of(value))
            if isinstance(got, wire.Refusal):
                return got
            at = base + (first + i) * bb
            self.slots[at:at + bb] = self.np.frombuffer(got, dtype=self.np.uint8)
            return None
        if self.checkers is None or sum(len(v) for v in values if v is not None) <= 1 << 20:
            return [place(i) for i in range(len(values))]
        return list(self.checkers.map(place, range(len(values))))
