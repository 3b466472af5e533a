"""The documentation runs: every example in README.md and docs/*.md, as written.

``scripts/make_docs.py`` reads the fenced code blocks (its docstring has the
rules), runs them all once for this module (two at a time: about 55 s of CPU,
30-80 s on two cores depending on what else runs), and the tests below hold
the results; ``make_docs.py --check`` runs
the same comparison from the command line, and ``make_docs.py`` (``make
docs``) rewrites the shown outputs that drifted.

| what | how it runs | what is checked |
|---|---|---|
| ```` ```python ```` blocks | one fresh interpreter per document, its blocks in order, sharing names | it runs; where a ```` ```text ```` block follows, its stdout exactly (README: prefix-sharing tables, memory profile; compaction.md: the compaction and the elastic pool; kernels.md: paged decode against SDPA; simulate.md: block maps) |
| `$ kvforge plan --model llama-3-8b --vram 24GiB --context 8192` | subprocess | stdout exactly |
| `$ kvforge simulate --workload sharegpt --block-size 16` (README excerpt, simulate.md whole) | subprocess | stdout exactly (seed 0), except the wall-clock numbers of `simulated steps/s` and `block-ops/s` |
| `kvforge simulate` shared-prefix and `--trace requests.jsonl` (simulate.md) | subprocess, the trace written from the doc's ```` ```json file=requests.jsonl ```` block | it runs (no output shown) |
| `kvforge generate` (README and engine.md: the same command, run once), the engine's python (README, engine.md, architecture.md) | on a tiny random Llama checkpoint (`save_tiny_checkpoint` and a word-level tokenizer) standing for `path/to/checkpoint` | it runs (timings and random weights: no output shown) |
| python blocks without a ```` ```text ```` block after them (README's API example, architecture.md's API contract, simulate.md's simulation and metrics) | as above | it runs (their output holds timings, ports or random numbers) |
| blocks marked `gpu` | not run | output of a GPU run, checked by its benchmark |
| blocks marked `setup` | not run | `make` / `pip` set up the environment, and `make test` runs this file |

Which blocks are skipped is pinned in :data:`SKIPPED`: marking another block
changes this file too.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_docs", ROOT / "scripts" / "make_docs.py")
assert _spec is not None and _spec.loader is not None
make_docs = importlib.util.module_from_spec(_spec)
sys.modules["make_docs"] = make_docs
_spec.loader.exec_module(make_docs)

DOCS = make_docs.default_docs()

#: Every block that is not run: (document, marker, its first line).
SKIPPED = {
    ("README.md", "setup", "make demo   # creates .venv, installs everything, runs the main job (`kvforge demo`)"),
    ("README.md", "setup", 'pip install kvforge                   # the library'),
    ("docs/engine.md", "gpu", "PYTHONPATH=. python benchmarks/bench_engine.py --requests 128 512 --json out.json"),
}


@pytest.fixture(scope="module")
def parsed() -> list:
    return [make_docs.parse_doc(p) for p in DOCS]


@pytest.fixture(scope="module")
def outcomes(parsed: list) -> list:
    return make_docs.run(parsed, jobs=2)


def _of(doc: Path, outcomes: list) -> list:
    return [o for o in outcomes if o.example.block.path == doc]


def test_every_block_is_runnable_as_written(parsed: list) -> None:
    assert [p for d in parsed for p in d.problems] == []
    assert all(d.examples for d in parsed if d.path.name != "benchmarks.md")


def test_skipped_blocks_are_exactly_the_marked_ones(parsed: list) -> None:
    skipped = {(make_docs.rel(b.path), b.skip, b.body[0]) for d in parsed for b in d.skipped}
    assert skipped == SKIPPED
    assert set(make_docs.SKIP_MARKERS) == {"gpu", "setup"}


@pytest.mark.parametrize("doc", DOCS, ids=[make_docs.rel(p) for p in DOCS])
def test_examples_run(doc: Path, outcomes: list) -> None:
    failed = [f"{o.example.where}: {o.example.label}: {o.error}" for o in _of(doc, outcomes) if o.error]
    assert not failed, "\n\n".join(failed)


@pytest.mark.parametrize("doc", DOCS, ids=[make_docs.rel(p) for p in DOCS])
def test_shown_outputs_are_what_the_examples_print(doc: Path, parsed: list, outcomes: list) -> None:
    mine = [o for o in _of(doc, outcomes) if o.error is None]
    drift = make_docs.problems([], mine)
    assert not drift, "run `python scripts/make_docs.py` (make docs) and review the diff:\n\n" + "\n\n".join(drift)


def test_the_outputs_that_are_compared(parsed: list) -> None:
    compared = {(make_docs.rel(e.block.path), e.kind, e.source if e.kind == "command" else "")
                for d in parsed for e in d.examples if e.expected is not None}
    assert compared == {
        ("README.md", "command", "kvforge plan --model llama-3-8b --vram 24GiB --context 8192"),
        ("README.md", "command", "kvforge plan --model llama-3-8b --vram 24GiB --context 8192 --kv-dtype fp8_e4m3"),
        ("README.md", "command", "kvforge simulate --workload sharegpt --block-size 16"),
        ("README.md", "python", ""),
        ("docs/compaction.md", "python", ""),
        ("docs/engine.md", "python", ""),
        ("docs/fp8.md", "python", ""),
        ("docs/host_tier.md", "python", ""),
        ("docs/kernels.md", "python", ""),
        ("docs/remote_tier.md", "python", ""),
        ("docs/simulate.md", "command", "kvforge simulate --workload sharegpt --block-size 16"),
        ("docs/simulate.md", "command", "kvforge simulate --workload shared-prefix --requests 200 --num-blocks 300 "
                                        "--host-memory 4GiB --no-plots"),
        ("docs/simulate.md", "python", ""),
    }


# ------------------------------------------------- the check itself, on made-up documents
def test_compare_masks_wall_clock_numbers_and_keeps_excerpts() -> None:
    actual = ["metric   a", "-----", "steps     3", "simulated steps/s     999", "other  1"]
    ok, new = make_docs.compare(["metric   a", "-----", "steps     3", "simulated steps/s   3,173"], actual,
                                keep=("metric", "-----", "steps", "simulated"), wall_clock=("simulated steps/s",))
    assert ok and new[-1] == "simulated steps/s   3,173"
    ok, new = make_docs.compare(["metric   a", "steps     4"], actual, keep=("metric", "steps "))
    assert not ok and new == ["metric   a", "steps     3"]
    assert not make_docs.compare(["x"], ["x", "y"])[0]
    assert make_docs.compare(["x  ", ""], ["x"])[0]


def test_parse_doc_finds_outputs_markers_and_problems(tmp_path: Path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text("\n".join([
        "```console", "$ kvforge plan --model x", "out 1", "", "$ kvforge plan --model y", "```",
        "```bash", "kvforge simulate --no-plots", "```", "", "```text", "shown", "```",
        "```bash gpu", "python bench.py", "```",
        "```bash", "make demo", "```",
        "```", "kvforge demo", "```",
        "```json file=t.jsonl", "{}", "```",
    ]) + "\n")
    d = make_docs.parse_doc(doc)
    assert [(e.source, e.expected) for e in d.examples] == [
        ("kvforge plan --model x", ["out 1"]), ("kvforge plan --model y", None),
        ("kvforge simulate --no-plots", ["shown"]), ("make demo", None)]
    assert [b.skip for b in d.skipped] == ["gpu"] and d.files == {"t.jsonl": "{}\n"}
    assert len(d.problems) == 2 and "make demo" in d.problems[1] and "unlabelled" in d.problems[0]


def test_check_fails_on_drift_and_the_rewrite_fixes_it(tmp_path: Path) -> None:
    doc = tmp_path / "d.md"
    doc.write_text("Text.\n\n```python\nx = 6 * 7\nprint(x)\n```\n\n```text\n41\n```\n\n"
                   "```python\nprint(x + 1)   # the first block's names\n```\n\n```text\n43\n```\n")
    script = [sys.executable, str(ROOT / "scripts" / "make_docs.py")]
    check = subprocess.run([*script, "--check", str(doc)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 1
    assert f"{doc}:3:" in check.stderr and "-41" in check.stderr and "+42" in check.stderr
    assert f"{doc}:13:" not in check.stderr
    fix = subprocess.run([*script, str(doc)], capture_output=True, text=True, timeout=120)
    assert fix.returncode == 0, fix.stderr
    assert "```text\n42\n```" in doc.read_text() and "```text\n43\n```" in doc.read_text()
    assert subprocess.run([*script, "--check", str(doc)], capture_output=True, timeout=120).returncode == 0
