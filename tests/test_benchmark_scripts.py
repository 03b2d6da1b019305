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
    assert {"fastsft", "fastsft-reference", "torch", "torch-linear-ce"} <= providers  # torch 2.13 has the last
    assert all("ms" in r and r["error_vs_fp32"]["loss"] < 1e-4 for r in result["rows"])
    # fastsft's rows say which path the loss took (on a CPU: the reference, and why)
    assert all(r["kernels_used"]["path"] == "reference" for r in result["rows"] if r["provider"].startswith("fastsft"))


def test_fused_linear_cross_entropy_benchmark_cases_and_providers(tmp_path):
    """--cases/--providers/--heads/--masked pick exactly the rows the GPU session needs."""
    out = tmp_path / "r.json"
    _run(REPO / "benchmarks" / "bench_fused_linear_cross_entropy.py", "--smoke", "--cases", "37x48x133",
         "--providers", "fastsft,torch-linear-ce", "--heads", "frozen", "--masked", "0.25", "--out", out)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["provider"], r["N"], r["D"], r["V"], r["trainable_head"], r["masked_fraction"]) for r in rows] == [
        ("fastsft", 37, 48, 133, False, 0.25), ("torch-linear-ce", 37, 48, 133, False, 0.25)]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_fused_linear_cross_entropy.py"),
                           "--smoke", "--cases", "37x48"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "NxDxV" in proc.stderr


def _run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_harness_smoke(tmp_path):
    """Every system gets a row: fastsft and the transformers baseline run (toy shapes, CPU, one step),
    Liger and Unsloth say why they cannot run here."""
    out = tmp_path / "r.json"
    _run(REPO / "benchmarks" / "bench_train.py", "--smoke", "--models", "smoke-llama",
         "--systems", "fastsft,hf,hf-liger,unsloth", "--steps", "1", "--warmup", "0", "--out", out)
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "matmul_tflops", "flop_accounting", "workload", "rows"} <= set(result)
    rows = {r["system"]: r for r in result["rows"]}
    assert list(rows) == ["fastsft", "hf", "hf-liger", "unsloth"]
    for name in ("fastsft", "hf"):
        r = rows[name]
        assert r["status"] == "ok", r.get("error")
        assert r["tokens_per_s"] > 0 and 0 < r["response_tokens_per_s"] < r["tokens_per_s"]
        assert r["step_time_s"] > 0 and r["peak_memory_bytes"] > 0 and r["mfu"] > 0
    for name in ("hf-liger", "unsloth"):
        assert rows[name]["status"] == "skipped" and rows[name]["reason"]
    assert "| smoke-llama | fastsft |" in out.with_suffix(".md").read_text()
    # the fastsft row carries the path every piece took; on a CPU nothing counts as a handicap
    assert rows["fastsft"]["kernels_used"]["loss"]["path"] == "reference" and rows["fastsft"]["handicapped"] == []


def _fake_result(date, models, rows, matmul=700.0):
    return {"benchmark": "train_throughput", "device": "NVIDIA H100 80GB HBM3", "date": date,
            "command": f"python bench_train.py --models {','.join(models)}", "smoke": False,
            "matmul": {"dtype": "bfloat16"}, "matmul_tflops": matmul,
            "workload": {"models": models, "lora_r": 16, "max_seq_len": 2048, "mean_record_tokens": 214.0,
                         "grad_accum": 2, "rows_per_micro_batch": 4, "records_per_micro_batch": 38,
                         "timed_steps": 4, "warmup_steps": 2},
            "rows": rows}


def _row(model, system, tok_s=None, mem=None, reason=None):
    if reason:
        return {"model": model, "system": system, "status": "skipped", "reason": reason}
    return {"model": model, "system": system, "status": "ok", "tokens_per_s": tok_s, "response_tokens_per_s": tok_s / 2,
            "step_time_s": 1.0, "peak_memory_bytes": mem, "mfu": 0.4}


