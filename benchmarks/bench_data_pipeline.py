"""Data pipeline: records per second from files to trainable token ids and labels (tokenise + mask).

    python -m pytest benchmarks/bench_data_pipeline.py --benchmark-only

Records: GSM8K train (question/answer mapped onto Alpaca's instruction/output) and CodeAlpaca-2k, 9,490
records in the Alpaca template, Llama-2 tokenizer (HF fast tokenizer). Skipped when ../shared is absent.

Providers (each records records/s and tokens/s in extra_info):
  fastsft-build-dataset  fastsft.data.build_dataset, the trainer's own path: read and validate every
                         record, render, one batched tokenizer call per 512 texts, labels from character
                         offsets, one flat TokenStore (what `fastsft train` does before step 1)
  alpaca-reference       Stanford Alpaca's train.py preprocessing: the prompt and prompt + response
                         tokenized one string at a time (`tokenizer(text, return_tensors="pt")`), labels
                         = ids with the first len(prompt ids) set to -100; the recipe most SFT scripts copy
                         (TRL's prompt/completion path tokenizes per record the same way)
  hf-batched             the same masking with both tokenizer calls batched over all records: what
                         batching alone buys, without fastsft's validation and offset-based masks
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import _results

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
CODEALPACA = SHARED / "data" / "codealpaca" / "code_alpaca_2k.json"
TOKENIZER = SHARED / "tokenizers" / "llama2"

pytestmark = pytest.mark.skipif(not (GSM8K.exists() and CODEALPACA.exists() and TOKENIZER.exists()),
                                reason=f"needs {GSM8K}, {CODEALPACA} and {TOKENIZER}")


@pytest.fixture(scope="module")
def examples():
    """(prompt, response) pairs exactly as fastsft renders them (Alpaca template)."""
    from fastsft.data.templates import alpaca_prompt

    rows = [json.loads(line) for line in GSM8K.read_text().splitlines() if line.strip()]
    out = [(alpaca_prompt(r["question"]), r["answer"]) for r in rows]
    out += [(alpaca_prompt(r["instruction"], r.get("input", "")), r["output"]) for r in json.loads(CODEALPACA.read_text())]
    return out


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def _record(benchmark, n_records: int, n_tokens: int):
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(records=n_records, tokens=n_tokens, seconds=seconds,
                                throughput=n_records / seconds, unit="records/s", tokens_per_s=n_tokens / seconds,
                                versions=_results.versions("transformers", "tokenizers", "fastsft"))


def test_fastsft_build_dataset(benchmark):
    from fastsft.data import build_dataset, load_tokenizer

    tokenizer = load_tokenizer(str(TOKENIZER))
    specs = [{"path": str(GSM8K), "format": "alpaca", "fields": {"instruction": "question", "output": "answer"}},
             {"path": str(CODEALPACA), "format": "alpaca"}]

    def run():
        return build_dataset(specs, tokenizer, max_seq_len=4096, skip_bad_records=True, seed=0)

    bundle = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    store = bundle.train
    _record(benchmark, len(store), store.num_tokens)
    benchmark.extra_info["note"] = "read + validate + render + tokenize + mask, from the files"


def test_alpaca_reference(benchmark, examples, hf_tokenizer):
    tok = hf_tokenizer

    def run():
        out = []
        for prompt, response in examples:
            source = tok(prompt, return_tensors="pt").input_ids[0]
            full = tok(prompt + response + tok.eos_token, return_tensors="pt").input_ids[0]
            labels = full.clone()
            labels[: len(source)] = -100
            out.append((full, labels))
        return out

    out = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    _record(benchmark, len(out), sum(len(ids) for ids, _ in out))
    benchmark.extra_info["note"] = "tokenize + mask only (records already in memory)"


def test_hf_batched(benchmark, examples, hf_tokenizer):
    tok = hf_tokenizer
    prompts = [p for p, _ in examples]
    fulls = [p + r + tok.eos_token for p, r in examples]

    def run():
        sources = tok(prompts).input_ids
        out = []
        for source, full in zip(sources, tok(fulls).input_ids):
            out.append((full, [-100] * len(source) + full[len(source):]))
        return out

    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _record(benchmark, len(out), sum(len(ids) for ids, _ in out))
    benchmark.extra_info["note"] = "tokenize + mask only (records already in memory)"
