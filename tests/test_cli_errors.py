"""Every documented user mistake: exit status 2 and one line ``kvforge <cmd>: error: ...``, no traceback.

Each mistake runs the ``kvforge`` entry point in its own process, as a user
would. The processes of all cases start together (a module fixture, a few at
a time) and each case then checks its own result. A missing extra is made by
an import blocker: a ``sys.meta_path`` finder, installed before kvforge is
imported, that raises ImportError for the blocked top-level packages.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]


class Case(NamedTuple):
    argv: tuple[str, ...]
    needles: tuple[str, ...]        # every one must be in the error line
    absent: tuple[str, ...] = ()    # none may be
    quiet_stdout: bool = False      # failed before any work: nothing on stdout
    blocked: tuple[str, ...] = ()   # top-level packages whose import fails


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def _configs(root: Path) -> dict[str, Path]:
    """Broken checkpoint folders: config.json with one mistake each."""
    good = dict(model_type="llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                hidden_size=64, max_position_embeddings=128)
    texts: dict[str, bytes] = {
        "string-hidden-size": json.dumps({**good, "hidden_size": "4096"}).encode(),
        "null": b"null",
        "list": b"[1, 2, 3]",
        "zero-heads": json.dumps({**good, "num_attention_heads": 0}).encode(),
        "binary": b"\xff\xfe\x00\x81config\x00",
    }
    out = {}
    for name, data in texts.items():
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_bytes(data)
        out[name] = folder
    return out


def _cases(root: Path, busy_port: int) -> dict[str, Case]:
    cfg = _configs(root)
    cases: dict[str, Case] = {}
    config_needles = {"string-hidden-size": ("hidden_size", "'4096'"), "null": ("JSON object", "null"),
                      "list": ("JSON object", "list"), "zero-heads": ("num_attention_heads",),
                      "binary": ("UTF-8",)}
    for name, needles in config_needles.items():
        path = str(cfg[name])
        cases[f"plan-config-{name}"] = Case(("plan", "--model", path), (path, *needles))
        cases[f"simulate-config-{name}"] = Case(("simulate", "--model", path, "--no-plots"),
                                                ("--model", path, *needles))
    # (--vram 0, 1KiB and 1EiB are not mistakes: the preset rows print, the budget rows say why they do not fit)
    for vram, needle in (("-1", "'-1'"), ("12XB", "'12XB'"), ("1e400GiB", "'1e400GiB'"),
                         ("99999999999999999999999PiB", "exceeds the limit"), ("nan", "'nan'"), ("inf", "'inf'")):
        cases[f"plan-vram-{vram}"] = Case(("plan", "--vram", vram), ("--vram", needle))
    cases["plan-context-0"] = Case(("plan", "--context", "0"), ("--context", "got 0"))
    cases["plan-context-huge"] = Case(("plan", "--context", str(2**40)), ("--context", str(2**40)))
    cases["plan-model-missing"] = Case(("plan", "--model", "/nonexistent"), ("'/nonexistent'",))
    cases["plan-context-not-int"] = Case(("plan", "--context", "abc"), ("argument --context", "'abc'"))

    gen = ("generate", "--model", "/nonexistent", "--prompt", "hi")
    cases["generate-port-99999"] = Case((*gen, "--metrics-port", "99999"), ("--metrics-port", "99999"),
                                        quiet_stdout=True)
    cases["generate-port-minus-1"] = Case((*gen, "--metrics-port", "-1"), ("--metrics-port", "-1"),
                                          quiet_stdout=True)
    cases["generate-port-in-use"] = Case((*gen, "--metrics-port", str(busy_port)),
                                         (f"127.0.0.1:{busy_port}", "already in use"), quiet_stdout=True)
    cases["generate-model-missing"] = Case(gen, ("'/nonexistent'",))
    (root / "prompts-binary.jsonl").write_bytes(b"\xff\xfe{")
    cases["generate-prompts-binary"] = Case(
        ("generate", "--model", "/nonexistent", "--prompts", str(root / "prompts-binary.jsonl")), ("--prompts", "UTF-8"))
    cases["generate-prompts-missing"] = Case(
        ("generate", "--model", "/nonexistent", "--prompts", str(root / "none.jsonl")), ("--prompts", "none.jsonl"))
    for value in ("0", "1.5", "nan", "-0.2"):
        cases[f"generate-kv-memory-fraction-{value}"] = Case(
            (*gen, "--kv-memory-fraction", value), ("--kv-memory-fraction must be a finite number in (0, 1]", value),
            absent=("/nonexistent",), quiet_stdout=True)
    cases["generate-kv-memory-fraction-and-vram"] = Case(
        (*gen, "--kv-memory-fraction", "0.5", "--vram", "4GiB"),
        ("argument --vram/--kv-memory: not allowed with argument --kv-memory-fraction",), quiet_stdout=True)
    cases["generate-kv-memory-fraction-and-num-blocks"] = Case(
        (*gen, "--num-blocks", "8", "--kv-memory-fraction", "0.5"),
        ("argument --kv-memory-fraction: not allowed with argument --num-blocks",), quiet_stdout=True)

    # missing extras: one line naming the extra, before the work starts
    ckpt = _tiny_checkpoint_folder(root / "ckpt-tokenizer-json", tokenizer_files=("tokenizer.json",))
    spm = _tiny_checkpoint_folder(root / "ckpt-tokenizer-model", tokenizer_files=("tokenizer.model",))
    bare = _tiny_checkpoint_folder(root / "ckpt-no-tokenizer", tokenizer_files=())
    ids = root / "ids.jsonl"
    ids.write_text('{"prompt_token_ids": [1, 2, 3]}\n')
    cases["generate-no-safetensors"] = Case(
        ("generate", "--model", str(ckpt), "--prompts", str(ids)),
        ('loading a checkpoint needs safetensors: pip install "kvforge[engine]"',), quiet_stdout=True,
        blocked=("safetensors",))
    cases["generate-random-weights-no-tokenizers"] = Case(
        ("generate", "--model", str(ckpt), "--random-weights", "--prompt", "hello", "--device", "cpu"),
        ("text prompts need the tokenizers package", "tokenizer.json", 'pip install "kvforge[engine]"'),
        absent=("has no tokenizer",), quiet_stdout=True, blocked=("tokenizers", "transformers"))
    cases["generate-tokenizer-model-no-transformers"] = Case(
        ("generate", "--model", str(spm), "--random-weights", "--prompt", "hello", "--device", "cpu"),
        ("text prompts need transformers", "tokenizer.model", "pip install transformers"), quiet_stdout=True,
        blocked=("tokenizers", "transformers"))
    cases["generate-text-prompt-no-tokenizer-files"] = Case(
        ("generate", "--model", str(bare), "--random-weights", "--prompt", "hello", "--device", "cpu"),
        (f"--model '{bare}' has no tokenizer", "prompt_token_ids"), quiet_stdout=True)
    cases["generate-metrics-no-prometheus"] = Case(
        ("generate", "--model", str(ckpt), "--random-weights", "--prompts", str(ids), "--metrics-port", "0"),
        ('--metrics-port needs prometheus-client: pip install "kvforge[metrics]"',), quiet_stdout=True,
        blocked=("prometheus_client",))

    demo = ("demo", "--device", "cpu", "--quiet", "--out", str(root / "demo-out"))
    cases["demo-out-unwritable"] = Case(("demo", "--device", "cpu", "--quiet", "--out", "/proc/x"),
                                        ("--out", "'/proc/x'"), quiet_stdout=True)
    cases["demo-out-is-a-file"] = Case(("demo", "--device", "cpu", "--quiet", "--out", str(root / "null" / "config.json")),
                                       ("--out", "config.json"), quiet_stdout=True)
    cases["demo-requests-0"] = Case((*demo, "--requests", "0"), ("--requests must be", "got 0"),
                                    absent=("--long-requests",), quiet_stdout=True)
    cases["demo-long-requests"] = Case((*demo, "--requests", "5", "--long-requests", "5"),
                                       ("--long-requests", "[0, 5)"), quiet_stdout=True)
    cases["demo-kv-memory"] = Case((*demo, "--kv-memory", "lots"), ("--kv-memory", "'lots'"), quiet_stdout=True)
    cases["demo-no-matplotlib"] = Case(
        demo, ("kvforge demo: error: the demo's block maps need matplotlib: pip install \"kvforge[plot]\"",),
        quiet_stdout=True, blocked=("matplotlib",))
    cases["demo-model-no-safetensors"] = Case(
        (*demo, "--model", str(ckpt)),
        ('--model needs safetensors to load the checkpoint: pip install "kvforge[engine]"',),
        quiet_stdout=True, blocked=("safetensors",))

    def trace(name: str, *lines: str) -> str:
        path = root / f"{name}.jsonl"
        path.write_text("".join(line + "\n" for line in lines))
        return str(path)

    good = '{"prompt_len": 4, "output_len": 2}'
    sim = ("simulate", "--no-plots", "--trace")
    cases["simulate-trace-missing"] = Case((*sim, str(root / "missing.jsonl")), ("missing.jsonl", "cannot read"))
    cases["simulate-trace-folder"] = Case((*sim, str(root)), ("cannot read the trace",))
    cases["simulate-trace-malformed"] = Case((*sim, trace("malformed", good, '{"prompt_len": 4,')),
                                             ("malformed.jsonl:2:", "not valid JSON"))
    cases["simulate-trace-not-an-object"] = Case((*sim, trace("array", "[1, 2]")),
                                                 ("array.jsonl:1:", "expected a JSON object"))
    cases["simulate-trace-arrival-1e308"] = Case(
        (*sim, trace("far", good, '{"arrival": 1e308, "prompt_len": 4, "output_len": 2}')),
        ("far.jsonl:2:", "'arrival'", "1e+308"))
    cases["simulate-trace-arrival-nan"] = Case(
        (*sim, trace("nan", '{"arrival": NaN, "prompt_len": 4, "output_len": 2}')), ("nan.jsonl:1:", "'arrival'", "nan"))
    cases["simulate-trace-arrival-s-huge"] = Case(
        (*sim, trace("late", '{"arrival_s": 1e12, "prompt_len": 4, "output_len": 2}')), ("late.jsonl:1:", "'arrival_s'"))
    cases["simulate-trace-negative-length"] = Case(
        (*sim, trace("negative", '{"prompt_len": -3, "output_len": 2}')), ("negative.jsonl:1:", "'prompt_len'", "-3"))
    cases["simulate-trace-huge-length"] = Case(
        (*sim, trace("huge", '{"prompt_len": 4, "output_len": 99999999999999999999}')), ("huge.jsonl:1:", "'output_len'"))
    cases["simulate-step-ms-0"] = Case((*sim, trace("ok", good), "--step-ms", "0"), ("--step-ms", "got 0.0"))
    cases["simulate-num-blocks-huge"] = Case(("simulate", "--no-plots", "--num-blocks", str(2**63)), ("--num-blocks",))
    cases["simulate-seed-negative"] = Case(("simulate", "--no-plots", "--seed", "-1"), ("--seed", "got -1"))
    cases["simulate-rate-huge"] = Case(("simulate", "--no-plots", "--workload", "bursty", "--rate", "1e308"),
                                       ("--rate", "1e+308"))
    cases["simulate-requests-huge"] = Case(("simulate", "--no-plots", "--requests", str(10**11)), ("--requests",))
    cases["simulate-vram-huge"] = Case(("simulate", "--no-plots", "--vram", "1PiB"), ("--vram 1PiB", "blocks"))
    cases["simulate-no-matplotlib"] = Case(
        ("simulate", "--requests", "3"),
        ('the plots need matplotlib: pip install "kvforge[plot]" (or pass --no-plots)',), quiet_stdout=True,
        blocked=("matplotlib",))
    cases["simulate-out-unwritable"] = Case(("simulate", "--out", "/proc/x", "--requests", "3"), ("--out", "'/proc/x'"),
                                            quiet_stdout=True)
    return cases


#: ``python -c`` program: block the packages named in argv[1] (comma-separated), then run the
#: entry point on the rest of argv, as the console script does
BLOCKED_CLI = """
import sys

