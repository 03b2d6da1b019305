"""Response-masked linear cross-entropy: the loss owns the LM-head matmul.

    loss_i = lse(z_i) - z_i[y_i]        z_i = softcap(h_i W^T + b)       (rows with y_i != ignore_index)

plus optional label smoothing and z-loss. The model returns hidden states and this module computes
the logits chunk by chunk, so the full ``[tokens x vocab]`` logits never exist in memory.

KL anchor to a base model (``base_hidden``, ``kl_beta``): the base's hidden states through the same head
give z_base, and each row adds beta times the forward KL from the base to the tuned model,

    kl_i   = sum_j p_base,ij (log p_base,ij - log p_ij) = sum_j p_base,ij (z_base,ij - z_ij) - lse_base,i + lse_i
    d kl_i / d z_ij = p_ij - p_base,ij        (z_base is a constant: no gradient reaches the base)

so the gradient w.r.t. the tuned logits of CE + beta KL is (1 + beta) p - onehot(y) - beta p_base, written
chunk by chunk like the CE's: no ``[tokens x vocab]`` tensor of either model. ``kl_mask`` extends the KL
to rows without a label (prompt tokens; their CE term is 0); beta = 0 is the plain CE path, bit for bit.
Both paths have it: the reference below (chunks of half the rows, one of each model), and the Triton
kernel's HAS_BASE variant (one pass over both chunks for lse, lse_base and the KL, one writing the
gradient; chunks of half the rows, so the two logit chunks fit the plain path's CHUNK_BYTES); the
dispatch is the plain loss's.

This file holds the plain PyTorch implementation: the CPU path, the oracle for the Triton kernel in
``fastsft.kernels`` and the ablation in benchmarks. Algorithm (blockwise recompute, as in Cut
Cross-Entropy): the forward keeps only one float32 log-sum-exp per kept row; the backward recomputes
each chunk's logits and turns them straight into gradients. Extra memory is one chunk of logits,
bounded by ``CHUNK_BYTES``, whatever the vocabulary.

Rows whose label is ``ignore_index`` are compacted away before any matmul, so prompt tokens cost
nothing; a frozen head (LoRA) skips all weight-gradient work.

Dispatch: after shifting and compaction, :func:`fused_linear_cross_entropy` runs either this reference
or the Triton kernel (``fastsft.kernels.fused_linear_cross_entropy``: gradients computed in the forward,
6NVD matmul FLOPs instead of 8NVD). ``kernels="auto"`` (the default) picks the kernel for CUDA tensors
when Triton is importable, ``"on"``/``"off"`` force one; :func:`use_implementation` overrides both for
tests and benchmarks. The kernel runs on CPU tensors only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn as nn

from fastsft import kernel_usage
from fastsft.kernels import relative_error, self_check_error, triton_available

# Set by use_implementation(): "kernel" or "reference" forces that path for every call; None follows
# each call's ``kernels`` argument.
_impl_override: str | None = None
_IMPLEMENTATIONS = ("kernel", "reference")


@contextlib.contextmanager
def use_implementation(name: str | None):
    """Force ``"kernel"`` or ``"reference"`` (or ``None``: per-call choice) inside a ``with`` block."""
    global _impl_override
    if name is not None and name not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS} or None, got {name!r}")
    previous, _impl_override = _impl_override, name
    try:
        yield
    finally:
        _impl_override = previous


def _use_kernel(hidden: torch.Tensor, kernels: str) -> bool:
    """Whether this call runs the Triton kernel; the choice (and why not) goes to ``fastsft.kernel_usage``."""
    if _impl_override is not None:
        use, reason = _impl_override == "kernel", "forced by use_implementation('reference')"
    elif kernels == "auto":
        if not hidden.is_cuda:
            kernel_usage.record("loss", "reference", "CPU tensors: kernels auto runs native pieces on CUDA only")
            return False
        where = f"{hidden.device} ({str(hidden.dtype).replace('torch.', '')})"
        if not triton_available():
            kernel_usage.fallback("loss", "triton is not installed", where=where)
            return False
        error = _kernel_self_check(hidden.device, hidden.dtype)
        if error is not None:
            kernel_usage.fallback("loss", f"the Triton kernel failed its self-check: {error}", where=where)
            return False
        kernel_usage.record("loss", "native", impl=_KERNEL_NAME)
        return True
    else:
        use, reason = kernels == "on", "kernels off"
    if use and not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels='on' runs the Triton kernel, which needs CUDA tensors "
                         "(or TRITON_INTERPRET=1 for Triton's slow CPU interpreter)")
    if use and not triton_available():
        raise ValueError("kernels='on' needs triton installed")
    if use:
        kernel_usage.record("loss", "native", impl=_KERNEL_NAME)
    else:
        kernel_usage.record("loss", "reference", reason)
    return use


_KERNEL_NAME = "Triton fused linear cross-entropy"


@functools.lru_cache(maxsize=None)
def _kernel_self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the Triton kernel matches the reference on a small problem on this device and dtype,
    else the exception that says how it failed.

    ``kernels="auto"`` trusts the kernel only after this check (once per process and device/dtype), so
    a Triton version or device it was never run on degrades to the reference path, loudly, instead of a
    crash or a wrong loss. ``kernels="on"`` skips the check.
    """
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 64, 300  # awkward sizes: a ragged V tile, some ignored rows
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) / d**0.5
    y = torch.randint(0, v, (n,), generator=g)
    y[::5] = -100

    h_base = h + 0.5 * torch.randn(n, d, generator=g)  # the KL anchor's variant (HAS_BASE) is checked too

    def run(impl, dt, base):
        hh = h.to(device, dt).clone().requires_grad_()  # own leaves per run: no shared .grad
        ww = w.to(device, dt).clone().requires_grad_()
        kl = {} if base is None else {"base_hidden": base.to(device, dt), "kl_beta": 0.5}
        with use_implementation(impl):
            loss = fused_linear_cross_entropy(hh, ww, y.to(device), **kl)
        loss.backward()
        return [t.detach().float().cpu() for t in (loss, hh.grad, ww.grad)]

    def check():
        for base in (None, h_base):
            got, want = run("kernel", dtype, base), run("reference", torch.float32, base)
            for name, a, b in zip(("loss", "grad_hidden", "grad_weight"), got, want):
                err = relative_error(a, b)
                if not err < 5e-2:  # bf16 inputs are good to ~1e-2 relative here; NaN fails too
                    what = "" if base is None else " with the KL anchor"
                    raise AssertionError(f"{name}{what} differs from the reference by {err:.3g} (relative)")

    return self_check_error("loss", device, dtype, check)


