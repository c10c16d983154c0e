"""`rcm-losses` installs and imports on its own (torch is its only dependency)."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "packages" / "rcm-losses"


def _install_command(target: Path) -> list[str]:
    """pip of the running interpreter if it has one (a uv venv has none), else uv's pip, else pip on PATH."""
    args = ["install", "--no-deps", "--target", str(target), str(PKG)]
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip", *args]
    if shutil.which("uv"):
        return ["uv", "pip", *args, "--python", sys.executable]
    if shutil.which("pip"):
        return ["pip", *args]
    pytest.skip("no pip, uv pip or pip on PATH to install with")


@pytest.mark.slow
def test_pip_install_alone(tmp_path):
    target = tmp_path / "site"
    res = subprocess.run(_install_command(target), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, f"install failed:\n{res.stdout}\n{res.stderr}"
    assert (target / "rcm_losses" / "__init__.py").is_file()
    probe = (
        "import sys, rcm_losses\n"
        "print(rcm_losses.__file__)\n"
        "missing = [n for n in rcm_losses.__all__ if not hasattr(rcm_losses, n)]\n"
        "assert not missing, missing\n"
        "others = sorted(m for m in sys.modules if m.split('.')[0] in ('rcm_kernels', 'rcm_nets', 'rcm_train'))\n"
        "assert not others, others\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()).resolve().is_relative_to(target.resolve()), res.stdout
