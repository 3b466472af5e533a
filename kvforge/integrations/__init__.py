"""Adapters between kvforge and other libraries (e.g. Hugging Face transformers).

This layer sits above storage, kernels and the engine and below the tools;
each adapter lives in its own module and imports its library lazily: the
names below are looked up on first use, so ``import kvforge`` (or
``kvforge.integrations``) never imports transformers.

- :mod:`kvforge.integrations.hf`: ``attn_implementation="kvforge"``
  (:data:`ATTENTION_NAME`, registered on import) and :class:`KVForgeCache`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "ATTENTION_NAME": "kvforge.integrations.hf",
    "KVForgeCache": "kvforge.integrations.hf",
    "register_hf_attention": "kvforge.integrations.hf",
}
_ALIASES = {"register_hf_attention": "register"}

__all__ = sorted(_EXPORTS, key=str.lower)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvforge.integrations' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from kvforge.integrations.hf import ATTENTION_NAME, KVForgeCache
    from kvforge.integrations.hf import register as register_hf_attention
