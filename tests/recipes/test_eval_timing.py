"""benchmarks/generation.py --tiny (CPU): every sampler reports every stage, and the figures nest as stated
(steps inside the sampler call, the three stages inside the end-to-end interval)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "generation.py"


@pytest.fixture(scope="module")
def generation():
    spec = importlib.util.spec_from_file_location("bench_generation", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_timing_figures(generation, tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "generation.json"
        generation.main(["--tiny", "--samplers", "rcm:2,euler:3,causal:2", "--iters", "1", "--warmup", "0",
                         "--json", str(out)])
    finally:
        torch.set_num_threads(n)
    result = json.loads(out.read_text())
    rows = {r["sampler"]: r for r in result["rows"]}
    assert list(rows) == ["rcm:2", "euler:3", "causal:2"]
    assert set(result["what"]) == {"text_encoder", "dit_step", "cache_refresh", "dit_total", "vae_decode",
                                   "end_to_end"}
    for name, r in rows.items():
        steps = int(name.split(":")[1])
        assert len(r["dit_step"]) == steps and all(s > 0 for s in r["dit_step"])
        assert r["text_encoder"] > 0 and r["vae_decode"] > 0
        # the end-to-end interval encloses the three stages (timer overhead only on top)
        assert r["end_to_end"] >= r["text_encoder"] + r["dit_total"] + r["vae_decode"]
        if name.startswith("causal"):
            # 9 frames -> 3 latent frames -> 3 blocks of 1; per block: 2 steps + 1 refresh pass (means over blocks)
            assert r["blocks"] == 3 and r["cache_refresh"] > 0
            assert r["blocks"] * (sum(r["dit_step"]) + r["cache_refresh"]) <= r["dit_total"]
        else:
            # bidirectional steps tile the sampler call: it adds only the initial noise draw
            assert sum(r["dit_step"]) <= r["dit_total"] <= sum(r["dit_step"]) + 0.05
    assert result["setup"]["frames"] == 9 and result["setup"]["tiny"] is True
