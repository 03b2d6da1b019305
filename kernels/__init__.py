"""Triton kernels, installed as ``fastsft.kernels``.

Every op here has a plain PyTorch reference with the same signature; the reference is the CPU path,
the oracle in tests and the ablation in benchmarks. ``kernels: auto|on|off`` in the config picks:
auto uses a kernel only on CUDA tensors when Triton is importable.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether Triton is importable (it is a Linux-only dependency)."""
    return importlib.util.find_spec("triton") is not None


def relative_error(got, want) -> float:
    """max |got - want| / max |want| in float32 on the CPU (NaN anywhere gives NaN)."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def self_check_error(piece: str, device, dtype, check) -> str | None:
    """Run ``check()`` (it raises when a kernel disagrees with its reference) and return None when it
    passes, else the real exception as ``"Type: message"``. ``kernels: auto`` trusts a kernel only after
    this, so a device or Triton version the kernel was never run on degrades to the PyTorch path (loudly:
    see ``fastsft.kernel_usage.fallback``) instead of crashing or training wrong. Out-of-memory still
    raises. The outcome is kept for ``fastsft.kernel_usage.self_checks``."""
    import time

    import torch

    from fastsft import kernel_usage

    t0 = time.perf_counter()
    try:
        # a check runs at the first use of a piece, which may be inside no_grad (an eval) or autocast:
        # it needs gradients, and sets any autocast it wants itself
        with kernel_usage.muted(), torch.enable_grad(), torch.autocast(getattr(device, "type", str(device)),
                                                                       enabled=False):
            check()
        error = None
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means: do not trust the kernel here
        error = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
    kernel_usage.note_self_check(piece, device, dtype, error is None, error, time.perf_counter() - t0)
    return error
