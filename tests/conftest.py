"""Shared test fixtures."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import pytest
import torch

if TYPE_CHECKING:
    from tests.redis_server import RedisServer


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices: one intra-op thread is several times faster than two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------ a real Redis server (tests/redis_server.py)
@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A redis-server on a free loopback port, for the module's tests."""
    from tests.redis_server import RedisServer
    with RedisServer() as s:
        yield s


@pytest.fixture
def redis(server: RedisServer) -> Iterator[RedisServer]:
    """The module's server, emptied for each test."""
    server.client().flushall()
    yield server
