"""Scoring a folder of VBench videos with the `vbench` package, in its own Python environment.

`vbench` is an optional dependency that rcm does not install: vbench 0.1.5 pins ``transformers==4.33.2`` and
``numpy<2`` (rcm's environment has newer ones), several dimensions need detectron2, and at first use it
downloads about a dozen models (CLIP, ViCLIP, UMT, RAFT, AMT, MUSIQ, the LAION aesthetic head, GRiT,
Tag2Text, DINO, ...) into ``$VBENCH_CACHE_DIR`` (default ``~/.cache/vbench``). So `run_vbench` launches
`worker.py` with the interpreter named by ``ScoreSpec.python`` (a separate virtual environment is
the intended setup), under ``torch.distributed.run`` when ``gpus > 1``, and turns a missing package or a
failed run (typically: offline, models not cached) into an error that says what to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from ..config import PipelineConfig
from ..progress import Progress

__all__ = ["ScoreSpec", "VBenchUnavailableError", "VBenchRunError", "INSTALL_HINT", "check_vbench", "run_vbench",
           "worker_command"]

WORKER = Path(__file__).with_name("worker.py")

INSTALL_HINT = """\
Scoring needs the `vbench` package (an optional extra of rcm, not installed with it). vbench 0.1.5 pins
transformers==4.33.2 and numpy<2, so give it its own environment and point rcm at its interpreter:
    python -m venv ~/vbench-env
    ~/vbench-env/bin/pip install torch torchvision vbench==0.1.5
    ~/vbench-env/bin/pip install 'detectron2@git+https://github.com/facebookresearch/detectron2.git'
        (detectron2: only for object_class, multiple_objects, color and spatial_relationship)
    then add --score.python=~/vbench-env/bin/python
vbench downloads its models (CLIP, ViCLIP, UMT, RAFT, AMT, MUSIQ, LAION aesthetic, GRiT, Tag2Text, DINO, ...)
on first use into $VBENCH_CACHE_DIR (default ~/.cache/vbench): the first run needs network access, or a copy of
that folder from a machine that has run it (then also set --score.local=true)."""


class VBenchUnavailableError(RuntimeError):
    """The `vbench` package cannot be imported by the scoring interpreter; the message says how to install it."""


class VBenchRunError(RuntimeError):
    """vbench ran and failed (most often: offline and its models are not in the cache)."""


class ScoreSpec(PipelineConfig):
    """How the `vbench` package is run."""

    python: str | None = None
    """Interpreter of the environment that has vbench installed (None: this one)."""
    gpus: int = 1
    """GPUs vbench spreads each dimension's videos over (torch.distributed.run on this host)."""
    dimensions: list[str] = []
    """Dimensions to score (empty: every scored dimension of the suite)."""
    i2v_ratio: Literal["1-1", "8-5", "7-4", "16-9"] = "16-9"
    """I2V: which crop of the image suite the videos were made from (vbench compares frames to it)."""
    imaging_quality_preprocessing_mode: Literal["longer", "shorter", "shorter_centercrop", "None"] = "longer"
    """vbench's frame resizing before MUSIQ (imaging quality); 'longer' is vbench's default. Harnesses that
    differ here report different imaging-quality scores: it is recorded with the results."""
    local: bool = False
    """Load vbench's models from its cache only (offline machines with a filled cache)."""
    cache_dir: str | None = None
    """Sets VBENCH_CACHE_DIR for vbench (None: its default ~/.cache/vbench)."""
    timeout_s: float | None = None
    """Stop vbench after this many seconds (None: no limit)."""

    @field_validator("python", "cache_dir")
    @classmethod
    def _expand_user(cls, v: str | None) -> str | None:
        return None if v is None else str(Path(v).expanduser())  # "--score.python=~/x": no shell expands it


def _python(spec: ScoreSpec) -> str:
    return spec.python or sys.executable


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _env(spec: ScoreSpec) -> dict[str, str]:
    # Launched from rank 0 of a torchrun job, vbench must not inherit that job's world (it would wait for
    # ranks that never join); with score.gpus > 1, its own torch.distributed.run sets a new one.
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    if spec.cache_dir is not None:
        env["VBENCH_CACHE_DIR"] = str(Path(spec.cache_dir).expanduser())
    return env


