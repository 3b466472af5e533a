"""The command line: plan, simulate and the demo, end to end on tiny settings; the
conventions every subcommand keeps (--version, help with defaults, no torch for --help)."""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvforge.model_shapes import MODEL_SHAPES, model_shape
from kvforge.tools.cli import build_parser, format_table, main
from kvforge.tools.output import Progress


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


# ------------------------------------------------------- built-in model names
@pytest.mark.parametrize("name", sorted(MODEL_SHAPES))
def test_plan_takes_every_builtin_name(name, capsys):
    assert main(["plan", "--model", name, "--vram", "8GiB", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    shape = model_shape(name)
    assert out.startswith(f"{name}: {shape['num_layers']} layers, {shape['num_kv_heads']} KV heads, "
                          f"head dim {shape['head_dim']}")
    assert "for_model(vram=8.00 GiB)" in out


def test_plan_qwen25_exact(capsys):
    assert main(["plan", "--model", "qwen2.5-7b"]) == 0
    out = capsys.readouterr().out
    # 28 layers x 4 KV heads x 128 x 2 (K and V) x 2 bytes = 56 KiB per token; 24 GiB / 896 KiB per block
    assert out.startswith("qwen2.5-7b: 28 layers, 4 KV heads, head dim 128, bfloat16; 56.00 KiB per token")
    assert "for_model(vram=24.00 GiB)          16   28086  449376            54  24.00 GiB" in out


def test_plan_unknown_name_lists_the_builtin_ones(capsys):
    assert main(["plan", "--model", "gpt-5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvforge plan: error: 'gpt-5' is neither") and err.count("\n") == 1
    for name in MODEL_SHAPES:
        assert name in err


# ---------------------------------------------------------- table and progress
def test_format_table_header_rule_and_explicit_alignment():
    text = format_table(["metric", "a", "b"], [["x", "1", "22"], ["longer", "333", "4"]], align="lrr")
    assert text.splitlines() == [
        "metric    a   b",
        "------  ---  --",
        "x         1  22",
        "longer  333   4",
    ]
    # numbers right, text left (headers too), no trailing spaces
    text = format_table(["name", "value", "note"], [["a", 1.5, ""], ["bb", 10, "ok"]])
    assert text.splitlines() == ["name  value  note", "----  -----  ----", "a       1.5", "bb       10  ok"]
    with pytest.raises(ValueError):
        format_table(["a", "b"], [], align="l")


def test_progress_off_a_terminal_writes_plain_lines():
    stream = io.StringIO()
    p = Progress("work", 10, stream=stream, interval=0.0)
    assert not p.is_terminal
    for i in range(1, 11):
        p(i, 10)
    p.update(10)  # after the end: nothing more
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10 and lines[0].startswith("work: 1/10 requests (10%) ")
    assert lines[-1].startswith("work: 10/10 requests (100%) ")


def test_progress_off_a_terminal_is_silent_for_short_work():
    stream = io.StringIO()
    p = Progress("work", 3, stream=stream)  # default interval off a terminal: 10 s
    for i in range(4):
        p.update(i, note="fast")
    assert stream.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line():
    stream = _Terminal()
    p = Progress("sim", 4, unit="steps", stream=stream, interval=0.0, width=4)
    p.update(2, note="12 tok/s")
    p.update(4)
    text = stream.getvalue()
    assert text.startswith("\rsim [##  ] 2/4 steps ") and text.endswith("\n") and text.count("\n") == 1
    first, second = text.split("\r")[1:]
    assert "12 tok/s" in first and second.startswith("sim [####] 4/4 steps ") and "tok/s" not in second
    assert len(second.rstrip("\n")) >= len(first)  # padded over the longer line before it


def test_progress_disabled_or_closed_early():
    stream = _Terminal()
    Progress("x", 5, stream=stream, enabled=False, interval=0.0).update(5)
    assert stream.getvalue() == ""
    p = Progress("x", 5, stream=stream, interval=0.0)
    p.update(1)
    p.close()
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1
    p.update(5)
    assert stream.getvalue().count("\n") == 1


def test_generate_progress_off_a_terminal(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    import functools

    import kvforge.tools.generate as generate
    from kvforge.engine.testing import save_tiny_checkpoint

    save_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")
    capsys.readouterr()  # transformers' own progress bars
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1, 2, 3]}) + "\n" + json.dumps({"prompt_token_ids": [4, 5]}) + "\n")
    argv = ["generate", "--model", str(tmp_path / "ckpt"), "--prompts", str(prompts), "--max-tokens", "4",
            "--device", "cpu", "--num-blocks", "16"]
    monkeypatch.setattr(generate, "Progress", functools.partial(Progress, interval=0.0))  # a line every step
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "2 requests, 8 tokens" in captured.out
    lines = captured.err.splitlines()
    assert "\r" not in captured.err and len(lines) >= 2
    assert all(line.startswith("generate: ") and line.endswith("tok/s") for line in lines)
    assert lines[-1].startswith("generate: 2/2 requests (100%) ")
    assert main(argv + ["--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_demo_progress_off_a_terminal(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import functools

    import kvforge.tools.output as output

    monkeypatch.setattr(output, "Progress", functools.partial(Progress, interval=0.0))
    rc = main(["demo", "--requests", "6", "--long-requests", "1", "--max-tokens", "6", "--max-num-seqs", "4",
               "--kv-memory", "1MiB", "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0 and "\r" not in err
    lines = err.splitlines()
    assert lines and all(line.startswith("demo: ") for line in lines)
    assert lines[-1].startswith("demo: 6/6 requests (100%) ") and lines[-1].endswith("tok/s")


# ----------------------------------------------------------- errors: one line
def test_os_errors_and_interrupts_are_one_line(monkeypatch, capsys):
    import kvforge.tools.plan as plan

    def unreadable(args):
        raise PermissionError(13, "Permission denied", "/data/model/config.json")

    monkeypatch.setattr(plan, "run", unreadable)
    assert main(["plan"]) == 2
    assert capsys.readouterr().err == "kvforge plan: error: '/data/model/config.json': Permission denied\n"

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "run", interrupted)
    assert main(["plan"]) == 130
    assert capsys.readouterr().err == "kvforge plan: interrupted\n"


def test_multi_line_messages_are_printed_on_one_line(monkeypatch, capsys):
    import kvforge.tools.plan as plan
    from kvforge.errors import ConfigError

    def fail(args):
        raise ConfigError("first line\n  second line")

    monkeypatch.setattr(plan, "run", fail)
    assert main(["plan"]) == 2
    assert capsys.readouterr().err == "kvforge plan: error: first line second line\n"


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "--context", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "kvforge plan: error: argument --context: invalid int value: 'many' (see kvforge plan --help)\n"


def test_demo_peak_blocks_in_the_summary_equal_the_profile_at_peak(tmp_path, capsys):
    # On this workload the pool peaks inside a step in which requests finish: a look
    # between steps saw one or two blocks fewer than the summary's peak.
    pytest.importorskip("matplotlib")
    import re

    rc = main(["demo", "--requests", "32", "--long-requests", "2", "--max-tokens", "32", "--max-num-seqs", "16",
               "--kv-memory", "4MiB", "--device", "cpu", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    summary = int(re.search(r"^peak blocks in use\s+(\d+)$", out, re.M).group(1))
    at_peak = out.split("at peak use:")[1].split("now (all requests finished")[0]
    physical = int(re.search(r"physical / logical blocks\s+(\d+) /", at_peak).group(1))
    profile_peak = int(re.search(r"^peak blocks\s+(\d+)$", at_peak, re.M).group(1))
    final_peak = int(re.search(r"^peak blocks\s+(\d+)$", out.split("now (all requests finished")[1], re.M).group(1))
    assert summary == physical == profile_peak == final_peak


# ---------------------------------------------------------------- conventions
REPO = Path(__file__).resolve().parents[1]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_is_the_package_version(capsys):
    import kvforge

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"kvforge {kvforge.__version__}\n"
    assert kvforge.__version__.count(".") == 2 and all(p.isdigit() for p in kvforge.__version__.split("."))


def test_every_option_has_help_that_shows_its_default():
    parser = build_parser()
    commands = _subcommands(parser)
    assert set(commands) == {"plan", "simulate", "generate", "demo"}
    checked = 0
    for name, sub in [("kvforge", parser), *commands.items()]:
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            text = formatter._expand_help(action)  # the help as printed, defaults filled in
            assert text.strip(), f"{name} {action.option_strings[0]} has no help"
            if action.default is not None:
                assert f"(default: {action.default})" in text or str(action.default) in text, \
                    f"{name} {action.option_strings[0]}: default {action.default!r} not in {text!r}"
            checked += 1
    assert checked >= 50
    # the options the issue named
    gen, demo = commands["generate"].format_help(), commands["demo"].format_help()
    for needle in ("--top-p", "--block-size", "(default: 1.0)", "(default: 16)"):
        assert needle in gen
    for needle in ("requests in the workload (default: 96)", "tokens each request generates (default: 64)"):
        assert needle in " ".join(demo.split())


def test_help_texts_agree_with_the_tables_they_describe():
    from kvforge.engine import EngineConfig
    from kvforge.tools.args import MODEL_NAMES
    from kvforge.tools.generate import DEFAULT_KV_MEMORY_FRACTION

    assert MODEL_NAMES == tuple(MODEL_SHAPES)
    assert DEFAULT_KV_MEMORY_FRACTION == EngineConfig().kv_memory_fraction


#: ``python -c`` program: with torch and triton unimportable, print every help and
#: then which heavy modules were imported
HELP_WITHOUT_TORCH = """
import contextlib, io, sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "triton"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
        return None

sys.meta_path.insert(0, _Blocker())
from kvforge.tools.cli import main
for argv in (["--help"], ["plan", "--help"], ["simulate", "--help"], ["generate", "--help"], ["demo", "--help"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    print("HELP", " ".join(argv), len(out.getvalue().splitlines()))
    print(out.getvalue())
heavy = ("torch", "triton", "matplotlib", "safetensors", "tokenizers", "transformers", "prometheus_client")
print("LOADED", sorted({m.partition(".")[0] for m in sys.modules} & set(heavy)))
"""


def test_help_runs_without_importing_torch():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0, r.stderr
    for cmd in ("", " plan", " simulate", " generate", " demo"):
        assert f"HELP{cmd} --help" in r.stdout
        assert f"usage: kvforge{cmd} " in r.stdout
    assert r.stdout.rstrip().splitlines()[-1] == "LOADED []"


def test_plan_documented_output_is_unchanged(capsys):
    # the README's `kvforge plan --model llama-3-8b --vram 24GiB --context 8192`, byte for byte
    assert main(["plan", "--model", "llama-3-8b", "--vram", "24GiB", "--context", "8192"]) == 0
    assert capsys.readouterr().out == (
        "llama-3-8b: 32 layers, 8 KV heads, head dim 128, bfloat16; 128.00 KiB per token; context 8192\n"
        "sizing                     block size  blocks  tokens  seqs of 8192  memory\n"
        "-------------------------  ----------  ------  ------  ------------  ---------\n"
        "preset small (4.00 GiB)            16    1024   16384             2  2.00 GiB\n"
        "preset medium (12.00 GiB)          32    1536   49152             6  6.00 GiB\n"
        "preset large (40.00 GiB)           64    2560  163840            20  20.00 GiB\n"
        "for_context_length(8192)           64     128    8192             1  1.00 GiB\n"
        "for_model(vram=24.00 GiB)          16   12288  196608            24  24.00 GiB\n")


PRESET_ROWS = (
    "preset small (4.00 GiB)            16    1024   16384             2  2.00 GiB\n"
    "preset medium (12.00 GiB)          32    1536   49152             6  6.00 GiB\n"
    "preset large (40.00 GiB)           64    2560  163840            20  20.00 GiB\n")


def test_plan_rows_are_independent_of_a_budget_that_holds_nothing(capsys):
    assert main(["plan", "--vram", "0"]) == 0
    out = capsys.readouterr().out
    assert out.split("\n", 1)[1] == (
        "sizing                     block size  blocks  tokens  seqs of 8192  memory\n"
        "-------------------------  ----------  ------  ------  ------------  -------------\n"
        + PRESET_ROWS +
        "for_context_length(8192)           64       -       -             -  no block fits\n"
        "for_model(vram=0 B)                16       -       -             -  no block fits\n")
    assert main(["plan", "--vram", "1KiB"]) == 0
    assert PRESET_ROWS in capsys.readouterr().out


def test_plan_notes_are_short_and_the_table_stays_aligned(capsys):
    assert main(["plan", "--vram", "1GiB", "--context", "100000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[6] == ("for_context_length(100000)          64       -       -               -  "
                        "context too long: 8192 tokens fit")
    assert lines[7] == "for_model(vram=1.00 GiB)            16     512    8192               0  1.00 GiB"
    assert main(["plan", "--vram", "1EiB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[6].startswith("for_context_length(8192)  ") and lines[6].endswith("  1.00 GiB")
    assert lines[7].endswith("  16       -       -             -  over 2**31 - 1 blocks")
    # the number columns (dashes too) end where the rule's dashes do
    rule = lines[2]
    starts = [i for i, ch in enumerate(rule) if ch == "-" and (i == 0 or rule[i - 1] == " ")]
    ends = [i + 1 for i, ch in enumerate(rule) if ch == "-" and (i + 1 == len(rule) or rule[i + 1] == " ")]
    assert len(starts) == len(ends) == 6
    for row in lines[3:]:
        for start, end in zip(starts[1:5], ends[1:5]):
            assert row[end - 1] != " " and row[start - 1] == " " and row[end] == " ", (row, start, end)


def test_plan_refuses_a_negative_budget_in_the_library():
    from kvforge.errors import ConfigError
    from kvforge.tools.plan import plan_rows

    with pytest.raises(ConfigError, match="--vram must be a byte size >= 0"):
        plan_rows("llama-3-8b", -1, 8192)


def test_generate_kv_memory_fraction_reaches_the_engine_config(tmp_path, capsys, monkeypatch):
    from kvforge.engine import Engine

    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=64,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, torch_dtype="float32")))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt_token_ids": [1, 2, 3]}) + "\n")
    built = []
    from_config = Engine.from_config.__func__

    def spy(cls, *args, **kwargs):
        engine = from_config(cls, *args, **kwargs)
        built.append(engine)
        return engine

    monkeypatch.setattr(Engine, "from_config", classmethod(spy))
    argv = ["generate", "--model", str(tmp_path), "--random-weights", "--prompts", str(prompts), "--max-tokens", "2",
            "--device", "cpu", "--no-progress"]
    assert main(argv + ["--kv-memory-fraction", "0.5", "--speculative-tokens", "3", "--async-scheduling"]) == 0
    assert main(argv) == 0
    assert "1 requests, 2 tokens" in capsys.readouterr().out
    assert [e.config.kv_memory_fraction for e in built] == [0.5, 0.85]
    assert [e.config.speculative_tokens for e in built] == [3, 0]
    assert [e.config.async_scheduling for e in built] == [True, False]


def test_generate_text_prompts_through_the_checkpoint_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=64,
        intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, torch_dtype="float32")))
    assert main(["generate", "--model", str(tmp_path), "--random-weights", "--prompt", "hello world",
                 "--max-tokens", "3", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "[0] prompt: 'hello world'" in out and "[0] completion (3 tokens, length): '" in out


# ------------------------------------------------------------ plan --host-memory
def test_plan_host_memory_adds_the_host_tier_beside_every_row(capsys):
    assert main(["plan", "--model", "llama-3-8b", "--vram", "24GiB", "--context", "8192",
                 "--host-memory", "64GiB"]) == 0
    # 64 GiB of 128 KiB tokens: 524288 tokens whatever the block size; blocks = tokens / block size
    assert capsys.readouterr().out == (
        "llama-3-8b: 32 layers, 8 KV heads, head dim 128, bfloat16; 128.00 KiB per token; context 8192; "
        "host tier 64.00 GiB\n"
        "sizing                     block size  blocks  tokens  seqs of 8192  memory     host blocks  host tokens"
        "  host:device\n"
        "-------------------------  ----------  ------  ------  ------------  ---------  -----------  -----------"
        "  -----------\n"
        "preset small (4.00 GiB)            16    1024   16384             2  2.00 GiB         32768       524288"
        "         32:1\n"
        "preset medium (12.00 GiB)          32    1536   49152             6  6.00 GiB         16384       524288"
        "       10.7:1\n"
        "preset large (40.00 GiB)           64    2560  163840            20  20.00 GiB         8192       524288"
        "        3.2:1\n"
        "for_context_length(8192)           64     128    8192             1  1.00 GiB          8192       524288"
        "         64:1\n"
        "for_model(vram=24.00 GiB)          16   12288  196608            24  24.00 GiB        32768       524288"
        "       2.67:1\n")


def test_plan_host_memory_of_a_tiny_checkpoint_and_rows_that_do_not_fit(tmp_path, capsys):
    cfg = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
               torch_dtype="float32", max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # 2 layers x K,V x 2 heads x 16 dims x 4 bytes = 512 B a token: 1 MiB of host memory holds 2048 tokens
    assert main(["plan", "--model", str(tmp_path), "--vram", "0", "--context", "64", "--host-memory", "1MiB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("; 512 B per token; context 64; host tier 1.00 MiB")
    assert lines[1].endswith("  host blocks  host tokens  host:device")
    # the presets' device pools hold 2048 (2 GiB), 6144 and 20480 times the host tier: the small side is 1
    assert lines[3].endswith("  2.00 GiB               128         2048       1:2048")
    assert lines[4].endswith("  6.00 GiB                64         2048       1:6144")
    assert lines[5].endswith("  20.00 GiB               32         2048      1:20480")  # block size 64
    # the device pool holds nothing: host blocks and tokens still show, the ratio is a dash
    assert lines[6] == ("for_context_length(64)             16       -         -           -  no block fits"
                        "          128         2048            -")
    assert lines[7].startswith("for_model(vram=0 B)  ")
    assert lines[7].endswith("no block fits          128         2048            -")


def test_plan_host_memory_zero_is_the_plain_table(capsys):
    assert main(["plan"]) == 0
    plain = capsys.readouterr().out
    assert main(["plan", "--host-memory", "0"]) == 0
    assert capsys.readouterr().out == plain and "host" not in plain


@pytest.mark.parametrize("value, message", [
    ("-1", "--host-memory: cannot read a byte size from '-1'"),
    ("lots", "--host-memory: cannot read a byte size from 'lots'"),
    ("2EiB", "--host-memory: byte size '2EiB' exceeds the limit of 1 EiB"),
    ("1EiB", "--host-memory: host_memory=1048576.00 TiB makes more than 2**31 - 1 host blocks of 2.00 MiB"),
])
def test_plan_refuses_a_bad_host_memory_in_one_line(value, message, capsys):
    assert main(["plan", "--host-memory", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvforge plan: error: {message}") and err.count("\n") == 1


def test_plan_refuses_a_negative_host_memory_in_the_library():
    from kvforge.errors import ConfigError
    from kvforge.tools.plan import plan_headers, plan_rows

    with pytest.raises(ConfigError, match=r"--host-memory must be a byte size >= 0"):
        plan_rows("llama-3-8b", 2**30, 8192, -1)
    assert plan_headers(4096) == (["sizing", "block size", "blocks", "tokens", "seqs of 4096", "memory"], "lrrrrl")
    assert plan_headers(4096, 1)[1] == "lrrrrlrrr" and plan_headers(4096, 1)[0][-1] == "host:device"
