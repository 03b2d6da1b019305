"""Cross-entropy plus a KL anchor to the base model from the base's cached top-k log-probs.

The KL anchor of :mod:`fastsft.loss` runs the base model (the adapters off) forward at every step. For long
runs this mode runs it once, before training: for every token the base's k most likely next tokens and
their log-probs, plus the log of the rest's mass (the tail), are cached with the token stores
(:mod:`fastsft.train.base_topk`). The KL is then taken between the two distributions coarse-grained to
those k tokens and one tail bucket:

    kl_i = sum_{j in K_i} pb_ij (log pb_ij - log p_ij) + pb_tail,i (log pb_tail,i - log p_tail,i)
    log p_ij = z_ij - lse_i          log p_tail,i = lse(z_i with K_i left out) - lse_i

which is at most the full KL (coarse-graining never increases it) and equals it as k -> V. Its gradient
w.r.t. the tuned logits is ``S p - q`` with ``S = sum_K pb + pb_tail`` (1 up to rounding),
``q_j = pb_j`` on K and ``q_m = pb_tail * softmax_{not K}(z)_m`` off it (the base's tail mass spread as the
tuned model spreads its own), so CE + beta KL has the gradient ``p - onehot(y) + beta (S p - q)``: as in the
full anchor, no ``[tokens x vocab]`` tensor, chunks of rows recomputed in the backward, and no second
forward during training.

Memory: the cache holds ``k`` int32 ids and ``k + 1`` float32 log-probs a token, ``8k + 4`` bytes (k = 16:
132 bytes a token, 132 MB per million tokens, read from disk through a memory map); the op's extra memory is
three float32 chunks of logits (z, p and the tail softmax), each under ``CHUNK_BYTES``.

Plain PyTorch (CPU and CUDA alike); there is no Triton kernel for this mode, which ``kernel_usage`` says.
"""

from __future__ import annotations

import torch

from fastsft import kernel_usage

__all__ = ["linear_cross_entropy_kl_topk", "kl_topk_reference"]

# One float32 chunk of logits; the op holds three at once.
CHUNK_BYTES = 64 * 1024 * 1024


def _rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


def _chunk_logits(h, weight, bias, softcap):
    z = (h @ weight.t()).float()
    if bias is not None:
        z = z + bias.float()
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, t


class _CrossEntropyKLTopK(torch.autograd.Function):
    """Per-row CE (rows with target >= 0) + beta * coarse-grained KL (every row); see the module docstring."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ids, base_logp, beta, softcap):
        n, vocab = h.shape[0], weight.shape[0]
        losses = h.new_empty(n, dtype=torch.float32)
        kl_all = h.new_empty(n, dtype=torch.float32)
        lse_all = h.new_empty(n, dtype=torch.float32)
        lse_tail_all = h.new_empty(n, dtype=torch.float32)
        step = _rows_per_chunk(vocab)
        for s in range(0, n, step):
            z, _ = _chunk_logits(h[s : s + step], weight, bias, softcap)
            tgt, k_ids, lb = targets[s : s + step], ids[s : s + step], base_logp[s : s + step]
            lse = torch.logsumexp(z, dim=-1)
            ce = torch.where(tgt >= 0, lse - z.gather(1, tgt.clamp_min(0)[:, None]).squeeze(1), 0.0)
            lp_k = z.gather(1, k_ids) - lse[:, None]
            lse_tail = torch.logsumexp(z.scatter_(1, k_ids, float("-inf")), dim=-1)  # z is not needed after
            kl = _xlogy_diff(lb[:, :-1], lp_k).sum(-1) + _xlogy_diff(lb[:, -1], lse_tail - lse)
            losses[s : s + step] = ce + beta * kl
            kl_all[s : s + step] = kl
            lse_all[s : s + step] = lse
            lse_tail_all[s : s + step] = lse_tail
        ctx.mark_non_differentiable(kl_all)
        ctx.save_for_backward(h, weight, bias, targets, ids, base_logp, lse_all, lse_tail_all)
        ctx.opts = (beta, softcap)
        return losses, kl_all

    @staticmethod
    def backward(ctx, grad_losses, _grad_kl):
        h, weight, bias, targets, ids, base_logp, lse_all, lse_tail_all = ctx.saved_tensors
        beta, softcap = ctx.opts
        n, vocab = h.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=h.device) if need_b else None
        step = _rows_per_chunk(vocab)
        for s in range(0, n, step):
            hc = h[s : s + step]
            z, tanh = _chunk_logits(hc, weight, bias, softcap)
            tgt, k_ids, lb = targets[s : s + step], ids[s : s + step], base_logp[s : s + step]
            pb_k, pb_tail = lb[:, :-1].exp(), lb[:, -1].exp()
            total = pb_k.sum(-1) + pb_tail  # S: 1 up to rounding; the exact derivative of the forward
            # beta * pb_tail * softmax over the tokens outside K (the tail's share of q), before z becomes p
            lse_tail = lse_tail_all[s : s + step]  # -inf when K holds the whole vocabulary (then pb_tail is 0)
            lse_tail = torch.where(torch.isfinite(lse_tail), lse_tail, lse_all[s : s + step])
            q_tail = torch.exp(z - lse_tail[:, None]).mul_((beta * pb_tail)[:, None])
            q_tail.scatter_(1, k_ids, 0.0)
            labelled = tgt >= 0  # CE's p - onehot(y) on rows with a label; KL-only rows have beta (S p - q) alone
            dz = z.sub_(lse_all[s : s + step, None]).exp_()  # p, in place of z
            dz.mul_((labelled.float() + beta * total)[:, None]).sub_(q_tail)
            del q_tail
            dz.scatter_add_(1, k_ids, -beta * pb_k)
            rows = torch.arange(hc.shape[0], device=h.device)
            dz[rows, tgt.clamp_min(0)] -= labelled.float()
            dz.mul_(grad_losses[s : s + step, None].float())
            if softcap is not None:
                dz.mul_(1.0 - tanh * tanh)
            if need_h:
                grad_h[s : s + step] = (dz.to(weight.dtype) @ weight).to(h.dtype)
            if need_w:
                grad_w += dz.t() @ hc.float()
            if need_b:
                grad_b += dz.sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _xlogy_diff(log_b: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """exp(log_b) * (log_b - log_p), 0 where the base's mass is 0 (log_b = -inf)."""
    pb = log_b.exp()
    return torch.where(pb > 0, pb * (log_b - log_p), 0.0)