def check_vbench(spec: ScoreSpec, suite: str = "t2v") -> str:
    """The vbench version importable by ``spec.python``; `VBenchUnavailableError` (with `INSTALL_HINT`) if none."""
    module = "vbench2_beta_i2v" if suite == "i2v" else "vbench"
    code = f"import importlib.metadata as m, {module}; print(m.version('vbench'))"
    try:
        res = subprocess.run([_python(spec), "-c", code], capture_output=True, text=True, env=_env(spec), timeout=600)
    except FileNotFoundError:
        raise VBenchUnavailableError(f"score.python={spec.python!r} is not an executable.\n{INSTALL_HINT}") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise VBenchUnavailableError(f"`import {module}` fails in {_python(spec)}: {last}\n{INSTALL_HINT}")
    return res.stdout.strip()


def worker_command(spec: ScoreSpec, *, suite: str, videos_dir: Path, info_json: Path, out_dir: Path,
                   dimensions: Sequence[str]) -> list[str]:
    """The command line that scores ``dimensions`` (one vbench ``evaluate`` per dimension)."""
    launcher = [_python(spec)]
    if spec.gpus > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.gpus}"]
    cmd = [*launcher, str(WORKER), f"--suite={suite}", f"--videos_path={videos_dir}", f"--info_json={info_json}",
           f"--output_path={out_dir}", f"--i2v_ratio={spec.i2v_ratio}",
           f"--imaging_quality_preprocessing_mode={spec.imaging_quality_preprocessing_mode}", "--dimension",
           *dimensions]
    return cmd + (["--local"] if spec.local else [])


_OFFLINE_SIGNS = ("wget", "urlopen", "URLError", "ConnectionError", "Temporary failure in name resolution",
                  "HTTPError", "Max retries exceeded", "Network is unreachable", "LocalEntryNotFoundError")


def _wait_with_progress(proc: subprocess.Popen, out_dir: Path, dimensions: Sequence[str],
                        timeout_s: float | None, poll_s: float = 5.0) -> int:
    """Wait for the vbench process (its exit status), showing the finished dimensions (their result files) as
    progress; past ``timeout_s`` (None: no limit) kill it and raise ``TimeoutExpired``."""
    done = lambda: sum((out_dir / f"{d}_eval_results.json").is_file() for d in dimensions)  # noqa: E731
    start = time.monotonic()
    with Progress(len(dimensions), "vbench dimensions", unit="dimension", initial=done()) as bar:
        while True:
            try:
                code = proc.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                code = None
            if done() > bar.n:
                bar.update(done() - bar.n)
            if code is not None:
                return code
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                proc.kill()
                proc.wait()
                raise subprocess.TimeoutExpired(proc.args, timeout_s)


def run_vbench(spec: ScoreSpec, *, suite: str, videos_dir: Path, info_json: Path, out_dir: Path,
               dimensions: Sequence[str]) -> Path:
    """Score ``videos_dir`` on ``dimensions``; vbench's ``<dimension>_eval_results.json`` files and the log
    ``vbench.log`` land in ``out_dir`` (returned). Raises `VBenchUnavailableError` / `VBenchRunError`."""
    version = check_vbench(spec, suite)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "vbench.log"
    cmd = worker_command(spec, suite=suite, videos_dir=videos_dir, info_json=info_json, out_dir=out_dir,
                         dimensions=dimensions)
    print(f"scoring with vbench {version}: {len(dimensions)} dimension(s), log {log}", flush=True)
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(spec))
        try:
            code = _wait_with_progress(proc, out_dir, dimensions, spec.timeout_s)
        except subprocess.TimeoutExpired:
            raise VBenchRunError(f"vbench did not finish within score.timeout_s={spec.timeout_s} s (log: {log}); "
                                 "finished dimensions are kept, a rerun resumes") from None
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        hint = ""
        if any(s in line for line in tail for s in _OFFLINE_SIGNS):
            hint = ("\nThis looks like a model download that failed: vbench fetches its models on first use into "
                    "$VBENCH_CACHE_DIR (default ~/.cache/vbench). Run once with network access, or copy that folder "
                    "from a machine that has it and set --score.local=true.")
        raise VBenchRunError(f"vbench exited with status {code} (log: {log}); last lines:\n  "
                             + "\n  ".join(tail) + hint + "\nFinished dimensions are kept; a rerun resumes.")
    return out_dir
