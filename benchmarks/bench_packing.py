"""Sequence packing: fastsft native / Python BFD against TRL, a Python FFD and the sorting floor.

    python -m pytest benchmarks/bench_packing.py --benchmark-only

Lengths: N = 1,000,000 drawn with replacement (seeded) from the real token lengths of GSM8K train and
CodeAlpaca-2k rendered with the Alpaca template (prompt + response + EOS) and tokenized with the
Llama-2 tokenizer; packed into 2048-token bins (overflow: truncate). Skipped when ../shared/data or
the tokenizer is absent.

Providers (each records seconds, bins and efficiency = packed tokens / (bins * 2048) in extra_info):
  fastsft-native-bfd    fastsft.packing.pack, C++ path
  fastsft-python-bfd    the same call forced onto the pure-Python path
  python-ffd            first-fit-decreasing in pure Python (fastsft's Python first-fit segment tree
                        over the lengths sorted decreasing)
  trl-bfd               trl.data_utils.pack_dataset(ds, seq_length=2048, strategy="bfd") on a
                        datasets.Dataset of dummy token lists. It is timed on the first 100,000 lengths
                        and its time scaled by 10 (1M rows is ~1 GB of Arrow lists); note that TRL packs
                        inside each `Dataset.map` batch (1,000 rows by default), which is why its
                        efficiency is lower.
  numpy-argsort         np.argsort of the lengths: the sorting floor any BFD must pay
A summary table (time, x vs TRL, x vs argsort, efficiency) is printed at the end of the session.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import _results  # benchmarks/_results.py (pytest puts this directory on sys.path)
import numpy as np
import pytest

from fastsft import packing

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
CODEALPACA = SHARED / "data" / "codealpaca" / "code_alpaca_2k.json"
TOKENIZER = SHARED / "tokenizers" / "llama2" / "tokenizer.json"
N = 1_000_000
TRL_N = 100_000
CAPACITY = 2048
RESULTS: dict[str, dict] = {}


def _alpaca_examples():
    from fastsft.data.templates import alpaca_prompt

    rows = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]
    examples = [(alpaca_prompt(r["question"]), r["answer"]) for r in rows]
    for r in json.loads(CODEALPACA.read_text()):
        examples.append((alpaca_prompt(r["instruction"], r.get("input", "")), r["output"]))
    return examples


@pytest.fixture(scope="module")
def lengths():
    if not (GSM8K.exists() and CODEALPACA.exists() and TOKENIZER.exists()):
        pytest.skip(f"needs {GSM8K}, {CODEALPACA} and {TOKENIZER}")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    examples = _alpaca_examples()
    prompts = tok.encode_batch([p for p, _ in examples], add_special_tokens=False)
    responses = tok.encode_batch([r for _, r in examples], add_special_tokens=False)
    real = np.array([len(p.ids) + len(r.ids) + 1 for p, r in zip(prompts, responses)], np.int64)  # + EOS
    return np.random.default_rng(0).choice(real, size=N, replace=True)


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    if not RESULTS:
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        _print_summary()


def _print_summary():
    trl = RESULTS.get("trl-bfd", {}).get("seconds")
    floor = RESULTS.get("numpy-argsort", {}).get("seconds")
    print("")
    print(f"packing {N:,} lengths into {CAPACITY}-token bins (min over rounds):")
    print(f"{'provider':22s} {'seconds':>9s} {'vs trl':>8s} {'/argsort':>9s} {'bins':>8s} {'efficiency':>10s}")
    for name, r in RESULTS.items():
        vs_trl = f"{trl / r['seconds']:7.1f}x" if trl else "-"
        vs_floor = f"{r['seconds'] / floor:8.2f}x" if floor else "-"
        eff = f"{r['efficiency']:.4f}" if "efficiency" in r else "-"
        print(f"{name:22s} {r['seconds']:9.4f} {vs_trl:>8s} {vs_floor:>9s} "
              f"{r.get('bins', '-'):>8} {eff:>10s}{'  ' + r['note'] if 'note' in r else ''}")


def _versions() -> dict:
    return {**_results.versions("numpy", "trl", "datasets", "fastsft"), "fastsft_native": packing.native_available()}


def _record(benchmark, name, seconds=None, **info):
    seconds = benchmark.stats.stats.min if seconds is None else seconds
    info.update(seconds=seconds, throughput=N / seconds, unit="lengths/s")
    benchmark.extra_info.update(info, versions=_versions())
    RESULTS[name] = info


def _pack_info(r):
    return {"bins": r.num_bins, "efficiency": r.efficiency, "truncated": r.truncated}


def test_fastsft_native_bfd(benchmark, lengths, monkeypatch):
    if not packing.native_available():
        pytest.skip("fastsft._packing is not built")
    monkeypatch.setattr(packing, "_override_impl", "native")
    r = benchmark.pedantic(packing.pack, (lengths, CAPACITY), {"seed": 0}, rounds=5, warmup_rounds=1)
    _record(benchmark, "fastsft-native-bfd", **_pack_info(r))


def test_fastsft_python_bfd(benchmark, lengths, monkeypatch):
    monkeypatch.setattr(packing, "_override_impl", "python")
    r = benchmark.pedantic(packing.pack, (lengths, CAPACITY), {"seed": 0}, rounds=2)
    _record(benchmark, "fastsft-python-bfd", **_pack_info(r))


def test_python_ffd(benchmark, lengths, monkeypatch):
    monkeypatch.setattr(packing, "_override_impl", "python")

    def ffd():
        return packing.pack(np.sort(np.minimum(lengths, CAPACITY))[::-1], CAPACITY, strategy="first_fit")
    r = benchmark.pedantic(ffd, rounds=1)
    _record(benchmark, "python-ffd", **_pack_info(r))


def test_trl_bfd(benchmark, lengths):
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    trl_data_utils = pytest.importorskip("trl.data_utils")
    sub = lengths[:TRL_N]
    offsets = np.concatenate([[0], np.cumsum(sub)]).astype(np.int32)
    values = pa.array(np.ones(int(offsets[-1]), np.int32))
    table = pa.table({"input_ids": pa.ListArray.from_arrays(pa.array(offsets), values)})

    def trl_pack():
        ds = datasets.Dataset(datasets.table.InMemoryTable(table))
        return trl_data_utils.pack_dataset(ds, seq_length=CAPACITY, strategy="bfd")
    t0 = time.perf_counter()
    out = benchmark.pedantic(trl_pack, rounds=1)
    measured = time.perf_counter() - t0
    bins = len(out)
    packed = int(np.minimum(sub, CAPACITY).sum())
    _record(benchmark, "trl-bfd", seconds=measured * N / TRL_N, measured_seconds=measured, rows=TRL_N,
            bins=bins, efficiency=packed / (bins * CAPACITY),
            note=f"timed at {TRL_N:,} rows, scaled x{N // TRL_N}")


def test_numpy_argsort(benchmark, lengths):
    benchmark.pedantic(np.argsort, (lengths,), rounds=5, warmup_rounds=1)
    _record(benchmark, "numpy-argsort")
