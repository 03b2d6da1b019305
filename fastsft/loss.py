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
Both paths have it: the reference below (chunks of half the rows: z, z_base and p_base), and the Triton
kernel's HAS_BASE variant (one pass over both chunks for lse, lse_base and the KL, one writing the
gradient; chunks of half the rows, so the two logit chunks fit the plain path's CHUNK_BYTES); the
dispatch is the plain loss's.

This file holds the plain PyTorch implementation: the CPU path, the oracle for the Triton kernel in
``fastsft.kernels`` and the ablation in benchmarks. Algorithm: the kept rows are gathered a chunk at a
time; each chunk's float32 logits go into one reused buffer, where they become the softmax and then
d loss / d z in place (max, subtract, exp, sum, divide: no other [rows x V] tensor), and two matmuls
turn that into the chunk's rows of grad_h and its share of grad_W (``addmm_`` straight into the float32
gradient). When the caller reduces with one weight for every row ("mean", "sum", ``num_items``) and
grad is enabled, this runs in the forward and the backward only scales the result, as the Triton kernel
does: 6 N V D matmul FLOPs with a trainable head, 4 N V D frozen. ``reduction="none"`` (a weight per
row) and a second backward (``retain_graph``) recompute each chunk in the backward from the saved
per-row log-sum-exp instead (8 / 6 N V D, the blockwise recompute of Cut Cross-Entropy).

Extra memory of the reference: the gradients it returns (grad_hidden, and V D 4 bytes of grad_W with a
trainable head; computed in the forward, they are held until the backward) plus one float32 chunk of
``_rows_per_chunk(V)`` rows x V: CHUNK_BYTES (16 MiB), or MIN_CHUNK_ROWS (128) rows where V > 32768
(78 MB at V=152k), plus vectors of a few bytes a row. A soft cap adds a second chunk (tanh, for the
gradient); the KL anchor uses three chunks of half the rows (z, z_base, p_base). The kept rows are never
copied whole, and a frozen head (LoRA) skips all weight-gradient work. ``tests/test_loss_memory.py``
holds every allocation to that bound. Measured (``benchmarks/bench_loss_memory.py``, 2 CPU cores,
N=4096 half masked, D=1024, V=32000, fp32; peak resident memory of a warm step above the inputs, the
gradients included): 169 MB with a trainable head, 38 MB frozen, at 0.54x / 0.48x the time of
``linear + cross_entropy`` (1573 MB); torch 2.13's chunked ``F.linear_cross_entropy`` takes 297 / 43 MB
at 1.38x / 1.20x. With the KL anchor: 174 / 45 MB.

Rows whose label is ``ignore_index`` are compacted away before any matmul, so prompt tokens cost
nothing.

Dispatch: after shifting and compaction, :func:`fused_linear_cross_entropy` runs either this reference
or the Triton kernel (``fastsft.kernels.fused_linear_cross_entropy``: the same scheme on the GPU, with
chunks of up to 256 MiB in the input dtype). ``kernels="auto"`` (the default) picks the kernel for CUDA tensors
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


# One chunk of float32 logits (rows x V x 4 bytes) is at most this many bytes, but never fewer than
# MIN_CHUNK_ROWS rows. Every [rows x V] operation works in place in that one buffer (a soft cap adds one
# of tanh; a base halves the rows and uses three: z, z_base, p_base), so it is the whole [rows x V]
# footprint. 16 MiB is 131 rows at V=32k: at D=1024 on 2 CPU cores the chunk's three matmuls run at ~80 %
# of their speed at 1024 rows (~65 % at 64 rows), and a step's extra memory stays under torch's chunked
# F.linear_cross_entropy (benchmarks/bench_loss_memory.py).
CHUNK_BYTES = 16 * 1024 * 1024
# Fewer rows than this starve the matmuls (the chunk's M dimension); at V=152k the floor's chunk is 78 MB.
MIN_CHUNK_ROWS = 128


