"""The repository stands alone: no tracked text file points to documents that live outside it (the internal
specification files the project was written from, or a sibling ``shared/`` folder)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PATTERN = re.compile(r"RCM_SPEC|CAUSAL_SPEC|WAN21\.md|DESIGN\.md|STYLE\.md|\.\./shared/")


def offenders(paths) -> list[str]:
    out = []
    for rel in paths:
        path = ROOT / rel
        if path.suffix not in {".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".json", ".cfg"} and path.name != "run":
            continue
        if path.resolve() == Path(__file__).resolve():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if PATTERN.search(line):
                out.append(f"{rel}:{i}: {line.strip()[:100]}")
    return out


def test_no_tracked_file_refers_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert len(files) > 100
    assert offenders(files) == []


def test_the_guard_sees_a_reference(tmp_path, monkeypatch):
    (tmp_path / "x.md").write_text("see CAUSAL_SPEC §4\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert offenders(["x.md"]) == ["x.md:1: see CAUSAL_SPEC §4"]
