"""Package metadata lives in pyproject.toml; this file only adds the native extensions (csrc/).

fastsft._packing (C++ sequence packing) is built with pybind11 on numpy buffers, never torch, so that
pip's isolated build does not fetch a torch wheel. It is optional: without pybind11 or a C++17
compiler, or with FASTSFT_SKIP_NATIVE=1, the install still succeeds and fastsft.packing falls back
to its pure-Python path (with a one-time warning).
"""

import os
import sys

from setuptools import Extension, setup


def native_extensions():
    if os.environ.get("FASTSFT_SKIP_NATIVE", "0") == "1":
        return []
    try:
        import pybind11
    except ImportError:
        print("fastsft: pybind11 not found, skipping fastsft._packing (pure-Python fallback)", file=sys.stderr)
        return []
    return [
        Extension(
            "fastsft._packing",
            sources=["csrc/packing.cpp"],
            include_dirs=[pybind11.get_include()],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-g0"],  # -g0: drops ~4 MB of debug info
            optional=True,  # a failed compile warns and leaves the Python fallback in place
        )
    ]


setup(ext_modules=native_extensions())
