"""NF4Linear: bnb-exact dequantisation, forward/backward, bnb-compatible state dicts, LoRA on top."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnbF = pytest.importorskip("bitsandbytes.functional")

from fastsft.model.lora import LoRALinear  # noqa: E402
from fastsft.model.nf4 import QUANT_STATE_KEY, NF4Linear  # noqa: E402

CUDA = torch.cuda.is_available()


def _linear(in_f=200, out_f=96, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _bnb_dense(linear, dtype, double_quant=True):
    w = linear.weight.detach().to(dtype)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    return packed, qs, bnbF.dequantize_4bit(packed, qs, quant_type="nf4")


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_linear_matches_bnb(dtype, double_quant):
    lin = _linear()
    q = NF4Linear.from_linear(lin, dtype, double_quant=double_quant)
    packed, qs, dense = _bnb_dense(lin, dtype, double_quant)
    assert q.double_quant == double_quant and q.weight.dtype == torch.uint8
    assert torch.equal(q.weight, packed)
    w = q.dequantize()
    assert w.dtype == dtype and torch.equal(w.view(torch.uint8), dense.view(torch.uint8))
    if dtype == torch.float32:  # the Triton path (interpreter on CPU; bf16 there: tests/kernels/test_nf4.py)
        assert torch.equal(q.dequantize(use_kernel=True), w)
    x = torch.randn(3, 5, 200).to(dtype)
    assert torch.equal(q(x), F.linear(x, dense, lin.bias.detach().to(dtype)))  # x @ dense.T + b


def test_forward_backward_no_weight_grad():
    lin = _linear(bias=False)
    q = NF4Linear.from_linear(lin, torch.float32)
    _, _, dense = _bnb_dense(lin, torch.float32)
    x = torch.randn(4, 200, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    g = torch.randn(4, 96)
    q(x).backward(g)
    (x_ref @ dense.T).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in q.parameters())
    assert all(b.grad is None for b in q.buffers())


def test_dtype_cast_keeps_quant_state():
    q = NF4Linear.from_linear(_linear(), torch.float32)
    before = q.dequantize()
    q.to(torch.bfloat16)
    assert q.nested_absmax.dtype == torch.float32 and q.quant_map.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16
    assert torch.equal(q.dequantize(), before)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_matches_bnb_as_dict(double_quant):
    lin = _linear()
    q = NF4Linear.from_linear(lin, torch.bfloat16, double_quant=double_quant)
    sd = q.state_dict()
    _, qs, _ = _bnb_dense(lin, torch.bfloat16, double_quant)
    expected = {"weight", "bias"} | {f"weight.{k}" for k in qs.as_dict(packed=True)}
    assert set(sd) == expected
    if double_quant:
        assert {"weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                f"weight.{QUANT_STATE_KEY}"} <= set(sd)
    for k, v in qs.as_dict(packed=True).items():  # same tensors, same JSON bytes
        assert torch.equal(sd[f"weight.{k}"], v), k
    meta = json.loads(bytes(sd[f"weight.{QUANT_STATE_KEY}"].numpy()))
    assert meta["shape"] == [96, 200] and meta["dtype"] == "bfloat16" and meta["quant_type"] == "nf4"


def test_round_trip_through_bnb_quant_state():
    lin = _linear(in_f=128, out_f=37)
    packed, qs, dense = _bnb_dense(lin, torch.bfloat16)
    # QuantState -> as_dict(packed=True) -> from_dict -> NF4Linear -> state_dict -> QuantState.from_dict
    qs2 = bnbF.QuantState.from_dict(qs.as_dict(packed=True), device=torch.device("cpu"))
    q = NF4Linear.from_quantized_state(packed, qs2, bias=lin.bias)
    assert torch.equal(q.dequantize().view(torch.uint8), dense.view(torch.uint8))
    sd = q.state_dict()
    qs3 = bnbF.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")},
                                    device=torch.device("cpu"))
    assert qs3 == qs
    assert torch.equal(bnbF.dequantize_4bit(sd["weight"], qs3, quant_type="nf4").view(torch.uint8),
                       dense.view(torch.uint8))
    # and a checkpoint-style packed dict (prefixed keys) straight into from_quantized_state
    q2 = NF4Linear.from_quantized_state(sd["weight"], {k: v for k, v in sd.items() if k != "weight"})
    assert torch.equal(q2.dequantize(), q.dequantize())


@pytest.mark.parametrize("double_quant", [True, False])
def test_load_state_dict_into_empty_layer(double_quant):
    q = NF4Linear.from_linear(_linear(), torch.bfloat16, double_quant=double_quant)
    fresh = NF4Linear(200, 96, bias=True, compute_dtype=torch.bfloat16, double_quant=not double_quant)
    result = fresh.load_state_dict(q.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.double_quant == double_quant
    assert torch.equal(fresh.dequantize(), q.dequantize())
    with pytest.raises(RuntimeError, match="shape"):
        NF4Linear(100, 96, compute_dtype=torch.bfloat16).load_state_dict(q.state_dict())


def test_lora_over_nf4():
    lin = _linear(in_f=128, out_f=64)
    q = NF4Linear.from_linear(lin, torch.float32)
    lora = LoRALinear(q, r=4, alpha=8)
    assert lora.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(2, 3, 128, requires_grad=True)
    y = lora(x)
    dense = q.dequantize()
    expected = x @ dense.T + lin.bias.detach() + 2.0 * (x @ lora.lora_A.weight.T) @ lora.lora_B.weight.T
    torch.testing.assert_close(y, expected)
    y.square().sum().backward()
    assert lora.lora_A.weight.grad is not None and lora.lora_A.weight.grad.abs().sum() > 0
    assert lora.lora_B.weight.grad is not None and lora.lora_B.weight.grad.abs().sum() > 0
    assert x.grad is not None
    assert q.weight.grad is None and not q.weight.requires_grad and not q.bias.requires_grad
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    torch.testing.assert_close(lora.dense_base_weight(), dense)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_kernel_path():
    lin = _linear().cuda()
    q = NF4Linear.from_linear(lin, torch.bfloat16)
    assert q.weight.is_cuda
    _, qs, _ = _bnb_dense(lin, torch.bfloat16)
    qs.to("cuda")
    dense = bnbF.dequantize_4bit(q.weight, qs, quant_type="nf4")
    assert torch.equal(q.dequantize().view(torch.uint8), dense.view(torch.uint8))
