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
