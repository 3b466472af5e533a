"""``kvforge generate``: run prompts through the engine from the command line.

``register(subparsers)`` adds the subcommand to kvforge's ``argparse`` entry
point; :func:`run_generate` runs it. Prompts come from ``--prompt`` (repeat
it for several) or ``--prompts FILE.jsonl`` (one JSON object per line with
``"prompt"`` text or ``"prompt_token_ids"``, and optionally ``"max_tokens"``).
Completions print in prompt order, then one summary line: tokens/s, cache
use, prefix hit rate, preemptions. While requests run, a progress bar
(requests finished, tokens/s) goes to stderr (``--no-progress``: none).

Before anything loads, the packages the run needs are checked, each a
one-line error naming the extra when missing: safetensors (unless
``--random-weights``), the tokenizer library when a prompt is text, and
prometheus-client for ``--metrics-port``.

Also runnable alone: ``python -m kvforge.tools.generate generate --model DIR ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any, Sequence

from kvforge.errors import ConfigError, KVForgeError, MissingExtraError
from kvforge.tools.checks import check_float
from kvforge.tools.extras import require
from kvforge.tools.output import Progress, error_line

__all__ = ["register", "run_generate", "main", "DEFAULT_KV_MEMORY_FRACTION"]

#: :attr:`EngineConfig.kv_memory_fraction`'s default, for the help (the engine is not
#: imported to build the parser; a test holds the two equal)
DEFAULT_KV_MEMORY_FRACTION = 0.85

#: files a Hugging Face tokenizer may come in
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "generate", help="generate text with the reference engine from a local Hugging Face checkpoint",
        description="Continuous-batching generation on kvforge's paged KV cache (Llama, Mistral, Qwen2, Qwen3). "
                    'Needs the engine extra: pip install "kvforge[engine]".')
    p.add_argument("--model", required=True, help="checkpoint folder (config.json, *.safetensors, tokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append",
                     help="prompt text (repeat for several prompts; needs the checkpoint's tokenizer)")
    src.add_argument("--prompts", metavar="FILE.jsonl",
                     help='one JSON object per line: {"prompt": "..."} or {"prompt_token_ids": [...]}, '
                          'optionally with "max_tokens"')
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                   "whose probabilities sum to P; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens; 0 = off")
    p.add_argument("--seed", type=int, default=None,
                   help="per-request seed for reproducible sampling (default: one from the engine's seeded generator)")
    p.add_argument("--n", type=int, default=1, help="completions per prompt (forked from the prompt's blocks)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence tokens")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    mem = p.add_mutually_exclusive_group()
    mem.add_argument("--vram", "--kv-memory", dest="kv_memory", metavar="BYTES",
                     help="KV cache budget, e.g. 4GiB (default: --kv-memory-fraction of the free GPU memory; "
                          "512 MiB on the CPU)")
    mem.add_argument("--kv-memory-fraction", type=float, metavar="F",
                     help="share of the free GPU memory, after the weights, the KV cache takes, 0 < F <= 1, like "
                          f"vLLM's --gpu-memory-utilization (default: {DEFAULT_KV_MEMORY_FRACTION:g} on a GPU; "
                          "the CPU takes 512 MiB)")
    mem.add_argument("--num-blocks", type=int, metavar="N",
                     help="KV cache size in blocks (default: what --vram or --kv-memory-fraction gives)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (a GPU when there is one)")
    p.add_argument("--model-impl", choices=("auto", "native", "transformers"), default="auto",
                   help="native: kvforge's own decoder (Llama, Mistral, Qwen2, Qwen3); transformers: the checkpoint's "
                        "transformers model on kvforge's scheduler and cache (needs transformers 5); auto: native "
                        "where it runs the checkpoint, else transformers")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the checkpoint's on a "
                   "GPU, float32 on the CPU)")
    p.add_argument("--kv-dtype", default=None, metavar="DTYPE",
                   help="KV cache storage: auto (the model dtype, default), fp8_e4m3 or fp8_e5m2 (one byte an "
                        "element: twice the tokens in the same memory; the checkpoint's k_scale/v_scale, else 1.0)")
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="prompt-lookup speculative decoding: up to K draft tokens per greedy sequence and step, "
                        "taken from an earlier occurrence of its last tokens (0: off; the output is unchanged)")
    p.add_argument("--async-scheduling", action="store_true",
                   help="prepare each step while the device runs the one before (the output is unchanged)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="split the native decoder's heads, MLP and KV cache over N ranks (GPUs with NCCL, CPU "
                        "processes with gloo); --kv-memory is then the budget of all ranks together")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096,
                   help="most tokens computed per step (long prompts are prefilled in chunks of it)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence, prompt and output (default: the model's max_position_embeddings)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the blocks of shared prefixes")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly on a GPU")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on 127.0.0.1:PORT while generating, 0 = any free port "
                        '(default: none; needs pip install "kvforge[metrics]")')
    p.add_argument("--random-weights", action="store_true",
                   help="ignore the checkpoint's weights: random ones for its config.json (demos, benchmarks)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display on stderr (on a terminal a bar, otherwise a line every 10 s)")
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


def _check_tokenizer(model: str, prompts: list[Any]) -> None:
    """Text prompts need the checkpoint's tokenizer and a library that reads it:
    ``tokenizers`` for ``tokenizer.json`` (transformers reads it with ``tokenizers``
    too), transformers for a ``tokenizer.model`` alone. Checked before the model
    loads; a folder that does not exist is left to the loader's message."""
    if all(isinstance(p, list) for p in prompts) or not os.path.isdir(model):
        return
    present = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(model, f))]
    if not present:
        raise ConfigError(f"--model {model!r} has no tokenizer ({', '.join(_TOKENIZER_FILES)}): give the prompts "
                          f'as token ids, --prompts FILE.jsonl with {{"prompt_token_ids": [...]}}')
    if "tokenizer.json" in present:
        require("tokenizers", "engine", "text prompts need the tokenizers package to read the model's "
                "tokenizer.json")
        return
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"text prompts need transformers to read the model's {' and '.join(present)} "
                                f"(it has no tokenizer.json): pip install transformers sentencepiece") from exc


