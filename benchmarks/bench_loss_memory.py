"""Loss memory on the CPU: the extra memory and the time of one forward + backward of linear + cross-entropy.

    python benchmarks/bench_loss_memory.py                # writes results/<date>-cpu-<n>core-loss-memory.json
    python benchmarks/bench_loss_memory.py --baseline cc01ac7   # also fastsft as of that commit (before/after)
    python benchmarks/bench_loss_memory.py --smoke        # tiny shapes, nothing written

Shape: N = 4096 tokens, half of them masked (-100, as prompt tokens are), hidden D = 1024, vocabulary
V = 32,000 (Llama-2), float32; a trainable head (weight.requires_grad) and a frozen one (LoRA).

Providers, each in its own fresh process (so nothing another provider allocated stays resident):
  torch               F.linear + F.cross_entropy: the float32 [N, V] logits and their gradient
  torch-linear-ce-chunked  torch.nn.functional.linear_cross_entropy(..., options=LinearCrossEntropyOptions()):
                      torch's chunked path (torch >= 2.13; its default options=None is the plain path above)
  fastsft-reference   fastsft.loss.fused_linear_cross_entropy(kernels="off"): the chunked reference
  fastsft-kl          the same with the KL anchor (base_hidden, kl_beta=0.1): two models' logit chunks

Extra memory of a warm step: the process's peak resident set during the step (VmHWM, reset just before
it by writing 5 to /proc/self/clear_refs) minus its resident set just before it (the previous step's
gradients dropped, glibc's free memory handed back with malloc_trim); the largest over the rounds. It
counts everything the step allocates, the gradients it returns included (grad_hidden N x D x 4 bytes =
17 MB, and for a trainable head grad_weight V x D x 4 bytes = 131 MB here). ``extra_bytes_first_step`` is
the first step's peak minus the resident set with only the inputs built: it adds one-time costs (torch's
chunked op imports sympy/dynamo on its first call, about 150 MB). Two warm-up steps, then ``--rounds``
timed ones: seconds is their median (``seconds_min`` the fastest: on a shared machine the least
disturbed). ``git`` records the commit and whether fastsft/loss.py differed from it. The largest
gradient difference from the torch provider (same head) is recorded per row; the KL rows have another
loss, so none.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROVIDERS = ("torch", "torch-linear-ce-chunked", "fastsft-reference", "fastsft-kl")
HEADS = ("trainable", "frozen")
SHAPE = (4096, 1024, 32000)
SMOKE_SHAPE = (256, 64, 1000)
KL_BETA = 0.1
MB = 1e6


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS (Linux >= 4.0)
        f.write("5")


def _release_free_memory() -> None:
    """Drop what Python and glibc's allocator hold but do not use, so VmRSS is the live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the resident set may include freed heap
        pass


def _loss_fn(provider: str):
    import torch.nn.functional as F

    if provider == "torch":
        return lambda h, w, y, hb: F.cross_entropy(F.linear(h, w), y, ignore_index=-100)
    if provider == "torch-linear-ce-chunked":
        import torch.nn as nn

        if not hasattr(F, "linear_cross_entropy") or not hasattr(nn, "LinearCrossEntropyOptions"):
            raise RuntimeError("this torch has no chunked F.linear_cross_entropy (LinearCrossEntropyOptions)")
        opts = nn.LinearCrossEntropyOptions()
        return lambda h, w, y, hb: F.linear_cross_entropy(h, w, y, ignore_index=-100, options=opts)
    from fastsft.loss import fused_linear_cross_entropy

    if provider == "fastsft-reference":
        return lambda h, w, y, hb: fused_linear_cross_entropy(h, w, y, kernels="off")
    if provider == "fastsft-kl":
        return lambda h, w, y, hb: fused_linear_cross_entropy(h, w, y, kernels="off", base_hidden=hb,
                                                              kl_beta=KL_BETA)
    raise ValueError(f"unknown provider {provider!r}")


