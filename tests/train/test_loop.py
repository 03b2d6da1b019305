"""The training recipe end to end on CPU: outputs, resume, full fine-tune, schedules, eval extras."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastsft import config as cfgmod
from fastsft import packing
from fastsft.train import checkpoint as ckpt_mod
from fastsft.train.loop import lr_lambda, train


def tiny_cfg(tmp_path, **overrides):
    base = {
        "model.config": "nano", "model.tokenizer": "byte", "data.builtin_size": 240, "data.max_seq_len": 48,
        "train.micro_batch_size": 8, "train.max_steps": 8, "train.lr": 3e-3, "eval.exact_match": 8,
        "eval.max_new_tokens": 12, "eval.max_records": 32, "output.progress": False, "output.log_every": 2,
        "output.dir": str(tmp_path / "run"),
    }
    base.update(overrides)
    return cfgmod.load(None, base)


def test_outputs_and_metrics(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"eval.every": 4, "output.checkpoint_every": 3, "output.keep_checkpoints": 2})
    summary = train(cfg)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "base_model/config.json", "data/train.npz"):
        assert (run / name).exists(), name
    assert cfgmod.load(run / "config.yaml") == cfg  # the resolved config reloads to the same run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [2, 4, 6, 8]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "response_tokens_per_s", "peak_memory_bytes"):
        assert all(math.isfinite(r[key]) for r in train_recs), key
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8]
    assert all("eval_loss" in r and "eval_ppl" in r for r in evals)
    assert "exact_match" in evals[0] and "exact_match" in evals[-1]
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    # keep_checkpoints=2: step-3 deleted, step-6 and the final step-8 kept; no temporary directories
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-6", "step-8"]
    assert (run / "checkpoints" / "step-6" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("extra", [
    {},
    # the KL anchor's base forward, NEFTune's noise (packed rows, then padded rows) draw and resume as the rest
    {"train.kl_to_base": 0.2, "train.kl_tokens": "all", "train.neftune_alpha": 5.0},
    {"train.kl_to_base": 0.1, "train.neftune_alpha": 5.0, "data.packing": False},
    # the base-loss scores are computed once and read back on resume (the model is no longer the base then)
    {"data.curriculum": "base_loss", "data.curriculum_phases": 2},
    # the base's cached top-k (read back from data/ on resume) laid out through curriculum phases
    {"train.kl_to_base": 0.3, "train.kl_base_topk": 6, "train.kl_tokens": "all", "data.curriculum": "length"},
], ids=["plain", "kl-all-neftune", "kl-neftune-unpacked", "curriculum", "kl-topk-phased"])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch, extra):
    overrides = {"train.grad_accum": 2, "lora.dropout": 0.1, "output.checkpoint_every": 3, "train.max_steps": 7,
                 "eval.exact_match": 0, **extra}
    straight = tiny_cfg(tmp_path / "a", **overrides)
    train(straight)

    real_save = ckpt_mod.save_checkpoint

    def save_then_crash(run_dir, step, **kw):
        real_save(run_dir, step, **kw)
        if step == 3:
            raise RuntimeError("simulated crash after the step-3 checkpoint")

    monkeypatch.setattr(ckpt_mod, "save_checkpoint", save_then_crash)
    crashed = tiny_cfg(tmp_path / "b", **overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed)
    monkeypatch.setattr(ckpt_mod, "save_checkpoint", real_save)
    resumed = cfgmod.load(tmp_path / "b" / "run" / "config.yaml")
    summary = train(resumed, resume=True)
    assert summary["steps"] == 7

    a = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == sorted(set(steps))  # no duplicated steps in the log after resuming
    evals = [json.loads(l)["step"] for l in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "eval"]
    assert evals == sorted(set(evals)) and evals[0] == 0
    assert summary["eval_before"]["step"] == 0
    if extra.get("data.curriculum") == "base_loss":
        a_scores, b_scores = (np.load(tmp_path / d / "run" / "data" / "curriculum_scores.npy") for d in ("a", "b"))
        assert np.array_equal(a_scores, b_scores) and np.isfinite(a_scores).all()
    if extra.get("train.kl_to_base"):  # the anchor's KL is logged, the same after the resume
        logs = [[json.loads(line) for line in (tmp_path / d / "run" / "metrics.jsonl").read_text().splitlines()]
                for d in ("a", "b")]
        kls = [[r["kl_to_base"] for r in log if r["kind"] == "train"] for log in logs]
        assert kls[0] == kls[1] and kls[0][-1] > 0
    if extra.get("train.kl_base_topk"):  # the base's top-k, computed before training, read back on resume
        a_ids, b_ids = (np.load(tmp_path / d / "run" / "data" / "base_topk_ids.npy") for d in ("a", "b"))
        assert a_ids.shape[1] == 6 and np.array_equal(a_ids, b_ids)


def test_resume_of_a_missing_directory_is_an_error_that_creates_nothing(tmp_path):
    with pytest.raises(cfgmod.ConfigError, match="does not exist; nothing to resume"):
        train(tiny_cfg(tmp_path), resume=True)
    assert not (tmp_path / "run").exists()


def test_half_written_checkpoint_is_ignored(tmp_path):
    cfg = tiny_cfg(tmp_path, **{"train.max_steps": 2, "eval.exact_match": 0})
    train(cfg)
    root = tmp_path / "run" / "checkpoints"
    (root / ".tmp-step-9-123").mkdir()
    (root / "step-10").mkdir()  # no manifest: incomplete (or its files deleted)
    ckpt, skipped = ckpt_mod.newest_verified(tmp_path / "run")
    assert ckpt.name == "step-2"
    assert [(c.name, why) for c, why in skipped] == [("step-10", "manifest.json: missing (the write was cut "
                                                                  "short, or the file was deleted)")]


def test_full_fine_tune_saves_a_transformers_model(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_cfg(tmp_path, **{"lora.enabled": False, "train.max_steps": 2, "eval.exact_match": 0})
    train(cfg)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config.vocab_size == 272


def test_general_text_perplexity_and_ratio(tmp_path):
    text = tmp_path / "general.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n\nPack my box with five dozen liquor jugs.\n")
    cfg = tiny_cfg(tmp_path, **{"data.general_text": str(text), "train.max_steps": 2, "eval.exact_match": 0})
    summary = train(cfg)
    after = summary["eval_after"]
    assert after["general_ppl"] > 1.0
    assert after["ppl_ratio"] == pytest.approx(after["eval_ppl"] / after["general_ppl"])


def test_vocab_mismatch_is_a_clear_error(tmp_path):
    cfg_json = tmp_path / "small_vocab.json"
    cfg_json.write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "hidden_size": 32,
                                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(cfgmod.ConfigError, match="vocabulary has 100 entries"):
        train(tiny_cfg(tmp_path, **{"model.config": str(cfg_json)}))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(schedule):
    f = [lr_lambda(s, total=100, warmup=10, schedule=schedule, min_ratio=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    if schedule == "constant":
        assert f[-1] == 1.0
    else:
        assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1, abs=0.02)


def test_same_seed_same_adapter(tmp_path):
    overrides = {"lora.dropout": 0.1, "train.max_steps": 3, "eval.exact_match": 0}
    train(tiny_cfg(tmp_path / "a", **overrides))
    train(tiny_cfg(tmp_path / "b", **overrides))
    a = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kernel_and_reference_loss_train_alike(tmp_path):
    """The trainer through the Triton kernel (interpreter on CPU) follows the plain-PyTorch path."""
    losses = {}
    for mode in ("on", "off"):
        cfg = tiny_cfg(tmp_path / mode, **{"train.kernels": mode, "train.max_steps": 4, "output.log_every": 1,
                                           "train.kernels_off": "lora,rms_norm,rope,swiglu",  # the loss kernel only
                                           "eval.exact_match": 0, "eval.max_records": 8})
        train(cfg)
        records = [json.loads(l) for l in (tmp_path / mode / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)


def test_qlora_load_in_4bit_trains_saves_and_reloads(tmp_path, monkeypatch):
    """QLoRA on CPU through bitsandbytes' NF4 format: loss falls, the adapter reloads onto the base."""
    from fastsft.model import load_model
    from fastsft.model.lora import load_adapter, lora_modules
    from fastsft.model.nf4 import NF4Linear

    calls = []
    real_dequantize = NF4Linear.dequantize
    monkeypatch.setattr(NF4Linear, "dequantize", lambda self, *a, **k: calls.append(1) or real_dequantize(self, *a, **k))

    cfg = tiny_cfg(tmp_path, **{"model.load_in_4bit": True, "train.max_steps": 12, "eval.exact_match": 0,
                                "lora.target_modules": "q_proj,v_proj,down_proj"})
    summary = train(cfg)
    assert len(calls) > 12 * 2 * 3  # every step ran the 4-bit layers (forward and backward)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    run = tmp_path / "run"
    base = load_model(run / "base_model")
    wrapped = load_adapter(base, run / "adapter")
    assert sorted({n.rsplit(".", 1)[-1] for n in wrapped}) == ["down_proj", "q_proj", "v_proj"]
    saved = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.count_nonzero(t) for k, t in saved.items() if "lora_B" in k)  # B moved off zero
    assert all(not isinstance(m.base_layer, NF4Linear) for m in lora_modules(base).values())


