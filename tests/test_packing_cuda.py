"""fastsft.packing_cuda: GPU batch assembly == fastsft.packing.assemble_bins, value for value.

CPU-only machines run the torch path on CPU tensors (it shares the host plan with the CUDA kernel) and
an nvcc compile of csrc/assemble_cuda.cu; the kernel itself is checked by the `cuda`-marked tests.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastsft import packing, packing_cuda
from fastsft.data.store import TokenStore

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("input_ids", "targets", "position_ids", "row_lengths", "cu_seqlens")
requires_cuda = pytest.mark.skipif(not packing_cuda.cuda_available(),
                                   reason="needs a CUDA build of torch and a GPU")


def _random_store(rng, n, max_len, zero_frac=0.1):
    lengths = rng.integers(1, max_len + 1, n)
    lengths[rng.random(n) < zero_frac] = 0                     # empty records become empty items
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(0, 32000, int(offsets[-1])).astype(np.int32)
    labels = np.where(rng.random(len(ids)) < 0.4, packing.IGNORE_INDEX, ids).astype(np.int32)
    return TokenStore(ids, labels, offsets)


def _cases(seed=0):
    """(store, plan) pairs covering truncate/split/drop, both strategies, long and empty records."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (overflow, strategy) in enumerate([("truncate", "bfd"), ("split", "bfd"), ("split", "first_fit"),
                                              ("drop", "bfd"), ("truncate", "first_fit")]):
        store = _random_store(rng, n=int(rng.integers(20, 200)), max_len=int(rng.integers(5, 120)))
        capacity = int(rng.integers(16, 97))
        out.append((store, packing.pack(store.lengths, capacity, strategy=strategy, overflow=overflow,
                                        seed=i if i % 2 else None)))
    return out


def _bin_selections(plan, rng):
    b = plan.num_bins
    return [list(range(b)), rng.integers(0, b, 7).tolist(), [b - 1, 0, b - 1], [0], []]


def _assert_same(store, plan, bins, pad_to, pad_id, device):
    ref = packing.assemble_bins(store.ids, store.labels, store.offsets, plan.items, plan.item_starts,
                                plan.item_lengths, plan.bin_offsets, bins, pad_to=pad_to, pad_id=pad_id)
    out = packing_cuda.assemble_bins_cuda(packing_cuda.store_to_device(store, device), plan, bins,
                                          pad_to=pad_to, pad_id=pad_id)
    for name in OUTPUTS:
        got = out[name]
        assert got.device.type == torch.device(device).type, name
        got = got.cpu().numpy()
        assert got.dtype == ref[name].dtype and got.shape == ref[name].shape, name
        np.testing.assert_array_equal(got, ref[name], err_msg=name)
    assert out["max_seqlen"] == ref["max_seqlen"]


def _check_all(device):
    rng = np.random.default_rng(1)
    for store, plan in _cases():
        for bins in _bin_selections(plan, rng):
            longest = int(plan.bin_lengths[bins].max()) if bins else 0
            for pad_to, pad_id in ((None, 0), (longest, -1), (plan.capacity + 13, 2)):
                _assert_same(store, plan, bins, pad_to, pad_id, device)


# ----------------------------------------------------------------------------------------------------
# CPU: torch path, host plan, errors, compile check


def test_import_does_not_build():
    assert packing_cuda._module is None or packing_cuda.cuda_available()


def test_torch_path_matches_assemble_bins_cpu(monkeypatch):
    monkeypatch.setattr(packing_cuda, "_override_impl", "torch")
    _check_all("cpu")


def test_split_piece_targets_cross_into_next_piece_cpu():
    store = TokenStore(np.arange(10, 17, dtype=np.int32), np.arange(110, 117, dtype=np.int32),
                       np.array([0, 7], np.int64))
    plan = packing.pack(store.lengths, 3, overflow="split", strategy="first_fit")
    out = packing_cuda.assemble_bins_cuda(packing_cuda.store_to_device(store, "cpu"), plan, [0, 1, 2])
    assert out["targets"].tolist() == [[111, 112, 113], [114, 115, 116], [-100, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 0, 0]]
    assert out["cu_seqlens"].tolist() == [0, 3, 6, 7] and out["max_seqlen"] == 3


def test_errors_cpu():
    store = _random_store(np.random.default_rng(2), 30, 40)
    plan = packing.pack(store.lengths, 32)
    g = packing_cuda.store_to_device(store, "cpu")
    with pytest.raises(ValueError, match="pad_to"):
        packing_cuda.assemble_bins_cuda(g, plan, [0], pad_to=int(plan.bin_lengths[0]) - 1)
    with pytest.raises(ValueError, match="bin index"):
        packing_cuda.assemble_bins_cuda(g, plan, [plan.num_bins])
    bad = packing.PackResult(plan.bin_offsets, plan.items, plan.item_starts + 1000, plan.item_lengths, 32)
    with pytest.raises(ValueError, match="outside their record"):
        packing_cuda.assemble_bins_cuda(g, bad, [0])
    with pytest.raises(ValueError, match="int32"):
        packing_cuda.assemble_bins_cuda(dict(g, ids=g["ids"].long()), plan, [0])
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        old, packing_cuda._override_impl = packing_cuda._override_impl, "cuda"
        try:
            packing_cuda.assemble_bins_cuda(g, plan, [0])
        finally:
            packing_cuda._override_impl = old


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_kernel_compiles_with_nvcc(tmp_path):
    proc = subprocess.run(["nvcc", "-c", "-std=c++17", "-O0", str(REPO / "csrc" / "assemble_cuda.cu"),
                           "-o", str(tmp_path / "assemble_cuda.o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "assemble_cuda.o").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------
# CUDA: the kernel (and the torch path on the GPU) against the CPU oracle


@requires_cuda
@pytest.mark.parametrize("impl", ["cuda", "torch"])
def test_matches_assemble_bins_cuda(impl, monkeypatch):
    monkeypatch.setattr(packing_cuda, "_override_impl", impl)
    _check_all("cuda")


@requires_cuda
def test_large_batch_cuda(monkeypatch):
    """A 32 x 2048 batch (more slots than one grid sweep of small tests) with split records."""
    monkeypatch.setattr(packing_cuda, "_override_impl", "cuda")
    rng = np.random.default_rng(3)
    store = _random_store(rng, 400, 3000, zero_frac=0.02)
    plan = packing.pack(store.lengths, 2048, overflow="split", seed=0)
    _assert_same(store, plan, list(range(min(32, plan.num_bins))), 2048, 0, "cuda")


@requires_cuda
def test_runs_on_current_stream_cuda(monkeypatch):
    monkeypatch.setattr(packing_cuda, "_override_impl", "cuda")
    store, plan = _cases()[1]
    g = packing_cuda.store_to_device(store, "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = packing_cuda.assemble_bins_cuda(g, plan, list(range(plan.num_bins)), pad_id=5)
    stream.synchronize()
    ref = packing.assemble_bins(store.ids, store.labels, store.offsets, plan.items, plan.item_starts,
                                plan.item_lengths, plan.bin_offsets, list(range(plan.num_bins)), pad_id=5)
    np.testing.assert_array_equal(out["input_ids"].cpu().numpy(), ref["input_ids"])


@requires_cuda
def test_extension_rejects_cpu_tensors_cuda():
    mod = packing_cuda._load_extension()
    assert mod is not None, packing_cuda._build_error
    z32, z64 = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        mod.assemble_bins(z32, z32, z64, z64, z64, z64, z64, 1, 0)


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_packing_cuda.py"), "--smoke",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "rows"} <= set(result) and result["rows"]
