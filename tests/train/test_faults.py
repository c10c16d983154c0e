"""Fault injection on a tiny model trained by ``rcm_train.train``: kill -9 at varied points of several saves,
truncated checkpoints, a full disk, a read-only output directory, Ctrl-C during a save and NaN injection at a
chosen iteration. Each case asserts that nothing finished is lost (``latest`` names the last complete
checkpoint, a resume ends bit-identical to an uninterrupted run, ``metrics.jsonl`` holds each iteration once)
and that the error is named. See docs/reliability.md."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcm_train.checkpoint import Checkpointer, load_part
from rcm_train.safety import CheckpointError, NonFiniteError

MAX_ITER = 6


def subprocess_env() -> dict[str, str]:
    """The environment of worker processes (one thread each; tests/train/conftest.py has the same helper, but
    `conftest` is ambiguous when tests/train runs together with other test directories)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

WORKER = r'''
"""python worker.py RUN_DIR MAX_ITER [--kill=POINT:ITER] [--nan-at=IT]: train the tiny model, checkpoint every
iteration; optionally SIGKILL itself at POINT of the save of iteration ITER (data: while writing the data files;
metadata: data written, metadata not; rename: directory renamed, latest not moved; latest: latest moved, old
checkpoints not pruned; step: inside the training step of iteration ITER)."""
import os, signal, sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter

import rcm_train.checkpoint as ckpt_mod
from rcm_train.logging import LoggerConfig, MetricsLogger
from rcm_train.trainer import OptimizerConfig, TrainConfig, TrainParts, build_optimizer, build_scheduler, train


class Data:
    """An endless stream of 4-vectors with a checkpointed position (a plain number)."""
    def __init__(self):
        self.pos = 0
    def __iter__(self):
        while True:
            self.pos += 1
            yield torch.sin(torch.arange(4.0) + self.pos)
    def state_dict(self):
        return {"pos": self.pos}
    def load_state_dict(self, state):
        self.pos = int(state["pos"])


class Fit:
    def __init__(self, nan_at, kill_step):
        self.nan_at, self.kill_step = nan_at, kill_step
    def closures(self, models, batch, ctx):
        if ctx.iteration == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        net = models["student"]
        noise = torch.randn(2, 4, generator=ctx.generator)
        scale = float("nan") if ctx.iteration == self.nan_at else 1.0
        return {"fit": lambda: (scale * ((net(batch + noise) - batch) ** 2).mean(-1), {})}


def main():
    run_dir, max_iter = Path(sys.argv[1]), int(sys.argv[2])
    opts = dict(a[2:].split("=", 1) for a in sys.argv[3:])
    point, at = opts.get("kill", "none:-1").split(":")
    count = {"n": 0}

    def killer(original, name):
        def wrapped(*args, **kwargs):
            if name == point and ckpt_iteration["it"] == int(at):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return wrapped

    ckpt_iteration = {"it": -1}
    save = ckpt_mod.Checkpointer.save
    def tracking_save(self, iteration, state):
        ckpt_iteration["it"] = iteration
        return save(self, iteration, state)
    ckpt_mod.Checkpointer.save = tracking_save
    FileSystemWriter.write_data = killer(FileSystemWriter.write_data, "data")
    FileSystemWriter.finish = killer(FileSystemWriter.finish, "metadata")
    ckpt_mod._write_atomic = killer(ckpt_mod._write_atomic, "rename")
    ckpt_mod.Checkpointer._prune = killer(ckpt_mod.Checkpointer._prune, "latest")

    torch.manual_seed(0)
    student = nn.Linear(4, 4)
    ema = nn.Linear(4, 4).requires_grad_(False)
    ema.load_state_dict(student.state_dict())
    oc = OptimizerConfig(lr=1e-2, warmup_steps=2)
    opt = build_optimizer(student, oc)
    parts = TrainParts(models={"student": student}, optimizers={"student": opt},
                       schedulers={"student": build_scheduler(opt, oc)}, ema={"student": ema})
    cfg = TrainConfig(max_iter=max_iter, checkpoint_every=1, critic_models=[], ema_rate=0.1)
    logger = MetricsLogger(LoggerConfig(dir=str(run_dir / "logs"), every=1, console=False))
    train(parts, Fit(int(opts.get("nan-at", -1)), int(at) if point == "step" else -1), Data(), cfg,
          checkpointer=ckpt_mod.Checkpointer(run_dir / "ckpt", keep_last=2), logger=logger)


if __name__ == "__main__":
    main()
'''


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "worker.py"
    path.write_text(WORKER)
    return path


