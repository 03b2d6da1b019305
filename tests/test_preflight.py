"""Preflight: bad output dirs, disks, data paths and models are reported before any model is loaded,
every problem at once, each one line naming the thing and the fix."""

import os
import subprocess
import sys
from collections import namedtuple

import pytest

from fastsft import config as cfgmod
from fastsft import preflight as pf
from fastsft.train import loop

Usage = namedtuple("Usage", "total used free")


def cfg_for(tmp_path, **overrides):
    base = {"model.config": "nano", "model.tokenizer": "byte", "data.builtin_size": 60, "data.max_seq_len": 48,
            "train.max_steps": 2, "eval.exact_match": 0, "output.progress": False, "output.plot": False,
            "output.dir": str(tmp_path / "run")}
    return cfgmod.load(None, {**base, **overrides})


def problems(cfg, **kw):
    with pytest.raises(pf.PreflightError) as e:
        pf.preflight(cfg, **kw)
    assert all("\n" not in p for p in e.value.problems)
    return e.value.problems


def test_a_good_config_passes_and_touches_nothing(tmp_path):
    pf.preflight(cfg_for(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the write probe is gone, the run dir not created yet


def test_output_dir_problems(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    [p] = problems(cfg_for(tmp_path, **{"output.dir": str(blocker / "run")}))
    assert p.startswith(f"output.dir {blocker / 'run'} cannot be created") and "--output.dir" in p
    [p] = problems(cfg_for(tmp_path, **{"output.dir": str(blocker)}))
    assert "exists and is not a directory" in p


def test_kernels_on_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    [p] = problems(cfg_for(tmp_path, **{"train.kernels": "on"}))
    assert "'train.kernels' is on" in p and "--train.kernels auto" in p
    pf.preflight(cfg_for(tmp_path, **{"train.kernels": "auto"}))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter (tests) may run them on the CPU
    pf.preflight(cfg_for(tmp_path, **{"train.kernels": "on"}))


def test_every_data_problem_is_reported_at_once(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_data = tmp_path / "no_data"
    no_data.mkdir()
    cfg = cfg_for(tmp_path, **{"data.datasets": [str(tmp_path / "nope.jsonl"), str(no_data)],
                               "data.eval_datasets": [str(empty)]})
    found = problems(cfg)
    assert len(found) == 3, found
    assert found[0].startswith(f"data.datasets: {tmp_path / 'nope.jsonl'}: no such file")
    assert "is a directory with no data files" in found[1]
    assert found[2].startswith(f"data.eval_datasets: {empty}: file is empty")
    # on --resume the cached token stores are used and the files are not needed
    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "run" / "data" / "train.npz").write_bytes(b"")
    pf.preflight(cfg, resume=True)


def test_model_problems(tmp_path):
    from helpers import save_tiny_hf_llama

    [p] = problems(cfg_for(tmp_path, **{"model.path": str(tmp_path / "models" / "llama")}))
    assert p.startswith("model.path") and "no such directory" in p
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    [p] = problems(cfg_for(tmp_path, **{"model.path": str(no_config)}))
    assert "has no config.json" in p
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    [p] = problems(cfg_for(tmp_path, **{"model.path": str(pickled)}))
    assert "pickle weights" in p and "safe_serialization=True" in p
    good = save_tiny_hf_llama(tmp_path / "hf", vocab_size=300)
    pf.preflight(cfg_for(tmp_path, **{"model.path": str(good)}))
    [p] = problems(cfg_for(tmp_path, **{"model.config": "gigantic"}))
    assert p.startswith("model.config gigantic: neither a preset (nano, tiny)")
    [p] = problems(cfg_for(tmp_path, **{"model.tokenizer": "./tok"}))
    assert p.startswith("model.tokenizer ./tok: no such file or directory")


def test_uncached_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    [p] = problems(cfg_for(tmp_path, **{"model.path": "someorg/some-model"}))
    assert "not in the Hugging Face cache" in p and "HF_HUB_OFFLINE" in p


def test_not_enough_disk(tmp_path, monkeypatch):
    cfg = cfg_for(tmp_path, **{"model.config": "tiny", "output.keep_checkpoints": 3})
    need = sum(pf.estimate_disk_bytes(cfg, pf._check_model(cfg, resume=False)[1]).values())
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: Usage(10 * need, 9 * need, need - 1))
    [p] = problems(cfg)
    assert p.startswith(f"output.dir {tmp_path / 'run'}: not enough free disk") and "keep_checkpoints=3" in p
    assert f"free on {tmp_path}" in p and "checkpoints " in p and "random base model " in p
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: Usage(10 * need, 9 * need, need))
    pf.preflight(cfg)


def _advice(tmp_path, monkeypatch, **overrides):
    cfg = cfg_for(tmp_path, **overrides)
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, 1000))
    [p] = problems(cfg)
    need = pf.estimate_disk_bytes(cfg, pf._check_model(cfg, resume=False)[1])
    return p, need["checkpoints"] / sum(need.values())


