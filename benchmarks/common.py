"""What the benchmark scripts share: the random-weight model configs, percentiles, ratios, the commit.

Imported by the scripts beside it (``python benchmarks/<script>.py`` puts this
folder first on ``sys.path``).
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Sequence

__all__ = ["REPO", "TINY", "TINYLLAMA", "git_commit", "pct", "ratio"]

REPO = Path(__file__).resolve().parents[1]

#: TinyLlama-1.1B's shape, random bf16 weights (no checkpoint): the model of bench_engine.py
TINYLLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
                 intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                 tie_word_embeddings=False, torch_dtype="bfloat16", initializer_range=0.02,
                 eos_token_id=None, bos_token_id=None, pad_token_id=0)
#: a model small enough for a CPU smoke run (--quick)
TINY = dict(TINYLLAMA, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, torch_dtype="float32")


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def ratio(a: float, b: float) -> str:
    """``a / b`` as ``'1.23x'``; ``'-'`` when ``b`` is 0."""
    return f"{a / b:.2f}x" if b else "-"


def git_commit() -> str:
    """The checkout's short commit, with ``+ uncommitted changes`` when tracked files differ."""
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
