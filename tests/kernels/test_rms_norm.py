"""The Triton RMSNorm against ``rms_norm_ref`` (HF LlamaRMSNorm, or with ``unit_offset`` HF Gemma2RMSNorm),
forward and backward.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Shapes stay small: odd row counts and hidden sizes that are not powers of two (masked tails).
"""

import pytest
import torch
from helpers import CUDA, DEVICE
from helpers import max_abs_err as _err

from fastsft.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_ref

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 in Triton's interpreter is unreliable)")


def _inputs(shape, dtype, seed=0, w_dtype=None, w_mean=1.0, w_std=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 0.5
    w = w_mean + w_std * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    return x.to(DEVICE, dtype), w.to(DEVICE, w_dtype or dtype), dy.to(DEVICE)


def _gemma_inputs(shape, dtype, seed=0, w_dtype=None, near_minus_one=False):
    """Gemma's weights start at 0 (the scale is 1 + w); ``near_minus_one``: w ~ -1, so 1 + w ~ 0, with
    some exactly -1 (a zero scale) and some of either sign."""
    if not near_minus_one:
        return _inputs(shape, dtype, seed, w_dtype, w_mean=0.0)
    x, w, dy = _inputs(shape, dtype, seed, w_dtype, w_mean=-1.0, w_std=0.01)
    w[::5] = -1.0
    return x, w, dy


def _run(fn, x, w, dy, eps=1e-6, **kw):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, eps, **kw)
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


