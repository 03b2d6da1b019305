"""Non-finite losses: the step is skipped and counted; train.max_nonfinite_steps in a row stop the run
with a message and a checkpoint of the last finite weights, which resumes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fastsft import cli
from fastsft import config as cfgmod
from fastsft.train import loop, objective
from fastsft.train import signals
from fastsft.train.checkpoint import latest_checkpoint

GRAD_ACCUM = 2
BASE = {
    "model.config": "nano", "model.tokenizer": "byte", "data.builtin_size": 120, "data.max_seq_len": 48,
    "train.micro_batch_size": 4, "train.grad_accum": GRAD_ACCUM, "train.max_steps": 8, "train.lr": 3e-3,
    "eval.exact_match": 0, "eval.max_records": 8, "output.progress": False, "output.plot": False,
    "output.log_every": 1, "output.checkpoint_every": 2, "train.threads": 1,
}


def cfg_for(tmp_path, **overrides):
    return cfgmod.load(None, {**BASE, "output.dir": str(tmp_path / "run"), **overrides})


def poison(monkeypatch, bad_steps):
    """Make the training loss NaN (and so its gradients) in the given 1-based optimizer steps."""
    real = objective.fused_linear_cross_entropy  # the training objective's loss (evaluation has its own)
    calls = {"n": 0}

    def loss_fn(*args, **kwargs):
        step = calls["n"] // GRAD_ACCUM + 1
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if step in bad_steps else loss

    monkeypatch.setattr(objective, "fused_linear_cross_entropy", loss_fn)


def trainable(ckpt):
    return load_file(str(ckpt / "trainable.safetensors"))


def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    poison(monkeypatch, {3, 5, 6})
    summary = loop.train(cfg_for(tmp_path, **{"train.max_nonfinite_steps": 3, "output.keep_checkpoints": 4}))
    assert summary["steps"] == 8 and summary["skipped_steps"] == 3
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["skipped_steps"] for r in records if r["kind"] == "train"}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 3, 7: 3, 8: 3}
    run = tmp_path / "run"
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())
    # steps 5 and 6 were skipped: the weights at 6 are the weights after step 4; step 7 moved them again
    w4, w6, w8 = (trainable(run / "checkpoints" / f"step-{s}") for s in (4, 6, 8))
    assert all(torch.equal(w4[k], w6[k]) for k in w4)
    assert any(not torch.equal(w6[k], w8[k]) for k in w6)


def test_k_nonfinite_steps_in_a_row_stop_with_a_usable_checkpoint(tmp_path, monkeypatch):
    poison(monkeypatch, {4, 5, 6, 7, 8})
    cfg = cfg_for(tmp_path, **{"train.max_nonfinite_steps": 3, "output.keep_checkpoints": 3})
    with pytest.raises(signals.RunStopped) as e:
        loop.train(cfg)
    msg = str(e.value)
    assert e.value.exit_code == signals.NONFINITE_EXIT
    assert "stopped after step 6: 3 optimizer steps in a row had a non-finite loss" in msg, msg
    assert "train.max_nonfinite_steps=3" in msg and f"fastsft train --resume {tmp_path / 'run'}" in msg
    assert "\n" not in msg
    run = tmp_path / "run"
    last = latest_checkpoint(run)
    assert last.name == "step-6"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 3 and state["nonfinite_in_a_row"] == 3
    # the updates of steps 4-6 were skipped: step 6's weights are those after step 3 (finite)
    w6 = trainable(last)
    assert all(torch.isfinite(t).all() for t in w6.values())
    w2 = trainable(run / "checkpoints" / "step-2")
    assert any(not torch.equal(w6[k], w2[k]) for k in w6)  # step 3 did update

    # the checkpoint is usable: once the cause is gone, --resume finishes the run
    monkeypatch.undo()
    summary = loop.train(cfgmod.load(run / "config.yaml"), resume=True)
    assert summary["steps"] == 8 and summary["skipped_steps"] == 3


def test_cli_exit_status_and_one_line(tmp_path, monkeypatch, capsys):
    poison(monkeypatch, set(range(1, 9)))
    args = ["train", "--output.dir", str(tmp_path / "run"), "--train.max_nonfinite_steps", "2"]
    for key, value in BASE.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    assert cli.main(args) == signals.NONFINITE_EXIT
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("fastsft train: stopped")]
    assert len(lines) == 1 and "stopped after step 2" in lines[0], err
    # nothing was ever finite-updated, but the untouched initial weights are still a usable checkpoint
    assert latest_checkpoint(tmp_path / "run").name == "step-2"


def test_zero_disables_the_stop(tmp_path, monkeypatch):
    poison(monkeypatch, set(range(1, 9)))
    summary = loop.train(cfg_for(tmp_path, **{"train.max_nonfinite_steps": 0, "train.max_steps": 4}))
    assert summary["steps"] == 4 and summary["skipped_steps"] == 4
    with pytest.raises(cfgmod.ConfigError, match="train.max_nonfinite_steps"):
        cfg_for(tmp_path, **{"train.max_nonfinite_steps": -1})
