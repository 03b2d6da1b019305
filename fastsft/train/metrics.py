"""metrics.jsonl (one JSON object per logged step or eval) and the loss-curve plot."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

from fastsft.train.files import atomic_write_text, writing


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class MetricsLog:
    """Appends records to ``metrics.jsonl``.

    A fresh run starts the file over. A resumed run keeps what the checkpoint it resumed from had seen:
    records up to its step, minus the ``resume`` record of an earlier resume from the same step (the new
    one replaces it); records past it are the lost steps', redone. An eval record is written once per
    step: resuming a finished run does not log its final evaluation again."""

    def __init__(self, path: Path, resume_step: int | None = None, reporters: list | None = None):
        self.path = path
        self.reporters = reporters or []  # reporting.py: TensorBoard / W&B get every record written here
        if resume_step is not None and path.exists():
            # a line cut short by a kill is dropped; the rewrite is atomic, so a second kill loses nothing
            kept = [line for line in path.read_text(errors="replace").splitlines()
                    if (r := _parse(line)) is not None and r.get("step", 0) <= resume_step
                    and not (r.get("kind") == "resume" and r.get("step") == resume_step)]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()
        self._evals = {r["step"] for r in self.read() if r.get("kind") == "eval"}

    def write(self, record: dict) -> None:
        if record.get("kind") == "eval":
            if record["step"] in self._evals:
                return
            self._evals.add(record["step"])
        with writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for reporter in self.reporters:
            reporter.write(record)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [r for line in self.path.read_text(errors="replace").splitlines() if (r := _parse(line)) is not None]


def _parse(line: str) -> dict | None:
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) else None


def plot_losses(records: list[dict], out_png: Path) -> None:
    """Train loss per logged step and eval loss per evaluation, on one axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval" and "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss (response tokens)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (held-out responses)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out_png)
