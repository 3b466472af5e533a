"""Loading a local Hugging Face checkpoint folder: config, safetensors, tokenizer.

Weights load through ``safetensors`` only (single file or sharded with
``model.safetensors.index.json``); pickle-based ``*.bin`` / ``*.pt``
checkpoints are never read, not even as a fallback. Every file read is
confined to the checkpoint folder: an index entry that is absolute, climbs
out with ``..``, or resolves (through a symlink) outside the folder is
refused, naming the entry (the one exception is the Hugging Face hub cache,
whose ``snapshots/<revision>/`` files are symlinks into the repository's
``blobs/``). Headers are read first: every tensor's name, shape and dtype is
held against ``config.json`` (:func:`~kvforge.engine.model_config.check_tensors`)
before any tensor is read, so a checkpoint of the wrong shape, a quantized
or integer one, a shard that is missing or holds other tensors than its index
says, or a tensor held twice fails here with a :class:`ModelError` naming the
file and tensor, not at the first forward. Tensors are then read lazily, one
at a time, so a model is never held twice in host memory. The tokenizer is
optional: transformers' ``AutoTokenizer`` when installed, else the
``tokenizers`` library on ``tokenizer.json``; without either the engine takes
token ids only.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple, Protocol

from torch import Tensor

from kvforge.engine.model_config import ModelConfig, ModelConfigError, TensorSpec, check_tensors, read_config
from kvforge.errors import ConfigError, ModelError
from kvforge.model_shapes import read_json_object

__all__ = ["Checkpoint", "Tokenizer", "load_checkpoint", "load_tokenizer", "read_model_config", "SafetensorsWeights"]

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r".*-\d+-of-\d+\.safetensors$")
#: safetensors header dtype -> the torch name :func:`check_tensors` takes
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
              "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


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
    """Tensor name -> tensor, read on access from one or more ``.safetensors`` files
    inside ``folder``.

    Construction reads only the files' headers: :attr:`specs` gives each
    tensor's shape, dtype and file. Raises :class:`ModelError` for an index
    that is not JSON or names a file outside the folder, that is not
    ``.safetensors``, or that is missing; for a shard that does not hold a
    tensor its index names, or holds one its index does not name; for a
    tensor held by two files; for sharded files without their index."""

    def __init__(self, folder: str) -> None:
        try:
            from safetensors import safe_open
        except ImportError as exc:  # pragma: no cover - an install problem
            raise ModelError("loading checkpoints needs the 'safetensors' package "
                             "(pip install 'kvforge[engine]')") from exc
        self._safe_open = safe_open
        self._roots = _allowed_roots(folder)
        index = os.path.join(folder, INDEX_FILE)
        single = os.path.join(folder, "model.safetensors")
        claimed: dict[str, str] | None = None  # tensor -> file, as the index says
        if os.path.lexists(index):
            claimed = self._read_index(index)
            files = sorted(set(claimed.values()))
        elif os.path.lexists(single):
            files = [self._confined(folder, "model.safetensors", single)]
        else:
            names = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            shards = [f for f in names if _SHARD_RE.fullmatch(f)]
            if shards:
                raise ModelError(f"{folder!r} holds sharded weights ({', '.join(shards[:3])}"
                                 f"{', ...' if len(shards) > 3 else ''}) but no {INDEX_FILE}: which "
                                 f"tensors each shard should hold is unknown, so nothing is loaded")
            if not names:
                pickled = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
                hint = (f" (found {', '.join(sorted(pickled))}: pickle checkpoints are never loaded; "
                        f"convert them to safetensors)" if pickled else "")
                raise ModelError(f"no *.safetensors weights in {folder!r}{hint}")
            files = [self._confined(folder, f, os.path.join(folder, f)) for f in names]
        self._specs: dict[str, TensorSpec] = {}
        for path in files:
            with _reading(path), safe_open(path, framework="pt", device="cpu") as fh:
                for name in fh.keys():
                    held = self._specs.get(name)
                    if held is not None:
                        raise ModelError(f"tensor {name!r} is held by two files, {held.file} and {path}")
                    piece = fh.get_slice(name)
                    code = piece.get_dtype()
                    self._specs[name] = TensorSpec(tuple(int(d) for d in piece.get_shape()),
                                                   _ST_DTYPES.get(code, code.lower()), path)
        if claimed is not None:
            for name, path in claimed.items():
                held = self._specs.get(name)
                if held is None or held.file != path:
                    raise ModelError(f"{index} names {os.path.relpath(path, folder)!r} for tensor {name!r}, "
                                     f"but that file does not hold it")
            for name, spec in self._specs.items():
                if name not in claimed:
                    raise ModelError(f"{spec.file} holds tensor {name!r}, which {index} does not name")
        self._handles: dict[str, Any] = {}

    def _read_index(self, index: str) -> dict[str, str]:
        """Tensor name -> confined real path of its shard, from ``model.safetensors.index.json``."""
        folder = os.path.dirname(index)
        self._confined(folder, INDEX_FILE, index)
        try:
            data = read_json_object(index)  # a tensor named twice is a duplicate key: refused
        except ConfigError as exc:
            raise ModelError(f"not a safetensors index: {exc}") from None
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index}: 'weight_map' must map tensor names to files, got {weight_map!r:.60}")
        out: dict[str, str] = {}
        seen: dict[str, str] = {}  # entry -> its real path (checked once per file)
        for name, entry in weight_map.items():
            if not isinstance(entry, str):
                raise ModelError(f"{index}: the file of tensor {name!r} must be a string, got {entry!r:.60}")
            if entry not in seen:
                seen[entry] = self._confined(folder, entry, f"{index} entry {entry!r} (tensor {name!r})")
            out[name] = seen[entry]
        return out

    def _confined(self, folder: str, entry: str, what: str) -> str:
        """The real path of ``entry`` (relative to ``folder``), which must be a
        ``.safetensors`` file (or the index) inside the folder; else :class:`ModelError`."""
        parts = re.split(r"[\\/]", entry)
        if (not entry or "\x00" in entry or os.path.isabs(entry) or entry.startswith(("/", "\\"))
                or re.match(r"^[A-Za-z]:", entry) or ".." in parts):
            raise ModelError(f"{what}: only plain paths inside the checkpoint folder are allowed "
                             f"(no absolute path, no '..')")
        if entry != INDEX_FILE and not entry.endswith(".safetensors"):
            raise ModelError(f"{what}: only .safetensors files are loaded (pickle checkpoints never are)")
        path = os.path.realpath(os.path.join(folder, entry))
        if not any(os.path.commonpath([root, path]) == root for root in self._roots):
            raise ModelError(f"{what} resolves to {path}, outside the checkpoint folder "
                             f"{self._roots[0]} (a symlink out of the folder is refused)")
        if not os.path.isfile(path):
            raise ModelError(f"{what}: that file is missing")
        return path

    @property
    def specs(self) -> Mapping[str, TensorSpec]:
        """Tensor name -> shape, dtype and file, from the headers (nothing read)."""
        return self._specs

    def __getitem__(self, name: str) -> Tensor:
        path = self._specs[name].file
        assert path is not None
        with _reading(path, name):
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = self._safe_open(path, framework="pt", device="cpu")
            return handle.get_tensor(name)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)


def _allowed_roots(folder: str) -> list[str]:
    """The real folders weights may come from: the checkpoint folder and, for a
    Hugging Face hub cache snapshot (``<repo>/snapshots/<revision>``), its ``<repo>/blobs``."""
    root = os.path.realpath(folder)
    roots = [root]
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if os.path.isdir(blobs):
            roots.append(os.path.realpath(blobs))
    return roots


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


def read_model_config(folder: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``config.json`` and, when there is one, ``generation_config.json`` of a checkpoint
    folder, parsed (fields are checked by whoever reads them). Raises :class:`ModelError`
    for a path that is not a folder, :class:`ModelConfigError` for a file that is not a
    JSON object."""
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
    return raw, gen


def load_checkpoint(path: str | os.PathLike[str], *, tokenizer: bool = True) -> Checkpoint:
    """Parse a checkpoint folder and check it; weights are read later, on access.

    Raises :class:`ModelError` for a missing folder or config, an unsupported
    architecture, missing/pickled weights, or any tensor whose name, shape or
    dtype does not fit the config; a malformed ``config.json`` or
    ``generation_config.json`` field raises
    :class:`~kvforge.engine.model_config.ModelConfigError` (a ModelError and a
    ConfigError) naming the field."""
    folder = os.fspath(path)
    raw, gen = read_model_config(folder)
    try:
        config = ModelConfig.from_hf(raw, gen)
    except ModelConfigError as exc:
        raise ModelConfigError(f"checkpoint {folder}: {exc}") from None
    weights = SafetensorsWeights(folder)
    check_tensors(config, weights.specs, f"checkpoint {folder}")
    return Checkpoint(folder, config, weights, load_tokenizer(folder) if tokenizer else None)
