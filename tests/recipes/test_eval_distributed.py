"""eval_vbench sampling on two spawned ranks (gloo process group, file:// rendezvous): each rank takes a disjoint
slice of the prompt list, together they cover it, and every video appears exactly once in the VBench layout."""

import json

import eval_vbench
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rcm_pipelines.testing import write_tiny_assets
from rcm_recipes.config import resolve_config

PROMPTS = ["a red car drives at night", "a cat runs across the field", "birds flying under blue sky",
           "a dog runs over the green field", "camera pans across city street"]


def _rank(rank: int, world: int, init_file: str, argv: list[str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = eval_vbench.sample(resolve_config(eval_vbench.EvalVBenchConfig, argv))
        assert (res["rank"], res["world"]) == (rank, world)  # taken from the process group
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump({k: [str(p) for p in res[k]] for k in ("assigned", "written")}, fh)


@pytest.mark.slow
def test_two_ranks_split_the_prompts(tmp_path):
    assets = write_tiny_assets(tmp_path / "assets")
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps([{"prompt_en": p, "dimension": ["color"]} for p in PROMPTS]))
    out = tmp_path / "eval"
    argv = [*assets.component_flags(), "--dit.config=tiny", f"--dit.path={assets.t2v}", "--video.size=[32,32]",
            "--video.num_frames=5", "--device=cpu", f"--prompt_file={suite}", "--samples_per_prompt=1",
            f"--output_dir={out}", "--sampler.num_steps=1"]
    mp.spawn(_rank, args=(2, str(tmp_path / "rendezvous"), argv, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    a0, a1 = ({p.split("/")[-1] for p in g["assigned"]} for g in got)
    assert a0.isdisjoint(a1)
    assert a0 | a1 == {f"{p}-0.mp4" for p in PROMPTS}
    assert a0 == {f"{p}-0.mp4" for p in PROMPTS[0::2]}  # interleaved: rank r takes prompts r, r + 2, ...
    assert all(sorted(g["written"]) == sorted(g["assigned"]) for g in got)
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(a0 | a1)
