"""The resume scenario of test_train_checkpoint.py: tiny WanDiT teacher / student / fake score / EMA trained
with the rCM objective from webdataset shards, checkpointing every 3 iterations.

In-process ``run(...)``; as a script (the "fresh process"): ``python _train_resume.py RUN_DIR DATA_DIR
MAX_ITER [--kill-next-save]``: resume from RUN_DIR's latest checkpoint, train to MAX_ITER, then optionally
start one more save and SIGKILL itself in the middle of it (after the data files, before the metadata).
"""

from __future__ import annotations

import copy
import os
import signal
import sys
from pathlib import Path

import torch

from rcm_nets.wan import WanDiT
from rcm_train.checkpoint import Checkpointer
from rcm_train.data import DataConfig, ShardLoader, ShardWriter
from rcm_train.logging import LoggerConfig, MetricsLogger
from rcm_train.objectives import RCMObjective, RCMObjectiveConfig
from rcm_train.trainer import (
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    TrainParts,
    build_optimizer,
    build_scheduler,
    train,
)

PARTS = ("student", "fake_score", "student_ema", "student_optim", "fake_score_optim")


def tiny_teacher(seed: int = 0) -> WanDiT:
    net = WanDiT.from_config("tiny")
    net.init_weights(torch.Generator().manual_seed(seed))
    torch.nn.init.normal_(net.head.head.weight, std=0.05, generator=torch.Generator().manual_seed(seed + 1))
    return net.requires_grad_(False)


def write_data(out: Path, n: int = 8, per_shard: int = 2) -> None:
    g = torch.Generator().manual_seed(0)
    with ShardWriter(out, n, per_shard) as w:
        for i in w.pending():
            w.write(i, torch.randn(16, 2, 8, 8, generator=g), torch.randn(16, 32, generator=g), f"prompt {i}")


def build(run_dir: Path, data_dir: Path, max_iter: int):
    teacher = tiny_teacher()
    student, fake = copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)
    parts = TrainParts(models={"student": student, "teacher": teacher, "fake_score": fake}, optimizers={},
                       ema={"student": copy.deepcopy(teacher)})
    for name, lr in (("student", 3e-4), ("fake_score", 1e-4)):
        oc = OptimizerConfig(lr=lr, warmup_steps=4)
        parts.optimizers[name] = build_optimizer(parts.models[name], oc)
        parts.schedulers[name] = build_scheduler(parts.optimizers[name], oc)
    objective = RCMObjective(RCMObjectiveConfig(input_dtype="float32", timestep_dtype=None, guidance=2.0),
                             negative_embed=torch.randn(16, 32, generator=torch.Generator().manual_seed(9)))
    data = ShardLoader(DataConfig(shards=str(data_dir / "shard_*.tar"), batch_size=1, num_workers=1,
                                  shuffle_buffer=3))
    config = TrainConfig(max_iter=max_iter, checkpoint_every=3, ema_rate=0.1,
                         schedule=ScheduleConfig(tangent_warmup=2, student_update_freq=2))
    return parts, objective, data, config


def run(run_dir: Path, data_dir: Path, max_iter: int) -> tuple[TrainParts, Checkpointer]:
    parts, objective, data, config = build(run_dir, data_dir, max_iter)
    checkpointer = Checkpointer(run_dir / "ckpt")
    logger = MetricsLogger(LoggerConfig(dir=str(run_dir / "logs"), every=1, console=False))
    state = train(parts, objective, data, config, checkpointer=checkpointer, logger=logger)
    return parts, checkpointer, state


def _kill_during_next_save(parts: TrainParts, checkpointer: Checkpointer, iteration: int) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    def finish(self, *args, **kwargs):  # data files are written; the metadata would come now
        os.kill(os.getpid(), signal.SIGKILL)

    FileSystemWriter.finish = finish
    checkpointer.save(iteration, parts.checkpoint_state())


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_dir, data_dir, max_iter = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    parts, checkpointer, state = run(run_dir, data_dir, max_iter)
    if "--kill-next-save" in sys.argv:
        _kill_during_next_save(parts, checkpointer, state.iteration + 1)
