"""Metrics logging: window means to JSONL, a console line with it/s and ETA, media files, wandb (offline: one
run per stage, grouped, its id checkpointed and reopened on resume)."""

import json
import re
import sys

import pytest
import torch

from rcm_train.logging import LoggerConfig, MetricsLogger, format_duration, write_media


def test_jsonl_console_and_media(tmp_path, capsys):
    log = MetricsLogger(LoggerConfig(dir=str(tmp_path), every=2))
    log.start(0, 10)
    for it in range(1, 5):
        log.log(it, {"scm/loss": float(it), "lr/student": 1e-3})
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [2, 4]
    assert [r["scm/loss"] for r in lines] == [1.5, 3.5]  # mean over each window of 2 iterations
    text = capsys.readouterr().out
    out = text.strip().splitlines()
    assert out[-1].startswith("it 4/10 | ") and " it/s | ETA " in out[-1] and "scm/loss=3.5" in out[-1]
    assert "\r" not in text and len(out) == 2  # not a terminal: the report lines only
    image = (torch.rand(3, 8, 8) * 255).to(torch.uint8)  # [C, H, W]
    video = (torch.rand(3, 5, 16, 16) * 255).to(torch.uint8)  # [C, T, H, W]
    paths = log.log_media(4, {"grid": image, "sample": video})
    assert [p.name for p in paths] == ["grid_000000004.png", "sample_000000004.mp4"]
    assert all(p.stat().st_size > 0 for p in paths)
    log.close()


