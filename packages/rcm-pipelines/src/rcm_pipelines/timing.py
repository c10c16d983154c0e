"""Per-stage wall-clock timing that says exactly what each number covers.

    timer = StageTimer(device)
    with timer.stage("text encoder", "tokenize + umT5 forward of 3 prompts (weights already loaded)"):
        ...
    timer.report()

On CUDA every stage boundary synchronizes the device, so a stage's time includes the kernels it queued
and nothing of the next stage. Each stage prints one line when it ends; `report` prints the table again
with the end-to-end time since the timer was created.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

__all__ = ["StageTimer"]


@dataclass
class StageTimer:
    """Collects ``(name, what, seconds)`` of stages run under :meth:`stage`."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    verbose: bool = True
    stages: list[tuple[str, str, float]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        """Time the body as stage ``name``; ``what`` says what is inside it (printed with the time)."""
        self._sync()
        t0 = time.perf_counter()
        yield
        self._sync()
        dt = time.perf_counter() - t0
        self.stages.append((name, what, dt))
        if self.verbose:
            print(f"[time] {name}: {dt:.3f} s  ({what})", flush=True)

    def total(self) -> float:
        """Seconds since the timer was created (synchronized)."""
        self._sync()
        return time.perf_counter() - self.start

    def as_dict(self) -> dict[str, float]:
        """``{stage name: seconds}`` (stages of the same name summed) plus ``end_to_end``."""
        out: dict[str, float] = {}
        for name, _, dt in self.stages:
            out[name] = out.get(name, 0.0) + dt
        return {**out, "end_to_end": self.total()}

    def report(self, what_total: str) -> str:
        """A table of every stage and the end-to-end time (``what_total`` describes it); printed if verbose."""
        total = self.total()
        width = max([len(n) for n, _, _ in self.stages] + [len("end to end")])
        lines = ["timing (wall clock, device synchronized at every stage boundary):"]
        lines += [f"  {n:<{width}}  {dt:9.3f} s  {w}" for n, w, dt in self.stages]
        lines.append(f"  {'end to end':<{width}}  {total:9.3f} s  {what_total}")
        text = "\n".join(lines)
        if self.verbose:
            print(text, flush=True)
        return text
