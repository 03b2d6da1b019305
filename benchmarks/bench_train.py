"""Training throughput on one GPU: fastsft against transformers + peft + bitsandbytes, Liger and Unsloth.

    python benchmarks/bench_train.py                                   # GPU: every model, every system
    python benchmarks/bench_train.py --models llama-3.1-8b --systems fastsft,hf,hf-liger,unsloth
    python benchmarks/bench_train.py --smoke                           # CPU: toy shapes, 2 steps a system
    python benchmarks/report.py --merge A.json B.json                  # join runs made in several calls

Workload (identical for every system)
    Models: the Llama-3.1-8B, Llama-3.2-1B and Qwen2.5-0.5B architectures from their config.json
    (benchmarks/_workload.py), random weights, nothing downloaded. QLoRA: the q/k/v/o/gate/up/down
    projections of every layer in bitsandbytes NF4 (blocksize 64, double quantization, bf16 compute),
    LoRA r=16, alpha=16, no dropout, on all seven; embeddings, norms and the LM head frozen in bf16;
    LoRA weights and AdamW state in fp32; bf16 autocast; gradient checkpointing on every decoder layer.
    Data: one JSONL file of records whose (prompt, response) token lengths are drawn from the real
    GSM8K + CodeAlpaca distribution (mean 214 tokens, max 703; _workload.py), max_seq_len 2048,
    read by every system through fastsft's data pipeline (byte tokenizer: same ids, same labels).
    Optimizer: AdamW lr 2e-4, betas (0.9, 0.999), eps 1e-8, no weight decay, fastsft's cosine schedule,
    gradient clipping at 1.0; loss = mean over the response tokens of the whole optimizer step.
    Effective batch: packed systems take --grad-accum micro-batches of --rows rows of max_seq_len
    tokens per step; padded systems take the same number of records per step on average, in
    micro-batches of as many records as fill a packed micro-batch's tokens on average
    (round(rows * max_seq_len / mean record length)), or of --padded-records records.

Systems (each in its own process: clean peak memory, and a crash is a row, not a dead harness)
    fastsft                      fastsft.train.loop.train(cfg): kernels auto (all native pieces on CUDA),
                                 packing, NF4 base, the same config objects as `fastsft train`
    fastsft-no-<piece>           the same with one piece off: fused-loss (train.kernels_off loss),
                                 fused-lora (lora: fused LoRA blocks and the Triton NF4 dequant),
                                 packing (data.packing false: padded, length-grouped batches),
                                 norm-rope-swiglu (rms_norm, rope, swiglu), or rms_norm/rope/swiglu alone;
                                 fastsft-kernels-off: train.kernels off (every native piece off)
    hf                           transformers AutoModelForCausalLM.from_config (SDPA), its projections
                                 swapped for bitsandbytes Linear4bit, peft LoRA, padded batches with an
                                 attention mask, the loss from the model's own logits
    hf-liger                     hf with Liger-Kernel's apply_liger_kernel_to_<arch> (RMSNorm, RoPE,
                                 SwiGLU, fused linear cross-entropy) before peft
    unsloth                      Unsloth, when installed (see UNSLOTH_NOTE for why it is not carried)

Measurements
    The first --warmup optimizer steps are not timed (Triton compilation and autotuning, allocator
    warm-up). Over the next --steps steps: tokens/s = real (non-pad) tokens / time, response tokens/s
    likewise, step time = mean seconds per optimizer step, peak memory = torch.cuda.max_memory_allocated
    from the first training step on (model setup, e.g. a bf16 base held before it is quantized, is not
    counted; on CPU the process's peak RSS). fastsft's numbers are read from its own metrics.jsonl,
    and its row carries the run's kernels_used (summary.json): a piece that fell back to its reference
    path on the GPU, unless the row's ablation switched it off, is listed under "handicapped" and the
    report marks the row, so a number measured on a fallback is never published as fastsft's.

MFU (model FLOPs utilisation) = model FLOPs per second / the bf16 matmul rate measured in the same run
(a 8192^3 torch.mm, median of 20 timed with CUDA events). Model FLOPs, per _workload.Flops:
    per real token     (2P + 2A) forward + (2P + 2A) input gradient + 2A LoRA weight gradient
                       + (2P + 2A) recompute under gradient checkpointing; no weight gradient for the
                       frozen projections P; A = sum of r * (d_in + d_out) over the LoRA adapters
    per sequence       attention 2 L^2 H d forward (causal), 4 L^2 H d backward, 2 L^2 H d recompute,
                       per layer; sum over records of L^2 (padding and cross-record pairs not counted)
    per response token the frozen LM head: 2 D V forward + 2 D V input gradient (prompt tokens need
                       no logits)
All systems are charged the same FLOPs for the same tokens, so MFU ranks them as tokens/s does.

Output: benchmarks/results/<date>-<device>.json (rewritten after every row, so a run cut short keeps
what it measured) and the same table as markdown beside it (.md); --out chooses another path.
`python benchmarks/report.py --readme` puts the latest results file's table into README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import _results  # benchmarks/_results.py (the script's own directory is on sys.path)
import _workload

LR = 2e-4
LORA_R, LORA_ALPHA = 16, 16.0

UNSLOTH_NOTE = (
    "unsloth is not installed: its wheels cannot be carried to the GPU machine, which has no network "
    "and takes at most 64 MiB (working tree included) per call. unsloth 2026.10.9 is a 28.6 MB wheel and "
    "unsloth_zoo 2.9 MB, and they need bitsandbytes (43.1 MB, also needed by the hf rows) in the same "
    "call: 74.6 MB before their other pins (torchao, xformers built for the machine's torch 2.11, "
    "datasets<5, tyro, trl<=1.15, diffusers, ...), none of which the machine has")


@dataclass
class System:
    kind: str                       # fastsft | hf | unsloth
    about: str
    options: dict = field(default_factory=dict)   # fastsft: config overrides; hf: {"liger": True}


SYSTEMS: dict[str, System] = {
    "fastsft": System("fastsft", "fastsft, every native piece on"),
    "fastsft-no-fused-loss": System("fastsft", "fastsft, fused linear cross-entropy off",
                                    {"train.kernels_off": ["loss"]}),
    "fastsft-no-fused-lora": System("fastsft", "fastsft, fused LoRA blocks / Triton NF4 dequant off",
                                    {"train.kernels_off": ["lora"]}),
    "fastsft-no-packing": System("fastsft", "fastsft, padded length-grouped batches instead of packing",
                                 {"data.packing": False}),
    "fastsft-no-norm-rope-swiglu": System("fastsft", "fastsft, RMSNorm/RoPE/SwiGLU kernels off",
                                          {"train.kernels_off": ["rms_norm", "rope", "swiglu"]}),
    "fastsft-no-rms_norm": System("fastsft", "fastsft, RMSNorm kernel off", {"train.kernels_off": ["rms_norm"]}),
    "fastsft-no-rope": System("fastsft", "fastsft, RoPE kernel off", {"train.kernels_off": ["rope"]}),
    "fastsft-no-swiglu": System("fastsft", "fastsft, SwiGLU kernel off", {"train.kernels_off": ["swiglu"]}),
    "fastsft-kernels-off": System("fastsft", "fastsft, every native kernel off (train.kernels off)",
                                  {"train.kernels": "off"}),
    "hf": System("hf", "transformers + peft + bitsandbytes, padded, SDPA"),
    "hf-liger": System("hf", "transformers + peft + bitsandbytes + Liger-Kernel, padded, SDPA", {"liger": True}),
    "unsloth": System("unsloth", "Unsloth"),
}
DEFAULT_SYSTEMS = ["fastsft", "fastsft-no-fused-loss", "fastsft-no-fused-lora", "fastsft-no-packing",
                   "fastsft-no-norm-rope-swiglu", "hf", "hf-liger", "unsloth"]


# ----------------------------------------------------------------------------------------------------
# availability: a system that cannot run here gets a row with the reason, without a process


def unavailable(name: str, cuda: bool) -> str | None:
    kind, opts = SYSTEMS[name].kind, SYSTEMS[name].options
    if kind == "hf":
        missing = [m for m in ("transformers", "peft", "bitsandbytes") if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed"
        if opts.get("liger"):
            if importlib.util.find_spec("liger_kernel") is None:
                return "liger-kernel not installed (carry it: ../shared/tools/gpu-wheels.sh)"
            if not cuda:
                return "needs CUDA (Liger-Kernel's ops are Triton GPU kernels)"
    if kind == "unsloth":
        if importlib.util.find_spec("unsloth") is None:
            return UNSLOTH_NOTE
        if not cuda:
            return "needs CUDA (Unsloth runs on NVIDIA/AMD/Intel GPUs only)"
        return "unsloth is installed, but this harness has no Unsloth runner yet (it could not be carried " \
               "to the GPU machine when the harness was written)"
    return None


# ----------------------------------------------------------------------------------------------------
# workers: each runs in its own process (`--worker spec.json`) and writes a result JSON


def _peak_memory(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB


def worker_matmul(spec) -> dict:
    """The dense matmul rate MFU is measured against: bf16 on CUDA (fp32 on CPU)."""
    import torch

    cuda = spec["device"] == "cuda"
    n, reps = (8192, 20) if cuda else (512, 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=spec["device"], dtype=dtype)  # random data: zeros run faster
    b = torch.randn(n, n, device=spec["device"], dtype=dtype)
    times = []
    for i in range(3 + reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            seconds = time.perf_counter() - t0
        if i >= 3:
            times.append(seconds)
    out = {"size": n, "dtype": str(dtype).replace("torch.", ""), "reps": reps,
           "tflops": 2 * n**3 / statistics.median(times) / 1e12, "torch": torch.__version__}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(device_name=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   multiprocessors=props.multi_processor_count, memory_bytes=props.total_memory)
    else:
        out.update(device_name=f"cpu-{os.cpu_count()}core", threads=torch.get_num_threads())
    return out


def worker_fastsft(spec) -> dict:
    """fastsft's own trainer on the workload; the numbers come from its metrics.jsonl."""
    from fastsft import config as config_mod
    from fastsft.train.loop import train

    run_dir = Path(spec["workdir"]) / "run"
    padded = spec["options"].get("data.packing") is False
    options = {
        "model.config": spec["config_json"], "model.tokenizer": "byte", "model.load_in_4bit": True,
        "model.gradient_checkpointing": True,
        "lora.r": LORA_R, "lora.alpha": LORA_ALPHA, "lora.dropout": 0.0, "lora.target_modules": _workload.ALL_LINEAR,
        "data.datasets": [{"path": spec["data"], "format": "prompt_completion"}],
        "data.max_seq_len": spec["max_seq_len"], "data.eval_fraction": 0.0,
        "train.max_steps": spec["warmup"] + spec["steps"],
        "train.grad_accum": spec["padded_grad_accum"] if padded else spec["grad_accum"],
        "train.micro_batch_size": spec["records_per_micro"] if padded else spec["rows"],
        "train.lr": LR, "train.max_grad_norm": 1.0, "train.device": spec["device"], "train.seed": 0,
        "eval.exact_match": 0, "eval.every": 0,
        "output.dir": str(run_dir), "output.log_every": 1, "output.progress": False, "output.plot": False,
        "output.save_random_base": False,  # an 8B random base would be 16 GB of disk writes per run
        "output.overwrite": True, "output.checkpoint_minutes": 0,  # a scratch run; no mid-run checkpoint in the timings
        **spec["options"],
    }
    cfg = config_mod.Config()
    for key, value in options.items():
        config_mod.set_option(cfg, key, value)
    config_mod.validate(cfg)
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("kind") == "train"]
    timed = [r for r in steps if r["step"] > spec["warmup"]]
    if len(timed) != spec["steps"]:
        raise RuntimeError(f"expected {spec['steps']} timed steps in metrics.jsonl, found {len(timed)}")
    times = [r["step_time_s"] for r in timed]
    return {
        "step_times_s": times,
        "tokens": [r["tokens_per_s"] * t for r, t in zip(timed, times)],
        "response_tokens": [r["response_tokens_per_s"] * t for r, t in zip(timed, times)],
        "losses": [r["loss"] for r in steps],
        "peak_memory_bytes": steps[-1]["peak_memory_bytes"],
        "packing_efficiency": statistics.mean(r["packing_efficiency"] for r in timed),
        "micro_batch": options["train.micro_batch_size"], "micro_batch_unit": "records" if padded else "rows",
        "grad_accum": options["train.grad_accum"],
        "setup_s": wall - sum(r["step_time_s"] for r in steps),
        "trainer_seconds": summary.get("seconds"),
        # the path each native piece took, and any taken on a GPU that this system did not switch off
        "kernels_used": summary["kernels_used"],
        "handicapped": handicaps(summary["kernels_used"], spec["options"], spec["device"] == "cuda"),
    }


