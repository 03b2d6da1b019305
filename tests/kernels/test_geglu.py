"""The Triton GeGLU against ``geglu_ref``, forward and backward.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Element counts are not multiples of the 1024 tile, so the last program is masked.
"""

import math

import pytest
import torch
from helpers import CUDA, DEVICE
from helpers import max_abs_err as _err

from fastsft.kernels import geglu as geglu_mod
from fastsft.kernels.geglu import GeGLUFunction, geglu, geglu_ref

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 in Triton's interpreter is unreliable)")


def _gelu_tanh(x):
    return torch.nn.functional.gelu(x, approximate="tanh")


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=g) * 4  # well into both tails of the tanh
    up = torch.randn(shape, generator=g)
    dy = torch.randn(shape, generator=g)
    return gate.to(DEVICE, dtype), up.to(DEVICE, dtype), dy.to(DEVICE)


def _run(fn, gate, up, dy):
    gate, up = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y = fn(gate, up)
    y.backward(dy.to(y.dtype))
    return y, gate.grad, up.grad


def test_ref_matches_float64_formula():
    gate, up, dy = _inputs((7, 33), torch.float64)
    a, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    want = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3))) * u
    want.backward(dy)
    for x, w in zip(_run(geglu_ref, gate, up, dy), (want, a.grad, u.grad)):
        torch.testing.assert_close(x, w, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape", [(37, 48), (3, 5, 123), (2, 1100), (1,)], ids=str)
def test_fp32_matches_ref(shape):
    gate, up, dy = _inputs(shape, torch.float32, seed=sum(shape))
    got = _run(geglu, gate, up, dy)
    want = _run(geglu_ref, gate.double(), up.double(), dy.double())
    assert got[0].dtype == torch.float32 and got[0].shape == gate.shape
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_fp16_no_worse_than_torch():
    gate, up, dy = _inputs((37, 100), torch.float16, seed=3)
    want = _run(geglu_ref, gate.double(), up.double(), dy.double())
    torch16 = _run(lambda a, b: _gelu_tanh(a) * b, gate, up, dy)  # eager fp16, as HF runs it
    got = _run(geglu, gate, up, dy)
    for g, t, r in zip(got, torch16, want):
        assert g.dtype == torch.float16
        assert _err(g, r) <= 2 * _err(t, r) + 1e-3 * r.abs().max().item(), (_err(g, r), _err(t, r))


def test_non_contiguous_halves_of_a_fused_projection():
    gate_up, _, dy = _inputs((9, 2 * 48), torch.float32, seed=4)
    gate, up = gate_up.chunk(2, dim=-1)  # views with row stride 96
    got = _run(geglu, gate, up, dy[:, :48])
    want = _run(geglu_ref, gate.double(), up.double(), dy[:, :48].double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_large_magnitudes_are_finite_and_exact():
    # the tanh saturates: gelu(a) -> a (gradient 1) for a >> 0 and -> 0 (gradient 0) for a << 0; a^3
    # reaches 1e12 and exp(+-|z|) would overflow a naive float32 formula
    gate = torch.tensor([30.0, -30.0, 1e4, -1e4, 11.0, -11.0, 6.0, -6.0, 0.0, -0.5], device=DEVICE)
    up = torch.linspace(-2, 3, gate.numel(), device=DEVICE)
    dy = torch.linspace(1, -1.5, gate.numel(), device=DEVICE)
    got = _run(geglu, gate, up, dy)
    want = _run(geglu_ref, gate.double(), up.double(), dy.double())
    for a, b in zip(got, want):
        assert torch.isfinite(a).all(), a
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)
    y, dgate, dup = got
    torch.testing.assert_close(y[[0, 2]], gate[[0, 2]] * up[[0, 2]])
    torch.testing.assert_close(dgate[[0, 2]], (dy * up)[[0, 2]])
    assert (y[[1, 3]] == 0).all() and (dgate[[1, 3]] == 0).all() and (dup[[1, 3]] == 0).all()


def test_saves_only_inputs_and_partial_grads():
    gate, up, dy = _inputs((4, 48), torch.float32, seed=5)
    g = gate.clone().requires_grad_()
    y = geglu(g, up)
    assert len(y.grad_fn.saved_tensors) == 2
    y.backward(dy)
    assert g.grad is not None and up.grad is None
    with pytest.raises(ValueError, match="same shape"):
        GeGLUFunction.apply(gate, up[:, :5])
    assert geglu(gate[:0], up[:0]).shape == (0, 48)
    assert geglu_mod.BLOCK_SIZE == 1024


def test_empty_tensors_forward_and_backward():
    gate = torch.empty(0, 48, device=DEVICE).requires_grad_()
    up = torch.empty(0, 48, device=DEVICE).requires_grad_()
    y = geglu(gate, up)
    y.backward(torch.empty_like(y))
    assert y.shape == gate.grad.shape == up.grad.shape == (0, 48)


@cuda_only
@pytest.mark.parametrize("shape", [(257, 14336), (37, 123)], ids=str)
def test_bf16_no_worse_than_torch(shape):
    gate, up, dy = _inputs(shape, torch.bfloat16, seed=8)
    want = _run(geglu_ref, gate.double(), up.double(), dy.double())
    tb = _run(lambda a, b: _gelu_tanh(a) * b, gate, up, dy)
    got = _run(geglu, gate, up, dy)
    for g, t, r in zip(got, tb, want):
        assert g.dtype == torch.bfloat16
        assert _err(g, r) <= 2 * _err(t, r) + 1e-2 * r.abs().max().item(), (_err(g, r), _err(t, r))
