"""Model implementations of the engine (one Llama-family decoder)."""
from __future__ import annotations

from kvforge.engine.models.llama import LayerWeights, LlamaModel

__all__ = ["LayerWeights", "LlamaModel"]