def test_media_shape_error(tmp_path):
    with pytest.raises(ValueError, match=r"image \[C, H, W\] or a video \[C, T, H, W\]"):
        write_media(tmp_path / "x", torch.zeros(4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must be uint8"):
        write_media(tmp_path / "x", torch.zeros(3, 8, 8))


def test_wandb_is_optional(tmp_path, monkeypatch):
    """Without wandb installed, asking for it names the extra (the offline path is the resume test below)."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    with pytest.raises(ImportError, match=r"pip install 'rcm-train\[wandb\]'"):
        MetricsLogger(LoggerConfig(dir=str(tmp_path), wandb_mode="offline"))
    MetricsLogger(LoggerConfig(dir=str(tmp_path))).close()  # disabled: never imported


def test_format_duration():
    assert [format_duration(s) for s in (5, 65, 3725, float("inf"))] == ["5s", "1m05s", "1h02m05s", "?"]


def test_metrics_hold_each_iteration_once_after_a_resume(tmp_path):
    """Before: the iterations between the last checkpoint and a crash were appended a second time."""
    log = MetricsLogger(LoggerConfig(dir=str(tmp_path), every=1, console=False))
    log.start(0, 10)
    for it in range(1, 6):
        log.log(it, {"loss": float(it)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "lo')  # torn by a kill -9
    log = MetricsLogger(LoggerConfig(dir=str(tmp_path), every=1, console=False))
    log.start(3, 10)  # resumed from the checkpoint of iteration 3
    for it in range(4, 7):
        log.log(it, {"loss": 10.0 * it})
    log.close()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lines] == [1.0, 2.0, 3.0, 40.0, 50.0, 60.0]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb in offline mode writing under tmp_path (no network, no files outside the test)."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    return wandb


class _Fit:
    """Objective of the resume test: fits ``student.w`` to the batch."""

    def closures(self, models, batch, ctx):
        w = models["student"].w
        return {"fit": lambda: (((w - batch) ** 2).sum().reshape(1), {})}


class _W(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


def _offline_runs(root):
    """Ids of the offline runs wandb wrote under ``root`` (directories ``offline-run-<time>-<id>[-<n>]``, the
    suffix for a second session of one run in the same second)."""
    names = [p.name for p in root.rglob("offline-run-*") if p.is_dir()]
    return sorted(re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(-\d+)?", n).group(1) for n in names)


@pytest.mark.slow  # the first wandb.init of a process starts wandb's service (~15 s on 2 busy cores)
def test_wandb_run_id_is_checkpointed_and_reused_on_resume(tmp_path, offline_wandb):
    """Before: every (re)start opened a new wandb run, with no group and no job type."""
    from rcm_train.checkpoint import Checkpointer
    from rcm_train.trainer import OptimizerConfig, TrainConfig, TrainParts, build_optimizer, train

    def parts():
        p = TrainParts(models={"student": _W()}, optimizers={}, ema={})
        p.optimizers["student"] = build_optimizer(p.models["student"], OptimizerConfig(lr=0.1, warmup_steps=0))
        return p

    cfg = LoggerConfig(dir=str(tmp_path / "logs"), every=1, console=False, wandb_mode="offline",
                       wandb_group="job-1", wandb_job_type="stage_a")
    ck = Checkpointer(tmp_path / "ckpt")
    data = lambda: iter(lambda: torch.ones(3), None)  # noqa: E731
    first = MetricsLogger(cfg)
    train(parts(), _Fit(), data(), TrainConfig(max_iter=2, checkpoint_every=1, critic_models=[]),
          checkpointer=ck, logger=first)
    run_id = first.wandb_run_id
    assert len(run_id) == 8 and run_id.isalnum()
    # the id is in the checkpoint as a plain string, read back by the safe (weights_only) loader
    probe = MetricsLogger(LoggerConfig(dir=str(tmp_path / "probe"), console=False))
    ck.load({"logger": probe})
    assert probe.wandb_run_id == run_id
    probe.close()

    resumed = MetricsLogger(cfg)  # a new process would start here: the id comes from the checkpoint
    state = train(parts(), _Fit(), data(), TrainConfig(max_iter=4, checkpoint_every=1, critic_models=[]),
                  checkpointer=ck, logger=resumed)
    assert state.iteration == 4 and resumed.wandb_run_id == run_id
    assert _offline_runs(tmp_path / "logs") == [run_id, run_id]  # two sessions of ONE run
    other = MetricsLogger(cfg.model_copy(update=dict(dir=str(tmp_path / "other"))))
    other.start(0, 1)
    assert other.wandb_run_id not in ("", run_id)  # a fresh job (no checkpoint) gets a new run
    assert (other._wandb.group, other._wandb.job_type) == ("job-1", "stage_a")
    other.close()



def test_a_checkpoint_without_the_logger_part_still_resumes(tmp_path):
    """Checkpoints written before the logger part existed load with a MetricsLogger attached."""
    from rcm_train.checkpoint import Checkpointer
    from rcm_train.trainer import OptimizerConfig, TrainConfig, TrainParts, build_optimizer, train

    parts = TrainParts(models={"student": _W()}, optimizers={}, ema={})
    parts.optimizers["student"] = build_optimizer(parts.models["student"], OptimizerConfig(lr=0.1, warmup_steps=0))
    ck = Checkpointer(tmp_path / "ckpt")
    data = lambda: iter(lambda: torch.ones(3), None)  # noqa: E731
    train(parts, _Fit(), data(), TrainConfig(max_iter=2, checkpoint_every=2, critic_models=[]), checkpointer=ck)
    log = MetricsLogger(LoggerConfig(dir=str(tmp_path / "logs"), every=1, console=False))
    state = train(parts, _Fit(), data(), TrainConfig(max_iter=3, checkpoint_every=1, critic_models=[]),
                  checkpointer=ck, logger=log)
    assert state.iteration == 3 and log.wandb_run_id == ""
    probe = MetricsLogger(LoggerConfig(dir=str(tmp_path / "probe"), console=False))
    ck.load({"logger": probe})  # the new checkpoint has the part
    probe.close()


def test_terminal_gets_a_status_line_between_reports(tmp_path, monkeypatch):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    monkeypatch.delenv("RCM_PROGRESS", raising=False)
    clock = iter(float(i) for i in range(100))
    monkeypatch.setattr("rcm_train.logging.time.perf_counter", lambda: next(clock))  # 1 s per call
    log = MetricsLogger(LoggerConfig(dir=str(tmp_path), every=4))
    log.start(0, 8)
    for it in range(1, 9):
        log.log(it, {"a/loss": 1.0})
    log.close()
    text = tty.getvalue()
    assert "\r\033[Kit 1/8 [###---------------------] " in text and " it/s | ETA " in text  # the bar
    lines = [s.split("\r\033[K")[-1] for s in text.split("\n")]  # what stays on screen
    lines = [s for s in lines if s]
    assert [s.split(" | ")[0] for s in lines] == ["it 4/8", "it 8/8"]  # the report lines are kept
    monkeypatch.setenv("RCM_PROGRESS", "lines")
    assert not MetricsLogger(LoggerConfig(dir=str(tmp_path / "b")))._status
