"""Truncation is visible: records and tokens cut are counted and printed, a quarter of the records
dropped is a loud warning, (almost) nothing left is an error naming the file."""

import json
import os
import subprocess
import sys

import pytest

from fastsft.data import DatasetSpec, DataError, build_dataset, load_tokenizer


def records(n_long, n_short, long_len=200):
    long = [{"prompt": f"q{i}: " + "x" * long_len, "completion": "yes"} for i in range(n_long)]
    cut = [{"prompt": f"s{i}", "completion": "a" * 60} for i in range(n_short)]  # response cut, some kept
    return long + cut


def build(recs, max_seq_len=48):
    spec = DatasetSpec(records=recs, name="t", format="prompt_completion")
    return build_dataset([spec], load_tokenizer("byte"), max_seq_len=max_seq_len, eval_fraction=0.0)


def test_truncated_records_and_tokens_are_counted():
    report = build(records(0, 10)).report["datasets"][0]
    assert report["truncated"] == 10 and report["dropped_truncated"] == 0
    assert report["truncated_trained_tokens"] > 0 and report["truncated_tokens"] >= report["truncated_trained_tokens"]


def test_almost_nothing_left_is_an_error():
    with pytest.raises(DataError, match=r"only 1 of 300 records are left: 299 lose every trained token"):
        build(records(299, 1))


def test_the_console_says_it_and_warns_past_a_quarter(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(40, 60)))
    proc = subprocess.run([sys.executable, "-m", "fastsft", "train", "--data", str(data), "--format",
                           "prompt_completion", "--model.config", "nano", "--model.tokenizer", "byte",
                           "--data.max_seq_len", "48", "--train.max_steps", "1", "--eval.exact_match", "0",
                           "--output.progress", "false", "--output.dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert "60 truncated to max_seq_len (" in proc.stdout and "response tokens)" in proc.stdout
    assert "fastsft: warning: " in proc.stdout and "d.jsonl: 40 of 100 records (40%) dropped because max_seq_len" in proc.stdout
