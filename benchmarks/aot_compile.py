"""Ahead-of-time compile check of every Triton kernel in ``fastsft.kernels`` for sm_90 and sm_80, no GPU.

    python benchmarks/aot_compile.py                     # the installed triton, sm_90 and sm_80
    python benchmarks/aot_compile.py --out aot.json      # the table as JSON too
    # the oldest triton fastsft supports (3.6.0; fastsft.compat.TRITON_MIN), installed beside the
    # current one and imported first (torch does not mind):
    python -m pip install --target ~/.cache/fastsft/triton-3.6.0 --no-deps triton==3.6.0
    python benchmarks/aot_compile.py --triton-path ~/.cache/fastsft/triton-3.6.0

1. Capture. Every public launcher runs on CPU tensors shaped like Llama-3.1-8B, Qwen2.5-7B,
   Llama-3.2-1B, Qwen2.5-0.5B and an awkward small model (no size a multiple of 16), in bf16, fp16 and
   fp32, with ``JITFunction.run`` replaced so that a launch is recorded instead of run. Triton's own
   binder turns the arguments into what a GPU launch would compile: the signature (pointer element
   types; ints equal to 1 become constants, ints that are multiples of 16 and 16-byte aligned pointers
   get divisibility hints), the constexprs and the launch options (num_warps, enable_fp_fusion). A
   launcher only looks at shapes, strides and dtypes, so tensors are small wherever the kernel cannot
   tell the difference (see each ``_capture_*``); every constexpr is the one the real shape gets.
   Launchers that size their grid by the SM count (``_sm_count``) are answered with an H100's 132.
2. Compile every distinct specialisation with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
   cc, 32))``: triton's code generator and the ptxas bundled in its wheel, which need no GPU. Registers
   and spills come from ptxas's ``-v`` log (triton prints it with TRITON_DUMP_PTXAS_LOG), shared memory
   and warps from the compiled metadata. Everything compiles into a fresh private cache, so the numbers
   are always this run's.
3. Report one line per (kernel, specialisation, target), with the warps an SM can keep resident given
   the registers and shared memory (an upper bound: the grid may launch fewer), and exit 1 on a compile
   error, a spill, or a ``@triton.jit`` function of ``fastsft.kernels`` that no launch reaches (a helper
   counts when a launched kernel calls it; it is compiled inside that kernel).

This runs without TRITON_INTERPRET (the interpreter would replace the compiler); the test
(tests/kernels/test_aot_compile.py) runs it as a subprocess with that variable removed. About 60 s on 2
CPU cores (two compiling processes; ~1000 compiles).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import dataclasses
import importlib
import io
import itertools
import json
import multiprocessing
import os
import pkgutil
import re
import shutil
import sys
import tempfile
import time
import warnings

TARGETS = (90, 80)  # compute capabilities: H100 (Hopper), A100 (Ampere)
# triton 3.9 warns (once, at the first launch or compile) that its fp-fusion default will change;
# the compiles here take the default a launch takes
_FP_FUSION_WARNING = ".*TRITON_DEFAULT_FP_FUSION"
CAPTURE_SM_COUNT = 132  # what ``_sm_count`` answers during the capture: an H100 SXM


# ----------------------------------------------------------------------------------------------------
# shapes


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes that reach the kernels (Hugging Face config names in the comments)."""

    name: str
    hidden: int  # hidden_size
    intermediate: int  # intermediate_size
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim
    vocab: int  # vocab_size


MODELS = (
    ModelShape("llama-3.1-8b", 4096, 14336, 32, 8, 128, 128256),
    ModelShape("qwen2.5-7b", 3584, 18944, 28, 4, 128, 152064),
    ModelShape("llama-3.2-1b", 2048, 8192, 32, 8, 64, 128256),
    ModelShape("qwen2.5-0.5b", 896, 4864, 14, 2, 64, 151936),
    ModelShape("awkward", 123, 333, 3, 1, 10, 1000),  # no size a power of two or a multiple of 16
)
DTYPES = ("bfloat16", "float16", "float32")

