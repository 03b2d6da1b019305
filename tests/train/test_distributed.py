"""More than one process on CPU: torchrun with 2 gloo processes, data parallel and sharded (FSDP2).

Each launch is the real command, ``torchrun --standalone --nproc_per_node 2 -m fastsft train ...``
(standalone: a free port, so runs beside other test sessions do not collide); the single-process
references run in this process. A tiny model, a few steps, one thread a process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastsft
from fastsft import config as cfgmod
from fastsft.train.loop import train

COMMON = {
    "model.config": "nano", "model.tokenizer": "byte", "data.builtin_size": 240, "data.max_seq_len": 48,
    "train.micro_batch_size": 4, "train.lr": 3e-3, "train.threads": 1, "eval.exact_match": 0,
    "eval.max_records": 16, "output.progress": False, "output.plot": False, "output.log_every": 1,
}


REPO = Path(fastsft.__file__).resolve().parent.parent


def torchrun(*args: str, overrides: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m fastsft train ARGS --key value ...``; fails with its output."""
    cli = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in (overrides or {}).items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastsft", "train", *args, *cli]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-8000:]}"
    return out


def one_process(run_dir, **overrides) -> dict:
    return train(cfgmod.load(None, {**COMMON, "output.dir": str(run_dir), **overrides}))


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_adapters_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:  # the same update up to the order of the float sums (all-reduce vs one accumulation)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def rewind_to_step(run_dir, step: int, last: int) -> None:
    """Back to the state of a run that died right after checkpoint ``step``."""
    shutil.rmtree(run_dir / "adapter")
    shutil.rmtree(run_dir / "checkpoints" / f"step-{last}")
    assert (run_dir / "checkpoints" / f"step-{step}").is_dir()


