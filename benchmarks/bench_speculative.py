"""Prompt-lookup speculative decoding against plain decoding, same engine config, same run.

For each workload the same requests run through an engine without
speculation (the baseline) and one with ``EngineConfig(speculative_tokens=k)``;
the table gives generated tokens/s (wall time of the whole run), decode steps,
the share of drafts accepted and the tokens a speculative step yields on
average. Greedy outputs must be equal (asserted in float32; reported as
agreement in bf16 on a GPU, where a k+1-token verification rounds differently
from one-token decoding).

Workloads (random token ids, random weights):

- ``repetitive``: each prompt is a passage, a separator and the passage's
  first tokens again, the shape of "quote, then edit or summarise it";
- ``benchmark``: prompts of random tokens (bench_engine.py's kind).

With random weights the acceptance says how often the model repeats what is
already in its context (its own loops included), not what a trained model
does on real text: a trained model that quotes or edits its source accepts
more; one that writes new text, less.

Usage: ``PYTHONPATH=. python benchmarks/bench_speculative.py [--device cpu|cuda] [--quick]
[--speculative-tokens 4] [--json out.json]``
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kvforge.tools.output import format_table  # noqa: E402
from common import TINY, TINYLLAMA, git_commit, ratio  # noqa: E402

#: the CPU default: decode steps long enough to time, a run of a few seconds on 2 cores
CPU_MODEL = dict(TINYLLAMA, vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, torch_dtype="float32")


def workloads(rng: random.Random, vocab: int, n: int, passage: int) -> dict[str, list[list[int]]]:
    def toks(m: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(m)]

    rep = []
    for _ in range(n):
        p = toks(passage)
        rep.append(p + toks(4) + p[: passage // 4])
    return {"repetitive": rep, "benchmark": [toks(passage + passage // 4 + 4) for _ in range(n)]}


def run(hf: dict[str, Any], prompts: list[list[int]], args: argparse.Namespace, k: int) -> dict[str, Any]:
    import torch

    from kvforge.engine import Engine, SamplingParams

    engine = Engine.from_config(hf, device=args.device, dtype=hf["torch_dtype"], seed=args.seed, num_blocks=args.blocks,
                                block_size=16, speculative_tokens=k)
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up (compiles)
    before = engine.stats()
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    st = engine.stats()
    generated = st.num_generated_tokens - before.num_generated_tokens
    drafted = st.num_draft_tokens - before.num_draft_tokens
    accepted = st.num_accepted_tokens - before.num_accepted_tokens
    steps = st.num_decode_steps - before.num_decode_steps
    return dict(seconds=wall, tokens_per_s=generated / wall, generated=generated, decode_steps=steps,
                drafted=drafted, accepted=accepted, token_ids=[list(o.token_ids) for o in outs])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="a tiny model and few requests: a smoke run")
    ap.add_argument("--speculative-tokens", type=int, default=4)
    ap.add_argument("--requests", type=int, help="requests per workload (default 16; --quick 4)")
    ap.add_argument("--new-tokens", type=int, help="tokens generated per request (default 64; --quick 16)")
    ap.add_argument("--passage", type=int, default=64, help="tokens of a repetitive prompt's passage")
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    args.requests = args.requests or (4 if args.quick else 16)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            sys.exit("bench_speculative.py: --device cuda needs a GPU")
        hf, name = TINYLLAMA, "TinyLlama-1.1B shape, bf16"
    else:
        hf, name = (TINY, "tiny Llama, float32") if args.quick else (CPU_MODEL, "small Llama (hidden 256, 4 layers), "
                                                                               "float32")
    k = args.speculative_tokens
    print(f"# bench_speculative{' --quick' if args.quick else ''}: {args.device}, commit {git_commit()}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {name}, random weights; {args.requests} requests per workload, "
          f"{args.new_tokens} greedy tokens each, all in flight; speculative_tokens={k}\n")
    rng = random.Random(args.seed)
    rows, results = [], {}
    for wl, prompts in workloads(rng, hf["vocab_size"], args.requests, args.passage).items():
        base = run(hf, prompts, args, 0)
        spec = run(hf, prompts, args, k)
        same = sum(a == b for a, b in zip(base["token_ids"], spec["token_ids"]))
        if hf["torch_dtype"] == "float32":
            assert same == len(prompts), f"{wl}: speculative outputs differ from plain decoding ({same}/{len(prompts)})"
        acc = spec["accepted"] / spec["drafted"] if spec["drafted"] else 0.0
        per_step = spec["generated"] / spec["decode_steps"] / args.requests if spec["decode_steps"] else 0.0
        results[wl] = dict(plain=base, speculative=spec, equal=same, acceptance=acc)
        rows.append([wl, f"{base['tokens_per_s']:,.0f}", f"{spec['tokens_per_s']:,.0f}",
                     ratio(spec["tokens_per_s"], base["tokens_per_s"]), base["decode_steps"], spec["decode_steps"],
                     f"{spec['drafted']:,}", f"{acc:.1%}", f"{per_step:.2f}", f"{same}/{len(prompts)}"])
    print(format_table(["workload", "plain tok/s", "speculative tok/s", "speedup", "plain steps", "spec steps",
                        "drafts", "accepted", "tokens/seq/step", "outputs equal"], rows, align="lrrrrrrrrr"))
    print("\ntok/s: generated tokens over the run's wall time (all requests in flight at once); steps: decode steps; "
          "tokens/seq/step: generated tokens per running sequence per step (1.00 = no gain; the first steps of "
          "each request are prefill and not counted).")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(commit=git_commit(), device=args.device, k=k, results=results),
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
