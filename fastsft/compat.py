"""The torch and Triton versions fastsft supports, and the torch APIs its GPU paths call, checked by signature.

    python -m fastsft.compat                      # the installed torch
    python -m fastsft.compat --wheel torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl

Supported (pyproject.toml states the same lower bounds; tests/test_compat.py keeps them in step):

    torch   >= 2.11   2.11 is the GPU image we know (torch 2.11.0+cu130); 2.13 runs CI (CPU)
    triton  >= 3.6    3.6.0 ships with torch 2.11; every kernel compiles for sm_90/sm_80 with it
                      (benchmarks/aot_compile.py), and 3.9 runs CI

Why signatures: a GPU path is exercised only on a GPU, which CI does not have, and torch moves these
APIs between releases (torch 2.11's ``varlen_attn`` has no ``enable_gqa``; passing it raised TypeError,
the self-check failed, and every packed batch silently ran the dense-mask attention). Each entry below
names the parameters fastsft passes; the check reads the API's Python source or type stub -- from the
installed torch, or from a wheel of another release without installing it (a CUDA wheel cannot be
imported on a CPU machine, but its Python files can be read) -- and fails on a missing function or
parameter. ``optional`` parameters are ones fastsft passes only when the signature has them.
"""

from __future__ import annotations

import argparse
import ast
import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

__all__ = ["TORCH_MIN", "TRITON_MIN", "TORCH_APIS", "TorchApi", "TorchSource", "check", "main"]

TORCH_MIN = "2.11"
TRITON_MIN = "3.6"


class TorchApi(NamedTuple):
    name: str  # as fastsft calls it
    files: tuple[str, ...]  # where torch defines it (source or stub), relative to the torch package
    params: tuple[str, ...]  # parameters fastsft passes by name (or needs to exist)
    optional: tuple[str, ...] = ()  # passed only when the signature has them
    used_by: str = ""
    cls: str = ""  # the function is this class's __init__ (torch.autocast)


TORCH_APIS = (
    TorchApi("torch.nn.attention.varlen.varlen_attn", ("nn/attention/varlen.py",), ("window_size",),
             optional=("enable_gqa",), used_by="packed attention on CUDA (fastsft/model/llama.py)"),
    TorchApi("torch.nn.functional.scaled_dot_product_attention", ("_C/_nn.pyi",),
             ("attn_mask", "is_causal", "enable_gqa"), used_by="attention (fastsft/model/llama.py)"),
    TorchApi("torch.autocast", ("amp/autocast_mode.py",), ("device_type", "dtype", "enabled"), cls="autocast",
             used_by="bf16 training; the fused LoRA and self-checks switch it off inside"),
    TorchApi("torch.get_autocast_dtype", ("_C/__init__.pyi",), ("device_type",),
             used_by="fused LoRA compute dtype, varlen attention dtype"),
    TorchApi("torch.is_autocast_enabled", ("_C/__init__.pyi",), ("device_type",),
             used_by="fused LoRA compute dtype, varlen attention dtype"),
    TorchApi("torch.distributed.fsdp.fully_shard", ("distributed/fsdp/_fully_shard/_fully_shard.py",), ("mesh",),
             used_by="train.fsdp (fastsft/train/distributed.py)"),
    TorchApi("torch.distributed.device_mesh.init_device_mesh", ("distributed/device_mesh.py",),
             ("device_type", "mesh_shape"), used_by="train.fsdp"),
    TorchApi("torch.utils.cpp_extension.load", ("utils/cpp_extension.py",),
             ("name", "sources", "extra_include_paths", "extra_cflags", "extra_cuda_cflags"),
             used_by="the CUDA packing extension (fastsft/packing_cuda.py)"),
    TorchApi("torch.cuda.max_memory_allocated", ("cuda/memory.py",), ("device",), used_by="peak memory metrics"),
    TorchApi("torch.cuda.reset_peak_memory_stats", ("cuda/memory.py",), ("device",), used_by="peak memory metrics"),
    TorchApi("torch.OutOfMemoryError", ("_C/__init__.pyi",), (), cls="OutOfMemoryError",
             used_by="self-checks re-raise out-of-memory"),
)


