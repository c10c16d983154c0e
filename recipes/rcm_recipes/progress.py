"""Progress and loss-curve recording for recipes that run `rcm_train.train`.

`ProgressLogger` has the logger interface `rcm_train.train` calls (`start`, `log`, `log_media`, `close`):
it advances a `rcm_pipelines.progress.Progress` every iteration (a bar on a terminal, periodic plain lines with
rate and ETA otherwise), shows the latest losses with it, and keeps every scalar it receives as a curve
(`curves`), which `writers.plot_curves` draws. It also counts the samples the losses masked to 0 for a NaN
(`nan_masked` of `rcm_train.train_step`) and the updates skipped for a non-finite value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from rcm_pipelines.progress import Progress

__all__ = ["Progress", "ProgressLogger"]


class ProgressLogger:
    """Progress over `total` iterations that records metrics as `{name: ([iteration], [value])}`.

    `keep` selects which metric names are recorded and shown (substring match; all when empty).
    Media are not written (the demo writes its own grids); `log_media` returns no paths.
    """

    def __init__(self, desc: str, total: int, *, keep: tuple[str, ...] = ("loss",), disable: bool = False):
        self.desc, self.total, self.keep = desc, total, keep
        self.curves: dict[str, tuple[list[int], list[float]]] = {}
        self._bar: Progress | None = None
        self.nan_masked = 0
        """Samples masked for a NaN so far (shown in the bar once non-zero)."""
        self.skipped_updates = 0
        """Updates skipped by ``on_nonfinite="skip"`` so far."""
        self._disable = disable

    def start(self, iteration: int, max_iter: int) -> None:
        self.total = max_iter
        self._bar = Progress(max_iter, self.desc, initial=iteration, disable=self._disable)

    def log(self, iteration: int, metrics: Mapping[str, float]) -> dict[str, float]:
        kept = {k: float(v) for k, v in metrics.items() if not self.keep or any(s in k for s in self.keep)}
        for name, value in kept.items():
            if math.isfinite(value):
                steps, values = self.curves.setdefault(name, ([], []))
                steps.append(iteration)
                values.append(value)
        self.nan_masked += int(metrics.get("nan_masked", 0))
        self.skipped_updates += int(metrics.get("skipped_update", 0))
        if self._bar is not None:
            postfix = {k.removesuffix("/loss"): f"{v:.3g}" for k, v in kept.items()}
            if self.nan_masked:
                postfix["nan_masked"] = str(self.nan_masked)
            if self.skipped_updates:
                postfix["skipped"] = str(self.skipped_updates)
            self._bar.set_postfix(**postfix)  # before the update: a plain line printed by it shows them
            self._bar.update(iteration - self._bar.n)
        return kept

    def log_media(self, iteration: int, media: Mapping[str, Tensor]) -> list[Path]:
        return []

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
