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


def help_lists(text: str, path: str) -> bool:
    """Whether ``--help`` ``text`` has a flag for the dotted field ``path``, written out or in brace form: a
    component ``stage2`` may stand as ``stage{1,2,3}`` and ``student`` as ``{student,fake_score,teacher}``."""
    import re

    parts = []
    for c in path.split("."):
        alts = [re.escape(c), r"\{(?:[^{}]*,)?" + re.escape(c) + r"(?:,[^{}]*)?\}"]
        m = re.fullmatch(r"(.*?)(\d+)", c)
        if m:
            alts.append(re.escape(m.group(1)) + r"\{(?:[^{}]*,)?" + m.group(2) + r"(?:,[^{}]*)?\}")
        parts.append("(?:" + "|".join(alts) + ")")
    return re.search(r"--" + r"\.".join(parts) + r"(?=[ \n])", text) is not None