def test_unit_offset_ref_matches_float64_formula_and_gemma2():
    x, w, dy = _gemma_inputs((5, 37), torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = xr / torch.sqrt((xr * xr).mean(-1, keepdim=True) + 1e-5) * (1 + wr)
    want.backward(dy)
    got = _run(rms_norm_ref, x, w, dy, eps=1e-5, unit_offset=True)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, (want, xr.grad, wr.grad)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    # transformers' module, forward and gradients, in float32 (it computes in float32 whatever x is)
    hf = Gemma2RMSNorm(37, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        hf.weight.copy_(w.float())
    x32, dy32 = x.float().requires_grad_(), dy.float()
    y_hf = hf(x32)
    y_hf.backward(dy32)
    got32 = _run(rms_norm_ref, x.float(), w.float(), dy32, eps=1e-5, unit_offset=True)
    assert got32[0].dtype == torch.float32
    for a, b in zip(got32, (y_hf, x32.grad, hf.weight.grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert torch.equal(got32[0], y_hf)
    # and its casts: fp16 or bf16 x with a float32 weight gives x's dtype, bit for bit HF's
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            xl = x.to(dtype)
            want = hf(xl)
            assert want.dtype == dtype
            assert torch.equal(rms_norm_ref(xl, w.float(), 1e-5, unit_offset=True), want)


@pytest.mark.parametrize("shape", [(37, 48), (37, 100), (3, 7, 123), (1, 64), (2, 1, 5)], ids=str)
def test_fp32_matches_ref(shape):
    x, w, dy = _inputs(shape, torch.float32, seed=shape[-1])
    got = _run(rms_norm, x, w, dy)
    want = _run(rms_norm_ref, x.double(), w.double(), dy.double())
    assert got[0].dtype == torch.float32 and got[0].shape == x.shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("near_minus_one", [False, True], ids=["w~0", "w~-1"])
@pytest.mark.parametrize("shape", [(37, 48), (37, 100), (3, 7, 123), (1, 123), (1, 64), (2, 1, 5)], ids=str)
def test_unit_offset_fp32_matches_ref(shape, near_minus_one):
    x, w, dy = _gemma_inputs(shape, torch.float32, seed=shape[-1], near_minus_one=near_minus_one)
    got = _run(rms_norm, x, w, dy, unit_offset=True)
    want = _run(rms_norm_ref, x.double(), w.double(), dy.double(), unit_offset=True)
    assert got[0].dtype == torch.float32 and got[0].shape == x.shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_unit_offset_differs_from_llama():
    """The flag reaches the kernels: the same weight gives w xhat one way and (1 + w) xhat the other."""
    x, w, dy = _gemma_inputs((7, 100), torch.float32, seed=1)
    llama, gemma = _run(rms_norm, x, w, dy), _run(rms_norm, x, w, dy, unit_offset=True)
    torch.testing.assert_close(gemma[0], _run(rms_norm, x, 1 + w, dy)[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gemma[1], _run(rms_norm, x, 1 + w, dy)[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gemma[2], llama[2], atol=1e-5, rtol=1e-5)  # dw = sum dy xhat either way
    assert not torch.allclose(gemma[0], llama[0])


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


@pytest.mark.parametrize("near_minus_one", [False, True], ids=["w~0", "w~-1"])
@pytest.mark.parametrize("shape", [(37, 48), (5, 123), (1, 100), (2, 3, 77)], ids=str)
def test_unit_offset_fp16_no_worse_than_torch(shape, near_minus_one):
    x, w, dy = _gemma_inputs(shape, torch.float16, seed=7, near_minus_one=near_minus_one)
    want = _run(rms_norm_ref, x.double(), w.double(), dy.double(), unit_offset=True)
    torch16 = _run(rms_norm_ref, x, w, dy, unit_offset=True)
    got = _run(rms_norm, x, w, dy, unit_offset=True)
    for g, t, r in zip(got, torch16, want):
        assert g.dtype == torch.float16
        assert _err(g, r) <= 2 * _err(t, r) + 1e-3 * r.abs().max().item(), (_err(g, r), _err(t, r))
    torch.testing.assert_close(got[0], torch16[0], atol=1e-3, rtol=1e-3)
    # one rounding each (xhat (1 + w) in float32, then to fp16): bitwise but where r's last bit differs.
    # Rounding xhat to fp16 first, as Llama does, changes ~20% of the outputs.
    assert (got[0] != torch16[0]).double().mean().item() <= 0.01


def test_fp16_input_fp32_weight_promotes_like_hf():
    x, w, dy = _inputs((9, 100), torch.float16, seed=3, w_dtype=torch.float32)
    got, want = _run(rms_norm, x, w, dy), _run(rms_norm_ref, x, w, dy)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float16 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)  # the same rounding of xhat
    torch.testing.assert_close(got[1], want[1], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=1e-4)


def test_unit_offset_fp16_input_fp32_weight_keeps_x_dtype_like_hf():
    # Gemma's .type_as(x): the output stays fp16 where Llama's promotes to the weight's float32
    x, w, dy = _gemma_inputs((9, 100), torch.float16, seed=3, w_dtype=torch.float32)
    got, want = _run(rms_norm, x, w, dy, unit_offset=True), _run(rms_norm_ref, x, w, dy, unit_offset=True)
    assert got[0].dtype == torch.float16 and got[1].dtype == torch.float16 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got[1], want[1], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=1e-4)
    # the reverse: an fp16 weight on float32 x gives float32 and an fp16 dw
    x, w, dy = _gemma_inputs((9, 100), torch.float32, seed=3, w_dtype=torch.float16)
    got, want = _run(rms_norm, x, w, dy, unit_offset=True), _run(rms_norm_ref, x, w, dy, unit_offset=True)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float16
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_non_contiguous_input_and_grad(unit_offset):
    x, w, dy = _inputs((6, 2 * 48), torch.float32, seed=4)
    xs, dys = x[:, ::2], dy[:, 1::2]  # stride 2 along D
    got = _run(rms_norm, xs, w[:48], dys, unit_offset=unit_offset)
    want = _run(rms_norm_ref, xs.double(), w[:48].double(), dys.double(), unit_offset=unit_offset)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
def test_only_weight_or_only_input_grad_and_empty(unit_offset):
    x, w, dy = _inputs((4, 48), torch.float32, seed=5)
    wl = w.clone().requires_grad_()
    rms_norm(x, wl, unit_offset=unit_offset).backward(dy)
    assert wl.grad is not None
    xl = x.clone().requires_grad_()
    rms_norm(xl, w, unit_offset=unit_offset).backward(dy)
    assert xl.grad is not None
    xe, we = x[:0].clone().requires_grad_(), w.clone().requires_grad_()
    y = rms_norm(xe, we, unit_offset=unit_offset)
    y.sum().backward()
    assert y.shape == (0, 48) and torch.count_nonzero(we.grad) == 0
    with pytest.raises(ValueError, match="weight"):
        RMSNormFunction.apply(x, w[:5], 1e-6, unit_offset)


@cuda_only
@pytest.mark.parametrize("unit_offset", [False, True], ids=["llama", "gemma"])
@pytest.mark.parametrize("shape", [(257, 4096), (37, 123), (64, 5120)], ids=str)
def test_bf16_no_worse_than_torch(shape, unit_offset):
    make = _gemma_inputs if unit_offset else _inputs
    x, w, dy = make(shape, torch.bfloat16, seed=8)
    want = _run(rms_norm_ref, x.double(), w.double(), dy.double(), unit_offset=unit_offset)
    tb = _run(rms_norm_ref, x, w, dy, unit_offset=unit_offset)
    got = _run(rms_norm, x, w, dy, unit_offset=unit_offset)
    for g, t, r in zip(got, tb, want):
        assert g.dtype == torch.bfloat16
        assert _err(g, r) <= 2 * _err(t, r) + 1e-2 * r.abs().max().item(), (_err(g, r), _err(t, r))
