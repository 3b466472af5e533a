"""Loading a local Hugging Face checkpoint folder: config, safetensors, tokenizer.

Weights load through ``safetensors`` only (single file or sharded with
``model.safetensors.index.json``); pickle-based ``*.bin`` checkpoints are
refused. Tensors are read lazily, one at a time, so a model is never held
twice in host memory. The tokenizer is optional: transformers'
``AutoTokenizer`` when installed, else the ``tokenizers`` library on
``tokenizer.json``; without either the engine takes token ids only.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol

from torch import Tensor

from kvforge.engine.model_config import ModelConfig, ModelConfigError, read_config
from kvforge.errors import ConfigError, ModelError
from kvforge.model_shapes import read_json_object

__all__ = ["Checkpoint", "Tokenizer", "load_checkpoint", "load_tokenizer", "SafetensorsWeights"]

log = logging.getLogger(__name__)


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...


class Checkpoint(NamedTuple):
    """A parsed checkpoint folder: its config, lazily read weights and tokenizer (or None)."""

    path: str
    config: ModelConfig
    weights: Mapping[str, Tensor]
    tokenizer: Tokenizer | None


class SafetensorsWeights(Mapping[str, Tensor]):
    """Tensor name -> tensor, read on access from one or more ``.safetensors`` files."""

    def __init__(self, folder: str) -> None:
        try:
            from safetensors import safe_open
        except ImportError as exc:  # pragma: no cover - an install problem
            raise ModelError("loading checkpoints needs the 'safetensors' package "
                             "(pip install 'kvforge[engine]')") from exc
        self._safe_open = safe_open
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        self._where: dict[str, str] = {}
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as fh:
                try:
                    weight_map = json.load(fh)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
                    raise ModelError(f"{index}: not a safetensors index ({exc})") from None
            if not isinstance(weight_map, dict):
                raise ModelError(f"{index}: 'weight_map' must map tensor names to files")
            for name, file in weight_map.items():
                path = os.path.join(folder, file)
                if not os.path.isfile(path):
                    raise ModelError(f"{index} names {file!r} for {name!r}, but that file is missing")
                self._where[name] = path
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if os.path.isfile(single):
                files = ["model.safetensors"]
            if not files:
                pickled = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
                hint = (f" (found {', '.join(sorted(pickled))}: pickle checkpoints are never loaded; "
                        f"convert them to safetensors)" if pickled else "")
                raise ModelError(f"no *.safetensors weights in {folder!r}{hint}")
            for file in files:
                path = os.path.join(folder, file)
                with _reading(path), safe_open(path, framework="pt", device="cpu") as fh:
                    for name in fh.keys():
                        self._where[name] = path
        self._handles: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Tensor:
        path = self._where[name]
        with _reading(path, name):
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = self._safe_open(path, framework="pt", device="cpu")
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


@contextmanager
def _reading(path: str, name: str | None = None) -> Iterator[None]:
    """Turn any failure to read ``path`` (truncated, corrupt, unreadable) into a :class:`ModelError`."""
    try:
        yield
    except ModelError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ...
        what = f"tensor {name!r} of " if name is not None else ""
        raise ModelError(f"cannot read {what}{path}: {type(exc).__name__}: {exc} "
                         f"(a truncated or corrupt safetensors file?)") from exc


class _HFTokenizer:
    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=True))


class _FastTokenizer:
    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, token_ids: list[int]) -> str:
        return str(self._tok.decode(token_ids, skip_special_tokens=True))


def load_tokenizer(folder: str) -> Tokenizer | None:
    """The folder's tokenizer, or None when it has none (or no library reads it)."""
    has_json = os.path.isfile(os.path.join(folder, "tokenizer.json"))
    has_any = has_json or any(os.path.isfile(os.path.join(folder, f))
                              for f in ("tokenizer_config.json", "tokenizer.model"))
    if not has_any:
        return None
    try:
        from transformers import AutoTokenizer
        return _HFTokenizer(AutoTokenizer.from_pretrained(folder))
    except Exception as exc:  # noqa: BLE001 - any failure falls back to `tokenizers`
        log.debug("transformers could not load the tokenizer of %s: %s", folder, exc)
    if has_json:
        try:
            from tokenizers import Tokenizer as FastTokenizer
            return _FastTokenizer(FastTokenizer.from_file(os.path.join(folder, "tokenizer.json")))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not load %s/tokenizer.json: %s", folder, exc)
    return None


def load_checkpoint(path: str | os.PathLike[str], *, tokenizer: bool = True) -> Checkpoint:
    """Parse a checkpoint folder; weights are read later, on access.

    Raises :class:`ModelError` for a missing folder or config, an unsupported
    architecture, or missing/pickled weights."""
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise ModelError(f"model path {folder!r} is not a folder (expected a local Hugging Face checkpoint)")
    raw = read_config(folder)
    gen_path = os.path.join(folder, "generation_config.json")
    gen = None
    if os.path.isfile(gen_path):
        try:
            gen = read_json_object(gen_path)
        except ConfigError as exc:
            raise ModelConfigError(str(exc)) from None
    try:
        config = ModelConfig.from_hf(raw, gen)
    except ModelConfigError as exc:
        raise ModelConfigError(f"checkpoint {folder}: {exc}") from None
    weights = SafetensorsWeights(folder)
    return Checkpoint(folder, config, weights, load_tokenizer(folder) if tokenizer else None)