# One chunk of float32 logits (rows x V) plus its softmax stays under this many bytes: 256 MiB keeps
# the reference usable at V=152k (~440 rows a chunk) without the chunk loop dominating small V.
CHUNK_BYTES = 256 * 1024 * 1024


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (2 * 4 * vocab))


def _chunk_logits(h, weight, bias, softcap):
    """float32 logits of one chunk, and tanh(x/t) when soft-capped (needed by the backward)."""
    z = (h @ weight.t()).float()
    if bias is not None:
        z = z + bias.float()
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, t


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of the kept rows; see the module docstring for the math."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, label_smoothing, z_loss, softcap, h_base=None, beta=0.0):
        """targets: the label per row, or -1 for a row that only carries the KL term (h_base given)."""
        n, vocab = h.shape[0], weight.shape[0]
        losses = h.new_empty(n, dtype=torch.float32)
        lse_all = h.new_empty(n, dtype=torch.float32)
        kl_all = h.new_zeros(n, dtype=torch.float32)
        lse_base_all = h.new_zeros(n if h_base is not None else 0, dtype=torch.float32)
        step = _rows_per_chunk(vocab) // (2 if h_base is not None else 1)
        for s in range(0, n, step):
            z, _ = _chunk_logits(h[s : s + step], weight, bias, softcap)  # (c, V) float32
            lse = torch.logsumexp(z, dim=-1)
            tgt = targets[s : s + step]
            nll = lse - z.gather(1, tgt.clamp_min(0)[:, None]).squeeze(1)
            if label_smoothing > 0.0:
                # torch's definition: (1 - eps) * nll + eps * mean_j(lse - z_j)
                nll = (1.0 - label_smoothing) * nll + label_smoothing * (lse - z.mean(dim=-1))
            if z_loss > 0.0:
                nll = nll + z_loss * lse * lse
            if h_base is not None:
                nll = torch.where(tgt >= 0, nll, 0.0)
                zb, _ = _chunk_logits(h_base[s : s + step], weight, bias, softcap)
                lse_b = torch.logsumexp(zb, dim=-1)
                kl = (torch.exp(zb - lse_b[:, None]) * (zb - z)).sum(-1) - lse_b + lse
                kl_all[s : s + step] = kl
                lse_base_all[s : s + step] = lse_b
                nll = nll + beta * kl
            losses[s : s + step] = nll
            lse_all[s : s + step] = lse
        ctx.mark_non_differentiable(lse_all, kl_all)
        ctx.save_for_backward(h, weight, bias, targets, lse_all, h_base, lse_base_all)
        ctx.opts = (label_smoothing, z_loss, softcap, beta)
        return losses, lse_all, kl_all

    @staticmethod
    def backward(ctx, grad_losses, _grad_lse, _grad_kl):
        h, weight, bias, targets, lse_all, h_base, lse_base_all = ctx.saved_tensors
        label_smoothing, z_loss, softcap, beta = ctx.opts
        n, vocab = h.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h) if need_h else None
        # float32 accumulation of the head gradients across chunks
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=h.device) if need_b else None
        step = _rows_per_chunk(vocab) // (2 if h_base is not None else 1)
        for s in range(0, n, step):
            hc = h[s : s + step]
            z, tanh = _chunk_logits(hc, weight, bias, softcap)
            lse = lse_all[s : s + step, None]
            p = torch.exp(z - lse)  # softmax, (c, V)
            tgt = targets[s : s + step]
            if h_base is not None:  # d beta KL / d z = beta (p - p_base), before p is reused in place below
                zb, _ = _chunk_logits(h_base[s : s + step], weight, bias, softcap)
                dkl = beta * (p - torch.exp(zb - lse_base_all[s : s + step, None]))
                del zb
            # d loss / d z = (1 + 2 s lse) p - (1 - eps) onehot(y) - eps / V
            dz = p * (1.0 + 2.0 * z_loss * lse) if z_loss > 0.0 else p
            if label_smoothing > 0.0:
                dz = dz - label_smoothing / vocab
            rows = torch.arange(hc.shape[0], device=h.device)
            dz[rows, tgt.clamp_min(0)] -= 1.0 - label_smoothing
            if h_base is not None:  # rows without a label (-1) carry the KL term only
                dz = torch.where((tgt >= 0)[:, None], dz, 0.0) + dkl
            dz = dz * grad_losses[s : s + step, None].float()
            if softcap is not None:
                dz = dz * (1.0 - tanh * tanh)
            if need_h:
                grad_h[s : s + step] = (dz.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                grad_w += dz.t() @ hc.float()
            if need_b:
                grad_b += dz.sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | float | torch.Tensor | None = None,
    shift: bool = False,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_z_loss: bool = False,
    kernels: str = "auto",
    base_hidden: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    kl_mask: torch.Tensor | None = None,
    return_kl: bool = False,
):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels`` without materialising logits.

    hidden: ``[..., D]``; labels: ``[...]`` (the same leading shape); weight: ``[V, D]``; bias: ``[V]``.
    ``shift=True`` predicts ``labels[..., t + 1]`` from ``hidden[..., t, :]`` (HF-style unshifted labels).
    ``reduction``: ``"mean"`` over non-ignored rows (0 when every row is ignored), ``"sum"``, or
    ``"none"`` (per-row losses in the leading shape, 0 on ignored rows). ``num_items``: return the sum
    divided by this external count (e.g. the response tokens of a whole gradient-accumulation step), so
    micro-batches add up to the loss of the step. ``z_loss``: adds ``z_loss * lse^2`` per row; with
    ``return_z_loss`` the function returns ``(loss, z_loss_term)`` with the term reduced the same way.
    ``kernels``: ``"auto"`` (Triton on CUDA when available), ``"on"`` or ``"off"``; see the module docstring.

    KL anchor: ``base_hidden`` (the base model's hidden states, shaped like ``hidden``, no gradient) and
    ``kl_beta`` > 0 add ``kl_beta * KL(p_base || p)`` per row (see the module docstring), on the rows with a
    label, or also on the rows ``kl_mask`` (bool, labels' shape) marks; "mean" and "sum" still count the
    labelled rows. With ``return_kl`` the function returns ``(loss, kl_term)`` (the unweighted KL, reduced
    the same way; with ``return_z_loss`` too: ``(loss, z_loss_term, kl_term)``).
    """
    if kernels not in ("auto", "on", "off"):
        raise ValueError(f"kernels must be 'auto', 'on' or 'off', got {kernels!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if num_items is not None and reduction == "none":
        raise ValueError("num_items divides a summed loss; it cannot be combined with reduction='none'")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    kl = base_hidden is not None and kl_beta != 0.0
    if base_hidden is not None and base_hidden.shape != hidden.shape:
        raise ValueError(f"base_hidden {tuple(base_hidden.shape)} and hidden {tuple(hidden.shape)} disagree")
    if kl_beta < 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")
    if kl_mask is not None and kl_mask.shape != labels.shape:
        raise ValueError(f"kl_mask {tuple(kl_mask.shape)} and labels {tuple(labels.shape)} disagree")
    if shift:
        pad = torch.full_like(labels[..., :1], ignore_index)
        labels = torch.cat([labels[..., 1:], pad], dim=-1)
        if kl_mask is not None:
            kl_mask = torch.cat([kl_mask[..., 1:], torch.zeros_like(kl_mask[..., :1])], dim=-1)
    out_shape = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    labelled = y != ignore_index
    rows = labelled | kl_mask.reshape(-1).bool() if kl and kl_mask is not None else labelled
    keep = rows.nonzero().squeeze(1)  # compaction: ignored rows never reach a matmul
    h_kept, y_kept = h.index_select(0, keep), y.index_select(0, keep)
    n_labelled = int(labelled.sum()) if kl and kl_mask is not None else int(keep.numel())
    if kl:
        y_kept = torch.where(y_kept == ignore_index, -1, y_kept)  # -1: a KL-only row
        hb_kept = base_hidden.detach().reshape(-1, hidden.shape[-1]).index_select(0, keep).to(h_kept.dtype)
        return _kl_loss(h_kept, hb_kept, weight, bias, y_kept, float(kl_beta), keep, y.shape[0], out_shape,
                        reduction, num_items, n_labelled, float(label_smoothing), float(z_loss), softcap,
                        return_z_loss, return_kl, hidden, kernels)
    if _use_kernel(hidden, kernels):
        loss, z_term = _kernel_loss(h_kept, weight, bias, y_kept, reduction, num_items, ignore_index,
                                    float(label_smoothing), float(z_loss), softcap)
        if reduction == "none":
            full = loss.new_zeros(y.shape[0])
            loss = full.index_copy(0, keep, loss).reshape(out_shape)
            z_term = full.index_copy(0, keep, z_term).reshape(out_shape)
        return (loss, z_term) if return_z_loss else loss
    losses_kept, lse_kept, _ = _LinearCrossEntropy.apply(
        h_kept, weight, bias, y_kept, float(label_smoothing), float(z_loss), softcap,
    )
    z_kept = z_loss * lse_kept.detach() ** 2

    def _reduce(values: torch.Tensor) -> torch.Tensor:
        if reduction == "none":
            full = values.new_zeros(y.shape[0])
            return full.index_copy(0, keep, values).reshape(out_shape)
        total = values.sum()
        if num_items is not None:
            return total / num_items
        if reduction == "mean":
            return total / max(int(keep.numel()), 1)
        return total

    loss = _reduce(losses_kept)
    if return_z_loss:
        return (loss, _reduce(z_kept), loss.new_zeros(())) if return_kl else (loss, _reduce(z_kept))
    return (loss, _reduce(torch.zeros_like(losses_kept))) if return_kl else loss


def _kl_loss(h, h_base, weight, bias, targets, beta, keep, n_rows, out_shape, reduction, num_items, n_labelled,
             label_smoothing, z_loss, softcap, return_z_loss, return_kl, hidden, kernels):
    """CE + beta KL(p_base || p) over the kept rows (targets -1: KL only); reduced like the plain loss,
    "mean" over the labelled rows. The Triton kernel's KL variant when ``_use_kernel``, else the reference."""
    if _use_kernel(hidden, kernels):
        losses, z_terms, kl = _kernel_kl_loss(h, h_base, weight, bias, targets, beta, reduction, num_items,
                                              n_labelled, label_smoothing, z_loss, softcap)
        reduced = reduction != "none"  # the kernel returned the totals already scaled
    else:
        losses, lse, kl = _LinearCrossEntropy.apply(h, weight, bias, targets, label_smoothing, z_loss, softcap,
                                                    h_base, beta)
        z_terms = torch.where(targets >= 0, z_loss * lse.detach() ** 2, 0.0)
        reduced = False

    def _reduce(values):
        if reduced:
            return values
        if reduction == "none":
            return values.new_zeros(n_rows).index_copy(0, keep, values).reshape(out_shape)
        total = values.sum()
        if num_items is not None:
            return total / num_items
        return total / max(n_labelled, 1) if reduction == "mean" else total

    out = [_reduce(losses)]
    if return_z_loss:
        out.append(_reduce(z_terms))
    if return_kl:
        out.append(_reduce(kl))
    return tuple(out) if len(out) > 1 else out[0]


def _kernel_kl_loss(h, h_base, weight, bias, targets, beta, reduction, num_items, n_labelled, label_smoothing,
                    z_loss, softcap):
    """(loss, z-loss term, KL term) from the Triton kernel's KL variant: totals scaled like the reduction
    ("mean": 1 / labelled rows), or per kept row for reduction="none". Targets -1 are KL-only rows (no CE,
    no z-loss term)."""
    from fastsft.kernels import fused_linear_cross_entropy as flce  # triton imports only when used

    opts = dict(ignore_index=-1, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, kl_beta=beta)
    if num_items is not None:
        scale = 1.0 / num_items
    elif reduction == "mean":
        scale = 1.0 / max(n_labelled, 1)
    else:
        scale = None if reduction == "none" else 1.0
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (h, weight, bias)):
        # eval: the kernel without its gradient pass, no autograd Function
        losses, _, z_terms, kl, *_ = flce.fused_linear_cross_entropy_kl_forward(
            h, h_base, weight, bias, targets, need=(False, False, False), **opts)
        if scale is None:
            return losses, z_terms, kl
        return losses.sum() * scale, z_terms.sum() * scale, kl.sum() * scale
    return flce.FusedLinearCrossEntropyFunction.apply(h, weight, bias, targets, scale, opts, h_base)


def _kernel_loss(h, weight, bias, targets, reduction, num_items, ignore_index, label_smoothing, z_loss,
                 softcap):
    """(loss, z-loss term) from the Triton path: reduced, or per kept row for reduction="none"."""
    from fastsft.kernels import fused_linear_cross_entropy as flce  # triton imports only when used

    opts = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    if num_items is not None:
        scale = 1.0 / num_items
    elif reduction == "mean":
        scale = 1.0 / max(h.shape[0], 1)
    else:
        scale = None if reduction == "none" else 1.0
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (h, weight, bias)):
        # eval: the kernel without its gradient pass, no autograd Function
        losses, _, z_terms, *_ = flce.fused_linear_cross_entropy_forward(
            h, weight, bias, targets, need=(False, False, False), **opts)
        if scale is None:
            return losses, z_terms
        return losses.sum() * scale, z_terms.sum() * scale
    return flce.FusedLinearCrossEntropyFunction.apply(h, weight, bias, targets, scale, opts)


class FusedLinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`; call as ``loss(hidden, weight, labels, bias)``."""

    def __init__(self, *, ignore_index=-100, reduction="mean", shift=False, label_smoothing=0.0,
                 z_loss=0.0, softcap=None, kernels="auto"):
        super().__init__()
        self.opts = dict(ignore_index=ignore_index, reduction=reduction, shift=shift,
                         label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, kernels=kernels)

    def forward(self, hidden, weight, labels, bias=None, num_items=None):
        return fused_linear_cross_entropy(hidden, weight, labels, bias, num_items=num_items, **self.opts)
