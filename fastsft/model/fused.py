"""Which native pieces a model's forward runs: the seam between ``fastsft.model`` and ``fastsft.kernels``.

Every module that has a native path (RMSNorm, attention's RoPE, the MLP's SwiGLU, LoRA projections
and NF4 bases) holds a :class:`KernelChoice` and asks it, per call, ``use(piece, tensor)``. The
pieces (``fastsft.config.KERNEL_PIECES`` minus the loss, which ``fastsft.loss`` dispatches itself):

    lora      fused LoRA autograd (``kernels/lora.py``): the QKV block, the SwiGLU MLP block, single
              projections; and the Triton NF4 dequantize of 4-bit bases. Plain torch matmuls: the
              gain is memory (no dense W, no LoRA intermediates saved), which matters on a GPU.
    rms_norm  ``kernels/rms_norm.py``
    rope      ``kernels/rope.py`` (position_ids-aware: packed rows need nothing special)
    swiglu    ``kernels/swiglu.py``, for MLPs whose projections are not all LoRA-adapted
    geglu     ``kernels/geglu.py``: Gemma's tanh-GELU gating (its MLPs never take the fused LoRA block,
              whose backward is SiLU's)

Modes (config ``train.kernels``, with ``train.kernels_off`` naming pieces switched off one by one):

    auto  on CUDA tensors: the fused LoRA path, and each Triton kernel once it has passed a one-time
          self-check against its torch reference on that device and dtype (else a warning and the
          reference); on CPU: the plain torch paths.
    on    every piece on every tensor (CPU needs ``TRITON_INTERPRET=1`` for the Triton ones: tests).
    off   the plain torch paths (the ablation baseline, and the oracle).

The reference paths are the modules' own plain forwards; both paths use the same parameters, so a
checkpoint or adapter does not depend on which one trained it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from fastsft import kernel_usage
from fastsft.kernels import relative_error, self_check_error, triton_available

__all__ = ["MODEL_PIECES", "KernelChoice", "configure_kernels"]

MODEL_PIECES = ("lora", "rms_norm", "rope", "swiglu", "geglu")
_TRITON_PIECES = ("rms_norm", "rope", "swiglu", "geglu")


@dataclass(frozen=True)
class KernelChoice:
    mode: str = "auto"
    off: frozenset = field(default_factory=frozenset)

    def __post_init__(self):
        if self.mode not in ("auto", "on", "off"):
            raise ValueError(f"kernels must be 'auto', 'on' or 'off', got {self.mode!r}")
        unknown = set(self.off) - set(MODEL_PIECES) - {"loss"}
        if unknown:
            raise ValueError(f"unknown kernel pieces {sorted(unknown)}; known: {', '.join(MODEL_PIECES)}")

    def use(self, piece: str, t: torch.Tensor) -> bool:
        """Whether ``piece`` runs its native path for an input like ``t``; the choice, and why not, goes
        to ``fastsft.kernel_usage`` (a fallback on CUDA in auto mode is loud there)."""
        if self.mode == "off" or piece in self.off:
            kernel_usage.record(piece, "reference", "kernels off" if self.mode == "off"
                                else "switched off (train.kernels_off)")
            return False
        if self.mode == "auto":
            if not t.is_cuda:
                kernel_usage.record(piece, "reference", "CPU tensors: kernels auto runs native pieces on CUDA only")
                return False
            # the NF4 dequantize asks with its uint8 codes: its check needs no activation dtype
            dtype = t.dtype if t.is_floating_point() else None
            error = _self_check(piece, t.device, dtype, _autocast_dtype(t) if piece == "lora" else None)
            if error is not None:
                where = f"{t.device} ({str(t.dtype).replace('torch.', '')})"
                kernel_usage.fallback(piece, f"the native {piece} path failed its self-check: {error}", where=where)
                return False
        elif piece != "lora" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"kernels='on' runs the Triton {piece} kernel, which needs CUDA tensors "
                             "(or TRITON_INTERPRET=1 for Triton's slow CPU interpreter)")
        kernel_usage.record(piece, "native", impl=_IMPL[piece])
        return True


_IMPL = {"lora": "fused LoRA autograd (kernels/lora.py)", "rms_norm": "Triton RMSNorm", "rope": "Triton RoPE",
         "swiglu": "Triton SwiGLU", "geglu": "Triton GeGLU"}


def _autocast_dtype(t: torch.Tensor):
    """The autocast dtype in force for ``t``'s device, or None: the fused LoRA computes in it."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def configure_kernels(model: nn.Module, kernels: str = "auto", off=()) -> KernelChoice:
    """Set every module of ``model`` that has a native path to ``kernels`` with ``off`` switched off.
    Call it after ``apply_lora`` / quantization (new modules start at the class default, auto)."""
    choice = KernelChoice(kernels, frozenset(off))
    for m in model.modules():
        if hasattr(type(m), "kernel_choice"):
            m.kernel_choice = choice
    return choice


