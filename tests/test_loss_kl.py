"""The KL anchor to the base inside the fused loss (fastsft.loss, reference path) against float64 autograd
on the materialised logits: loss, KL term and every gradient, with soft-capping, label smoothing, z-loss,
KL-only rows (kl_mask), all-masked inputs and reduction "none"; beta = 0 is the plain loss bit for bit."""

import pytest
import torch

from fastsft.loss import fused_linear_cross_entropy, use_implementation

N, D, V = 29, 16, 43  # awkward sizes


def _inputs(seed=0, ignored=(0, 1, 2, 3, 4, 11)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    hb = h + 0.5 * torch.randn(N, D, generator=g, dtype=torch.float64)  # a base near the tuned model
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / 2
    b = torch.randn(V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[list(ignored)] = -100
    return h, hb, w, b, y


def _want(h, hb, w, b, y, beta, km=None, cap=None, ls=0.0, zl=0.0, reduction="mean"):
    """float64 autograd on the full logits."""
    def logits(x):
        z = x @ w.T + b
        return z if cap is None else cap * torch.tanh(z / cap)

    z, zb = logits(h), logits(hb).detach()
    lp, lpb = torch.log_softmax(z, -1), torch.log_softmax(zb, -1)
    has = y != -100
    rows = has | km if km is not None else has
    per = torch.zeros(N, dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy(z[has], y[has], reduction="none", label_smoothing=ls)
    per = per.index_put((has.nonzero().squeeze(1),), ce + zl * torch.logsumexp(z[has], -1) ** 2)
    kl = torch.where(rows, (lpb.exp() * (lpb - lp)).sum(-1), 0.0)
    per = per + beta * kl
    if reduction == "none":
        return per, kl
    denom = max(int(has.sum()), 1) if reduction == "mean" else 1
    return per.sum() / denom, kl.sum() / denom


def _ours(h, hb, w, b, y, beta, km=None, cap=None, ls=0.0, zl=0.0, reduction="mean"):
    with use_implementation("reference"):
        return fused_linear_cross_entropy(h, w, y, b, base_hidden=hb, kl_beta=beta, kl_mask=km, softcap=cap,
                                          label_smoothing=ls, z_loss=zl, reduction=reduction, return_kl=True)


@pytest.mark.parametrize("cap", [None, 2.5])
@pytest.mark.parametrize("ls, zl", [(0.0, 0.0), (0.1, 1e-3)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_loss_kl_and_gradients_match_float64(cap, ls, zl, with_mask):
    h, hb, w, b, y = _inputs()
    km = torch.zeros(N, dtype=torch.bool)
    km[[1, 3, 20]] = True  # two prompt rows get the KL only; row 20 has a label anyway
    km = km if with_mask else None
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    loss, kl = _ours(leaves[0], hb, leaves[1], leaves[2], y, 0.7, km, cap, ls, zl)
    loss.backward()
    ref = [t.clone().requires_grad_() for t in (h, w, b)]
    want, want_kl = _want(ref[0], hb, ref[1], ref[2], y, 0.7, km, cap, ls, zl)
    want.backward()
    torch.testing.assert_close(loss.double(), want, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(kl.double(), want_kl, atol=2e-6, rtol=1e-6)
    assert float(want_kl) > 1e-2  # the base differs: the KL is not trivially 0
    for got, exp in zip(leaves, ref):
        torch.testing.assert_close(got.grad, exp.grad, atol=2e-6, rtol=1e-5)


def test_reduction_none_and_sum():
    h, hb, w, b, y = _inputs(seed=1)
    per, kl = _ours(h, hb, w, b, y, 0.4, reduction="none")
    want, want_kl = _want(h, hb, w, b, y, 0.4, reduction="none")
    torch.testing.assert_close(per.double(), want, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(kl.double(), want_kl, atol=2e-6, rtol=1e-6)
    total, _ = _ours(h, hb, w, b, y, 0.4, reduction="sum")
    torch.testing.assert_close(total.double(), want.sum(), atol=1e-5, rtol=1e-6)


def test_all_masked_rows_give_zero_loss_and_zero_gradients():
    h, hb, w, b, y = _inputs(ignored=range(N))
    hh = h.clone().requires_grad_()
    loss, kl = _ours(hh, hb, w, b, y, 0.5)
    assert float(loss) == 0.0 and float(kl) == 0.0
    loss.backward()
    assert torch.count_nonzero(hh.grad) == 0


def test_beta_zero_is_plain_cross_entropy_bit_for_bit():
    h, hb, w, b, y = _inputs(seed=2)
    h, hb, w, b = (t.float() for t in (h, hb, w, b))
    for kwargs in ({}, {"softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-4}):
        a, c = h.clone().requires_grad_(), h.clone().requires_grad_()
        plain = fused_linear_cross_entropy(a, w, y, b, **kwargs)
        anchored = fused_linear_cross_entropy(c, w, y, b, base_hidden=hb, kl_beta=0.0, **kwargs)
        plain.backward(), anchored.backward()
        assert torch.equal(plain, anchored) and torch.equal(a.grad, c.grad)


def test_identical_base_has_zero_kl_and_the_ce_gradient():
    h, _, w, b, y = _inputs(seed=3)
    h, w, b = (t.float() for t in (h, w, b))
    loss, kl = _ours(h, h, w, b, y, 2.0)
    assert abs(float(kl)) < 1e-6
    torch.testing.assert_close(loss, fused_linear_cross_entropy(h, w, y, b), atol=1e-5, rtol=0)


def test_bad_arguments_are_refused():
    h, hb, w, b, y = _inputs()
    with pytest.raises(ValueError, match="base_hidden"):
        fused_linear_cross_entropy(h, w, y, base_hidden=hb[:-1], kl_beta=0.1)
    with pytest.raises(ValueError, match="kl_beta"):
        fused_linear_cross_entropy(h, w, y, base_hidden=hb, kl_beta=-1.0)
    with pytest.raises(ValueError, match="kl_mask"):
        fused_linear_cross_entropy(h, w, y, base_hidden=hb, kl_beta=0.1, kl_mask=torch.ones(3, dtype=torch.bool))
