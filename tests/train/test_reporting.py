"""output.report_to: TensorBoard event files (read back with tensorboard's own reader) carry the same
numbers as metrics.jsonl, with no step twice after a resume; W&B gets the same records; a missing
package is one line before anything is loaded."""

import json
import os
import signal
import subprocess
import sys
import types

import pytest

from fastsft import config as cfgmod
from fastsft.train import loop, reporting


def run_cfg(tmp_path, **over):
    base = {"model.config": "nano", "model.tokenizer": "byte", "data.builtin_size": 60, "data.max_seq_len": 48,
            "train.max_steps": 6, "output.checkpoint_every": 3, "output.log_every": 1, "eval.exact_match": 0,
            "eval.max_records": 8, "output.progress": False, "output.plot": False,
            "output.dir": str(tmp_path / "run")}
    return cfgmod.load(None, {**base, **over})


def read_scalars(run_dir):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_match_metrics_and_survive_a_resume(tmp_path):
    """Killed after step 5 (checkpoint at 3), resumed: the events of steps 4-5 are purged and redone."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "fastsft", "train", "--model.config", "nano", "--model.tokenizer", "byte",
            "--data.builtin_size", "60", "--data.max_seq_len", "48", "--train.max_steps", "6",
            "--output.checkpoint_every", "3", "--output.log_every", "1", "--eval.exact_match", "0",
            "--eval.max_records", "8", "--output.progress", "false", "--output.plot", "false",
            "--output.report_to", "tensorboard", "--output.dir", str(run)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FASTSFT_TEST_KILL_AT": "step:5"}
    assert subprocess.run(args, env=env, capture_output=True, timeout=300).returncode == -signal.SIGKILL
    assert [s for s, _ in read_scalars(run)["train/loss"]] == [1, 2, 3, 4, 5]
    env.pop("FASTSFT_TEST_KILL_AT")
    proc = subprocess.run([sys.executable, "-m", "fastsft", "train", "--resume", str(run)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    got = read_scalars(run)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    assert [s for s, _ in got["train/loss"]] == [s for s, _ in train] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in got["train/loss"]] == pytest.approx([v for _, v in train], rel=1e-6)  # float32 in events
    evals = [(r["step"], r["eval_loss"]) for r in records if r["kind"] == "eval"]
    assert [s for s, _ in got["eval/eval_loss"]] == [s for s, _ in evals] == [0, 6]


def test_wandb_gets_every_record_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    logged, inits = [], []

    class Run:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            logged.append("finish")

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: inits.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    loop.train(run_cfg(tmp_path, **{"output.report_to": ["wandb"]}))
    run_id = inits[0]["id"]
    assert len(run_id) == 8 and int(run_id, 16) >= 0 and inits[0]["resume"] == "allow"
    assert (tmp_path / "run" / "wandb_id").read_text().strip() == run_id
    steps = [s for s, d in (x for x in logged if x != "finish") if "train/loss" in d]
    assert steps == [1, 2, 3, 4, 5, 6] and logged[-1] == "finish"


def test_a_missing_reporter_package_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "_installed", lambda package: False)
    with pytest.raises(cfgmod.ConfigError, match="output.report_to wandb needs the wandb package: pip install wandb"):
        loop.train(run_cfg(tmp_path, **{"output.report_to": ["wandb"]}))
    assert not (tmp_path / "run").exists()
    with pytest.raises(cfgmod.ConfigError, match="output.report_to"):
        run_cfg(tmp_path, **{"output.report_to": ["mlflow"]})


def wandb_history(run_dir):
    """The history rows of a W&B offline run file (``<run>/wandb/offline-run-*/run-<id>.wandb``): a 7-byte
    header, then LevelDB-log records of wandb's protobuf ``Record``s (read here: wandb >= 0.19 has no Python
    reader of its own)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, rows, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_a_real_wandb_offline_run_gets_every_record(tmp_path, monkeypatch):
    """The real wandb package in offline mode (no network): its run file holds metrics.jsonl's numbers at the
    same steps, and the run id is kept for a resume."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    loop.train(run_cfg(tmp_path, **{"output.report_to": ["wandb"]}))
    run = tmp_path / "run"
    run_id = (run / "wandb_id").read_text().strip()
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    rows = wandb_history(run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    logged = {row["_step"]: row["train/loss"] for row in rows if "train/loss" in row}
    assert logged == pytest.approx(train) and sorted(logged) == [1, 2, 3, 4, 5, 6]
    evals = {r["step"]: r["eval_loss"] for r in records if r["kind"] == "eval"}
    assert {row["_step"]: row["eval/eval_loss"] for row in rows if "eval/eval_loss" in row} == pytest.approx(evals)