# ----------------------------------------------------------------------------------------------------
# self-checks: a kernel is trusted in auto mode only after matching its reference here


def _grads_match(fn, ref, inputs, device, dtype) -> None:
    """Raises unless ``fn`` matches ``ref`` (run in float32) in its outputs and input gradients."""
    def run(f, dt):
        xs = [x.to(device, dt).clone().requires_grad_() for x in inputs]  # own leaves: no shared .grad
        outs = f(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(1)
        torch.autograd.backward(outs, [torch.randn(o.shape, generator=g).to(device, o.dtype) for o in outs])
        return [*outs, *(x.grad for x in xs)]

    for a, b in zip(run(fn, dtype), run(ref, torch.float32)):
        err = relative_error(a, b)
        if not err < 5e-2:  # bf16 is good to ~1e-2 relative at these sizes; NaN fails too
            raise AssertionError(f"an output or gradient differs from the torch reference by {err:.3g} (relative)")


@functools.lru_cache(maxsize=None)
def _self_check(piece: str, device: torch.device, dtype: torch.dtype, autocast_dtype) -> str | None:
    """None when ``piece`` matches its reference on this device, dtype (and autocast), else the exception."""
    if piece in _TRITON_PIECES and not triton_available():
        return "triton is not installed"
    return self_check_error(piece, device, dtype, lambda: _check_piece(piece, device, dtype, autocast_dtype))


def _check_piece(piece: str, device: torch.device, dtype: torch.dtype, autocast_dtype=None) -> None:
    g = torch.Generator().manual_seed(0)
    if piece == "lora":
        _check_lora(device, dtype, autocast_dtype, g)
    elif piece == "rms_norm":
        from fastsft.kernels.rms_norm import rms_norm, rms_norm_ref

        for offset in (False, True):  # Llama's casts, Gemma's (1 + w) in float32
            _grads_match(lambda x, w: rms_norm(x, w, 1e-6, unit_offset=offset),
                         lambda x, w: rms_norm_ref(x, w, 1e-6, unit_offset=offset),
                         [torch.randn(37, 96, generator=g), 1 + 0.1 * torch.randn(96, generator=g)], device, dtype)
    elif piece == "rope":
        from fastsft.kernels.rope import apply_rope, apply_rope_ref

        pos = torch.arange(11, dtype=torch.float32)[:, None] * (1e-2 ** torch.linspace(0, 1, 16))
        emb = torch.cat((pos, pos), -1).unsqueeze(0).expand(2, 11, 32)
        cos, sin = emb.cos().to(device), emb.sin().to(device)
        _grads_match(lambda q, k: apply_rope(q, k, cos, sin), lambda q, k: apply_rope_ref(q, k, cos, sin),
                     [torch.randn(2, 11, 6, 32, generator=g), torch.randn(2, 11, 2, 32, generator=g)], device, dtype)
    elif piece == "swiglu":
        from fastsft.kernels.swiglu import swiglu, swiglu_ref

        _grads_match(swiglu, swiglu_ref, [torch.randn(37, 150, generator=g), torch.randn(37, 150, generator=g)],
                     device, dtype)
    elif piece == "geglu":
        from fastsft.kernels.geglu import geglu, geglu_ref

        _grads_match(geglu, geglu_ref, [3 * torch.randn(37, 150, generator=g), torch.randn(37, 150, generator=g)],
                     device, dtype)
    else:
        raise ValueError(f"no self-check for {piece!r}")


def _check_lora(device, dtype, autocast_dtype, g) -> None:
    """The fused LoRA QKV and MLP blocks against plain autograd in float32, with the activation dtype and
    autocast of the call that asked (frozen bases in that dtype, LoRA factors in float32 as the trainer
    keeps them); and the Triton NF4 dequantize bit for bit against its reference."""
    import contextlib

    from fastsft.kernels.lora import lora_mlp, lora_mlp_ref, lora_qkv, lora_qkv_ref

    if device.type == "cuda" and triton_available():
        from fastsft.kernels.nf4 import nf4_dequantize, nf4_dequantize_ref

        shape = (48, 200)  # 9600 weights: a short last block of 64 and a short last nested block of 256
        packed = torch.randint(0, 256, (4800,), generator=g, dtype=torch.uint8).to(device)
        absmax = torch.randint(0, 256, (150,), generator=g, dtype=torch.uint8).to(device)
        nested = dict(nested_absmax=torch.rand(1, generator=g).to(device),
                      nested_code=torch.linspace(-1, 1, 256).to(device), offset=0.25)
        for dt in (torch.bfloat16, torch.float32):
            got, want = (f(packed, absmax, shape, dt, **nested) for f in (nf4_dequantize, nf4_dequantize_ref))
            if not torch.equal(got, want):
                raise AssertionError(f"the Triton NF4 dequantize differs from its reference in {dt}")
    if dtype is None:
        return
    n, h, i, r = 37, 64, 96, 8
    x = torch.randn(n, h, generator=g)
    qkv = [(torch.randn(o, h, generator=g) / h**0.5, 0.1 * torch.randn(r, h, generator=g),
            0.1 * torch.randn(o, r, generator=g)) for o in (h, 32, 32)]
    mlp = [(torch.randn(o, k, generator=g) / k**0.5, 0.1 * torch.randn(r, k, generator=g),
            0.1 * torch.randn(o, r, generator=g)) for o, k in ((i, h), (i, h), (h, i))]
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())

    def run(x_dtype, ctx, fused):
        xx = x.to(device, x_dtype).clone().requires_grad_()  # own leaves per run
        ws = [w.to(device, x_dtype) for w, _, _ in qkv + mlp]
        lora = [t.to(device).clone().requires_grad_() for _, a, b in qkv + mlp for t in (a, b)]
        with ctx:
            if fused:
                outs = [*lora_qkv(xx, ws[:3], None, lora[0:6:2], lora[1:6:2], 2.0),
                        lora_mlp(xx, *[(ws[3 + j], lora[6 + 2 * j], lora[7 + 2 * j]) for j in range(3)], 2.0)]
            else:
                outs = [*lora_qkv_ref(xx, ws[:3], None, lora[0:6:2], lora[1:6:2], 2.0),
                        lora_mlp_ref(xx, *[(ws[3 + j], lora[6 + 2 * j], lora[7 + 2 * j]) for j in range(3)], 2.0)]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return [*outs, xx.grad, *(t.grad for t in lora)]

    for a, b in zip(run(dtype, autocast, True), run(torch.float32, contextlib.nullcontext(), False)):
        err = relative_error(a, b)
        if not err < 5e-2:  # bf16 is good to ~1e-2 relative at these sizes; NaN fails too
            raise AssertionError(f"an output or gradient of the fused LoRA blocks differs from plain autograd "
                                 f"by {err:.3g} (relative; {dtype}, autocast {autocast_dtype})")
