"""Mesh layout for worlds larger than the test machine, with torch's fake process group (no communication):
HSDP x CP shapes, the rank layout megatron uses (CP groups = consecutive ranks), and argument errors."""

import pytest
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from rcm_train.parallel import build_mesh, mesh_from_megatron


@pytest.fixture
def fake_world():
    def init(rank, world):
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("rank, shape, expect", [
    # rank 5 of (2, 2, 2): coordinates (1, 0, 1)
    (5, (2, 2, 2), dict(fsdp=[[0, 1, 2, 3], [4, 5, 6, 7]], dp=(2, 4), cp=(1, [4, 5]), dp_group=[1, 3, 5, 7])),
    # rank 6 of (1, 4, 2): coordinates (0, 3, 0); plain FSDP over shard x cp
    (6, (1, 4, 2), dict(fsdp=list(range(8)), dp=(3, 4), cp=(0, [6, 7]), dp_group=[0, 2, 4, 6])),
    # rank 3 of (4, 2, 1): HSDP without CP
    (3, (4, 2, 1), dict(fsdp=[[0, 1], [2, 3], [4, 5], [6, 7]], dp=(3, 8), cp=(0, [3]), dp_group=list(range(8)))),
])
def test_hsdp_cp_layout(fake_world, rank, shape, expect):
    fake_world(rank, 8)
    m = build_mesh(*shape)
    assert m.shape == shape and m.fsdp.mesh.tolist() == expect["fsdp"]
    assert (m.dp_rank, m.dp_size) == expect["dp"]
    assert (m.cp_rank, dist.get_process_group_ranks(m.cp_group)) == expect["cp"]
    assert dist.get_process_group_ranks(m.dp.get_group()) == expect["dp_group"]


def test_mesh_errors(fake_world):
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        build_mesh(1, 1, 1)
    fake_world(0, 8)
    with pytest.raises(ValueError, match="dp_replicate=3 x dp_shard=1 x cp=2 does not match the world size 8"):
        build_mesh(3, 1, 2)
    with pytest.raises(ValueError, match="not divisible by dp_replicate\\*cp = 6"):
        build_mesh(3, -1, 2)


def test_megatron_is_optional():
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install megatron-core"):
            mesh_from_megatron()
    else:
        pytest.skip("megatron-core installed: covered by the host project's own setup")
