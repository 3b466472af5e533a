"""The Redis tier's fetches in a process of their own: :class:`ReaderProcess`.

:class:`~kvforge.storage.redis_tier.RedisTier` (``reader="process"``, the
default where the platform has ``os.memfd_create``) hands its fetches to a
child process running :mod:`kvforge.storage.redis_reader_worker`, which
owns the fetch connections, asks in batched ``MGET``, runs every check of
:func:`~kvforge.storage.redis_wire.check_value` and writes the payloads of
the valid run into a shared-memory region (an anonymous ``memfd`` mapped by
both processes, so nothing is left behind on any file system). This side
sends the keys, waits on a pipe and copies the payloads out, neither of which
holds the GIL: the engine's step loop and the network no longer take turns.

The region has two slots of ``slot_bytes``; a fetch larger than a slot is
asked in rounds, two in flight, so the child fills one slot while this side
copies the other out. Inside the child, ``fetch_threads`` ``MGET`` are in
flight and the check threads verify each value and copy its payload into
place (the checksum and the copy release the GIL). The tier runs
``reader_processes`` of these children and splits a large fetch between
them: one client process reads at about a third of what the server sends.

Faults. Every wait is bounded: a reply not back within the round's budget
plus the tier's ``timeout`` and :data:`GRACE` seconds (a hung child, a
stopped one) ends the fetch with what was copied so far, and the child is
killed; so is a child whose pipe closed (it died). The tier counts each as a
``reader_errors`` and backs off; the next fetch after the back-off starts a
new child (``reader_starts``). The server's faults and the refusals are
reported by the child and counted by the tier as in-process fetches count
them.
"""
from __future__ import annotations

import json
import mmap
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = ["GRACE", "ReaderOutcome", "ReaderProcess", "available"]

#: seconds a reply may lag the child's own socket timeouts before the child counts as hung
GRACE = 1.0
#: seconds a new child may take to import the redis client and say it is ready
START_TIMEOUT = 10.0

_HERE = os.path.dirname(os.path.abspath(__file__))
_BOOT = (
    "import importlib.util as u, sys\n"
    "def load(name, path):\n"
    "    spec = u.spec_from_file_location(name, path)\n"
    "    mod = u.module_from_spec(spec)\n"
    "    sys.modules[name] = mod\n"
    "    spec.loader.exec_module(mod)\n"
    "    return mod\n"
    "wire = load('_kvforge_redis_wire', sys.argv[2])\n"
    "load('_kvforge_redis_reader_worker', sys.argv[1]).main(wire)\n"
)


def available() -> bool:
    """Whether this platform can run the reader process (anonymous shared memory: Linux)."""
    return hasattr(os, "memfd_create")


class ReaderOutcome(NamedTuple):
    """How a fetch through the reader process went: the payloads of the valid run,
    the value bytes received, and why it stopped (``end``, ``miss``, ``refused``,
    ``fault``, ``budget``, ``cancelled``, ``reader``: the child died or hung);
    ``kind`` names the refusal or fault counter, ``what`` what was found."""

    payloads: list[memoryview]
    nbytes: int
    stop: str
    kind: str
    what: str


