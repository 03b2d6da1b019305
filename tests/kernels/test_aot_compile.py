"""Every ``@triton.jit`` function of fastsft.kernels compiles ahead of time for sm_90 and sm_80, with no
register spills, at the specialisations its launchers really use (benchmarks/aot_compile.py; no GPU).

The script runs as a subprocess without TRITON_INTERPRET (this session turns the interpreter on, which
would replace the compiler) and compiles into a fresh private triton cache, so the numbers are real.
``pytest -s`` shows its table. The second test does the same with the oldest supported triton, installed
beside the current one:

    python -m pip install --target ~/.cache/fastsft/triton-3.6.0 --no-deps triton==3.6.0

(or anywhere, named by FASTSFT_TRITON_OLDEST).
"""

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from fastsft import compat

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "aot_compile.py"
OLDEST_TRITON = Path(os.environ.get("FASTSFT_TRITON_OLDEST")
                     or Path.home() / ".cache" / "fastsft" / f"triton-{compat.TRITON_MIN}.0")
TARGETS = ("sm_90", "sm_80")


def _jit_function_names() -> set[str]:
    """The @triton.jit functions defined in fastsft.kernels, found here rather than trusted to the script
    (in the interpreter they are InterpretedFunctions, on a GPU JITFunctions)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    import fastsft.kernels

    names = set()
    for info in pkgutil.iter_modules(fastsft.kernels.__path__):
        module = importlib.import_module(f"fastsft.kernels.{info.name}")
        for value in vars(module).values():
            if isinstance(value, (JITFunction, InterpretedFunction)) and value.fn.__module__ == module.__name__:
                names.add(f"{module.__name__}.{value.fn.__name__}")
    return names


def _run_aot(tmp_path, *args) -> dict:
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    print(proc.stdout)
    summary = proc.stdout[proc.stdout.find("summary"):] + proc.stderr[-5000:]
    assert out.exists(), f"exit status {proc.returncode}, no report:\n{summary}"
    report, status = json.loads(out.read_text()), proc.returncode
    assert status == 0 and not report["problems"], "\n".join(report["problems"]) + "\n\n" + summary

    # the script's own verdict, checked again from its rows: every JIT function compiled for both
    # targets (a helper inside the kernels that call it), and no spills anywhere
    compiled = {(r["kernel"], r["target"]) for r in report["rows"] if "error" not in r}
    names = _jit_function_names()
    assert names and names == set(report["jit_functions"]), summary
    for name in sorted(names):
        coverage = report["jit_functions"][name]
        kernels = [name] if coverage["launched"] else coverage["called_from"]
        assert kernels, f"{name}: no captured launch reaches it\n{summary}"
        for kernel, target in ((k, t) for k in kernels for t in TARGETS):
            assert (kernel, target) in compiled, f"{name}: not compiled for {target}\n{summary}"
    spills = [f"{r['kernel']} {r['target']} {r['specialisation']}" for r in report["rows"]
              if r.get("spill_stores") or r.get("spill_loads")]
    assert not spills, "\n".join(spills)
    return report


def test_every_kernel_compiles_for_sm90_and_sm80_without_spills(tmp_path):
    report = _run_aot(tmp_path)
    assert report["triton_version"] == triton.__version__


@pytest.mark.skipif(not (OLDEST_TRITON / "triton").is_dir(),
                    reason=f"no triton {compat.TRITON_MIN}.0 in {OLDEST_TRITON}: python -m pip install --target "
                           f"{OLDEST_TRITON} --no-deps triton=={compat.TRITON_MIN}.0 (or set FASTSFT_TRITON_OLDEST)")
def test_every_kernel_compiles_with_the_oldest_supported_triton(tmp_path):
    report = _run_aot(tmp_path, "--triton-path", OLDEST_TRITON)
    assert report["triton_version"].startswith(f"{compat.TRITON_MIN}."), report["triton_version"]
    assert Path(report["triton_path"]).is_relative_to(OLDEST_TRITON.resolve()), report["triton_path"]
