"""The Redis tier's fetches in a process of their own: :class:`ReaderProcess`.

:class:`~kvforge.storage.redis_tier.RedisTier` (``reader="process"``, the
default where the platform has ``os.memfd_create``) hands its fetches to a
child process running :mod:`kvforge.storage.redis_reader_worker`, which
owns the fetch connections, asks in batched ``MGET``, runs every check of
:func:`~kvforge.storage.redis_wire.check_value` and writes the payloads of
the valid run into a shared-memory region (an anonymous ``memfd`` mapped by
both processes, so nothing is left behind on any file system). This side
sends the keys and waits on a pipe, without the GIL, and lends the checked
payloads where they lie: the engine's step loop and the network no longer
take turns, and no byte is copied in the engine's process before the upload.

The region is a pool of ``num_slots`` slots of ``slot_bytes``, made once per
:class:`ReaderProcess` and kept across restarts of its child (so the engine
may register it once as page-locked memory). A fetch larger than a slot is
asked in rounds, two in flight, each round into a free slot. :func:`fetch_parts`
drives several children from the calling thread alone: it sends every request,
then waits on all their pipes at once (``select``), so a fetch takes the GIL
once per round that arrives and has no thread of its own to wake. A round's
payloads are either copied out at once and its slot freed (``hold=False``,
what :meth:`~kvforge.storage.redis_tier.RedisTier.fetch` returns), or left
where the child wrote them and lent to the caller as :class:`~kvforge.storage.remote.HeldPayloads`
(``hold=True``): the cache then uploads straight from the slot to its device
blocks, and hands the slot back once that copy is done. Slot reuse is safe by
construction: a slot is free only when no request the child may still be
serving names it (its reply came, or the child is dead) and no lent payload
lies in it (released, and the release's ``ready()`` says the last copy from it
finished). A fetch that finds no free slot for a round stops there (counted
``slots_full``): the rest of the prompt is computed. Inside the child,
``fetch_threads`` ``MGET`` are in flight and the check threads verify each
value and copy its payload into place (the checksum and the copy release the
GIL). The tier runs ``reader_processes`` of these children and splits a large
fetch between them: one client process reads at about a third of what the
server sends.

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
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

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
    """How a fetch through the reader process went: the payloads of the valid run
    (copied out: ``payloads``; or left in the process's slots: ``runs``, each
    ``(slot, num_blocks)`` in key order), the value bytes received, and why it
    stopped (``end``, ``miss``, ``refused``, ``fault``, ``budget``, ``cancelled``,
    ``slots``: no free slot for the next round, ``reader``: the child died or
    hung); ``kind`` names the refusal or fault counter, ``what`` what was found."""

    payloads: list[memoryview]
    nbytes: int
    stop: str
    kind: str
    what: str
    #: the process was found dead when the fetch began and was started again for it
    restarted: bool = False
    #: with ``hold``: the slots holding the run, ``(slot, num_blocks)`` in key order
    runs: tuple[tuple[int, int], ...] = ()

    @property
    def num_blocks(self) -> int:
        """Blocks of the valid run (copied out or held)."""
        return len(self.payloads) + sum(n for _, n in self.runs)


class ReaderProcess:
    """One reader child and its shared region of ``num_slots`` slots (see the module
    docstring). Fetches are not thread-safe (the tier drives its processes under its
    lock); handing slots back (:meth:`release_slot`) may come from any thread."""

    def __init__(self, url: str, *, block_bytes: int, fingerprint: bytes, prefix: bytes, timeout: float,
                 batch_size: int, fetch_threads: int, check_threads: int, read_size: int,
                 slot_bytes: int = 64 << 20, num_slots: int = 3) -> None:
        self.block_bytes = block_bytes
        self.blocks_per_slot = max(1, slot_bytes // block_bytes)
        self.slot_bytes = self.blocks_per_slot * block_bytes
        self.num_slots = num_slots
        self.timeout = timeout
        self.batch_size = batch_size
        self._setup = dict(url=url, block_bytes=block_bytes, slot_bytes=self.slot_bytes,
                           fingerprint=fingerprint.hex(), prefix=prefix.decode(), timeout=timeout,
                           batch_size=batch_size, fetch_threads=fetch_threads, check_threads=check_threads,
                           read_size=read_size)
        self._proc: subprocess.Popen[bytes] | None = None
        self._region: mmap.mmap | None = None  # kept across children: registered once
        self._memfd = -1
        #: what the tier's ``register`` hook returned for the region (None: not page-locked)
        self.pinned: Any = None
        self._fd = -1  # the child's stdout, read without blocking
        self._partial = b""
        self._lines: list[dict[str, Any]] = []
        self._ready = False
        self._next_id = 0
        self._slot_lock = threading.Lock()
        self._free = list(range(num_slots))  # slots nobody writes to or reads from
        self._asked: dict[int, int] = {}  # request id -> its slot, while the child may write it
        self._lent: set[int] = set()  # slots holding lent payloads
        self._returning: list[tuple[int, Callable[[], bool]]] = []  # released, once ready() says so

    @property
    def pid(self) -> int | None:
        """The child's process id (None: not running)."""
        return None if self._proc is None else self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the child is running (started and not exited)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def region(self) -> mmap.mmap | None:
        """The shared region (None before the first :meth:`start` and after :meth:`close`)."""
        return self._region

    def start(self) -> None:
        """Start a child (killing any old one); returns at once, the child gets ready in the
        background. The region is made on the first start and kept. Raises OSError when
        the process or the shared region cannot be made."""
        self.stop()
        size = self.num_slots * self.slot_bytes
        if self._region is None:
            fd = os.memfd_create("kvforge-redis-reader")
            try:
                os.ftruncate(fd, size)
                self._region = mmap.mmap(fd, size)
            except OSError:
                os.close(fd)
                raise
            self._memfd = fd
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, os.path.join(_HERE, "redis_reader_worker.py"),
             os.path.join(_HERE, "redis_wire.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, pass_fds=(self._memfd,))
        assert proc.stdin is not None and proc.stdout is not None
        self._proc, self._fd = proc, proc.stdout.fileno()
        self._partial, self._lines, self._ready = b"", [], False
        os.set_blocking(self._fd, False)
        if not self._send(dict(self._setup, fd=self._memfd, size=size)):
            self._kill()
            raise OSError("the reader process closed its pipe at once")

    def stop(self) -> None:
        """Close the child's stdin (it exits), kill it if it lingers; the slots it was asked to
        fill are free again (it is gone). The region stays (:meth:`close` unmaps it)."""
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
        with self._slot_lock:
            self._free += self._asked.values()
            self._asked.clear()

    def close(self, unregister: Callable[[Any], None] | None = None) -> None:
        """Stop the child and unmap the region (``unregister(pinned)`` first, if it was
        registered). A region with payloads still lent stays mapped (and registered):
        a copy may still read it."""
        self.stop()
        with self._slot_lock:
            if self._lent:
                return
        region, self._region = self._region, None
        if region is None:
            return
        if self.pinned is not None and unregister is not None:
            unregister(self.pinned)
        self.pinned = None
        try:
            region.close()
        except BufferError:  # views of it still alive somewhere: the mapping goes with them
            pass
        os.close(self._memfd)
        self._memfd = -1

    # ------------------------------------------------------------------ slots
    def acquire_slot(self) -> int | None:
        """A free slot for the next request (None: every slot is asked for or lent)."""
        with self._slot_lock:
            if self._returning:
                still = []
                for slot, ready in self._returning:
                    if ready():
                        self._free.append(slot)
                    else:
                        still.append((slot, ready))
                self._returning = still
            return self._free.pop() if self._free else None

    def lend(self, slot: int) -> None:
        """``slot``'s payloads are lent out (until :meth:`release_slot`)."""
        with self._slot_lock:
            self._lent.add(slot)

    def release_slot(self, slot: int, ready: Callable[[], bool] | None = None) -> None:
        """Hand a lent (or unused) slot back: free at once, or once ``ready()`` returns True
        (polled when a slot is wanted: e.g. a device copy's event)."""
        with self._slot_lock:
            self._lent.discard(slot)
            if ready is None or ready():
                self._free.append(slot)
            else:
                self._returning.append((slot, ready))

    @property
    def is_started(self) -> bool:
        """Whether a child was started and not stopped since (it may have died: its pipe says)."""
        return self._proc is not None

    @property
    def num_free_slots(self) -> int:
        """Slots free now (or once their last copy is done)."""
        with self._slot_lock:
            return len(self._free) + len(self._returning)

    def _answered(self, rid: Any) -> int | None:
        """The slot of request ``rid``, no longer written by the child (its reply came)."""
        with self._slot_lock:
            return self._asked.pop(rid, None) if isinstance(rid, int) else None

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
        """The longest valid run of ``keys`` from the first, copied out (:func:`fetch_parts` of one part)."""
        return fetch_parts([self], [keys], budget)[0]

    def write(self, keys: Sequence[bytes], payloads: Sequence[memoryview], px: int | None,
              timeout: float) -> dict[str, Any] | None:
        """Copy ``payloads`` (one block each, at most a slot's worth) into slot 0 and have the
        child frame and ``SET`` them; its answer, or None when it died or gave none within
        ``timeout`` seconds (it is then killed). A writer's process uses slot 0 only."""
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

    def slot_view(self, slot: int, num_blocks: int) -> memoryview:
        """``num_blocks`` payloads at ``slot``, back to back (a writable view of the region:
        the caller only reads it)."""
        assert self._region is not None
        lo = slot * self.slot_bytes
        return memoryview(self._region)[lo:lo + num_blocks * self.block_bytes]

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

    def __init__(self, proc: ReaderProcess, keys: Sequence[bytes], deadline: float, hold: bool) -> None:
        self.proc = proc
        per = proc.blocks_per_slot
        self.rounds = [keys[lo:lo + per] for lo in range(0, len(keys), per)]
        self.deadline = deadline
        self.hold = hold
        self.inflight: list[tuple[int, int, int]] = []  # (request id, slot, round), oldest first
        self.sent = 0
        self.payloads: list[memoryview] = []
        self.runs: list[tuple[int, int]] = []  # hold: (slot, blocks) lent, in key order
        self.nbytes = 0
        self.outcome: ReaderOutcome | None = None
        self.start = time.monotonic()
        self.restarted = False  # its process was found dead and started again

    def _end(self, stop: str, kind: str = "", what: str = "") -> None:
        self.outcome = ReaderOutcome(self.payloads, self.nbytes, stop, kind, what, runs=tuple(self.runs))

    def begin(self) -> None:
        if not self.rounds:
            self._end("end")
            return
        proc = self.proc
        # no liveness check first (each system call here may hand the GIL to the step loop for
        # a switch interval): a dead child's pipe refuses the request
        if proc._proc is not None and self._ask(2, retry=True):
            return
        # its pipe was closed: it died since the last fetch (and was not reaped yet): a new one
        try:
            proc.start()
        except OSError:
            self.died()
            return
        self.restarted = True
        self._ask(2)

    def _ask(self, num: int, retry: bool = False) -> bool:
        """Ask for up to ``num`` more rounds, each into a free slot, in one write; ends the part
        (``slots``) when none is free and nothing is in flight. A closed pipe kills the part
        (``retry``: leaves it to the caller)."""
        proc = self.proc
        msgs, asked = [], []
        for _ in range(min(num, len(self.rounds) - self.sent)):
            slot = proc.acquire_slot()
            if slot is None:
                break
            r = self.sent + len(asked)
            rid = proc._next_id + len(asked)
            msgs.append({"id": rid, "slot": slot, "keys": [k.hex() for k in self.rounds[r]],
                         "budget": max(0.0, self.deadline - time.monotonic()), "first": r == 0})
            asked.append((rid, slot, r))
        if not msgs:
            if not self.inflight:
                self._end("slots", "slots_full", f"all {proc.num_slots} slots of the reader process in use")
            return True
        with proc._slot_lock:
            proc._asked.update((rid, slot) for rid, slot, _ in asked)
        if not proc._send(*msgs):
            with proc._slot_lock:
                for rid, slot, _ in asked:
                    proc._asked.pop(rid, None)
                    proc._free.append(slot)
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
        """Handle the replies that arrived; a stale one (cancelled, or an earlier fetch's) only
        frees its slot."""
        proc = self.proc
        while proc._lines and self.outcome is None:
            reply = proc._lines.pop(0)
            if not proc._ready:
                proc._ready = bool(reply.get("ready"))
                continue
            slot = proc._answered(reply.get("id"))
            if not self.inflight or reply.get("id") != self.inflight[0][0]:
                if slot is not None:
                    proc.release_slot(slot)
                continue
            _, slot, r = self.inflight.pop(0)
            n = reply["n"]
            self.nbytes += reply["bytes"]
            if self.hold and n:
                proc.lend(slot)
                self.runs.append((slot, n))
            else:
                self.payloads += proc._copy_out(slot, n)
                proc.release_slot(slot)
            if reply["stop"] != "end" or n < len(self.rounds[r]):
                for other, _, _ in self.inflight:
                    proc._send({"cancel": other})  # their slots come back with their replies
                self._end(reply["stop"], reply["kind"], reply["what"])
            elif self.sent < len(self.rounds):
                self._ask(1)
            elif not self.inflight:
                self._end("end")

    def died(self) -> None:
        """The child died or hung: kill it (the slots it was asked to fill are free again);
        what came so far stands."""
        proc = self.proc._proc
        hung = proc is not None and proc.poll() is None
        what = "no reply within the timeout" if hung else (
            f"the reader process exited ({None if proc is None else proc.returncode})")
        self.proc._kill()
        self.inflight.clear()
        self._end("reader", "reader_errors", f"{what} after {time.monotonic() - self.start:.2f} s")


def fetch_parts(procs: Sequence[ReaderProcess], parts: Sequence[Sequence[bytes]],
                budget: float, hold: bool = False) -> list[ReaderOutcome]:
    """Fetch ``parts[i]`` through ``procs[i]``, all at once, from the calling thread: every
    request sent first, then the pipes waited on together; one outcome per part. No round
    starts after ``budget`` seconds but each part's first. ``hold``: the payloads stay in
    the processes' slots (``runs``, lent: the caller hands each slot back with
    :meth:`ReaderProcess.release_slot`); otherwise they are copied out."""
    deadline = time.monotonic() + budget
    todo = [_Part(proc, keys, deadline, hold) for proc, keys in zip(procs, parts)]
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
