"""The run directory is a contract: one writer, a fresh run never mixes with an old one, and a resume
continues exactly the run that is there.

- **One writer.** `RunDirectory.open` takes an exclusive ``fcntl.flock`` on ``<run>/.fastsft.lock``
  before anything is written in the directory; the kernel releases it when the process dies, so a
  SIGKILLed run leaves no stale lock. A second process gets one line naming the holder's PID. Under
  torchrun only rank 0 (the one that writes) holds it.
- **Fresh run vs resume.** A fresh run into a directory that already holds a run (checkpoints, an
  adapter or model, metrics, token stores) is refused unless ``output.overwrite`` (then the old run's
  files are deleted first). A fresh run that fails before training starts (bad config, bad data, a model
  that does not load) leaves nothing behind in a directory it created. ``--resume`` on a directory that
  does not exist is an error that creates nothing; on a run with no checkpoint yet (killed before its
  first one) it starts the run again from step 0 with a notice, so a supervisor may always pass ``--resume``.
- **The saved config.yaml is the run's truth.** It is written atomically and only when it legitimately
  changes. On resume the requested config is compared key by key with it: `RESUMABLE` keys (extending
  ``train.max_steps``, eval/log/checkpoint cadence, progress bar, plot, CPU threads) are applied, recorded in
  config.yaml and in metrics.jsonl as a ``resume`` record; any other difference is refused with one line
  naming the key and why (the steps already trained used the saved value). Nothing is ignored silently.
- **Verified inputs.** ``run.json`` lists the size and sha256 of the run's own inputs (config.yaml, the
  token stores in data/, a random base in base_model/); resume checks them and names a damaged file. The
  checkpoint to resume from is the newest that verifies (`checkpoint.newest_verified`); a damaged newer
  one is named, moved aside to ``checkpoints/damaged-step-N`` and skipped.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from fastsft import __version__
from fastsft import config as config_mod
from fastsft import preflight as preflight_mod
from fastsft.config import Config, ConfigError
from fastsft.train import checkpoint as ckpt_mod
from fastsft.train.files import atomic_write_text, remove_stale, sha256_file

LOCK_FILE = ".fastsft.lock"
RUN_MANIFEST = "run.json"
RUN_MANIFEST_FORMAT = "fastsft-run/1"
# what makes a directory hold a run: a fresh run refuses it, --output.overwrite deletes it
RUN_ENTRIES = ("checkpoints", "adapter", "model", "metrics.jsonl", "summary.json", "data", "base_model",
               "loss.png", "config.yaml", RUN_MANIFEST)
EVIDENCE = ("checkpoints", "adapter", "model", "metrics.jsonl", "summary.json", "data", "base_model")

# Options a resumed run may change, with what the change means. Everything else is refused.
RESUMABLE = {
    "train.max_steps": "the run ends at the new step count (the learning-rate schedule is recomputed for it)",
    "eval.every": "evaluation cadence",
    "output.log_every": "metrics cadence",
    "output.checkpoint_every": "checkpoint cadence",
    "output.checkpoint_minutes": "checkpoint cadence",
    "output.keep_checkpoints": "how many checkpoints are kept",
    "output.progress": "progress bar",
    "data.workers": "tokenising processes (the token stores are reused on resume)",
    "output.plot": "loss plot",
    "output.report_to": "where metrics are also sent",
    "train.threads": "CPU threads",
}
NOT_COMPARED = {"output.dir", "output.overwrite"}  # where the run is / how a fresh one starts


class RunDirError(ConfigError):
    """A run-directory problem; ``str()`` is the one-line message."""


def _why_refused(key: str) -> str:
    section = key.split(".")[0]
    if key in ("train.seed", "train.micro_batch_size", "train.grad_accum", "train.epochs", "train.group_by_length"):
        return "the batches and data order of the steps already trained depend on it"
    if section == "data":
        return "the run trains on the token store it built at the start (data/train.npz)"
    if section in ("model", "lora"):
        return "the checkpoint's weights belong to the model and adapter it was trained with"
    if key in ("train.lr", "train.adam_betas", "train.adam_eps", "train.weight_decay", "train.warmup_ratio",
               "train.schedule", "train.min_lr_ratio", "train.max_grad_norm"):
        return "the optimizer state and learning-rate schedule of the steps already trained used the saved value"
    return "it changes how the run trains, and the steps already trained used the saved value"


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _holds_run(path: Path) -> list[str]:
    found = []
    for name in EVIDENCE:
        p = path / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(name)
    return found


class RunDirectory:
    """One run's directory, held by this process (see the module docstring).

    ``mode``: "fresh", "resume" (``checkpoint`` is the verified one to load) or "restart" (``--resume``
    of a run with no checkpoint yet: it starts again from step 0). ``changes``: the options a resume
    changed, {key: [saved, new]}; ``skipped``: [(checkpoint name, why)] for damaged newer checkpoints."""

    def __init__(self, path: Path, *, main: bool = True):
        self.path = Path(path)
        self.main = main
        self.mode = "fresh"
        self.checkpoint: Path | None = None
        self.changes: dict[str, list] = {}
        self.skipped: list[tuple[str, str]] = []
        self.notices: list[str] = []
        self.started = False
        self._lock_fd: int | None = None
        self._created: Path | None = None  # the topmost directory this run created
        self._before: set[str] | None = None  # what was in the directory when this run took it over

    # ---- opening -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: Config, *, resume: bool, main: bool = True) -> "RunDirectory":
        """Lock the run directory and decide fresh / resume / restart; may change ``cfg`` (a resume's
        saved config). Non-main ranks of a torchrun only get the decision (`shared` / `from_shared`)."""
        run = cls(Path(cfg.output.dir), main=main)
        try:
            if resume:
                run._open_resume(cfg)
            else:
                run._open_fresh(cfg)
        except BaseException:
            run.close(ok=False)
            raise
        return run

    def _open_fresh(self, cfg: Config) -> None:
        path = self.path
        if preflight_mod._check_output_dir(cfg):  # cannot be created or written: say so with every other problem
            preflight_mod.preflight(cfg)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"output.dir {path} exists and is not a directory; choose another with --output.dir")
        top, p = None, path.absolute()
        while not p.exists() and p != p.parent:  # the topmost directory this run will create
            top, p = p, p.parent
        try:
            path.mkdir(parents=True)
            self._created = top
        except FileExistsError:  # another process made it a moment ago: not ours to remove
            pass
        except OSError as e:
            raise RunDirError(f"output.dir {path} cannot be created ({e.strerror}); choose another with "
                              f"--output.dir") from None
        before = {p.name for p in path.iterdir()}
        self._lock()
        held = _holds_run(path)
        if held:
            if not cfg.output.overwrite:
                raise RunDirError(
                    f"output.dir {path} already holds a run ({', '.join(held)}); continue it with "
                    f"fastsft train --resume {path}, or start over with --output.overwrite true "
                    f"(deletes it), or choose another --output.dir")
            self._clear()
            self.notices.append(f"output.overwrite: deleted the previous run in {path} ({', '.join(held)})")
        self._before = before - set(RUN_ENTRIES)

    def _open_resume(self, cfg: Config) -> None:
        path = self.path
        if not path.is_dir():
            what = "does not exist" if not path.exists() else "is not a directory"
            raise RunDirError(f"--resume: {path} {what}; nothing to resume (start the run without --resume)")
        self.mode = "resume"  # a failure from here on never removes anything
        self._lock()
        self._tidy()
        saved_path = path / "config.yaml"
        held = _holds_run(path)
        if not saved_path.exists():
            if held:
                raise RunDirError(f"--resume: {saved_path} is missing, so the run in {path} ({', '.join(held)}) "
                                  f"cannot be continued: its configuration is gone")
            self._restart(cfg, "holds no run yet")
            return
        saved = load_saved_config(path)
        ckpt, rejected = ckpt_mod.newest_verified(path)
        self.skipped = [(c.name, why) for c, why in rejected]
        if ckpt is None and rejected:
            details = "; ".join(f"{c.name}: {why}" for c, why in rejected)
            raise RunDirError(f"--resume: no checkpoint in {path / 'checkpoints'} verifies ({details}); "
                              f"the run cannot be continued (start it again with --output.overwrite true)")
        if ckpt is None:
            self._restart(cfg, "has no checkpoint yet (it was stopped before its first one)", saved=saved)
            return
        self.verify_inputs()  # both checked before anything in the directory changes
        changes = resume_changes(saved, cfg, at_step=_checkpoint_step(ckpt))
        for c, why in rejected:  # newer than the one resumed from and damaged: out of the way, kept to inspect
            aside = c.with_name(f"damaged-{c.name}")
            n = 1
            while aside.exists():
                aside, n = c.with_name(f"damaged-{c.name}.{n}"), n + 1
            os.rename(c, aside)
            self.notices.append(f"checkpoint {c.name} is damaged ({why}); moved aside to {aside.name}")
        if rejected:
            self.notices.append(f"resuming from {ckpt.name}, the newest checkpoint that verifies")
        self.checkpoint, self.changes = ckpt, changes
        for key, (_, new) in self.changes.items():
            config_mod.set_option(saved, key, new)
        saved.output.dir = cfg.output.dir
        _copy_into(cfg, saved)
        if self.changes:  # atomically, and only when it legitimately changes
            self.write_config(cfg)

    def _restart(self, cfg: Config, why: str, saved: Config | None = None) -> None:
        """--resume of a run that cannot be continued because it never got that far: start it over."""
        if saved is not None:  # its saved config, with what this command asks on top (nothing was trained)
            was = config_mod.flatten(saved)
            asked = {k: v for k, v in config_mod.flatten(cfg).items() if k not in NOT_COMPARED and v != was[k]}
            for key, value in asked.items():
                config_mod.set_option(saved, key, value)
            saved.output.dir = cfg.output.dir
            _copy_into(cfg, saved)
        self._clear(keep=("config.yaml",))  # the run's truth stays until the restart writes it again
        self.mode = "restart"
        self.notices.append(f"--resume: {self.path} {why}: starting it from step 0")

    # ---- shared with the other ranks of a torchrun ---------------------------------------------------

    def shared(self, cfg: Config) -> dict:
        return {"mode": self.mode, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "changes": self.changes, "skipped": self.skipped, "config": config_mod.to_dict(cfg)}

    @classmethod
    def from_shared(cls, cfg: Config, shared: dict) -> "RunDirectory":
        run = cls(Path(cfg.output.dir), main=False)
        run.mode, run.changes, run.skipped = shared["mode"], shared["changes"], [tuple(s) for s in shared["skipped"]]
        run.checkpoint = Path(shared["checkpoint"]) if shared["checkpoint"] else None
        _copy_into(cfg, config_mod.from_dict(shared["config"]))  # rank 0's decision: the saved config on resume
        return run

    # ---- the lock ------------------------------------------------------------------------------------

    def _lock(self) -> None:
        lock = self.path / LOCK_FILE
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise RunDirError(f"output.dir {self.path}: cannot create the lock file {lock} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirError(f"output.dir {self.path} is in use by another fastsft process (PID {holder}); "
                                  f"wait for it to finish or stop it, or choose another --output.dir") from None
            raise RunDirError(f"output.dir {self.path}: cannot lock {lock} ({e.strerror})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self, ok: bool = True) -> None:
        """Release the lock; a fresh run that failed before training started leaves nothing it wrote
        (a restart keeps its config.yaml, so the next --resume tries again with it)."""
        if not ok and not self.started and self.mode == "fresh" and self._lock_fd is not None:
            self._abandon()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the kernel drops the flock with the last descriptor
            self._lock_fd = None

    def _abandon(self) -> None:
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
            return
        if self._before is None:  # refused before taking the directory over: nothing of ours is in it
            return
        for entry in self.path.iterdir():
            if entry.name not in self._before and entry.name != LOCK_FILE:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
        if LOCK_FILE not in self._before:
            (self.path / LOCK_FILE).unlink(missing_ok=True)

    def _clear(self, keep: tuple[str, ...] = ()) -> None:
        for name in (n for n in RUN_ENTRIES if n not in keep):
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def _tidy(self) -> None:
        """Temporaries of writers that are gone: checkpoints being written, outputs being swapped."""
        ckpt_mod.remove_stale_temporaries(self.path)
        for d in (self.path, self.path / "adapter", self.path / "model", self.path / "data"):
            remove_stale(d)

    # ---- config and inputs ---------------------------------------------------------------------------

    def write_config(self, cfg: Config) -> None:
        if not self.main:
            return
        config_mod.dump(cfg, self.path / "config.yaml")
        self.record_inputs("config.yaml")

    def record_inputs(self, *relpaths: str) -> None:
        """Add (or refresh) these files, or every file under these directories, in run.json."""
        if not self.main:
            return
        manifest = _read_run_manifest(self.path) or {"format": RUN_MANIFEST_FORMAT, "files": {}}
        for rel in relpaths:
            p = self.path / rel
            paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
            for q in paths:
                if q.is_file():
                    manifest["files"][q.relative_to(self.path).as_posix()] = {
                        "size": q.stat().st_size, "sha256": sha256_file(q)}
        manifest["fastsft_version"] = __version__
        atomic_write_text(self.path / RUN_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))

    def verify_inputs(self) -> None:
        """Every file run.json lists is there, whole and unchanged; otherwise one line naming it."""
        problem = verify_run_files(self.path)
        if problem:
            raise RunDirError(f"--resume: {problem}; the run cannot be continued without it (start it again "
                              f"with --output.overwrite true)")

    def mark_started(self) -> None:
        self.started = True


# ----------------------------------------------------------------------------------------------------
# helpers


def _copy_into(cfg: Config, src: Config) -> None:
    for section in config_mod.SECTIONS:
        setattr(cfg, section, getattr(src, section))


def _checkpoint_step(ckpt: Path) -> int:
    return json.loads((ckpt / ckpt_mod.STATE_FILE).read_text())["step"]


def _read_run_manifest(run_dir: Path) -> dict | None:
    p = run_dir / RUN_MANIFEST
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RunDirError(f"{p}: not valid JSON ({' '.join(str(e).split())[:80]}); the run's file list is "
                          f"damaged") from None
    if not (isinstance(m, dict) and m.get("format") == RUN_MANIFEST_FORMAT and isinstance(m.get("files"), dict)
            and all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                    for v in m["files"].values())):
        raise RunDirError(f"{p}: not a {RUN_MANIFEST_FORMAT} file list; the run's file list is damaged")
    return m


def verify_run_files(run_dir: Path, only: tuple[str, ...] | None = None) -> str | None:
    """None, or '<path>: <why>' for the first file of run.json (or of ``only``) that is damaged."""
    manifest = _read_run_manifest(run_dir)
    if manifest is None:
        return None  # a run from fastsft before run.json: the loaders' own checks still apply
    for rel, entry in sorted(manifest["files"].items()):
        if only is not None and rel not in only:
            continue
        p = run_dir / rel
        if not p.is_file():
            return f"{p}: missing"
        if p.stat().st_size != entry["size"]:
            return f"{p}: {p.stat().st_size} bytes, {entry['size']} were written (truncated or overwritten)"
        if sha256_file(p) != entry["sha256"]:
            return f"{p}: contents differ from what was written (sha256 mismatch: damaged or edited)"
    return None


def load_saved_config(run_dir: Path) -> Config:
    """The run's config.yaml, checked against run.json; a damaged one is one line naming it."""
    path = Path(run_dir) / "config.yaml"
    problem = verify_run_files(Path(run_dir), only=("config.yaml",))
    if problem:
        raise RunDirError(f"--resume: {problem}; the run's configuration is damaged")
    try:
        return config_mod.load(path)
    except UnicodeDecodeError:
        raise RunDirError(f"--resume: {path}: not text (damaged); the run's configuration is damaged") from None
    except ConfigError as e:
        msg = " ".join(str(e).split())
        raise RunDirError(f"--resume: {msg if str(path) in msg else f'{path}: {msg}'}; the run's configuration "
                          f"is damaged") from None


def resume_changes(saved: Config, requested: Config, *, at_step: int) -> dict[str, list]:
    """{key: [saved, requested]} for the `RESUMABLE` differences; `RunDirError` naming the first other one."""
    a, b = config_mod.flatten(saved), config_mod.flatten(requested)
    changes = {}
    for key in a:
        if key in NOT_COMPARED or a[key] == b[key]:
            continue
        if key not in RESUMABLE:
            raise RunDirError(f"--{key} {_fmt(b[key])}: cannot change on --resume: {_why_refused(key)} "
                              f"(this run has {_fmt(a[key])}); start a new run for it (another --output.dir, "
                              f"or --output.overwrite true)")
        if key == "train.max_steps" and 0 < b[key] < at_step:
            raise RunDirError(f"--train.max_steps {b[key]}: the run is already at step {at_step} (its newest "
                              f"checkpoint); give a larger value to extend it")
        if key == "train.max_steps" and b[key] == 0:
            raise RunDirError(f"--train.max_steps 0: cannot change on --resume from {a[key]} to an epoch count "
                              f"(the schedule of the steps already trained used {a[key]} steps)")
        changes[key] = [a[key], b[key]]
    return changes
