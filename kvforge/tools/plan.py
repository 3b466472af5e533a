"""``kvforge plan``: size a KV cache for a model.

For a built-in model name (:data:`~kvforge.model_shapes.MODEL_SHAPES`) or a
checkpoint's ``config.json``, one table row per way of sizing the cache:
each preset, :meth:`~kvforge.config.CacheConfig.for_context_length` and
:meth:`~kvforge.config.CacheConfig.for_model` under a VRAM budget.
"""
from __future__ import annotations

import argparse
from typing import Any

from kvforge.config import CacheConfig, CachePreset, format_bytes
from kvforge.errors import ConfigError, KVForgeError
from kvforge.model_shapes import MODEL_SHAPES, model_shape, resolve_model
from kvforge.tools.checks import check_bytes
from kvforge.tools.output import format_table

__all__ = ["PLAN_HEADERS", "plan_rows", "register", "run"]

#: longest ``--context``: context lengths are int32 in the kernels' inputs
MAX_CONTEXT = 2**31 - 1

#: the table's columns (the ``seqs of N`` column names the context)
PLAN_HEADERS = ("sizing", "block size", "blocks", "tokens", "seqs of {context}", "memory")


def plan_rows(model: str, vram: int, context: int) -> tuple[str, list[list[object]]]:
    """The title line and one row per sizing (:data:`PLAN_HEADERS`) for ``model``:
    a built-in name or a checkpoint folder / ``config.json``."""
    if context <= 0:
        raise ConfigError(f"--context must be a positive number of tokens, got {context}")
    if context > MAX_CONTEXT:
        raise ConfigError(f"--context must be at most {MAX_CONTEXT} tokens (context lengths are int32), got {context}")
    if vram <= 0:
        raise ConfigError(f"--vram must be a positive byte size such as 24GiB, got {vram}")
    label, cfg_json = resolve_model(model)
    shape = model_shape(model)  # from the name or path, so that a bad field's message names the file
    h, d, l, dt = shape["num_kv_heads"], shape["head_dim"], shape["num_layers"], shape["dtype"]
    rows: list[list[object]] = []

    def add(name: str, cfg: CacheConfig) -> None:
        per_seq = -(-context // cfg.block_size)
        rows.append([name, cfg.block_size, cfg.num_blocks, cfg.max_context_length(),
                     cfg.num_blocks // per_seq, cfg.estimated_memory_human()])

    for preset in CachePreset.builtin():
        add(f"preset {preset.name} ({format_bytes(preset.vram_target_bytes or 0)})",
            CacheConfig.from_preset(preset, h, d, l, dtype=dt))
    try:
        add(f"for_context_length({context})", CacheConfig.for_context_length(context, h, d, l, vram, dtype=dt))
    except KVForgeError as exc:
        rows.append([f"for_context_length({context})", "-", "-", "-", 0, str(exc)])
    try:
        add(f"for_model(vram={format_bytes(vram)})", CacheConfig.for_model(cfg_json, vram, dtype=dt))
    except ConfigError as exc:  # too small for one block, or more blocks than block ids
        raise ConfigError(f"--vram {format_bytes(vram)}: {exc}") from None
    title = (f"{label}: {l} layers, {h} KV heads, head dim {d}, {str(dt).removeprefix('torch.')}; "
             f"{format_bytes(CacheConfig(16, 1, l, h, d, dt).bytes_per_token)} per token; context {context}")
    return title, rows


def run(args: argparse.Namespace) -> int:
    """Run ``kvforge plan``: print the title and the table; exit status 0
    (errors propagate to the entry point, which prints one line)."""
    title, rows = plan_rows(args.model, check_bytes("--vram", args.vram), args.context)
    print(title)
    print(format_table([h.format(context=args.context) for h in PLAN_HEADERS], rows))
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to an ``argparse`` subparsers object; its handler is :func:`run`."""
    p = subparsers.add_parser("plan", help="size a KV cache for a model: presets, context length, VRAM budget")
    p.add_argument("--model", default="llama-3-8b",
                   help=f"built-in shape ({', '.join(MODEL_SHAPES)}) or HF checkpoint folder/config.json")
    p.add_argument("--vram", default="24GiB", help="VRAM budget for the KV cache, e.g. 24GiB")
    p.add_argument("--context", type=int, default=8192, help="target context length in tokens")
    p.set_defaults(func=run)
    return p
