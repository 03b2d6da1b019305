"""Real ``fastsft train`` processes for the kill/signal tests: a tiny run (packing, gradient
accumulation, LoRA dropout, an epoch boundary inside an optimizer step) and its uninterrupted result."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

# 57 train records -> ~22 packed rows -> 11 micro-batches of 2 an epoch: step 6's two micro-batches
# straddle the epoch boundary. 9 steps, a checkpoint every 3 (3, 6; the final one at 9).
TINY = ["--model.config", "nano", "--model.tokenizer", "byte", "--data.builtin_size", "60",
        "--data.max_seq_len", "48", "--data.packing", "true", "--train.micro_batch_size", "2",
        "--train.grad_accum", "2", "--lora.dropout", "0.1", "--train.max_steps", "9",
        "--output.checkpoint_every", "3", "--output.keep_checkpoints", "2", "--output.log_every", "1",
        "--eval.exact_match", "0", "--eval.max_records", "8", "--output.progress", "false",
        "--output.plot", "false", "--train.threads", "1"]


class Runs:
    args = TINY

    def __init__(self, tmp_factory):
        self.tmp_factory = tmp_factory
        self.references = {}

    @staticmethod
    def env(kill_at=None):
        env = {k: v for k, v in os.environ.items() if k != "FASTSFT_TEST_KILL_AT"}
        env["PYTHONWARNINGS"] = "ignore"
        if kill_at:
            env["FASTSFT_TEST_KILL_AT"] = kill_at
        return env

    def train(self, run_dir, *extra, kill_at=None, timeout=300):
        """``fastsft train`` with the tiny args (a fresh run), killed at ``kill_at`` if given."""
        cmd = [sys.executable, "-m", "fastsft", "train", *TINY, *map(str, extra), "--output.dir", str(run_dir)]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env(kill_at), timeout=timeout)

    def resume(self, run_dir, kill_at=None, timeout=300):
        cmd = [sys.executable, "-m", "fastsft", "train", "--resume", str(run_dir)]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env(kill_at), timeout=timeout)

    def reference(self, *extra):
        """The uninterrupted run with these extra args (run once per session)."""
        if extra not in self.references:
            run_dir = self.tmp_factory.mktemp("reference") / "run"
            proc = self.train(run_dir, *extra)
            assert proc.returncode == 0, proc.stderr
            self.references[extra] = run_dir
        return self.references[extra]

    @staticmethod
    def assert_same_adapter(a_dir, b_dir):
        a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
        b = load_file(str(b_dir / "adapter" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory)
