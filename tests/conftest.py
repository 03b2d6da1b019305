"""Test-session setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton chooses interpreter or
compiler when a ``@triton.jit`` function is decorated (its own ``tl.sum``/``tl.max`` when triton is
first imported), so ``TRITON_INTERPRET`` must be set before anything imports triton — transformers and
bitsandbytes do — which is why it is set here, in the conftest pytest imports first.

``python -m pytest`` in the repository root puts the root first on sys.path, where the kernels/ directory
(installed as fastsft.kernels) would shadow Hugging Face's ``kernels`` package, which transformers 5.25+
imports: that entry is dropped here, before anything imports transformers (plain ``pytest`` never adds it).
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if not (os.path.abspath(p or ".") == _ROOT
                                           and os.path.isfile(os.path.join(_ROOT, "kernels", "__init__.py")))]

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_kernel_usage():
    """Each test starts with an empty record of kernel paths (and its fallback warnings not yet given)."""
    from fastsft import kernel_usage

    kernel_usage.reset()
    yield


@pytest.fixture(autouse=True)
def _private_token_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own token-store cache (fastsft/data/cache.py), so no test is served the stores
    of another, and the user's cache is never touched."""
    monkeypatch.setenv("FASTSFT_CACHE_DIR", str(tmp_path_factory.mktemp("token-cache")))
    yield


# ----------------------------------------------------------------------------------------------------
# the GPU session's selection: `pytest -m cuda` runs every test that only a GPU runs, each time-boxed


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs only with a CUDA GPU (added to every test with a skipif whose "
                                       "reason names CUDA or a GPU); benchmarks/gpu_session.py runs `-m cuda`")


def pytest_collection_modifyitems(config, items):
    """Mark the CUDA-only tests from their skip reasons, so that no such test can be left out of the GPU
    session by forgetting a marker."""
    import re

    needs_gpu = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)
    for item in items:
        if any(needs_gpu.search(str(m.kwargs.get("reason", ""))) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def _time_limit():
    """FASTSFT_TEST_TIMEOUT=S fails a test that runs longer than S seconds (the GPU machine has no
    pytest-timeout, and one hung kernel must not eat the session's other tests)."""
    import signal

    seconds = int(os.environ.get("FASTSFT_TEST_TIMEOUT", "0") or 0)
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"the test ran past FASTSFT_TEST_TIMEOUT={seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
