"""Test-session setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton chooses interpreter or
compiler when a ``@triton.jit`` function is decorated (its own ``tl.sum``/``tl.max`` when triton is
first imported), so ``TRITON_INTERPRET`` must be set before anything imports triton — transformers and
bitsandbytes do — which is why it is set here, in the conftest pytest imports first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_kernel_usage():
    """Each test starts with an empty record of kernel paths (and its fallback warnings not yet given)."""
    from fastsft import kernel_usage

    kernel_usage.reset()
    yield
