"""Each package imports on its own and exposes a short public surface."""

import importlib

import pytest

PACKAGES = ["rcm_kernels", "rcm_nets", "rcm_losses", "rcm_train", "rcm_pipelines"]


@pytest.mark.parametrize("name", PACKAGES)
def test_package_imports_with_all(name):
    mod = importlib.import_module(name)
    assert isinstance(mod.__all__, list)
    for sym in mod.__all__:
        assert hasattr(mod, sym), f"{name}.__all__ names {sym!r} but the package does not define it"


def test_wan_lazy_exports_resolve():
    wan = importlib.import_module("rcm_nets.wan")
    for sym in wan.__all__:
        assert getattr(wan, sym) is not None
