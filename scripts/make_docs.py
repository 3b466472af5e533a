#!/usr/bin/env python3
"""Run every example in README.md and docs/*.md and keep the outputs they show true.

    python scripts/make_docs.py             run every example; rewrite each shown output that changed
    python scripts/make_docs.py --check     run every example, change nothing; exit 1 naming every
                                            block that fails or whose shown output differs
    python scripts/make_docs.py --list      what would run, what is compared, what is skipped
    python scripts/make_docs.py --images    also redraw docs/img/*.png (runs `kvforge demo`, ~20 s) and
                                            check that README.md quotes the demo's compaction figure
    python scripts/make_docs.py DOC ...     only these documents

What runs is read from the fenced code blocks:

- ```` ```python ````: the python blocks of one document run in order in one
  fresh interpreter, sharing their names (a later block may use an earlier
  block's ``cache``).
- ```` ```console ````: each ``$ kvforge ...`` line runs as a subprocess; the
  lines under it, up to the next ``$``, are its shown output.
- ```` ```bash ````: every line is a ``kvforge ...`` command, run as a subprocess.
- A ```` ```text ```` block right after a python or bash block (nothing but
  blank lines between) is that block's shown output.
- Words in the info string after the language are markers:
  ``gpu`` and ``setup`` blocks are not run (:data:`SKIP_MARKERS` says why);
  ``file=NAME`` writes the block into every folder the document's examples run
  in (a trace the commands read); ``keep="A|B"`` shows, and compares, only the
  output lines that start with ``A`` or ``B`` (an excerpt).
- A shell block that runs anything but ``kvforge`` must carry a skip marker,
  and an unlabelled block of commands is an error: nothing is left out
  silently.
- ``path/to/checkpoint`` in an example stands for a local Hugging Face
  checkpoint folder; here it is a tiny random Llama with a word-level
  tokenizer, written once per run with
  ``kvforge.engine.testing.save_tiny_checkpoint`` (needs transformers).
- ``redis://127.0.0.1:6379/0`` stands for a Redis server: a real
  ``redis-server`` started once per run on a free loopback port (``make test``
  installs it), stopped when the run ends.

Shown outputs are compared line by line (trailing spaces and trailing blank
lines ignored). The lines of :data:`WALL_CLOCK` are timings: their numbers are
masked when compared and kept as committed when rewritten. Every example runs
in a fresh temporary folder (files it writes are thrown away) with the working
tree first on ``PYTHONPATH`` and one intra-op torch thread.
``tests/test_docs.py`` runs the same check in ``make test``; ``make docs``
runs this script.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import difflib
import json
import os
import re
import shlex
import shutil
import threading
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent

#: Markers of blocks that are not run, and why.
SKIP_MARKERS: dict[str, str] = {
    "gpu": "needs a GPU (a benchmark command or the output of a GPU run): checked by its benchmark",
    "setup": "sets up the environment (make, pip): `make test` runs the tests, this check among them",
}

#: The placeholder for a checkpoint folder in the examples.
CHECKPOINT = "path/to/checkpoint"
REDIS_URL = "redis://127.0.0.1:6379/0"
_redis: list = []  # the one server of this run, started on first use
_redis_lock = threading.Lock()

#: Per command (its first words): output lines, by how they start, whose numbers are
#: wall-clock timings of the machine that ran it.
WALL_CLOCK: dict[str, tuple[str, ...]] = {
    "kvforge simulate": ("simulated steps/s", "block-ops/s"),
}

PYTHON_LANGS = {"python", "py"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
TIMEOUT_S = 600

_FENCE = re.compile(r"^(?P<fence>`{3,})(?P<info>.*)$")
_NUMBER = re.compile(r"\d[\d,.]*")


def default_docs() -> list[Path]:
    """README.md and every docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------ parsing
@dataclasses.dataclass
class Block:
    """One fenced code block: ``lines[body_start:body_end]`` of its file are its body."""

    path: Path
    line: int                    # 1-based line of the opening fence
    lang: str
    markers: frozenset[str]
    attrs: dict[str, str]
    body: list[str]
    body_start: int              # 0-based index of the first body line in the file
    follows_block: bool          # only blank lines since the previous block closed

    @property
    def where(self) -> str:
        return f"{rel(self.path)}:{self.line}"

    @property
    def skip(self) -> str | None:
        """The marker that keeps this block from running, if any."""
        return next((m for m in sorted(self.markers) if m in SKIP_MARKERS), None)


@dataclasses.dataclass
class Example:
    """One thing to run: a python block or a command, and the output the document shows."""

    block: Block
    kind: str                    # "python" or "command"
    source: str                  # python code, or the command line
    expected: list[str] | None   # the shown output, None when none is shown
    span: tuple[Path, int, int] | None = None   # where the shown output sits: (file, start, end), 0-based
    keep: tuple[str, ...] | None = None

    @property
    def where(self) -> str:
        return self.block.where

    @property
    def label(self) -> str:
        return f"`{self.source}`" if self.kind == "command" else "python block"


@dataclasses.dataclass
class Doc:
    path: Path
    blocks: list[Block]
    examples: list[Example]
    files: dict[str, str]        # file= blocks
    skipped: list[Block]
    problems: list[str]          # blocks that cannot be run as written (unmarked shell, unlabelled commands)


def parse_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    i, last_end = 0, -1
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m["fence"], m["info"].strip()
        j = i + 1
        while j < len(lines) and not (lines[j].startswith(fence) and not lines[j].strip("`").strip()):
            j += 1
        words = shlex.split(info) if info else []
        lang = words[0].lower() if words else ""
        attrs = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        markers = frozenset(w for w in words[1:] if "=" not in w)
        between = lines[last_end + 1:i] if last_end >= 0 else ["x"]
        blocks.append(Block(path, i + 1, lang, markers, attrs, lines[i + 1:j], i + 1,
                            all(not s.strip() for s in between)))
        last_end = j
        i = j + 1
    return blocks


def _commands(lines: list[str]) -> list[str]:
    """Command lines of a bash block: comments dropped, backslash continuations joined."""
    cmds, cur = [], ""
    for s in lines:
        s = s.rstrip()
        if cur:
            s = cur + " " + s.lstrip()
            cur = ""
        if s.endswith("\\"):
            cur = s[:-1].rstrip()
            continue
        if s.strip() and not s.lstrip().startswith("#"):
            cmds.append(s.strip())
    return cmds


