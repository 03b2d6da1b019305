"""fastsft.loss (the plain PyTorch path) against a float64 logits + F.cross_entropy reference."""

import pytest
import torch
import torch.nn.functional as F

from fastsft import loss as loss_mod
from fastsft.loss import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy


def reference(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean", num_items=None,
              shift=False, label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Materialise the float64 logits and use torch's own cross-entropy."""
    if shift:
        labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], dim=-1)
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z.reshape(-1, z.shape[-1])
    y = labels.reshape(-1)
    per_row = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="none",
                              label_smoothing=label_smoothing)
    if z_loss:
        per_row = per_row + z_loss * torch.logsumexp(z, -1) ** 2 * (y != ignore_index)
    if reduction == "none":
        return per_row.reshape(labels.shape)
    if num_items is not None:
        return per_row.sum() / num_items
    if reduction == "mean":
        return per_row.sum() / max(int((y != ignore_index).sum()), 1)
    return per_row.sum()


def _inputs(n, d, v, masked_fraction, seed, bias=True, dtype=torch.float32, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < masked_fraction] = ignore_index
    return hidden, weight, b, labels


def _check(opts, n=37, d=48, v=133, masked=0.4, trainable=True, bias=True, seed=0, chunk_rows=None,
           monkeypatch=None):
    hidden, weight, b, labels = _inputs(n, d, v, masked, seed, bias, ignore_index=opts.get("ignore_index", -100))
    if chunk_rows is not None:
        monkeypatch.setattr(loss_mod, "_rows_per_chunk", lambda vocab: chunk_rows)
    leaves = []
    for t in (hidden, weight, b):
        if t is None:
            leaves.append(None)
            continue
        leaves.append(t.clone().requires_grad_(t is hidden or trainable))
    out = fused_linear_cross_entropy(leaves[0], leaves[1], labels, leaves[2], **opts)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref = reference(ref_leaves[0], ref_leaves[1], labels, ref_leaves[2], **opts)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(ref) if ref.dim() else torch.tensor(1.0, dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    for got, want in zip(leaves, ref_leaves):
        if got is None or not got.requires_grad:
            continue
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-5, rtol=1e-4)
    if not trainable:
        assert leaves[1].grad is None


OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"num_items": 53},
    {"shift": True},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 3.0},
    {"ignore_index": 7},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 5.0, "reduction": "sum"},
]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("trainable", [True, False], ids=["trainable-head", "frozen-head"])
def test_matches_float64_reference(opts, trainable, monkeypatch):
    # 5 rows a chunk: several chunks and a ragged last one
    _check(opts, trainable=trainable, chunk_rows=5, monkeypatch=monkeypatch)


@pytest.mark.parametrize("masked", [0.0, 1.0], ids=["no-rows-ignored", "all-rows-ignored"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_edge_masks(masked, reduction):
    _check({"reduction": reduction}, masked=masked)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, _, labels = _inputs(9, 16, 31, 1.0, 3, bias=False)
    hidden.requires_grad_()
    out = fused_linear_cross_entropy(hidden, weight, labels)
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


def test_batched_leading_shape_and_module():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 11, 24, generator=g)
    weight = torch.randn(50, 24, generator=g)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[0, :4] = -100
    module = FusedLinearCrossEntropyLoss(shift=True)
    torch.testing.assert_close(module(hidden, weight, labels).double(),
                               reference(hidden, weight, labels, shift=True), atol=1e-5, rtol=1e-5)


def test_fp16_inputs_close_to_float64():
    hidden, weight, b, labels = _inputs(37, 48, 133, 0.3, 5, dtype=torch.float16)
    out = fused_linear_cross_entropy(hidden, weight, labels, b)
    ref = reference(hidden, weight, labels, b)
    assert abs(out.double().item() - ref.item()) < 1e-2


def test_return_z_loss_and_bad_arguments():
    hidden, weight, _, labels = _inputs(8, 8, 10, 0.0, 2, bias=False)
    loss, z = fused_linear_cross_entropy(hidden, weight, labels, z_loss=0.5, return_z_loss=True)
    lse = torch.logsumexp(hidden.double() @ weight.double().t(), -1)
    torch.testing.assert_close(z.double(), 0.5 * (lse**2).mean(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="disagree"):
        fused_linear_cross_entropy(hidden, weight, labels[:-1])


def test_auto_mode_self_check_passes_and_catches_a_broken_kernel(monkeypatch):
    """kernels="auto" trusts the Triton kernel only after it matched the reference on the device; a
    failure is the real exception, and the fallback is loud and recorded with its cost."""
    import os

    from fastsft import kernel_usage

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's interpreter (tests/conftest.py sets it on CPU machines)")
    from fastsft.kernels import fused_linear_cross_entropy as flce

    loss_mod._kernel_self_check.cache_clear()
    try:
        assert loss_mod._kernel_self_check(torch.device("cpu"), torch.float32) is None
        loss_mod._kernel_self_check.cache_clear()
        real = flce.cross_entropy_rows

        def wrong(*args, **kwargs):  # e.g. a Triton version that miscompiles: losses off by 10%
            loss, lse, z = real(*args, **kwargs)
            return loss * 1.1, lse, z

        monkeypatch.setattr(flce, "cross_entropy_rows", wrong)
        error = loss_mod._kernel_self_check(torch.device("cpu"), torch.float32)
        assert error.startswith("AssertionError: loss differs from the reference"), error
        assert kernel_usage.self_checks()["loss cpu float32"]["error"] == error
        # what auto mode does with it on a GPU: one warning naming the piece, the exception, the cost
        with pytest.warns(UserWarning, match=r"loss falls back .*AssertionError: loss differs.*Expected cost"):
            kernel_usage.fallback("loss", f"the Triton kernel failed its self-check: {error}", where="cuda:0")
        assert kernel_usage.snapshot()["loss"]["path"] == "reference"
        # a kernel wrong only in its KL-anchor variant is caught too
        loss_mod._kernel_self_check.cache_clear()

        def wrong_kl(*args, **kwargs):
            out = real(*args, **kwargs)
            return (out[0] * 1.1, *out[1:]) if kwargs.get("base") is not None else out

        monkeypatch.setattr(flce, "cross_entropy_rows", wrong_kl)
        error = loss_mod._kernel_self_check(torch.device("cpu"), torch.float32)
        assert error.startswith("AssertionError: loss with the KL anchor differs from the reference"), error
    finally:
        loss_mod._kernel_self_check.cache_clear()
