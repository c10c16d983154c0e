"""Progress: a bar on a terminal, periodic plain lines with rate and ETA otherwise (batch logs), and the recipes'
progress logger (curves)."""

import io
import os
import subprocess
import sys
import textwrap

import pytest

from rcm_pipelines.progress import MAX_LINE, Progress, format_duration
from rcm_recipes.progress import ProgressLogger


def test_progress_logger_records_curves():
    log = ProgressLogger("x", 3, disable=True)
    log.start(0, 3)
    for it in (1, 2, 3):
        log.log(it, {"scm/loss": float(it), "grad_norm/student": 1.0, "dmd/loss": float("nan")})
    log.close()
    assert log.curves == {"scm/loss": ([1, 2, 3], [1.0, 2.0, 3.0])}


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lines_every_interval_with_rate_and_eta():
    """10 items, 2 s each, a line every >= 5 s: after items 3 (6 s), 6 (12 s), 9 (18 s) and the last (20 s).
    Rate 0.5 item/s is printed as 2 s/item; ETA = items left x 2 s."""
    clock, out = _Clock(), io.StringIO()
    with Progress(10, "job", unit="item", mode="lines", interval_s=5.0, file=out, clock=clock) as bar:
        for _ in range(10):
            clock.t += 2.0
            bar.update(loss=0.25)
    lines = out.getvalue().splitlines()
    assert lines == [
        "job: 3/10 (30%) | 2 s/item | elapsed 6s | ETA 14s | loss=0.25",
        "job: 6/10 (60%) | 2 s/item | elapsed 12s | ETA 8s | loss=0.25",
        "job: 9/10 (90%) | 2 s/item | elapsed 18s | ETA 2s | loss=0.25",
        "job: 10/10 (100%) | 2 s/item | elapsed 20s | ETA 0s | loss=0.25",
    ]


def test_fast_rate_resume_and_long_postfix():
    clock, out = _Clock(), io.StringIO()
    bar = Progress(1000, "train", initial=400, mode="lines", interval_s=1.0, file=out, clock=clock)
    clock.t = 2.0
    bar.update(100, note="x" * 500)  # 100 items in 2 s since the resume point (400 does not count)
    bar.close()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("train: 500/1000 (50%) | 50 it/s | elapsed 2s | ETA 10s | note=xxx")
    assert len(line) == MAX_LINE and line.endswith("...")


def test_terminal_gets_a_bar_and_off_prints_nothing():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    with Progress(3, "bar", file=tty) as bar:
        bar.update(3)
    assert "\r" in tty.getvalue() and "3/3" in tty.getvalue()  # tqdm's bar
    quiet = io.StringIO()
    with Progress(3, "x", file=quiet, disable=True) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="RCM_PROGRESS must be"):
        Progress(3, file=quiet, mode="fancy")


def test_format_duration():
    assert [format_duration(s) for s in (5, 65, 3725, float("inf"))] == ["5s", "1m05s", "1h02m05s", "?"]


@pytest.mark.slow
def test_non_tty_run_prints_periodic_plain_lines(tmp_path):
    """Before: a non-terminal run got tqdm's carriage-return bar, one ~32 KB line in a batch log. Here the
    demo's logger and a plain Progress run with stderr piped (not a TTY)."""
    script = textwrap.dedent("""
        import time
        from rcm_recipes.progress import Progress, ProgressLogger
        log = ProgressLogger("rCM distillation", 40, keep=("loss", "g_norm"))
        log.start(0, 40)
        for it in range(1, 41):
            time.sleep(0.005)
            log.log(it, {"scm/loss": 1.0 / it, "dmd/loss": 0.5, "rcm/g_norm": 3.0, "nan_masked": 0})
        log.close()
        with Progress(20, "rank 0 samples", unit="sample") as bar:
            for _ in range(20):
                time.sleep(0.005)
                bar.update()
    """)
    env = {**os.environ, "RCM_PROGRESS_INTERVAL": "0.05", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("RCM_PROGRESS", None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    err = run.stderr
    assert "\r" not in err
    lines = err.splitlines()
    train = [s for s in lines if s.startswith("rCM distillation: ")]
    build = [s for s in lines if s.startswith("rank 0 samples: ")]
    assert len(train) >= 3 and len(build) >= 2, err  # periodic, not only the final one
    assert train[-1].startswith("rCM distillation: 40/40 (100%)") and build[-1].startswith("rank 0 samples: 20/20")
    for line in train + build:
        assert len(line) <= MAX_LINE and " | ETA " in line and ("/s |" in line or " s/" in line), line
    assert "scm=" in train[-1] and "rcm/g_norm=3" in train[-1]
