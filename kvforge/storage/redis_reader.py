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
copies the other out. :func:`fetch_parts` drives several children from the
calling thread alone: it sends every request, then waits on all their pipes
at once (``select``) and copies each round out as it lands, so a fetch takes
the GIL once per round that arrives and has no thread of its own to wake. Inside the child, ``fetch_threads`` ``MGET`` are in
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
import select
import subprocess
import sys
import time
from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = ["GRACE", "ReaderOutcome", "ReaderProcess", "available", "fetch_parts"]

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
    #: the process was found dead when the fetch began and was started again for it
    restarted: bool = False


class ReaderProcess:
    """One reader child and its shared region (see the module docstring). Not
    thread-safe: the tier drives its processes under its lock."""

    def __init__(self, url: str, *, block_bytes: int, fingerprint: bytes, prefix: bytes, timeout: float,
                 batch_size: int, fetch_threads: int, check_threads: int, read_size: int,
                 slot_bytes: int = 64 << 20) -> None:
        self.block_bytes = block_bytes
        self.blocks_per_slot = max(1, slot_bytes // block_bytes)
        self.slot_bytes = self.blocks_per_slot * block_bytes
        self.timeout = timeout
        self.batch_size = batch_size
        self._setup = dict(url=url, block_bytes=block_bytes, slot_bytes=self.slot_bytes,
                           fingerprint=fingerprint.hex(), prefix=prefix.decode(), timeout=timeout,
                           batch_size=batch_size, fetch_threads=fetch_threads, check_threads=check_threads,
                           read_size=read_size)
        self._proc: subprocess.Popen[bytes] | None = None
        self._region: mmap.mmap | None = None
        self._fd = -1  # the child's stdout, read without blocking
        self._partial = b""
        self._lines: list[dict[str, Any]] = []
        self._ready = False
        self._next_id = 0

    @property
    def pid(self) -> int | None:
        """The child's process id (None: not running)."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the child is running (started and not exited)."""
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
        self._proc, self._region, self._fd = proc, region, proc.stdout.fileno()
        self._partial, self._lines, self._ready = b"", [], False
        os.set_blocking(self._fd, False)
        if not self._send(dict(self._setup, fd=fd, size=size)):
            self._kill()
            raise OSError("the reader process closed its pipe at once")

    def stop(self) -> None:
        """Close the child's stdin (it exits), kill it if it lingers, unmap the region."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for pipe in (proc.stdin, proc.stdout):
                try:
                    assert pipe is not None
                    pipe.close()
                except OSError:
                    pass
            try:
                proc.wait(0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._fd = -1
        region, self._region = self._region, None
        if region is not None:
            try:
                region.close()
            except BufferError:  # numpy views of it still alive somewhere: the mapping goes with them
                pass

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self.stop()

    def _send(self, *msgs: dict[str, Any]) -> bool:
        """Write ``msgs`` to the child in one system call (each one gives the GIL up and takes
        it back, which costs a switch interval when the step loop is busy); False when its pipe
        is closed."""
        data = b"".join(json.dumps(m).encode() + b"\n" for m in msgs)
        try:
            assert self._proc is not None and self._proc.stdin is not None
            fd = self._proc.stdin.fileno()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            return True
        except (OSError, ValueError, AssertionError):
            return False

    def _read(self) -> bool:
        """Take what the pipe holds (one read: replies are small) into :attr:`_lines`; False at
        its end (the child is gone)."""
        try:
            chunk = os.read(self._fd, 1 << 20)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not chunk:
            return False
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            try:
                self._lines.append(json.loads(line))
            except ValueError:
                return False
        return True

    def wait_ready(self, timeout: float = START_TIMEOUT) -> bool:
        """Wait until the child has its client and says it is ready; False when it died or
        ``timeout`` seconds passed (it is then left running: a fetch waits again)."""
        until = time.monotonic() + timeout
        while not self._ready and self._proc is not None:
            if self._lines:
                self._ready = bool(self._lines.pop(0).get("ready"))
                continue
            left = until - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                return False
            if not self._read():
                return False
        return self._ready

    def fetch(self, keys: Sequence[bytes], budget: float) -> ReaderOutcome:
        """The longest valid run of ``keys`` from the first (:func:`fetch_parts` of one part)."""
        return fetch_parts([self], [keys], budget)[0]

    def write(self, keys: Sequence[bytes], payloads: Sequence[memoryview], px: int | None,
              timeout: float) -> dict[str, Any] | None:
        """Copy ``payloads`` (one block each, at most a slot's worth) into slot 0 and have the
        child frame and ``SET`` them; its answer, or None when it died or gave none within
        ``timeout`` seconds (it is then killed)."""
        assert self._region is not None and len(keys) <= self.blocks_per_slot
        slots = np.frombuffer(self._region, dtype=np.uint8)
        bb = self.block_bytes
        for i, payload in enumerate(payloads):  # each copy releases the GIL
            np.copyto(slots[i * bb:(i + 1) * bb], np.frombuffer(payload, dtype=np.uint8))
        del slots
        rid = self._next_id
        self._next_id += 1
        until = time.monotonic() + timeout + (0.0 if self._ready else START_TIMEOUT)
        if not self._send({"id": rid, "write": True, "slot": 0, "keys": [k.hex() for k in keys], "px": px}):
            self._kill()
            return None
        while True:
            while self._lines:
                reply = self._lines.pop(0)
                if not self._ready:
                    self._ready = bool(reply.get("ready"))
                elif reply.get("id") == rid:
                    return reply
            left = until - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0] or not self._read():
                if not self._lines:
                    self._kill()
                    return None

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


class _Part:
    """One process's share of a fetch, in rounds of a slot, two in flight."""

    def __init__(self, proc: ReaderProcess, keys: Sequence[bytes], deadline: float) -> None:
        self.proc = proc
        per = proc.blocks_per_slot
        self.rounds = [keys[lo:lo + per] for lo in range(0, len(keys), per)]
        self.deadline = deadline
        self.inflight: list[tuple[int, int, int]] = []  # (request id, slot, round), oldest first
        self.sent = 0
        self.payloads: list[memoryview] = []
        self.nbytes = 0
        self.outcome: ReaderOutcome | None = None
        self.start = time.monotonic()
        self.restarted = False  # its process was found dead and started again

    def begin(self) -> None:
        if not self.rounds:
            self.outcome = ReaderOutcome([], 0, "end", "", "")
            return
        if self._send(*range(min(2, len(self.rounds))), retry=True):
            return
        # its pipe was closed: it died since the last fetch (and was not reaped yet): a new one
        try:
            self.proc.start()
        except OSError:
            self.died()
            return
        self.restarted = True
        self._send(*range(min(2, len(self.rounds))))

    def _send(self, *slots: int, retry: bool = False) -> bool:
        """Ask for the next rounds, one into each of ``slots``, in one write. A closed pipe kills
        the part (``retry``: leaves it to the caller)."""
        proc = self.proc
        msgs, asked = [], []
        for slot in slots:
            r = self.sent + len(asked)
            rid = proc._next_id + len(asked)
            msgs.append({"id": rid, "slot": slot, "keys": [k.hex() for k in self.rounds[r]],
                         "budget": max(0.0, self.deadline - time.monotonic()), "first": r == 0})
            asked.append((rid, slot, r))
        if not proc._send(*msgs):
            if not retry:
                self.died()
            return False
        proc._next_id += len(asked)
        self.inflight += asked
        self.sent += len(asked)
        return True

    def wait_until(self) -> float:
        """When the oldest request in flight counts as lost: the budget, then each of its
        batches' socket timeouts, then the grace (and the start-up allowance if not ready)."""
        proc = self.proc
        _, _, r = self.inflight[0]
        batches = -(-len(self.rounds[r]) // max(1, proc.batch_size))
        base = max(self.deadline, self.start)
        extra = 0.0 if proc._ready else START_TIMEOUT
        return base + (batches + 1) * proc.timeout + GRACE + extra

    def on_lines(self) -> None:
        """Handle the replies that arrived (skipping stale ones: cancelled or an earlier fetch's)."""
        proc = self.proc
        while proc._lines and self.outcome is None:
            reply = proc._lines.pop(0)
            if not proc._ready:
                proc._ready = bool(reply.get("ready"))
                continue
            if not self.inflight or reply.get("id") != self.inflight[0][0]:
                continue
            _, slot, r = self.inflight.pop(0)
            n = reply["n"]
            self.nbytes += reply["bytes"]
            self.payloads += proc._copy_out(slot, n)
            if reply["stop"] != "end" or n < len(self.rounds[r]):
                for other, _, _ in self.inflight:
                    proc._send({"cancel": other})
                self.outcome = ReaderOutcome(self.payloads, self.nbytes, reply["stop"], reply["kind"],
                                             reply["what"])
            elif self.sent < len(self.rounds):
                self._send(slot)
            elif not self.inflight:
                self.outcome = ReaderOutcome(self.payloads, self.nbytes, "end", "", "")

    def died(self) -> None:
        """The child died or hung: kill it; what was copied so far stands."""
        proc = self.proc._proc
        hung = proc is not None and proc.poll() is None
        what = "no reply within the timeout" if hung else (
            f"the reader process exited ({None if proc is None else proc.returncode})")
        self.proc._kill()
        self.outcome = ReaderOutcome(self.payloads, self.nbytes, "reader", "reader_errors",
                                     f"{what} after {time.monotonic() - self.start:.2f} s")


def fetch_parts(procs: Sequence[ReaderProcess], parts: Sequence[Sequence[bytes]],
                budget: float) -> list[ReaderOutcome]:
    """Fetch ``parts[i]`` through ``procs[i]``, all at once, from the calling thread: every
    request sent first, then the pipes waited on together; one outcome per part. No round
    starts after ``budget`` seconds but each part's first."""
    deadline = time.monotonic() + budget
    todo = [_Part(proc, keys, deadline) for proc, keys in zip(procs, parts)]
    for part in todo:
        part.begin()
    while True:
        pending = [p for p in todo if p.outcome is None]
        if not pending:
            return [p.outcome._replace(restarted=p.restarted) for p in todo]  # type: ignore[union-attr]
        now = time.monotonic()
        for p in pending:
            if now >= p.wait_until():
                p.died()
        pending = [p for p in pending if p.outcome is None]
        if not pending:
            continue
        left = max(0.0, min(p.wait_until() for p in pending) - now)
        ready = select.select([p.proc._fd for p in pending], [], [], left)[0]
        for p in pending:
            if p.proc._fd in ready:
                if p.proc._read():
                    p.on_lines()
                else:
                    p.on_lines()  # replies that came before the end still count
                    if p.outcome is None:
                        p.died()
