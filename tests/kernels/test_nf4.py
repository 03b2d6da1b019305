"""NF4 dequantisation (Triton kernel and torch reference) against bitsandbytes, bit for bit.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1). The
interpreter rounds float32 -> bfloat16 by truncation (its "rtne" path does not carry either), so there
the kernel's bf16 output is only checked to within one bf16 ulp (which still catches any indexing or
nibble-order mistake), and the bit-exact bf16 kernel test runs on CUDA; the reference is bit-exact in
every dtype everywhere.
"""

import pytest
import torch
from helpers import CUDA, DEVICE

bnbF = pytest.importorskip("bitsandbytes.functional")

from fastsft.kernels import nf4 as nf4_mod  # noqa: E402
from fastsft.kernels.nf4 import NF4_CODE, nf4_dequantize, nf4_dequantize_ref  # noqa: E402

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter truncates fp32 -> bf16)")

# (96, 200): 300 blocks, so 2 second-level blocks, the last short; (37, 128): 74 blocks; (33, 50): n not a
# multiple of 64 (ragged last block); (5, 7): odd n (last byte half used, bnb's odd-last-dim path)
SHAPES = [(96, 200), (37, 128), (33, 50), (5, 7)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _quantize(shape, dtype, double_quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    w.view(-1)[:3] = torch.tensor([0.0, 1.5, -2.0], dtype=dtype)[: w.numel()]  # an outlier block
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    expected = bnbF.dequantize_4bit(packed, qs, quant_type="nf4")
    return packed, qs, expected


def _args(qs, device="cpu"):
    kw = dict(code=qs.code.to(device), blocksize=qs.blocksize)
    if qs.nested:
        kw.update(nested_absmax=qs.state2.absmax.to(device), nested_code=qs.state2.code.to(device),
                  offset=qs.offset.to(device), nested_blocksize=qs.state2.blocksize)
    return kw


def _bits(t):
    return t.contiguous().view(torch.uint8)


def test_code_table_is_bnbs():
    assert torch.equal(torch.tensor(NF4_CODE, dtype=torch.float32), bnbF.get_4bit_type("nf4", device="cpu"))


def test_nibble_order_high_first():
    # element 0 -> high nibble, element 1 -> low nibble (bnb: packed = q[0::2] << 4 | q[1::2])
    w = torch.tensor([[-1.0, 1.0] + [0.0] * 62])
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert packed.reshape(-1)[0].item() == (0 << 4) | 15
    out = nf4_dequantize_ref(packed, qs.absmax, w.shape, torch.float32)
    assert torch.equal(out, w)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ref_bit_exact_vs_bnb(shape, dtype, double_quant):
    packed, qs, expected = _quantize(shape, dtype, double_quant)
    assert qs.nested == double_quant
    got = nf4_dequantize_ref(packed, qs.absmax, shape, dtype, **_args(qs))
    assert got.dtype == dtype and got.shape == expected.shape
    assert torch.equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_bit_exact_vs_bnb(shape, dtype, double_quant):
    packed, qs, expected = _quantize(shape, dtype, double_quant)
    got = nf4_dequantize(packed.to(DEVICE), qs.absmax.to(DEVICE), shape, dtype, **_args(qs, DEVICE))
    assert torch.equal(_bits(got.cpu()), _bits(expected))


def test_kernel_several_programs(monkeypatch):
    # 32-byte programs: 64 weights each, so (96, 200) runs 150 programs and (33, 50) ends in a ragged one
    monkeypatch.setattr(nf4_mod, "BLOCK_SIZE", 32)
    for shape in [(96, 200), (33, 50)]:
        packed, qs, expected = _quantize(shape, torch.float32, True, seed=1)
        got = nf4_dequantize(packed.to(DEVICE), qs.absmax.to(DEVICE), shape, torch.float32, **_args(qs, DEVICE))
        assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 200), (5, 7)])
def test_kernel_bf16(shape, double_quant):
    packed, qs, expected = _quantize(shape, torch.bfloat16, double_quant)
    got = nf4_dequantize(packed.to(DEVICE), qs.absmax.to(DEVICE), shape, torch.bfloat16, **_args(qs, DEVICE)).cpu()
    if CUDA:
        assert torch.equal(_bits(got), _bits(expected))
    else:
        # one bf16 ulp of the exact value at most (interpreter truncation), never a different weight
        exact = nf4_dequantize_ref(packed, qs.absmax, shape, torch.float32, **_args(qs))
        ulp = torch.where(exact == 0, torch.zeros_like(exact), exact.abs() * 2.0**-7)
        assert ((got.float() - exact).abs() <= ulp).all()
        # and the kernel's float32 arithmetic, rounded by torch, is bnb's bf16 output exactly
        f32 = nf4_dequantize(packed, qs.absmax, shape, torch.float32, **_args(qs))
        assert torch.equal(_bits(f32.to(torch.bfloat16)), _bits(expected))


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_bit_exact_vs_bnb_cuda_large(dtype):
    # bnb's own CUDA quantiser and dequantiser, a projection-sized weight
    w = torch.randn(1024, 4096, device="cuda", dtype=dtype) * 0.02
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = bnbF.dequantize_4bit(packed, qs, quant_type="nf4")
    got = nf4_dequantize(packed, qs.absmax, w.shape, dtype, **_args(qs, "cuda"))
    assert torch.equal(_bits(got), _bits(expected))


def test_argument_checks():
    packed, qs, _ = _quantize((8, 64), torch.float32, True)
    with pytest.raises(ValueError, match="nested_absmax"):
        nf4_dequantize_ref(packed, qs.absmax, (8, 64), torch.float32)
    with pytest.raises(ValueError, match="cannot hold"):
        nf4_dequantize_ref(packed, qs.absmax, (8, 66), torch.float32, **_args(qs))
    with pytest.raises(ValueError, match="only supports"):
        nf4_dequantize(packed, qs.absmax, (8, 64), torch.int32, **_args(qs))