def test_load_in_4bit_requires_lora(tmp_path):
    with pytest.raises(cfgmod.ConfigError, match="load_in_4bit"):
        train(tiny_cfg(tmp_path, **{"model.load_in_4bit": True, "lora.enabled": False}))


def test_qlora_native_paths_train_like_torch_paths(tmp_path):
    """QLoRA with every native piece on (fused LoRA blocks over NF4 bases, RMSNorm/RoPE/SwiGLU and
    loss kernels in the interpreter), LoRA dropout and offloaded checkpointing: the same losses as the
    plain torch paths."""
    losses = {}
    for mode in ("on", "off"):
        cfg = tiny_cfg(tmp_path / mode, **{"train.kernels": mode, "train.max_steps": 3, "output.log_every": 1,
                                           "model.load_in_4bit": True, "lora.dropout": 0.1,
                                           "model.gradient_checkpointing": True, "model.offload_activations": True,
                                           "train.micro_batch_size": 2, "data.max_seq_len": 32,
                                           "data.builtin_size": 60, "eval.exact_match": 0, "eval.max_records": 4,
                                           "output.plot": False})
        train(cfg)
        records = [json.loads(l) for l in (tmp_path / mode / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses["on"]) == 3
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)


def test_summary_says_which_kernels_ran(tmp_path, capsys):
    """Every run's summary.json has kernels_used: a path per piece, with the reason for a reference path;
    the console says the same once, after the first step."""
    summary = train(tiny_cfg(tmp_path, **{"eval.exact_match": 0}))
    used = json.loads((tmp_path / "run" / "summary.json").read_text())["kernels_used"]
    assert used == summary["kernels_used"]
    assert set(used) >= {"loss", "lora", "rms_norm", "rope", "swiglu", "attention", "packing"}
    for piece in ("loss", "lora", "rms_norm", "rope", "swiglu", "attention"):  # kernels auto on a CPU
        assert used[piece]["path"] == "reference" and "CPU tensors" in used[piece]["reason"], (piece, used[piece])
    assert used["packing"]["path"] == ("native" if packing.native_available() else "reference")
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.startswith("kernels: ")]
    assert len(lines) == 1 and "loss, lora, rms_norm, rope, swiglu reference (CPU tensors" in lines[0], lines