def test_lowering_keep_checkpoints_is_advised_only_when_checkpoints_weigh(tmp_path, monkeypatch):
    # LoRA on a random base: the saved base outweighs the small adapter checkpoints
    p, share = _advice(tmp_path, monkeypatch, **{"model.config": "tiny", "lora.r": 1, "lora.target_modules": ["q_proj"]})
    assert share <= 1 / 3
    assert "lower output.keep_checkpoints" not in p and p.endswith("free space there or choose another --output.dir")
    # a full fine-tune: checkpoints (weights + two moments, keep + 1 of them) are most of it
    p, share = _advice(tmp_path, monkeypatch, **{"model.config": "tiny", "lora.enabled": False})
    assert share > 1 / 3
    assert "lower output.keep_checkpoints (each checkpoint takes " in p and "another --output.dir" in p
    # ... unless only one is kept already
    p, _ = _advice(tmp_path, monkeypatch, **{"model.config": "tiny", "lora.enabled": False,
                                              "output.keep_checkpoints": 1})
    assert "lower output.keep_checkpoints" not in p


def test_human_bytes():
    assert pf.human_bytes(512) == "512.0 B"
    assert pf.human_bytes(3 << 20) == "3.0 MiB"
    assert pf.human_bytes(5 << 40) == "5.0 TiB"


def test_disk_estimate_is_close_to_what_a_run_writes(tmp_path):
    """The nano run of the issue: the estimate covers the peak (the final run directory plus the checkpoint
    in flight while the oldest is not yet deleted) and is within 1.5x of the final run directory."""
    cfg = cfg_for(tmp_path, **{"data.max_seq_len": 512, "train.max_steps": 9, "output.checkpoint_every": 3,
                               "output.plot": True})
    need = sum(pf.estimate_disk_bytes(cfg, pf._check_model(cfg, resume=False)[1]).values())
    loop.train(cfg)
    run = tmp_path / "run"
    written = run.stat().st_size + sum(p.stat().st_size for p in run.rglob("*"))  # du -sb
    newest = max((run / "checkpoints").iterdir(), key=lambda d: int(d.name.split("-")[1]))
    peak = written + sum(p.stat().st_size for p in newest.rglob("*"))
    assert written < need < 1.5 * written, (need, written)
    assert need > 0.95 * peak, (need, peak)


def test_disk_estimate_counts_the_real_parameters(tmp_path):
    from fastsft.model import ModelConfig, build_model
    from fastsft.model.lora import apply_lora, trainable_parameters

    mcfg = ModelConfig.from_name("tiny")
    model = build_model(mcfg, seed=0)
    n_base = sum(p.numel() for p in model.parameters())
    apply_lora(model, r=8, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    n_lora = sum(p.numel() for p in trainable_parameters(model))
    assert pf.count_parameters(mcfg, lora_r=8, target_modules=["q_proj", "v_proj", "down_proj"]) == (n_base, n_lora)

    small = cfg_for(tmp_path, **{"output.keep_checkpoints": 1})
    large = cfg_for(tmp_path, **{"output.keep_checkpoints": 5})
    a, b = (pf.estimate_disk_bytes(c, ModelConfig.from_name("nano")) for c in (small, large))
    assert b["checkpoints"] == 3 * a["checkpoints"]  # keep + 1 exist at once: 2 vs 6


def test_train_runs_preflight_before_loading_any_model(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loop, "build_model", no_model)
    monkeypatch.setattr(loop, "load_model", no_model)
    with pytest.raises(pf.PreflightError, match="no such file"):
        loop.train(cfg_for(tmp_path, **{"data.datasets": [str(tmp_path / "nope.jsonl")]}))
    # records are parsed by the data step, which also comes before the model
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n')
    from fastsft.data import DataError

    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'prompt' must be a string"):
        loop.train(cfg_for(tmp_path, **{"data.datasets": [str(bad)]}))


def test_cli_prints_one_line_per_problem(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "fastsft", "train", "--data", str(tmp_path / "nope.jsonl"),
                           "--model.config", "nano", "--model.tokenizer", "byte",
                           "--output.dir", str(blocker / "run")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("fastsft train: error: ")]
    assert len(errors) == 2, proc.stderr
    assert "output.dir" in errors[0] and "nope.jsonl: no such file" in errors[1]
