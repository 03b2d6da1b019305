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

Verified: ``manifest.json`` is written last, listing each file's size and sha256, the step and the
fastsft version; then every file is flushed and the directory renamed (`files.atomic_directory`). `verify_checkpoint` checks the manifest, every
checksum, every JSON file's schema and every safetensors header, so a truncated, garbled or bit-flipped
file is named and the checkpoint skipped (`newest_verified`), never half-loaded. A failed write (disk
full, I/O error) removes its temporary directory and raises `WriteFailed` naming it and the free space;
the previous checkpoint is untouched.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastsft import __version__
from fastsft.train.files import atomic_directory, remove_stale, sha256_file, writing
from fastsft.train.signals import maybe_kill_for_test

STEP_DIR = re.compile(r"^step-(\d+)$")
TEMP_DIR = re.compile(r"^\.(tmp|old)-step-(\d+)-(\d+)$")  # .tmp-step-N-PID (being written), .old-... (replaced)
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last inside the temporary directory: sizes and sha256 of every file
MANIFEST_FORMAT = "fastsft-checkpoint/1"
REQUIRED = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "rng.safetensors", STATE_FILE)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))  # flushed with the whole directory before it is published


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete ``.tmp-*`` checkpoint directories left by killed writers (whose process is gone), and
    finish a replacement cut short between its two renames (``.old-step-N-*`` without ``step-N``)."""
    remove_stale(Path(run_dir) / "checkpoints", complete=_complete)


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


class Cadence:
    """When the loop writes a checkpoint: every ``every`` optimizer steps (0: not by steps) and whenever
    ``minutes`` of training passed since the last one (0: not by time). The final step is not due: the
    loop checkpoints it after the final evaluation."""

    def __init__(self, *, every: int, minutes: float, total_steps: int, step: int):
        self.every, self.minutes, self.total_steps = every, minutes, total_steps
        self.last_step, self.last_time = step, time.monotonic()

    def due(self, step: int) -> bool:
        if step == self.total_steps:
            return False
        by_steps = bool(self.every) and step % self.every == 0
        return by_steps or (bool(self.minutes) and time.monotonic() - self.last_time >= 60 * self.minutes)

    def written(self, step: int) -> None:
        """A checkpoint of ``step`` was written (or tried): the clock starts again."""
        self.last_step, self.last_time = step, time.monotonic()


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, optimizer, scheduler,
                    trainer_state: dict, keep: int, write_extra=None, rng_states: list | None = None) -> Path:
    """Write ``run_dir/checkpoints/step-{step}`` atomically and keep the newest ``keep`` checkpoints.

    ``rng_states``: every rank's `rng_state()`, in rank order (torchrun); default: this process's.

    ``write_extra(directory)`` may add files (the loop writes the PEFT adapter, so every checkpoint is
    also a usable adapter); it runs inside the temporary directory, before the manifest and the rename.

    A failed write raises `WriteFailed` (one line: the checkpoint, the reason, the free space) after
    removing the temporary directory; the checkpoints already there are untouched.
    """
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    with writing(root, f"checkpoint {final}"):
        root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir)
    previous = latest_checkpoint(run_dir)
    intact = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    # .tmp-step-N-PID, flushed, renamed over step-N (a re-run of the same step swaps the old one out)
    with atomic_directory(final, f"checkpoint {final}", after=intact) as tmp:
        _write_files(tmp, step, model=model, optimizer=optimizer, scheduler=scheduler,
                     trainer_state=trainer_state, write_extra=write_extra, rng_states=rng_states)
    # the oldest beyond ``keep``; never this one (the newest, its checksums read back as it was written)
    older = [c for c in list_checkpoints(run_dir) if _step_of(c) < step]
    for c in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(c, ignore_errors=True)
    return final


def _write_files(tmp: Path, step: int, *, model, optimizer, scheduler, trainer_state, write_extra, rng_states):
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
    # the manifest last: its checksums are read back from the files as written
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        files[path.relative_to(tmp).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    _write_json(tmp / MANIFEST, {"format": MANIFEST_FORMAT, "step": step, "fastsft_version": __version__,
                                 "files": files})


def _step_of(ckpt: Path) -> int:
    m = STEP_DIR.match(ckpt.name) or TEMP_DIR.match(ckpt.name)
    return int(m.group(1) if STEP_DIR.match(ckpt.name) else m.group(2))


def _complete(d: Path) -> bool:
    """Written to the end: a manifest (or, from fastsft before manifests, the trainer state)."""
    return (d / MANIFEST).is_file() or (d / STATE_FILE).is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints written to the end, oldest first (`verify_checkpoint` says whether each is intact).
    Directories being written (``.tmp-*``) are never listed; a ``step-N`` moved aside by a replacement
    cut short (``.old-step-N-*``, no ``step-N``) is. Only reads: the one process that writes checkpoints
    tidies up (`remove_stale_temporaries`)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found, aside = {}, {}
    for d in root.iterdir():
        m, t = STEP_DIR.match(d.name), TEMP_DIR.match(d.name)
        if m and d.is_dir():
            found[int(m.group(1))] = d
        elif t and t.group(1) == "old" and _complete(d):
            aside[int(t.group(2))] = d
    found = {**aside, **found}
    return [found[k] for k in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint directory (not verified: see `newest_verified`)."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def newest_verified(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that verifies or None, [(newer checkpoint, why it was skipped)])."""
    rejected = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt, rejected
        rejected.append((ckpt, problem))
    return None, rejected


# ----------------------------------------------------------------------------------------------------
# verification


