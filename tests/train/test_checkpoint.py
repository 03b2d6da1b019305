"""Checkpoint files: every RNG state round-trips; what killed writers leave behind is never picked up
half-written and is tidied away by the next write (kills inside a real run: test_resume_kill.py)."""

import json
import os
import random
import subprocess

import numpy as np
import torch

from fastsft.train import checkpoint as ckpt_mod


def tiny_state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def save(run_dir, step, model, opt, sched, keep=2):
    return ckpt_mod.save_checkpoint(run_dir, step, model=model, optimizer=opt, scheduler=sched,
                                    trainer_state={"epoch": 1, "batch_in_epoch": 3}, keep=keep)


def draws():
    return (torch.rand(4).tolist(), [random.random() for _ in range(3)], np.random.rand(3).tolist(),
            random.gauss(0, 1), np.random.randn())


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_every_rng_state_and_the_optimizer_round_trip(tmp_path):
    model, opt, sched = tiny_state()
    random.seed(1)
    np.random.seed(2)
    random.gauss(0, 1)  # leaves a cached second Gaussian in Python's state
    np.random.randn()
    ckpt = save(tmp_path, 1, model, opt, sched)
    expected = draws()

    model2, opt2, sched2 = tiny_state(seed=5)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    state = ckpt_mod.load_checkpoint(ckpt, model=model2, optimizer=opt2, scheduler=sched2)
    assert draws() == expected
    assert state == {"epoch": 1, "batch_in_epoch": 3, "step": 1}
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert sched2.state_dict() == sched.state_dict()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "manifest.json", "optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors", "scheduler.json",
        "trainable.safetensors", "trainer_state.json"]


def test_every_rank_gets_its_own_rng_states_back(tmp_path):
    """Under torchrun rank 0 writes every rank's RNG states (rng-rank{r} beside rng); each rank restores
    its own, and a rank the checkpoint has none for gets rank 0's (a single-process checkpoint)."""
    model, opt, sched = tiny_state()
    states, expected = [], []
    for seed in (3, 4):  # two "ranks"
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        states.append(ckpt_mod.rng_state())
        expected.append(draws())
    ckpt = ckpt_mod.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched,
                                    trainer_state={}, keep=2, rng_states=states)
    assert {"rng-rank1.json", "rng-rank1.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert not any(p.name.startswith("rng-rank0") for p in ckpt.iterdir())
    for rank, want in [(0, expected[0]), (1, expected[1]), (2, expected[0])]:
        assert ckpt_mod.has_rank_rng(ckpt, rank) == (rank < 2)
        ckpt_mod.load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, rank=rank)
        assert draws() == want, rank


def test_half_written_and_replaced_leftovers(tmp_path):
    model, opt, sched = tiny_state()
    save(tmp_path, 2, model, opt, sched, keep=3)
    root = tmp_path / "checkpoints"
    pid = dead_pid()
    half = root / f".tmp-step-4-{pid}"  # a writer killed mid-write: some files, no trainer_state.json
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"partial")
    mine = root / f".tmp-step-9-{os.getpid()}"  # a live writer (this process): left alone
    mine.mkdir()
    # a replacement of step-3 killed between its two renames: the old copy is aside, no step-3
    aside = root / f".old-step-3-{pid}"
    aside.mkdir()
    (aside / ckpt_mod.STATE_FILE).write_text(json.dumps({"step": 3}))
    # resume reads: the half-written one is ignored, the one moved aside still counts
    assert ckpt_mod.latest_checkpoint(tmp_path) == aside
    assert [p.name for p in ckpt_mod.list_checkpoints(tmp_path)] == ["step-2", aside.name]
    assert half.exists()

    save(tmp_path, 5, model, opt, sched, keep=3)  # the writer tidies up: deletes, puts back
    assert sorted(p.name for p in root.iterdir()) == sorted(["step-2", "step-3", "step-5", mine.name])
    mine.rmdir()


def test_rewriting_a_step_replaces_it(tmp_path):
    model, opt, sched = tiny_state()
    save(tmp_path, 4, model, opt, sched)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ckpt = save(tmp_path, 4, model, opt, sched)  # a resumed run redoing step 4
    saved = ckpt_mod.load_file(str(ckpt / "trainable.safetensors"))
    assert all(torch.equal(saved[n], p) for n, p in model.named_parameters())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4"]
