"""Tensor parallelism: tokens/s at ``tensor_parallel_size`` N against N = 1, same call, and the KV
memory each rank holds.

Default (two GPUs): a Llama-3-8B-shaped model (32 layers, hidden 4096, 32 heads, 8 KV heads,
intermediate 14336, vocab 128256, bf16, random weights), 64 requests of 512 prompt tokens and
128 new tokens each, N = 1 then N = 2 (NCCL), in one KV budget of all ranks together.
``--quick``: a tiny Llama on the CPU (gloo, two processes): a smoke run whose times measure the
step broadcast and the all-reduces, not a GPU's.

    python benchmarks/bench_tp.py               # two GPUs
    python benchmarks/bench_tp.py --quick       # CPU
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

from common import git_commit, ratio

from kvforge.config import format_bytes
from kvforge.engine import Engine, SamplingParams

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16",
                 tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, initializer_range=0.02)
TINY = dict(LLAMA3_8B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4, torch_dtype="float32", initializer_range=0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--requests", type=int, default=None, help="default 64 (--quick: 8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 512 (--quick: 64)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (--quick: 16)")
    ap.add_argument("--kv-memory", default=None, help="KV budget of all ranks (default 16GiB; --quick: 8MiB)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    quick = args.quick or torch.cuda.device_count() < max(args.sizes)
    n_req = args.requests or (8 if quick else 64)
    plen = args.prompt_len or (64 if quick else 512)
    new = args.new_tokens or (16 if quick else 128)
    kv = args.kv_memory or ("8MiB" if quick else "16GiB")
    hf = TINY if quick else LLAMA3_8B
    device = "cpu" if quick else "cuda"
    rng = random.Random(0)
    prompts = [[rng.randrange(3, hf["vocab_size"]) for _ in range(plen)] for _ in range(n_req)]
    params = SamplingParams(max_tokens=new, ignore_eos=True)
    rows = []
    outs = {}
    for size in args.sizes:
        t = time.perf_counter()
        engine = Engine.from_config(hf, kv_memory=kv, device=device, tensor_parallel_size=size)
        build = time.perf_counter() - t
        try:
            engine.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm-up (kernels, first steps)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            got = engine.generate(prompts, params)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
            cfg = engine.cache.config
            outs[size] = [o.token_ids for o in got]
            rows.append(dict(size=size, tok_s=n_req * new / wall, wall_s=wall, build_s=build,
                             kv_per_rank=cfg.estimated_memory_bytes(), num_blocks=cfg.num_blocks,
                             steps=engine.stats().num_steps))
        finally:
            engine.close()
    dev = torch.cuda.get_device_name() if device == "cuda" else "CPU (gloo)"
    print(f"# {dev} torch {torch.__version__} | kvforge {git_commit()} | "
          f"{'tiny Llama' if quick else 'Llama-3-8B shape'} (random weights, {hf['torch_dtype']}) | "
          f"{n_req} requests x ({plen} prompt + {new} new) | KV budget {kv} (all ranks)")
    base = rows[0]["tok_s"]
    print("| ranks | tok/s | vs N = 1 | KV per rank | blocks | steps | build s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['tok_s']:,.0f} | {ratio(r['tok_s'], base)} | {format_bytes(r['kv_per_rank'])} | "
              f"{r['num_blocks']:,} | {r['steps']} | {r['build_s']:.1f} |")
    if len(outs) > 1:
        first = outs[args.sizes[0]]
        for size, o in outs.items():
            same = sum(a == b for a, b in zip(first, o))
            print(f"# N = {size}: {same}/{len(first)} requests sampled the same tokens as N = {args.sizes[0]}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
