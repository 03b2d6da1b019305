"""Resume exactness under SIGKILL: a real ``fastsft train`` killed at chosen points (the
FASTSFT_TEST_KILL_AT test hook) and restarted with ``--resume`` ends with an adapter bitwise equal to
the uninterrupted run's, step losses included: the data position and every RNG state come back."""

import json
import re
import shutil
import signal

from fastsft.train import checkpoint as ckpt_mod

KILLED = -signal.SIGKILL


def train_records(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in recs if r["kind"] == "train"]


def resumed_from(proc) -> int:
    m = re.search(r"resumed from \S+step-(\d+) at step", proc.stdout + proc.stderr)
    assert m, proc.stdout + proc.stderr
    return int(m.group(1))


def checkpoint_names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_killed_again_and_again_resumes_bitwise(tmp_path, runs):
    """Packing on, grad_accum 2, LoRA dropout 0.1; checkpoints at 3 and 6, the final one at 9."""
    reference = runs.reference()
    run = tmp_path / "run"

    proc = runs.train(run, kill_at="step:3")  # right after checkpoint 3 was written
    assert proc.returncode == KILLED, proc.stderr
    assert checkpoint_names(run) == ["step-3"]

    # (kill point, checkpoint the resume starts from, checkpoints left after the kill)
    stages = [
        ("step:4", 3, ["step-3"]),                         # between checkpoints: step 4 is redone
        ("micro:5", 3, ["step-3"]),                        # mid-step, after one micro-batch's backward
        ("checkpoint:6", 3, None),                         # inside the write of checkpoint 6
        ("step:8", 3, ["step-3", "step-6"]),               # after the last checkpoint inside the loop
        ("checkpoint:9", 6, None),                         # inside the write of the final checkpoint
    ]
    for kill_at, start, left in stages:
        proc = runs.resume(run, kill_at=kill_at)
        assert proc.returncode == KILLED, (kill_at, proc.stderr)
        assert resumed_from(proc) == start, kill_at
        if left is not None:
            assert checkpoint_names(run) == left, kill_at
        if kill_at == "checkpoint:6":
            # half-written: a temporary directory that resume ignores; the previous one stays usable
            assert [p for p in checkpoint_names(run) if p.startswith(".tmp-step-6-")], checkpoint_names(run)
            assert ckpt_mod.latest_checkpoint(run).name == "step-3"
            assert not (run / "checkpoints" / "step-6").exists()

    proc = runs.resume(run)
    assert proc.returncode == 0, proc.stderr
    assert resumed_from(proc) == 6
    runs.assert_same_adapter(reference, run)
    assert train_records(run) == train_records(reference)  # same batches, same dropout masks, every step
    assert checkpoint_names(run) == ["step-6", "step-9"]  # stale temporaries cleaned up
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["tokens"] == json.loads((reference / "summary.json").read_text())["tokens"]


def test_kill_inside_the_only_checkpoint_then_unpacked_resume(tmp_path, runs):
    """Packing off. A kill inside the first checkpoint leaves nothing to resume from: ``--resume`` starts
    the run over from step 0 (with a notice, not a half-written checkpoint) and ends where an uninterrupted
    run does; a fresh run killed mid-step resumes bitwise."""
    reference = runs.reference("--data.packing", "false")
    run = tmp_path / "run"

    proc = runs.train(run, "--data.packing", "false", kill_at="checkpoint:3")
    assert proc.returncode == KILLED, proc.stderr
    assert ckpt_mod.latest_checkpoint(run) is None
    proc = runs.resume(run)
    assert proc.returncode == 0, proc.stderr
    assert "has no checkpoint yet (it was stopped before its first one): starting it from step 0" in proc.stdout
    assert not [p for p in checkpoint_names(run) if p.startswith(".")]  # the killed writer's temporary: gone
    runs.assert_same_adapter(reference, run)
    assert train_records(run) == train_records(reference)

    shutil.rmtree(run)
    proc = runs.train(run, "--data.packing", "false", kill_at="micro:8")
    assert proc.returncode == KILLED, proc.stderr
    proc = runs.resume(run)
    assert proc.returncode == 0, proc.stderr
    assert resumed_from(proc) == 6
    runs.assert_same_adapter(reference, run)
    assert train_records(run) == train_records(reference)