def linear_cross_entropy_kl_topk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 topk_ids: torch.Tensor, topk_logp: torch.Tensor, bias: torch.Tensor | None = None, *,
                                 kl_beta: float, kl_mask: torch.Tensor | None = None, ignore_index: int = -100,
                                 reduction: str = "sum", num_items: int | float | None = None,
                                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, kl)``: cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` (already shifted:
    row t predicts ``targets[t]``) plus ``kl_beta`` times the coarse-grained KL from the base's cached top-k
    (see the module docstring), without materialising logits.

    hidden ``[..., D]``; targets ``[...]``; topk_ids ``[..., k]`` (int) and topk_logp ``[..., k + 1]`` (the
    base's log-probs of those ids, then the log of its remaining mass). The KL covers the rows with a target,
    or also those ``kl_mask`` marks. ``reduction``: "sum", "mean" (over the rows with a target) or "none";
    ``num_items``: the sum divided by it. ``kl`` is the unweighted KL, reduced the same way."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if num_items is not None and reduction == "none":
        raise ValueError("num_items divides a summed loss; it cannot be combined with reduction='none'")
    lead = targets.shape
    if hidden.shape[:-1] != lead or topk_ids.shape[:-1] != lead or topk_logp.shape[:-1] != lead:
        raise ValueError(f"hidden {tuple(hidden.shape)}, targets {tuple(lead)}, topk_ids {tuple(topk_ids.shape)} "
                         f"and topk_logp {tuple(topk_logp.shape)} disagree")
    k = topk_ids.shape[-1]
    if topk_logp.shape[-1] != k + 1:
        raise ValueError(f"topk_logp has {topk_logp.shape[-1]} columns; expected k + 1 = {k + 1} (the tail's last)")
    if kl_beta < 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta}")
    kernel_usage.record("loss", "reference", "the cached top-k KL anchor has no Triton kernel")
    y = targets.reshape(-1)
    labelled = y != ignore_index
    rows = labelled if kl_mask is None else labelled | kl_mask.reshape(-1).to(labelled.device).bool()
    keep = rows.nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    t = torch.where(labelled, y, -1).index_select(0, keep)
    ids = topk_ids.reshape(-1, k).index_select(0, keep.to(topk_ids.device)).to(h.device, torch.int64)
    logp = topk_logp.reshape(-1, k + 1).index_select(0, keep.to(topk_logp.device)).to(h.device, torch.float32)
    losses, kl = _CrossEntropyKLTopK.apply(h, weight, bias, t, ids, logp, float(kl_beta), softcap)
    n_labelled = int(labelled.sum())

    def reduce(values):
        if reduction == "none":
            return values.new_zeros(y.shape[0]).index_copy(0, keep, values).reshape(lead)
        total = values.sum()
        if num_items is not None:
            return total / num_items
        return total / max(n_labelled, 1) if reduction == "mean" else total

    return reduce(losses), reduce(kl)


def kl_topk_reference(hidden, weight, targets, topk_ids, topk_logp, bias=None, *, kl_beta, kl_mask=None,
                      ignore_index=-100, softcap=None):
    """Per-row CE + beta KL and KL over the full logits in float64 (the tests' oracle; ``[tokens x vocab]``)."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    y = targets
    labelled = y != ignore_index
    ce = torch.where(labelled, -logp.gather(-1, y.clamp_min(0)[..., None]).squeeze(-1), 0.0)
    ids = topk_ids.long()
    lp_k = logp.gather(-1, ids)
    in_k = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, ids, True)
    lp_tail = torch.logsumexp(logp.masked_fill(in_k, float("-inf")), dim=-1)
    lb = topk_logp.double()
    pb = lb.exp()
    kl = (torch.where(pb[..., :-1] > 0, pb[..., :-1] * (lb[..., :-1] - lp_k), 0.0).sum(-1)
          + torch.where(pb[..., -1] > 0, pb[..., -1] * (lb[..., -1] - lp_tail), 0.0))
    rows = labelled if kl_mask is None else labelled | kl_mask.bool()
    kl = torch.where(rows, kl, 0.0)
    return ce + kl_beta * kl, kl
