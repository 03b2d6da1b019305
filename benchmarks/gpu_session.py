"""One GPU session in one device call: the most important answers first, every step time-boxed.

    # on the GPU machine (one device call, carrying .whl, timeout_s 540; benchmarks/README.md):
    python3 benchmarks/gpu_session.py
    # here, on the CPU: the same steps at toy sizes (tests/test_benchmark_scripts.py runs it)
    python benchmarks/gpu_session.py --smoke --out /tmp/session

Steps, in this order (seconds: each step's time box; --deadline caps the whole run):

    setup       60   install the carried wheels (.whl/ -> /tmp/site) and the project; GPU, driver,
                     versions; the torch API signatures of fastsft.compat on this torch
    selfchecks  40   every kernel self-check on cuda in bf16 and fp16 (and the fused LoRA under autocast)
                     with its real exception; which varlen attention kernel packed rows use
    train       70   6 QLoRA steps of a 4-layer Llama-3.2-1B-width model, kernels auto vs off: both loss
                     curves, step times, the auto run's kernels_used
    kernels     45   bf16 error (against float32, beside eager torch's own) and kernel-vs-eager time of
                     RMSNorm, RoPE, SwiGLU, the fused LoRA MLP block, the fused loss at Llama-3.1-8B shapes
                     (8192 tokens); the NF4 dequantize bit for bit against bitsandbytes
    packing     50   the CUDA packing extension: build time, one 32 x 2048 batch against the CPU assembler
    cuda-tests  90   every CUDA-only test (`pytest -m cuda`, tests/conftest.py), no -x, 30 s a test
    speed-train 110  bench_train.py: fastsft vs transformers + peft + bitsandbytes on Llama-3.2-1B
    speed-loss  50   bench_fused_linear_cross_entropy.py at N=16384, D=2048, V=151936, bf16, frozen head:
                     fastsft, Liger, Cut Cross-Entropy, torch's F.linear_cross_entropy, linear + cross_entropy

Each step runs in its own process under its own limit, so a hang costs that step only, and writes its
answers as it gets them, so a step cut short keeps the part it finished. Everything
lands in --out (default $OUT): `session.json` (rewritten after every step: status, seconds, the step's
results), `session.log` (every step's output), and the two speed steps' own result files, which is
five files: the device tool brings back at most eight. One line per step is printed as it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SITE = Path("/tmp/site")  # where the carried wheels are installed (they are not on the GPU image)

# (name, seconds): the order is the order of importance; 515 s in all, inside a 540 s device call. The
# packing step's budget is mostly the extension's nvcc build (torch's headers: ~40 s and more).
STEPS = (("setup", 60), ("selfchecks", 40), ("train", 70), ("kernels", 45), ("packing", 50),
         ("cuda-tests", 90), ("speed-train", 110), ("speed-loss", 50))


# ----------------------------------------------------------------------------------------------------
# the steps' own work: each runs as `gpu_session.py --step NAME --result FILE` in a child process


def _device(smoke: bool):
    import torch

    return torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")


def step_setup(smoke: bool, save) -> dict:
    """Versions, the GPU, and the signature check of the torch APIs the GPU paths call."""
    import torch

    from fastsft import compat

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "transformers", "peft", "bitsandbytes", "liger_kernel", "cut_cross_entropy"):
        try:
            out[name] = getattr(__import__(name), "__version__", "installed")
        except Exception as e:  # noqa: BLE001 - a missing or broken peer is an answer, not a crash
            out[name] = f"absent ({type(e).__name__}: {e})"[:200]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   multiprocessors=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    out["torch_api_check"] = compat.check()
    out["torch_api_ok"] = all(r["ok"] for r in out["torch_api_check"])
    return out


def step_selfchecks(smoke: bool, save) -> dict:
    """What kernels auto decides on this device: every self-check, with its real exception."""
    import torch

    from fastsft import kernel_usage, loss
    from fastsft.model import fused, llama

    device = _device(smoke)
    dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,)
    out = {"device": str(device), "checks": {}}

    def record(name, fn):
        t0 = time.perf_counter()
        try:
            error = fn()
        except Exception as e:  # noqa: BLE001 - a check that crashes outright is a failed check
            error = f"{type(e).__name__}: {e}"
        out["checks"][name] = {"ok": error is None, "error": error, "seconds": time.perf_counter() - t0}
        save(out)

    for dt in dtypes:
        tag = str(dt).replace("torch.", "")
        record(f"loss {tag}", lambda: loss._kernel_self_check(device, dt))
        for piece in ("lora", "rms_norm", "rope", "swiglu"):
            record(f"{piece} {tag}", lambda: fused._self_check(piece, device, dt, None))
        kernel, why = llama._varlen_kernel_checked(device, dt)
        out["checks"][f"attention {tag}"] = {"ok": kernel is not None, "error": why or None,
                                            "kernel": kernel.describe() if kernel else None}
    # the fused LoRA where the base is float32 and autocast makes the projections bf16
    autocast = torch.bfloat16 if device.type == "cuda" else None
    record("lora float32 + autocast bfloat16", lambda: fused._self_check("lora", device, torch.float32, autocast))
    out["self_checks_run"] = kernel_usage.self_checks()
    out["all_ok"] = all(c["ok"] for c in out["checks"].values())
    return out


def _model_json(path: Path, name: str, layers: int) -> Path:
    import _workload

    path.write_text(json.dumps({**_workload.hf_config(name), "num_hidden_layers": layers}))
    return path


def step_train(smoke: bool, save) -> dict:
    """A few QLoRA steps with kernels auto and off: the loss curves must agree, the times say the gain."""
    import _workload
    import torch

    from fastsft import config as config_mod
    from fastsft.train.loop import train

    device = _device(smoke)
    work = Path(tempfile.mkdtemp(prefix="fastsft-session-"))
    model = _model_json(work / "model.json", "smoke-llama" if smoke else "llama-3.2-1b", 2 if smoke else 4)
    seq = 128 if smoke else 1024
    data = _workload.write_records(work / "data.jsonl", 200 if smoke else 400, seed=0, scale=1 / 8 if smoke else 1.0)
    runs = {}
    for kernels in ("auto", "off"):
        run_dir = work / kernels
        cfg = config_mod.Config()
        for key, value in {
            "model.config": str(model), "model.tokenizer": "byte", "model.load_in_4bit": True,
            "model.gradient_checkpointing": True, "lora.r": 16, "lora.alpha": 16.0,
            "data.datasets": [{"path": str(data), "format": "prompt_completion"}], "data.max_seq_len": seq,
            "data.eval_fraction": 0.0, "train.max_steps": 3 if smoke else 6, "train.micro_batch_size": 2 if smoke else 4,
            "train.lr": 2e-4, "train.device": device.type, "train.kernels": kernels, "eval.exact_match": 0,
            "output.dir": str(run_dir), "output.log_every": 1, "output.progress": False, "output.plot": False,
            "output.save_random_base": False,
            "output.overwrite": True, "output.checkpoint_minutes": 0,  # a scratch run; no mid-run checkpoint in the timings
        }.items():
            config_mod.set_option(cfg, key, value)
        summary = train(cfg)
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in steps if r.get("kind") == "train"]
        runs[kernels] = {"losses": [r["loss"] for r in steps], "step_times_s": [r["step_time_s"] for r in steps],
                         "tokens_per_s": [r["tokens_per_s"] for r in steps],
                         "peak_memory_bytes": summary["peak_memory_bytes"], "kernels_used": summary["kernels_used"]}
        save({"device": str(device), "runs": runs})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    a, b = runs["auto"]["losses"], runs["off"]["losses"]
    later = lambda xs: statistics.median(xs[1:]) if len(xs) > 1 else xs[0]  # noqa: E731 - step 1 compiles
    return {"device": str(device), "runs": runs,
            "max_loss_difference": max(abs(x - y) / abs(y) for x, y in zip(a, b)),
            "step_time_speedup": later(runs["off"]["step_times_s"]) / later(runs["auto"]["step_times_s"])}


def _time_ms(fn, device, reps: int) -> float:
    import torch

    times = []
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call compiles (Triton) or warms the allocator
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _compare(kernel, eager, make_inputs, device, dtype, reps, frozen=0) -> dict:
    """Forward + backward of ``kernel`` and ``eager`` on the same inputs in ``dtype`` (the last ``frozen``
    of them without gradients): each one's error against ``eager`` in float32 (outputs and input
    gradients, max relative), and their times."""
    import torch

    def leaves(dt):
        xs = make_inputs()
        return [x.to(device, dt).clone().requires_grad_(j < len(xs) - frozen) for j, x in enumerate(xs)]

    def run(fn, dt):
        xs = leaves(dt)
        outs = fn(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(1)
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).to(device, o.dtype) for o in outs])
        return [o.detach().float() for o in outs] + [x.grad.float() for x in xs if x.grad is not None]

    def err(got, want):
        return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in zip(got, want))

    want = run(eager, torch.float32)
    out = {"error_kernel": err(run(kernel, dtype), want), "error_eager": err(run(eager, dtype), want)}
    for name, fn in (("kernel", kernel), ("eager", eager)):
        xs = leaves(dtype)

        def fwd_bwd():
            outs = fn(*xs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        out[f"ms_{name}"] = _time_ms(fwd_bwd, device, reps)
    out["speedup"] = out["ms_eager"] / out["ms_kernel"]
    out["within_2x_of_eager_error"] = out["error_kernel"] <= 2 * out["error_eager"] + 1e-6
    return out


def step_kernels(smoke: bool, save) -> dict:
    """Each kernel at Llama-3.1-8B shapes: bf16 error next to eager torch's, and the time of both."""
    import torch

    from fastsft.kernels.lora import lora_mlp, lora_mlp_ref
    from fastsft.kernels.rms_norm import rms_norm, rms_norm_ref
    from fastsft.kernels.rope import apply_rope, apply_rope_ref
    from fastsft.kernels.swiglu import swiglu, swiglu_ref
    from fastsft.loss import fused_linear_cross_entropy

    device = _device(smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter's bf16 is unreliable
    n, d, i, h, kv, hd, v, r = (8192, 4096, 14336, 32, 8, 128, 128256, 16) if not smoke else (37, 64, 96, 4, 2, 16, 300, 4)
    reps = 5 if device.type == "cuda" else 1
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    pos = torch.arange(n, dtype=torch.float32)[:, None] * (1e4 ** -torch.linspace(0, 1, hd // 2))
    cos, sin = (f(torch.cat((pos, pos), -1))[None].to(device, dtype) for f in (torch.cos, torch.sin))
    weights = [rand(i, d, scale=d**-0.5), rand(i, d, scale=d**-0.5), rand(d, i, scale=i**-0.5)]
    factors = [(rand(r, k.shape[1], scale=0.01), rand(k.shape[0], r, scale=0.01)) for k in weights]
    frozen = [w.to(device, dtype) for w in weights]
    head = rand(v, d, scale=d**-0.5)  # frozen, as under LoRA
    labels = torch.randint(0, v, (n,), generator=g).to(device)

    def mlp(fn):
        return lambda x, *ab: fn(x, *[(w, ab[2 * j], ab[2 * j + 1]) for j, w in enumerate(frozen)], 2.0)

    def loss(kernels):
        return lambda x, w: fused_linear_cross_entropy(x, w, labels, kernels=kernels)

    cases = {
        "rms_norm": (lambda x, w: rms_norm(x, w, 1e-5), lambda x, w: rms_norm_ref(x, w, 1e-5),
                     lambda: [rand(n, d), 1 + 0.1 * rand(d)]),
        "rope": (lambda q, k: apply_rope(q, k, cos, sin), lambda q, k: apply_rope_ref(q, k, cos, sin),
                 lambda: [rand(1, n, h, hd), rand(1, n, kv, hd)]),
        "swiglu": (swiglu, swiglu_ref, lambda: [rand(n, i), rand(n, i)]),
        "lora_mlp": (mlp(lora_mlp), mlp(lora_mlp_ref), lambda: [rand(n, d)] + [t for ab in factors for t in ab]),
        "loss": (loss("on"), loss("off"), lambda: [rand(n, d), head], 1),
    }
    out = {"device": str(device), "dtype": str(dtype), "shape": {"tokens": n, "hidden": d, "intermediate": i,
                                                                  "heads": h, "kv_heads": kv, "head_dim": hd,
                                                                  "vocab": v, "lora_r": r}, "kernels": {}}
    for name, (kernel, eager, make, *n_frozen) in cases.items():
        try:
            out["kernels"][name] = _compare(kernel, eager, make, device, dtype, reps, *n_frozen)
        except Exception as e:  # noqa: BLE001 - one kernel failing is that kernel's answer
            out["kernels"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save(out)
    out["nf4"] = _nf4_against_bitsandbytes(device, (i, d) if not smoke else (96, 64), reps)
    return out


def _nf4_against_bitsandbytes(device, shape, reps) -> dict:
    """The Triton dequantize (the reference on a CPU) against bitsandbytes' own, bit for bit, and the time."""
    import torch

    try:
        import bitsandbytes.functional as bnbF
    except Exception as e:  # noqa: BLE001
        return {"error": f"bitsandbytes: {type(e).__name__}: {e}"[:300]}
    from fastsft.kernels.nf4 import nf4_dequantize, nf4_dequantize_ref

    ours = nf4_dequantize if device.type == "cuda" else nf4_dequantize_ref
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    args = dict(code=qs.code, blocksize=qs.blocksize, nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                offset=qs.offset, nested_blocksize=qs.state2.blocksize)
    want = bnbF.dequantize_4bit(packed, qs)
    got = ours(packed, qs.absmax, shape, want.dtype, **args)
    return {"shape": list(shape), "dtype": str(want.dtype), "bit_exact": bool(torch.equal(got, want)),
            "ms_fastsft": _time_ms(lambda: ours(packed, qs.absmax, shape, want.dtype, **args), device, reps),
            "ms_bitsandbytes": _time_ms(lambda: bnbF.dequantize_4bit(packed, qs), device, reps)}


def step_packing(smoke: bool, save) -> dict:
    """The CUDA packing extension's build time, then bench_packing_cuda.py's batch against the CPU assembler."""
    from fastsft import packing_cuda

    out = {}
    if packing_cuda.cuda_available():
        t0 = time.perf_counter()
        built = packing_cuda._load_extension()
        out.update(build_seconds=time.perf_counter() - t0, built=built is not None,
                   build_error=None if built is not None else repr(packing_cuda._build_error)[:500])
    else:
        out["build"] = "skipped: no CUDA"
    save(out)
    import bench_packing_cuda

    result = Path(tempfile.mkdtemp()) / "packing.json"
    bench_packing_cuda.main((["--smoke"] if smoke else ["--reps", "20"]) + ["--out", str(result)])
    out["assembly"] = json.loads(result.read_text())
    return out


SPEED_FILES = {"speed-train": "train-1b.json", "speed-loss": "fused-ce.json"}
STEP_FUNCTIONS = {"setup": step_setup, "selfchecks": step_selfchecks, "train": step_train,
                  "kernels": step_kernels, "packing": step_packing}


# ----------------------------------------------------------------------------------------------------
# the parent: runs each step in its own process, time-boxed; stdlib only (it runs before the installs)


def _commands(name: str, smoke: bool, out: Path, result: Path) -> list[list[str]]:
    """The processes of one step, run one after another."""
    py, me = sys.executable, str(Path(__file__).resolve())
    worker = [py, me, "--step", name, "--result", str(result)] + (["--smoke"] if smoke else [])
    if name == "setup":
        cmds = []
        if not smoke:
            wheels = sorted(str(p) for p in (REPO / ".whl").glob("*.whl"))
            if wheels:
                cmds.append([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels])
            cmds.append([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)])
            if shutil.which("nvidia-smi"):
                cmds.append(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"])
        return cmds + [worker]
    if name == "cuda-tests":
        select = ["-m", "cuda"] if not smoke else ["-m", "cuda", "tests/model/test_packed.py"]
        return [[py, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *select]]
    if name == "speed-train":
        args = (["--smoke", "--models", "smoke-llama", "--steps", "1", "--warmup", "0"] if smoke else
                ["--models", "llama-3.2-1b", "--deadline", "95", "--timeout", "90"])
        return [[py, str(HERE / "bench_train.py"), *args, "--systems", "fastsft,hf", "--out", str(out / SPEED_FILES[name])]]
    if name == "speed-loss":
        case = "16384x2048x151936" if not smoke else "64x48x301"
        return [[py, str(HERE / "bench_fused_linear_cross_entropy.py"), "--cases", case, "--heads", "frozen",
                 "--masked", "0", "--providers", "fastsft,liger,cce,torch-linear-ce,torch-linear-ce-chunked,torch", "--reps", "5",
                 *(["--smoke"] if smoke else []), "--out", str(out / SPEED_FILES[name])]]
    return [worker]


def _environment(smoke: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTSFT_TEST_TIMEOUT": "30"}
    if not smoke:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), env.get("PYTHONPATH", "")) if p)
    else:
        env["TRITON_INTERPRET"] = "1"  # the CPU runs the Triton kernels in the interpreter
    return env


def run_step(name: str, limit: float, smoke: bool, out: Path, log) -> dict:
    result = out / f".{name}.json"
    t0 = time.perf_counter()
    status, detail = "ok", ""
    for cmd in _commands(name, smoke, out, result):
        left = limit - (time.perf_counter() - t0)
        log.write(f"\n===== {name}: {' '.join(cmd)[:600]}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=_environment(smoke), stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, left))
        except subprocess.TimeoutExpired:
            status, detail = "timeout", f"{cmd[-1] if len(cmd) < 3 else ' '.join(cmd[1:3])} ran past the step's {limit:.0f} s"
            break
        if proc.returncode != 0:
            status, detail = "failed", f"exit status {proc.returncode} from {' '.join(cmd[:4])[:200]}"
            if name != "cuda-tests":  # failing tests are an answer; the step still reports them below
                break
    row = {"step": name, "status": status, "seconds": time.perf_counter() - t0, "limit_s": limit}
    if detail:
        row["detail"] = detail
    if name == "cuda-tests":  # pytest's closing line: how many passed, failed, skipped
        log.flush()
        text = Path(log.name).read_text(errors="replace").rsplit("===== cuda-tests", 1)[-1]
        counts = [line.strip("= ") for line in text.splitlines() if " in " in line and ("passed" in line or
                  "failed" in line or "skipped" in line or "error" in line)]
        row["tests"] = counts[-1] if counts else "no pytest summary"
    if result.exists():
        row["result"] = json.loads(result.read_text())
        result.unlink()
    return row


def _summary_line(row: dict, out: Path) -> str:
    try:
        extra = _answers(row, out)
    except (KeyError, TypeError, ValueError):  # a step cut short: its result holds only what it finished
        extra = "partial answers in session.json"
    return f"{row['step']}: {row['status']} in {row['seconds']:.0f} s" + (f" ({row['detail']})" if "detail" in row else "") \
        + (f"; {extra}" if extra else "")


def _answers(row: dict, out: Path) -> str:
    """The step's headline answers, for its line on the console."""
    r = row.get("result") or {}
    extra = ""
    if row["step"] == "setup" and r:
        extra = f"torch {r.get('torch')}, triton {r.get('triton')}, {r.get('gpu', 'no GPU')}; API check " + \
                ("ok" if r.get("torch_api_ok") else "FAILED")
    elif row["step"] == "selfchecks" and r:
        bad = [k for k, c in r["checks"].items() if not c["ok"]]
        extra = "all passed" if not bad else f"FAILED: {', '.join(bad)}"
    elif row["step"] == "train" and r:
        extra = f"loss difference {r['max_loss_difference']:.2%}, kernels auto {r['step_time_speedup']:.2f}x off"
    elif row["step"] == "kernels" and r:
        extra = ", ".join(f"{k} {v['speedup']:.2f}x" if "speedup" in v else f"{k} ERROR" for k, v in r["kernels"].items())
        extra += f"; nf4 bit-exact {r['nf4'].get('bit_exact')}"
    elif row["step"] == "cuda-tests":
        extra = row.get("tests", "")
    elif row["step"].startswith("speed-") and (out / SPEED_FILES[row["step"]]).exists():
        rows = json.loads((out / SPEED_FILES[row["step"]]).read_text()).get("rows", [])
        key = "tokens_per_s" if row["step"] == "speed-train" else "ms"
        extra = ", ".join(f"{x.get('system') or x.get('provider')} {x[key]:,.4g}" if key in x else
                          f"{x.get('system') or x.get('provider')} {x.get('status') or 'error'}" for x in rows)
        extra = f"{key}: {extra}"
    return extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes: checks the script itself")
    p.add_argument("--out", type=Path, default=None, help="results folder (default $OUT, else /tmp/gpu-session)")
    p.add_argument("--deadline", type=float, default=520, help="seconds for the whole session; a step that "
                   "would start with less than 10 s left is recorded as not run")
    p.add_argument("--steps", default=",".join(n for n, _ in STEPS), help="comma-separated subset, in order")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:  # a child: one step's work, its result as JSON (also as it goes: a timeout keeps the part done)
        sys.path.insert(0, str(HERE))

        def save(result: dict) -> None:
            tmp = args.result.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1, default=str))
            tmp.replace(args.result)

        save(STEP_FUNCTIONS[args.step](args.smoke, save))
        return 0

    out = args.out or Path(os.environ.get("OUT") or "/tmp/gpu-session")
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.steps.split(",")
    unknown = set(wanted) - {n for n, _ in STEPS}
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}")
    started = time.perf_counter()
    session = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "smoke": args.smoke,
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": []}
    with open(out / "session.log", "a") as log:
        for name, limit in STEPS:
            if name not in wanted:
                continue
            left = args.deadline - (time.perf_counter() - started)
            if left < 10:
                row = {"step": name, "status": "not run", "detail": f"the session's {args.deadline:.0f} s deadline"}
                print(f"{name}: not run (deadline)", flush=True)
            else:
                row = run_step(name, min(limit, left), args.smoke, out, log)
                print(_summary_line(row, out), flush=True)
            session["steps"].append(row)
            (out / "session.json").write_text(json.dumps(session, indent=1, default=str))
    print(f"session: {time.perf_counter() - started:.0f} s; results in {out}", flush=True)
    return 0 if all(r["status"] == "ok" for r in session["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
