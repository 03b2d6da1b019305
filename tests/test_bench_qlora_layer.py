"""benchmarks/bench_qlora_layer.py still runs (tiny CPU shapes, Triton in the interpreter); no timing
is asserted, only that every system ran and that fastsft's layer equals the float32 computation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_qlora_layer_benchmark_smoke(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_qlora_layer.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "dequantize", "rows"} <= set(result)
    assert result["dequantize"]["copy_gbps"] > 0 and result["dequantize"]["fastsft_gbps"] > 0
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"fastsft", "fastsft-torch", "transformers+peft"}
    assert all("error" not in r and r["ms"] > 0 for r in rows.values()), rows
    assert max(rows["fastsft"]["error_vs_fp32"].values()) < 1e-5
    # each fastsft row says which path its pieces took: the kernels row native, the ablation reference
    assert {rows["fastsft"]["kernels_used"][k]["path"] for k in ("lora", "rms_norm", "rope")} == {"native"}
    assert {v["path"] for v in rows["fastsft-torch"]["kernels_used"].values()} == {"reference"}
