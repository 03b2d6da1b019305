"""Resumable checkpoints, written atomically.

``checkpoints/step-N/`` holds the trainable weights, optimizer and scheduler state, the RNG states
(torch CPU and CUDA, Python ``random``, NumPy's global generator; LoRA dropout draws from torch's) and
the data position (epoch, micro-batch within it). Under torchrun every rank's RNG states are kept:
rank 0's in ``rng.safetensors`` + ``rng.json`` (the single-process files), rank r's in
``rng-rank{r}.safetensors`` + ``rng-rank{r}.json``. It is written to a temporary sibling directory,
every file flushed to disk, then renamed: a rename is atomic on POSIX, so a kill mid-write leaves a
``.tmp-*`` directory that is never picked up (and is deleted by the next write once its process is
gone), and the previous checkpoint stays usable. Rewriting an existing ``step-N`` (a resumed run
redoing the steps after its checkpoint) moves the old one aside first; if the swap is cut short the
one aside is still found by `list_checkpoints` and put back by the next write. Tensors go to safetensors and everything else to JSON, so resuming never unpickles anything.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fastsft.train.signals import maybe_kill_for_test

STEP_DIR = re.compile(r"^step-(\d+)$")
TEMP_DIR = re.compile(r"^\.(tmp|old)-step-(\d+)-(\d+)$")  # .tmp-step-N-PID (being written), .old-... (replaced)
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


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (written by us or by ``write_extra``)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete ``.tmp-*`` checkpoint directories left by killed writers (whose process is gone), and
    finish a replacement cut short between its two renames (``.old-step-N-*`` without ``step-N``)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        m = TEMP_DIR.match(d.name)
        if not m or _process_alive(int(m.group(3))):
            continue
        final = root / f"step-{m.group(2)}"
        try:
            if m.group(1) == "old" and not final.exists() and (d / STATE_FILE).is_file():
                os.rename(d, final)
            else:
                shutil.rmtree(d)
        except OSError:  # another process tidying up at the same time
            pass


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states: tensors for safetensors and a JSON-able dict (`save_checkpoint`'s ``rng_states``)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, py_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    meta = {"python": {"version": version, "state": list(py_state), "gauss": gauss},
            "numpy": {"kind": np_kind, "pos": int(np_pos), "has_gauss": int(np_has_gauss),
                      "gauss": float(np_gauss)}}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict | None) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("cuda.")]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    if meta is None:  # a checkpoint from before Python/NumPy states were saved
        return
    py = meta["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = meta["numpy"]
    np.random.set_state((n["kind"], tensors["numpy"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))


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
                    trainer_state: dict, keep: int, write_extra=None, rng_states: list | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically and keep the newest ``keep`` checkpoints.

    ``rng_states``: every rank's `rng_state()`, in rank order (torchrun); default: this process's.

    ``write_extra(directory)`` may add files (the loop writes the PEFT adapter, so every checkpoint is
    also a usable adapter); it runs inside the temporary directory, before the rename.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
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
    maybe_kill_for_test("checkpoint", step)  # test hook: a kill with half the files written
    for rank, (rng_tensors, rng_meta) in enumerate(rng_states or [rng_state()]):
        _save_tensors(rng_tensors, tmp / f"{_rng_name(rank)}.safetensors")
        _write_json(tmp / f"{_rng_name(rank)}.json", rng_meta)
    if write_extra is not None:
        write_extra(tmp)
    _write_json(tmp / STATE_FILE, {**trainer_state, "step": step})
    _fsync_tree(tmp)

    old = None
    if final.exists():  # a re-run of the same step (resumed after a crash right after this write)
        old = root / f".old-step-{step}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Directories being written (``.tmp-*``) are never listed; a
    ``step-N`` moved aside by a replacement cut short (``.old-step-N-*``, no ``step-N``) is. Only reads:
    the one process that writes checkpoints tidies up (`remove_stale_temporaries`)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found, aside = {}, {}
    for d in root.iterdir():
        m, t = STEP_DIR.match(d.name), TEMP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            found[int(m.group(1))] = d
        elif t and t.group(1) == "old" and (d / STATE_FILE).is_file():
            aside[int(t.group(2))] = d
    found = {**aside, **found}
    return [found[k] for k in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: what ``--resume`` continues from."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _rng_name(rank: int) -> str:
    return "rng" if rank == 0 else f"rng-rank{rank}"


def has_rank_rng(ckpt: Path, rank: int) -> bool:
    """Whether ``ckpt`` holds rank ``rank``'s own RNG states (not so in a checkpoint of fewer processes)."""
    return (Path(ckpt) / f"{_rng_name(rank)}.safetensors").is_file()


def load_checkpoint(ckpt: Path, *, model: torch.nn.Module, optimizer, scheduler, rank: int = 0) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``ckpt``; return the trainer state.

    ``rank``: whose RNG states to restore; a rank the checkpoint has none for gets rank 0's.
    """
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
    name = _rng_name(rank if has_rank_rng(ckpt, rank) else 0)
    rng_meta = json.loads((ckpt / f"{name}.json").read_text()) if (ckpt / f"{name}.json").is_file() else None
    _set_rng_state(load_file(str(ckpt / f"{name}.safetensors")), rng_meta)
    return json.loads((ckpt / STATE_FILE).read_text())