def test_report_merge_and_readme(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    a = _fake_result("2026-11-20", ["m1"], [_row("m1", "fastsft", 1000.0, 1 << 30), _row("m1", "hf", 400.0, 4 << 30),
                                           _row("m1", "unsloth", reason="not installed")])
    b = _fake_result("2026-11-21", ["m2"], [_row("m2", "fastsft", 300.0, 2 << 30), _row("m1", "fastsft", 1100.0, 1 << 30)])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    report = REPO / "benchmarks" / "report.py"
    _run(report, "--merge", tmp_path / "a.json", tmp_path / "b.json", "--results-dir", results)
    merged_path = results / "2026-11-21-nvidia-h100-80gb-hbm3.json"
    merged = json.loads(merged_path.read_text())
    assert [(r["model"], r["system"]) for r in merged["rows"]] == [("m1", "fastsft"), ("m1", "hf"), ("m1", "unsloth"),
                                                                  ("m2", "fastsft")]
    assert merged["rows"][0]["tokens_per_s"] == 1100.0  # the later run wins
    assert merged["workload"]["models"] == ["m1", "m2"] and len(merged["parts"]) == 2
    table = merged_path.with_suffix(".md").read_text()
    assert "| m1 | fastsft | 1,100 | 550 | 1.000 | 1.00 | 40.0% | 2.75x | 25% |  |" in table
    assert "| m1 | unsloth | - |" in table and "not installed" in table

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Performance\n\n<!-- perf:begin -->\nold\n<!-- perf:end -->\n\n## Scaling out\nkeep\n")
    _run(report, "--readme", "--readme-path", readme, "--results-dir", results)
    text = readme.read_text()
    assert "old" not in text and text.endswith("<!-- perf:end -->\n\n## Scaling out\nkeep\n")
    assert "python bench_train.py --models m1" in text and "| m2 | fastsft | 300 |" in text


def _load_benchmark(name):
    import importlib.util

    sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import their siblings (_results, _workload)
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_a_fallback_on_the_gpu_marks_the_row():
    """A fastsft row whose pieces fell back on a GPU is marked in the results and the table; an ablation's
    own switched-off piece is not a handicap, nor is anything on a CPU."""
    bench, report = _load_benchmark("bench_train"), _load_benchmark("report")
    used = {"loss": {"path": "reference", "reason": "the Triton kernel failed its self-check: TypeError: x"},
            "lora": {"path": "native"}, "rope": {"path": "mixed", "native": {}, "reference": {"reason": "r"}},
            "attention": {"path": "reference", "reason": "no varlen kernel"}, "swiglu": {"path": "unused"}}
    assert bench.handicaps(used, {}, cuda=True) == [
        "loss: the Triton kernel failed its self-check: TypeError: x", "rope: r", "attention: no varlen kernel"]
    assert bench.handicaps(used, {"train.kernels_off": ["loss"], "data.packing": False}, cuda=True) == ["rope: r"]
    assert bench.handicaps(used, {"train.kernels": "off"}, cuda=True) == ["attention: no varlen kernel"]
    assert bench.handicaps(used, {}, cuda=False) == []
    row = {**_row("m1", "fastsft", 1000.0, 1 << 30), "handicapped": bench.handicaps(used, {}, cuda=True)}
    table = report.table(_fake_result("2026-11-20", ["m1"], [row]))
    assert "HANDICAPPED, fell back: loss: the Triton kernel failed its self-check" in table


def test_flop_accounting():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_workload", REPO / "benchmarks" / "_workload.py")
    w = importlib.util.module_from_spec(spec)
    sys.modules["_workload"] = w  # (dataclasses look their module up)
    spec.loader.exec_module(w)
    cfg = w.hf_config("llama-3.1-8b")
    d, i, kv = 4096, 14336, 1024
    p = 32 * (2 * d * d + 2 * d * kv + 3 * d * i)                       # frozen projections: 6.98e9
    a = 32 * 16 * ((d + d) * 2 + (d + kv) * 2 + 3 * (d + i))            # LoRA r=16 on all seven
    ckpt, plain = w.flops_model(cfg, 16, checkpointing=True), w.flops_model(cfg, 16, checkpointing=False)
    assert ckpt.per_token == 6 * p + 8 * a and plain.per_token == 4 * p + 6 * a
    assert ckpt.per_response_token == 4 * d * 128256
    assert ckpt.per_l2 == 32 * 2 * 32 * 128 * 4 and plain.per_l2 == 32 * 2 * 32 * 128 * 3
    prompt, response = w.real_lengths()
    assert len(prompt) == len(response) > 9000 and (prompt > 0).all() and (response > 0).all()


def test_gpu_session_smoke(tmp_path):
    """The GPU session script, every step at toy sizes on the CPU, so that on the GPU the script itself is
    never what fails: each step ends ok, session.json holds every step's answers, the speed steps write
    their result files, and at most 8 files land in the output folder (what the device tool brings back)."""
    out = tmp_path / "session"
    _run(REPO / "benchmarks" / "gpu_session.py", "--smoke", "--out", out, timeout=600)
    session = json.loads((out / "session.json").read_text())
    steps = {s["step"]: s for s in session["steps"]}
    assert list(steps) == ["setup", "selfchecks", "train", "kernels", "packing", "cuda-tests", "speed-train",
                           "speed-loss"]
    assert all(s["status"] == "ok" for s in steps.values()), [(s["step"], s.get("detail")) for s in steps.values()]
    assert steps["setup"]["result"]["torch_api_ok"]
    checks = steps["selfchecks"]["result"]["checks"]
    assert {f"{p} float32" for p in ("loss", "lora", "rms_norm", "rope", "swiglu", "attention")} <= set(checks)
    assert all(c["ok"] for name, c in checks.items() if not name.startswith("attention"))
    assert checks["attention float32"]["error"]  # torch's varlen kernel is CUDA-only: the reason is kept
    train_runs = steps["train"]["result"]["runs"]
    assert len(train_runs["auto"]["losses"]) == len(train_runs["off"]["losses"]) == 3
    assert steps["train"]["result"]["max_loss_difference"] < 1e-4  # on a CPU both runs take the same paths
    assert "kernels_used" in train_runs["auto"]
    kernels = steps["kernels"]["result"]
    for name in ("rms_norm", "rope", "swiglu", "lora_mlp", "loss"):
        k = kernels["kernels"][name]
        assert "error" not in k and k["within_2x_of_eager_error"] and k["ms_kernel"] > 0, (name, k)
    assert kernels["nf4"]["bit_exact"]
    assert steps["packing"]["result"]["assembly"]["rows"]
    assert "skipped" in steps["cuda-tests"]["tests"]
    assert (out / "train-1b.json").exists() and (out / "fused-ce.json").exists()
    assert len([p for p in out.iterdir() if p.is_file()]) <= 8


def test_gpu_session_time_box(tmp_path):
    """A step that runs past its limit is stopped and recorded as a timeout; the session goes on."""
    session = _load_benchmark("gpu_session")
    out = tmp_path / "s"
    out.mkdir()
    with open(out / "session.log", "a") as log:
        row = session.run_step("train", 1.0, True, out, log)
    assert row["status"] == "timeout" and "ran past" in row["detail"] and row["seconds"] < 30


def test_cuda_marker_selects_every_gpu_only_test():
    """`pytest -m cuda` (the GPU session's test step) is every test that skips here for want of CUDA."""
    def collect(*args):
        proc = _run("-m", "pytest", "-q", "--co", "-p", "no:cacheprovider", *args, REPO / "tests")
        return {line for line in proc.stdout.splitlines() if "::" in line}

    gpu, rest = collect("-m", "cuda"), collect("-m", "not cuda")
    assert len(gpu) >= 26 and not gpu & rest
    assert any("test_real_varlen_kernel_is_chosen_on_the_gpu" in t for t in gpu)
    assert any("test_packing_cuda.py" in t for t in gpu) and any("tests/kernels/" in t for t in gpu)


def test_first_step_benchmark_smoke(tmp_path):
    """Cold, then cached: the second run's token stores come from the cache (no timing asserted)."""
    import pytest

    if not (REPO.parent / "shared" / "tokenizers" / "llama2").exists():
        pytest.skip("needs ../shared")
    out = tmp_path / "r.json"
    _run(REPO / "benchmarks" / "bench_first_step.py", "--smoke", "--no-trl", "--out", out)
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert not rows["fastsft-cold"]["token_stores_from_cache"] and rows["fastsft-cached"]["token_stores_from_cache"]


def test_forgetting_benchmark_smoke(tmp_path):
    """One arm of each kind and two curriculum rows run end to end (a few steps) into the result file."""
    out = tmp_path / "r.json"
    _run(REPO / "benchmarks" / "bench_forgetting.py", "--smoke", "--out", out, timeout=600)
    result = json.loads(out.read_text())
    assert [r["arm"] for r in result["arms"]] == ["none", "kl-0.1", "replay-0.1"]
    for r in result["arms"]:
        assert r["general_ppl_after"] > 0 and r["instruction_ppl_after"] > 0 and r["step_time_s"] > 0
    assert all(r["kl_to_base_last"] is not None for r in result["arms"] if r["arm"].startswith("kl"))
    assert [r["order"] for r in result["curriculum"]["rows"]] == ["shuffled", "base_loss"]