def test_a_fallback_shows_in_summary_and_on_the_console(tmp_path, monkeypatch, capsys):
    """A native piece that cannot run where it should (here: packed attention handed torch 2.10's
    varlen_attn, which takes no window) falls back loudly: a warning with the exception and the cost,
    the console's kernels line, and summary.json."""
    import fastsft.model.llama as llama

    def varlen_torch_2_10(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        raise AssertionError("not callable the way fastsft needs")

    monkeypatch.setattr(llama, "_varlen_supported", lambda device, dtype: True)
    monkeypatch.setattr(llama, "_varlen_kernel", lambda: ("torch", varlen_torch_2_10))
    llama._varlen_kernel_checked.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"attention falls back to its PyTorch reference path.*takes no "
                                             r"window_size.*Expected cost"):
            summary = train(tiny_cfg(tmp_path, **{"eval.exact_match": 0}))
    finally:
        llama._varlen_kernel_checked.cache_clear()
    used = json.loads((tmp_path / "run" / "summary.json").read_text())["kernels_used"]
    assert used == summary["kernels_used"]
    assert used["attention"]["path"] == "reference"
    assert "window_size" in used["attention"]["reason"] and "mask" in used["attention"]["cost"]
    out = capsys.readouterr()
    line = next(x for x in (out.out + out.err).splitlines() if x.startswith("kernels: "))
    assert "; attention reference (TypeError: " in line and "window_size" in line