def child(provider: str, head: str, shape: tuple[int, int, int], rounds: int, grads_path: str) -> dict:
    """One provider, one head mode, in this (fresh) process: extra memory and seconds per step."""
    import torch

    n, d, v = shape
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(n, d, generator=g)
    w = (torch.randn(v, d, generator=g) / d**0.5).requires_grad_(head == "trainable")
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.5] = -100
    hb = h0 + 0.1 * torch.randn(n, d, generator=g)
    h = h0.clone().requires_grad_()
    fn = _loss_fn(provider)
    _release_free_memory()
    rss_inputs = _status("VmRSS")

    def step(rss_from=None):
        h.grad = w.grad = None
        _release_free_memory()
        rss_before = _status("VmRSS") if rss_from is None else rss_from
        _reset_peak()
        t0 = time.perf_counter()
        loss = fn(h, w, y, hb)
        loss.backward()
        seconds = time.perf_counter() - t0
        return float(loss.detach()), seconds, _status("VmHWM") - rss_before

    _, _, first_extra = step(rss_inputs)
    step()  # a second warm-up: glibc moves its mmap threshold up to the sizes freed in the first
    steps = [step() for _ in range(rounds)]
    torch.save({"h": h.grad, "w": w.grad}, grads_path)
    fastsft_path = sys.modules["fastsft"].__file__ if "fastsft" in sys.modules else None
    return {"loss": steps[-1][0], "fastsft_path": fastsft_path, "load_average": os.getloadavg()[0], "seconds": statistics.median(s for _, s, _ in steps),
            "seconds_min": min(s for _, s, _ in steps), "seconds_all": [round(s, 4) for _, s, _ in steps],
            "extra_bytes": max(e for _, _, e in steps), "extra_bytes_all": [e for _, _, e in steps],
            "extra_bytes_first_step": first_extra, "threads": torch.get_num_threads()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def _git_state() -> dict:
    """The commit this ran at, and whether the loss's source differed from it."""
    def git(*a):
        proc = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"),
            "loss_py_modified": bool(git("status", "--porcelain", "--", "fastsft/loss.py"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="result JSON (default results/<date>-<device>-loss-memory.json)")
    ap.add_argument("--smoke", action="store_true", help=f"tiny shapes {SMOKE_SHAPE}, one round, nothing written by default")
    ap.add_argument("--rounds", type=int, default=None, help="timed steps per provider after two warm-ups (default 5)")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS}")
    ap.add_argument("--heads", default=",".join(HEADS), help="comma list of trainable,frozen")
    ap.add_argument("--baseline", metavar="REV", help="also run the fastsft providers on fastsft/ as of this git "
                    "revision (rows named provider@REV), for a before/after in one run")
    ap.add_argument("--child", nargs=4, metavar=("PROVIDER", "HEAD", "NxDxV", "ROUNDS"), help=argparse.SUPPRESS)
    ap.add_argument("--grads", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        provider, head, shape, rounds = args.child
        res = child(provider, head, tuple(int(x) for x in shape.split("x")), int(rounds), args.grads)
        print("RESULT " + json.dumps(res))
        return 0

    import torch

    providers, heads = args.providers.split(","), args.heads.split(",")
    for name in providers:
        if name not in PROVIDERS:
            ap.error(f"unknown provider {name!r}; choose from {PROVIDERS}")
    for name in heads:
        if name not in HEADS:
            ap.error(f"unknown head {name!r}; choose from {HEADS}")
    shape = SMOKE_SHAPE if args.smoke else SHAPE
    rounds = args.rounds or (1 if args.smoke else 5)
    n, d, v = shape
    result = {**_results.header("loss-memory", f"cpu-{os.cpu_count()}core"), "cpu": _cpu_model(),
              "cores": os.cpu_count(), "smoke": args.smoke,
              "versions": {**_results.versions("fastsft"), "torch": torch.__version__},
              "shape": {"N": n, "D": d, "V": v, "masked_fraction": 0.5, "dtype": "float32"},
              "kl_beta": KL_BETA, "rounds": rounds, "git": _git_state(),
              "measure": "extra = peak VmHWM during a warm fwd+bwd (reset via /proc/self/clear_refs) minus VmRSS just "
                         "before it (after gc + malloc_trim), max over the rounds; includes the returned "
                         "gradients; each provider in a fresh process; seconds = median of the rounds after "
                         "two warm-up steps; extra_bytes_first_step = the warm-up step's peak minus VmRSS with "
                         "only the inputs built (one-time costs included)",
              "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(p, None) for p in providers]
        if args.baseline:
            src = os.path.join(tmp, "baseline")
            os.mkdir(src)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "fastsft"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.baseline], capture_output=True, text=True)
            result["baseline"] = {"rev": args.baseline, "commit": commit.stdout.strip()}
            runs += [(p, src) for p in providers if p.startswith("fastsft")]
        for head in heads:
            ref = None
            for provider, src in runs:
                name = provider if src is None else f"{provider}@{args.baseline}"
                grads = os.path.join(tmp, f"{name}-{head}.pt")
                cmd = [sys.executable, __file__, "--child", provider, head, f"{n}x{d}x{v}", str(rounds), "--grads", grads]
                env = dict(os.environ)
                if src is not None:  # the baseline's fastsft first on the path (before the installed one)
                    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in [env.get("PYTHONPATH")] if p])
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                row = {"provider": name, "head": head}
                if proc.returncode != 0 or line is None:
                    row.update(status="failed", error=(proc.stderr or proc.stdout)[-2000:])
                    result["rows"].append(row)
                    print(f"{head:9s} {name:26s} failed: {row['error'][-300:]}", flush=True)
                    continue
                row.update(status="ok", **json.loads(line[len("RESULT "):]))
                got = torch.load(grads)
                if provider == "torch":
                    ref = got
                if src is not None and not str(row.get("fastsft_path")).startswith(src):
                    raise RuntimeError(f"{name} imported fastsft from {row.get('fastsft_path')}, not {src}")
                if ref is not None and provider != "fastsft-kl":
                    row["max_grad_error"] = {k: float((got[k] - ref[k]).abs().max()) for k in got if got[k] is not None}
                result["rows"].append(row)
                print(f"{head:9s} {name:26s} extra {row['extra_bytes'] / MB:8.1f} MB  "
                      f"{row['seconds']:.3f} s/step  loss {row['loss']:.6f}", flush=True)
    rows = {(r["head"], r["provider"]): r for r in result["rows"] if r["status"] == "ok"}
    for (head, provider), r in rows.items():
        base = rows.get((head, "torch"))
        if base is not None:
            r["time_vs_torch"] = r["seconds"] / base["seconds"]
            r["extra_vs_torch"] = r["extra_bytes"] / base["extra_bytes"]
        plain = rows.get((head, provider.replace("fastsft-kl", "fastsft-reference")))
        if provider.startswith("fastsft-kl") and plain is not None:
            r["extra_vs_plain_ce"] = r["extra_bytes"] / plain["extra_bytes"]  # the KL anchor's cost in memory
    _results.write(result, args.out, smoke=args.smoke, suffix="loss-memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
