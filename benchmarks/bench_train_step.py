"""One optimizer step of a tiny model on the CPU: fastsft (packed, padded) against transformers + peft.

    python -m pytest benchmarks/bench_train_step.py --benchmark-only

Model: fastsft's "tiny" preset (6 layers, width 192, GQA 6/2 heads, byte vocabulary) with random
weights, LoRA r=16 on all seven projections, float32 (no NF4: bitsandbytes' CPU path is a reference,
not something to time). Batch: the same 10 records (real GSM8K + CodeAlpaca token lengths, 2,302 tokens,
max_seq_len 512; benchmarks/_workload.py) in every provider. One step = forward, loss over the
response tokens, backward, gradient clipping, AdamW.

Providers (extra_info: tokens/s over real tokens, token slots incl. padding):
  fastsft-packed      the trainer's objects: build_model, apply_lora, configure_kernels (CPU: the
                      PyTorch references), pack + collate_packed (5 rows of 512, block-diagonal
                      attention), fused_linear_cross_entropy (chunked, no logits kept)
  fastsft-padded      the same model on collate's right-padded rows (10 x 344 slots: the longest record,
                      rounded up to a multiple of 8), as with data.packing false
  transformers-peft   AutoModelForCausalLM.from_config of the same architecture (SDPA) + peft LoRA, padded
                      rows with an attention mask, the loss from the model's own logits
The GPU harness (benchmarks/bench_train.py) runs the same comparison at real sizes, in QLoRA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import _results
import _workload

MAX_SEQ_LEN = 512
RECORDS = 10
LR = 2e-4


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from fastsft.data import build_dataset, load_tokenizer

    path = _workload.write_records(tmp_path_factory.mktemp("data") / "data.jsonl", RECORDS, seed=0)
    return build_dataset([{"path": str(path), "format": "prompt_completion"}], load_tokenizer("byte"),
                         max_seq_len=MAX_SEQ_LEN, seed=0).train


def _record(benchmark, name, store, slots):
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(provider=name, tokens=store.num_tokens, token_slots=slots, seconds=seconds,
                                note=f"tiny model, LoRA r=16, {store.num_tokens} tokens in {slots} slots",
                                throughput=store.num_tokens / seconds, unit="tokens/s",
                                versions={**_results.versions("transformers", "peft", "fastsft"),
                                          "torch": torch.__version__})


def _fastsft(store, packed: bool):
    from fastsft.loss import fused_linear_cross_entropy
    from fastsft.model import build_model
    from fastsft.model.fused import configure_kernels
    from fastsft.model.lora import apply_lora, trainable_parameters
    from fastsft.packing import pack
    from fastsft.train.batching import collate, collate_packed, count_targets

    model = build_model("tiny", dtype=torch.float32, device="cpu", seed=0)
    apply_lora(model, r=16, alpha=16.0, dropout=0.0, target_modules=_workload.ALL_LINEAR, seed=0)
    configure_kernels(model, "auto")
    model.train()
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=LR)
    pad_id = 256  # the byte tokenizer's <pad>
    if packed:
        plan = pack(store.lengths, MAX_SEQ_LEN, strategy="bfd")
        batch = collate_packed(store, plan, np.arange(len(plan.bin_offsets) - 1), pad_id, MAX_SEQ_LEN)
        extra = {"cu_seqlens": batch["cu_seqlens"], "max_seqlen": batch["max_seqlen"]}
    else:
        batch = collate(store, np.arange(len(store)), pad_id)
        extra = {}
    num_items = count_targets(batch)

    def step():
        hidden = model(batch["input_ids"], position_ids=batch["position_ids"], **extra)
        loss = fused_linear_cross_entropy(hidden, model.lm_head.weight, batch["targets"], reduction="sum",
                                          num_items=num_items, softcap=model.config.final_logit_softcapping)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, batch["input_ids"].numel()


def _transformers_peft(store):
    import peft

    from bench_train import _hf_model
    from fastsft.model import ModelConfig
    from fastsft.train.batching import IGNORE_INDEX, collate

    config = ModelConfig.from_name("tiny").to_hf_dict()
    model = _hf_model(config, "cpu", torch.float32, load_in_4bit=False, checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                       target_modules=_workload.ALL_LINEAR, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    b = collate(store, np.arange(len(store)), 256)
    labels = torch.full_like(b["targets"], IGNORE_INDEX)
    labels[:, 1:] = b["targets"][:, :-1]
    width = b["input_ids"].shape[1]
    mask = torch.from_numpy(np.arange(width)[None, :] < store.lengths[:, None]).long()
    num_items = int((b["targets"] != IGNORE_INDEX).sum())

    def step():
        loss = model(input_ids=b["input_ids"], attention_mask=mask, labels=labels, num_items_in_batch=num_items).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, b["input_ids"].numel()


def test_fastsft_packed(benchmark, store):
    step, slots = _fastsft(store, packed=True)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    _record(benchmark, "fastsft-packed", store, slots)


def test_fastsft_padded(benchmark, store):
    step, slots = _fastsft(store, packed=False)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    _record(benchmark, "fastsft-padded", store, slots)


def test_transformers_peft(benchmark, store):
    pytest.importorskip("peft")
    step, slots = _transformers_peft(store)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    _record(benchmark, "transformers-peft", store, slots)
