"""Fused LoRA projections (``fastsft.kernels.lora``) against plain autograd, forward and backward.

Each op is checked against its float64 ``_ref`` (fp32 tight, fp16 loose), against the separate
``LoRALinear`` modules it replaces, and for what it keeps: the weight provider is called again in the
backward and no saved tensor has a dense W's shape.
"""

import pytest
import torch
from torch import nn

from fastsft.kernels.lora import (
    LoRAProj,
    lora_linear,
    lora_linear_ref,
    lora_mlp,
    lora_mlp_ref,
    lora_proj,
    lora_qkv,
    lora_qkv_ref,
)
from fastsft.model.lora import LoRALinear

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 2e-2)}
# awkward shapes: 37 tokens (as [1, 37] and [37]), hidden 48, q 100, kv 20, intermediate 72
N, H, OUT, KV, INTER = 37, 48, 100, 20, 72


class CountingProvider:
    """An NF4-like base: ``dequantize()`` returns a fresh dense copy and counts its calls."""

    def __init__(self, w):
        self.w = w
        self.calls = 0

    def dequantize(self):
        self.calls += 1
        return self.w.clone()


def _lora(in_f, out_f, r, dtype, gen):
    a = (torch.randn(r, in_f, generator=gen) / in_f**0.5).to(dtype).requires_grad_()
    b = (torch.randn(out_f, r, generator=gen) / r**0.5).to(dtype).requires_grad_()
    return a, b


def _base(in_f, out_f, dtype, gen, bias=True):
    w = (torch.randn(out_f, in_f, generator=gen) / in_f**0.5).to(dtype)
    b = (torch.randn(out_f, generator=gen) * 0.1).to(dtype) if bias else None
    return w, b


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def _close(got, want, dtype, what):
    # atol relative to the tensor's largest entry: gradients summed over 37 tokens reach ~1e2, and
    # entries that cancel to ~1e-1 carry the rounding of their big summands
    atol, rtol = TOL[dtype]
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want.double(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------------------------------
# lora_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [8, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_ref(dtype, r, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, N, H, generator=gen).to(dtype).requires_grad_()
    w, b = _base(H, OUT, dtype, gen, bias)
    a, bb = _lora(H, OUT, r, dtype, gen)
    s = 2.0
    provider = CountingProvider(w)
    y = lora_linear(x, provider, b, a, bb, s)
    assert provider.calls == 1
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    y.backward(dy)
    assert provider.calls == 2  # re-materialised once in the backward

    x64, a64, b64 = _f64(x), _f64(a), _f64(bb)
    y64 = lora_linear_ref(x64, w.double(), _f64(b), a64, b64, s)
    y64.backward(dy.double())
    assert y.shape == y64.shape and y.dtype == dtype
    _close(y, y64, dtype, "y")
    _close(x.grad, x64.grad, dtype, "dx")
    _close(a.grad, a64.grad, dtype, "dA")
    _close(bb.grad, b64.grad, dtype, "dB")


def test_lora_linear_dense_tensor_and_callable_providers():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, H, generator=gen, requires_grad=True)
    w, b = _base(H, OUT, torch.float32, gen)
    a, bb = _lora(H, OUT, 8, torch.float32, gen)
    outs = []
    for provider in (w, lambda: w.clone()):
        for t in (x, a, bb):
            t.grad = None
        y = lora_linear(x, provider, b, a, bb, 0.5)
        y.sum().backward()
        outs.append((y.detach(), x.grad.clone(), a.grad.clone(), bb.grad.clone()))
    for u, v in zip(*outs):
        torch.testing.assert_close(u, v)
    assert w.grad is None and b.grad is None and not w.requires_grad and not b.requires_grad