KERNEL_PIECES = ("loss", "lora", "rms_norm", "rope", "swiglu")


def handicaps(used: dict, options: dict, cuda: bool) -> list[str]:
    """``piece: reason`` for every piece that ran its reference path on a GPU although this system does
    not switch it off (an ablation row's own piece is not a handicap): such a row is marked, never
    published as if every native piece had run."""
    if not cuda:
        return []
    off = set(options.get("train.kernels_off", []))
    if options.get("train.kernels") == "off":
        off |= set(KERNEL_PIECES)
    if options.get("data.packing") is False:
        off.add("attention")  # padded rows: no packed attention to choose a kernel for
    out = []
    for piece, entry in used.items():
        if piece in off or entry["path"] not in ("reference", "mixed"):
            continue
        reason = entry.get("reason") if entry["path"] == "reference" else entry["reference"].get("reason")
        out.append(f"{piece}: {reason}")
    return out


def _hf_model(config: dict, device: str, dtype, liger: bool = False, load_in_4bit: bool = True,
              checkpointing: bool = True):
    """A random transformers model of this config, its projections in bitsandbytes NF4, as
    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double quant))`` would give."""
    import torch
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**config)
    with torch.device(device):  # random init directly on the GPU
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    if load_in_4bit:
        _to_bnb_nf4(model, dtype, device)
    if liger:
        import liger_kernel.transformers as lk

        getattr(lk, f"apply_liger_kernel_to_{config['model_type']}")(model=model)
    if not checkpointing:
        return model
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _to_bnb_nf4(model, dtype, device) -> None:
    """Swap the projections for bitsandbytes Linear4bit (NF4, blocksize 64, double quantization)."""
    import bitsandbytes as bnb
    from torch import nn

    targets = set(_workload.ALL_LINEAR)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rsplit(".", 1)[-1] in targets]
    for name in names:  # one layer at a time: each dense weight is freed once its layer is swapped
        mod = model.get_submodule(name)
        q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
        if mod.bias is not None:
            q.bias = nn.Parameter(mod.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to(device))  # .to() quantizes
    model.is_loaded_in_4bit = True  # what transformers' 4-bit loader sets; peft picks its bnb LoRA layer by it