class _Bad(Exception):
    """One problem with one file of a checkpoint: ``str()`` names the file and the reason."""


def _read_json(path: Path, rel: str):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise _Bad(f"{rel}: missing") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _Bad(f"{rel}: not valid JSON ({' '.join(str(e).split())[:80]})") from None


def _need(ok: bool, rel: str, what: str) -> None:
    if not ok:
        raise _Bad(f"{rel}: {what}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_manifest(ckpt: Path) -> dict:
    m = _read_json(ckpt / MANIFEST, MANIFEST)
    _need(isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT, MANIFEST, f"not a {MANIFEST_FORMAT} manifest")
    files = m.get("files")
    _need(isinstance(files, dict) and all(isinstance(v, dict) and _is_int(v.get("size"))
                                          and isinstance(v.get("sha256"), str) for v in files.values()),
          MANIFEST, "its file list is malformed")
    _need(m.get("step") == _step_of(ckpt), MANIFEST, f"says step {m.get('step')!r}, the directory is {ckpt.name}")
    for name in REQUIRED:
        _need(name in files, MANIFEST, f"does not list {name}")
    for rel, entry in files.items():
        path = ckpt / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise _Bad(f"{rel}: missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise _Bad(f"{rel}: {size} bytes, the manifest says {entry['size']} (truncated or overwritten)")
        if sha256_file(path) != entry["sha256"]:
            raise _Bad(f"{rel}: contents differ from what was written (sha256 mismatch: damaged or edited)")
    return m


def _check_safetensors(path: Path, rel: str) -> dict[str, tuple]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except FileNotFoundError:
        raise _Bad(f"{rel}: missing") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise _Bad(f"{rel}: not a readable safetensors file ({' '.join(str(e).split())[:80]})") from None


def _check_schemas(ckpt: Path, step: int | None) -> None:
    state = _read_json(ckpt / STATE_FILE, STATE_FILE)
    _need(isinstance(state, dict), STATE_FILE, "is not a JSON object")
    for key in ("step", "epoch", "batch_in_epoch"):
        _need(_is_int(state.get(key)) and state[key] >= 0, STATE_FILE, f"'{key}' missing or not a count")
    if step is not None:
        _need(state["step"] == step, STATE_FILE, f"says step {state['step']}, the directory is step-{step}")
    sched = _read_json(ckpt / "scheduler.json", "scheduler.json")
    _need(isinstance(sched, dict) and _is_int(sched.get("last_epoch")) and isinstance(sched.get("base_lrs"), list)
          and isinstance(sched.get("lr_lambdas"), list), "scheduler.json",
          "is not a learning-rate scheduler state (needs last_epoch, base_lrs, lr_lambdas)")
    opt = _read_json(ckpt / "optimizer.json", "optimizer.json")
    _need(isinstance(opt, dict) and isinstance(opt.get("scalars"), dict) and isinstance(opt.get("param_groups"), list)
          and all(isinstance(g, dict) and isinstance(g.get("params"), list) and "lr" in g
                  for g in opt["param_groups"]), "optimizer.json",
          "is not an optimizer state (needs param_groups with params and lr, and scalars)")
    shapes = _check_safetensors(ckpt / "trainable.safetensors", "trainable.safetensors")
    opt_shapes = _check_safetensors(ckpt / "optimizer.safetensors", "optimizer.safetensors")
    n_params = sum(len(g["params"]) for g in opt["param_groups"])
    _need(n_params == len(shapes), "optimizer.json", f"holds {n_params} parameters, the weights {len(shapes)}")
    for key in opt_shapes:
        _need(key.split(".", 1)[0].isdigit() and int(key.split(".", 1)[0]) < n_params, "optimizer.safetensors",
              f"tensor {key!r} belongs to no parameter")
    rng = _check_safetensors(ckpt / "rng.safetensors", "rng.safetensors")
    _need("torch" in rng, "rng.safetensors", "has no torch generator state")
    if (ckpt / "rng.json").exists() or "numpy" in rng:
        meta = _read_json(ckpt / "rng.json", "rng.json")
        _need(isinstance(meta, dict) and isinstance(meta.get("python"), dict) and isinstance(meta.get("numpy"), dict)
              and isinstance(meta["python"].get("state"), list), "rng.json", "is not a Python/NumPy RNG state")


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when ``ckpt`` is intact; otherwise one line naming the damaged file and why.

    With a manifest: every listed file's size and sha256, then the JSON schemas and safetensors headers.
    A checkpoint from fastsft before manifests gets the schema and header checks only."""
    ckpt = Path(ckpt)
    try:
        if (ckpt / MANIFEST).exists():
            step = _check_manifest(ckpt)["step"]
        elif (ckpt / STATE_FILE).exists():
            step = None  # no checksums to check against
        else:
            raise _Bad(f"{MANIFEST}: missing (the write was cut short, or the file was deleted)")
        _check_schemas(ckpt, step)
    except _Bad as e:
        return str(e)
    except OSError as e:
        return f"{Path(e.filename).name if e.filename else ckpt.name}: unreadable ({e.strerror or e})"
    return None


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
    wrong = [f"{n} {tuple(t.shape)} vs {tuple(params[n].shape)}" for n, t in trainable.items()
             if tuple(t.shape) != tuple(params[n].shape)]
    if wrong:
        raise ValueError(f"{ckpt / 'trainable.safetensors'}: tensor shapes do not match the model being trained "
                         f"({', '.join(wrong[:2])}); was the config changed?")
    bad = [n for n, t in trainable.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{ckpt / 'trainable.safetensors'}: weights are not finite ({bad[0]})")
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