def test_data_parallel_equals_one_process_and_resumes(tmp_path):
    """2 ranks x grad_accum 2 == 1 process x grad_accum 4 (the same micro-batches, the same update); a
    resumed 2-rank run puts every rank back at its data position (the same adapter, bit for bit)."""
    dp, single = tmp_path / "dp", tmp_path / "single"
    torchrun(overrides={**COMMON, "train.grad_accum": 2, "train.max_steps": 4, "output.checkpoint_every": 2,
                        "output.dir": dp})
    ref = one_process(single, **{"train.grad_accum": 4, "train.max_steps": 4})

    finished = adapter(dp)
    assert_adapters_close(finished, adapter(single))
    got, want = metrics(dp), metrics(single)
    assert [r["step"] for r in got if r["kind"] == "train"] == [1, 2, 3, 4]  # rank 0 alone logs
    assert [r["loss"] for r in got if r["kind"] == "train"] == pytest.approx(
        [r["loss"] for r in want if r["kind"] == "train"], rel=1e-6)  # the global step's loss
    summary = json.loads((dp / "summary.json").read_text())
    assert (summary["tokens"], summary["response_tokens"]) == (ref["tokens"], ref["response_tokens"])
    assert summary["eval_after"]["eval_loss"] == pytest.approx(ref["eval_after"]["eval_loss"], rel=1e-5)

    rewind_to_step(dp, 2, last=4)
    torchrun("--resume", str(dp))
    resumed = adapter(dp)
    assert all(torch.equal(resumed[k], finished[k]) for k in finished)  # same ranks, same sums: bitwise
    assert [r["step"] for r in metrics(dp) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_data_parallel_dropout_per_rank_streams_resume_bitwise(tmp_path):
    """LoRA dropout under 2 ranks: each rank draws from its own RNG stream, every rank's stream is in the
    checkpoint, and a resumed run ends bit for bit where the uninterrupted one did."""
    dp = tmp_path / "dp"
    torchrun(overrides={**COMMON, "lora.dropout": 0.1, "train.max_steps": 4, "output.checkpoint_every": 2,
                        "output.dir": dp})
    finished, losses = adapter(dp), [r["loss"] for r in metrics(dp) if r["kind"] == "train"]
    ckpt = dp / "checkpoints" / "step-2"
    rank0, rank1 = load_file(str(ckpt / "rng.safetensors")), load_file(str(ckpt / "rng-rank1.safetensors"))
    assert not torch.equal(rank0["torch"], rank1["torch"])  # different streams: different dropout masks
    assert json.loads((ckpt / "rng.json").read_text()).keys() == json.loads((ckpt / "rng-rank1.json").read_text()).keys()

    rewind_to_step(dp, 2, last=4)
    torchrun("--resume", str(dp))
    resumed = adapter(dp)
    assert all(torch.equal(resumed[k], finished[k]) for k in finished)
    assert [r["loss"] for r in metrics(dp) if r["kind"] == "train"] == losses


def test_sharded_4bit_run_trains_resumes_and_its_adapter_loads(tmp_path):
    """FSDP2 over 2 ranks with an NF4 base (its packed codes sharded): the update of one process with the
    same global batch; resuming scatters the checkpoint back into the shards; the adapter is whole."""
    from fastsft.model import load_model
    from fastsft.model.lora import load_adapter, lora_state_dict

    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    setting = {"train.max_steps": 4, "model.load_in_4bit": True, "lora.target_modules": "q_proj,v_proj,down_proj"}
    torchrun(overrides={**COMMON, **setting, "train.fsdp": True, "output.checkpoint_every": 2,
                        "output.dir": sharded})
    one_process(single, **setting, **{"train.grad_accum": 2})

    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    finished = adapter(sharded)
    assert_adapters_close(finished, adapter(single))
    # the adapter is whole (gathered from the shards) and loads onto the saved base
    base = load_model(sharded / "base_model")
    load_adapter(base, sharded / "adapter")
    loaded = lora_state_dict(base)
    assert loaded.keys() == finished.keys() and all(torch.equal(loaded[k], finished[k]) for k in finished)
    assert torch.isfinite(base(torch.tensor([[257, 72, 105]]))).all()

    rewind_to_step(sharded, 2, last=4)
    torchrun("--resume", str(sharded))
    resumed = adapter(sharded)
    assert all(torch.equal(resumed[k], finished[k]) for k in finished)


def test_sharded_fused_lora_blocks(tmp_path, monkeypatch):
    """FSDP2 with the fused LoRA QKV / MLP blocks over NF4 bases (the path CUDA takes by default; the
    `lora` piece is plain torch, so it runs here): the update of one process on the same path."""
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    setting = {"train.max_steps": 3, "model.load_in_4bit": True, "train.kernels": "on",
               "train.kernels_off": "loss,rms_norm,rope,swiglu"}  # the Triton pieces would need the interpreter
    torchrun(overrides={**COMMON, **setting, "train.fsdp": True, "output.dir": sharded})
    import fastsft.kernels.lora as klora

    calls = []
    monkeypatch.setattr(klora, "lora_qkv", lambda *a, _f=klora.lora_qkv, **k: calls.append(1) or _f(*a, **k))
    one_process(single, **setting, **{"train.grad_accum": 2})
    assert calls  # the fused block ran (the same config as the sharded run)
    assert_adapters_close(adapter(sharded), adapter(single))
    def losses(run):
        return [r["loss"] for r in metrics(run) if r["kind"] == "train"]

    assert len(losses(sharded)) == 3 and losses(sharded) == pytest.approx(losses(single), rel=1e-5)


def test_fsdp_needs_torchrun_and_lora(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(cfgmod.ConfigError, match="train.fsdp.*torchrun"):
        one_process(tmp_path / "a", **{"train.fsdp": True, "train.max_steps": 1})
    with pytest.raises(cfgmod.ConfigError, match="train.fsdp.*lora.enabled"):
        cfgmod.load(None, {"train.fsdp": True, "lora.enabled": False})
