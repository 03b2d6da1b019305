"""NF4 dequantisation on the GPU, bit-identical to ``bitsandbytes.functional.dequantize_4bit``.

bitsandbytes' NF4 format (``quantize_4bit(w, blocksize=64, quant_type="nf4")``), for a weight of n
elements flattened row-major:

    packed[i]  uint8, i < ceil(n / 2): element 2i in the HIGH nibble, element 2i+1 in the LOW nibble
               (``packed = (q[0::2] << 4) | q[1::2]``; an odd n pads the last low nibble with 0)
    absmax[b]  float32 scale of block b = elements [64 b, 64 b + 64) (the last block may be short)
    code[c]    the 16-entry NF4 table (``QuantState.code``), quantiles of N(0, 1) scaled to [-1, 1]

    w[e] = dtype( code[q[e]] * absmax[e // 64] )           product in float32, then ONE rounding

With double quantisation (``compress_statistics=True``) the absmax vector itself is stored as uint8
codes of ``absmax - offset`` (``offset = absmax.mean()``), blockwise with bnb's signed 8-bit dynamic map
(``QuantState.state2.code``, 256 entries) and its own float32 scale per 256 absmax values
(``QuantState.state2.absmax``):

    absmax[b] = (code2[qabsmax[b]] * absmax2[b // 256]) + offset     float32, multiply THEN add

The two float32 operations are rounded separately, as bnb does (its blockwise dequant writes the
product, then ``absmax += offset`` runs as a separate torch op), so the kernel is launched with
``enable_fp_fusion=False``: a fused multiply-add rounds once and would differ in the last bit.

Algorithm. One program per BLOCK_SIZE packed bytes (2 BLOCK_SIZE weights): load the bytes, split the
nibbles, gather the two codes from the 16-entry table (L1-resident), compute the (at most
2 BLOCK_SIZE / 64) block scales, multiply, cast, and store the two halves interleaved so each program
writes one contiguous run.

Budget (per weight, bf16/fp16 output, double-quantised):

    read   0.5 B packed + 1/64 B absmax code (+ 4/16384 B second-level scale, tables: cached)
    write  2 B
    total  ~2.52 B per weight; a 4096 x 4096 projection moves 42 MB, ~13 us at 3.3 TB/s (H100).

The kernel is memory bound (a handful of ALU ops per 2.5 B), so the target is >= 80 % of the
device's copy bandwidth (``torch.Tensor.copy_`` GB/s counted as read + write bytes). fp32 output
writes 4 B per weight (~4.5 B in all).

Reference: ``nf4_dequantize_ref`` below, the same arithmetic in plain torch; it is the CPU path of
``fastsft.model.nf4.NF4Linear`` and the oracle in ``tests/kernels/test_nf4.py`` (which also checks
both against bitsandbytes itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
import triton
import triton.language as tl

# bitsandbytes' NF4 table, ``bitsandbytes.functional.get_4bit_type("nf4")`` (create_normal_map with
# offset 0.9677083), as float32. Kept here so dequantisation needs no bitsandbytes; a checkpoint's own
# ``quant_map`` is used when given.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# Packed bytes per program: 1024 bytes -> 2048 outputs, 4 KiB of bf16 stores, 16 absmax blocks. With
# 4 warps (128 threads) that is 8 bytes in and 16 values out per thread: wide enough for vector
# loads/stores and several in flight, small enough that a 4096 x 4096 weight still spreads over
# 8192 programs (many waves on 132 SMs). Not yet tuned on a GPU.
BLOCK_SIZE = 1024
NUM_WARPS = 4

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The NF4 table as a float32 tensor on ``device``."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _nf4_dequantize_kernel(
    # Pointers
    packed_ptr,  # uint8 [ceil(n / 2)]
    absmax_ptr,  # float32 [n_blocks], or uint8 codes [n_blocks] when DOUBLE_QUANT
    code_ptr,  # float32 [16], the NF4 table
    absmax2_ptr,  # float32 [ceil(n_blocks / NESTED_BLOCKSIZE)] (DOUBLE_QUANT only)
    code2_ptr,  # float32 [256], bnb's dynamic map (DOUBLE_QUANT only)
    offset_ptr,  # float32 [1], the absmax mean (DOUBLE_QUANT only)
    out_ptr,  # dtype [n]
    # Matrix dimensions
    n_bytes,
    n_elements,
    # Meta-parameters
    QUANT_BLOCKSIZE: tl.constexpr,  # weights per absmax (64)
    NESTED_BLOCKSIZE: tl.constexpr,  # absmax values per second-level scale (256)
    DOUBLE_QUANT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # packed bytes per program
):
    pid = tl.program_id(0).to(tl.int64)  # 2 * byte index can pass 2^31 on embedding-sized weights
    byte = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # (BLOCK_SIZE,)
    byte_mask = byte < n_bytes
    q = tl.load(packed_ptr + byte, mask=byte_mask, other=0).to(tl.int32)

    # ---- block scale: both nibbles of a byte share one (QUANT_BLOCKSIZE is even) ----
    block = (2 * byte) // QUANT_BLOCKSIZE
    if DOUBLE_QUANT:
        qa = tl.load(absmax_ptr + block, mask=byte_mask, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=byte_mask, other=0.0)
        offset = tl.load(offset_ptr)
        absmax = tl.load(code2_ptr + qa) * scale2  # rounded here (no FMA: enable_fp_fusion=False)
        absmax = absmax + offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=byte_mask, other=0.0)

    # ---- codes: element 2i is the high nibble, 2i + 1 the low one ----
    hi = tl.load(code_ptr + (q >> 4)) * absmax
    lo = tl.load(code_ptr + (q & 0xF)) * absmax

    # ---- interleave back to element order and store one contiguous run ----
    vals = tl.reshape(tl.join(hi, lo), (2 * BLOCK_SIZE,))  # [hi0, lo0, hi1, lo1, ...]
    elem = pid * (2 * BLOCK_SIZE) + tl.arange(0, 2 * BLOCK_SIZE)
    tl.store(out_ptr + elem, vals.to(out_ptr.dtype.element_ty), mask=elem < n_elements)


# ----------------------------------------------------------------------------------------------------
# launchers


def _check_args(packed, absmax, shape, dtype, blocksize, nested_absmax, nested_code, offset):
    if packed.dtype != torch.uint8:
        raise ValueError(f"nf4_dequantize: packed must be uint8, got {packed.dtype}")
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"nf4_dequantize: only supports float32, float16 and bfloat16 output, got {dtype}")
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"nf4_dequantize: blocksize must be a positive even number, got {blocksize}")
    n = prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"nf4_dequantize: {packed.numel()} packed bytes cannot hold shape {tuple(shape)}")
    n_blocks = -(-n // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"nf4_dequantize: expected {n_blocks} absmax values for {n} weights, got {absmax.numel()}")
    if absmax.dtype == torch.uint8:
        if nested_absmax is None or nested_code is None or offset is None:
            raise ValueError("nf4_dequantize: a uint8 (double-quantised) absmax needs nested_absmax, nested_code, offset")
    elif absmax.dtype != torch.float32:
        raise ValueError(f"nf4_dequantize: absmax must be float32 or uint8 (double-quantised), got {absmax.dtype}")
    return n


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    code: torch.Tensor | None = None,
    blocksize: int = 64,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    nested_blocksize: int = 256,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantise bitsandbytes NF4 weights to a dense ``dtype`` tensor of ``shape`` with the Triton kernel.

    ``absmax`` is float32 (plain) or uint8 (double-quantised; then ``nested_absmax`` (float32),
    ``nested_code`` (256 float32, ``QuantState.state2.code``) and ``offset`` are required).
    ``code`` defaults to the NF4 table. All tensors on one device (CUDA, or CPU in the interpreter)."""
    n = _check_args(packed, absmax, shape, dtype, blocksize, nested_absmax, nested_code, offset)
    device = packed.device
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype, device=device)
    elif out.dtype != dtype or out.numel() != n or not out.is_contiguous():
        raise ValueError("nf4_dequantize: out must be a contiguous tensor of the given shape and dtype")
    if n == 0:
        return out
    code = nf4_code(device) if code is None else code.to(device=device, dtype=torch.float32).contiguous()
    double_quant = absmax.dtype == torch.uint8
    if double_quant:
        absmax2 = nested_absmax.to(device=device, dtype=torch.float32).contiguous()
        code2 = nested_code.to(device=device, dtype=torch.float32).contiguous()
        offset_t = torch.as_tensor(offset, dtype=torch.float32).to(device).reshape(1)
    else:
        absmax2 = code2 = offset_t = absmax  # unused (DOUBLE_QUANT=False)
    n_bytes = packed.numel()
    grid = (triton.cdiv(n_bytes, BLOCK_SIZE),)
    _nf4_dequantize_kernel[grid](
        packed.contiguous().reshape(-1),
        absmax.contiguous().reshape(-1),
        code,
        absmax2,
        code2,
        offset_t,
        out,
        n_bytes,
        n,
        QUANT_BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize,
        DOUBLE_QUANT=double_quant,
        BLOCK_SIZE=BLOCK_SIZE,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,  # bnb rounds code2 * absmax2 before adding the offset
    )
    return out


# ----------------------------------------------------------------------------------------------------
# reference


def nf4_dequantize_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    *,
    code: torch.Tensor | None = None,
    blocksize: int = 64,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    nested_blocksize: int = 256,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch :func:`nf4_dequantize` (same signature, same float32 arithmetic, any device)."""
    n = _check_args(packed, absmax, shape, dtype, blocksize, nested_absmax, nested_code, offset)
    device = packed.device
    code = nf4_code(device) if code is None else code.to(device=device, dtype=torch.float32)
    if absmax.dtype == torch.uint8:
        n_blocks = absmax.numel()
        scale2 = nested_absmax.to(device=device, dtype=torch.float32).repeat_interleave(nested_blocksize)[:n_blocks]
        scales = nested_code.to(device=device, dtype=torch.float32)[absmax.reshape(-1).long()] * scale2
        scales = scales + torch.as_tensor(offset, dtype=torch.float32).to(device)
    else:
        scales = absmax.reshape(-1)
    flat = packed.reshape(-1)
    q = torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[:n].long()  # high nibble first
    w = (code[q] * scales.repeat_interleave(blocksize)[:n]).to(dtype).reshape(tuple(shape))
    if out is not None:
        return out.copy_(w)
    return w