def _run(worker: Path, run_dir: Path, *args: str, max_iter: int = MAX_ITER) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(worker), str(run_dir), str(max_iter), *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def _final(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    latest = Checkpointer(run_dir / "ckpt").latest()
    return {part: load_part(latest, part) for part in ("student", "student_ema")}


def _iterations(run_dir: Path) -> list[int]:
    return [json.loads(s)["iteration"] for s in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


# (kill point, iteration of the save or step, latest after the kill), applied one after the other to one run
KILLS = [("metadata", 2, 1), ("rename", 3, 2), ("latest", 4, 4)]


def test_kill_9_at_varied_points_loses_nothing_finished(tmp_path, worker, straight):
    """A run killed three times by SIGKILL (after the checkpoint data before the metadata, between the
    directory rename and the `latest` update, after `latest` moved; the worker can also die inside a step), each time resumed
    in a fresh process: after each kill `latest` names the last complete checkpoint; the final weights and EMA
    equal an uninterrupted run's bit for bit and metrics.jsonl holds each iteration once."""
    for point, at, latest in KILLS:
        proc = _run(worker, tmp_path, f"--kill={point}:{at}")
        assert proc.returncode == -9, (point, proc.stdout[-2000:], proc.stderr[-2000:])
        assert Checkpointer(tmp_path / "ckpt").latest_iteration() == latest, point
    proc = _run(worker, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same(tmp_path, straight[1])
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.endswith(".partial")]  # later saves cleaned up


# ------------------------------------------------------------------------------------------ in-process faults
def _worker_namespace() -> dict:
    """The worker's definitions (Data, Fit) in this process."""
    namespace: dict = {}
    exec(compile(WORKER, "worker", "exec"), namespace)
    return namespace


def _train_in_process(ns, run_dir: Path, max_iter: int = MAX_ITER):
    from rcm_train.logging import LoggerConfig, MetricsLogger
    from rcm_train.trainer import (
        OptimizerConfig,
        TrainConfig,
        TrainParts,
        build_optimizer,
        build_scheduler,
        train,
    )

    torch.manual_seed(0)
    student = torch.nn.Linear(4, 4)
    ema = torch.nn.Linear(4, 4).requires_grad_(False)
    ema.load_state_dict(student.state_dict())
    oc = OptimizerConfig(lr=1e-2, warmup_steps=2)
    opt = build_optimizer(student, oc)
    parts = TrainParts(models={"student": student}, optimizers={"student": opt},
                       schedulers={"student": build_scheduler(opt, oc)}, ema={"student": ema})
    cfg = TrainConfig(max_iter=max_iter, checkpoint_every=1, critic_models=[], ema_rate=0.1)
    logger = MetricsLogger(LoggerConfig(dir=str(run_dir / "logs"), every=1, console=False))
    return train(parts, ns["Fit"](-1, -1), ns["Data"](), cfg, checkpointer=Checkpointer(run_dir / "ckpt"),
                 logger=logger)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    ns = _worker_namespace()
    run = tmp_path_factory.mktemp("straight")
    _train_in_process(ns, run)
    return ns, _final(run)


def _same(run: Path, expect) -> None:
    got = _final(run)
    assert all(torch.equal(got[p][k], expect[p][k]) for p in expect for k in expect[p])
    assert _iterations(run) == list(range(1, MAX_ITER + 1))


def test_truncated_latest_checkpoint_falls_back_and_resumes(tmp_path, straight):
    ns, expect = straight
    _train_in_process(ns, tmp_path, max_iter=4)
    data = tmp_path / "ckpt" / "iter_000000004" / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"iter_000000004 is unreadable .*falling back to .*iter_000000003"):
        _train_in_process(ns, tmp_path)
    _same(tmp_path, expect)


def test_full_disk_and_read_only_dir_are_named_and_resume(tmp_path, straight, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import FileSystem

    ns, expect = straight
    real_write = FileSystemWriter.write_data

    def full_at_4(self, plan, planner):
        if str(self.path).endswith("iter_000000004.partial"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, plan, planner)

    with monkeypatch.context() as mp:
        mp.setattr(FileSystemWriter, "write_data", full_at_4)
        with pytest.raises(CheckpointError, match=r"no space left on device \(ENOSPC\) while writing checkpoint "
                                                  r".*iter_000000004.partial.*previous checkpoint is intact"):
            _train_in_process(ns, tmp_path)
    assert Checkpointer(tmp_path / "ckpt").latest_iteration() == 3

    def read_only(self, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    with monkeypatch.context() as mp:
        mp.setattr(FileSystem, "mkdir", read_only)
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*iter_000000004.partial: Read-only "
                                                  r"file system"):
            _train_in_process(ns, tmp_path)
    assert Checkpointer(tmp_path / "ckpt").latest_iteration() == 3
    _train_in_process(ns, tmp_path)
    _same(tmp_path, expect)


def test_ctrl_c_during_a_save_says_which_checkpoint_a_resume_uses(tmp_path, straight, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    from rcm_train.trainer import TrainingInterrupted

    ns, expect = straight
    real_finish = FileSystemWriter.finish

    def ctrl_c_at_3(self, metadata, results):
        if str(self.path).endswith("iter_000000003.partial"):
            raise KeyboardInterrupt
        return real_finish(self, metadata, results)

    with monkeypatch.context() as mp:
        mp.setattr(FileSystemWriter, "finish", ctrl_c_at_3)
        with pytest.raises(TrainingInterrupted, match=r"interrupted at iteration 3; a resume will use "
                                                      r".*iter_000000002 \(iteration 2\)"):
            _train_in_process(ns, tmp_path)
    assert Checkpointer(tmp_path / "ckpt").latest_iteration() == 2
    _train_in_process(ns, tmp_path)
    _same(tmp_path, expect)


def test_nan_weights_loaded_are_refused(tmp_path, straight):
    ns, _ = straight
    _train_in_process(ns, tmp_path, max_iter=2)
    import torch.distributed.checkpoint as dcp

    ck = Checkpointer(tmp_path / "ckpt")
    sd = {f"student.{k}": v for k, v in load_part(ck.latest(), "student").items()}
    sd["student.weight"][0, 0] = float("inf")
    dcp.save(sd, checkpoint_id=tmp_path / "bad", no_dist=True)
    with pytest.raises(NonFiniteError, match=r"weight 'weight' \(part 'student' of checkpoint .*bad\)"):
        load_part(tmp_path / "bad", "student")


def test_nan_at_a_chosen_iteration_stops_named_and_keeps_finite_checkpoints(tmp_path, straight, monkeypatch,
                                                                           capsys):
    """Through the entry points' error handler: one line naming iteration, network and quantity, exit 1; the
    checkpoints of the iterations before it stay, all finite, and nothing is written after it."""
    from rcm_recipes.config import run_main

    ns, _ = straight
    monkeypatch.setattr(ns["Fit"], "__init__", lambda self, nan_at, kill: setattr(self, "nan_at", 3) or
                        setattr(self, "kill_step", -1))
    monkeypatch.setattr("sys.argv", ["train.py"])
    monkeypatch.delenv("RCM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: _train_in_process(ns, tmp_path))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and err == ("train.py: error: non-finite value in the loss 'fit/loss' (nan) "
                                             "(iteration 3, network 'student')")
    ck = Checkpointer(tmp_path / "ckpt")
    assert ck.latest_iteration() == 3 and [p.name for p in ck.complete()][0] == "iter_000000003"
    assert all(torch.isfinite(v).all() for part in _final(tmp_path).values() for v in part.values())
    assert _iterations(tmp_path) == [1, 2, 3]
