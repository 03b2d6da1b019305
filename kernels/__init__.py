"""Triton kernels, installed as ``fastsft.kernels``.

Every op here has a plain PyTorch reference with the same signature; the reference is the CPU path,
the oracle in tests and the ablation in benchmarks. ``kernels: auto|on|off`` in the config picks:
auto uses a kernel only on CUDA tensors when Triton is importable.
"""

from __future__ import annotations

import importlib.util
import warnings


def triton_available() -> bool:
    """Whether Triton is importable (it is a Linux-only dependency)."""
    return importlib.util.find_spec("triton") is not None


def relative_error(got, want) -> float:
    """max |got - want| / max |want| in float32 on the CPU (NaN anywhere gives NaN)."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def passes_self_check(what: str, device, dtype, check) -> bool:
    """Run ``check()`` (raises when a kernel disagrees with its reference); on failure warn once and
    return False, so ``kernels: auto`` degrades to the PyTorch path instead of crashing or training
    wrong on a device or Triton version the kernel was never run on. Out-of-memory still raises."""
    import torch

    try:
        check()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure means: do not trust the kernel here
        warnings.warn(f"fastsft: the Triton {what} failed its self-check on {device} ({dtype}): "
                      f"{type(e).__name__}: {e}; using the PyTorch path")
        return False
    return True
