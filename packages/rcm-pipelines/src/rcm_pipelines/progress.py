"""Progress of long loops (generation, evaluation, dataset building, the recipes' demo): a tqdm bar on a
terminal, periodic plain lines with the rate and the ETA otherwise.

A batch scheduler writes the output to a file, where a bar becomes one endless line of carriage returns; so
unless the stream is a terminal, :class:`Progress` prints one line every ``interval_s`` seconds and one at the
end, each at most :data:`MAX_LINE` characters::

    rank 0 samples: 120/1000 (12%) | 0.85 sample/s | elapsed 2m21s | ETA 17m15s | loss=0.103

``RCM_PROGRESS=bar|lines|off`` forces a mode (default: bar on a terminal, lines otherwise) and
``RCM_PROGRESS_INTERVAL=<seconds>`` sets the line period. Training has its own console line
(:mod:`rcm_train.logging`, which cannot import this package).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, TextIO

__all__ = ["MAX_LINE", "Progress", "format_duration"]

MAX_LINE = 200
"""Longest plain progress line (longer postfixes are cut)."""

Mode = Literal["auto", "bar", "lines", "off"]


def format_duration(seconds: float) -> str:
    """``3725 -> '1h02m05s'``; ``inf``/NaN -> ``'?'``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _mode(mode: Mode | None, stream: TextIO) -> str:
    mode = mode or os.environ.get("RCM_PROGRESS", "auto") or "auto"
    if mode not in ("auto", "bar", "lines", "off"):
        raise ValueError(f"RCM_PROGRESS must be auto, bar, lines or off, got {mode!r}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        mode = "bar" if isatty is not None and isatty() else "lines"
    return mode


class Progress:
    """Progress over ``total`` items (a context manager): :meth:`update` after each, :meth:`close` at the end.

    ``postfix`` values (losses, ...) are shown after the counts. ``leave=False`` removes a finished bar (lines
    mode still prints the final line). ``disable=True`` shows nothing. ``clock`` is for tests.
    """

    def __init__(self, total: int | None, desc: str = "", *, unit: str = "it", initial: int = 0,
                 mode: Mode | None = None, interval_s: float | None = None, file: TextIO | None = None,
                 leave: bool = True, disable: bool = False, position: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._start_n = self._shown_n = initial
        self.file = file if file is not None else sys.stderr
        self.mode = "off" if disable else _mode(mode, self.file)
        env_interval = os.environ.get("RCM_PROGRESS_INTERVAL")
        self.interval_s = interval_s if interval_s is not None else float(env_interval) if env_interval else 30.0
        self._clock = clock
        self._t0 = self._t_last = clock()
        self._postfix: dict[str, str] = {}
        self._bar = None
        if self.mode == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:  # no tqdm: lines work everywhere
                self.mode = "lines"
            else:
                self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                                 mininterval=0.5, leave=leave, position=position, file=self.file)

    # ---------------------------------------------------------------------------------------------- updates
    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more items done; ``postfix`` replaces the shown values given under the same names."""
        self.n += n
        if postfix:
            self.set_postfix(**postfix)
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines":
            now = self._clock()
            if now - self._t_last >= self.interval_s or (self.total is not None and self.n >= self.total):
                self._print_line(now)

    def set_postfix(self, **postfix: Any) -> None:
        self._postfix.update({k: v if isinstance(v, str) else f"{v:.4g}" if isinstance(v, float) else str(v)
                              for k, v in postfix.items()})
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)

    def write(self, text: str) -> None:
        """A message line that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.file)
        elif self.mode != "off":
            print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and self.n != self._shown_n:
            self._print_line(self._clock())
        self.mode = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------- lines
    def line(self, now: float | None = None) -> str:
        """The plain progress line: count (and percent), rate, elapsed time, ETA, postfix; <= MAX_LINE chars."""
        now = self._clock() if now is None else now
        elapsed = now - self._t0
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        if self.total is None:
            eta = ""
        else:
            left = max(self.total - self.n, 0)
            eta = f" | ETA {format_duration(left / rate if rate > 0 else (0 if not left else math.inf))}"
        rate_s = f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}"
        text = f"{self.desc + ': ' if self.desc else ''}{count} | {rate_s} | elapsed {format_duration(elapsed)}{eta}"
        if self._postfix:
            text += " | " + " ".join(f"{k}={v}" for k, v in self._postfix.items())
        return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."

    def _print_line(self, now: float) -> None:
        print(self.line(now), file=self.file, flush=True)
        self._t_last, self._shown_n = now, self.n

