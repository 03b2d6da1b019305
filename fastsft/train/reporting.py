"""Sending the run's metrics to the tools people watch runs in: TensorBoard and Weights & Biases.

``metrics.jsonl`` stays the source of truth: `MetricsLog` writes each record there first and then hands
the same record to every reporter named in ``output.report_to``. A reporter logs each numeric field of a
record as ``<kind>/<field>`` (``train/loss``, ``eval/eval_loss``) at the record's step.

- ``tensorboard``: event files under ``<run>/tensorboard/`` (``torch.utils.tensorboard``; needs the
  ``tensorboard`` package). A resumed run purges the events past its resume step, so the curves have no
  step twice.
- ``wandb``: one W&B run per run directory (its id is kept in ``<run>/wandb_id`` so a resume continues it);
  ``WANDB_MODE=offline`` (or ``wandb offline``) is honoured by wandb itself.

A reporter whose package is missing is one line naming what to install, before anything is trained.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

from fastsft.config import ConfigError

REPORTERS = ("tensorboard", "wandb")


def scalars(record: dict) -> dict[str, float]:
    """``<kind>/<field>``: value for every finite number of a record except its step."""
    kind = record.get("kind", "train")
    out = {}
    for key, value in record.items():
        if key in ("kind", "step") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("output.report_to tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or leave it out of output.report_to)") from None
        # purge_step: events at steps >= it (written after the checkpoint a resume starts from) are dropped
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record.get("step", 0))
        self.writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("output.report_to wandb needs the wandb package: pip install wandb "
                              "(or leave it out of output.report_to)") from None
        id_file = run_dir / "wandb_id"
        # our own id (wandb's generator moved between versions): 8 lowercase hex digits, a valid W&B run id
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        if not id_file.is_file():
            from fastsft.train.files import atomic_write_text

            atomic_write_text(id_file, run_id + "\n")
        self.run = wandb.init(id=run_id, name=run_dir.name, dir=str(run_dir), config=config, resume="allow",
                              project="fastsft")

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record.get("step", 0))

    def close(self) -> None:
        self.run.finish()


_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _installed(package: str) -> bool:
    import importlib.util
    import sys

    return package in sys.modules or importlib.util.find_spec(package) is not None


def check_available(names: list[str]) -> None:
    """One line naming the package to install, before any data or model is loaded."""
    for name in names:
        if not _installed(_PACKAGES[name]):
            raise ConfigError(f"output.report_to {name} needs the {_PACKAGES[name]} package: pip install "
                              f"{_PACKAGES[name]} (or leave {name} out of output.report_to)")


def open_reporters(names: list[str], run_dir: Path, *, config: dict, resume_step: int | None) -> list:
    out = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoard(run_dir, resume_step))
        elif name == "wandb":
            out.append(WandB(run_dir, config))
        else:  # config validation names the key first; this is the backstop
            raise ConfigError(f"config key 'output.report_to' has unknown reporter {name!r}; known: "
                              f"{', '.join(REPORTERS)}")
    return out
