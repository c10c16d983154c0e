"""Mesh layout for worlds larger than the test machine, with torch's fake process group (no communication):
HSDP x CP shapes, the rank layout megatron uses (CP groups = consecutive ranks), and argument errors.

The megatron-core interop runs for real: one 2-process gloo job on CPU (this file is also its worker script,
``python test_train_mesh.py RANK WORLD INIT_FILE OUT_DIR``) initializes megatron's ``parallel_state`` twice
(CP = 2, then DP = 2), builds ``mesh_from_megatron`` each time and compares it with megatron's own group ranks
and with ``build_mesh`` of the same shape; a CP all-reduce checks the groups communicate. The tests read its
per-rank JSON. Megatron's import takes ~20 s per process here, hence ``slow``.
"""

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
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


def test_megatron_is_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron", None)  # as if megatron-core were not installed
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(ImportError, match="pip install megatron-core"):
        mesh_from_megatron()


# ------------------------------------------------------------------------ megatron-core, 2 gloo ranks on CPU
def _mesh_record(m) -> dict:
    """What a rank knows of a ParallelMesh (plain data for JSON)."""
    return {"shape": list(m.shape), "dp": [m.dp_rank, m.dp_size], "cp": [m.cp_rank, m.cp_size],
            "cp_group": dist.get_process_group_ranks(m.cp_group), "dp_group": dist.get_process_group_ranks(
                m.dp.get_group()), "fsdp": m.fsdp.mesh.tolist(), "world": m.world.mesh.tolist()}


def _megatron_worker(rank: int, world: int, init: str, out: Path) -> None:
    """One rank: every megatron check in one process group; writes ``out/rank{rank}.json``."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps

    results: dict = {}

    def check(name, fn):
        try:
            results[name] = {"ok": True, "value": fn()}
        except Exception as e:  # recorded, asserted by the test
            results[name] = {"ok": False, "err": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}

    def not_initialised():
        try:
            mesh_from_megatron(device_type="cpu")
        except RuntimeError as e:
            return str(e)
        return None

    check("not_initialised", not_initialised)
    for name, kw in (("cp2", dict(context_parallel_size=2)), ("dp2", dict())):
        ps.initialize_model_parallel(**kw)

        def layout():
            m = mesh_from_megatron(device_type="cpu")
            ref = build_mesh(1, -1, ps.get_context_parallel_world_size(), device_type="cpu")
            total = torch.tensor([float(rank + 1)])
            dist.all_reduce(total, group=m.cp_group)  # the CP group communicates
            return {"mesh": _mesh_record(m), "ref": _mesh_record(ref), "cp_sum": total.item(),
                    "megatron": {"dp": [ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()],
                                 "cp": [ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()],
                                 "cp_group": dist.get_process_group_ranks(ps.get_context_parallel_group()),
                                 "dp_group": dist.get_process_group_ranks(
                                     ps.get_data_parallel_group(with_context_parallel=False))}}

        check(name, layout)
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=2)

    def tp2():
        try:
            mesh_from_megatron(device_type="cpu")
        except ValueError as e:
            return str(e)
        return None

    check("tp2", tp2)
    ps.destroy_model_parallel()
    dist.barrier()
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def megatron_results(tmp_path_factory) -> list[dict]:
    """``[rank0, rank1]`` results of the one 2-process megatron job (this file as the worker script)."""
    pytest.importorskip("megatron.core")
    out = tmp_path_factory.mktemp("megatron")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}
    logs = [open(out / f"log{r}.txt", "w") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(out / "rendezvous"), str(out)],
                              stdout=logs[r], stderr=subprocess.STDOUT, env=env) for r in range(2)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    if any(codes):
        raise RuntimeError(f"megatron job failed {codes}:\n" + "\n".join(
            (out / f"log{r}.txt").read_text()[-3000:] for r in range(2)))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _value(results, rank, name):
    r = results[rank][name]
    assert r["ok"], r.get("tb", r)
    return r["value"]


@pytest.mark.slow
@pytest.mark.parametrize("case, dp, cp", [("cp2", 1, 2), ("dp2", 2, 1)])
def test_mesh_from_megatron_matches_its_groups_and_build_mesh(megatron_results, case, dp, cp):
    for rank in range(2):
        v = _value(megatron_results, rank, case)
        mesh, meg = v["mesh"], v["megatron"]
        assert mesh["shape"] == [1, dp, cp]
        assert mesh["dp"] == meg["dp"] and mesh["cp"] == meg["cp"]  # coordinates = megatron's ranks
        assert mesh["cp_group"] == meg["cp_group"] and mesh["dp_group"] == meg["dp_group"]
        assert mesh == v["ref"]  # the same mesh build_mesh makes for this shape (row-major, CP innermost)
        assert v["cp_sum"] == (3.0 if cp == 2 else rank + 1.0)  # 1 + 2 over the CP pair, else itself


@pytest.mark.slow
def test_mesh_from_megatron_errors(megatron_results):
    for rank in range(2):
        assert "not initialised" in _value(megatron_results, rank, "not_initialised")
        assert "tensor/pipeline model parallel size 1 only" in _value(megatron_results, rank, "tp2")


if __name__ == "__main__":
    _megatron_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
