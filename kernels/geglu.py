"""GeGLU gating on the GPU: ``y = gelu_tanh(gate) * up``, elementwise, float32 math (the Gemma 2/3 MLP,
``hidden_activation="gelu_pytorch_tanh"``; gelu_tanh is ``F.gelu(x, approximate="tanh")``).

    k = sqrt(2/pi),  c = 0.044715                       (a = gate, u = up)
    t = tanh(k (a + c a^3)),  gelu(a) = a (1 + t) / 2,  y = gelu(a) u
    da = dy u (s + a s (1 - s) 2k (1 + 3 c a^2))        d gelu(a) / da = (1 + t)/2 + a (1 - t^2)/2 k (1 + 3 c a^2)
    du = dy gelu(a)

with s = (1 + t) / 2 = sigmoid(z), z = 2 k (a + c a^3), since tanh(x) = 2 sigmoid(2x) - 1; then
(1 - t^2) / 4 = s (1 - s). The kernels use that form: gelu(a) = a s, no ``tanh`` needed (Triton has no
portable one: libdevice's is CUDA-only and the interpreter lacks it). It is also the better-conditioned
form: ``1 + t`` and ``1 - t^2`` cancel catastrophically once |t| nears 1, whereas s and s (1 - s) are
computed from e = exp(-|z|) <= 1 without a subtraction:

    s = 1 / (1 + e)  (z >= 0)  or  e / (1 + e)  (z < 0),        s (1 - s) = e / (1 + e)^2

so nothing overflows for any finite gate (exp of a non-positive number), and for |a| > ~11 e underflows
to 0 and the backward's second term is exactly 0; ``a`` in that term is clamped to +-20 so that
``a^2`` cannot overflow to inf (0 * inf would be NaN) for huge fp32/bf16 gates.

The backward recomputes ``s`` from the saved inputs: nothing but gate and up is kept for autograd
(torch's eager version also saves gelu(gate), an extra N elements per MLP layer).

Budget (N elements, s bytes each): forward reads 2 N s, writes N s; backward reads 3 N s (gate, up,
dy), writes 2 N s. Purely memory-bound (one exp and one division an element): N = 16k x 15360 bf16
(Gemma-2-9B's intermediate size) is 1.5 GB forward + 2.5 GB backward, ~1.2 ms at 3.3 TB/s; eager torch
makes ~3 extra passes each way.

References: Shazeer, "GLU Variants Improve Transformer" (2020); Hendrycks & Gimpel, "Gaussian Error
Linear Units" (2016); Liger-Kernel ``ops/geglu.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: 1024 over 4 warps is 8 a thread (16-byte fp16 loads), the usual elementwise
# tile; not yet tuned on a GPU.
BLOCK_SIZE = 1024

# z = 2 k (a + c a^3) = a (Z1 + Z3 a^2), and dz/da = Z1 + 3 Z3 a^2 (k = sqrt(2/pi), c = 0.044715)
_Z1 = tl.constexpr(1.5957691216057308)  # 2 k
_Z3 = tl.constexpr(0.07135481627260025)  # 2 k c
# beyond |a| = 11.2, e = exp(-|z|) underflows to 0 in float32 and the backward's a s (1 - s) dz/da term
# is exactly 0; clamping a there keeps a^2 finite (so the term is 0 * finite, not 0 * inf)
_A_CLAMP = tl.constexpr(20.0)


# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _geglu_forward_kernel(
    # Pointers
    y_ptr,
    gate_ptr,
    up_ptr,
    # Sizes
    n_elements,
    # Meta-parameters
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    a = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = a * (_Z1 + _Z3 * (a * a))
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    s = tl.where(z >= 0, r, e * r)  # sigmoid(z) = (1 + tanh(z / 2)) / 2
    y = a * s * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_backward_kernel(
    # Pointers
    dgate_ptr,
    dup_ptr,
    dy_ptr,
    gate_ptr,
    up_ptr,
    # Sizes
    n_elements,
    # Meta-parameters
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # recomputed, not saved
    z = a * (_Z1 + _Z3 * (a * a))
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    s = tl.where(z >= 0, r, e * r)
    ac = tl.minimum(tl.maximum(a, -_A_CLAMP), _A_CLAMP)
    dgelu = s + ac * (e * r * r) * (_Z1 + 3.0 * _Z3 * (ac * ac))  # e r^2 = s (1 - s)
    tl.store(dgate_ptr + offs, (dy * u * dgelu).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dy * (a * s)).to(dup_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# launchers


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate and up must have the same shape and dtype, got {tuple(gate.shape)} "
                         f"{gate.dtype} and {tuple(up.shape)} {up.dtype}")


def geglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` in gate's dtype (math in float32)."""
    _check(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    if n > 0:
        _geglu_forward_kernel[(triton.cdiv(n, BLOCK_SIZE),)](y, gate, up, n, BLOCK_SIZE=BLOCK_SIZE, num_warps=4)
    return y


def geglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dgate, dup)``, recomputing the tanh (as a sigmoid) from gate."""
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n > 0:
        _geglu_backward_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
            dgate, dup, dy, gate, up, n, BLOCK_SIZE=BLOCK_SIZE, num_warps=4)
    return dgate, dup


# ----------------------------------------------------------------------------------------------------
# autograd


class GeGLUFunction(torch.autograd.Function):
    """``apply(gate, up) -> gelu_tanh(gate) * up``; saves only gate and up."""

    @staticmethod
    def forward(ctx, gate, up):
        y = geglu_forward(gate, up)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = geglu_backward(dy, gate, up)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (the Gemma 2/3 MLP's gating), same shape and dtype as the inputs."""
    return GeGLUFunction.apply(gate, up)


# ----------------------------------------------------------------------------------------------------
# reference


def geglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch in float32 (float64 stays float64), cast back to gate's dtype."""
    _check(gate, up)
    dt = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (torch.nn.functional.gelu(gate.to(dt), approximate="tanh") * up.to(dt)).to(gate.dtype)
