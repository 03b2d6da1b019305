"""A cache of token stores, so a rerun on the same data starts training without tokenising.

The key is a hash of everything that decides the tokens: the content of every data file (sha256 of its
bytes; every file of a directory input), the tokenizer (its saved files, chat template included), every
option that changes what is tokenised or how it is split (format, field mapping, max_seq_len, train_on,
add_bos, skip_bad_records, eval split, mixture weights, seed, the built-in data's size) and the fastsft
version. A hit gives exactly the stores a fresh tokenisation would (same records, same order); anything
that differs is a miss. Entries live in ``$FASTSFT_CACHE_DIR`` (default ``~/.cache/fastsft/token-stores``),
one directory per key, written atomically; ``data.token_cache: false`` turns the cache off.

An entry also keeps what a base model computed on its records -- the per-record losses of a ``base_loss``
curriculum, the top-k log-probs of ``train.kl_base_topk`` -- one file per base (:func:`model_fingerprint`),
so a rerun on the same data and base skips that pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from fastsft import __version__
from fastsft.train.files import hash_file, sha256_file

STORE_FILES = ("train.npz", "eval.npz", "report.json")


def cache_root() -> Path:
    return Path(os.environ.get("FASTSFT_CACHE_DIR") or Path.home() / ".cache" / "fastsft" / "token-stores")


def _input_digest(path: str) -> str:
    """sha256 over a file's bytes, or over every file (name and bytes) under a directory."""
    p = Path(path).expanduser()
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
            hash_file(h, f)
    elif p.is_file():
        hash_file(h, p)
    else:  # a Hub dataset id: the files of its local cache snapshot; a missing path is never a cache hit
        from fastsft.data.formats import resolve_source

        try:
            files = resolve_source(path)
        except Exception:  # noqa: BLE001 - the loader says what is wrong
            return f"unhashable:{path}"
        for f, name in files:
            h.update(name.encode() + b"\0")
            hash_file(h, f)
    return h.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256(repr(type(tokenizer).__name__).encode())
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + b"\0")
                hash_file(h, f)
    template = getattr(getattr(tokenizer, "hf", None), "chat_template", None)
    h.update(json.dumps(template, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(cfg, tokenizer) -> str | None:
    """The cache key of the token stores ``cfg`` and ``tokenizer`` make; None when a data input cannot be
    hashed (then nothing is cached)."""
    data = cfg.data
    paths = []
    for entry in list(data.datasets) + list(data.eval_datasets) + ([data.replay] if data.replay else []):
        paths.append(entry.get("path") if isinstance(entry, dict) else entry)
    digests = {str(p): _input_digest(str(p)) for p in paths}
    if any(d.startswith("unhashable:") for d in digests.values()):
        return None
    what = {
        "fastsft": __version__, "inputs": digests, "tokenizer": _tokenizer_digest(tokenizer),
        "datasets": data.datasets, "eval_datasets": data.eval_datasets, "format": data.format,
        "fields": data.fields, "max_seq_len": data.max_seq_len, "train_on": data.train_on,
        "add_bos": data.add_bos, "skip_bad_records": data.skip_bad_records, "eval_fraction": data.eval_fraction,
        "builtin_size": None if data.datasets else data.builtin_size, "seed": cfg.train.seed,
        "replay": data.replay,
    }
    if data.curriculum.startswith("field:"):  # the stores then keep each record's number
        what["score_field"] = data.curriculum
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def model_fingerprint(cfg) -> str | None:
    """What decides a base model's losses on the cached records: every model option, the seed (a preset's
    random weights), and each weight file's name, size and modification time (not its bytes: hashing a
    16 GB checkpoint would cost more than it saves). None for a model that is not a local path or preset
    (nothing is cached for it)."""
    import dataclasses

    what = {"model": dataclasses.asdict(cfg.model), "seed": cfg.train.seed}
    if cfg.model.path:
        p = Path(cfg.model.path).expanduser()
        if not p.exists():
            return None
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        what["files"] = [(q.relative_to(p).as_posix() if p.is_dir() else q.name, q.stat().st_size,
                          q.stat().st_mtime_ns) for q in files]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _side_file(key: str | None, fingerprint: str | None, name: str) -> Path | None:
    if key is None or fingerprint is None:
        return None
    return cache_root() / key / f"{name}-{fingerprint}.npy"


def load_side(key: str | None, fingerprint: str | None, name: str, shape: tuple, *, mmap: bool = False):
    """An array an earlier run on the same token stores and the same base kept beside them (the base-loss
    scores, the base's top-k), or None when there is none of that shape."""
    import numpy as np

    path = _side_file(key, fingerprint, name)
    try:
        array = (np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
                 if path is not None and path.is_file() else None)
    except (OSError, ValueError):
        return None
    return array if array is not None and array.shape == tuple(shape) else None


def keep_side(key: str | None, fingerprint: str | None, name: str, source: Path) -> None:
    """Keep a run's ``.npy`` file (``source``) in the cache beside the token stores it belongs to: a hard link
    where the filesystem allows, atomic, best effort."""
    path = _side_file(key, fingerprint, name)
    if path is None or not path.parent.is_dir():
        return
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _link_or_copy(source, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _digests(directory: Path) -> dict[str, str]:
    out = {}
    for name in STORE_FILES:
        if (directory / name).is_file():
            out[name] = sha256_file(directory / name)
    return out


def lookup(key: str | None) -> Path | None:
    """The cache entry of ``key`` when it is complete and its files are what was written (checksums);
    a damaged entry is deleted and counts as a miss."""
    if key is None:
        return None
    entry = cache_root() / key
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        if manifest == _digests(entry) and "train.npz" in manifest and "report.json" in manifest:
            return entry
    except (OSError, ValueError):
        pass
    if entry.exists():
        import shutil

        shutil.rmtree(entry, ignore_errors=True)
    return None


def store(key: str | None, data_dir: Path) -> None:
    """Copy a run's freshly written token stores into the cache (best effort: a cache that cannot be
    written only costs the next run a tokenisation)."""
    if key is None:
        return
    from fastsft.train.files import atomic_directory

    entry = cache_root() / key
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with atomic_directory(entry) as tmp:
            for name in STORE_FILES:
                if (data_dir / name).is_file():
                    _link_or_copy(data_dir / name, tmp / name)
            (tmp / "manifest.json").write_text(json.dumps(_digests(tmp), sort_keys=True))
    except (OSError, ValueError):
        pass


def copy_into(entry: Path, data_dir: Path) -> None:
    """The cached stores into a run's data/ directory (hard links where the filesystem allows)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in STORE_FILES:
        if (entry / name).is_file():
            _link_or_copy(entry / name, data_dir / name)


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
