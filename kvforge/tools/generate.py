"""``kvforge generate``: run prompts through the engine from the command line.

``register(subparsers)`` adds the subcommand to kvforge's ``argparse`` entry
point; :func:`run_generate` runs it. Prompts come from ``--prompt`` (repeat
it for several) or ``--prompts FILE.jsonl`` (one JSON object per line with
``"prompt"`` text or ``"prompt_token_ids"``, and optionally ``"max_tokens"``).
Completions print in prompt order, then one summary line: tokens/s, cache
use, prefix hit rate, preemptions. While requests run, a progress bar
(requests finished, tokens/s) goes to stderr (``--no-progress``: none).

Also runnable alone: ``python -m kvforge.tools.generate generate --model DIR ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any, Sequence

from kvforge.errors import ConfigError, KVForgeError
from kvforge.tools.output import Progress, error_line

__all__ = ["register", "run_generate", "main"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "generate", help="generate text with the reference engine from a local Hugging Face checkpoint",
        description="Continuous-batching generation on kvforge's paged KV cache (Llama, Mistral, Qwen2, Qwen3).")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeat for several prompts)")
    src.add_argument("--prompts", metavar="FILE.jsonl",
                     help='one JSON object per line: {"prompt": "..."} or {"prompt_token_ids": [...]}')
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="per-request seed (reproducible sampling)")
    p.add_argument("--n", type=int, default=1, help="completions per prompt (forked from the prompt's blocks)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--block-size", type=int, default=16)
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--vram", "--kv-memory", dest="kv_memory", help="KV cache budget, e.g. 4GiB")
    mem.add_argument("--num-blocks", type=int, help="KV cache size in blocks")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: checkpoint's on GPU, "
                   "float32 on CPU)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on 127.0.0.1:PORT while generating (0 = any free port)")
    p.add_argument("--random-weights", action="store_true",
                   help="ignore the checkpoint's weights: random ones for its config.json (demos, benchmarks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_generate)
    return p


def _read_prompts(args: argparse.Namespace) -> tuple[list[Any], list[int | None]]:
    if args.prompt:
        return list(args.prompt), [None] * len(args.prompt)
    prompts: list[Any] = []
    limits: list[int | None] = []
    try:
        with open(args.prompts, encoding="utf-8") as fh:
            lines = fh.readlines()
    except OSError as exc:
        raise ConfigError(f"cannot read --prompts {args.prompts!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--prompts {args.prompts!r}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{args.prompts}:{lineno}: not JSON ({exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # an int of > 4300 digits; nesting too deep
            raise ConfigError(f"{args.prompts}:{lineno}: not readable JSON ({type(exc).__name__})") from None
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict) or not ("prompt" in obj or "prompt_token_ids" in obj):
            raise ConfigError(f'{args.prompts}:{lineno}: expected {{"prompt": ...}} or {{"prompt_token_ids": ...}}')
        where = f"{args.prompts}:{lineno}"
        if "prompt_token_ids" in obj:
            ids = obj["prompt_token_ids"]
            if not isinstance(ids, list) or not ids or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ConfigError(f"{where}: 'prompt_token_ids' must be a non-empty list of integers, "
                                  f"got {ids!r:.60}")
            prompts.append(ids)
        else:
            if not isinstance(obj["prompt"], str):
                raise ConfigError(f"{where}: 'prompt' must be a string, got {obj['prompt']!r:.60}")
            prompts.append(obj["prompt"])
        limit = obj.get("max_tokens")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError(f"{where}: 'max_tokens' must be an integer >= 1, got {limit!r:.60}")
        limits.append(limit)
    if not prompts:
        raise ConfigError(f"{args.prompts}: no prompts")
    return prompts, limits


class _StepProgress:
    """A :class:`~kvforge.tools.output.Progress` of one ``generate`` call, fed by its
    ``on_step`` callback: requests finished of those the call added, and tokens/s."""

    def __init__(self, engine: Any, enabled: bool) -> None:
        self.progress = Progress("generate", enabled=enabled)
        self.base = engine.stats()
        self.engine = engine

    def _update(self) -> None:
        st, base = self.engine.stats(), self.base
        rate = (st.num_generated_tokens - base.num_generated_tokens) / max(
            1e-9, time.perf_counter() - self.progress.start)
        self.progress.update(st.num_finished_requests - base.num_finished_requests,
                             st.num_requests - base.num_requests, note=f"{rate:.0f} tok/s")

    def on_step(self, engine: Any) -> None:
        """After each engine step; reads the engine's counters only when a line is due."""
        if self.progress.due():
            self._update()

    def finish(self) -> None:
        """The last state (a finished bar on a terminal)."""
        self._update()

    def close(self) -> None:
        """End a bar left unfinished."""
        self.progress.close()