def _rows_per_chunk(vocab: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * vocab))


def _logits_(out, h, weight, bias, softcap, tanh_out=None):
    """``out`` <- float32 ``softcap(h W^T + b)``, in place; ``tanh_out`` <- tanh(x / softcap) when given
    (the backward's 1 - tanh^2)."""
    if h.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(h, weight.t(), out=out)
    else:
        out.copy_(h @ weight.t())  # the matmul in the input dtype, as the Triton kernel does
    if bias is not None:
        out.add_(bias.float())
    if softcap is not None:
        if tanh_out is None:
            out.div_(softcap).tanh_().mul_(softcap)
        else:
            torch.mul(torch.div(out, softcap, out=tanh_out).tanh_(), softcap, out=out)


def _chunk_loop(h, keep, weight, bias, targets, opts, need, h_base=None, lse=None, lse_base=None, row_scale=None):
    """The chunk loop of the forward (``lse`` None: losses, lse, KL, and the unscaled gradients named in
    ``need``) and of a recomputing backward (``lse``, ``lse_base`` given: the gradients of
    ``sum_i row_scale_i loss_i``). Rows are ``h[keep]`` (gathered a chunk at a time, so the kept rows are
    never copied whole); ``grad_h`` comes back in h's full shape, zero on the rows not kept.

    Returns ``(losses, lse, kl, lse_base, grad_h, grad_W, grad_b)``; grad_W and grad_b in float32.
    """
    label_smoothing, z_loss, softcap, beta = opts
    n, vocab = keep.shape[0], weight.shape[0]
    has_base, forward = h_base is not None, lse is None
    need_h, need_w, need_b = need
    grad = need_h or need_w or need_b
    f32 = dict(dtype=torch.float32, device=h.device)
    if forward:
        losses, lse, kl = torch.empty(n, **f32), torch.empty(n, **f32), torch.zeros(n, **f32)
        lse_base = torch.zeros(n if has_base else 0, **f32)
    else:
        losses = kl = None
    grad_h = torch.zeros_like(h) if need_h else None
    grad_w = torch.zeros(weight.shape, **f32) if need_w else None  # for a float32 head: the gradient itself
    grad_b = torch.zeros(vocab, **f32) if need_b else None
    # a base doubles the [rows x V] buffers (three in the forward: z, z_base, p_base): half the rows
    step = max(1, min(_rows_per_chunk(vocab) // (2 if has_base else 1), n))
    z_buf = torch.empty(step, vocab, **f32)
    t_buf = torch.empty_like(z_buf) if softcap is not None and grad else None
    zb_buf = torch.empty_like(z_buf) if has_base else None
    pb_buf = torch.empty_like(z_buf) if has_base and forward else None
    for s in range(0, n, step):
        idx, tgt = keep[s : s + step], targets[s : s + step]
        c = idx.shape[0]
        hc = h.index_select(0, idx)
        z, t = z_buf[:c], (t_buf[:c] if t_buf is not None else None)
        _logits_(z, hc, weight, bias, softcap, t)  # (c, V) float32
        col = tgt.clamp_min(0)[:, None]  # -1: a KL-only row (no label)
        valid = tgt >= 0
        if forward:
            z_y = z.gather(1, col).squeeze(1)
            z_mean = z.mean(dim=-1) if label_smoothing > 0.0 else None
        if has_base:
            zb = zb_buf[:c]
            _logits_(zb, h_base.index_select(0, idx).to(hc.dtype), weight, bias, softcap)
            if forward:  # kl = sum_j exp(zb_j - mb) (zb_j - z_j) / sum_j exp(zb_j - mb) - lse_b + lse
                pb = pb_buf[:c]
                m_b = zb.amax(dim=-1, keepdim=True)
                torch.sub(zb, m_b, out=pb).exp_()
                s_b = pb.sum(dim=-1, keepdim=True)
                lse_b = (m_b + s_b.log()).squeeze(1)
                weighted = torch.bmm(pb.unsqueeze(1), zb.sub_(z).unsqueeze(2)).view(c)  # a row-wise dot, no temporary
                pb.div_(s_b)  # p_base
                kl_c = weighted / s_b.squeeze(1) - lse_b
            else:
                pb = zb.sub_(lse_base[s : s + step, None]).exp_()  # p_base, in place
        if forward:  # softmax in place: z <- exp(z - max), then / sum
            m = z.amax(dim=-1, keepdim=True)
            total = z.sub_(m).exp_().sum(dim=-1, keepdim=True)
            lse_c = (m + total.log()).squeeze(1)
            if grad:
                z.div_(total)
            nll = lse_c - z_y
            if label_smoothing > 0.0:
                # torch's definition: (1 - eps) * nll + eps * mean_j(lse - z_j)
                nll = (1.0 - label_smoothing) * nll + label_smoothing * (lse_c - z_mean)
            if z_loss > 0.0:
                nll = nll + z_loss * lse_c * lse_c
            if has_base:
                nll = torch.where(valid, nll, 0.0)
                kl_c = kl_c + lse_c
                kl[s : s + step], lse_base[s : s + step] = kl_c, lse_b
                nll = nll + beta * kl_c
            losses[s : s + step], lse[s : s + step] = nll, lse_c
        else:
            lse_c = lse[s : s + step]
            z.sub_(lse_c[:, None]).exp_()
        if not grad:
            continue
        # z holds p; in place it becomes d loss / d z = (1 + 2 s lse) p - (1 - eps) onehot(y) - eps / V on
        # labelled rows, plus beta (p - p_base) on every row with a base
        coef = 1.0 + 2.0 * z_loss * lse_c if z_loss > 0.0 else None
        if has_base:
            coef = (valid if coef is None else coef * valid) + beta
        if coef is not None:
            z.mul_(coef[:, None])
        if has_base:
            z.add_(pb, alpha=-beta)
        if label_smoothing > 0.0:
            z.sub_((valid * (label_smoothing / vocab))[:, None] if has_base else label_smoothing / vocab)
        rows = valid.nonzero().squeeze(1) if has_base else torch.arange(c, device=z.device)
        z[rows, col[rows, 0]] -= 1.0 - label_smoothing
        if row_scale is not None:
            z.mul_(row_scale[s : s + step, None])
        if t is not None:
            z.mul_(t.square_().neg_().add_(1.0))  # 1 - tanh^2: through the cap (the tuned model's)
        if need_h:
            dh = z @ weight if weight.dtype == torch.float32 else z.to(weight.dtype) @ weight
            grad_h.index_copy_(0, idx, dh.to(h.dtype))
        if need_w:
            grad_w.addmm_(z.t(), hc if hc.dtype == torch.float32 else hc.float())
        if need_b:
            grad_b += z.sum(0)
    return losses, lse, kl, lse_base, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row losses of the rows ``h[keep]``; see the module docstring for the math.

    ``precompute`` (the caller reduces with one weight for every row, and grad is enabled): the forward
    also computes the gradients of the summed losses, and the backward scales them in place, so the
    logits are computed once (3 N V D matmul FLOPs with a trainable head, 2 frozen; 4 and 3 recomputing).
    The backward recomputes instead when the incoming row gradients differ (reduction="none") or on a
    second backward (retain_graph), from the saved lse."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, keep, opts, h_base=None, precompute=False):
        """targets: the label per kept row, or -1 for a row that only carries the KL term (h_base given);
        opts: (label_smoothing, z_loss, softcap, beta)."""
        need = tuple(ctx.needs_input_grad[:3]) if precompute else (False, False, False)
        losses, lse, kl, lse_base, *grads = _chunk_loop(h, keep, weight, bias, targets, opts, need, h_base)
        ctx.mark_non_differentiable(lse, kl)
        ctx.save_for_backward(h, weight, bias, targets, keep, lse, h_base, lse_base)
        ctx.opts, ctx.grads = opts, (grads if any(need) else None)
        return losses, lse, kl

    @staticmethod
    def backward(ctx, grad_losses, _grad_lse, _grad_kl):
        h, weight, bias, targets, keep, lse, h_base, lse_base = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None  # no reference left here: autograd takes them as .grad, no copy
        g = grad_losses.float()
        if grads is not None and (g.numel() == 0 or bool((g == g[0]).all())):
            factor = g[0] if g.numel() else 0.0  # d total / d (each row loss)
            grad_h, grad_w, grad_b = (None if x is None else x.mul_(factor) for x in grads)
        else:
            need = tuple(ctx.needs_input_grad[:3])
            *_, grad_h, grad_w, grad_b = _chunk_loop(h, keep, weight, bias, targets, ctx.opts, need, h_base,
                                                     lse, lse_base, row_scale=g)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


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
    y_kept = y.index_select(0, keep)
    n_labelled = int(labelled.sum()) if kl and kl_mask is not None else int(keep.numel())
    if kl:
        y_kept = torch.where(y_kept == ignore_index, -1, y_kept)  # -1: a KL-only row
        h_base = base_hidden.detach().reshape(-1, hidden.shape[-1])
        return _kl_loss(h, h_base, weight, bias, y_kept, float(kl_beta), keep, y.shape[0], out_shape,
                        reduction, num_items, n_labelled, float(label_smoothing), float(z_loss), softcap,
                        return_z_loss, return_kl, hidden, kernels)
    if _use_kernel(hidden, kernels):
        h_kept = _kept_rows(h, keep)  # the kernel takes the kept rows packed
        loss, z_term = _kernel_loss(h_kept, weight, bias, y_kept, reduction, num_items, ignore_index,
                                    float(label_smoothing), float(z_loss), softcap)
        if reduction == "none":
            full = loss.new_zeros(y.shape[0])
            loss = full.index_copy(0, keep, loss).reshape(out_shape)
            z_term = full.index_copy(0, keep, z_term).reshape(out_shape)
        return (loss, z_term) if return_z_loss else loss
    # the reference gathers the kept rows a chunk at a time; one weight for every row lets it compute the
    # gradients in the forward
    precompute = torch.is_grad_enabled() and reduction != "none"
    losses_kept, lse_kept, _ = _LinearCrossEntropy.apply(
        h, weight, bias, y_kept, keep, (float(label_smoothing), float(z_loss), softcap, 0.0), None, precompute,
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


def _kept_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x[keep]`` packed; ``x`` itself when every row is kept (no copy, and no [rows x D] scatter of its
    gradient in the backward)."""
    return x.contiguous() if keep.numel() == x.shape[0] else x.index_select(0, keep)


def _kl_loss(h, h_base, weight, bias, targets, beta, keep, n_rows, out_shape, reduction, num_items, n_labelled,
             label_smoothing, z_loss, softcap, return_z_loss, return_kl, hidden, kernels):
    """CE + beta KL(p_base || p) over the rows ``keep`` of ``h`` / ``h_base`` (targets -1: KL only); reduced
    like the plain loss, "mean" over the labelled rows. The Triton kernel's KL variant when ``_use_kernel``,
    else the reference."""
    if _use_kernel(hidden, kernels):
        h_kept, hb_kept = _kept_rows(h, keep), _kept_rows(h_base, keep).to(h.dtype)
        losses, z_terms, kl = _kernel_kl_loss(h_kept, hb_kept, weight, bias, targets, beta, reduction, num_items,
                                              n_labelled, label_smoothing, z_loss, softcap)
        reduced = reduction != "none"  # the kernel returned the totals already scaled
    else:
        precompute = torch.is_grad_enabled() and reduction != "none"
        losses, lse, kl = _LinearCrossEntropy.apply(h, weight, bias, targets, keep,
                                                    (label_smoothing, z_loss, softcap, beta), h_base, precompute)
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
