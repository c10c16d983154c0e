"""rcm_train.runtime: the launch rank / world from torchrun's variables, the default process group opened and
torn down by ``process_group`` (kept when the caller opened it), rank-0 printing."""

import pytest
import torch
import torch.distributed as dist

from rcm_train.runtime import is_rank0, launch_rank_world, print0, process_group

CPU = torch.device("cpu")


def test_launch_rank_world_reads_torchrun_variables(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_rank_world() == (0, 1)  # a single process
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch_rank_world() == (3, 4)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match=r"RANK=4 must lie in \[0, WORLD_SIZE=4\)"):
        launch_rank_world()


def test_process_group_is_opened_for_the_block_and_closed_after(capsys):
    assert not dist.is_initialized()
    with process_group(CPU):
        assert dist.is_initialized() and dist.get_backend() == "gloo" and is_rank0()
        assert launch_rank_world() == (0, 1)
        with process_group(CPU):  # nested: the outer block owns the group
            pass
        assert dist.is_initialized()
        print0("from rank 0")
    assert not dist.is_initialized()
    assert capsys.readouterr().out == "from rank 0\n"
