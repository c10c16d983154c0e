"""Metrics logging: window means to JSONL, a console line with it/s and ETA, media files, wandb guard."""

import json

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
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("it 4/10 | ") and " it/s | ETA " in out[-1] and "scm/loss=3.5" in out[-1]
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


def test_wandb_is_optional(tmp_path):
    pytest.importorskip("imageio")
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'rcm-train\[wandb\]'"):
            MetricsLogger(LoggerConfig(dir=str(tmp_path), wandb_mode="offline"))
    else:
        log = MetricsLogger(LoggerConfig(dir=str(tmp_path), wandb_mode="offline", every=1))
        log.log(1, {"a/loss": 1.0})
        log.close()


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
