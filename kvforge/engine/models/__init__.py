"""Model implementations of the engine (one Llama-family decoder)."""
from __future__ import annotations

from kvforge.engine.models.llama import AttentionInputs, LayerWeights, LlamaModel

__all__ = ["AttentionInputs", "LayerWeights", "LlamaModel"]