class _Blocker:
    def __init__(self, names):
        self.names = set(names)
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)", name=name)
        return None

blocked = [n for n in sys.argv[1].split(",") if n]
sys.meta_path.insert(0, _Blocker(blocked))
sys.argv = ["kvforge", *sys.argv[2:]]
from kvforge.tools.cli import main
assert not {m.partition(".")[0] for m in sys.modules} & set(blocked)
sys.exit(main())
"""


def _tiny_checkpoint_folder(folder: Path, tokenizer_files: tuple[str, ...]) -> Path:
    """A checkpoint folder with a tiny Llama config.json and the named tokenizer files (their
    content is never read: every case fails before loading)."""
    folder.mkdir()
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64, hidden_size=64,
                  intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, torch_dtype="float32")
    (folder / "config.json").write_text(json.dumps(config))
    for name in tokenizer_files:
        (folder / name).write_text("{}")
    return folder


def _run(case: Case, root: Path) -> Result:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    r = subprocess.run([sys.executable, "-c", BLOCKED_CLI, ",".join(case.blocked), *case.argv], capture_output=True,
                       text=True, timeout=300, cwd=root, env=env)
    return Result(r.returncode, r.stdout, r.stderr)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Case], dict[str, Result]]]:
    root = tmp_path_factory.mktemp("cli-errors")
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        cases = _cases(root, busy.getsockname()[1])
        with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
            futures = {name: pool.submit(_run, case, root) for name, case in cases.items()}
            yield cases, {name: f.result() for name, f in futures.items()}
    finally:
        busy.close()


def _names() -> list[str]:
    """The case names, for the test ids (the cases are made again, in the fixture's folder)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return sorted(_cases(Path(tmp), 1))


@pytest.mark.parametrize("name", _names())
def test_mistake_is_one_error_line_and_status_2(name: str, results) -> None:
    cases, out = results
    case, r = cases[name], out[name]
    command = case.argv[0]
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"kvforge {command}: error: "), lines[0]
    for needle in case.needles:
        assert needle in lines[0], (needle, lines[0])
    for needle in case.absent:
        assert needle not in lines[0], (needle, lines[0])
    if case.quiet_stdout:
        assert r.stdout == "", r.stdout  # failed before the work started


def test_the_port_in_use_case_binds_before_the_model_loads(results) -> None:
    # the model path does not exist: the port is refused first, so it was checked before loading
    _, out = results
    assert "/nonexistent" not in out["generate-port-in-use"].stderr