# Token counts for launchers whose grid depends on them (the RMSNorm backward's rows per program): a
# short batch with fewer rows than programs (rows_per_program == 1, which triton makes a constant), and
# 4096 and 16384 tokens.
TOKENS = (100, 4096, 16384)
# Row lengths T for RoPE (T is a kernel argument): packed rows (max_seq_len, a multiple of 16) and a
# padded batch (its longest record: any length).
SEQ_LENS = (16, 7)


# ----------------------------------------------------------------------------------------------------
# finding the kernels


def jit_functions() -> dict:
    """Every ``@triton.jit`` function defined in a module of ``fastsft.kernels``: {qualified name: fn}."""
    from triton.runtime.jit import JITFunction

    import fastsft.kernels

    found = {}
    for info in pkgutil.iter_modules(fastsft.kernels.__path__):
        module = importlib.import_module(f"fastsft.kernels.{info.name}")
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:  # not re-exports
                found[_name(value)] = value
    return found


def _name(fn) -> str:
    return f"{fn.fn.__module__}.{fn.fn.__name__}"


def _callees(fn, known: dict) -> set[str]:
    """Names (keys of ``known``) of the JIT functions ``fn`` calls, directly or through other helpers."""
    names = {id(f): name for name, f in known.items()}
    out, todo = set(), [fn]
    while todo:
        f = todo.pop()
        for node in ast.walk(ast.parse(f.src)):
            if isinstance(node, ast.Name):
                value = f.fn.__globals__.get(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):  # module.helper
                value = getattr(f.fn.__globals__.get(node.value.id), node.attr, None)
            else:
                continue
            name = names.get(id(value))
            if name is not None and value is not fn and name not in out:
                out.add(name)
                todo.append(value)
    return out


# ----------------------------------------------------------------------------------------------------
# capture


@dataclasses.dataclass
class Specialisation:
    """One distinct compile of one kernel, and the captured launches that need it."""

    kernel: str  # qualified name
    signature: dict  # arg name -> triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # arg path (tuple) -> value: constexpr parameters and ints triton made constant
    attrs: dict  # arg path -> [["tt.divisibility", 16]] etc.
    options: dict  # launch options: num_warps, num_stages, enable_fp_fusion, ...
    launches: list  # labels of the launcher calls that produced it

    def key(self) -> str:
        return repr((self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))

    def describe(self, fn) -> str:
        """Pointer dtypes, constants and the integer arguments without a divisibility hint, e.g.
        ``*bf16,*fp32 BLOCK_SIZE=4096 rows_per_program=1 not16:N``."""
        names = fn.arg_names
        pointers = ",".join(t for t in self.signature.values() if t.startswith("*"))
        consts = " ".join(f"{names[p[0]]}={v}" for p, v in sorted(self.constexprs.items()))
        odd = [n for i, (n, t) in enumerate(self.signature.items())
               if t[:1] in ("i", "*") and ["tt.divisibility", 16] not in self.attrs.get((i,), [])]
        return f"{pointers} {consts}" + (f" not16:{','.join(odd)}" if odd else "")