def test_field_curriculum_orders_by_the_data_and_survives_the_token_cache(tmp_path, capsys):
    """data.curriculum field:NAME: phases from each record's own number (easy first); a second run of the same
    data takes the token stores, scores included, from the cache."""
    recs = [{"prompt": f"what is {k} plus {k}?", "completion": f"{2 * k}", "meta": {"level": k % 5}}
            for k in range(60)]
    path = tmp_path / "graded.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    for name in ("first", "second"):
        cfg = tiny_cfg(tmp_path / name, **{"data.datasets": [str(path)], "data.curriculum": "field:meta.level",
                                           "data.curriculum_phases": 2, "train.max_steps": 2, "eval.exact_match": 0})
        train(cfg)
        out = capsys.readouterr().out
        line = next(l for l in out.splitlines() if "curriculum (field:meta.level)" in l)
        assert line.endswith("scores 0-2, 2-4"), line  # 0,1,2 then 2,3,4 (the 2s split to even the halves)
    assert "token stores from the cache" in out
    with pytest.raises(cfgmod.ConfigError, match="data.curriculum"):
        tiny_cfg(tmp_path, **{"data.curriculum": "field:"})
    with pytest.raises(cfgmod.ConfigError, match=r"'\[' is never closed"):
        tiny_cfg(tmp_path, **{"data.curriculum": "field:a[0"})


def test_base_loss_scores_are_cached_per_base_model(tmp_path, capsys):
    """A rerun on the same data and base model reads the base-loss scores from the token cache (no scoring
    pass); another base model scores again."""
    def run(name, **extra):
        train(tiny_cfg(tmp_path / name, **{"data.curriculum": "base_loss", "data.curriculum_phases": 2,
                                           "train.max_steps": 1, "eval.exact_match": 0, **extra}))
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("curriculum: base-model loss"))
        return line, np.load(tmp_path / name / "run" / "data" / "curriculum_scores.npy")

    first, scores = run("a")
    again, cached = run("b")
    assert "computed in" in first and again.endswith("from the token cache") and np.array_equal(scores, cached)
    other, rescored = run("c", **{"model.config": "tiny"})
    assert "computed in" in other and not np.array_equal(scores, rescored)


def test_cached_top_k_anchor_with_all_but_one_token_trains_like_the_forward_anchor(tmp_path):
    """kl_base_topk = V - 1 leaves a tail of one token, so the coarse-grained KL is the full KL: the run must
    match the anchor that runs the base forward every step (to float32 rounding). And it needs no adapters:
    full fine-tuning takes the cached anchor (the cache is the frozen base)."""
    common = {"train.kl_to_base": 0.5, "train.kl_tokens": "all", "train.max_steps": 4, "eval.exact_match": 0,
              "output.log_every": 1}
    runs = {}
    for name, extra in (("forward", {}), ("topk", {"train.kl_base_topk": 271})):
        train(tiny_cfg(tmp_path / name, **common, **extra))
        log = [json.loads(line) for line in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()]
        runs[name] = [(r["loss"], r["kl_to_base"]) for r in log if r["kind"] == "train"]
    assert len(runs["topk"]) == 4 and runs["topk"][-1][1] > 0
    np.testing.assert_allclose(runs["topk"], runs["forward"], rtol=1e-4, atol=1e-7)
    full = train(tiny_cfg(tmp_path / "full", **common, **{"lora.enabled": False, "train.kl_base_topk": 8}))
    assert full["steps"] == 4
    with pytest.raises(cfgmod.ConfigError, match="train.kl_to_base"):
        tiny_cfg(tmp_path, **{"lora.enabled": False, "train.kl_to_base": 0.1})
    with pytest.raises(cfgmod.ConfigError, match="train.kl_base_topk"):
        tiny_cfg(tmp_path, **{"train.kl_base_topk": 8})


def test_tokenising_in_a_worker_pool_under_the_trainers_signal_handlers(tmp_path, monkeypatch):
    """train() installs SIGTERM/SIGINT handlers; forked tokenising workers must not inherit them (the pool's
    terminate() would then never end them and the run would hang), and the stores equal one process's."""
    from fastsft.data import pipeline

    monkeypatch.setattr(pipeline, "_CHUNK_RECORDS", 16)
    for workers in (2, 1):
        train(tiny_cfg(tmp_path / str(workers), **{"data.workers": workers, "data.token_cache": False,
                                                   "train.max_steps": 1, "eval.exact_match": 0}))
    a, b = (np.load(tmp_path / w / "run" / "data" / "train.npz") for w in ("1", "2"))
    assert all(np.array_equal(a[k], b[k]) for k in ("ids", "labels", "offsets"))
