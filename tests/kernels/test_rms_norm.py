"""The Triton RMSNorm against ``rms_norm_ref`` (HF LlamaRMSNorm), forward and backward.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Shapes stay small: odd row counts and hidden sizes that are not powers of two (masked tails).
"""

import pytest
import torch
from helpers import CUDA, DEVICE
from helpers import max_abs_err as _err

from fastsft.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_ref

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 in Triton's interpreter is unreliable)")


def _inputs(shape, dtype, seed=0, w_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 0.5
    w = 1 + 0.5 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    return x.to(DEVICE, dtype), w.to(DEVICE, w_dtype or dtype), dy.to(DEVICE)


def _run(fn, x, w, dy, eps=1e-6):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, eps)
    y.backward(dy.to(y.dtype))
    return y, x.grad, w.grad


def test_ref_matches_float64_formula_and_hf():
    x, w, dy = _inputs((5, 37), torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = xr / torch.sqrt((xr * xr).mean(-1, keepdim=True) + 1e-5) * wr
    want.backward(dy)
    got = _run(rms_norm_ref, x, w, dy, eps=1e-5)
    for a, b in zip(got, (want, xr.grad, wr.grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(37, eps=1e-5)
    x16 = x.half()
    with torch.no_grad():
        hf.weight.copy_(w.float())
        assert torch.equal(hf(x16), rms_norm_ref(x16, w.float(), 1e-5))


@pytest.mark.parametrize("shape", [(37, 48), (37, 100), (3, 7, 123), (1, 64), (2, 1, 5)], ids=str)
def test_fp32_matches_ref(shape):
    x, w, dy = _inputs(shape, torch.float32, seed=shape[-1])
    got = _run(rms_norm, x, w, dy)
    want = _run(rms_norm_ref, x.double(), w.double(), dy.double())
    assert got[0].dtype == torch.float32 and got[0].shape == x.shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(37, 48), (5, 123)], ids=str)
def test_fp16_no_worse_than_torch(shape):
    x, w, dy = _inputs(shape, torch.float16, seed=7)
    want = _run(rms_norm_ref, x.double(), w.double(), dy.double())
    torch16 = _run(rms_norm_ref, x, w, dy)
    got = _run(rms_norm, x, w, dy)
    for g, t, r in zip(got, torch16, want):
        assert g.dtype == torch.float16
        assert _err(g, r) <= 2 * _err(t, r) + 1e-3 * r.abs().max().item(), (_err(g, r), _err(t, r))
    torch.testing.assert_close(got[0], torch16[0], atol=1e-3, rtol=1e-3)  # HF's casts: nearly bitwise


def test_fp16_input_fp32_weight_promotes_like_hf():
    x, w, dy = _inputs((9, 100), torch.float16, seed=3, w_dtype=torch.float32)
    got, want = _run(rms_norm, x, w, dy), _run(rms_norm_ref, x, w, dy)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float16 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)  # the same rounding of xhat
    torch.testing.assert_close(got[1], want[1], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=1e-4)


def test_non_contiguous_input_and_grad():
    x, w, dy = _inputs((6, 2 * 48), torch.float32, seed=4)
    xs, dys = x[:, ::2], dy[:, 1::2]  # stride 2 along D
    got = _run(rms_norm, xs, w[:48], dys)
    want = _run(rms_norm_ref, xs.double(), w[:48].double(), dys.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_only_weight_or_only_input_grad_and_empty():
    x, w, dy = _inputs((4, 48), torch.float32, seed=5)
    wl = w.clone().requires_grad_()
    rms_norm(x, wl).backward(dy)
    assert wl.grad is not None
    xl = x.clone().requires_grad_()
    rms_norm(xl, w).backward(dy)
    assert xl.grad is not None
    xe, we = x[:0].clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(xe, we)
    y.sum().backward()
    assert y.shape == (0, 48) and torch.count_nonzero(we.grad) == 0
    with pytest.raises(ValueError, match="weight"):
        RMSNormFunction.apply(x, w[:5], 1e-6)


@cuda_only
@pytest.mark.parametrize("shape", [(257, 4096), (37, 123), (64, 5120)], ids=str)
def test_bf16_no_worse_than_torch(shape):
    x, w, dy = _inputs(shape, torch.bfloat16, seed=8)
    want = _run(rms_norm_ref, x.double(), w.double(), dy.double())
    tb = _run(rms_norm_ref, x, w, dy)
    got = _run(rms_norm, x, w, dy)
    for g, t, r in zip(got, tb, want):
        assert g.dtype == torch.bfloat16
        assert _err(g, r) <= 2 * _err(t, r) + 1e-2 * r.abs().max().item(), (_err(g, r), _err(t, r))
