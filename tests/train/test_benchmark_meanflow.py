"""benchmarks/meanflow.py --tiny (CPU smoke run): both modes timed, the tangent-error table and the JSON."""

import importlib.util
import json
from pathlib import Path

import torch.distributed as dist

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "meanflow.py"


def test_meanflow_benchmark_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_meanflow", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "meanflow.json"
    try:
        res = module.main(["--tiny", "--fd-eps", "5e-3,1e-3", "--json", str(out)])
    finally:  # the benchmark opens a world of one; later tests open their own
        if dist.is_initialized():
            dist.destroy_process_group()
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["rows"]] == ["exact", "fd"] and all(r["ms"] > 0 for r in data["rows"])
    assert [e["fd_eps"] for e in data["tangent_error"]] == [5e-3, 1e-3]
    assert all(e["rel_l2"] > 0 and e["exact_rms"] > 0 for e in res["tangent_error"])
    assert data["meta"]["device"]
