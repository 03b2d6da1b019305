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

from fastsft.kernels import passes_self_check, relative_error, triton_available

__all__ = ["MODEL_PIECES", "KernelChoice", "configure_kernels"]

MODEL_PIECES = ("lora", "rms_norm", "rope", "swiglu")
_TRITON_PIECES = ("rms_norm", "rope", "swiglu")


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
        """Whether ``piece`` runs its native path for an input like ``t``."""
        if self.mode == "off" or piece in self.off:
            return False
        if piece == "lora":
            return self.mode == "on" or t.is_cuda
        if self.mode == "auto":
            return t.is_cuda and triton_available() and _self_check(piece, t.device, t.dtype)
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"kernels='on' runs the Triton {piece} kernel, which needs CUDA tensors "
                             "(or TRITON_INTERPRET=1 for Triton's slow CPU interpreter)")
        return True


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
        xs = [x.to(device, dt).requires_grad_() for x in inputs]
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
def _self_check(piece: str, device: torch.device, dtype: torch.dtype) -> bool:
    return passes_self_check(f"{piece} kernel", device, dtype, lambda: _check_piece(piece, device, dtype))


def _check_piece(piece: str, device: torch.device, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    if piece == "rms_norm":
        from fastsft.kernels.rms_norm import rms_norm, rms_norm_ref

        _grads_match(lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_ref(x, w, 1e-6),
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
    else:
        raise ValueError(f"no self-check for {piece!r}")
