"""The CPU benchmark suite: `python -m pytest benchmarks --benchmark-only` (pytest-benchmark).

pytest collects only test_*.py by default; the suite's modules are named bench_*.py like the
stand-alone scripts beside them, so they are listed here. The stand-alone scripts (argparse mains,
GPU-first) are not collected. The suite is not part of the test run (pyproject's testpaths = tests).
"""

from __future__ import annotations

import sys

import pytest

SUITE = ("bench_packing.py", "bench_data_pipeline.py", "bench_loss.py", "bench_train_step.py")


def pytest_collect_file(file_path, parent):
    if file_path.name in SUITE and not parent.session.isinitpath(file_path):  # named explicitly: pytest does it
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(optionalhook=True)  # a pytest-benchmark hook: no error where the plugin is absent
def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Results files carry the command that made them (benchmarks/README.md, report.py)."""
    output_json["command"] = " ".join(["python -m pytest"] + sys.argv[1:])
