"""Resumable checkpoints, written atomically.

``checkpoints/step-N/`` holds the trainable weights, optimizer and scheduler state, RNG states and the
data position. It is written to a temporary sibling directory, flushed to disk, then renamed: a
rename is atomic on POSIX, so a kill mid-write leaves a ``.tmp-*`` directory that is never picked up,
and the previous checkpoint stays usable. Tensors go to safetensors and everything else to JSON, so
resuming never unpickles anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"  # written last inside the temporary directory


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, optimizer, scheduler,
                    trainer_state: dict, keep: int, write_extra=None) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically and keep the newest ``keep`` checkpoints.

    ``write_extra(directory)`` may add files (the loop writes the PEFT adapter, so every checkpoint is
    also a usable adapter); it runs inside the temporary directory, before the rename.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _save_tensors(trainable, tmp / "trainable.safetensors")
    opt_tensors, opt_meta = _optimizer_to_files(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    _write_json(tmp / "optimizer.json", opt_meta)
    _write_json(tmp / "scheduler.json", scheduler.state_dict())
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _save_tensors(rng, tmp / "rng.safetensors")
    if write_extra is not None:
        write_extra(tmp)
    _write_json(tmp / STATE_FILE, {**trainer_state, "step": step})
    _fsync_dir(tmp)

    if final.exists():  # a re-run of the same step (resumed after a crash right after this write)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(ckpt: Path, *, model: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``ckpt``; return the trainer state."""
    trainable = load_file(str(ckpt / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in trainable]
    unexpected = [n for n in trainable if n not in params]
    if missing or unexpected:
        raise ValueError(f"{ckpt}: checkpoint does not match the model being trained "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was the config changed?")
    with torch.no_grad():
        for n, t in trainable.items():
            params[n].copy_(t)
    meta = json.loads((ckpt / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_files(load_file(str(ckpt / "optimizer.safetensors")), meta))
    scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return json.loads((ckpt / STATE_FILE).read_text())
