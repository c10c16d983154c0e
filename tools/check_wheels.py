"""Build every package's wheel and install each one ALONE into an empty virtual environment with plain pip, then
import every module it ships. Prints a table; exits non-zero if any install or import fails.

    python tools/check_wheels.py                 # CI runs it through `uv run` (see .ci/run)

Internal dependencies (``rcm-kernels`` for ``rcm-nets``, ...) are found only among the freshly built wheels
(``--find-links``); third-party ones come from the package index like a user's install. torch counts as
preinstalled (as on a GPU machine): the running interpreter's torch and the distributions it requires are
exposed to each venv through a ``.pth`` file, so a 3 GB download is not repeated five times. Nothing else of
this environment is visible there, so an import that a package does not declare fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _torch_closure() -> set[str]:
    """torch and every distribution it requires (markers evaluated here), by canonical name."""
    seen, todo = set(), ["torch"]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        for req in map(Requirement, dist.requires or []):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _torch_dir(dest: Path) -> Path:
    """A folder of links to the top-level files of torch's distribution closure (code and ``.dist-info``)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in _torch_closure():
        dist = md.distribution(name)
        for f in dist.files or []:
            top = f.parts[0]
            src = Path(dist.locate_file(top))
            link = dest / top
            if top.endswith((".pth",)) or ".." in f.parts or link.exists() or not src.exists():
                continue
            link.symlink_to(src)
    return dest


def _modules(wheel: Path) -> list[str]:
    """Every importable module the wheel ships (``pkg/a/b.py`` -> ``pkg.a.b``)."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".py") and ".dist-info" not in n]
    mods = []
    for n in sorted(names):
        parts = n[:-3].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


_PROBE = """
import importlib, sys, traceback
bad = []
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception:
        bad.append(m + ": " + traceback.format_exc(limit=1).strip().splitlines()[-1])
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


def check(wheel: Path, dist_dir: Path, torch_dir: Path, work: Path, python: str) -> dict:
    name = wheel.name.split("-")[0].replace("_", "-")
    venv = work / name
    t0 = time.perf_counter()
    res = _run([python, "-m", "venv", str(venv)])
    if res.returncode:
        return dict(package=name, ok=False, error=res.stderr[-2000:])
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "_rcm_preinstalled_torch.pth").write_text(str(torch_dir) + "\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--find-links", str(dist_dir), str(wheel)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHONPATH"))}
    res = _run(pip, env=env)
    t_install = time.perf_counter() - t0
    if res.returncode:
        return dict(package=name, ok=False, install_s=t_install, error=(res.stdout + res.stderr)[-3000:])
    mods = _modules(wheel)
    res = _run([str(venv / "bin" / "python"), "-c", _PROBE, *mods], env=env,
               cwd=work)
    return dict(package=name, ok=res.returncode == 0, install_s=t_install, modules=len(mods),
                import_s=time.perf_counter() - t0 - t_install, error=(res.stdout + res.stderr)[-3000:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="check_wheels.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dist", help="folder of already built wheels (default: build them into a temp folder)")
    ap.add_argument("--python", default=sys.executable, help="interpreter the venvs are made from")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rcm_wheels_") as tmp:
        work = Path(tmp)
        dist_dir = Path(args.dist) if args.dist else work / "dist"
        if not args.dist:
            t = time.perf_counter()
            res = _run(["uv", "build", "--all-packages", "--wheel", "--out-dir", str(dist_dir)], cwd=ROOT)
            if res.returncode:
                print(res.stdout + res.stderr)
                return 1
            print(f"built wheels in {time.perf_counter() - t:.1f} s")
        wheels = sorted(dist_dir.glob("rcm_*.whl"))
        if len(wheels) < 5:
            print(f"expected 5 wheels, found {[w.name for w in wheels]}")
            return 1
        torch_dir = _torch_dir(work / "torch_site")
        rows = [check(w, dist_dir, torch_dir, work, args.python) for w in wheels]
    print(f"{'package':16} {'result':7} {'install s':>9} {'modules':>7} {'import s':>8}")
    for r in rows:
        print(f"{r['package']:16} {'ok' if r['ok'] else 'FAILED':7} {r.get('install_s', 0):9.1f} "
              f"{r.get('modules', 0):7d} {r.get('import_s', 0):8.1f}")
    for r in rows:
        if not r["ok"]:
            print(f"\n--- {r['package']} ---\n{r['error']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
