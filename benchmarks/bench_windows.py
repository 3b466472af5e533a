"""KV memory of a sliding-window model at a long context: window layers releasing their blocks
(``EngineConfig.sliding_window_blocks="free"``, layer groups) against keeping every block.

The model is Gemma-2-2B's shape (26 layers alternating 4,096-token sliding-window
and full attention, 4 KV heads of dim 256, bf16) with random weights, run through
``model_impl="transformers"``: one prompt of ``--context`` tokens (chunked prefill)
and ``--new-tokens`` decodes, once with each setting, in the same KV budget. Per
setting: the KV bytes the pool held at its peak and at the end, the longest
context the budget holds, prefill and decode times, and whether the two settings
sampled the same tokens. ``--quick``: a tiny Gemma 2 on the CPU (a smoke run).
``--cache-only``: no model; the engine's cache calls for that request (admission of
the first chunk, an append and a prepared step per chunk, then the decodes) on a
``KVCache`` of the same shape, any device: the KV held, without the kernels' time.

    python benchmarks/bench_windows.py                 # GPU: 32k context, Gemma-2-2B shape
    python benchmarks/bench_windows.py --cache-only    # the same cache calls, no model (CPU is fine)
    python benchmarks/bench_windows.py --quick         # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from common import git_commit, ratio

from kvforge.config import format_bytes
from kvforge.engine import Engine, SamplingParams
from kvforge.engine.hf_model import TransformersModel

#: Gemma-2-2B's shape (google/gemma-2-2b config.json), random weights
GEMMA2_2B = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=256000, hidden_size=2304,
                 intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=256, max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0,
                 hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=4096,
                 attn_logit_softcapping=50.0, final_logit_softcapping=30.0, torch_dtype="bfloat16",
                 layer_types=["sliding_attention", "full_attention"] * 13, eos_token_id=None, bos_token_id=2,
                 pad_token_id=0, initializer_range=0.02)
TINY_GEMMA2 = dict(GEMMA2_2B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
                   query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"] * 2,
                   torch_dtype="float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=None, help="prompt tokens (default 32768; --quick: 300)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decodes (default 64; --quick: 8)")
    ap.add_argument("--kv-memory", default=None, help="KV budget of both runs (default 8GiB; --quick: 4MiB)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 8192 (--quick: 128)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cache-only", action="store_true", help="drive the cache alone, without a model")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.cache_only:
        return cache_only(args)
    quick = args.quick or not torch.cuda.is_available()
    context = args.context or (300 if quick else 32768)
    new = args.new_tokens or (8 if quick else 64)
    kv_memory = args.kv_memory or ("4MiB" if quick else "8GiB")
    chunk = args.max_num_batched_tokens or (128 if quick else 8192)
    shape = TINY_GEMMA2 if quick else GEMMA2_2B
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if quick else torch.bfloat16
    hf_config = dict(shape, max_position_embeddings=max(shape["max_position_embeddings"], context + new + 16))
    model = TransformersModel.random(hf_config, dtype=dtype, device=torch.device(device), seed=0)
    rng = random.Random(0)
    prompt = [rng.randrange(3, shape["vocab_size"]) for _ in range(context)]
    rows = {}
    tokens = {}
    for mode in ("keep", "free"):
        engine = Engine.from_model(model, kv_memory=kv_memory, block_size=16, max_num_batched_tokens=chunk,
                                   max_num_seqs=8, sliding_window_blocks=mode)
        cfg = engine.cache.config
        if device == "cuda":
            torch.cuda.synchronize()
        engine.add_request(prompt, SamplingParams(max_tokens=new))
        t0 = time.perf_counter()
        first = None
        out = []
        held = 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                if first is None:
                    first = time.perf_counter()
                if o.finished:
                    out = o.token_ids
            if engine.has_unfinished_requests():  # what the running sequence holds
                held = engine.cache.pool.num_allocated_blocks
        if device == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
        s = engine.stats()
        held_end = held * cfg.bytes_per_block
        tokens[mode] = out
        rows[mode] = dict(groups=len(cfg.kv_groups), bytes_per_block=cfg.bytes_per_block,
                          peak_kv_bytes=s.peak_kv_bytes, held_end_bytes=held_end,
                          kv_storage_bytes=s.kv_storage_bytes, max_context=cfg.max_context_length(),
                          ttft_s=(first or end) - t0, decode_tok_s=(len(out) - 1) / (end - first) if first and
                          len(out) > 1 else 0.0)
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    k, f = rows["keep"], rows["free"]
    dev = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# {dev} torch {torch.__version__} | kvforge {git_commit()} | "
          f"{'tiny Gemma 2' if quick else 'Gemma-2-2B shape'} (random weights, {str(dtype)[6:]}), "
          f"model_impl=transformers, {context} prompt tokens + {new} decodes, chunks of {chunk}, "
          f"KV budget {kv_memory}")
    print("| | keep every block | window layers free theirs | free / keep |")
    print("|---|---:|---:|---:|")
    print(f"| layer groups | {k['groups']} | {f['groups']} | |")
    print(f"| bytes per block | {format_bytes(k['bytes_per_block'])} | {format_bytes(f['bytes_per_block'])} | |")
    print(f"| KV held at peak | {format_bytes(k['peak_kv_bytes'])} | {format_bytes(f['peak_kv_bytes'])} | "
          f"{ratio(f['peak_kv_bytes'], k['peak_kv_bytes'])} |")
    print(f"| KV held in the last decode step | {format_bytes(k['held_end_bytes'])} | "
          f"{format_bytes(f['held_end_bytes'])} | {ratio(f['held_end_bytes'], k['held_end_bytes'])} |")
    print(f"| longest context the budget holds | {k['max_context']:,} | {f['max_context']:,} | "
          f"{ratio(f['max_context'], k['max_context'])} |")
    print(f"| time to first token | {k['ttft_s']:.2f} s | {f['ttft_s']:.2f} s | {ratio(f['ttft_s'], k['ttft_s'])} |")
    print(f"| decode tok/s | {k['decode_tok_s']:.1f} | {f['decode_tok_s']:.1f} | "
          f"{ratio(f['decode_tok_s'], k['decode_tok_s'])} |")
    same = sum(a == b for a, b in zip(tokens["keep"], tokens["free"]))
    print(f"| same sampled tokens | | {same}/{len(tokens['keep'])} | |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(rows=rows, context=context, new_tokens=new, kv_memory=kv_memory), fh, indent=1)
    if tokens["keep"] != tokens["free"] and quick:
        sys.exit("the two settings sampled different tokens (float32 on the CPU must agree)")


def cache_only(args: argparse.Namespace) -> None:
    """The engine's cache calls for one long prompt and its decodes, both settings, no model."""
    import numpy as np

    from kvforge import CacheConfig, KVCache

    c = GEMMA2_2B
    context, new = args.context or 32768, args.new_tokens or 64
    chunk, kv = args.max_num_batched_tokens or 8192, args.kv_memory or "8GiB"
    windows = tuple(c["sliding_window"] if t == "sliding_attention" else None for t in c["layer_types"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompt = np.random.default_rng(0).integers(3, c["vocab_size"], context).tolist()
    rows = {}
    for mode in ("keep", "free"):
        cfg = CacheConfig.for_memory(kv, c["num_hidden_layers"], c["num_key_value_heads"], c["head_dim"],
                                     block_size=16, dtype=torch.bfloat16, device=device,
                                     layer_windows=windows if mode == "free" else None)
        cache = KVCache(cfg.replace(initial_blocks=64, chunk_blocks=64))  # grows as the blocks are used
        cache.add_sequence("r", prompt, num_tokens=min(chunk, context))
        cache.prepare_step(["r"], min(chunk, context))
        done = min(chunk, context)
        while done < context:
            n = min(chunk, context - done)
            cache.append_tokens("r", n)
            cache.prepare_step(["r"], n)
            done += n
        for _ in range(new):
            cache.append_tokens_batch(["r"], 1, [5])
            cache.prepare_step(["r"], 1)
        bpb = cfg.bytes_per_block
        rows[mode] = (cache.stats.peak_allocations * bpb, cache.pool.num_allocated_blocks * bpb,
                      cfg.max_context_length(chunk))
    k, f = rows["keep"], rows["free"]
    print(f"# {device} | kvforge {git_commit()} | cache calls only (no model): Gemma-2-2B shape, bf16, "
          f"{context} prompt tokens in chunks of {chunk} + {new} decodes, KV budget {kv}")
    print("| | keep every block | window layers free theirs | free / keep |")
    print("|---|---:|---:|---:|")
    for name, i in (("KV held at peak", 0), ("KV held in the last decode step", 1)):
        print(f"| {name} | {format_bytes(k[i])} | {format_bytes(f[i])} | {ratio(f[i], k[i])} |")
    print(f"| longest context the budget holds (chunks of {chunk}) | {k[2]:,} | {f[2]:,} | {ratio(f[2], k[2])} |")


if __name__ == "__main__":
    main()
