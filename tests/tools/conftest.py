"""Tool tests import the scripts of `tools/` (and `rcm_recipes` from `recipes/`): neither is installed."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for d in (ROOT / "tools", ROOT / "recipes"):
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """These tensors are tiny: on the shared 2-core CI box, intra-op threads only add contention (10x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
