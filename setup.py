# The native extensions (csrc/: C++ packing, built with pybind11 + numpy, never torch) are added here
# as they land; the package metadata lives in pyproject.toml.
from setuptools import setup

setup()
