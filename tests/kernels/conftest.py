"""Kernel tests run on a GPU, or in Triton's interpreter (tests/conftest.py turns it on for CPU machines)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def triton_can_run():
    import triton.language as tl

    # the interpreter works only if triton's own @jit library (tl.sum, tl.max) was built for it
    if not torch.cuda.is_available() and type(tl.sum).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET was set (see tests/conftest.py)")