def test_frozen_base_required():
    x = torch.randn(3, 4)
    a, b = torch.randn(2, 4, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, torch.randn(5, 4, requires_grad=True), None, a, b, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, torch.randn(5, 4), torch.randn(5, requires_grad=True), a, b, 1.0)
    with pytest.raises(ValueError, match="shape"):
        lora_linear(x, torch.randn(4, 5), None, a, b, 1.0)


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return shapes, out


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_no_dense_weight_saved(dropout_p):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, H, generator=gen, requires_grad=True)
    w, b = _base(H, OUT, torch.float32, gen)
    a, bb = _lora(H, OUT, 8, torch.float32, gen)
    shapes, y = _saved_shapes(lambda: lora_linear(x, CountingProvider(w), b, a, bb, 2.0, dropout_p, True))
    assert not {(OUT, H), (H, OUT), (N, 8)} & set(shapes)  # neither W (nor W^T) nor x A^T
    # x, A, B, and with dropout one keep-mask of x's shape
    assert sorted(shapes) == sorted([(N, H), (8, H), (OUT, 8)] + ([(N, H)] if dropout_p else []))
    # the plain reference does save W (that is what the fused path avoids)
    ref_shapes, _ = _saved_shapes(lambda: lora_linear_ref(x, CountingProvider(w).dequantize(), b, a, bb, 2.0))
    assert (H, OUT) in ref_shapes or (OUT, H) in ref_shapes
    y.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_linear_dropout_matches_ref_with_same_seed(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, H, generator=gen).to(dtype).requires_grad_()
    w, b = _base(H, OUT, dtype, gen)
    a, bb = _lora(H, OUT, 8, dtype, gen)
    dy = torch.randn(N, OUT, generator=gen).to(dtype)
    x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, bb))
    torch.manual_seed(123)
    y = lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.3, training=True)
    y.backward(dy)
    torch.manual_seed(123)
    y2 = lora_linear_ref(x2, w, b, a2, b2, 2.0, dropout_p=0.3, training=True)
    y2.backward(dy)
    atol, rtol = TOL[dtype]
    for got, want in ((y, y2), (x.grad, x2.grad), (a.grad, a2.grad), (bb.grad, b2.grad)):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    # dropout really happened, and eval mode is deterministic (no dropout)
    assert not torch.allclose(y, lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.3, training=False))


# ----------------------------------------------------------------------------------------------------
# lora_qkv


def _qkv_params(dtype, r, gen, bias=True):
    outs = (OUT, KV, KV)
    bases = [_base(H, o, dtype, gen, bias) for o in outs]
    loras = [_lora(H, o, r, dtype, gen) for o in outs]
    return [w for w, _ in bases], [b for _, b in bases], [a for a, _ in loras], [b for _, b in loras]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [8, 1])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_lora_qkv_matches_ref(dtype, r, dropout_p):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, N, H, generator=gen).to(dtype).requires_grad_()
    ws, bs, As, Bs = _qkv_params(dtype, r, gen)
    providers = [CountingProvider(w) for w in ws]
    dys = [torch.randn(1, N, o, generator=gen).to(dtype) for o in (OUT, KV, KV)]

    torch.manual_seed(7)
    shapes, outs = _saved_shapes(lambda: lora_qkv(x, providers, bs, As, Bs, 1.5, dropout_p, True))
    assert all(p.calls == 1 for p in providers)
    torch.autograd.backward(outs, dys)
    assert all(p.calls == 2 for p in providers)
    assert not {(o, H) for o in (OUT, KV)} & set(shapes) and not {(H, o) for o in (OUT, KV)} & set(shapes)
    assert shapes.count((1 * N, H)) == 1 + (3 if dropout_p else 0)  # x once (+ 3 keep-masks)

    x64 = _f64(x)
    A64, B64 = [_f64(a) for a in As], [_f64(b) for b in Bs]
    torch.manual_seed(7)
    refs = lora_qkv_ref(x64, [w.double() for w in ws], [b.double() for b in bs], A64, B64, 1.5, dropout_p, True)
    torch.autograd.backward(refs, [d.double() for d in dys])
    for o, ref, name in zip(outs, refs, "qkv"):
        _close(o, ref, dtype, name)
    _close(x.grad, x64.grad, dtype, "dx")
    for j, name in enumerate("qkv"):
        _close(As[j].grad, A64[j].grad, dtype, f"dA_{name}")
        _close(Bs[j].grad, B64[j].grad, dtype, f"dB_{name}")


