"""Shared pytest setup: the `gpu` marker skips without CUDA; seeds are fixed per test."""

import os

import pytest
import torch

# Triton kernels run on CPU through the interpreter; it must be set before any kernel module imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run with -m gpu on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread while a module runs: its tensors are tiny, and on the shared 2-core CI machine
    more threads only add contention (OpenMP spin-waiting made such tests 10-100x slower under load).
    Areas opt in (an autouse fixture requesting it, or ``pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