class ReaderProcess:
    """One reader child and its shared region (see the module docstring). Not
    thread-safe: the tier calls :meth:`fetch` under its lock."""

    def __init__(self, url: str, *, block_bytes: int, fingerprint: bytes, prefix: bytes, timeout: float,
                 batch_size: int, fetch_threads: int, check_threads: int, read_size: int,
                 slot_bytes: int = 64 << 20) -> None:
        self.block_bytes = block_bytes
        self.blocks_per_slot = max(1, slot_bytes // block_bytes)
        self.slot_bytes = self.blocks_per_slot * block_bytes
        self.timeout = timeout
        self._setup = dict(url=url, block_bytes=block_bytes, slot_bytes=self.slot_bytes,
                           fingerprint=fingerprint.hex(), prefix=prefix.decode(), timeout=timeout,
                           batch_size=batch_size, fetch_threads=fetch_threads, check_threads=check_threads,
                           read_size=read_size)
        self._proc: subprocess.Popen[bytes] | None = None
        self._region: mmap.mmap | None = None
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._ready = False
        self._next_id = 0

    @property
    def pid(self) -> int | None:
        """The child's process id (None: not running)."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start a child (killing any old one); returns at once, the child gets ready in the
        background. Raises OSError when the process or the shared region cannot be made."""
        self.stop()
        size = 2 * self.slot_bytes
        fd = os.memfd_create("kvforge-redis-reader")
        try:
            os.ftruncate(fd, size)
            region = mmap.mmap(fd, size)
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, os.path.join(_HERE, "redis_reader_worker.py"),
                 os.path.join(_HERE, "redis_wire.py")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(fd,))
        finally:
            os.close(fd)
        assert proc.stdin is not None and proc.stdout is not None
        replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=_read_replies, args=(proc.stdout, replies), daemon=True,
                         name="kvforge-redis-reader-replies").start()
        try:
            proc.stdin.write(json.dumps(dict(self._setup, fd=fd, size=size)).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            proc.kill()
            raise
        self._proc, self._region, self._replies, self._ready = proc, region, replies, False

    def stop(self) -> None:
        """Close the child's stdin (it exits), kill it if it lingers, unmap the region."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
            except OSError:
                pass
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        region, self._region = self._region, None
        if region is not None:
            try:
                region.close()
            except BufferError:  # numpy views of it still alive somewhere: the mapping goes with them
                pass

    def wait_ready(self, timeout: float = START_TIMEOUT) -> bool:
        """Wait until the child has its client and says it is ready; False when it died or
        ``timeout`` seconds passed (it is then left running: a fetch waits again)."""
        if not self._ready and self._proc is not None:
            self._ready = self._wait(None, time.monotonic() + timeout) is not None
        return self._ready

    def fetch(self, keys: Sequence[bytes], budget: float) -> ReaderOutcome:
        """The longest valid run of ``keys`` from the first, in rounds of one slot, two in
        flight; no round starts after ``budget`` seconds but the first."""
        start = time.monotonic()
        if not self.wait_ready():
            return self._died(start, [], 0)
        per = self.blocks_per_slot
        rounds = [keys[lo:lo + per] for lo in range(0, len(keys), per)]
        inflight: deque[tuple[int, int, int]] = deque()  # (request id, slot, round)
        deadline = start + budget

        def send(r: int, slot: int) -> bool:
            rid = self._next_id
            self._next_id += 1
            msg = {"id": rid, "slot": slot, "keys": [k.hex() for k in rounds[r]],
                   "budget": max(0.0, deadline - time.monotonic()), "first": r == 0}
            try:
                assert self._proc is not None and self._proc.stdin is not None
                self._proc.stdin.write(json.dumps(msg).encode() + b"\n")
                self._proc.stdin.flush()
            except (OSError, ValueError):
                return False
            inflight.append((rid, slot, r))
            return True

        payloads: list[memoryview] = []
        nbytes = 0
        for r in range(min(2, len(rounds))):
            if not send(r, r):
                return self._died(start, payloads, nbytes)
        sent = len(inflight)
        while inflight:
            rid, slot, r = inflight.popleft()
            # the child's socket timeouts bound each of its batches; the round's share of the budget too
            batches = -(-len(rounds[r]) // max(1, self._setup["batch_size"]))
            wait_until = max(deadline, time.monotonic()) + (batches + 1) * self.timeout + GRACE
            reply = self._wait(rid, wait_until)
            if reply is None:
                return self._died(start, payloads, nbytes)
            n = reply["n"]
            nbytes += reply["bytes"]
            payloads += self._copy_out(slot, n)
            if reply["stop"] != "end" or n < len(rounds[r]):
                for other, _, _ in inflight:
                    self._cancel(other)
                return ReaderOutcome(payloads, nbytes, reply["stop"], reply["kind"], reply["what"])
            if sent < len(rounds):
                if not send(sent, slot):
                    return self._died(start, payloads, nbytes)
                sent += 1
        return ReaderOutcome(payloads, nbytes, "end", "", "")

    def _copy_out(self, slot: int, n: int) -> list[memoryview]:
        """Read-only views of ``n`` payloads copied out of ``slot`` (the copy releases the GIL)."""
        if not n:
            return []
        assert self._region is not None
        size = n * self.block_bytes
        out = np.empty(size, dtype=np.uint8)
        np.copyto(out, np.frombuffer(self._region, dtype=np.uint8, count=size, offset=slot * self.slot_bytes))
        view = memoryview(out).toreadonly()
        bb = self.block_bytes
        return [view[i * bb:(i + 1) * bb] for i in range(n)]

    def _wait(self, rid: int | None, until: float) -> dict[str, Any] | None:
        """The reply to ``rid`` (None: the ready line), skipping stale replies; None when the
        child died or ``until`` passed."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return None
            try:
                reply = self._replies.get(timeout=left)
            except queue.Empty:
                return None
            if reply is None:  # the pipe closed: the child is gone
                return None
            if rid is None:
                if reply.get("ready"):
                    return reply
            elif reply.get("id") == rid:
                return reply
            # an answer to a request given up on (cancelled, or an earlier fetch's): skip it

    def _cancel(self, rid: int) -> None:
        try:
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({"cancel": rid}).encode() + b"\n")
            self._proc.stdin.flush()
        except (OSError, ValueError, AssertionError):
            pass

    def _died(self, start: float, payloads: list[memoryview], nbytes: int) -> ReaderOutcome:
        """The child died or hung: kill it; what was copied so far stands."""
        proc = self._proc
        what = "no reply within the timeout" if proc is not None and proc.poll() is None else (
            f"the reader process exited ({None if proc is None else proc.returncode})")
        if proc is not None and proc.poll() is None:
            proc.kill()
        self.stop()
        return ReaderOutcome(payloads, nbytes, "reader", "reader_errors",
                             f"{what} after {time.monotonic() - start:.2f} s")


def _read_replies(stdout: Any, replies: queue.Queue[dict[str, Any] | None]) -> None:
    """Pipe lines -> ``replies`` (None at the end): a daemon thread per child."""
    try:
        for line in stdout:
            try:
                replies.put(json.loads(line))
            except ValueError:
                break
    except (OSError, ValueError):
        pass
    replies.put(None)