class TorchSource:
    """The Python files of one torch release: an installed package directory or a wheel (read in place)."""

    def __init__(self, where: str | Path):
        where = Path(where)
        self._zip = zipfile.ZipFile(where) if where.is_file() else None
        self._dir = None if self._zip else where
        self.version = self._version()

    @classmethod
    def installed(cls) -> "TorchSource":
        import importlib.util

        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("torch is not installed")
        return cls(Path(list(spec.submodule_search_locations)[0]))

    def read(self, rel: str) -> str | None:
        if self._zip is not None:
            try:
                return self._zip.read(f"torch/{rel}").decode()
            except KeyError:
                return None
        p = self._dir / rel
        return p.read_text() if p.exists() else None

    def _version(self) -> str:
        text = self.read("version.py") or ""
        for line in text.splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("'\"")
        return "unknown"


def _signatures(tree: ast.Module, name: str, cls: str) -> list[ast.arguments]:
    """Every definition of ``name`` at module level (overloads included), or of ``cls.__init__`` /
    ``cls`` itself (a class with no __init__ of its own: an empty signature)."""
    found = []
    for node in _module_level(tree.body):
        if cls and isinstance(node, ast.ClassDef) and node.name == cls:
            inits = [n.args for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
            found += inits or [ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[],
                                             kwarg=None, defaults=[])]
        elif not cls and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            found.append(node.args)
    return found


def _module_level(body):
    """Module-level statements, looking inside if/try/with blocks (``init_device_mesh`` is defined under
    ``if is_available():``) but never inside functions or classes."""
    for node in body:
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            blocks = [node.body, getattr(node, "orelse", []), getattr(node, "finalbody", [])]
            blocks += [h.body for h in getattr(node, "handlers", [])]
            for block in blocks:
                yield from _module_level(block)
        else:
            yield node


def _param_names(args: ast.arguments) -> set[str]:
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    if args.kwarg is not None:
        names.add("**")
    return names


def check(source: TorchSource | None = None) -> list[dict]:
    """One row per API: ``{api, file, ok, missing, optional_present, problem}`` for ``source`` (default: the
    installed torch)."""
    source = source or TorchSource.installed()
    rows = []
    for api in TORCH_APIS:
        leaf = api.name.rsplit(".", 1)[1]
        row = {"api": api.name, "used_by": api.used_by, "ok": False, "missing": [], "optional_present": []}
        sigs, where = [], None
        for rel in api.files:
            text = source.read(rel)
            if text is None:
                continue
            sigs = _signatures(ast.parse(text), leaf, api.cls)
            if sigs:
                where = rel
                break
        if not sigs:
            row["problem"] = f"not defined in {', '.join(api.files)}"
            rows.append(row)
            continue
        names = set().union(*(_param_names(s) for s in sigs))  # overloads: any of them may take it
        row["file"] = where
        row["missing"] = [p for p in api.params if p not in names and "**" not in names]
        row["optional_present"] = [p for p in api.optional if p in names]
        row["ok"] = not row["missing"]
        if row["missing"]:
            row["problem"] = f"no parameter {', '.join(row['missing'])} (has: {', '.join(sorted(names))})"
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check the torch APIs fastsft's GPU paths call, by signature.")
    p.add_argument("--wheel", type=Path, help="a torch wheel (or unpacked torch directory) instead of the installed torch")
    args = p.parse_args(argv)
    source = TorchSource(args.wheel) if args.wheel else TorchSource.installed()
    rows = check(source)
    print(f"torch {source.version} (supported: torch >= {TORCH_MIN}, triton >= {TRITON_MIN})")
    for r in rows:
        extra = f"; optional here: {', '.join(r['optional_present'])}" if r["optional_present"] else ""
        print(f"  {'ok ' if r['ok'] else 'BAD'} {r['api']}{extra}" + ("" if r["ok"] else f": {r['problem']}"))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
