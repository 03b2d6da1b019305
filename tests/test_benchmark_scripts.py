"""Benchmark scripts still run (tiny CPU shapes; no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fused_linear_cross_entropy_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_fused_linear_cross_entropy.py"),
                           "--smoke", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "matmul_tflops", "rows"} <= set(result)
    providers = {r["provider"] for r in result["rows"]}
    assert {"fastsft", "fastsft-reference", "torch"} <= providers
    assert all("ms" in r and r["error_vs_fp32"]["loss"] < 1e-4 for r in result["rows"])