def _check_args(args: argparse.Namespace, prompts: list[Any]) -> None:
    """Flags in range and the packages this run needs importable, before any work."""
    check_float("--kv-memory-fraction", args.kv_memory_fraction, 0.0, 1.0, lo_open=True)
    if not args.random_weights:
        require("safetensors", "engine", "loading a checkpoint needs safetensors")
    _check_tokenizer(args.model, prompts)
    if args.metrics_port is not None:
        require("prometheus_client", "metrics", "--metrics-port needs prometheus-client")


def run_generate(args: argparse.Namespace) -> int:
    """Run the ``generate`` subcommand; print completions and a summary; return the exit code."""
    server = None
    try:
        prompts, limits = _read_prompts(args)
        _check_args(args, prompts)
        from kvforge.engine import Engine, SamplingParams
        from kvforge.engine.loader import load_tokenizer
        from kvforge.engine.model_config import read_config

        base = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, n=args.n, ignore_eos=args.ignore_eos)
        params = [base if m is None else replace(base, max_tokens=int(m)) for m in limits]
        if args.metrics_port is not None:
            # bound before the model loads, so that a bad or taken port fails at once
            from kvforge.tools.metrics import check_port, serve
            server = serve(check_port(args.metrics_port, "--metrics-port"))
        options = dict(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                       enable_prefix_caching=not args.no_prefix_caching, use_cuda_graphs=not args.no_cuda_graphs,
                       model_impl=args.model_impl, kv_dtype=args.kv_dtype,
                       speculative_tokens=args.speculative_tokens, tensor_parallel_size=args.tensor_parallel_size,
                       async_scheduling=args.async_scheduling)
        if args.kv_memory_fraction is not None:
            options["kv_memory_fraction"] = args.kv_memory_fraction
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
