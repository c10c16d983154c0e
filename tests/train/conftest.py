"""Shared setup of the rcm-train tests: one CPU thread per process, and the 2-rank gloo job.

Every distributed parity check runs in ONE 2-process job (``_train_dist_worker.py``; start-up dominates a
2-process run, ~10 s here), started once per session; the tests then read its per-rank results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every train test runs on one thread (the root conftest's `one_thread`)."""


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_ranks(script: Path, world: int, out_dir: Path, *args: str, timeout: float = 300) -> None:
    """Run ``script RANK WORLD INIT_FILE OUT_DIR *args`` as ``world`` processes; raise with their logs on failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    init = out_dir / "rendezvous"
    procs, logs = [], []
    for rank in range(world):
        log = open(out_dir / f"log{rank}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), str(rank), str(world), str(init), str(out_dir),
                                       *args], stdout=log, stderr=subprocess.STDOUT, env=subprocess_env()))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    if any(codes):
        text = "\n".join((out_dir / f"log{r}.txt").read_text()[-4000:] for r in range(world))
        raise RuntimeError(f"{script.name} failed with exit codes {codes}:\n{text}")


@pytest.fixture(scope="session")
def dist_results(tmp_path_factory) -> list[dict]:
    """``[rank0_results, rank1_results]`` of the shared 2-rank gloo job."""
    out = tmp_path_factory.mktemp("dist")
    run_ranks(HERE / "_train_dist_worker.py", 2, out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
