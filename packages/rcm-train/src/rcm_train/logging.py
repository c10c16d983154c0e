"""Training logs: a console progress line (it/s, ETA, losses), a JSONL metrics file, optional wandb, and
images / videos written as files.

All ranks call :meth:`MetricsLogger.log` (metrics are averaged over the logging window and, when a process
group is up, over ranks); only rank 0 prints and writes. After a resume, :meth:`MetricsLogger.start` drops the
``metrics.jsonl`` records past the restored iteration, so the file holds each iteration once. The console line
shows the samples the losses masked for a NaN in the window (``nan_masked=K/N``) and warns above
``nan_warn_fraction``. On a terminal (stdout a TTY) a status line with a bar, it/s and ETA is redrawn in place
between those lines; in a log (not a TTY, or ``RCM_PROGRESS=lines``) only the plain lines appear.

wandb (``wandb_mode`` offline/online): rank 0 opens the run in :meth:`MetricsLogger.start`, i.e. after the trainer
restored its checkpoint. The logger is a DCP Stateful part of the checkpoint (``{"wandb_run_id": str}``, a plain
string, the same on every rank): a resumed job reopens the same wandb run (``resume="allow"``, same id) instead of
starting a new one. ``wandb_group`` gathers the runs of one job (the staged driver: the run directory's name) and
``wandb_job_type`` names the part (the staged driver: the stage name).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

__all__ = ["LoggerConfig", "MetricsLogger", "format_duration", "write_media"]


class LoggerConfig(BaseModel):
    """Where and how often training metrics go."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    dir: str = "outputs/logs"
    """Directory of metrics.jsonl and media/."""
    every: int = Field(10, ge=1)
    """Print / write averaged metrics every this many iterations."""
    console: bool = True
    """Print a progress line (rank 0)."""
    reduce_across_ranks: bool = True
    """Average metrics over all ranks before logging (a collective: every rank must call log)."""
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"
    """Weights & Biases: disabled (default), offline (local files) or online. Needs the wandb extra."""
    wandb_project: str = "rcm"
    """wandb project name."""
    wandb_name: str | None = None
    """wandb run name (None: wandb picks one)."""
    wandb_group: str | None = None
    """wandb group of the runs of one job (None: no group; the staged driver uses the run directory's name)."""
    wandb_job_type: str | None = None
    """wandb job type (None: none; the staged driver sets the stage name)."""
    video_fps: int = Field(16, ge=1)
    """Frame rate of logged videos."""
    nan_warn_fraction: float = Field(0.05, ge=0, le=1)
    """Warn on the console when more than this fraction of a window's samples were masked for a NaN."""


def format_duration(seconds: float) -> str:
    """``3725 -> '1h02m05s'``; ``inf``/NaN -> ``'?'``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def write_media(path: Path, value: Tensor, *, fps: int = 16) -> Path:
    """Write a uint8 image ``[C, H, W]`` (``.png``) or video ``[C, T, H, W]`` (``.mp4``); C is 1 or 3. Returns
    the path written (suffix chosen from the rank). Float media are refused: the producer converts them (sample
    hooks use ``rcm_pipelines.video.to_uint8``), so there is one conversion and one rounding."""
    try:
        import imageio.v3 as iio
    except ImportError as e:
        raise ImportError("writing images/videos needs imageio: pip install imageio imageio-ffmpeg") from e
    if value.dim() not in (3, 4) or value.shape[0] not in (1, 3):
        raise ValueError(f"media must be an image [C, H, W] or a video [C, T, H, W] with C in (1, 3), "
                         f"got {tuple(value.shape)}")
    if value.dtype != torch.uint8:
        raise ValueError(f"media must be uint8 (convert [-1, 1] floats first), got {value.dtype}")
    arr = value.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dim() == 3:
        path = path.with_suffix(".png")
        iio.imwrite(path, arr.permute(1, 2, 0).squeeze(-1).numpy())
    else:
        path = path.with_suffix(".mp4")
        frames = arr.permute(1, 2, 3, 0).expand(-1, -1, -1, 3).contiguous().numpy()  # [T, H, W, 3]
        iio.imwrite(path, frames, extension=".mp4", plugin="FFMPEG", fps=fps, macro_block_size=1)
    return path


def _truncate_jsonl(path: Path, iteration: int) -> None:
    """Keep the records of ``path`` with ``iteration <= iteration`` (a torn last line is dropped too); atomic."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = int(json.loads(line)["iteration"]) <= iteration
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if not dropped:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _is_terminal() -> bool:
    """stdout is a terminal and ``RCM_PROGRESS`` (bar|lines|off, as the recipes' progress) does not say lines."""
    mode = os.environ.get("RCM_PROGRESS", "auto")
    if mode in ("lines", "off"):
        return False
    return mode == "bar" or (hasattr(sys.stdout, "isatty") and sys.stdout.isatty())


