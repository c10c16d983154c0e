"""The dependency rules between the packages, read from every import with ``ast``:

    rcm_losses    -> torch and the standard library only
    rcm_kernels   -> none of ours
    rcm_nets      -> rcm_kernels
    rcm_train     -> rcm_losses, rcm_kernels
    rcm_pipelines -> rcm_nets, rcm_losses, rcm_kernels
    recipes, benchmarks, tools, tests -> anything installed

and nothing in the repository edits ``sys.path``.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"rcm_kernels", "rcm_nets", "rcm_losses", "rcm_train", "rcm_pipelines"}
ALLOWED = {
    "rcm_losses": {"rcm_losses"},
    "rcm_kernels": {"rcm_kernels"},
    "rcm_nets": {"rcm_nets", "rcm_kernels"},
    "rcm_train": {"rcm_train", "rcm_losses", "rcm_kernels"},
    "rcm_pipelines": {"rcm_pipelines", "rcm_nets", "rcm_losses", "rcm_kernels"},
}


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level module)`` of every absolute import in ``path`` (relative imports stay inside)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / "packages" / package.replace("_", "-") / "src" / package).rglob("*.py"))


def violations(package: str) -> list[str]:
    bad = []
    for f in _sources(package):
        for line, mod in _imports(f):
            ours_bad = mod in OURS and mod not in ALLOWED[package]
            foreign_in_losses = package == "rcm_losses" and mod not in OURS and mod != "torch" \
                and mod not in sys.stdlib_module_names and mod != "__future__"
            if ours_bad or foreign_in_losses:
                bad.append(f"{f.relative_to(ROOT)}:{line}: {package} may not import {mod}")
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_follow_the_layering(package):
    assert _sources(package), f"no sources found for {package}"
    assert violations(package) == []


def test_the_checker_catches_a_violation(tmp_path, monkeypatch):
    """The rule fires on a forbidden import (guards against a checker that never looks)."""
    src = tmp_path / "packages" / "rcm-losses" / "src" / "rcm_losses"
    src.mkdir(parents=True)
    (src / "bad.py").write_text("import numpy\nfrom rcm_nets.wan import WanDiT\nimport torch\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [v.split(": ", 1)[1] for v in violations("rcm_losses")] == \
        ["rcm_losses may not import numpy", "rcm_losses may not import rcm_nets"]


def _is_sys_path(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys"


def _edits_sys_path(tree: ast.AST) -> bool:
    """``sys.path.insert/append/extend(...)`` or an assignment to ``sys.path``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("insert", "append", "extend") and _is_sys_path(node.func.value):
            return True
        if isinstance(node, ast.Assign) and any(map(_is_sys_path, node.targets)):
            return True
    return False


def test_nothing_edits_sys_path():
    files = [f for d in ("packages", "recipes", "benchmarks", "tools", "tests") for f in (ROOT / d).rglob("*.py")]
    assert len(files) > 50
    offenders = [str(f.relative_to(ROOT)) for f in files if _edits_sys_path(ast.parse(f.read_text()))]
    assert offenders == []
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')\n"))
    assert _edits_sys_path(ast.parse("import sys\nsys.path = ['x']\n"))
    assert not _edits_sys_path(ast.parse("import os\nos.path.join('a', 'b')\n"))
