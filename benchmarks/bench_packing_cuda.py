"""Packed-batch assembly: fastsft.packing_cuda (GPU kernel) against fastsft.packing.assemble_bins (CPU).

    python benchmarks/bench_packing_cuda.py                      # GPU: writes benchmarks/results/...
    python benchmarks/bench_packing_cuda.py --smoke              # CPU-only: tiny shapes, checks the script

Batch: 32 rows x 2048 tokens (64k token slots), from a store of records with lognormal lengths
(median ~270 tokens, sigma 1.0, clipped to 1..8192; seeded), packed best-fit-decreasing with
overflow="split", bins shuffled (seed 0); the first 32 bins are assembled with pad_to=2048.

Rows (median over --reps; GPU rows timed with CUDA events, CPU rows with perf_counter):
  cuda-end-to-end    assemble_bins_cuda: host plan (O(items) numpy) + one upload + kernel
  cuda-kernel        the extension call alone, plan already on the device
  torch-end-to-end   the same call forced onto the torch fallback path (on the GPU)
  cpu                fastsft.packing.assemble_bins (native C++ when built), output on the host
  cpu+h2d            the CPU result uploaded to the GPU (what the trainer pays without the kernel)
Outputs are compared against the CPU result once before timing. Results go to
benchmarks/results/<date>-<device>-packing-assembly.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import _results  # benchmarks/_results.py (the script's own directory is on sys.path)
import torch

from fastsft import packing, packing_cuda
from fastsft.data.store import TokenStore


def make_batch(rows: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = max(8, rows * width // 150)  # enough records to fill `rows` bins at ~270 tokens each
    lengths = np.clip(np.round(rng.lognormal(np.log(270), 1.0, n)), 1, 8192).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(0, 32000, int(offsets[-1])).astype(np.int32)
    labels = np.where(rng.random(len(ids)) < 0.4, packing.IGNORE_INDEX, ids).astype(np.int32)
    store = TokenStore(ids, labels, offsets)
    plan = packing.pack(store.lengths, width, overflow="split", seed=seed)  # shuffled: a typical batch
    bins = list(range(min(rows, plan.num_bins)))
    return store, plan, bins


def cpu_assemble(store, plan, bins, width):
    return packing.assemble_bins(store.ids, store.labels, store.offsets, plan.items, plan.item_starts,
                                 plan.item_lengths, plan.bin_offsets, bins, pad_to=width)


def time_host(fn, reps: int, warmup: int = 3, sync=None) -> float:
    """Median ms of fn() wall time (synchronised when `sync` is given)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_cuda(fn, reps: int, warmup: int = 3) -> float:
    """Median ms between CUDA events around fn() (host work in fn counts: the GPU waits for it)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check_equal(out: dict, ref: dict):
    for name in ("input_ids", "targets", "position_ids", "row_lengths", "cu_seqlens"):
        np.testing.assert_array_equal(out[name].cpu().numpy(), ref[name], err_msg=name)
    assert out["max_seqlen"] == ref["max_seqlen"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Shapes
    p.add_argument("--rows", type=int, default=32, help="rows (bins) per batch")
    p.add_argument("--width", type=int, default=2048, help="bin capacity and pad_to")
    # Runtime
    p.add_argument("--reps", type=int, default=100, help="timed repetitions per row (median reported)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU-only machines times the torch "
                   "path on CPU tensors and exits 0")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/...)")
    args = p.parse_args(argv)

    on_gpu = packing_cuda.cuda_available()
    if not on_gpu and not args.smoke:
        print("bench_packing_cuda: needs a CUDA build of torch and a GPU (use --smoke on CPU)",
              file=sys.stderr)
        return 2
    if args.smoke:
        args.rows, args.width, args.reps = 4, 512, 3
    store, plan, bins = make_batch(args.rows, args.width)
    ref = cpu_assemble(store, plan, bins, args.width)
    real_tokens = int(ref["row_lengths"].sum())
    rows = []

    def add(provider, ms, **extra):
        row = {"provider": provider, "ms": round(ms, 4), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    add("cpu", time_host(lambda: cpu_assemble(store, plan, bins, args.width), args.reps),
        impl="native" if packing.native_available() else "python")
    if on_gpu:
        device = "cuda"
        store_gpu = packing_cuda.store_to_device(store, device)
        sync = torch.cuda.synchronize
        add("cpu+h2d", time_host(lambda: _cpu_then_upload(store, plan, bins, args.width, device),
                                 args.reps, sync=sync))
        for impl in ("cuda", "torch"):
            packing_cuda._override_impl = impl
            try:
                def fn():
                    return packing_cuda.assemble_bins_cuda(store_gpu, plan, bins, pad_to=args.width)

                check_equal(fn(), ref)
                add(f"{impl}-end-to-end", time_cuda(fn, args.reps),
                    host_wall_ms=round(time_host(fn, args.reps, sync=sync), 4))
            finally:
                packing_cuda._override_impl = None
        mod = packing_cuda._load_extension()
        meta, k, r, w, _, _ = packing_cuda._plan(plan, bins, args.width, len(store.offsets) - 1, None)
        meta_d = torch.from_numpy(meta).to(device)
        items, starts, item_out, _, row_lengths = torch.split(meta_d, [k, k, k, k + 1, r])
        add("cuda-kernel", time_cuda(lambda: mod.assemble_bins(store_gpu["ids"], store_gpu["labels"],
                                                               store_gpu["offsets"], items, starts, item_out,
                                                               row_lengths, w, 0), args.reps))
        device_name = torch.cuda.get_device_name()
    else:
        print("bench_packing_cuda --smoke: no CUDA here; timing the torch path on CPU tensors only")
        store_cpu = packing_cuda.store_to_device(store, "cpu")
        fn = lambda: packing_cuda.assemble_bins_cuda(store_cpu, plan, bins, pad_to=args.width)  # noqa: E731
        check_equal(fn(), ref)
        add("torch-cpu-end-to-end", time_host(fn, args.reps))
        device_name = platform.processor() or "cpu"

    result = {
        **_results.header("packing_assembly", device_name),
        "versions": {**_results.versions("numpy", "fastsft"), "torch": torch.__version__, "cuda": torch.version.cuda},
        "shape": {"rows": len(bins), "width": args.width, "real_tokens": real_tokens,
                  "items": int(plan.bin_offsets[len(bins)]) if bins else 0}, "reps": args.reps, "rows": rows,
    }
    _results.write(result, args.out, smoke=args.smoke, suffix="packing-assembly")
    return 0


def _cpu_then_upload(store, plan, bins, width, device):
    out = cpu_assemble(store, plan, bins, width)
    return {k: torch.from_numpy(out[k]).to(device) for k in ("input_ids", "targets", "position_ids")}


if __name__ == "__main__":
    sys.exit(main())
