"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this folder is on the
import path): random-weight Wan networks built the way training builds them, and a wall-clock step timer."""

from __future__ import annotations

import statistics
import time

import torch

from rcm_train.parallel import ParallelConfig, parallelize


def random_wan(cls, name: str, mesh, parallel: ParallelConfig, *, dtype: torch.dtype, precision: str, trainable: bool,
               seed: int, device: str):
    """A ``cls`` (WanDiT or a subclass) of config ``name`` with random weights: meta build, parallelize,
    materialize on ``device``, Wan init with a non-zero head (speed does not depend on the weights)."""
    from rcm_nets.wan import get_config

    with torch.device("meta"):
        net = cls(get_config(name, precision=precision), dtype=dtype)
    parallelize(net, mesh, parallel)
    net.to_empty(device=device)
    torch.manual_seed(seed)  # DTensor random init follows the global generator (same on every rank)
    net.init_weights()
    with torch.no_grad():
        net.head.head.weight.normal_(std=net.config.dim**-0.5)
    return net.requires_grad_(trainable)


def wall_time(fn, warmup: int, iters: int, cuda: bool) -> tuple[float, float | None]:
    """``(median ms, peak GiB)`` of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones (host wall clock
    with a device sync per call); on CPU (smoke runs) no memory figure."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
