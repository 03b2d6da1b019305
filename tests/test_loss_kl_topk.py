"""The KL anchor from the base's cached top-k log-probs (fastsft.loss_kl_topk) against float64."""

import pytest
import torch

from fastsft import loss_kl_topk
from fastsft.loss import fused_linear_cross_entropy
from fastsft.loss_kl_topk import kl_topk_reference, linear_cross_entropy_kl_topk


def base_topk(zb: torch.Tensor, k: int):
    """The cache's content for base logits zb: top-k ids, their log-probs and the log of the rest's mass."""
    logp = torch.log_softmax(zb.double(), dim=-1)
    lp, ids = logp.topk(k, dim=-1)
    rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    return ids.int(), torch.cat([lp, rest], dim=-1).float()


def problem(n=37, d=16, v=301, k=7, seed=0, masked=0.3, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) / d**0.5
    b = 0.1 * torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < masked] = -100
    hb = h + 0.7 * torch.randn(n, d, generator=g)
    zb = hb @ w.t() + (b if b is not None else 0)
    ids, logp = base_topk(zb, k)
    return h, w, b, y, ids, logp, hb


@pytest.mark.parametrize("case", ["plain", "softcap-bias", "kl-mask", "k-is-vocab", "chunks", "all-masked"])
def test_matches_float64_loss_and_gradients(case, monkeypatch):
    kw = dict(k=301) if case == "k-is-vocab" else {}
    h, w, b, y, ids, logp, _ = problem(bias=case == "softcap-bias", masked=1.0 if case == "all-masked" else 0.3, **kw)
    softcap = 3.0 if case == "softcap-bias" else None
    mask = torch.rand(y.shape, generator=torch.Generator().manual_seed(5)) < 0.5 if case == "kl-mask" else None
    if case == "chunks":
        monkeypatch.setattr(loss_kl_topk, "CHUNK_BYTES", 301 * 4 * 5)  # 5 rows a chunk: 8 chunks, a ragged last
    leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    loss, kl = linear_cross_entropy_kl_topk(leaves[0], leaves[1], y, ids, logp, leaves[2] if b is not None else None,
                                            kl_beta=0.3, kl_mask=mask, softcap=softcap)
    loss.backward()
    ref_leaves = [t.double().clone().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    per_row, ref_kl = kl_topk_reference(ref_leaves[0], ref_leaves[1], y, ids, logp,
                                        ref_leaves[2] if b is not None else None, kl_beta=0.3, kl_mask=mask,
                                        softcap=softcap)
    per_row.sum().backward()
    torch.testing.assert_close(loss.double(), per_row.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), ref_kl.sum(), rtol=1e-5, atol=1e-5)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)
    if case == "all-masked":
        assert float(loss.detach()) == 0.0 and not leaves[0].grad.any()
    else:
        assert float(kl) > 0


def test_with_the_whole_vocabulary_it_is_the_full_anchor():
    """k = V: the coarse-graining is the identity, so the loss and gradients are those of fastsft.loss's anchor
    with the base's hidden states."""
    h, w, _, y, ids, logp, hb = problem(k=301)
    a, b = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss, kl = linear_cross_entropy_kl_topk(a, w, y, ids, logp, kl_beta=0.5, reduction="mean")
    full, full_kl = fused_linear_cross_entropy(b, w, y, base_hidden=hb, kl_beta=0.5, return_kl=True, kernels="off")
    loss.backward()
    full.backward()
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl, full_kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_coarse_kl_is_at_most_the_full_kl_and_beta_zero_is_plain_ce():
    h, w, _, y, ids, logp, hb = problem(k=4)
    _, kl = linear_cross_entropy_kl_topk(h, w, y, ids, logp, kl_beta=1.0, reduction="none")
    _, full = fused_linear_cross_entropy(h, w, y, base_hidden=hb, kl_beta=1.0, return_kl=True, reduction="none",
                                         kernels="off")
    assert (kl <= full + 1e-6).all() and (kl[y != -100] > 0).all()
    loss, _ = linear_cross_entropy_kl_topk(h, w, y, ids, logp, kl_beta=0.0, reduction="mean")
    torch.testing.assert_close(loss, fused_linear_cross_entropy(h, w, y, kernels="off"), rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_refused():
    h, w, _, y, ids, logp, _ = problem()
    with pytest.raises(ValueError, match="k \\+ 1"):
        linear_cross_entropy_kl_topk(h, w, y, ids, logp[:, :-1], kl_beta=0.1)
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy_kl_topk(h, w, y[:-1], ids, logp, kl_beta=0.1)
