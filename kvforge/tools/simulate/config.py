"""``SimulationConfig``: what the simulated cache looks like and how it is scheduled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvforge.config import CacheConfig
from kvforge.errors import ConfigError

__all__ = ["SimulationConfig", "EVICTION_POLICIES", "STATIC_RESERVE_MODES"]

#: ``lru``: cached blocks nobody references stay until space is needed, least recently
#: released first (the pool's policy). ``eager``: they are evicted at the end of every step.
EVICTION_POLICIES = ("lru", "eager")
#: what each request reserves in the static comparison (see :func:`~kvforge.tools.simulate.simulate_static`)
STATIC_RESERVE_MODES = ("max-model-len", "max-output", "oracle")


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """What the simulated cache looks like and how it is scheduled.

    ``bytes_per_token`` (0: unknown) only turns block counts into bytes in
    the report; ``model`` names where it came from.
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

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "max_num_seqs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        t = self.compaction_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise ConfigError(f"compaction_threshold must be a number in [0, 1], got {t!r}")
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ConfigError(f"eviction_policy {self.eviction_policy!r} is not one of {EVICTION_POLICIES}")
        if self.static_reserve not in STATIC_RESERVE_MODES:
            raise ConfigError(f"static_reserve {self.static_reserve!r} is not one of {STATIC_RESERVE_MODES}")
        if isinstance(self.bytes_per_token, bool) or not isinstance(self.bytes_per_token, int) \
                or self.bytes_per_token < 0:
            raise ConfigError(f"bytes_per_token must be an integer >= 0, got {self.bytes_per_token!r}")

    @classmethod
    def from_cache_config(cls, config: CacheConfig, **kwargs: Any) -> SimulationConfig:
        """The simulated twin of a cache config (block size, blocks, prefix caching, compaction)."""
        base = dict(block_size=config.block_size, num_blocks=config.num_blocks,
                    enable_prefix_caching=config.enable_prefix_caching,
                    enable_compaction=config.enable_compaction,
                    compaction_threshold=config.compaction_threshold,
                    bytes_per_token=config.bytes_per_token, model=config.name)
        base.update(kwargs)
        return cls(**base)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block (0 when ``bytes_per_token`` is unknown)."""
        return self.bytes_per_token * self.block_size
