"""benchmarks/kv_cache.py --smoke (CPU): the format table and the long-run rows per extrapolation policy."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kv_cache.py"


@pytest.mark.slow  # ~10 s of CPU (more on a shared machine)
def test_kv_cache_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_kv_cache", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "kv.json"
    module.main(["--smoke", "--json", str(out)])
    data = json.loads(out.read_text())
    fmt = {r["format"]: r for r in data["rows"] if r["table"] == "formats"}
    assert list(fmt) == [name for name, _ in module.FORMATS]
    assert fmt["bfloat16"]["vs_bf16"] == 1 and fmt["int4/64"]["vs_bf16"] < fmt["int8"]["vs_bf16"] < 1
    # error grows as bits shrink (Gaussian data): bf16 < int8 < fp8 < int4
    errs = [fmt[k]["rel_err_gauss"] for k in ("bfloat16", "int8", "fp8", "int4/64")]
    assert errs == sorted(errs) and errs[-1] < 0.3
    runs = {r["policy"]: r for r in data["rows"] if r["table"] == "long_run"}
    trained = data["meta"]["geometry"]["trained"]
    for name, r in runs.items():
        assert r["frames"] == 10 * trained and r["cache_bytes_start"] == r["cache_bytes_end"]
        assert r["max_visible_frames"] <= trained
        assert r["offset_within_trained"] == (name != "sink_window/absolute")
    assert runs["infinity_rope"]["max_rope_offset"] == trained - 1