def _import_wandb(mode: str):
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"wandb_mode={mode!r} needs wandb: pip install 'rcm-train[wandb]' "
                          "(or set wandb_mode='disabled')") from e
    return wandb


class MetricsLogger:
    """Averages metrics over ``every`` iterations and reports them (console, JSONL, wandb)."""

    def __init__(self, config: LoggerConfig, *, run_config: Mapping[str, Any] | None = None):
        self.cfg = config
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.dir = Path(config.dir)
        self._sums: dict[str, float] = {}
        self._totals: dict[str, float] = {}  # nan_masked / nan_checked, summed (not averaged) over the window
        self._count = 0
        self._start_it = 0
        self._max_iter = 0
        self._t0 = self._t_last = time.perf_counter()
        self._it_last = 0
        self._jsonl = None
        self._wandb = None
        self._status = self.rank0 and config.console and _is_terminal()  # the in-place bar between report lines
        self._status_t = 0.0
        self._run_config = dict(run_config or {})
        self.wandb_run_id = ""
        """The wandb run's id ("" until :meth:`start` opens the run, or with wandb disabled); checkpointed."""
        if self.rank0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.dir / "metrics.jsonl", "a")
            if config.wandb_mode != "disabled":
                _import_wandb(config.wandb_mode)  # fail before training starts

    def state_dict(self) -> dict[str, Any]:
        """``{"wandb_run_id": str}``: the checkpoint part that lets a resume reopen the same wandb run."""
        return {"wandb_run_id": self.wandb_run_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        run_id = state["wandb_run_id"]
        if not isinstance(run_id, str):
            raise TypeError(f"logger state 'wandb_run_id' must be a string, got {type(run_id).__name__}")
        self.wandb_run_id = run_id

    def _open_wandb(self) -> None:
        """Open (or, with a restored id, resume) the wandb run; collective when a process group is up."""
        if self.cfg.wandb_mode == "disabled" or self._wandb is not None:
            return
        if not self.wandb_run_id:
            alphabet = string.ascii_lowercase + string.digits
            run_id = [f"{''.join(secrets.choice(alphabet) for _ in range(8))}"]
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.broadcast_object_list(run_id, src=0)  # one id on every rank: each saves it
            self.wandb_run_id = run_id[0]
        if self.rank0:
            wandb = _import_wandb(self.cfg.wandb_mode)
            self._wandb = wandb.init(mode=self.cfg.wandb_mode, project=self.cfg.wandb_project,
                                     name=self.cfg.wandb_name, group=self.cfg.wandb_group,
                                     job_type=self.cfg.wandb_job_type, id=self.wandb_run_id, resume="allow",
                                     dir=str(self.dir), config=self._run_config)

    def start(self, iteration: int, max_iter: int) -> None:
        """Mark the starting iteration (after a resume) for it/s and ETA; drop the JSONL records past it (the
        iterations a crash lost are run again and logged once)."""
        if self._jsonl is not None:
            self._jsonl.close()
            _truncate_jsonl(self.dir / "metrics.jsonl", iteration)
            self._jsonl = open(self.dir / "metrics.jsonl", "a")
        self._start_it = self._it_last = iteration
        self._max_iter = max_iter
        self._t0 = self._t_last = time.perf_counter()
        self._open_wandb()

    def log(self, iteration: int, metrics: Mapping[str, float]) -> dict[str, float] | None:
        """Add one iteration's metrics; every ``every`` iterations report their window mean (returned)."""
        self._open_wandb()  # no-op after start()
        for k, v in metrics.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
            if k in ("nan_masked", "nan_checked"):
                self._totals[k] = self._totals.get(k, 0.0) + float(v)
        self._count += 1
        if iteration % self.cfg.every != 0:
            if self._status:
                self._draw_status(iteration)
            return None
        keys = sorted(self._sums)
        values = [self._sums[k] / self._count for k in keys]
        if self.cfg.reduce_across_ranks and dist.is_initialized() and dist.get_world_size() > 1:
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            t = torch.tensor(values, dtype=torch.float64, device=device)
            dist.all_reduce(t)
            values = (t / dist.get_world_size()).tolist()
        mean = dict(zip(keys, values))
        totals, self._totals = self._totals, {}
        self._sums, self._count = {}, 0
        now = time.perf_counter()
        it_s = (iteration - self._it_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._it_last = now, iteration
        if self.rank0:
            self._report(iteration, mean, it_s, now, totals)
        return mean

    def _report(self, iteration: int, mean: Mapping[str, float], it_s: float, now: float,
                totals: Mapping[str, float] | None = None) -> None:
        elapsed = now - self._t0
        done = iteration - self._start_it
        eta = (self._max_iter - iteration) * elapsed / done if done > 0 else math.inf
        record = {"iteration": iteration, "time": time.time(), "it_per_s": it_s, **mean}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log({**mean, "it_per_s": it_s}, step=iteration)
        if self.cfg.console:
            if self._status:
                sys.stdout.write("\r\033[K")  # clear the status line; the report line takes its place
            shown = " ".join(f"{k}={v:.4g}" for k, v in mean.items() if k.endswith("loss") or k.startswith("lr/"))
            masked, checked = (totals or {}).get("nan_masked", 0.0), (totals or {}).get("nan_checked", 0.0)
            if checked:
                shown += f" nan_masked={masked:.0f}/{checked:.0f}"
            print(f"it {iteration}/{self._max_iter} | {it_s:.2f} it/s | ETA {format_duration(eta)} | {shown}",
                  flush=True)
            if checked and masked / checked > self.cfg.nan_warn_fraction:
                print(f"warning: {masked:.0f} of {checked:.0f} samples had a NaN and were masked to 0 in "
                      f"iterations {iteration - self.cfg.every + 1}-{iteration} (threshold "
                      f"{self.cfg.nan_warn_fraction:.0%}): the run may be diverging", flush=True)

    def log_media(self, iteration: int, media: Mapping[str, Tensor]) -> list[Path]:
        """Write each image/video to ``media/<name>_<iteration>.png|mp4`` (rank 0; also to wandb)."""
        if not self.rank0:
            return []
        paths = []
        for name, value in media.items():
            path = write_media(self.dir / "media" / f"{name}_{iteration:09d}", value, fps=self.cfg.video_fps)
            paths.append(path)
            if self._wandb is not None:
                import wandb

                item = wandb.Image(str(path)) if path.suffix == ".png" else wandb.Video(str(path))
                self._wandb.log({f"media/{name}": item}, step=iteration)
        return paths

    def _draw_status(self, iteration: int, width: int = 24) -> None:
        """Redraw ``it N/M [#####-----] 2.31 it/s | ETA 6m21s`` in place (at most 5 times a second)."""
        now = time.perf_counter()
        if now - self._status_t < 0.2:
            return
        self._status_t = now
        done, elapsed = iteration - self._start_it, now - self._t0
        eta = (self._max_iter - iteration) * elapsed / done if done > 0 else math.inf
        filled = min(width, int(width * iteration / self._max_iter)) if self._max_iter else 0
        sys.stdout.write(f"\r\033[Kit {iteration}/{self._max_iter} [{'#' * filled}{'-' * (width - filled)}] "
                         f"{done / max(elapsed, 1e-9):.2f} it/s | ETA {format_duration(eta)}")
        sys.stdout.flush()

    def close(self) -> None:
        if self._status and self._status_t:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

