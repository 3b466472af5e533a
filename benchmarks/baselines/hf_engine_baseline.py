# Verbatim copy of ../shared/bench/hf_engine_baseline.py (the shared transformers engine baseline),
# kept here because ../shared does not travel to the GPU machine. Do not edit: update the original.
"""Engine baseline on a GPU: transformers' generate (static padded batch) and
continuous batching generate_batch on a TinyLlama-1.1B-shaped model with random
bf16 weights; output tokens/s over one request set.
Usage: python hf_engine_baseline.py [NUM_REQUESTS=128] [NEW_TOKENS=256]
The same prompts (seeded) and the same fixed output length serve any engine
benchmarked beside it."""
import math, random, time, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM, GenerationConfig

torch.manual_seed(0)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 128
NEW = int(sys.argv[2]) if len(sys.argv) > 2 else 256
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                  eos_token_id=None, bos_token_id=None, pad_token_id=0)
model = LlamaForCausalLM(cfg).to(torch.bfloat16).cuda().eval()
rng = random.Random(0)
prompts = [[rng.randrange(1, 32000) for _ in range(max(16, min(1024, int(rng.lognormvariate(4.6, 0.9)))))] for _ in range(N)]
print(f"# {torch.cuda.get_device_name()} requests={N} new={NEW} mean_prompt={sum(map(len,prompts))/N:.0f}")

def static_generate(bs):
    toks = 0; t = time.perf_counter()
    for i in range(0, N, bs):
        chunk = prompts[i:i+bs]; L = max(map(len, chunk))
        ids = torch.zeros(len(chunk), L, dtype=torch.long); mask = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, L-len(p):] = torch.tensor(p); mask[j, L-len(p):] = 1
        with torch.no_grad():
            out = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=NEW, min_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0)
        toks += (out.shape[1] - L) * len(chunk)
    torch.cuda.synchronize()
    return toks / (time.perf_counter() - t)

for bs in (64, 128):
    try:
        print(f"hf_generate_static bs={bs}: {static_generate(bs):8.0f} tok/s  peak_mem={torch.cuda.max_memory_allocated()/2**30:.1f} GiB")
    except Exception as e:
        print(f"hf_generate_static bs={bs} failed: {type(e).__name__}: {str(e)[:200]}")
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()

try:
    gc = GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(prompts[:4], generation_config=GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0))
    t = time.perf_counter()
    res = model.generate_batch(prompts, generation_config=gc)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    toks = sum(len(r.generated_tokens) for r in res.values())
    print(f"hf_generate_batch (continuous): {toks/dt:8.0f} tok/s  tokens={toks} impl={model.config._attn_implementation} peak_mem={torch.cuda.max_memory_allocated()/2**30:.1f} GiB")
except Exception as e:
    import traceback; traceback.print_exc()
    print(f"hf_generate_batch failed: {type(e).__name__}: {str(e)[:300]}")
