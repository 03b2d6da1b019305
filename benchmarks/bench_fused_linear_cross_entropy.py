"""Fused linear cross-entropy: time, extra memory and bf16 error against the peers.

    python benchmarks/bench_fused_linear_cross_entropy.py                 # GPU: the issue's shapes
    python benchmarks/bench_fused_linear_cross_entropy.py --cases 16384x2048x151936 --heads frozen \
        --masked 0 --providers fastsft,liger,cce,torch-linear-ce,torch-linear-ce-chunked,torch  # one shape (the GPU session's)
    python benchmarks/bench_fused_linear_cross_entropy.py --smoke         # CPU: tiny shapes, checks the script

Providers (each skipped with the reason recorded when it cannot be imported):
  fastsft            fastsft.loss.fused_linear_cross_entropy (the Triton kernel on CUDA)
  fastsft-reference  the same function forced onto its plain-PyTorch path (the ablation)
  torch              F.linear + F.cross_entropy (materialises the [N, V] logits)
  torch-linear-ce    torch.nn.functional.linear_cross_entropy, torch's own fused op (where the installed
                     torch has it)
  torch-linear-ce-chunked  the same with options=LinearCrossEntropyOptions(): torch's chunked path (the
                     memory the fused loss is measured against; where the installed torch has it)
  liger              Liger-Kernel's LigerFusedLinearCrossEntropyFunction
  cce                Apple's Cut Cross-Entropy linear_cross_entropy

Per case (N, D, V, frozen or trainable head, fraction of masked rows) it records the median forward +
backward time, the peak memory above the inputs and the gradient outputs ("extra"), the error of the
loss and gradients in bf16 against a float32 reference next to torch's own bf16 error, and the share of
the matmul floor reached: 6·N·V·D FLOPs with a trainable head (forward logits, dhidden, dweight),
4·N·V·D frozen, over the bf16 matmul rate measured in the same run. N counts the kept (unmasked) rows,
since masked rows need no work at all. fastsft's rows also say which path its loss really took
(``kernels_used``: the Triton kernel, or the reference after a failed self-check), so a number measured
on a fallback is marked as such. Results go to benchmarks/results/<date>-<device>-fused-ce.json.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import _results  # benchmarks/_results.py (the script's own directory is on sys.path)
import torch
import torch.nn.functional as F

from fastsft import kernel_usage
from fastsft import loss as fastsft_loss

GPU_CASES = [(8192, 4096, 128256), (16384, 2048, 151936)]
SMOKE_CASES = [(64, 32, 100), (37, 48, 133)]


# ----------------------------------------------------------------------------------------------------
# providers: f(hidden, weight, labels) -> scalar mean loss over unmasked rows


def _torch(h, w, y):
    return F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)


def _fastsft(h, w, y):
    return fastsft_loss.fused_linear_cross_entropy(h, w, y)


def _fastsft_reference(h, w, y):
    with _force_reference():
        return fastsft_loss.fused_linear_cross_entropy(h, w, y)


@contextlib.contextmanager
def _force_reference():
    use = getattr(fastsft_loss, "use_implementation", None)
    if use is None:  # before the kernel landed there was only the reference
        yield
        return
    with use("reference"):
        yield


def _liger():
    mod = importlib.import_module("liger_kernel.ops.fused_linear_cross_entropy")
    fn = mod.LigerFusedLinearCrossEntropyFunction

    def run(h, w, y):
        out = fn.apply(h, w, y)
        return out[0] if isinstance(out, tuple) else out

    return run


def _torch_linear_ce():
    if not hasattr(F, "linear_cross_entropy"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy")
    return lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=-100)


def _torch_linear_ce_chunked():
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise RuntimeError(f"torch {torch.__version__} has no chunked linear_cross_entropy "
                           "(torch.nn.LinearCrossEntropyOptions)")
    opts = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=-100, options=opts)


def _cce():
    lce = importlib.import_module("cut_cross_entropy").linear_cross_entropy
    return lambda h, w, y: lce(h, w, y)


PROVIDERS = ("fastsft", "fastsft-reference", "torch", "torch-linear-ce", "torch-linear-ce-chunked", "liger", "cce")


def providers(device: str, wanted=PROVIDERS) -> tuple[dict, dict]:
    """(name -> fn, name -> why it cannot run here) for the ``wanted`` providers."""
    found = {"fastsft": _fastsft, "fastsft-reference": _fastsft_reference, "torch": _torch}
    missing = {}
    for name, make in (("torch-linear-ce", _torch_linear_ce), ("torch-linear-ce-chunked", _torch_linear_ce_chunked)):
        try:
            found[name] = make()
        except RuntimeError as e:
            missing[name] = str(e)
    if device == "cuda":
        for name, make in (("liger", _liger), ("cce", _cce)):
            try:
                found[name] = make()
            except Exception as e:  # an optional peer: record why it is absent
                missing[name] = f"{type(e).__name__}: {e}"
    else:
        missing.update(liger="CUDA only", cce="CUDA only")
    return ({k: v for k, v in found.items() if k in wanted}, {k: v for k, v in missing.items() if k in wanted})


def parse_cases(text: str) -> list[tuple[int, int, int]]:
    """``16384x2048x151936,8192x4096x128256`` -> [(N, D, V), ...]."""
    cases = []
    for part in text.split(","):
        dims = part.lower().split("x")
        if len(dims) != 3 or not all(d.strip().isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"a case is NxDxV with positive integers, got {part!r}")
        cases.append(tuple(int(d) for d in dims))
    return cases


# ----------------------------------------------------------------------------------------------------
# measurement


def make_inputs(n, d, v, masked, trainable, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 1.0).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype).requires_grad_(trainable)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < masked] = -100
    return h, w, y.to(device)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, h, w, y, device, reps, warmup=2) -> float:
    """Median milliseconds of loss + backward."""
    times = []
    for i in range(warmup + reps):
        h.grad = None
        w.grad = None
        _sync(device)
        t0 = time.perf_counter()
        fn(h, w, y).backward()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def extra_memory(fn, h, w, y, device) -> int | None:
    """Peak bytes above inputs and gradient outputs during one loss + backward (CUDA only)."""
    if device != "cuda":
        return None
    h.grad = None
    w.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(h, w, y).backward()
    torch.cuda.synchronize()
    grads = h.numel() * h.element_size() + (w.numel() * w.element_size() if w.requires_grad else 0)
    return int(torch.cuda.max_memory_allocated() - base - grads)


def errors(fn, h, w, y) -> dict:
    """Max relative error of loss and gradients against a float32 computation of the same inputs."""
    def run(f, hh, ww):
        hh = hh.detach().clone().requires_grad_()
        ww = ww.detach().clone().requires_grad_(w.requires_grad)
        loss = f(hh, ww, y)
        loss.backward()
        return loss.detach().float(), hh.grad.float(), (ww.grad.float() if ww.requires_grad else None)

    ref = run(_torch, h.float(), w.float())
    got = run(fn, h, w)

    def rel(a, b):
        return None if a is None else float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))

    return {"loss": rel(got[0], ref[0]), "grad_hidden": rel(got[1], ref[1]), "grad_weight": rel(got[2], ref[2])}


def matmul_tflops(device, dtype, size=8192, reps=10) -> float:
    """Measured dense matmul rate (TFLOP/s) for this dtype: the floor the fused loss is judged by."""
    if device != "cuda":
        size, reps = 256, 3
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - t0) / 1e12


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks that the script runs")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--cases", default=None, help="NxDxV[,NxDxV...] (default: the GPU cases; smoke: tiny ones)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from {', '.join(PROVIDERS)}")
    p.add_argument("--heads", choices=("both", "frozen", "trainable"), default="both",
                   help="LM head frozen (LoRA/QLoRA: no weight gradient), trainable, or both")
    p.add_argument("--masked", default="0,0.5", help="fractions of masked (prompt) rows, comma-separated")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)")
    args = p.parse_args(argv)
    wanted = args.providers.split(",")
    unknown = set(wanted) - set(PROVIDERS)
    if unknown:
        p.error(f"unknown providers {sorted(unknown)}; known: {', '.join(PROVIDERS)}")
    try:
        cases = parse_cases(args.cases) if args.cases else None
        masked_fractions = [float(m) for m in args.masked.split(",")]
    except ValueError as e:
        p.error(str(e))

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = cases or (SMOKE_CASES if device == "cpu" else GPU_CASES)
    reps = 2 if device == "cpu" else args.reps
    heads = {"both": (False, True), "frozen": (False,), "trainable": (True,)}[args.heads]
    found, missing = providers(device, wanted)
    rate = matmul_tflops(device, dtype)
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    rows = []
    for n, d, v in cases:
        for trainable in heads:
            for masked in masked_fractions:
                h, w, y = make_inputs(n, d, v, masked, trainable, dtype, device)
                kept = int((y != -100).sum())
                floor_ms = (6 if trainable else 4) * kept * v * d / (rate * 1e12) * 1e3
                for name, fn in found.items():
                    row = {"provider": name, "N": n, "D": d, "V": v, "kept_rows": kept, "trainable_head": trainable,
                           "masked_fraction": masked}
                    kernel_usage.reset()
                    try:
                        row["ms"] = time_fwd_bwd(fn, h, w, y, device, reps)
                        row["extra_memory_bytes"] = extra_memory(fn, h, w, y, device)
                        row["matmul_floor_ms"] = floor_ms
                        row["floor_fraction"] = floor_ms / row["ms"]
                        if device == "cuda" or n * v < 1e6:
                            row["error_vs_fp32"] = errors(fn, h, w, y)
                    except Exception as e:  # e.g. out of memory for the materialising baseline
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    if name.startswith("fastsft"):  # the path the loss really took (a fallback is marked)
                        row["kernels_used"] = kernel_usage.snapshot()["loss"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    result = {
        **_results.header("fused_linear_cross_entropy", device_name), "dtype": str(dtype),
        "matmul_tflops": rate, "missing_providers": missing, "rows": rows,
        "versions": {**_results.versions("triton", "transformers", "liger_kernel", "cut_cross_entropy",
                                         "fastsft"), "torch": torch.__version__},
    }
    _results.write(result, args.out, smoke=args.smoke, suffix="fused-ce")
    return 0


if __name__ == "__main__":
    sys.exit(main())
