"""Writing the run directory safely: atomic files and directories, checksums, and write errors as one line.

Every file of a run is written to a temporary sibling that carries the writer's PID
(``.<name>.tmp-<pid>``, ``.tmp-<name>-<pid>``), flushed to disk, then renamed over the final name: a
rename is atomic on POSIX, so a kill leaves either the old file or the new one, never half of one, and a
temporary whose process is gone is recognisably stale (`remove_stale` deletes it at the next start).

A write that fails (disk full, quota, I/O error) raises `WriteFailed`: one line naming the path, the
reason and the free space left on its filesystem, with the temporary removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path

STALE = re.compile(r"^\..+\.tmp-(\d+)$|^\.tmp-.+-(\d+)$")  # .<name>.tmp-PID (file), .tmp-<name>-PID (dir)


class WriteFailed(ValueError):
    """A write into the run directory failed; ``str()`` is the one-line message."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_space(path: Path) -> str:
    """'<n> free on <filesystem path>' for the nearest existing ancestor of ``path``."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{human_bytes(shutil.disk_usage(p).free)} free on {p}"
    except OSError:
        return f"free space on {p} unknown"


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(e).split())
    m = re.search(r"I/O error: (.+?) \(os error \d+\)", text)  # safetensors' wrapping of an OSError
    return m.group(1) if m else text or type(e).__name__


def reason(e: BaseException) -> str:
    """The reason a write failed, in words (``No space left on device``)."""
    return _reason(e)


def write_errors():
    """The exceptions a write can raise: OSError, and safetensors' own error (it wraps ENOSPC/EFBIG)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors always ships it
        return (OSError,)
    return (OSError, SafetensorError)


@contextlib.contextmanager
def writing(path: Path, what: str | None = None, *, after: str = ""):
    """Turn a failed write of ``path`` into `WriteFailed` naming it, the reason and the free space."""
    try:
        yield
    except write_errors() as e:
        name = what or str(path)
        raise WriteFailed(f"could not write {name} ({_reason(e)}); {free_space(Path(path))}"
                          + (f"; {after}" if after else "")) from e


def process_umask() -> int:
    """The process umask, read without changing it where Linux's /proc tells it (os.umask can only be
    read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root``, each file given the mode the umask allows (0644 by
    default: safetensors creates its files 0600, unreadable to a serving process of another user)."""
    mode = 0o666 & ~process_umask()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.chmod(Path(dirpath) / name, mode)
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary ``.<name>.tmp-<pid>``, fsync, rename), mode 0666 & ~umask."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_array(path: Path, array) -> None:
    """``np.save`` of ``array`` to ``path`` atomically, like :func:`atomic_write_bytes` (streamed: no copy of a
    large array in memory)."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync(path.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_directory(final: Path, what: str | None = None, *, after: str = ""):
    """Yield a temporary sibling directory (``.tmp-<name>-<pid>``) to fill; on success it is flushed and
    renamed to ``final`` (an existing ``final`` is swapped out and deleted after); on any error it is removed
    and a failed write raises `WriteFailed` naming ``final``."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        with writing(final, what, after=after):
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            yield tmp
            fsync_tree(tmp)
            old = None
            if final.exists():
                old = final.with_name(f".old-{final.name}-{os.getpid()}")
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync(final.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hash_file(h, path: Path, chunk: int = 1 << 22):
    """Feed ``path``'s bytes to the hash ``h`` (hashlib), a chunk at a time; return ``h``."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h


def sha256_file(path: Path) -> str:
    return hash_file(hashlib.sha256(), path).hexdigest()


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(directory: Path, complete=lambda path: True) -> list[Path]:
    """Delete the temporaries in ``directory`` (not below) left by writers that are gone; return them.
    An ``.old-<name>-<pid>`` left by a swap cut short is put back when ``<name>`` is missing and
    ``complete(it)`` holds (deleted otherwise)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.iterdir()):
        m = STALE.match(entry.name)
        old = re.match(r"^\.old-(.+)-(\d+)$", entry.name)
        if old and not process_alive(int(old.group(2))):
            target = directory / old.group(1)
            try:
                if not target.exists() and complete(entry):
                    os.rename(entry, target)
                else:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    removed.append(entry)
            except OSError:  # another process tidying up at the same time
                pass
            continue
        if not m or process_alive(int(m.group(1) or m.group(2))):
            continue
        try:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed
