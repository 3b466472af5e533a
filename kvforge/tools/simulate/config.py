"""``SimulationConfig``: what the simulated cache looks like and how it is scheduled."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvforge.errors import ConfigError

if TYPE_CHECKING:
    from kvforge.config import CacheConfig

__all__ = ["SimulationConfig", "EVICTION_POLICIES", "STATIC_RESERVE_MODES", "PREEMPTION_MODES", "MAX_SIMULATED_BLOCKS",
           "MAX_NUM_SEQS", "DEFAULT_HOST_BANDWIDTH"]

#: Most blocks a simulated pool may have: its bookkeeping lives in host memory
#: (about 50 bytes a block: 2**24 blocks take some 800 MiB).
MAX_SIMULATED_BLOCKS = 2**24
#: Most requests running at once.
MAX_NUM_SEQS = 2**20

#: ``lru``: cached blocks nobody references stay until space is needed, least recently
#: released first (the pool's policy). ``eager``: they are evicted at the end of every step.
EVICTION_POLICIES = ("lru", "eager")
#: what each request reserves in the static comparison (see :func:`~kvforge.tools.simulate.simulate_static`)
STATIC_RESERVE_MODES = ("max-model-len", "max-output", "oracle")
#: what a preempted request gives up: ``recompute`` frees its blocks (it is prefilled again
#: on readmission); ``swap`` copies them to the host tier and back (needs a host tier)
PREEMPTION_MODES = ("recompute", "swap")
#: Bytes per second of a host <-> device copy in the copy-time model: 55 GB/s, about what
#: pinned host memory gives an H200 over PCIe Gen5 x16 (64 GB/s per direction, nominal).
DEFAULT_HOST_BANDWIDTH = 55e9


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """What the simulated cache looks like and how it is scheduled.

    ``bytes_per_token`` (0: unknown) only turns block counts into bytes in
    the report; ``model`` names where it came from.

    ``num_host_blocks`` > 0 gives the simulated manager a host tier of that
    many blocks (:mod:`kvforge.core.host_tier`): evicted prefix blocks spill
    there and come back on a prefix hit, and with ``preemption="swap"``
    preempted requests are swapped out to it. ``host_bandwidth`` (bytes per
    second, default :data:`DEFAULT_HOST_BANDWIDTH`) prices every copy between
    the tiers: a batch of ``n`` blocks costs ``n * bytes_per_block /
    host_bandwidth`` seconds (no copy time when ``bytes_per_token`` is 0).

    Limits (a :class:`~kvforge.errors.ConfigError` naming the field beyond
    them): ``block_size`` <= 2**20 as in :class:`~kvforge.config.CacheConfig`,
    ``num_blocks`` and ``num_host_blocks`` <= :data:`MAX_SIMULATED_BLOCKS`
    (2**24), ``max_num_seqs`` <= 2**20, ``bytes_per_token`` <= 2**60,
    ``host_bandwidth`` a finite number > 0.
    """

    block_size: int = 16
    num_blocks: int = 4096
    enable_prefix_caching: bool = True
    enable_compaction: bool = True
    compaction_threshold: float = 0.3
    eviction_policy: str = "lru"
    max_num_seqs: int = 256
    static_reserve: str = "max-model-len"
    bytes_per_token: int = 0
    model: str = ""
    num_host_blocks: int = 0
    host_bandwidth: float = DEFAULT_HOST_BANDWIDTH
    preemption: str = "recompute"

    def __post_init__(self) -> None:
        # kvforge.config imports torch: here, not at module level, so that the
        # ``simulate`` parser (which reads this module's choices) imports no torch
        from kvforge.config import MAX_BLOCK_SIZE, MAX_BYTES

        for name, limit, why in (("block_size", MAX_BLOCK_SIZE, "2**20"),
                                 ("num_blocks", MAX_SIMULATED_BLOCKS, "2**24: the simulated pool lives in host memory"),
                                 ("max_num_seqs", MAX_NUM_SEQS, "2**20")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r:.40}")
            if v > limit:
                raise ConfigError(f"{name}={v} exceeds the limit of {limit} ({why})")
        t = self.compaction_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ConfigError(f"compaction_threshold must be a number in [0, 1], got {t!r:.40}")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ConfigError(f"eviction_policy {self.eviction_policy!r} is not one of {EVICTION_POLICIES}")
        if self.static_reserve not in STATIC_RESERVE_MODES:
            raise ConfigError(f"static_reserve {self.static_reserve!r} is not one of {STATIC_RESERVE_MODES}")
        if isinstance(self.bytes_per_token, bool) or not isinstance(self.bytes_per_token, int) \
                or not 0 <= self.bytes_per_token <= MAX_BYTES:
            raise ConfigError(f"bytes_per_token must be an integer in [0, 2**60], got {self.bytes_per_token!r:.40}")
        h = self.num_host_blocks
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise ConfigError(f"num_host_blocks must be an integer >= 0 (0: no host tier), got {h!r:.40}")
        if h > MAX_SIMULATED_BLOCKS:
            raise ConfigError(f"num_host_blocks={h} exceeds the limit of {MAX_SIMULATED_BLOCKS} "
                              "(2**24: the simulated host tier lives in host memory)")
        bw = self.host_bandwidth
        if isinstance(bw, bool) or not isinstance(bw, (int, float)) or not math.isfinite(bw) or bw <= 0:
            raise ConfigError(f"host_bandwidth must be a finite number of bytes/s > 0, got {bw!r:.40}")
        if self.preemption not in PREEMPTION_MODES:
            raise ConfigError(f"preemption {self.preemption!r} is not one of {PREEMPTION_MODES}")
        if self.preemption == "swap" and not h:
            raise ConfigError("preemption='swap' needs a host tier (num_host_blocks > 0)")

    @classmethod
    def from_cache_config(cls, config: CacheConfig, **kwargs: Any) -> SimulationConfig:
        """The simulated twin of a cache config (block size, blocks, prefix caching, compaction,
        host tier)."""
        base = dict(block_size=config.block_size, num_blocks=config.num_blocks,
                    enable_prefix_caching=config.enable_prefix_caching,
                    enable_compaction=config.enable_compaction,
                    compaction_threshold=config.compaction_threshold,
                    bytes_per_token=config.bytes_per_token, model=config.name,
                    num_host_blocks=config.num_host_blocks)
        base.update(kwargs)
        return cls(**base)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block (0 when ``bytes_per_token`` is unknown)."""
        return self.bytes_per_token * self.block_size

    @property
    def copy_s_per_block(self) -> float:
        """Modelled seconds to copy one block between the tiers (0 when bytes are unknown)."""
        return self.bytes_per_block / self.host_bandwidth