def run_generate(args: argparse.Namespace) -> int:
    """Run the ``generate`` subcommand; print completions and a summary; return the exit code."""
    from kvforge.engine import Engine, SamplingParams
    from kvforge.engine.loader import load_tokenizer
    from kvforge.engine.model_config import read_config

    server = None
    try:
        prompts, limits = _read_prompts(args)
        base = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, n=args.n, ignore_eos=args.ignore_eos)
        params = [base if m is None else replace(base, max_tokens=int(m)) for m in limits]
        if args.metrics_port is not None:
            # bound before the model loads, so that a bad or taken port fails at once
            from kvforge.tools.metrics import check_port, serve
            server = serve(check_port(args.metrics_port, "--metrics-port"))
        options = dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                       enable_prefix_caching=not args.no_prefix_caching, use_cuda_graphs=not args.no_cuda_graphs)
        start = time.perf_counter()
        if args.random_weights:
            engine = Engine.from_config(read_config(args.model), kv_memory=args.kv_memory,
                                        num_blocks=args.num_blocks, device=args.device, dtype=args.dtype, **options)
            engine.tokenizer = load_tokenizer(args.model)
        else:
            engine = Engine(args.model, kv_memory=args.kv_memory, num_blocks=args.num_blocks, device=args.device,
                            dtype=args.dtype, **options)
        load_s = time.perf_counter() - start
        if server is not None:
            server.attach(engine.cache, engine, lock=engine.step_lock)
            print(f"serving metrics on {server.url}", flush=True)
        progress = _StepProgress(engine, enabled=not args.no_progress)
        start = time.perf_counter()
        try:
            outputs = engine.generate(prompts, params, on_step=progress.on_step)
            progress.finish()
        finally:
            progress.close()
        elapsed = time.perf_counter() - start
    except KVForgeError as exc:
        print(error_line("generate", exc), file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    for i, out in enumerate(outputs):
        shown = out.prompt if out.prompt is not None else out.prompt_token_ids
        print(f"[{i}] prompt: {shown!r}")
        for comp in out.outputs:
            body = comp.text if comp.text is not None else comp.token_ids
            tag = f" #{comp.index}" if len(out.outputs) > 1 else ""
            print(f"[{i}]{tag} completion ({len(comp.token_ids)} tokens, {comp.finish_reason}): {body!r}")
    st = engine.stats()
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    ttfts = [o.metrics.ttft for o in outputs if o.metrics.ttft is not None]
    print(f"{len(outputs)} requests, {generated} tokens in {elapsed:.2f} s: {generated / max(elapsed, 1e-9):.1f} tok/s"
          f" | mean TTFT {1e3 * sum(ttfts) / max(len(ttfts), 1):.1f} ms | peak cache use {st.peak_used_blocks}/"
          f"{st.num_blocks} blocks ({st.peak_used_blocks / st.num_blocks:.1%}) | prefix hit rate "
          f"{st.prefix_hit_rate:.1%} | preemptions {st.num_preemptions} | load {load_s:.1f} s on {engine.device}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m kvforge.tools.generate generate ...``)."""
    parser = argparse.ArgumentParser(prog="kvforge")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
