"""kvforge inside Hugging Face transformers: a paged attention backend and a ``Cache``.

Two entry points (see ``docs/hf_integration.md``):

- ``attn_implementation="kvforge"`` (:data:`ATTENTION_NAME`), registered with
  transformers when this package is imported: the model's own code runs with
  kvforge's store and paged prefill/decode kernels;
- :class:`KVForgeCache`: a transformers ``Cache`` whose keys and values live
  in a kvforge :class:`~kvforge.storage.KVCache` (with any attention
  implementation; with ``"kvforge"`` the kernels read the pool directly).

Needs transformers (5.x); importing this package without it raises
:class:`~kvforge.errors.MissingExtraError`.
"""
from __future__ import annotations

from kvforge.errors import MissingExtraError

try:
    import transformers  # noqa: F401
    from transformers.cache_utils import Cache as _Cache  # noqa: F401
    from transformers.masking_utils import AttentionMaskInterface as _Masks  # noqa: F401
except ImportError as exc:
    raise MissingExtraError(
        f"kvforge.integrations.hf needs Hugging Face transformers 5 ({exc}): pip install 'transformers>=5'") from exc

from kvforge.integrations.hf.attention import ATTENTION_NAME, kvforge_attention_forward, kvforge_mask, register
from kvforge.integrations.hf.cache import KVForgeCache, KVForgeLayer

__all__ = ["ATTENTION_NAME", "KVForgeCache", "KVForgeLayer", "kvforge_attention_forward", "kvforge_mask", "register"]

register()