class Capture:
    """Records launches instead of running them (``with capture.active(): launcher(...)``)."""

    def __init__(self, kernels: dict):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.kernels = kernels
        # the specialisation rules (alignment, ints == 1) are the CUDA backend's, the same for every cc
        self.backend = make_backend(GPUTarget("cuda", TARGETS[0], 32))
        self.specialisations: dict[str, Specialisation] = {}
        self.label = ""
        self._binders = {}

    def record(self, fn, args, kwargs):
        from triton.runtime.jit import create_function_from_signature

        if _name(fn) not in self.kernels:
            raise RuntimeError(f"launch of {_name(fn)}, which is not a @triton.jit function of fastsft.kernels")
        binder = self._binders.get(fn)
        if binder is None:
            binder = self._binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        # what JITFunction.run does before it compiles: bind, specialise, split into ASTSource's parts
        # (their spelling changed across triton releases; _pack_args gives the installed one's)
        bound, specialisation, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialisation, options)
        launch_options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
        spec = Specialisation(_name(fn), signature, constexprs, attrs, launch_options, [])
        spec = self.specialisations.setdefault(spec.key(), spec)
        if self.label not in spec.launches:
            spec.launches.append(self.label)

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.jit import JITFunction

        capture = self

        def run(fn, *args, grid, warmup, **kwargs):  # JITFunction.run's signature; launches nothing
            capture.record(fn, args, kwargs)

        def sm_count(device):
            return CAPTURE_SM_COUNT

        modules = {sys.modules[fn.fn.__module__] for fn in self.kernels.values()}
        patches = [(JITFunction, "run", run)]
        patches += [(m, "_sm_count", sm_count) for m in modules if hasattr(m, "_sm_count")]
        originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
        for owner, attr, replacement in patches:
            setattr(owner, attr, replacement)
        try:
            yield self
        finally:
            for owner, attr, original in originals:
                setattr(owner, attr, original)

    def call(self, label, launcher, *args, **kwargs):
        self.label = label
        launcher(*args, **kwargs)


# Gemma 2/3's norm sizes where their block differs from every size of MODELS: head_dim 256 (its q/k norms)
# and gemma-3-27b's hidden 5376 (a block of 8192, as gemma-2-27b's 4608). Captured with Gemma's (1 + w)
# variant only (unit_offset=True), the one their norms use.
GEMMA_NORM_SIZES = (256, 5376)


def _capture_rms_norm(cap: Capture, m: ModelShape, dtype):
    # the decoder's norms over hidden and Qwen3's/Gemma 3's q/k norms over head_dim, each in Llama's
    # variant and Gemma's (1 + w) one (unit_offset, a constexpr of the same kernels), then Gemma's own sizes
    for d in (m.hidden, m.head_dim):
        for unit_offset in (False, True):
            _capture_rms_norm_at(cap, f"{m.name} ", d, dtype, unit_offset)
    for d in GEMMA_NORM_SIZES:
        _capture_rms_norm_at(cap, "gemma ", d, dtype, True)


def _capture_rms_norm_at(cap: Capture, name: str, d: int, dtype, unit_offset: bool):
    import torch

    from fastsft.kernels import rms_norm

    # the weight in the activation dtype or kept in float32 (y is then float32 for Llama's variant; Gemma's
    # stays in x's dtype)
    variant = " unit_offset" if unit_offset else ""
    for w_dtype in dict.fromkeys((dtype, torch.float32)):
        w = torch.empty(d, dtype=w_dtype)
        label = f"{name}{_short(dtype)} D={d} w={_short(w_dtype)}{variant}"
        cap.call(f"rms_norm_forward {label}", rms_norm.rms_norm_forward,
                 torch.empty(4, d, dtype=dtype), w, 1e-6, unit_offset=unit_offset)
        for n in TOKENS:
            x = torch.empty(n, d, dtype=dtype)  # never touched: torch.empty only reserves
            cap.call(f"rms_norm_backward {label} N={n}", rms_norm.rms_norm_backward,
                     x, x, w, torch.empty(n, dtype=torch.float32), unit_offset=unit_offset)


def _capture_rope(cap: Capture, m: ModelShape, dtype):
    import torch

    from fastsft.kernels import rope

    for t in SEQ_LENS:
        q = torch.empty(2, t, m.heads, m.head_dim, dtype=dtype)
        k = torch.empty(2, t, m.kv_heads, m.head_dim, dtype=dtype)
        cos = torch.empty(2, t, m.head_dim)  # per token, as the model gathers them from position_ids
        label = f"{m.name} {_short(dtype)} T={t}"
        cap.call(f"rope_forward {label}", rope.rope_forward, q, k, cos, cos)
        cap.call(f"rope_backward {label}", rope.rope_backward, q, k, cos, cos)


