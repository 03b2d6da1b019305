"""Gradient checkpointing per decoder layer, optionally keeping the saved layer input in CPU memory.

Under checkpointing a layer keeps only its input ``h`` [B, T, D] from forward to backward and runs
again in the backward. That input is the whole remaining activation cost: L layers x B T D x 2 bytes
(32 x 16k x 4096 x 2 = 4 GiB for an 8B model at 16k tokens a micro-batch). ``offload=True`` copies it
to pinned host memory right after the layer's forward (an asynchronous copy on the compute stream)
and back before the layer's recompute, so GPU memory holds one layer's activations at a time; the
cost is 2 B T D s bytes over PCIe per layer and step, hidden behind the layer's compute at
realistic sizes.

``offload=False`` is ``torch.utils.checkpoint`` (non-reentrant), which keeps ``h`` on the device:
torch's checkpoint holds its inputs by reference for the recompute, so they cannot be moved from
outside; hence the small autograd Function below for the offloaded case. It recomputes with the
forward's RNG state (LoRA dropout draws the same masks) and autocast state, and returns the
gradients of the layer's trainable parameters as its own input gradients (no ``requires_grad``
trick is needed on the first layer's input, whose embedding is usually frozen).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_layer"]


def checkpoint_layer(layer, h: torch.Tensor, *args, offload: bool = False) -> torch.Tensor:
    """``layer(h, *args)`` recomputed in the backward; ``args`` get no gradient (cos, sin, masks)."""
    if not offload:
        return checkpoint(layer, h, *args, use_reentrant=False)
    params = [p for p in layer.parameters() if p.requires_grad]
    return _OffloadedCheckpoint.apply(lambda x: layer(x, *args), h, *params)


def _autocast_state(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, h, *params):
        ctx.run = run
        ctx.device = h.device
        ctx.h_requires_grad = h.requires_grad
        ctx.autocast_dtype = _autocast_state(h.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(h.device) if h.is_cuda else None
        with torch.no_grad():
            out = run(h)
        saved = torch.empty(h.shape, dtype=h.dtype, pin_memory=h.is_cuda)
        saved.copy_(h.detach(), non_blocking=h.is_cuda)
        ctx.h_saved = saved
        ctx.save_for_backward(*params)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        params = ctx.saved_tensors
        h = ctx.h_saved.to(ctx.device, non_blocking=True).requires_grad_(ctx.h_requires_grad)
        ctx.h_saved = None
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        autocast = (torch.autocast(ctx.device.type, dtype=ctx.autocast_dtype) if ctx.autocast_dtype is not None
                    else contextlib.nullcontext())
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), autocast:
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            out = ctx.run(h)
        inputs = ([h] if ctx.h_requires_grad else []) + list(params)
        grads = list(torch.autograd.grad(out, inputs, grad_out, allow_unused=True)) if inputs else []
        grad_h = grads.pop(0) if ctx.h_requires_grad else None
        return (None, grad_h, *grads)
