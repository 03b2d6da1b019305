"""Which path every native piece really took in this process: what ``summary.json``'s ``kernels_used`` says.

The pieces are the ``train.kernels`` pieces (``loss``, ``lora``, ``rms_norm``, ``rope``, ``swiglu``), plus
``attention`` (packed rows: a varlen flash kernel, or SDPA over a dense block-diagonal mask) and
``packing`` (the C++ best-fit-decreasing packer, or its pure-Python fallback).

Each dispatch point calls :func:`record` with the path it took and, for the reference path, why; a
piece that took both paths in one run is reported as ``mixed`` with both reasons. A fallback that costs
speed or memory the user did not ask to give up (``kernels: auto`` on CUDA: a failed self-check, a
missing kernel, a signature this code does not know) goes through :func:`fallback` instead, which also
warns once per piece with the real exception and the expected cost, so that a run (or a benchmark row)
can never be silently handicapped. The self-checks' outcomes are kept too (:func:`self_checks`), so the
GPU session script can print every one with its exception.
"""

from __future__ import annotations

import contextlib
import threading
import warnings

__all__ = ["PIECES", "COSTS", "record", "fallback", "muted", "note_self_check", "snapshot", "self_checks", "reset",
           "summary_line"]

PIECES = ("loss", "lora", "rms_norm", "rope", "swiglu", "geglu", "attention", "packing")

# What the reference path of each piece costs on a GPU, so a fallback message says what is lost.
COSTS = {
    "loss": "the chunked PyTorch loss: float32 logit chunks of up to 256 MiB and 8NVD instead of 6NVD head "
            "FLOPs (about 1.3x the loss time)",
    "lora": "plain-autograd LoRA: the dense (dequantized) base weight of every adapted projection is kept from "
            "forward to backward (one more bf16 copy of the adapted weights at the activation peak), plus "
            "x A^T and the dropped input per projection",
    "rms_norm": "eager RMSNorm: about six passes over float32 temporaries each way instead of one (memory-bound, "
                "a few percent of a step)",
    "rope": "eager RoPE: rotate_half copies and float32 temporaries of q and k (several extra passes)",
    "swiglu": "eager SwiGLU: silu(g) and the product materialised and saved (two more [tokens x intermediate] "
              "tensors per layer)",
    "geglu": "eager GeGLU: gelu_tanh(g) and the product materialised and saved, plus tanh's temporaries (more "
             "[tokens x intermediate] tensors per layer)",
    "attention": "packed rows on SDPA with a dense T x T block-diagonal mask and repeated K/V heads: about "
                 "T / (mean record length) times the attention work (roughly 9x at ~10 records per 2048-token "
                 "row) and a T x T mask per sliding-window kind",
    "packing": "the pure-Python best-fit-decreasing packer: seconds instead of milliseconds per million records "
               "(once, before training)",
}

_lock = threading.Lock()
_local = threading.local()  # .muted: inside a self-check, whose own kernel/reference calls are not the run's
_used: dict[str, dict[str, dict]] = {}  # piece -> path -> {"reason"/"impl"/"cost"}
_warned: set[str] = set()
_checks: dict[tuple, dict] = {}  # (piece, device, dtype) -> {"ok", "error", "seconds"}


def record(piece: str, path: str, reason: str | None = None, *, impl: str | None = None) -> None:
    """Note that ``piece`` ran on ``path`` ("native" or "reference"); the first note per path is kept.
    Cheap enough for every call: a dict lookup once the path is known."""
    paths = _used.get(piece)
    if paths is not None and path in paths or getattr(_local, "muted", False):
        return
    with _lock:
        entry = {}
        if reason:
            entry["reason"] = reason
        if impl:
            entry["impl"] = impl
        _used.setdefault(piece, {}).setdefault(path, entry)


def fallback(piece: str, reason: str, *, where: str = "") -> None:
    """``piece`` runs its reference path where the native one was expected: record it with the cost, and
    warn once per piece and process (the reason carries the real exception)."""
    if piece in _warned and "reference" in _used.get(piece, {}) or getattr(_local, "muted", False):
        return  # known already (this is the per-call path: keep it cheap), or inside a self-check
    cost = COSTS.get(piece, "")
    record(piece, "reference", reason)
    with _lock:
        _used[piece]["reference"].setdefault("cost", cost)
        first = piece not in _warned
        _warned.add(piece)
    if first:
        at = f" on {where}" if where else ""
        warnings.warn(f"fastsft: {piece} falls back to its PyTorch reference path{at}: {reason}. "
                      f"Expected cost: {cost}", stacklevel=3)


@contextlib.contextmanager
def muted():
    """Calls made inside (a self-check running both paths on purpose) are not recorded."""
    before = getattr(_local, "muted", False)
    _local.muted = True
    try:
        yield
    finally:
        _local.muted = before


def note_self_check(piece: str, device, dtype, ok: bool, error: str | None, seconds: float) -> None:
    with _lock:
        _checks[(piece, str(device), str(dtype).replace("torch.", ""))] = {"ok": ok, "error": error,
                                                                          "seconds": seconds}


def self_checks() -> dict[str, dict]:
    """Every self-check run in this process: ``"piece device dtype" -> {ok, error, seconds}``."""
    with _lock:
        return {" ".join(k): dict(v) for k, v in _checks.items()}


def snapshot() -> dict[str, dict]:
    """``piece -> {"path": native | reference | mixed | unused, "reason"?, "impl"?, "cost"?}`` for every piece."""
    out = {}
    with _lock:
        for piece in dict.fromkeys([*PIECES, *_used]):
            paths = _used.get(piece, {})
            if not paths:
                out[piece] = {"path": "unused", "reason": "not called in this run"}
            elif len(paths) == 1:
                (path, entry), = paths.items()
                out[piece] = {"path": path, **entry}
            else:
                out[piece] = {"path": "mixed", **{p: dict(e) for p, e in paths.items()}}
    return out


def summary_line(used: dict[str, dict] | None = None) -> str:
    """``kernels: loss, lora native; rms_norm, rope reference (CPU tensors: ...); ...``: pieces that took
    the same path for the same reason share one entry; unused pieces are left out."""
    used = snapshot() if used is None else used
    groups: dict[str, list[str]] = {}
    for piece, e in used.items():
        if e["path"] == "unused":
            continue
        if e["path"] == "reference":
            key = f"reference ({e.get('reason', '')})"
        elif e["path"] == "mixed":
            key = f"mixed (reference: {e['reference'].get('reason', '')})"
        else:
            key = "native" + (f" ({e['impl']})" if e.get("impl") else "")
        groups.setdefault(key, []).append(piece)
    return "kernels: " + "; ".join(f"{', '.join(pieces)} {key}" for key, pieces in groups.items())


def reset() -> None:
    """Forget what was recorded (a new run in the same process). Self-check results stay: the checks are
    cached per process, so they are not run again."""
    with _lock:
        _used.clear()
        _warned.clear()
