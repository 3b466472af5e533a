"""Install routes: the wheel, the extras, the console script, the Makefile's install stamp.

A wheel is built from a copy of the working tree (so no stale ``build/`` folder
can slip files into it), checked for every subpackage and ``py.typed``,
installed with ``--no-deps`` into a clean venv whose only view of the
dependencies (torch, numpy, matplotlib) is the project venv's site-packages,
and its ``kvforge`` console script runs the demo there, from a folder outside
the repository.
"""
from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import kvforge

REPO = Path(__file__).resolve().parents[1]

#: every subpackage the wheel must hold
SUBPACKAGES = ("kvforge", "kvforge.core", "kvforge.storage", "kvforge.tools", "kvforge.tools.simulate",
               "kvforge.tools.workload", "kvforge.engine", "kvforge.engine.models", "kvforge.kernels",
               "kvforge.integrations")
#: the extras a user picks from, and the packages each brings
USER_EXTRAS = {"triton": {"triton"}, "engine": {"safetensors", "tokenizers"}, "plot": {"matplotlib"},
               "metrics": {"prometheus-client"}, "remote": {"redis", "hiredis"}}
TEST_TOOLS = {"pytest", "hypothesis", "build"}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what the wheel is built from: the package, pyproject.toml and the README."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(REPO / "kvforge", src / "kvforge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    return src


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
                        str(source)], capture_output=True, text=True, timeout=300, cwd=source)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = sorted(dist.glob("kvforge-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _metadata(wheel: Path) -> tuple[email.message.Message, str]:
    with zipfile.ZipFile(wheel) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        entry_points = next(n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt"))
        return email.parser.Parser().parsestr(zf.read(info).decode()), zf.read(entry_points).decode()


def _requirements(meta: email.message.Message) -> dict[str, set[str]]:
    """extra -> the distribution names it requires (``""``: the base requirements)."""
    out: dict[str, set[str]] = {}
    for req in meta.get_all("Requires-Dist") or []:
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
        out.setdefault(extra.group(1) if extra else "", set()).add(name)
    return out


def test_wheel_holds_every_module_and_py_typed(wheel: Path, source: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for package in SUBPACKAGES:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert "kvforge/py.typed" in names
    modules = {p.relative_to(source).as_posix() for p in (source / "kvforge").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]


def test_wheel_metadata_version_script_and_extras(wheel: Path) -> None:
    meta, entry_points = _metadata(wheel)
    assert meta["Name"] == "kvforge" and meta["Version"] == kvforge.__version__
    assert re.search(r"^kvforge\s*=\s*kvforge\.tools\.cli:main$", entry_points, re.M), entry_points
    reqs = _requirements(meta)
    assert {"torch", "numpy"} == reqs[""]
    assert set(meta.get_all("Provides-Extra")) >= {*USER_EXTRAS, "all", "test"}
    for extra, packages in USER_EXTRAS.items():
        assert reqs[extra] == packages, extra
    everything = set().union(*USER_EXTRAS.values())
    assert reqs["all"] == everything  # what a user needs, not the test tools
    assert reqs["test"] >= TEST_TOOLS | everything


def test_wheel_installs_into_a_clean_venv_and_runs_the_demo(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip())
    # The dependencies come from the project venv, listed after the venv's own site-packages;
    # the .pth files there (the project's editable kvforge among them) are not processed.
    deps = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (site / "_project_dependencies.pth").write_text("".join(p + "\n" for p in deps))
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                        "-q", str(wheel)], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert r.returncode == 0, r.stderr[-3000:]

    work = tmp_path / "elsewhere"  # not the repository: only the installed kvforge is importable
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import kvforge; print(kvforge.__file__)"], capture_output=True,
                           text=True, cwd=work, env=_clean_env(), timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr

    script = venv / "bin" / "kvforge"
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=work,
                             env=_clean_env(), timeout=60)
    assert version.returncode == 0 and version.stdout == f"kvforge {kvforge.__version__}\n", version

    out = tmp_path / "demo"
    demo = subprocess.run([str(script), "demo", "--requests", "4", "--max-tokens", "4", "--out", str(out)],
                          capture_output=True, text=True, cwd=work, env=_clean_env(), timeout=300)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "output tokens/s" in demo.stdout and "KV cache memory profile" in demo.stdout
    wrote = re.findall(r"^wrote (.+\.png)$", demo.stdout, re.M)
    assert {Path(p).name for p in wrote} == {"block_map_peak.png", "compaction_before.png",
                                               "compaction_after.png", "compaction.png"}
    for p in wrote:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------- the Makefile
def test_make_reinstalls_when_torch_or_triton_change(tmp_path: Path) -> None:
    """``make test TORCH=...`` installs that torch even when the venv exists: the
    stamp depends on the TORCH/TRITON values. A fake venv python logs what make runs."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "log"
    fake = venv / "bin" / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    fake.chmod(0o755)

    def make(*assignments: str) -> list[str]:
        log.write_text("")
        subprocess.run(["make", "-s", "-C", str(REPO), "test", f"VENV={venv}", *assignments], check=True,
                       capture_output=True, text=True, timeout=60)
        return log.read_text().splitlines()

    tests = "-m pytest -q -x -p no:cacheprovider tests"
    first = make()
    assert "-m pip install -q torch==2.13.0" in first and "-m pip install -q triton==3.6.0 numpy<2.5" in first
    assert "-m pip install -q -e .[test]" in first and first[-1] == tests
    assert make() == [tests]  # nothing changed: nothing installed
    other = make("TORCH=torch==2.11.0")
    assert "-m pip install -q torch==2.11.0" in other and other[-1] == tests
    assert make("TORCH=torch==2.11.0") == [tests]
    assert "-m pip install -q triton==3.5.0 numpy<2.5" in make("TORCH=torch==2.11.0", "TRITON=triton==3.5.0")
    assert "-m pip install -q torch==2.13.0" in make()  # back to the defaults
