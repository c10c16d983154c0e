"""Checkpoint tools (``rcm_pipelines.tools``) tests."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every tools test runs on one thread (the root conftest's `one_thread`)."""