def worker_hf(spec) -> dict:
    """transformers + peft + bitsandbytes (+ Liger), padded batches, SDPA."""
    import numpy as np
    import peft
    import torch

    from fastsft.data import build_dataset, load_tokenizer
    from fastsft.train.batching import IGNORE_INDEX, collate, epoch_batches
    from fastsft.train.loop import lr_lambda

    device = spec["device"]
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer("byte")
    store = build_dataset([{"path": spec["data"], "format": "prompt_completion"}], tokenizer,
                          max_seq_len=spec["max_seq_len"], seed=0).train
    model = _hf_model(spec["hf_config"], device, dtype, liger=spec["options"].get("liger", False))
    lora = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                           target_modules=_workload.ALL_LINEAR, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = spec["warmup"] + spec["steps"]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total=total, warmup=int(0.03 * total), schedule="cosine", min_ratio=0.0))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    mbs, accum = spec["records_per_micro"], spec["padded_grad_accum"]

    def micro_batches():
        epoch = 0
        while True:
            for indices in epoch_batches(store.lengths, mbs, 0, epoch, group_by_length=True):
                b = collate(store, indices, tokenizer.pad_id)
                width = b["input_ids"].shape[1]
                labels = torch.full_like(b["targets"], IGNORE_INDEX)
                labels[:, 1:] = b["targets"][:, :-1]  # transformers shifts labels itself
                mask = torch.from_numpy(np.arange(width)[None, :] < store.lengths[indices][:, None]).long()
                yield {"input_ids": b["input_ids"], "attention_mask": mask, "labels": labels,
                       "tokens": b["num_tokens"], "targets": int((b["targets"] != IGNORE_INDEX).sum())}
            epoch += 1

    stream = micro_batches()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    setup = time.perf_counter() - t0
    times, tokens, responses, losses = [], [], [], []
    for step in range(total):
        t = time.perf_counter()  # batch assembly included, as in fastsft's step time
        micro = [next(stream) for _ in range(accum)]
        num_items = sum(b["targets"] for b in micro)
        step_loss = 0.0
        for b in micro:
            with autocast():
                out = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                            labels=b["labels"].to(device), num_items_in_batch=num_items)
            loss = out.loss
            del out  # the logits: freed before the backward, as the HF Trainer does
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if cuda:
            torch.cuda.synchronize()
        losses.append(step_loss)
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - t)
            tokens.append(sum(b["tokens"] for b in micro))
            responses.append(num_items)
    return {"step_times_s": times, "tokens": tokens, "response_tokens": responses, "losses": losses,
            "peak_memory_bytes": _peak_memory(device), "micro_batch": mbs, "micro_batch_unit": "records",
            "grad_accum": accum, "setup_s": setup}


WORKERS = {"matmul": worker_matmul, "fastsft": worker_fastsft, "hf": worker_hf}


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = WORKERS[spec["kind"]](spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------------
# the parent: one process per (model, system), rows written as they come


def run_worker(spec: dict, workdir: Path, timeout: float) -> dict:
    """Run one worker; its result, or {"error": ...} with the tail of its output."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "workdir": str(workdir), "result": str(workdir / "result.json")}
    (workdir / "spec.json").write_text(json.dumps(spec))
    log = workdir / "log.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(workdir / "spec.json")],
                                  stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - t0
    lines = log.read_text(errors="replace").strip().splitlines()
    # what a kernel's self-check or a library said about falling back: worth seeing beside the numbers
    noise = ("FutureWarning", "DeprecationWarning", "warnings.warn(")
    warnings = list(dict.fromkeys(line.strip()[:300] for line in lines
                                  if ("warn" in line.lower() or "fall" in line.lower())
                                  and not any(n in line for n in noise)))[:12]
    if rc == 0 and Path(spec["result"]).exists():
        return {**json.loads(Path(spec["result"]).read_text()), "process_s": wall, "warnings": warnings}
    tail = lines[-25:]
    what = f"timed out after {timeout:.0f} s" if rc is None else f"exit status {rc}"
    print(f"  {spec.get('system', spec['kind'])}: {what}\n    " + "\n    ".join(tail[-8:]), flush=True)
    error_lines = [line for line in tail if "Error" in line or "error" in line] or tail[-3:]
    return {"error": f"{what}: {error_lines[-1][:600] if error_lines else ''}", "log_tail": "\n".join(tail)[-3000:],
            "process_s": wall}


def summarise(row: dict, flops: _workload.Flops, l2_per_token: float, tflops: float) -> dict:
    """tokens/s, response tokens/s, step time, model TFLOP/s and MFU from a worker's per-step lists."""
    seconds = sum(row["step_times_s"])
    tok_s = sum(row["tokens"]) / seconds
    resp_s = sum(row["response_tokens"]) / seconds
    model_flops_s = (flops.per_token + flops.per_l2 * l2_per_token) * tok_s + flops.per_response_token * resp_s
    return {"tokens_per_s": tok_s, "response_tokens_per_s": resp_s,
            "step_time_s": seconds / len(row["step_times_s"]),
            "tokens_per_step": sum(row["tokens"]) / len(row["tokens"]),
            "model_tflops": model_flops_s / 1e12, "mfu": model_flops_s / (tflops * 1e12)}


def _dist_versions() -> dict:
    return _results.dist_versions("torch", "triton", "transformers", "peft", "bitsandbytes", "liger-kernel",
                                  "unsloth", "fastsft")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="CPU, toy model shapes, short records, 2 steps a system")
    p.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(_workload.MODELS)}")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma-separated, from {', '.join(SYSTEMS)}")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per system (default 4; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; smoke 1)")
    p.add_argument("--rows", type=int, default=None, help="packed rows per micro-batch (default 4; smoke 2)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--padded-records", type=int, default=None,
                   help="records per padded micro-batch (default: as many tokens as a packed micro-batch on "
                        "average); padded systems then take as many micro-batches as keep the records per step")
    p.add_argument("--max-seq-len", type=int, default=None, help="default 2048; smoke 256")
    p.add_argument("--timeout", type=float, default=540, help="seconds per system before its row says timeout")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole run: systems not started by then get a 'not run' row "
                        "(keep a device call inside its limit and still write every row)")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/<date>-<device>.json)")
    p.add_argument("--keep", type=Path, default=None, help="keep the workers' directories (logs, runs) here")
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    import torch  # the parent only asks whether there is a GPU; the workers use it

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    models = (args.models or ",".join(_workload.SMOKE_MODELS if args.smoke else _workload.GPU_MODELS)).split(",")
    systems = args.systems.split(",")
    for name in models + systems:
        if name not in _workload.MODELS and name not in SYSTEMS:
            p.error(f"unknown model or system {name!r}")
    steps = args.steps or (2 if args.smoke else 4)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    rows = args.rows or (2 if args.smoke else 4)
    max_seq_len = args.max_seq_len or (256 if args.smoke else 2048)
    scale = 1 / 8 if args.smoke else 1.0  # toy models get proportionally short records

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="fastsft-bench-")) if args.keep is None else args.keep
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        # ---- workload: the same records for every system ---------------------------------------------
        prompt, response = _workload.scaled_lengths(scale)
        lengths = prompt + response
        mean_len = float(lengths.mean())
        # padded systems: the same records per step as the packed ones hold on average
        records_per_step = rows * max_seq_len / mean_len * args.grad_accum
        per_micro = args.padded_records or max(1, round(rows * max_seq_len / mean_len))
        padded_accum = max(1, round(records_per_step / per_micro))
        n_records = math.ceil(2 * (warmup + steps) * records_per_step) + 64
        data = _workload.write_records(workdir / "data.jsonl", n_records, seed=0, scale=scale)
        # attention FLOPs: sum of L^2 over the records actually written (byte tokens + BOS + EOS)
        written = [json.loads(line) for line in data.read_text().splitlines()]
        sizes = [min(len(r["prompt"]) + len(r["completion"]) + 2, max_seq_len) for r in written]
        l2_per_token = sum(n * n for n in sizes) / sum(sizes)

        # ---- the matmul rate MFU is measured against ---------------------------------------------------
        mm = run_worker({"kind": "matmul", "device": device}, workdir / "matmul", args.timeout)
        if "error" in mm:
            print(f"matmul measurement failed: {mm['error']}", file=sys.stderr)
            return 1
        device_name = mm["device_name"]
        print(f"{device_name}: {mm['dtype']} matmul {mm['tflops']:.3g} TFLOP/s; records: {n_records}, mean "
              f"{mean_len:.0f} tokens; a step: {args.grad_accum} x {rows} packed rows of {max_seq_len}, or "
              f"{padded_accum} x {per_micro} padded records", flush=True)
        result = {
            **_results.header("train_throughput", device_name), "smoke": args.smoke,
            "matmul": mm, "matmul_tflops": mm["tflops"],
            "workload": {"models": models, "systems": systems, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "load_in_4bit": True,
                         "gradient_checkpointing": True, "max_seq_len": max_seq_len, "rows_per_micro_batch": rows,
                         "records_per_micro_batch": per_micro, "grad_accum": args.grad_accum,
                         "padded_grad_accum": padded_accum,
                         "warmup_steps": warmup, "timed_steps": steps, "records": n_records,
                         "mean_record_tokens": mean_len, "length_scale": scale, "l2_per_token": l2_per_token,
                         "lr": LR, "lengths": str(_workload.LENGTHS_FILE.relative_to(_workload.REPO))},
            "flop_accounting": _workload.Flops.__doc__.strip(),
            "versions": _dist_versions(), "rows": [],
        }
        out = args.out
        if out is None and not args.smoke:
            out = _results.RESULTS_DIR / f"{result['date']}-{_results.slug(device_name)}.json"

        for model in models:
            config = _workload.hf_config(model)
            config_json = workdir / f"{model}.config.json"
            config_json.write_text(json.dumps(config, indent=1))
            flops = _workload.flops_model(config, LORA_R, checkpointing=True)
            for name in systems:
                row = {"model": model, "system": name, "about": SYSTEMS[name].about, "matmul_tflops": mm["tflops"]}
                reason = unavailable(name, cuda)
                left = args.deadline - (time.perf_counter() - started) if args.deadline else math.inf
                if reason:
                    row.update(status="skipped", reason=reason)
                elif left < 30:
                    row.update(status="skipped", reason=f"not run: the run's --deadline of {args.deadline:.0f} s "
                                                        f"was reached; run it alone with --systems {name}")
                else:
                    print(f"{model} / {name} ...", flush=True)
                    spec = {"kind": SYSTEMS[name].kind, "system": name, "device": device,
                            "options": SYSTEMS[name].options, "hf_config": config, "config_json": str(config_json),
                            "data": str(data), "max_seq_len": max_seq_len, "rows": rows,
                            "records_per_micro": per_micro, "grad_accum": args.grad_accum,
                            "padded_grad_accum": padded_accum,
                            "warmup": warmup, "steps": steps}
                    got = run_worker(spec, workdir / model / name, min(args.timeout, left))
                    if "error" in got:
                        row.update(status="error", **got)
                    else:
                        row.update(status="ok", **summarise(got, flops, l2_per_token, mm["tflops"]), **got)
                        print(f"  {row['tokens_per_s']:,.0f} tokens/s, {row['step_time_s']:.3f} s/step, peak "
                              f"{row['peak_memory_bytes'] / 2**30:.2f} GiB, MFU {row['mfu']:.1%} "
                              f"({got['process_s']:.0f} s in all)", flush=True)
                result["rows"].append(row)
                if out is not None:
                    _write(result, out)
        import report  # benchmarks/report.py

        print(report.table(result))
        if out is not None:
            _write(result, out)
            print(f"wrote {out} and {out.with_suffix('.md')}")
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _write(result: dict, out: Path) -> None:
    import report

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(report.markdown(result))


if __name__ == "__main__":
    sys.exit(main())
