"""The folders are the layers: imports only point down, and the bookkeeping needs no torch.

Every module's imports (top level and inside functions) are parsed and held
against the layer table of ``docs/architecture.md``.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvforge"

#: layer -> rank; a module may import its own layer and layers of lower rank,
#: except that core and kernels are side by side and never import each other
RANK = {"config": 0, "core": 1, "kernels": 1, "storage": 2, "engine": 3, "integrations": 4, "tools": 5}
CONFIG_MODULES = {"kvforge.errors", "kvforge.config", "kvforge.model_shapes", "kvforge.units", "kvforge.presets"}
#: third-party imports a layer must never make
FORBIDDEN_EXTERNAL = {"core": {"torch", "triton"}, "config": {"triton"}}


def layer_of(module: str) -> str:
    if module in CONFIG_MODULES:
        return "config"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in RANK:
        return parts[1]
    raise AssertionError(f"module {module} belongs to no layer of the table")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the package
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "kvforge" or target.startswith("kvforge."):
                # ``from kvforge.x import y``: y may be a submodule (then it is what is imported)
                subs = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
                names = [a.name for a in node.names if not _is_module(f"{target}.{a.name}")]
                out += [(m, node.lineno) for m in subs]
                if names:
                    out.append((target, node.lineno))
            else:
                out.append((target, node.lineno))
    return out


def _is_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_module_belongs_to_a_layer() -> None:
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path) -> None:
    me = module_name(path)
    mine = layer_of(me)
    for target, line in imports_of(path):
        top = target.split(".")[0]
        assert top not in FORBIDDEN_EXTERNAL.get(mine, set()), \
            f"{path.relative_to(ROOT)}:{line}: the {mine} layer imports {target}"
        if top != "kvforge" or target == "kvforge":
            assert target != "kvforge" or mine == "tools", \
                f"{path.relative_to(ROOT)}:{line}: imports the package face (import the defining module)"
            continue
        theirs = layer_of(target)
        assert RANK[theirs] <= RANK[mine], \
            f"{path.relative_to(ROOT)}:{line}: {me} ({mine}) imports {target} ({theirs}), a layer above"
        if {mine, theirs} == {"core", "kernels"}:
            raise AssertionError(f"{path.relative_to(ROOT)}:{line}: {me} ({mine}) imports {target} ({theirs})")


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The parser finds imports inside functions and relative ones."""
    f = PACKAGE / "core" / "pool.py"
    found = {t for t, _ in imports_of(f)}
    assert "kvforge.errors" in found or "kvforge.core.ids" in found
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from kvforge.storage import KVCache\n    import torch\n")
    assert {t for t, _ in ast_imports(src)} == {"kvforge.storage", "torch"}


def ast_imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.lineno))
    return out


def test_core_imports_without_torch() -> None:
    """``import kvforge.core`` (and the package face's bookkeeping names) in a
    process where torch and triton cannot be imported at all."""
    code = textwrap.dedent("""
        import sys
        import importlib.abc

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "triton"):
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        import kvforge.core
        from kvforge import BlockPool, BlockManager, plan_compaction
        m = BlockManager(8, 4)
        r = m.add_sequence("a", list(range(9)))
        m.append_tokens_batch(["a"], 1, [9])
        assert m.block_table("a") == [0, 1, 2], m.block_table("a")
        m.free_sequence("a")
        m.check_invariants()
        assert BlockPool(4).allocate(2) == [0, 1]
        assert not any(k.split(".")[0] in ("torch", "triton") for k in sys.modules)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_face_names_resolve() -> None:
    """Every name in ``kvforge.__all__`` imports (lazily) and is the defining module's object."""
    import kvforge

    for name in kvforge.__all__:
        assert getattr(kvforge, name) is not None, name
    with pytest.raises(AttributeError):
        kvforge.no_such_name  # noqa: B018
