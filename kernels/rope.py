"""Rotary position embedding (RoPE) on the GPU, in HF Llama's rotate_half convention.

For a head vector x = (x1, x2) (two halves of hd/2) and the token's cos = (c1, c2), sin = (s1, s2)
(HF builds them as cat(freqs, freqs), so c1 = c2, s1 = s2):

    y = x cos + rotate_half(x) sin,   rotate_half(x) = (-x2, x1)
    y1 = x1 c1 - x2 s1
    y2 = x2 c2 + x1 s2

The backward is the transpose, i.e. the rotation by -angle:

    dx1 = dy1 c1 + dy2 s2
    dx2 = dy2 c2 - dy1 s1

cos/sin are per token ([B, T, hd] or [T, hd], float32) as gathered from ``position_ids``, so packed
rows whose positions restart at every sequence need nothing special. They get no gradient (they are
built from integer positions). Math in float32, outputs in q's / k's dtype, written to new tensors.

Layout: one program per token (b, t) rotates all H query heads and Hkv key heads of that token: a
[BLOCK_H, hd/2] tile per half, so cos/sin are read once per token, not once per head.

Budget (N = B T tokens, s bytes per element): forward reads N (H + Hkv) hd s + 2 N hd 4 (cos, sin),
writes N (H + Hkv) hd s; the backward the same. N=16k, H=32, Hkv=8, hd=128, bf16: ~340 MB each way,
~0.1 ms at 3.3 TB/s; eager torch (rotate_half's cat, four products, two sums) moves ~4x that.

References: Su et al., "RoFormer" (2021); HF transformers ``apply_rotary_pos_emb``; Liger-Kernel
``ops/rope.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _rope_rotate_heads(
    out_ptr, x_ptr, cos1, cos2, sin1, sin2,
    stride_ob, stride_ot, stride_oh, stride_xb, stride_xt, stride_xh,
    b, t, n_heads, half,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):
    """Rotates the n_heads vectors of token (b, t): forward by +angle, BACKWARD by -angle (transpose)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < half)
    x_row = x_ptr + b * stride_xb + t * stride_xt + heads * stride_xh + dims
    o_row = out_ptr + b * stride_ob + t * stride_ot + heads * stride_oh + dims
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * cos1 + x2 * sin2
        y2 = x2 * cos2 - x1 * sin1
    else:
        y1 = x1 * cos1 - x2 * sin1
        y2 = x2 * cos2 + x1 * sin2
    tl.store(o_row, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + half, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    # Pointers
    q_out_ptr,  # (B, T, H, hd) out
    k_out_ptr,  # (B, T, Hkv, hd) out
    q_ptr,  # (B, T, H, hd), last dim contiguous
    k_ptr,  # (B, T, Hkv, hd), last dim contiguous
    cos_ptr,  # (B, T, hd) float32, batch stride may be 0
    sin_ptr,  # (B, T, hd) float32, same strides as cos
    # Strides
    stride_qob, stride_qot, stride_qoh,
    stride_kob, stride_kot, stride_koh,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_cb, stride_ct,
    # Sizes
    T,
    H,
    H_KV,
    half,
    # Meta-parameters
    BLOCK_H: tl.constexpr,
    BLOCK_H_KV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // T
    t = token % T
    # ---- this token's angles, read once for every head
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = dims < half
    c_row = cos_ptr + b * stride_cb + t * stride_ct + dims
    s_row = sin_ptr + b * stride_cb + t * stride_ct + dims
    cos1 = tl.load(c_row, mask=dmask, other=0.0).to(tl.float32)
    cos2 = tl.load(c_row + half, mask=dmask, other=0.0).to(tl.float32)
    sin1 = tl.load(s_row, mask=dmask, other=0.0).to(tl.float32)
    sin2 = tl.load(s_row + half, mask=dmask, other=0.0).to(tl.float32)
    # ---- queries, then keys
    _rope_rotate_heads(q_out_ptr, q_ptr, cos1, cos2, sin1, sin2,
                       stride_qob, stride_qot, stride_qoh, stride_qb, stride_qt, stride_qh,
                       b, t, H, half, BLOCK_H, BLOCK_HALF, BACKWARD)
    _rope_rotate_heads(k_out_ptr, k_ptr, cos1, cos2, sin1, sin2,
                       stride_kob, stride_kot, stride_koh, stride_kb, stride_kt, stride_kh,
                       b, t, H_KV, half, BLOCK_H_KV, BLOCK_HALF, BACKWARD)


# ----------------------------------------------------------------------------------------------------
# launchers


def _as_batched(q, k, cos, sin):
    """4-D q/k (a leading batch of 1 for [T, H, hd]), last dims contiguous; cos/sin expanded to (B, T, hd)."""
    if q.dim() not in (3, 4) or k.dim() != q.dim() or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must be [B, T, H, hd] or [T, H, hd] with the same B, T, hd; "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    hd = q.shape[-1]
    if hd % 2:
        raise ValueError(f"head_dim must be even, got {hd}")
    if q.dim() == 3:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
    bsz, seq = q.shape[:2]
    if cos.shape != sin.shape or cos.shape[-2:] != (seq, hd) or cos.dim() not in (2, 3):
        raise ValueError(f"cos and sin must be [B, T, hd] or [T, hd] with T={seq}, hd={hd}; "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    cos = cos.to(torch.float32).contiguous()
    sin = sin.to(torch.float32).contiguous()
    cos = cos.reshape(-1, seq, hd).expand(bsz, seq, hd)  # [T, hd] or [1, T, hd]: batch stride 0
    sin = sin.reshape(-1, seq, hd).expand(bsz, seq, hd)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    return q, k, cos, sin


def _rope_launch(q, k, cos, sin, backward):
    squeeze = q.dim() == 3
    q4, k4, cos, sin = _as_batched(q, k, cos, sin)
    bsz, seq, n_heads, hd = q4.shape
    n_kv = k4.shape[2]
    q_out = torch.empty(q4.shape, dtype=q4.dtype, device=q4.device)
    k_out = torch.empty(k4.shape, dtype=k4.dtype, device=k4.device)
    if bsz * seq > 0:
        half = hd // 2
        block_h = triton.next_power_of_2(max(n_heads, 1))
        _rope_kernel[(bsz * seq,)](
            q_out, k_out, q4, k4, cos, sin,
            *q_out.stride()[:3], *k_out.stride()[:3], *q4.stride()[:3], *k4.stride()[:3],
            cos.stride(0), cos.stride(1),
            seq, n_heads, n_kv, half,
            BLOCK_H=block_h,
            BLOCK_H_KV=triton.next_power_of_2(max(n_kv, 1)),
            BLOCK_HALF=triton.next_power_of_2(half),
            BACKWARD=backward,
            # a [H, hd/2] tile per half, q/k/cos/sin halves live at once: from 32 x 64 = 2048 values on,
            # 4 warps (16 values a thread) spilled on sm_80 in fp32 (benchmarks/aot_compile.py), so 8
            num_warps=4 if block_h * triton.next_power_of_2(half) < 2048 else 8,
        )
    if squeeze:
        q_out, k_out = q_out.squeeze(0), k_out.squeeze(0)
    return q_out, k_out


def rope_forward(q, k, cos, sin):
    """``(q_rot, k_rot)``: new tensors in q's / k's dtype and shape."""
    return _rope_launch(q, k, cos, sin, backward=False)


def rope_backward(dq_rot, dk_rot, cos, sin):
    """``(dq, dk)``: the incoming gradients rotated by -angle."""
    return _rope_launch(dq_rot, dk_rot, cos, sin, backward=True)


# ----------------------------------------------------------------------------------------------------
# autograd


class RoPEFunction(torch.autograd.Function):
    """``apply(q, k, cos, sin) -> (q_rot, k_rot)``; no gradient for cos and sin."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin = ctx.saved_tensors
        dq, dk = rope_backward(dq_rot, dk_rot, cos, sin)
        return dq, dk, None, None


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotates q [B, T, H, hd] (or [T, H, hd]) and k [..., Hkv, hd] by the per-token cos/sin
    [B, T, hd] (or [T, hd]); returns new ``(q_rot, k_rot)``."""
    return RoPEFunction.apply(q, k, cos, sin)


# ----------------------------------------------------------------------------------------------------
# reference


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Plain PyTorch: HF ``apply_rotary_pos_emb`` (heads on dim -2) in float32 (float64 stays float64),
    cast back to q's / k's dtype."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    cos, sin = cos.to(dt).unsqueeze(-2), sin.to(dt).unsqueeze(-2)  # broadcast over heads

    def rotate(x):
        xf = x.to(dt)
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    return rotate(q), rotate(k)
