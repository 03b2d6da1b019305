"""Seconds from `fastsft train` to its first optimizer step, cold and with the token-store cache, beside
TRL's own preprocessing of the same records (SFTTrainer's dataset preparation: tokenise + mask).

    python benchmarks/bench_first_step.py                 # 100k records; writes results/<date>-<device>-first-step.json
    python benchmarks/bench_first_step.py --smoke         # 2k records, nothing written

Records: Alpaca-sized instruction/response pairs, GSM8K train (question -> instruction, answer -> output)
and CodeAlpaca-2k cycled to ``--records``; the real Llama-2 tokenizer (HF fast). Needs ../shared.

Rows:
  fastsft-cold    a fresh process, an empty cache: read, validate, render, tokenise, mask, write the token
                  stores, build a tiny model, one optimizer step (the wall time until step 1 is done)
  fastsft-cached  the same command again into a new run directory: the token stores come from the cache
  trl-prepare     TRL's SFTTrainer(...) on the same records as prompt/completion pairs (completion-only loss),
                  the constructor's dataset preparation timed alone (no model load, no step), with
                  dataset_num_proc = 1 and = the cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GSM8K = SHARED / "data" / "gsm8k" / "train.jsonl"
CODEALPACA = SHARED / "data" / "codealpaca" / "code_alpaca_2k.json"
TOKENIZER = SHARED / "tokenizers" / "llama2"
MAX_SEQ_LEN = 512


def alpaca_records(n: int) -> list[dict]:
    base = [{"instruction": r["question"], "input": "", "output": r["answer"]}
            for r in map(json.loads, GSM8K.read_text().splitlines())]
    base += [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
             for r in json.loads(CODEALPACA.read_text()) if r["output"].strip()]  # a few have no response
    # distinct records (a suffix per copy): no tokenizer-side caching of repeated strings
    return [{**r, "instruction": f"{r['instruction']} ({i // len(base)})" if i >= len(base) else r["instruction"]}
            for i, r in ((i, base[i % len(base)]) for i in range(n))]


def tiny_model_json(path: Path) -> Path:
    path.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
                                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                                "rms_norm_eps": 1e-5, "tie_word_embeddings": True}))
    return path


def fastsft_to_first_step(data: Path, model_json: Path, run_dir: Path, cache: Path) -> dict:
    """Wall seconds until `fastsft train` has done step 1 (the `kernels:` line follows it at once)."""
    cmd = [sys.executable, "-m", "fastsft", "train", "--data", str(data), "--format", "alpaca",
           "--model.config", str(model_json), "--model.tokenizer", str(TOKENIZER),
           "--data.max_seq_len", str(MAX_SEQ_LEN), "--data.eval_fraction", "0", "--train.max_steps", "1",
           "--train.micro_batch_size", "2", "--eval.exact_match", "0", "--eval.max_records", "1",
           "--output.progress", "false", "--output.plot", "false", "--output.dir", str(run_dir)]
    env = {**os.environ, "FASTSFT_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_step, from_cache, tail = None, False, []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        from_cache |= "token stores from the cache" in line
        if first_step is None and line.startswith("kernels:"):
            first_step = time.perf_counter() - t0
    if proc.wait() != 0 or first_step is None:
        raise RuntimeError(f"fastsft train failed: {' '.join(cmd)}\n{''.join(tail)}")
    return {"seconds_to_first_step": first_step, "token_stores_from_cache": from_cache}


def trl_prepare(records: list[dict], num_proc: int | None) -> dict:
    """SFTTrainer's dataset preparation (tokenise + completion mask) on the same records, timed alone."""
    import torch
    import transformers
    import datasets
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()

    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok.pad_token = tok.pad_token or tok.unk_token
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
    ds = Dataset.from_list([{"prompt": prompt.format(instruction=r["instruction"]), "completion": r["output"]}
                            for r in records])
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_length=MAX_SEQ_LEN, dataset_num_proc=num_proc, report_to=[],
                         completion_only_loss=True, use_cpu=True)
        t0 = time.perf_counter()
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "records_per_s": len(records) / seconds, "dataset_num_proc": num_proc,
            "rows": len(trainer.train_dataset)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--smoke", action="store_true", help="2k records, nothing written")
    p.add_argument("--out", type=Path)
    p.add_argument("--no-trl", action="store_true")
    args = p.parse_args(argv)
    if not (GSM8K.exists() and CODEALPACA.exists() and TOKENIZER.exists()):
        print(f"needs {GSM8K}, {CODEALPACA} and {TOKENIZER}", file=sys.stderr)
        return 2
    n = 2000 if args.smoke else args.records
    records = alpaca_records(n)
    result = _results.header("first-step", f"cpu-{os.cpu_count()}core")
    result.update(cpu=_cpu_model(), records=n, max_seq_len=MAX_SEQ_LEN, cores=os.cpu_count(),
                  versions=_results.dist_versions("torch", "transformers", "tokenizers", "trl", "datasets"), rows=[])
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = work / "alpaca.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        model_json = tiny_model_json(work / "model.json")
        cache = work / "cache"
        for name in ("fastsft-cold", "fastsft-cached"):
            row = {"provider": name, **fastsft_to_first_step(data, model_json, work / name, cache)}
            row["records_per_s"] = n / row["seconds_to_first_step"]
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
        if not args.no_trl:
            for num_proc in (None, os.cpu_count()):
                row = {"provider": "trl-prepare", **trl_prepare(records, num_proc)}
                print(json.dumps(row), flush=True)
                result["rows"].append(row)
    _results.write(result, args.out, smoke=args.smoke, suffix="first-step")
    return 0


def _cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown")


if __name__ == "__main__":
    sys.exit(main())
