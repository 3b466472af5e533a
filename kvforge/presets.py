"""Sizing presets: ROCmForge's SMALL / MEDIUM / LARGE page sizes and VRAM targets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvforge.errors import ConfigError
from kvforge.units import positive_int as _positive_int

__all__ = ["CachePreset", "KV_SHARE_OF_VRAM", "page_size_for_context"]

#: Share of a preset's VRAM target given to the KV cache (the rest holds
#: weights and activations). ROCmForge uses one half.
KV_SHARE_OF_VRAM = 0.5

def page_size_for_context(context_len: int) -> int:
    """The page size for a target context (16 below 1024 tokens, 32 below 4096, 64 above)."""
    # ROCmForge's rule: short contexts get small pages (less internal waste),
    # long ones larger pages (fewer table entries, longer kernel tiles).
    if context_len < 1024:
        return 16
    if context_len < 4096:
        return 32
    return 64


@dataclass(frozen=True, slots=True)
class CachePreset:
    """A named sizing preset: page size and a VRAM target (or a page count).

    ``SMALL`` (16-token pages, 4 GiB, 1B-3B models), ``MEDIUM`` (32, 12 GiB,
    7B-13B), ``LARGE`` (64, 40 GiB, 30B-70B). :meth:`custom` fixes the page
    size and the number of pages directly. The KV cache gets
    ``KV_SHARE_OF_VRAM`` (half) of a preset's VRAM target.
    """

    name: str
    page_size: int
    vram_target_bytes: int | None = None
    max_pages: int | None = None
    model_sizes: str = ""

    SMALL: ClassVar[CachePreset]
    MEDIUM: ClassVar[CachePreset]
    LARGE: ClassVar[CachePreset]

    def __post_init__(self) -> None:
        _positive_int("page_size", self.page_size)
        if self.vram_target_bytes is None and self.max_pages is None:
            raise ConfigError(f"preset {self.name!r} needs a vram_target_bytes or a max_pages")
        if self.vram_target_bytes is not None:
            _positive_int("vram_target_bytes", self.vram_target_bytes)
        if self.max_pages is not None:
            _positive_int("max_pages", self.max_pages)

    @classmethod
    def custom(cls, page_size: int, max_pages: int) -> CachePreset:
        """A preset of exactly ``max_pages`` pages of ``page_size`` tokens."""
        return cls("custom", _positive_int("page_size", page_size), None,
                   _positive_int("max_pages", max_pages), "any")

    @classmethod
    def builtin(cls) -> tuple[CachePreset, ...]:
        """The three built-in presets, smallest first."""
        return (cls.SMALL, cls.MEDIUM, cls.LARGE)

    @property
    def kv_budget_bytes(self) -> int | None:
        """Bytes of the VRAM target given to the KV cache (None for custom presets)."""
        if self.vram_target_bytes is None:
            return None
        return int(self.vram_target_bytes * KV_SHARE_OF_VRAM)


CachePreset.SMALL = CachePreset("small", 16, 4 * 2**30, None, "1B-3B")
CachePreset.MEDIUM = CachePreset("medium", 32, 12 * 2**30, None, "7B-13B")
CachePreset.LARGE = CachePreset("large", 64, 40 * 2**30, None, "30B-70B")
