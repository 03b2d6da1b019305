"""The run directory as a contract: verified checkpoints and inputs (a damaged one is named and skipped,
never half-loaded), one writer (a lock), fresh run vs resume, the saved config as the run's truth,
checkpoints by time, disk-full errors, metrics without duplicates, file modes, no leftover temporaries.
Real ``fastsft train`` processes (the tiny run of conftest.py), compared bit for bit with an
uninterrupted run."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastsft import config as cfgmod
from fastsft.train import checkpoint as ckpt_mod
from fastsft.train import loop, signals
from fastsft.train.files import STALE
from fastsft.train.run_dir import LOCK_FILE




KILLED = -signal.SIGKILL


def one_error_line(proc) -> str:
    """The CLI's answer to a problem a user can fix: exit 2, one ``error:`` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastsft train: error: "), proc.stderr
    return lines[0]


def truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def garble(p):
    p.write_bytes(bytes((b * 131 + 7) % 256 for b in p.read_bytes()))


def bitflip(p):
    data = bytearray(p.read_bytes())
    data[int(len(data) * 0.75)] ^= 0x10  # past a safetensors header: inside the tensor data
    p.write_bytes(bytes(data))


DAMAGE = {"truncate": truncate, "garble": garble, "bitflip": bitflip}


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def train_records(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in recs if r["kind"] == "train"]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def leftovers(run_dir):
    """Temporaries anywhere in the run directory (files or directories a writer renames when done)."""
    return [str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
            if STALE.match(p.name) or p.name.startswith((".old-", ".tmp")) or p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------------
# verified checkpoints


def test_verify_names_every_damaged_file_of_a_checkpoint(tmp_path, runs):
    reference = runs.reference()
    newest = reference / "checkpoints" / "step-9"
    assert ckpt_mod.verify_checkpoint(newest) is None
    files = sorted(p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file())
    assert {"manifest.json", "trainable.safetensors", "optimizer.safetensors", "scheduler.json",
            "trainer_state.json", "adapter/adapter_model.safetensors"} <= set(files)
    for name, damage in DAMAGE.items():
        for rel in files:
            ckpt = copy_run(newest, tmp_path / f"{name}-{rel.replace('/', '_')}" / "step-9")
            damage(ckpt / rel)
            problem = ckpt_mod.verify_checkpoint(ckpt)
            assert problem is not None and problem.startswith(rel + ":"), (name, rel, problem)
    # the manifest itself replaced by valid JSON of the wrong shape, or a file missing
    ckpt = copy_run(newest, tmp_path / "list" / "step-9")
    (ckpt / "manifest.json").write_text("[]")
    assert ckpt_mod.verify_checkpoint(ckpt).startswith("manifest.json: not a fastsft-checkpoint/1 manifest")
    ckpt = copy_run(newest, tmp_path / "gone" / "step-9")
    (ckpt / "rng.safetensors").unlink()
    assert ckpt_mod.verify_checkpoint(ckpt) == "rng.safetensors: missing"


@pytest.mark.parametrize("content, expected", [
    ("[]", "trainer_state.json: is not a JSON object"),
    ("{}", "trainer_state.json: 'step' missing or not a count"),
    (b"\xcd\xff{", "trainer_state.json: not valid JSON"),
])
def test_a_checkpoint_without_manifest_still_gets_its_schemas_checked(tmp_path, runs, content, expected):
    """Checkpoints written before manifests: no checksums, but a bad JSON is named, never loaded."""
    ckpt = copy_run(runs.reference() / "checkpoints" / "step-9", tmp_path / "step-9")
    (ckpt / "manifest.json").unlink()
    assert ckpt_mod.verify_checkpoint(ckpt) is None
    state = ckpt / "trainer_state.json"
    state.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert ckpt_mod.verify_checkpoint(ckpt).startswith(expected)
    state.write_text(json.dumps({"step": 9, "epoch": 0, "batch_in_epoch": 1}))
    (ckpt / "scheduler.json").write_text(json.dumps({"last_epoch": 9}))
    assert ckpt_mod.verify_checkpoint(ckpt).startswith("scheduler.json: is not a learning-rate scheduler state")


@pytest.mark.parametrize("damage, rel", [("truncate", "trainable.safetensors"), ("garble", "scheduler.json"),
                                         ("bitflip", "optimizer.safetensors")])
def test_a_damaged_newest_checkpoint_is_named_skipped_and_the_run_ends_bitwise(tmp_path, runs, damage, rel):
    reference = runs.reference()
    run = copy_run(reference, tmp_path / "run")
    DAMAGE[damage](run / "checkpoints" / "step-9" / rel)
    proc = runs.resume(run)
    assert proc.returncode == 0, proc.stderr
    assert f"checkpoint step-9 is damaged ({rel}: " in proc.stdout, proc.stdout
    assert "resuming from step-6, the newest checkpoint that verifies" in proc.stdout
    assert "resumed from" in proc.stdout and "step-6 at step 6" in proc.stdout
    runs.assert_same_adapter(reference, run)
    assert train_records(run) == train_records(reference)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["damaged-step-9", "step-6", "step-9"]
    assert ckpt_mod.verify_checkpoint(run / "checkpoints" / "step-9") is None
    resumes = [r for r in records(run) if r["kind"] == "resume"]
    assert resumes[-1]["skipped_checkpoints"][0][0] == "step-9"


def test_no_checkpoint_verifies_is_one_line_and_nothing_is_touched(tmp_path, runs):
    run = copy_run(runs.reference(), tmp_path / "run")
    bitflip(run / "checkpoints" / "step-9" / "trainable.safetensors")
    truncate(run / "checkpoints" / "step-6" / "optimizer.json")
    line = one_error_line(runs.resume(run))
    assert "no checkpoint in" in line and "step-9: trainable.safetensors:" in line and "step-6: optimizer.json:" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-6", "step-9"]


@pytest.mark.parametrize("damage, rel", [("bitflip", "config.yaml"), ("truncate", "config.yaml"),
                                         ("truncate", "data/train.npz"), ("bitflip", "base_model/model.safetensors"),
                                         ("garble", "data/report.json")])
def test_the_runs_own_inputs_are_verified(tmp_path, runs, damage, rel):
    run = copy_run(runs.reference(), tmp_path / "run")
    before = (run / "config.yaml").read_bytes()
    DAMAGE[damage](run / rel)
    line = one_error_line(runs.resume(run))
    assert f"{run / rel}: " in line, line
    if rel != "config.yaml":
        assert (run / "config.yaml").read_bytes() == before  # never rewritten by a failed resume


def test_a_checkpoint_whose_weights_are_not_finite_is_never_written(tmp_path, monkeypatch):
    """Updates that make the weights non-finite (here: forced) never reach a checkpoint: the last finite
    one stays the newest, even with keep_checkpoints 1, and the run stops without writing an adapter."""
    cfg = cfgmod.load(None, {"model.config": "nano", "model.tokenizer": "byte", "data.builtin_size": 40,
                             "data.max_seq_len": 48, "train.max_steps": 6, "output.checkpoint_every": 2,
                             "output.keep_checkpoints": 1, "eval.exact_match": 0, "eval.max_records": 4,
                             "output.progress": False, "output.plot": False, "output.dir": str(tmp_path / "run")})
    real_step = torch.optim.AdamW.step
    calls = []

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:  # step 3's update poisons the weights
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(signals.RunStopped, match="weights are not finite"):
        loop.train(cfg)
    run = tmp_path / "run"
    assert [p.name for p in ckpt_mod.list_checkpoints(run)] == ["step-2"]
    assert ckpt_mod.verify_checkpoint(run / "checkpoints" / "step-2") is None
    assert not (run / "adapter").exists()


# ----------------------------------------------------------------------------------------------------
# one writer; fresh run vs resume


def _wait_stopped(pid: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("T"):
                return
        time.sleep(0.1)
    raise AssertionError("the first run never reached its stop point")


def test_two_processes_in_one_run_directory(tmp_path, runs):
    """The second exits 2 at once naming the holder's PID; a SIGKILLed holder leaves no stale lock."""
    reference = runs.reference()
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastsft", "train", *runs.args, "--output.dir", str(run)]
    first = subprocess.Popen(cmd, env=runs.env("step:2:SIGSTOP"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_stopped(first.pid)
        started = time.time()
        second = runs.train(run, "--output.overwrite", "true")
        line = one_error_line(second)
        assert f"is in use by another fastsft process (PID {first.pid})" in line
        assert time.time() - started < 60  # at once: before any data or model is loaded
        assert f"(PID {first.pid})" in one_error_line(runs.resume(run))
    finally:
        first.kill()
        first.wait()
    proc = runs.resume(run)  # killed before its first checkpoint: starts over, the lock is free
    assert proc.returncode == 0, proc.stderr
    runs.assert_same_adapter(reference, run)
    assert train_records(run) == train_records(reference)


def test_a_fresh_run_refuses_a_directory_holding_a_run_and_overwrite_starts_over(tmp_path, runs):
    reference = runs.reference()
    run = copy_run(reference, tmp_path / "run")
    old = (run / "checkpoints" / "step-9" / "trainable.safetensors").read_bytes()
    line = one_error_line(runs.train(run, "--train.max_steps", "2"))
    assert "already holds a run" in line and f"--resume {run}" in line and "--output.overwrite true" in line
    assert (run / "checkpoints" / "step-9" / "trainable.safetensors").read_bytes() == old  # untouched

    proc = runs.train(run, "--train.max_steps", "2", "--output.overwrite", "true")
    assert proc.returncode == 0, proc.stderr
    assert "output.overwrite: deleted the previous run" in proc.stdout
    assert [p.name for p in ckpt_mod.list_checkpoints(run)] == ["step-2"]  # the old run's step-9 is gone
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert cfgmod.load(run / "config.yaml").train.max_steps == 2


def test_a_failed_start_leaves_nothing_behind(tmp_path, runs):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n{"nothing": 2}\n')
    where = tmp_path / "a" / "b" / "run"
    for extra in (["--data", str(tmp_path / "missing.jsonl")],  # preflight
                  ["--data", str(bad), "--format", "prompt_completion"],  # data validation
                  ["--lora.r", "0"]):  # config validation
        one_error_line(runs.train(where, *extra))
        assert not (tmp_path / "a").exists(), extra
    existing = tmp_path / "empty"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    one_error_line(runs.train(existing, "--data", str(bad), "--format", "prompt_completion"))
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
    # --resume of a directory that does not exist: an error that creates nothing
    assert "does not exist; nothing to resume" in one_error_line(runs.resume(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()


# ----------------------------------------------------------------------------------------------------
# the saved config is the run's truth


def test_resume_overrides_refused_by_name_or_applied_and_recorded(tmp_path, runs):
    reference = runs.reference()
    run = copy_run(reference, tmp_path / "run")
    saved = (run / "config.yaml").read_bytes()
    (tmp_path / "other.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    for args, key in ((["--train.lr", "1e-3"], "train.lr"), (["--lora.r", "8"], "lora.r"),
                      (["--data", str(tmp_path / "other.jsonl")], "data.datasets"),
                      (["--data.max_seq_len", "64"], "data.max_seq_len"), (["--train.seed", "1"], "train.seed"),
                      (["--train.max_steps", "5"], "train.max_steps")):
        cmd = [sys.executable, "-m", "fastsft", "train", "--resume", str(run), *args]
        line = one_error_line(subprocess.run(cmd, capture_output=True, text=True, env=runs.env(), timeout=300))
        assert line.startswith(f"fastsft train: error: --{key} "), line
        assert (run / "config.yaml").read_bytes() == saved  # the truth is untouched by a refused resume

    proc = runs.resume(run)  # a plain resume of the finished run: nothing changes, nothing is logged twice
    assert proc.returncode == 0, proc.stderr
    assert (run / "config.yaml").read_bytes() == saved
    assert [r for r in records(run) if r["kind"] != "resume"] == records(reference)

    cmd = [sys.executable, "-m", "fastsft", "train", "--resume", str(run), "--train.max_steps", "12",
           "--output.log_every", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=runs.env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train.max_steps: 9 -> 12" in proc.stdout
    cfg = cfgmod.load(run / "config.yaml")
    assert (cfg.train.max_steps, cfg.output.log_every, cfg.train.lr) == (12, 2, 2e-4)
    assert json.loads((run / "summary.json").read_text())["steps"] == 12
    recs = records(run)
    resume = [r for r in recs if r["kind"] == "resume"][-1]
    assert resume["step"] == 9 and resume["changes"] == {"train.max_steps": [9, 12], "output.log_every": [1, 2]}
    for kind in ("train", "eval"):
        steps = [r["step"] for r in recs if r["kind"] == kind]
        assert steps == sorted(set(steps)), (kind, steps)  # no record twice
    assert [r["step"] for r in recs if r["kind"] == "train"][-2:] == [10, 12]  # every 2 steps from the resume on


def test_a_killed_default_run_can_be_resumed(tmp_path, runs):
    """`fastsft train` with no options, killed: a supervisor's `fastsft train --resume` always works (no
    checkpoint yet: it starts over with a notice)."""
    env = runs.env("step:2")
    cmd = [sys.executable, "-m", "fastsft", "train"]
    assert subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=300).returncode == KILLED
    (run,) = (tmp_path / "runs").iterdir()
    proc = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=runs.env("step:3"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == KILLED, proc.stderr  # it got past setup and trained 3 steps
    assert f"--resume: runs/{run.name} has no checkpoint yet" in proc.stdout
    assert cfgmod.load(run / "config.yaml").output.checkpoint_minutes == 30  # the default cadence by time


def test_checkpoints_by_time_and_a_resume_from_them_is_bitwise(tmp_path, runs):
    reference = runs.reference()
    run = tmp_path / "run"
    by_time = ("--output.checkpoint_every", "0", "--output.checkpoint_minutes", "0.000001")  # every step
    proc = runs.train(run, *by_time, kill_at="step:5")
    assert proc.returncode == KILLED, proc.stderr
    assert [p.name for p in ckpt_mod.list_checkpoints(run)] == ["step-4", "step-5"]
    proc = runs.resume(run)
    assert proc.returncode == 0, proc.stderr
    runs.assert_same_adapter(reference, run)
    assert train_records(run) == train_records(reference)


# ----------------------------------------------------------------------------------------------------
# disk full, metrics, modes, temporaries


def _file_size_limit(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_disk_full_during_a_checkpoint_is_one_line_and_loses_nothing(tmp_path, runs):
    reference = runs.reference()
    run = tmp_path / "run"
    assert runs.train(run, kill_at="step:4").returncode == KILLED
    step3 = run / "checkpoints" / "step-3"
    limit = (step3 / "trainable.safetensors").stat().st_size + 4096  # the optimizer state will not fit
    assert (step3 / "optimizer.safetensors").stat().st_size > limit
    cmd = [sys.executable, "-m", "fastsft", "train", "--resume", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=runs.env(), timeout=300,
                          preexec_fn=_file_size_limit(limit))
    line = one_error_line(proc)
    assert f"could not write checkpoint {run / 'checkpoints' / 'step-6'} (File too large)" in line, line
    assert " free on " in line and "the previous checkpoint step-3 is intact" in line
    assert leftovers(run) == []
    assert [p.name for p in ckpt_mod.list_checkpoints(run)] == ["step-3"]
    assert ckpt_mod.verify_checkpoint(step3) is None
    proc = runs.resume(run)
    assert proc.returncode == 0, proc.stderr
    runs.assert_same_adapter(reference, run)


def test_windowed_averages_are_the_same_across_a_resume(tmp_path, runs):
    """log_every 4 with checkpoints at 3 and 6: the record at step 8 averages steps 5-8 even when the run
    was resumed from step 6."""
    reference = runs.reference("--output.log_every", "4")
    run = tmp_path / "run"
    assert runs.train(run, "--output.log_every", "4", kill_at="step:7").returncode == KILLED
    proc = runs.resume(run)
    assert proc.returncode == 0, proc.stderr
    assert [r[:2] for r in train_records(run)] == [r[:2] for r in train_records(reference)]
    assert [r[0] for r in train_records(run)] == [4, 8, 9]


def test_a_kill_in_the_final_adapter_write_leaves_no_temporary(tmp_path, runs):
    reference = runs.reference()
    run = tmp_path / "run"
    assert runs.train(run, kill_at="outputs:9").returncode == KILLED
    assert not (run / "adapter").exists() and leftovers(run)  # the half-published adapter, beside
    proc = runs.resume(run)
    assert proc.returncode == 0, proc.stderr
    assert leftovers(run) == []
    runs.assert_same_adapter(reference, run)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_files_follow_the_umask_and_no_temporary_outlives_the_run(tmp_path, runs, umask, mode):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastsft", "train", *runs.args, "--train.max_steps", "3", "--output.dir", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=runs.env(), timeout=300,
                          preexec_fn=lambda: os.umask(umask))
    assert proc.returncode == 0, proc.stderr
    files = [p for p in run.rglob("*") if p.is_file() and p.name != LOCK_FILE]
    assert {"adapter_model.safetensors", "config.yaml", "metrics.jsonl", "manifest.json"} <= {p.name for p in files}
    wrong = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != mode}
    assert not wrong
    assert leftovers(run) == []


def test_the_first_checkpoint_measures_what_the_rest_of_the_run_needs(tmp_path, runs, monkeypatch):
    import collections
    import shutil as shutil_mod

    reference = runs.reference()
    ckpt = reference / "checkpoints" / "step-9"
    cfg = cfgmod.load(reference / "config.yaml")
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    adapter = sum(f.stat().st_size for f in (ckpt / "adapter").rglob("*") if f.is_file())
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: usage(1 << 40, 0, size * 2 + adapter))
    assert loop._disk_after_first_checkpoint(ckpt, cfg, reference) is None  # keep 2 + the adapter: fits
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: usage(1 << 40, 0, size))
    warning = loop._disk_after_first_checkpoint(ckpt, cfg, reference)
    assert warning.startswith("fastsft: warning: checkpoint step-9 takes ") and "output.keep_checkpoints=2" in warning