def _capture_swiglu(cap: Capture, m: ModelShape, dtype):
    import torch

    from fastsft.kernels import swiglu

    gate = torch.empty(4, m.intermediate, dtype=dtype)  # only the element count reaches the kernel
    cap.call(f"swiglu_forward {m.name} {_short(dtype)}", swiglu.swiglu_forward, gate, gate)
    cap.call(f"swiglu_backward {m.name} {_short(dtype)}", swiglu.swiglu_backward, gate, gate, gate)


def _capture_geglu(cap: Capture, m: ModelShape, dtype):
    import torch

    from fastsft.kernels import geglu

    gate = torch.empty(4, m.intermediate, dtype=dtype)  # only the element count reaches the kernel
    cap.call(f"geglu_forward {m.name} {_short(dtype)}", geglu.geglu_forward, gate, gate)
    cap.call(f"geglu_backward {m.name} {_short(dtype)}", geglu.geglu_backward, gate, gate, gate)


def _capture_nf4(cap: Capture, m: ModelShape, dtype):
    import torch

    from fastsft.kernels import nf4

    for shape in ((m.intermediate, m.hidden), (m.kv_heads * m.head_dim, m.hidden)):  # gate/up, k/v
        n = shape[0] * shape[1]
        blocks = -(-n // 64)
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
        label = f"{m.name} {_short(dtype)} {shape[0]}x{shape[1]}"
        cap.call(f"nf4_dequantize {label}", nf4.nf4_dequantize,
                 packed, torch.empty(blocks), shape, dtype)
        cap.call(f"nf4_dequantize double-quant {label}", nf4.nf4_dequantize,
                 packed, torch.empty(blocks, dtype=torch.uint8), shape, dtype,
                 nested_absmax=torch.empty(-(-blocks // 256)), nested_code=torch.empty(256), offset=0.0)


def _capture_fused_linear_cross_entropy(cap: Capture, m: ModelShape, dtype):
    import torch

    from fastsft.kernels import fused_linear_cross_entropy as flce

    # The row kernel sees the logits chunk (rows, V) and per-row vectors, never the hidden size, so the
    # matmuls run at a hidden size of 16. It runs once per chunk of C rows (C from the vocabulary and the
    # dtype); chunk k's vectors start k C elements into lse/targets/scale, so their 16-byte alignment
    # depends on k C mod 4. A chunk of C' = 4 + C mod 4 rows, over 4 C' + 1 rows, meets every alignment
    # the real loop meets, and a last chunk of one row (a per-row scale of one element is broadcast).
    chunk = 4 + flce._chunk_rows(m.vocab, dtype) % 4
    n, d = 4 * chunk + 1, 16
    h = torch.zeros(n, d, dtype=dtype)
    weight = torch.zeros(m.vocab, d, dtype=dtype)
    targets = torch.zeros(n, dtype=torch.long)
    everything = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    for opts_name, opts in (("", {}), (" smoothing+z_loss+softcap", everything)):
        label = f"{m.name} {_short(dtype)}{opts_name}"
        # training with a frozen head (gradients in the forward), evaluation (no gradient pass), and
        # reduction="none" (gradients recomputed in the backward with per-row scales)
        cap.call(f"fused_linear_cross_entropy_forward train {label}", flce.fused_linear_cross_entropy_forward,
                 h, weight, None, targets, need=(True, False, False), chunk_rows=chunk, **opts)
        cap.call(f"fused_linear_cross_entropy_forward eval {label}", flce.fused_linear_cross_entropy_forward,
                 h, weight, None, targets, need=(False, False, False), chunk_rows=chunk, **opts)
        cap.call(f"fused_linear_cross_entropy_backward {label}", flce.fused_linear_cross_entropy_backward,
                 torch.ones(n), h, weight, None, targets, torch.zeros(n), need=(True, False, False),
                 chunk_rows=chunk, **opts)
    # the KL anchor to a base model (HAS_BASE: a second chunk of logits, half the rows a chunk, half the
    # V tile): the same three launches
    kl_chunk = 4 + flce._kl_chunk_rows(m.vocab, dtype) % 4
    n = 4 * kl_chunk + 1
    h, targets = torch.zeros(n, d, dtype=dtype), torch.zeros(n, dtype=torch.long)
    for opts_name, opts in (("", {}), (" smoothing+z_loss+softcap", everything)):
        label = f"{m.name} {_short(dtype)} kl{opts_name}"
        cap.call(f"fused_linear_cross_entropy_kl_forward train {label}", flce.fused_linear_cross_entropy_kl_forward,
                 h, h, weight, None, targets, kl_beta=0.1, need=(True, False, False), chunk_rows=kl_chunk, **opts)
        cap.call(f"fused_linear_cross_entropy_kl_forward eval {label}", flce.fused_linear_cross_entropy_kl_forward,
                 h, h, weight, None, targets, kl_beta=0.1, need=(False, False, False), chunk_rows=kl_chunk, **opts)
        cap.call(f"fused_linear_cross_entropy_kl_backward {label}", flce.fused_linear_cross_entropy_kl_backward,
                 torch.ones(n), h, h, weight, None, targets, torch.zeros(n), torch.zeros(n), kl_beta=0.1,
                 need=(True, False, False), chunk_rows=kl_chunk, **opts)


CAPTURES = (_capture_rms_norm, _capture_rope, _capture_swiglu, _capture_geglu, _capture_nf4,
            _capture_fused_linear_cross_entropy)


def _short(dtype) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[str(dtype).removeprefix("torch.")]


def capture(kernels: dict, models=MODELS, dtypes=DTYPES) -> list[Specialisation]:
    """The distinct specialisations the launchers ask for, over every model shape and dtype."""
    import torch

    cap = Capture(kernels)
    with cap.active(), torch.no_grad():
        for m in models:
            for dtype in dtypes:
                for capture_one in CAPTURES:
                    capture_one(cap, m, getattr(torch, dtype))
    return list(cap.specialisations.values())


# ----------------------------------------------------------------------------------------------------
# compile


# Per-SM limits (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"): the
# register file, the shared memory blocks can use, resident warps and blocks. Registers are allocated
# per warp in units of 256 (8 a thread); each block also reserves 1 KiB of shared memory.
_SM_LIMITS = {
    80: dict(registers=65536, shared=164 * 1024, warps=64, blocks=32),
    90: dict(registers=65536, shared=228 * 1024, warps=64, blocks=32),
}


def resident_warps(capability: int, registers: int, shared: int, num_warps: int) -> int:
    """Warps an SM keeps resident for this kernel (the grid permitting): the occupancy numerator."""
    limits = _SM_LIMITS[capability]
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = limits["registers"] // per_warp // num_warps
    by_shared = limits["shared"] // (shared + 1024)
    blocks = min(by_registers, by_shared, limits["warps"] // num_warps, limits["blocks"])
    return blocks * num_warps


def _parse_ptxas_log(log: str, kernel: str) -> dict:
    registers = re.search(rf"Compiling entry function '{re.escape(kernel)}'.*?Used (\d+) registers", log, re.S)
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or not frames:
        raise RuntimeError(f"no ptxas -v log for {kernel} (does this triton honour TRITON_DUMP_PTXAS_LOG?)")
    return dict(registers=int(registers.group(1)), stack_frame=max(int(f[0]) for f in frames),
                spill_stores=sum(int(f[1]) for f in frames), spill_loads=sum(int(f[2]) for f in frames))


def compile_specialisation(fn, spec: Specialisation, capability: int) -> dict:
    """Compile for ``sm_<capability>``; a dict with registers, spills, shared memory and warps, or error."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(kernel=spec.kernel, target=f"sm_{capability}", specialisation=spec.describe(fn),
               triton=triton.__version__)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # printed, to the StringIO
            knobs.compilation.always_compile = True  # ptxas must run to print it
            compiled = triton.compile(ASTSource(fn, spec.signature, spec.constexprs, spec.attrs),
                                      target=GPUTarget("cuda", capability, 32), options=dict(spec.options))
        row.update(_parse_ptxas_log(log.getvalue(), compiled.metadata.name))
    except Exception as e:  # noqa: BLE001 - any failure is the finding, reported per kernel
        row["error"] = f"{type(e).__name__}: {str(e).strip()}"
        return row
    meta = compiled.metadata
    row.update(num_warps=meta.num_warps, num_stages=meta.num_stages, shared_memory=meta.shared,
               resident_warps=resident_warps(capability, row["registers"], meta.shared, meta.num_warps),
               compile_s=round(time.perf_counter() - t0, 3))
    return row


def compile_all(kernels: dict, specs: list[Specialisation], targets=TARGETS, jobs: int = 1) -> list[dict]:
    """``compile_specialisation`` for every (specialisation, target), in ``jobs`` processes."""
    tasks = [(spec, capability) for spec in specs for capability in targets]
    if jobs <= 1:
        return [compile_specialisation(kernels[spec.kernel], spec, capability) for spec, capability in tasks]
    # spawn, not fork: the parent has run torch (its thread pools do not survive a fork)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                                                initargs=(list(sys.path),)) as pool:
        return list(pool.map(_compile_in_worker, tasks, chunksize=8))


_worker_kernels: dict = {}


def _start_worker(path: list):
    sys.path[:] = path  # the parent's, so --triton-path's triton comes first here too
    warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)


def _compile_in_worker(task) -> dict:
    spec, capability = task
    if not _worker_kernels:
        _worker_kernels.update(jit_functions())
    return compile_specialisation(_worker_kernels[spec.kernel], spec, capability)


# ----------------------------------------------------------------------------------------------------
# report


def check(targets=TARGETS, jobs: int = 1) -> dict:
    """Capture, compile for every target, and collect the problems: the whole run as a JSON-able dict."""
    import triton

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FP_FUSION_WARNING)
        kernels = jit_functions()
        specs = capture(kernels)
        compiled = compile_all(kernels, specs, targets, jobs)
    rows, problems = [], []
    for spec, row in zip([s for s in specs for _ in targets], compiled):  # compile_all's order
        fn = kernels[spec.kernel]
        row.update(signature=spec.signature, options=spec.options, launches=spec.launches,
                   constexprs={_path(fn, p): v for p, v in spec.constexprs.items()},
                   attrs={_path(fn, p): v for p, v in spec.attrs.items()})
        rows.append(row)
        where = f"{_short_name(spec.kernel)} {row['target']} [{row['specialisation']}] (from {spec.launches[0]})"
        if "error" in row:
            problems.append(f"{where}: compile error: {_one_line(row['error'])}")
        elif row["spill_stores"] or row["spill_loads"]:
            problems.append(f"{where}: spills ({row['spill_stores']} bytes stored, "
                            f"{row['spill_loads']} loaded, {row['registers']} registers)")

    if {r["triton"] for r in rows} != {triton.__version__}:  # a worker that imported another triton
        problems.append(f"compiled with triton {sorted({r['triton'] for r in rows})}, not {triton.__version__}")
    launched = {s.kernel for s in specs}
    coverage = {}
    for name in kernels:
        callers = sorted(k for k in launched if name in _callees(kernels[k], kernels))
        coverage[name] = dict(launched=name in launched, called_from=callers,
                              specialisations=sum(s.kernel == name for s in specs))
        if name not in launched and not callers:
            problems.append(f"{_short_name(name)}: no captured launch reaches it (add its launcher to "
                            "benchmarks/aot_compile.py's CAPTURES)")
    return dict(triton_version=triton.__version__, triton_path=os.path.dirname(triton.__file__),
                targets=[f"sm_{c}" for c in targets], seconds=round(time.perf_counter() - t0, 1),
                jit_functions=coverage, rows=rows, problems=problems)


def _path(fn, path: tuple) -> str:
    return ".".join([fn.arg_names[path[0]], *map(str, path[1:])])


def _short_name(name: str) -> str:
    return name.removeprefix("fastsft.kernels.")


def format_table(report: dict) -> str:
    """The report as text: one line per compile, a summary per kernel and target, then the verdict."""
    rows = sorted(report["rows"], key=lambda r: (r["kernel"], r["target"], r["specialisation"]))
    lines = [f"triton {report['triton_version']} ({report['triton_path']}): {len(rows)} compiles in "
             f"{report['seconds']} s",
             f"{'kernel':<54} {'target':<6} {'regs':>4} {'spill':>5} {'smem':>6} {'warps':>5} {'occ':>4}  "
             "specialisation"]
    for r in rows:
        head = f"{_short_name(r['kernel']):<54} {r['target']:<6}"
        if "error" in r:
            lines.append(f"{head} ERROR {_one_line(r['error'])}  [{r['specialisation']}]")
        else:
            lines.append(f"{head} {r['registers']:>4} {r['spill_stores'] + r['spill_loads']:>5} "
                         f"{r['shared_memory']:>6} {r['num_warps']:>5} {_occupancy(r):>4}  {r['specialisation']}")
    lines += ["occ: warps an SM keeps resident / 64, as registers and shared memory allow (the grid may "
              "launch fewer)", "", "summary (min-max over specialisations):"]
    for (kernel, target), group in itertools.groupby(rows, key=lambda r: (r["kernel"], r["target"])):
        group = [r for r in group if "error" not in r]

        def span(key):
            return f"{min(r[key] for r in group)}-{max(r[key] for r in group)}"

        if group:
            lines.append(f"  {_short_name(kernel):<54} {target:<6} {len(group):>3} specialisations, "
                         f"registers {span('registers')}, spilled bytes {span('spill_stores')}, "
                         f"smem {span('shared_memory')}, warps {span('num_warps')}, "
                         f"occupancy >= {_occupancy(min(group, key=lambda r: r['resident_warps']))}")
    for name, c in report["jit_functions"].items():
        if not c["launched"] and c["called_from"]:
            lines.append(f"  {_short_name(name)}: a helper, compiled inside "
                         f"{', '.join(map(_short_name, c['called_from']))}")
    lines += [f"PROBLEM {p}" for p in report["problems"]] or ["OK: every kernel compiled, no errors, no spills"]
    return "\n".join(lines)


def _one_line(error: str) -> str:
    """First and last line of an error: triton's CompilationError puts the source between them."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _occupancy(row: dict) -> str:
    return f"{100 * row['resident_warps'] // 64}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the report as JSON here")
    parser.add_argument("--triton-path", default=os.environ.get("FASTSFT_TRITON_PATH"),
                        help="a directory holding another triton (pip install --target DIR), put first on "
                             "sys.path before triton is imported (env: FASTSFT_TRITON_PATH)")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)),
                        help="compute capabilities to compile for (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="compiling processes (default: %(default)s)")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the interpreter replaces the compiler; unset it")
    if args.triton_path:
        if "triton" in sys.modules:
            parser.error("--triton-path: triton is already imported")
        if not os.path.isdir(os.path.join(args.triton_path, "triton")):
            parser.error(f"--triton-path: no triton package in {args.triton_path}")
        sys.path.insert(0, os.path.abspath(args.triton_path))
    cache = tempfile.mkdtemp(prefix="fastsft-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache  # before triton reads it: a cold cache, this run's compiles only
    try:
        report = check(tuple(int(c) for c in args.targets.split(",")), args.jobs)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(format_table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
