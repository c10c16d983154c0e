"""Fixtures shared by the recipe tests; a test module uses them by importing them into its namespace:
``from _fixtures import _one_thread, assets  # noqa: F401``."""

import pytest

from rcm_pipelines.testing import write_tiny_assets


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """The importing module runs on one thread (the root conftest's `one_thread`)."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny networks, tokenizer and prompts in the official file formats (``rcm_pipelines.testing``)."""
    return write_tiny_assets(tmp_path_factory.mktemp("tiny_assets"))
