"""fastsft.compat: the torch APIs the GPU paths call exist with the parameters fastsft passes -- in the
installed torch, and in the lowest supported release read from its wheel (no GPU, no install)."""

import os
import sys
from pathlib import Path

import pytest

from fastsft import compat

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

REPO = Path(__file__).resolve().parents[1]
# python -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
#     --platform manylinux_2_28_x86_64 torch==2.11.0 -d ~/.cache/fastsft        (530 MB)
LOWEST_WHEELS = ([Path(os.environ["FASTSFT_TORCH_LOWEST_WHEEL"])] if os.environ.get("FASTSFT_TORCH_LOWEST_WHEEL")
                 else sorted(Path.home().glob(f".cache/fastsft/torch-{compat.TORCH_MIN}.0-*.whl")))


def _bad(rows):
    return [f"{r['api']}: {r.get('problem')}" for r in rows if not r["ok"]]


def test_installed_torch_has_every_api_the_gpu_paths_call():
    rows = compat.check()
    assert len(rows) == len(compat.TORCH_APIS)
    assert not _bad(rows), _bad(rows)


@pytest.mark.skipif(not LOWEST_WHEELS, reason=f"no torch {compat.TORCH_MIN} wheel in ~/.cache/fastsft (see the "
                                               "download command at the top of this file)")
def test_lowest_supported_torch_has_every_api_the_gpu_paths_call():
    source = compat.TorchSource(LOWEST_WHEELS[-1])
    assert source.version.startswith(compat.TORCH_MIN + "."), source.version
    rows = compat.check(source)
    assert not _bad(rows), _bad(rows)
    varlen = next(r for r in rows if r["api"].endswith("varlen_attn"))
    assert varlen["optional_present"] == []  # 2.11 has no enable_gqa: fastsft must not pass it there


def test_a_missing_parameter_or_function_is_reported(tmp_path):
    """The check can fail: a torch whose varlen_attn lacks window_size (torch 2.10) and has no fully_shard."""
    (tmp_path / "nn" / "attention").mkdir(parents=True)
    (tmp_path / "version.py").write_text("__version__ = '2.10.0'\n")
    (tmp_path / "nn" / "attention" / "varlen.py").write_text(
        "def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):\n"
        "    pass\n")
    rows = {r["api"]: r for r in compat.check(compat.TorchSource(tmp_path))}
    assert rows["torch.nn.attention.varlen.varlen_attn"]["missing"] == ["window_size"]
    assert "not defined" in rows["torch.distributed.fsdp.fully_shard"]["problem"]
    assert compat.main(["--wheel", str(tmp_path)]) == 1


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_pyproject_states_the_supported_range():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch>={compat.TORCH_MIN}" in deps
    assert any(d.startswith(f"triton>={compat.TRITON_MIN}") for d in deps)
