"""The command line: plan, simulate and the demo, end to end on tiny settings."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvforge.tools.cli import build_parser, format_table, main


def test_plan_prints_every_sizing(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--vram", "24GiB", "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "128.00 KiB per token" in out
    for row in ("preset small", "preset medium", "preset large", "for_context_length(8192)", "for_model"):
        assert row in out
    # llama-3-8b: 24 GiB hold 12288 blocks of 16 tokens, 24 sequences of 8192
    assert "12288" in out and " 24  24.00 GiB" in out


def test_plan_reads_a_checkpoint_config(tmp_path, capsys):
    cfg = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
               torch_dtype="float32", max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", "--model", str(tmp_path), "--vram", "1MiB", "--context", "64"]) == 0
    assert "2 layers, 2 KV heads, head dim 16, float32" in capsys.readouterr().out


def test_bad_input_is_an_error_not_a_traceback(capsys):
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["plan", "--vram", "lots"]) == 2


def test_every_subcommand_is_registered():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"plan", "simulate", "generate", "demo"} <= set(choices)


def test_format_table_aligns_columns():
    text = format_table(["name", "n"], [["a", 1], ["bbb", 100]])
    lines = text.splitlines()
    assert lines[2] == "a       1" and lines[3] == "bbb   100"


def test_console_script_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvforge.tools.cli", "plan", "--model", "tinyllama-1.1b"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "tinyllama-1.1b: 22 layers" in r.stdout


def test_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = main(["demo", "--requests", "6", "--long-requests", "1", "--max-tokens", "6", "--max-num-seqs", "4",
               "--kv-memory", "1MiB", "--device", "cpu", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    for needle in ("output tokens/s", "prefix hit rate", "KV cache memory profile", "compaction"):
        assert needle in out
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "block_map_peak.png" in pngs and "compaction.png" in pngs
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_refuses_a_non_positive_context(capsys):
    assert main(["plan", "--context", "0"]) == 2
    assert "--context" in capsys.readouterr().err