def parse_doc(path: Path, text: str | None = None) -> Doc:
    """The examples of one document: what runs, what it is expected to print."""
    blocks = parse_blocks(path, text)
    doc = Doc(path, blocks, [], {}, [], [])
    for n, b in enumerate(blocks):
        nxt = blocks[n + 1] if n + 1 < len(blocks) else None
        shown = nxt if nxt is not None and nxt.lang == "text" and nxt.follows_block else None
        keep = tuple(b.attrs["keep"].split("|")) if "keep" in b.attrs else None
        if "file" in b.attrs:
            doc.files[b.attrs["file"]] = "\n".join(b.body) + "\n"
        if b.skip:
            doc.skipped.append(b)
            continue
        if b.lang in PYTHON_LANGS:
            doc.examples.append(Example(b, "python", "\n".join(b.body) + "\n",
                                        shown.body if shown else None,
                                        (path, shown.body_start, shown.body_start + len(shown.body)) if shown else None,
                                        keep))
        elif b.lang == "console":
            cmd: Example | None = None
            for k, s in enumerate(b.body):
                if s.startswith("$ "):
                    cmd = Example(b, "command", s[2:].strip(), [], (path, b.body_start + k + 1, b.body_start + k + 1),
                                  keep)
                    doc.examples.append(cmd)
                elif cmd is None:
                    if s.strip():
                        doc.problems.append(f"{b.where}: console block: output before any `$ ` command line")
                else:
                    assert cmd.expected is not None and cmd.span is not None
                    cmd.expected.append(s)
                    cmd.span = (path, cmd.span[1], b.body_start + k + 1)
            for ex in doc.examples:
                if ex.block is b and ex.expected is not None:
                    while ex.expected and not ex.expected[-1].strip():   # blank lines before the next `$`
                        ex.expected.pop()
                        assert ex.span is not None
                        ex.span = (path, ex.span[1], ex.span[2] - 1)
                    if not ex.expected:
                        ex.expected, ex.span = None, None
        elif b.lang in SHELL_LANGS:
            cmds = _commands(b.body)
            for c in cmds:
                ex = Example(b, "command", c, None, None, keep)
                if len(cmds) == 1 and shown is not None:
                    ex.expected = shown.body
                    ex.span = (path, shown.body_start, shown.body_start + len(shown.body))
                doc.examples.append(ex)
            if len(cmds) > 1 and shown is not None:
                doc.problems.append(f"{b.where}: a text block after a bash block of several commands: "
                                    f"show each command's output in a console block")
        elif not b.lang and b.body and (b.body[0].startswith(("$ ", "kvforge ", ">>> "))):
            doc.problems.append(f"{b.where}: unlabelled block of commands: label it bash, console or python "
                                f"(or text for a usage line), or mark it ({', '.join(SKIP_MARKERS)})")
    for ex in doc.examples:
        if ex.kind == "command" and not ex.source.startswith("kvforge "):
            doc.problems.append(f"{ex.where}: `{ex.source}` is not a kvforge command: run only kvforge here, "
                                f"or mark the block ({', '.join(SKIP_MARKERS)})")
    return doc


# ---------------------------------------------------------------- comparing
def normalise(lines: Iterable[str]) -> list[str]:
    out = [s.rstrip() for s in lines]
    while out and not out[-1]:
        out.pop()
    return out


def wall_clock_prefixes(ex: Example) -> tuple[str, ...]:
    if ex.kind != "command":
        return ()
    return tuple(p for cmd, prefixes in WALL_CLOCK.items() if ex.source.startswith(cmd) for p in prefixes)


def kept(lines: list[str], keep: tuple[str, ...] | None) -> list[str]:
    return lines if keep is None else [s for s in lines if s.startswith(keep)]


def _masked(line: str, prefixes: tuple[str, ...]) -> str:
    """Numbers masked and runs of spaces collapsed (a right-aligned column moves with its width)."""
    return " ".join(_NUMBER.sub("#", line).split()) if prefixes and line.startswith(prefixes) else line


def compare(expected: list[str], actual: list[str], *, keep: tuple[str, ...] | None = None,
            wall_clock: tuple[str, ...] = ()) -> tuple[bool, list[str]]:
    """Whether ``actual`` (the full output) shows as ``expected``; and the lines to show
    in its place (wall-clock lines kept as shown where only their numbers differ)."""
    exp, act = normalise(expected), kept(normalise(actual), keep)
    shown = {_masked(s, wall_clock): s for s in exp if wall_clock and s.startswith(wall_clock)}
    new = [shown.get(_masked(s, wall_clock), s) if wall_clock and s.startswith(wall_clock) else s for s in act]
    return new == exp, new


# ----------------------------------------------------------------- running
@dataclasses.dataclass
class Outcome:
    example: Example
    error: str | None = None     # why it failed (or did not run)
    actual: list[str] | None = None
    same: bool | None = None     # shown output equals the output now; None when none is shown
    replacement: list[str] | None = None
    seconds: float = 0.0         # wall time of the process it ran in (shared by a document's python blocks)


_DRIVER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(open(sys.argv[1], encoding="utf-8"))
ns = {"__name__": "__main__"}
results = []
for name, line, src in blocks:
    buf = io.StringIO()
    try:
        code = compile("\n" * line + src, name, "exec")   # tracebacks name the document's lines
        with contextlib.redirect_stdout(buf):
            exec(code, ns)
    except BaseException:
        results.append([buf.getvalue(), traceback.format_exc()])
        break
    results.append([buf.getvalue(), None])
