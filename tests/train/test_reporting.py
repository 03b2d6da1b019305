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
    fake.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    fake.init = lambda **kw: inits.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    loop.train(run_cfg(tmp_path, **{"output.report_to": ["wandb"]}))
    assert inits[0]["id"] == "abc123" and inits[0]["resume"] == "allow"
    assert (tmp_path / "run" / "wandb_id").read_text().strip() == "abc123"
    steps = [s for s, d in (x for x in logged if x != "finish") if "train/loss" in d]
    assert steps == [1, 2, 3, 4, 5, 6] and logged[-1] == "finish"


def test_a_missing_reporter_package_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "_installed", lambda package: False)
    with pytest.raises(cfgmod.ConfigError, match="output.report_to wandb needs the wandb package: pip install wandb"):
        loop.train(run_cfg(tmp_path, **{"output.report_to": ["wandb"]}))
    assert not (tmp_path / "run").exists()
    with pytest.raises(cfgmod.ConfigError, match="output.report_to"):
        run_cfg(tmp_path, **{"output.report_to": ["mlflow"]})
