"""A real ``redis-server`` for tests: started on a free loopback port in a temp dir, stopped after.

No mock and no fake server: the tier is tested against the server it will
meet in production. ``make test`` installs ``redis-server`` when it is
missing; without it, :func:`find_redis_server` fails the test (it does not
skip) with that instruction.

:class:`RedisServer` runs one server process with options such as
``maxmemory``, ``maxmemory_policy`` and ``requirepass``; :meth:`~RedisServer.kill`
(SIGKILL), :meth:`~RedisServer.pause` / :meth:`~RedisServer.resume` (SIGSTOP /
SIGCONT: a hung server, whose socket still accepts), :meth:`~RedisServer.restart`
(a fresh, empty server on the same port: nothing is persisted).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

__all__ = ["RedisServer", "find_redis_server", "free_port"]

#: where Debian's package puts it, in case PATH lacks /usr/bin or /usr/sbin
_FALLBACKS = ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")


def find_redis_server() -> str:
    """The path of ``redis-server``; fails the calling test when there is none."""
    found = shutil.which("redis-server") or next((p for p in _FALLBACKS if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail("redis-server is not installed (not on PATH nor in /usr/bin): run `make test`, which "
                    "installs it (apt-get install -y redis-server)", pytrace=False)
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the test process dies, however it dies
    (a timeout's SIGKILL runs no cleanup), so that no server outlives its tests (Linux)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port``, its files in a temp dir.

    ``options`` become ``--name value`` arguments (underscores to dashes:
    ``maxmemory="2mb", maxmemory_policy="noeviction", requirepass="s3cret"``).
    Persistence is off, so a restart starts empty."""

    def __init__(self, **options: Any) -> None:
        self.binary = find_redis_server()
        self.port = free_port()
        self.options = options
        self.dir = Path(tempfile.mkdtemp(prefix="kvforge-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def password(self) -> str | None:
        return self.options.get("requirepass")

    def url(self, password: str | None = None, db: int = 0) -> str:
        """``redis://127.0.0.1:port/db``, with ``:password@`` when given."""
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
                "--logfile", str(self.dir / "redis.log")]
        for name, value in self.options.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, cwd=self.dir, preexec_fn=_die_with_parent)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    reply = s.recv(64)
                if reply.startswith((b"+PONG", b"-NOAUTH")):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} not ready after {timeout} s")

    def client(self) -> Any:
        """A plain ``redis`` client of this server (what tests write raw values with)."""
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL the server (no goodbye to its clients) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: the server hangs, its socket still accepts (calls time out)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill the server and start a fresh, empty one on the same port."""
        self.kill()
        self.start()

    def stop(self) -> None:
        """Kill the server and remove its dir."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