def test_lora_qkv_matches_lora_linear_modules():
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5)
    mods = [LoRALinear(nn.Linear(H, o, bias=True), r=8, alpha=16, generator=gen) for o in (OUT, KV, KV)]
    with torch.no_grad():
        for m in mods:
            m.lora_B.weight.normal_()  # B=0 at init would hide half the gradients
    x = torch.randn(2, N, H, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    projs = [lora_proj(m) for m in mods]
    outs = lora_qkv(x, [p.weight for p in projs], [p.bias for p in projs],
                    [p.lora_A for p in projs], [p.lora_B for p in projs], mods[0].scaling)
    (sum(o.square().sum() for o in outs)).backward()
    fused = [(m.lora_A.weight.grad.clone(), m.lora_B.weight.grad.clone()) for m in mods]
    for m in mods:
        m.zero_grad()
    refs = [m(x2) for m in mods]
    (sum(o.square().sum() for o in refs)).backward()
    for o, ref, name in zip(outs, refs, "qkv"):
        _close(o, ref, torch.float32, name)
    _close(x.grad, x2.grad, torch.float32, "dx")
    for m, (da, db) in zip(mods, fused):
        _close(da, m.lora_A.weight.grad, torch.float32, "dA")
        _close(db, m.lora_B.weight.grad, torch.float32, "dB")
        assert m.base_layer.weight.grad is None and m.base_layer.bias.grad is None


# ----------------------------------------------------------------------------------------------------
# lora_mlp


def _mlp_params(dtype, r, gen, bias):
    dims = ((H, INTER), (H, INTER), (INTER, H))
    return [LoRAProj(*_base(i, o, dtype, gen, bias)[:1], *_lora(i, o, r, dtype, gen),
                     _base(i, o, dtype, gen, bias)[1]) for i, o in dims]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [8, 1])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_lora_mlp_matches_ref(dtype, r, dropout_p):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(N, H, generator=gen).to(dtype).requires_grad_()
    projs = _mlp_params(dtype, r, gen, bias=dropout_p > 0)
    counting = [p._replace(weight=CountingProvider(p.weight)) for p in projs]
    dy = torch.randn(N, H, generator=gen).to(dtype)

    torch.manual_seed(8)
    shapes, y = _saved_shapes(lambda: lora_mlp(x, *counting, 0.75, dropout_p, True))
    assert all(p.weight.calls == 1 for p in counting)
    y.backward(dy)
    assert all(p.weight.calls == 2 for p in counting)
    assert (INTER, H) not in shapes and (H, INTER) not in shapes  # no dense W
    # x, g, u (+ keep-masks for gate, up: [N, H]; down: [N, INTER]); silu(g) * u is not saved
    assert sorted(s for s in shapes if s[0] == N) == sorted(
        [(N, H), (N, INTER), (N, INTER)] + ([(N, H), (N, H), (N, INTER)] if dropout_p else [])
    )

    x64 = _f64(x)
    p64 = [LoRAProj(p.weight.double(), _f64(p.lora_A), _f64(p.lora_B), _f64(p.bias)) for p in projs]
    torch.manual_seed(8)
    y64 = lora_mlp_ref(x64, *p64, 0.75, dropout_p, True)
    y64.backward(dy.double())
    _close(y, y64, dtype, "y")
    _close(x.grad, x64.grad, dtype, "dx")
    for name, p, q in zip(("gate", "up", "down"), projs, p64):
        _close(p.lora_A.grad, q.lora_A.grad, dtype, f"dA_{name}")
        _close(p.lora_B.grad, q.lora_B.grad, dtype, f"dB_{name}")


def test_lora_mlp_matches_lora_linear_modules():
    gen = torch.Generator().manual_seed(9)
    gate, up, down = (LoRALinear(nn.Linear(i, o, bias=False), r=4, alpha=8, generator=gen)
                      for i, o in ((H, INTER), (H, INTER), (INTER, H)))
    mods = (gate, up, down)
    with torch.no_grad():
        for m in mods:
            m.lora_B.weight.normal_()
    x = torch.randn(3, N, H, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = lora_mlp(x, *(lora_proj(m) for m in mods), gate.scaling)
    y.square().sum().backward()
    fused = [(m.lora_A.weight.grad.clone(), m.lora_B.weight.grad.clone()) for m in mods]
    for m in mods:
        m.zero_grad()
    y2 = down(torch.nn.functional.silu(gate(x2)) * up(x2))
    y2.square().sum().backward()
    _close(y, y2, torch.float32, "y")
    _close(x.grad, x2.grad, torch.float32, "dx")
    for m, (da, db) in zip(mods, fused):
        _close(da, m.lora_A.weight.grad, torch.float32, "dA")
        _close(db, m.lora_B.weight.grad, torch.float32, "dB")
        assert m.base_layer.weight.grad is None


def test_input_without_grad_skips_base_backward():
    """Only the adapters train (e.g. the first layer's input): W is not re-materialised for dx."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(N, H, generator=gen)
    w, _ = _base(H, OUT, torch.float32, gen)
    a, bb = _lora(H, OUT, 8, torch.float32, gen)
    provider = CountingProvider(w)
    lora_linear(x, provider, None, a, bb, 1.0).sum().backward()
    assert provider.calls == 1 and a.grad is not None and bb.grad is not None
    a2, b2 = a.detach().clone().requires_grad_(), bb.detach().clone().requires_grad_()
    lora_linear_ref(x, w, None, a2, b2, 1.0).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(bb.grad, b2.grad)