json.dump(results, open(sys.argv[2], "w", encoding="utf-8"))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    env.pop("TRITON_INTERPRET", None)
    return env


def _workdir(files: dict[str, str]) -> str:
    d = tempfile.mkdtemp(prefix="kvforge-docs-")
    for name, text in files.items():
        Path(d, name).parent.mkdir(parents=True, exist_ok=True)
        Path(d, name).write_text(text, encoding="utf-8")
    return d


def _substitute(text: str, checkpoint: Callable[[], str]) -> str:
    if REDIS_URL in text:
        text = text.replace(REDIS_URL, _redis_url())
    return text.replace(CHECKPOINT, checkpoint()) if CHECKPOINT in text else text


def _redis_url() -> str:
    """The URL of this run's Redis server (``tests/redis_server.py``), started on first use."""
    with _redis_lock:
        return _start_redis()


def _start_redis() -> str:
    if not _redis:
        import atexit
        sys.path.insert(0, str(ROOT))
        from tests.redis_server import RedisServer
        server = RedisServer()
        server.start()
        atexit.register(server.stop)
        _redis.append(server)
    return _redis[0].url()


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def run_python(doc: Doc, checkpoint: Callable[[], str]) -> list[tuple[list[str] | None, str | None]]:
    """Every python block of ``doc`` in one fresh interpreter: per block, its stdout and its
    error (a block after a failing one does not run)."""
    examples = [e for e in doc.examples if e.kind == "python"]
    if not examples:
        return []
    work = _workdir(doc.files)
    try:
        src = [[rel(doc.path), e.block.body_start, _substitute(e.source, checkpoint)] for e in examples]
        Path(work, ".blocks.json").write_text(json.dumps(src), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-c", _DRIVER, ".blocks.json", ".results.json"], cwd=work,
                              env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        try:
            results = json.loads(Path(work, ".results.json").read_text(encoding="utf-8"))
        except OSError:
            err = f"the interpreter exited with status {proc.returncode}:\n{_tail(proc.stdout + proc.stderr)}"
            return [(None, err)] * len(examples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out: list[tuple[list[str] | None, str | None]] = []
    for k in range(len(examples)):
        if k < len(results):
            stdout, err = results[k]
            out.append((stdout.splitlines(), err))
        else:
            out.append((None, f"not run: the block at {examples[len(results) - 1].where} failed"))
    return out


def run_command(cmd: str, files: dict[str, str], checkpoint: Callable[[], str]) -> tuple[list[str] | None, str | None]:
    """``kvforge ...`` as a subprocess in a fresh folder: its stdout, or why it failed."""
    argv = shlex.split(_substitute(cmd, checkpoint))
    work = _workdir(files)
    try:
        proc = subprocess.run([sys.executable, "-m", "kvforge.tools.cli", *argv[1:]], cwd=work, env=_env(),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        return None, f"exit status {proc.returncode}:\n{_tail(proc.stderr or proc.stdout)}"
    return proc.stdout.splitlines(), None


_TOKENIZER = """
import sys
from tokenizers import Tokenizer, models, pre_tokenizers
from kvforge.engine.testing import save_tiny_checkpoint
save_tiny_checkpoint("LlamaForCausalLM", sys.argv[1])
tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.save(sys.argv[1] + "/tokenizer.json")
"""


def write_checkpoint(folder: str) -> str:
    """A tiny random Llama checkpoint with a word-level tokenizer ("w0" ... "w127") in ``folder``."""
    proc = subprocess.run([sys.executable, "-c", _TOKENIZER, folder], env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"could not write the tiny checkpoint: {_tail(proc.stderr)}")
    return folder


def _timed(fn: Callable[..., object], *args: object) -> tuple[object, float]:
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


def run(docs: Sequence[Doc], *, jobs: int | None = None, checkpoint: str | None = None) -> list[Outcome]:
    """Run every example of ``docs`` (identical commands once), ``jobs`` at a time.

    The tiny checkpoint is written first, beside the examples that do not need it;
    those that do run last."""
    tmp = tempfile.mkdtemp(prefix="kvforge-docs-ckpt-")
    results: dict[int, tuple[tuple[list[str] | None, str | None], float]] = {}
    try:
        with futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
            work: list[tuple[Callable[..., object], tuple[object, ...], list[Example]]] = []
            commands: dict[tuple[str, str], list[Example]] = {}
            for d in docs:
                for ex in d.examples:
                    if ex.kind == "command":
                        files = {name: text for name, text in d.files.items() if name in ex.source}
                        key = (ex.source, json.dumps(files, sort_keys=True))
                        if key not in commands:
                            commands[key] = []
                            work.append((run_command, (ex.source, files), commands[key]))
                        commands[key].append(ex)
            for d in docs:
                pys = [e for e in d.examples if e.kind == "python"]
                if pys:
                    work.append((run_python, (d,), pys))
            needs = [any(CHECKPOINT in e.source for e in exs) for _, _, exs in work]
            if checkpoint is None and any(needs):
                written = pool.submit(write_checkpoint, tmp)
                ckpt: Callable[[], str] = lambda: written.result()   # noqa: E731
            else:
                ckpt = lambda: checkpoint or tmp                     # noqa: E731
            order = sorted(range(len(work)), key=lambda k: needs[k])
            pending = [(pool.submit(_timed, work[k][0], *work[k][1], ckpt), work[k][2]) for k in order]
            for fut, exs in pending:
                python = exs[0].kind == "python"
                try:
                    res, secs = fut.result()
                except Exception as exc:  # noqa: BLE001 - reported as the examples' failure
                    failed = (None, f"{type(exc).__name__}: {exc}")
                    res, secs = ([failed] * len(exs) if python else failed), 0.0
                for k, ex in enumerate(exs):
                    results[id(ex)] = (res[k] if python else res), secs   # type: ignore[index]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    outcomes = []
    for d in docs:
        for ex in d.examples:
            (actual, err), secs = results[id(ex)]
            o = Outcome(ex, err, actual, seconds=secs)
            if err is None and actual is not None and ex.expected is not None:
                o.same, o.replacement = compare(ex.expected, actual, keep=ex.keep, wall_clock=wall_clock_prefixes(ex))
            outcomes.append(o)
    return outcomes


# ---------------------------------------------------------------- reporting
def problems(docs: Sequence[Doc], outcomes: Sequence[Outcome]) -> list[str]:
    """Every block that cannot run as written, fails, or shows an output it no longer prints."""
    out = [p for d in docs for p in d.problems]
    for o in outcomes:
        ex = o.example
        if o.error is not None:
            out.append(f"{ex.where}: {ex.label} failed: {o.error}")
        elif o.same is False:
            assert o.replacement is not None and ex.expected is not None
            diff = difflib.unified_diff(normalise(ex.expected), o.replacement, "shown", "prints now", lineterm="", n=1)
            out.append(f"{ex.where}: the output shown for {ex.label} is not what it prints now "
                       f"(python scripts/make_docs.py rewrites it):\n" + "\n".join(diff))
    return out


def rewrite(outcomes: Sequence[Outcome]) -> list[str]:
    """Put each changed output in its place in the files; returns where."""
    edits: dict[Path, list[tuple[int, int, list[str]]]] = {}
    for o in outcomes:
        if o.same is False and o.example.span is not None and o.replacement is not None:
            path, start, end = o.example.span
            edits.setdefault(path, []).append((start, end, o.replacement))
    done = []
    for path, spans in edits.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for start, end, new in sorted(spans, reverse=True):
            lines[start:end] = new
            done.append(f"{rel(path)}:{start}")
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return sorted(done)


def listing(docs: Sequence[Doc]) -> list[str]:
    """One line per example and per skipped block."""
    rows = []
    for d in docs:
        for ex in d.examples:
            how = "compared" if ex.expected is not None else "runs"
            if ex.expected is not None and (ex.keep or wall_clock_prefixes(ex)):
                how += " (" + ", ".join(filter(None, [
                    "excerpt" if ex.keep else "", "wall-clock numbers masked" if wall_clock_prefixes(ex) else ""])) + ")"
            rows.append(f"{ex.where}  {how:<40}  {ex.label if ex.kind == 'command' else 'python'}")
        for b in d.skipped:
            rows.append(f"{b.where}  {'skipped: ' + str(b.skip):<40}  {b.body[0] if b.body else ''}")
    return rows


#: The README's pictures: the command that draws each, and where its file goes.
PICTURES = {
    "docs/img/compaction.png": (["demo", "--quiet", "--out", "demo"], "demo/compaction.png"),
    "docs/img/sharegpt_memory.png": (["simulate", "--workload", "sharegpt", "--block-size", "16", "--no-progress",
                                      "--out", "sim"], "sim/sharegpt_memory.png"),
}
_DEMO_FIGURE = re.compile(r"compaction with \d+ long conversations left: (\d+ blocks moved, \S+ \S+ returned)")


def redraw_images() -> tuple[list[str], list[str]]:
    """Redraw the README's pictures; returns them, and the problems: the README must
    quote the demo's compaction figure (the picture's title) as the demo prints it."""
    work = tempfile.mkdtemp(prefix="kvforge-docs-img-")
    drawn, found = [], []
    try:
        for dst, (argv, src) in PICTURES.items():
            proc = subprocess.run([sys.executable, "-m", "kvforge.tools.cli", *argv], cwd=work, env=_env(),
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
            if proc.returncode != 0:
                found.append(f"`kvforge {' '.join(argv)}` failed: {_tail(proc.stderr)}")
                continue
            shutil.copyfile(Path(work, src), ROOT / dst)
            drawn.append(dst)
            m = _DEMO_FIGURE.search(proc.stdout)
            if argv[0] == "demo" and (m is None or m[1] not in (ROOT / "README.md").read_text(encoding="utf-8")):
                found.append(f"README.md does not quote the demo's compaction: "
                             f"{m[1] if m else 'no compaction line in its output'}")
        return drawn, found
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make_docs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("docs", nargs="*", type=Path, help="documents (default: README.md and docs/*.md)")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 naming every drifted or failing block")
    p.add_argument("--list", action="store_true", help="list the examples and the skipped blocks; run nothing")
    p.add_argument("--images", action="store_true", help="also redraw docs/img/*.png")
    p.add_argument("--times", action="store_true", help="print each example's wall time")
    p.add_argument("--jobs", type=int, default=None, help="examples run at a time (default: the CPU count)")
    p.add_argument("--checkpoint", default=None, help=f"a checkpoint folder to use for {CHECKPOINT}")
    args = p.parse_args(argv)
    docs = [parse_doc(path) for path in (args.docs or default_docs())]
    if args.list:
        print("\n".join(listing(docs)))
        return 0
    outcomes = run(docs, jobs=args.jobs, checkpoint=args.checkpoint)
    found = problems(docs, outcomes)
    if not args.check:
        for where in rewrite(outcomes):
            print(f"rewrote the output at {where}")
        found = [f for f in found if "is not what it prints now" not in f]
        if args.images:
            drawn, bad = redraw_images()
            for path in drawn:
                print(f"redrew {path}")
            found += bad
    for f in found:
        print(f, file=sys.stderr)
    if args.times:
        for o in outcomes:
            print(f"{o.seconds:6.1f} s  {o.example.where}  {o.example.label}")
    n = sum(o.error is None for o in outcomes)
    print(f"{n}/{len(outcomes)} examples ran; {sum(o.same is not None for o in outcomes)} shown outputs compared; "
          f"{sum(len(d.skipped) for d in docs)} blocks skipped by marker; {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
