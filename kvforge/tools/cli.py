"""The ``kvforge`` command line: plan, simulate, generate, demo.

Each subcommand parses its arguments straight into the config dataclasses
and prints aligned tables; long work shows progress.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from kvforge.config import CacheConfig, CachePreset, format_bytes, model_shape, parse_bytes
from kvforge.errors import ConfigError, KVForgeError
from kvforge.model_shapes import resolve_model_shape

__all__ = ["main", "format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(row: Sequence[str], raw: Sequence[object] | None) -> str:
        out = []
        for i, c in enumerate(row):
            numeric = raw is not None and isinstance(raw[i], (int, float))
            out.append(c.rjust(widths[i]) if numeric else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(cells[0], None), "  ".join("-" * w for w in widths)]
    lines += [fmt(c, r) for c, r in zip(cells[1:], rows)]
    return "\n".join(lines)


# ------------------------------------------------------------------- plan
def plan_rows(model: str, vram: int, context: int) -> tuple[str, list[list[object]]]:
    """What each preset, ``for_context_length`` and ``for_model`` give for a model."""
    if context <= 0:
        raise ConfigError(f"--context must be a positive number of tokens, got {context}")
    label, cfg_json = resolve_model_shape(model)
    shape = model_shape(cfg_json)
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
    add(f"for_model(vram={format_bytes(vram)})", CacheConfig.for_model(cfg_json, vram, dtype=dt))
    title = (f"{label}: {l} layers, {h} KV heads, head dim {d}, {str(dt).removeprefix('torch.')}; "
             f"{format_bytes(CacheConfig(16, 1, l, h, d, dt).bytes_per_token)} per token; context {context}")
    return title, rows


def _cmd_plan(args: argparse.Namespace) -> int:
    title, rows = plan_rows(args.model, parse_bytes(args.vram), args.context)
    print(title)
    print(format_table(["sizing", "block size", "blocks", "tokens", f"seqs of {args.context}", "memory"], rows))
    return 0


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="size a KV cache for a model: presets, context length, VRAM budget")
    p.add_argument("--model", default="llama-3-8b", help="built-in shape name or HF checkpoint folder/config.json")
    p.add_argument("--vram", default="24GiB", help="VRAM budget for the KV cache, e.g. 24GiB")
    p.add_argument("--context", type=int, default=8192, help="target context length in tokens")
    p.set_defaults(func=_cmd_plan)


# --------------------------------------------------------------- assembly
def _optional_registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    regs = []
    for module, name in (("kvforge.tools.simulate", "register"), ("kvforge.tools.generate", "register"),
                         ("kvforge.tools.demo", "register")):
        try:
            mod = __import__(module, fromlist=[name])
        except ImportError as exc:  # optional extras missing: the command says so when used
            logging.getLogger(__name__).debug("subcommand module %s unavailable: %s", module, exc)
            continue
        regs.append(getattr(mod, name))
    return regs


def build_parser() -> argparse.ArgumentParser:
    """The ``kvforge`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="kvforge", description="A paged KV cache for LLM inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_plan(sub)
    for register in _optional_registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvforge`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KVForgeError as exc:
        print(f"kvforge {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
