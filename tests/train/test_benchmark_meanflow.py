"""benchmarks/meanflow.py --tiny (CPU smoke run): both modes timed, the tangent-error table and the JSON."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "meanflow.py"


def test_meanflow_benchmark_tiny(tmp_path):
    """Run as a script (as users do: its folder, with the shared ``_common`` helpers, is on the import path)."""
    out = tmp_path / "meanflow.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--fd-eps", "5e-3,1e-3", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["rows"]] == ["exact", "fd"] and all(r["ms"] > 0 for r in data["rows"])
    assert [e["fd_eps"] for e in data["tangent_error"]] == [5e-3, 1e-3]
    assert all(e["rel_l2"] > 0 and e["exact_rms"] > 0 for e in data["tangent_error"])
