"""RMSNorm on the GPU, matching Hugging Face ``LlamaRMSNorm`` including its casts, or with
``unit_offset`` Gemma's (``GemmaRMSNorm``, ``Gemma2RMSNorm``, ``Gemma3RMSNorm``), including theirs.

Llama (``unit_offset=False``):

    r    = rsqrt(mean_j x_j^2 + eps)               float32
    xhat = x r                                     float32, then rounded to x.dtype (HF's cast)
    y    = w * xhat                                in result_type(x, w) (fp32 math, one rounding)

Gemma (``unit_offset=True``; its weights start at 0, the scale is 1 + w):

    r    = rsqrt(mean_j x_j^2 + eps)               float32
    xhat = x r                                     float32, not rounded
    y    = xhat (1 + w)                            (1 + w) in float32, y rounded once to x.dtype (whatever w's)

Backward (float32; the rounding of xhat, Llama's only, passes gradients through unchanged), with the
scale s = w (Llama) or s = 1 + w (Gemma):

    dxhat = dy s
    dx    = r (dxhat - xhat mean_j(dxhat_j xhat_j))
    dw    = sum_rows dy xhat                       (xhat as the forward used it: rounded for Llama,
                                                    unrounded for Gemma; fp32 accumulation, w's dtype)

The variant is a ``tl.constexpr`` (UNIT_OFFSET) of the same two kernels: a compile-time branch, so
Llama's specialisations compile to the code they did before the flag existed.

Layout: one program per row in the forward (the row lives in registers, D masked up to a power of
two); the backward runs a fixed number of programs, as many as the SMs keep resident, each looping
over a group of rows and accumulating its share of ``dw`` in a float32 register vector, written to a
(programs, D) buffer summed by torch at the end.

Budget (N rows, hidden D, s bytes per element): forward reads N D s + D s, writes N D s + N 4
(the saved ``r``); backward reads 2 N D s (x, dy) + D s, writes N D s (dx) + P D 4 (partials, P
programs: 264 on an H100 at D=4096). Memory-bound: N=16k, D=4096, bf16 moves ~270 MB forward +
~400 MB backward, ~0.2 ms at 3.3 TB/s. torch's eager version makes ~6 passes over N D fp32
temporaries each way.

References: HF transformers ``LlamaRMSNorm`` and ``Gemma2RMSNorm``; Liger-Kernel ``ops/rms_norm.py``
(its ``offset``/``casting_mode="gemma"``); Triton tutorial 05.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest row held in registers. 64k elements is Triton's block limit; realistic D (<= 16k) fits with
# 8-16 warps without spilling. Wider rows would need a looped two-pass kernel, not written here.
MAX_FUSED_SIZE = 65536


def _num_warps(block_size: int) -> int:
    # ~8-16 values a thread: wide enough rows get more warps so that registers do not spill
    if block_size >= 32768:
        return 32
    if block_size >= 8192:
        return 16
    if block_size >= 2048:
        return 8
    return 4


# Warps the backward grid keeps resident per SM: 32 of the 64 an SM holds. Each program loads a row,
# reduces it across its warps (a barrier), stores dx, then loads the next row, so the loads in flight
# grow with the rows resident at once. The first version ran one 8-warp program per SM: 8 warps (12.5%)
# and at most one row of x and dy per SM in flight (16 KB at D=4096 in bf16, none while it reduces),
# where covering an H100's DRAM latency takes ~18 KB per SM all the time (3.35 TB/s x ~700 ns / 132).
# The price is P x D float32 dw partials: 4 MB at D=4096 (~2% of the backward's traffic at 16k
# tokens), ~9% at D=896.
RESIDENT_WARPS_PER_SM = 32
# For 32 warps to be resident a thread may use 65536 / (32 x 32) = 64 registers. The launch caps ptxas
# there: left alone it used 48 and spilled 4 bytes (fp16, D=2048, sm_80).
BACKWARD_MAX_REGISTERS = 65536 // (RESIDENT_WARPS_PER_SM * 32)


def _backward_num_warps(block_size: int) -> int:
    # The backward keeps five float32 values per column a thread holds (w, the dw accumulator, x, dy,
    # xhat): at 16 a thread (D=4096 on the forward's 8 warps) ptxas used 96-103 registers (sm_90/sm_80,
    # benchmarks/aot_compile.py), at 8 a thread it fits 64. So 8 values a thread up to D=8192 (32
    # warps, the most a program has). D=16384 holds 16 a thread and spills (~60 bytes; the forward's
    # 16 warps spilled too): it would need the row in two passes.
    return min(32, max(4, block_size // 256))


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _rms_norm_forward_kernel(
    # Pointers
    y_ptr,  # (N, D) out, result dtype
    x_ptr,  # (N, D) in
    w_ptr,  # (D,)
    rstd_ptr,  # (N,) float32 out: r, saved for the backward
    # Strides and sizes
    stride_y,
    stride_x,
    D,
    eps,
    # Meta-parameters
    BLOCK_SIZE: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,  # Gemma: y = xhat (1 + w), xhat not rounded; else Llama's casts
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    # (a store in each branch: Llama's statement as it was, so that its code is instruction for instruction
    # what it was before the flag; computing y first reorders the address arithmetic and ptxas's registers)
    if UNIT_OFFSET:
        y = (xf * rstd) * (1.0 + w)  # Gemma: output * (1.0 + weight.float()), then .type_as(x)
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        xhat = (xf * rstd).to(x.dtype).to(tl.float32)  # HF: hidden_states.to(input_dtype) before * weight
        tl.store(y_ptr + row * stride_y + cols, (w * xhat).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(
    # Pointers
    dx_ptr,  # (N, D) out, x dtype
    dw_partial_ptr,  # (P, D) float32 out: each program's sum of dy * xhat
    dy_ptr,  # (N, D)
    x_ptr,  # (N, D)
    w_ptr,  # (D,)
    rstd_ptr,  # (N,) float32
    # Strides and sizes
    stride_dx,
    stride_dy,
    stride_x,
    N,
    D,
    rows_per_program,
    # Meta-parameters
    BLOCK_SIZE: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,  # Gemma: the scale is 1 + w and xhat is not rounded
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = 1.0 + w  # the scale s (1 in the masked tail, where dy is 0)
    dw_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program  # int64: the loop variable inherits it
    row_end = tl.minimum(row_start + rows_per_program, N)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x.to(tl.float32) * rstd
        # ---- dw sees xhat as the forward used it (Llama's rounded); dx goes straight through the rounding
        if UNIT_OFFSET:
            dw_acc += dy * xhat
        else:
            dw_acc += dy * xhat.to(x.dtype).to(tl.float32)
        dxhat = dy * w
        dx = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / D))
        tl.store(dx_ptr + row * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_partial_ptr + pid * D + cols, dw_acc, mask=mask)


# ----------------------------------------------------------------------------------------------------
# launchers


def _block_size(d: int) -> int:
    block = triton.next_power_of_2(d)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"rms_norm supports hidden sizes up to {MAX_FUSED_SIZE}, got {d}")
    return block


def _sm_count(device: torch.device) -> int | None:
    """SMs of a CUDA device; None elsewhere (benchmarks/aot_compile.py answers as an H100 would)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_programs(device: torch.device, n_rows: int, num_warps: int) -> int:
    # backward: a fixed grid filling every SM's resident slots, each program looping over its rows, so
    # the dw partials are P x D, not N x D
    sms = _sm_count(device)
    if sms is None:  # the interpreter: a few programs, so that several row groups (the last ragged) run
        programs = 4
    else:
        programs = sms * max(1, RESIDENT_WARPS_PER_SM // num_warps)
    return max(1, min(programs, n_rows))


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: y shaped like x in ``result_type(x, weight)`` (Llama) or x's dtype (``unit_offset``:
    Gemma), rstd (N,) float32 over rows."""
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"weight must have shape ({d},), got {tuple(weight.shape)}")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[0]
    y_dtype = x.dtype if unit_offset else torch.result_type(x, weight)
    y = torch.empty((n, d), dtype=y_dtype, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n > 0:
        block = _block_size(d)
        _rms_norm_forward_kernel[(n,)](
            y, x2, weight.contiguous(), rstd,
            y.stride(0), x2.stride(0), d, float(eps),
            BLOCK_SIZE=block, UNIT_OFFSET=bool(unit_offset), num_warps=_num_warps(block),
        )
    return y.reshape(x.shape), rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)`` in the dtypes of x and weight, dw summed over rows in float32 (``unit_offset``: the
    Gemma variant, as in ``rms_norm_forward``)."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    dy2 = dy.reshape(-1, d)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    n = x2.shape[0]
    dx = torch.empty((n, d), dtype=x.dtype, device=x.device)
    if n == 0:
        return dx.reshape(x.shape), torch.zeros_like(weight)
    block = _block_size(d)
    num_warps = _backward_num_warps(block)
    programs = _num_programs(x.device, n, num_warps)
    rows_per_program = triton.cdiv(n, programs)
    programs = triton.cdiv(n, rows_per_program)
    dw_partial = torch.empty((programs, d), dtype=torch.float32, device=x.device)
    _rms_norm_backward_kernel[(programs,)](
        dx, dw_partial, dy2, x2, weight.contiguous(), rstd,
        dx.stride(0), dy2.stride(0), x2.stride(0), n, d, rows_per_program,
        BLOCK_SIZE=block, UNIT_OFFSET=bool(unit_offset), num_warps=num_warps, maxnreg=BACKWARD_MAX_REGISTERS,
    )
    return dx.reshape(x.shape), dw_partial.sum(0).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------
# autograd


class RMSNormFunction(torch.autograd.Function):
    """``apply(x, weight, eps, unit_offset=False) -> y``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset=False):
        unit_offset = bool(unit_offset)
        y, rstd = rms_norm_forward(x, weight, eps, unit_offset=unit_offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.unit_offset = unit_offset
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd, unit_offset=ctx.unit_offset)
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, unit_offset: bool = False) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (..., D) with ``weight`` (D,), as HF Llama computes it, or
    with ``unit_offset`` as HF Gemma/Gemma2/Gemma3 do: ``(xhat * (1 + w.float())).type_as(x)``."""
    return RMSNormFunction.apply(x, weight, eps, bool(unit_offset))


# ----------------------------------------------------------------------------------------------------
# reference


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, unit_offset: bool = False) -> torch.Tensor:
    """Plain PyTorch, line for line HF ``LlamaRMSNorm.forward``, or with ``unit_offset``
    ``Gemma2RMSNorm.forward`` (float64 stays float64: the test oracle)."""
    input_dtype = x.dtype
    h = x.to(torch.float32) if input_dtype != torch.float64 else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        w = weight.to(torch.float32) if input_dtype != torch.float64 else weight
        return (h * (1.0 + w)).type_as(x)
    return weight * h.to(input_dtype)
