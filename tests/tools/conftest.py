"""Tool tests import the scripts of `tools/` (and `rcm_recipes` from `recipes/`): neither is installed."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for d in (ROOT / "tools", ROOT / "recipes"):
    if str(d) not in sys.path:
        sys.path.insert(0, str(d))

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every tools test runs on one thread (the root conftest's `one_thread`)."""
