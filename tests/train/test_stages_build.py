"""rcm_train.stages.build_network (meta -> parallelize -> to_empty -> full state dict) and publish: the built
network computes exactly what the reference module computes (float64, exact equality), with and without FSDP;
names that do not match, wrong shapes and non-persistent buffers are refused."""

import pytest
import torch
from torch import nn

from rcm_train.parallel import MeshConfig, ParallelConfig
from rcm_train.runtime import process_group
from rcm_train.stages import build_network, publish

CPU = torch.device("cpu")
EXACT = ParallelConfig(param_dtype=None, reduce_dtype=None)  # FSDP keeps float64: outputs compare exactly


class _Net(nn.Module):
    def __init__(self, width: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 3, dtype=torch.float64) for _ in range(2)])
        self.head = nn.Linear(3, width, dtype=torch.float64)

    def forward(self, x_bc):
        for block in self.blocks:
            x_bc = torch.tanh(block(x_bc))
        return self.head(x_bc)


class _WithTransient(_Net):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(2), persistent=False)


@pytest.fixture(scope="module")
def reference():
    return _Net().requires_grad_(False), torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_built_network_equals_the_reference_without_and_with_fsdp(reference):
    ref, x_bc = reference
    net = build_network(_Net, ref.state_dict(), mesh=None, parallel=EXACT, device=CPU, trainable=False)
    assert torch.equal(net(x_bc), ref(x_bc)) and not any(p.requires_grad for p in net.parameters())
    with process_group(CPU):
        fsdp = build_network(_Net, ref.state_dict(), mesh=MeshConfig().build(), parallel=EXACT, device=CPU,
                             trainable=True)
        assert type(fsdp).__name__ == "FSDP_Net"  # sharded by FSDP2 (world of one)
        assert torch.equal(fsdp(x_bc), ref(x_bc)) and all(p.requires_grad for p in fsdp.parameters())


def test_mismatched_state_dicts_and_transient_buffers_are_refused(reference):
    ref, _ = reference
    sd = ref.state_dict()
    missing = {k: v for k, v in sd.items() if k != "head.bias"}
    with pytest.raises(ValueError, match=r"1 missing \['head.bias'\], 0 unexpected"):
        build_network(_Net, missing, mesh=None, parallel=EXACT, device=CPU, trainable=True)
    with pytest.raises(ValueError, match=r"1 unexpected \['extra'\]"):
        build_network(_Net, {**sd, "extra": torch.zeros(1)}, mesh=None, parallel=EXACT, device=CPU, trainable=True)
    with pytest.raises(RuntimeError, match="head.weight"):  # a wrong shape is named by the loader
        build_network(lambda: _Net(width=5), sd, mesh=None, parallel=EXACT, device=CPU, trainable=True)
    with pytest.raises(ValueError, match=r"non-persistent buffers \['table'\]"):
        build_network(_WithTransient, sd, mesh=None, parallel=EXACT, device=CPU, trainable=True)


def test_publish_copies_the_final_weights_to_the_run_directory(tmp_path):
    src = tmp_path / "stage" / "student.safetensors"
    src.parent.mkdir()
    src.write_bytes(b"weights")
    copies = publish({"student": src, "causal_teacher": src}, tmp_path / "run")
    assert copies == {"student": tmp_path / "run" / "student.safetensors",
                      "causal_teacher": tmp_path / "run" / "causal_teacher.safetensors"}
    assert all(p.read_bytes() == b"weights" for p in copies.values())
