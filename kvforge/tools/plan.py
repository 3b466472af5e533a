"""``kvforge plan``: size a KV cache for a model.

For a built-in model name (:data:`~kvforge.model_shapes.MODEL_SHAPES`) or a
checkpoint's ``config.json``, one table row per way of sizing the cache:
each preset, :meth:`~kvforge.config.CacheConfig.for_context_length` and
:meth:`~kvforge.config.CacheConfig.for_model` under a VRAM budget.

The rows are independent: the presets do not depend on ``--vram``, and a
sizing the budget cannot give (not one block fits, a context longer than
the budget holds, more blocks than block ids) shows dashes and a short note
in the memory column instead of numbers, so ``plan --vram 0`` still prints
every preset. Planning is arithmetic on a handful of configs: it never
takes long enough for a progress display.

``--host-memory SIZE`` (0: none, the default) adds a host tier of that
budget to every row (:class:`~kvforge.config.CacheConfig` ``host_memory``):
three more columns, :data:`HOST_HEADERS`, give the host blocks of the row's
block size, the tokens of keys and values they hold, and their ratio to the
row's device blocks (``-`` where the device column is). Without it the
table is as before.

``--kv-dtype`` (default: the checkpoint's dtype) sizes every row for another
storage dtype: ``fp8_e4m3`` / ``fp8_e5m2`` store one byte an element, so each
row holds twice the tokens of bf16 in the same memory.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from kvforge.errors import ConfigError
from kvforge.tools.args import MODEL_NAMES

if TYPE_CHECKING:
    from kvforge.config import CacheConfig

__all__ = ["PLAN_HEADERS", "PLAN_ALIGN", "HOST_HEADERS", "HOST_ALIGN", "plan_headers", "plan_rows", "register", "run"]

#: longest ``--context``: context lengths are int32 in the kernels' inputs
MAX_CONTEXT = 2**31 - 1

#: the table's columns (the ``seqs of N`` column names the context)
PLAN_HEADERS = ("sizing", "block size", "blocks", "tokens", "seqs of {context}", "memory")
#: numbers right-aligned, dashes of a row that does not fit too
PLAN_ALIGN = "lrrrrl"

#: the columns ``--host-memory`` adds: host blocks, the tokens they hold, host blocks per device block
HOST_HEADERS = ("host blocks", "host tokens", "host:device")
HOST_ALIGN = "rrr"

NO_BLOCK = "no block fits"
TOO_MANY_BLOCKS = "over 2**31 - 1 blocks"


def _too_long(tokens: int) -> str:
    return f"context too long: {tokens} tokens fit"


def plan_headers(context: int, host_memory: int = 0) -> tuple[list[str], str]:
    """The table's column names and alignment: :data:`PLAN_HEADERS` (and :data:`HOST_HEADERS`
    with a host tier)."""
    headers = [h.format(context=context) for h in PLAN_HEADERS]
    if host_memory:
        return headers + list(HOST_HEADERS), PLAN_ALIGN + HOST_ALIGN
    return headers, PLAN_ALIGN


def _ratio(host_blocks: int, device_blocks: int) -> str:
    """Host blocks to device blocks, the smaller side 1, three significant digits and no
    exponent: ``'2.67:1'``, ``'1024:1'``, ``'1:2048'`` (``'0:1'``: not one host block)."""
    def num(x: float) -> str:
        return f"{x:.0f}" if x >= 100 else f"{x:.3g}"

    if host_blocks == 0:
        return "0:1"
    r = host_blocks / device_blocks
    return f"{num(r)}:1" if r >= 1 else f"1:{num(1 / r)}"


def plan_rows(model: str, vram: int, context: int, host_memory: int = 0,
              kv_dtype: str | None = None) -> tuple[str, list[list[object]]]:
    """The title line and one row per sizing (:data:`PLAN_HEADERS`) for ``model``:
    a built-in name or a checkpoint folder / ``config.json``. ``vram`` (bytes,
    >= 0) only affects the last two rows. ``host_memory`` (bytes, >= 0; 0: no
    host tier) appends :data:`HOST_HEADERS` to every row and names the tier in
    the title. ``kv_dtype`` (a name such as ``"fp8_e4m3"``; None: the model's
    dtype) is the storage dtype every row is sized for."""
    from kvforge.config import MAX_NUM_BLOCKS, CacheConfig, CachePreset, format_bytes, resolve_kv_dtype
    from kvforge.model_shapes import model_shape, resolve_model

    if context <= 0:
        raise ConfigError(f"--context must be a positive number of tokens, got {context}")
    if context > MAX_CONTEXT:
        raise ConfigError(f"--context must be at most {MAX_CONTEXT} tokens (context lengths are int32), got {context}")
    if vram < 0:
        raise ConfigError(f"--vram must be a byte size >= 0 such as 24GiB, got {vram}")
    if host_memory < 0:
        raise ConfigError(f"--host-memory must be a byte size >= 0 such as 64GiB (0: no host tier), got {host_memory}")
    label, cfg_json = resolve_model(model)
    shape = model_shape(model)  # from the name or path, so that a bad field's message names the file
    h, d, l, dt = shape["num_kv_heads"], shape["head_dim"], shape["num_layers"], shape["dtype"]
    if kv_dtype is not None:
        dt = resolve_kv_dtype(kv_dtype, "--kv-dtype")  # its message names the flag and the value
    rows: list[list[object]] = []

    def host_blocks(block_size: int) -> int:
        """The host tier's blocks of ``block_size`` tokens, by the config's own arithmetic."""
        try:
            return CacheConfig(block_size, 1, l, h, d, dt, host_memory=host_memory).num_host_blocks
        except ConfigError as exc:
            raise ConfigError(f"--host-memory: {exc}") from None

    def host_columns(block_size: int, device_blocks: int | None) -> list[object]:
        if not host_memory:
            return []
        n = host_blocks(block_size)
        return [n, n * block_size, "-" if device_blocks is None else _ratio(n, device_blocks)]

    def add(name: str, cfg: CacheConfig) -> None:
        per_seq = -(-context // cfg.block_size)
        rows.append([name, cfg.block_size, cfg.num_blocks, cfg.max_context_length(),
                     cfg.num_blocks // per_seq, cfg.estimated_memory_human()]
                    + host_columns(cfg.block_size, cfg.num_blocks))

    def note(name: str, block_size: int, text: str) -> None:
        rows.append([name, block_size, "-", "-", "-", text] + host_columns(block_size, None))

    for preset in CachePreset.builtin():
        name = f"preset {preset.name} ({format_bytes(preset.vram_target_bytes or 0)})"
        one = CacheConfig(preset.page_size, 1, l, h, d, dt)
        if (preset.kv_budget_bytes or 0) < one.bytes_per_block:
            note(name, preset.page_size, NO_BLOCK)
        else:
            add(name, CacheConfig.from_preset(preset, h, d, l, dtype=dt))

    # the page size for_context_length picks, and the blocks one sequence needs
    name = f"for_context_length({context})"
    unbounded = CacheConfig.for_context_length(context, h, d, l, dtype=dt)
    fit = vram // unbounded.bytes_per_block
    if fit < 1:
        note(name, unbounded.block_size, NO_BLOCK)
    elif fit < unbounded.num_blocks:
        note(name, unbounded.block_size, _too_long(fit * unbounded.block_size))
    else:
        add(name, CacheConfig.for_context_length(context, h, d, l, vram, dtype=dt))

    name = f"for_model(vram={format_bytes(vram)})"
    one = CacheConfig(16, 1, l, h, d, dt)
    fit = vram // one.bytes_per_block
    if fit < 1:
        note(name, one.block_size, NO_BLOCK)
    elif fit > MAX_NUM_BLOCKS:
        note(name, one.block_size, TOO_MANY_BLOCKS)
    else:
        add(name, CacheConfig.for_model(cfg_json, vram, dtype=dt))
    title = (f"{label}: {l} layers, {h} KV heads, head dim {d}, {str(dt).removeprefix('torch.')}; "
             f"{format_bytes(one.bytes_per_token)} per token; context {context}")
    if host_memory:
        title += f"; host tier {format_bytes(host_memory)}"
    return title, rows


def run(args: argparse.Namespace) -> int:
    """Run ``kvforge plan``: print the title and the table; exit status 0
    (errors propagate to the entry point, which prints one line)."""
    from kvforge.tools.checks import check_bytes
    from kvforge.tools.output import format_table

    vram = check_bytes("--vram", args.vram, positive=False)
    host_memory = check_bytes("--host-memory", args.host_memory, positive=False)
    assert vram is not None and host_memory is not None
    title, rows = plan_rows(args.model, vram, args.context, host_memory, args.kv_dtype)
    headers, align = plan_headers(args.context, host_memory)
    print(title)
    print(format_table(headers, rows, align=align))
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to an ``argparse`` subparsers object; its handler is :func:`run`."""
    p = subparsers.add_parser(
        "plan", help="size a KV cache for a model: presets, context length, VRAM budget",
        description="One row per way of sizing the KV cache of a model: the presets (independent of "
                    "--vram), for_context_length and for_model under the --vram budget. A sizing that "
                    "does not fit shows a short note in the memory column. --host-memory adds what a "
                    "host tier of that budget holds beside each row's device pool.")
    p.add_argument("--model", default="llama-3-8b",
                   help=f"built-in shape ({', '.join(MODEL_NAMES)}) or a Hugging Face checkpoint folder "
                        f"or config.json")
    p.add_argument("--vram", default="24GiB",
                   help="VRAM budget for the KV cache, e.g. 24GiB (the preset rows do not depend on it)")
    p.add_argument("--context", type=int, default=8192, help="target context length in tokens")
    p.add_argument("--host-memory", default="0", metavar="SIZE",
                   help="host-tier budget, e.g. 64GiB: adds the host blocks, the tokens they hold and the "
                        "host:device ratio to every row (0: no host tier)")
    p.add_argument("--kv-dtype", default=None, metavar="DTYPE",
                   help="KV storage dtype to size for: fp8_e4m3 or fp8_e5m2 (one byte an element), bfloat16, "
                        "float16, float32 (default: the model's dtype)")
    p.set_defaults(func=run)
    return p
