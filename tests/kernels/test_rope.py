"""The Triton RoPE against ``apply_rope_ref`` (HF rotate_half convention), forward and backward.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
Head dims 24 (half 12, a masked 16-wide tile) and 64; query heads 3 or 4 against 1 or 2 key heads.
"""

import pytest
import torch
from helpers import CUDA, DEVICE
from helpers import max_abs_err as _err

from fastsft.kernels.rope import RoPEFunction, apply_rope, apply_rope_ref

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (bf16 in Triton's interpreter is unreliable)")


def cos_sin(position_ids, hd, base=10000.0):
    """float32 cos/sin [..., T, hd] for integer positions, as HF's LlamaRotaryEmbedding builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    freqs = position_ids.double()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float().to(DEVICE), emb.sin().float().to(DEVICE)


def _inputs(lead, heads, kv_heads, hd, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, heads, hd, generator=g)
    k = torch.randn(*lead, kv_heads, hd, generator=g)
    dq = torch.randn(*lead, heads, hd, generator=g)
    dk = torch.randn(*lead, kv_heads, hd, generator=g)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), dq.to(DEVICE), dk.to(DEVICE)


def _run(fn, q, k, cos, sin, dq, dk):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_rot, k_rot = fn(q, k, cos, sin)
    torch.autograd.backward((q_rot, k_rot), (dq.to(q_rot.dtype), dk.to(k_rot.dtype)))
    return q_rot, k_rot, q.grad, k.grad


def test_ref_matches_complex_rotation_and_hf():
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 3, 0, 1, 100]])
    q, k, dq, dk = _inputs((2, 5), 3, 1, 24, torch.float64)
    cos, sin = cos_sin(pos, 24)
    got = _run(apply_rope_ref, q, k, cos.double(), sin.double(), dq, dk)
    # (x1 + i x2) e^{i theta}; the gradient of a rotation is the rotation by -theta
    theta = torch.complex(cos[..., :12].double(), sin[..., :12].double()).unsqueeze(-2)

    def rot(x, z):
        y = torch.complex(x[..., :12], x[..., 12:]) * z
        return torch.cat((y.real, y.imag), dim=-1)

    want = (rot(q, theta), rot(k, theta), rot(dq, theta.conj()), rot(dk, theta.conj()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf = apply_rotary_pos_emb(q, k, cos.double(), sin.double(), unsqueeze_dim=2)
    for a, b in zip(got[:2], hf):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


CASES = [  # (leading dims, H, Hkv, hd, cos batched)
    ((2, 37), 3, 1, 24, True),
    ((1, 9), 4, 2, 64, True),
    ((3, 5), 4, 4, 24, False),  # cos [T, hd] shared by the batch
    ((11,), 3, 1, 64, False),  # unbatched [T, H, hd]
]


@pytest.mark.parametrize("lead,heads,kv_heads,hd,batched_cos", CASES, ids=str)
def test_fp32_matches_ref(lead, heads, kv_heads, hd, batched_cos):
    q, k, dq, dk = _inputs(lead, heads, kv_heads, hd, torch.float32, seed=hd + heads)
    t = lead[-1]
    pos = torch.randint(0, 4096, lead if batched_cos else (t,), generator=torch.Generator().manual_seed(1))
    cos, sin = cos_sin(pos, hd)
    got = _run(apply_rope, q, k, cos, sin, dq, dk)
    want = _run(apply_rope_ref, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    for a, b, x in zip(got, want, (q, k, q, k)):
        assert a.dtype == torch.float32 and a.shape == x.shape
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_fp16_no_worse_than_torch():
    q, k, dq, dk = _inputs((2, 13), 3, 1, 24, torch.float16, seed=3)
    cos, sin = cos_sin(torch.randint(0, 2048, (2, 13), generator=torch.Generator().manual_seed(2)), 24)
    want = _run(apply_rope_ref, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    # HF's own fp16 path: cos/sin cast to fp16 by the rotary embedding, math in fp16
    torch16 = _run(_hf16, q, k, cos, sin, dq, dk)
    got = _run(apply_rope, q, k, cos, sin, dq, dk)
    for g, t, r in zip(got, torch16, want):
        assert g.dtype == torch.float16
        assert _err(g, r) <= 2 * _err(t, r) + 1e-3 * r.abs().max().item(), (_err(g, r), _err(t, r))


def _hf16(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=2)


def test_packed_rows_match_per_sequence():
    """One row packing sequences of 10, 7 and 5 tokens with restarting positions == each on its own."""
    lengths, hd = [10, 7, 5], 24
    q, k, dq, dk = _inputs((1, sum(lengths)), 3, 1, hd, torch.float32, seed=5)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = _run(apply_rope, q, k, *cos_sin(pos, hd), dq, dk)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = _run(apply_rope, q[:, sl], k[:, sl], *cos_sin(torch.arange(n)[None], hd), dq[:, sl], dk[:, sl])
        for a, b in zip(packed, alone):
            torch.testing.assert_close(a[:, sl], b, atol=0, rtol=0)
        start += n


def test_non_contiguous_inputs_are_not_modified():
    # q, k as strided views of a fused qkv projection ([B, T, (H + 2 Hkv) hd] viewed per head)
    q_all, _, dq, dk = _inputs((2, 6), 3 + 2, 1, 24, torch.float32, seed=6)
    q, k = q_all[:, :, :3], q_all[:, :, 3:4]
    before = q_all.clone()
    cos, sin = cos_sin(torch.arange(6)[None].expand(2, 6), 24)
    got = _run(apply_rope, q, k, cos, sin, dq[:, :, :3], dk)
    want = _run(apply_rope_ref, q.double(), k.double(), cos.double(), sin.double(), dq[:, :, :3].double(),
                dk.double())
    assert torch.equal(q_all, before)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-5)


def test_one_output_used_and_bad_shapes():
    q, k, _, _ = _inputs((2, 4), 3, 1, 24, torch.float32, seed=7)
    cos, sin = cos_sin(torch.arange(4)[None].expand(2, 4), 24)
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_rot, _ = apply_rope(ql, kl, cos, sin)
    q_rot.sum().backward()
    torch.testing.assert_close(kl.grad, torch.zeros_like(k))
    assert ql.grad.shape == q.shape
    with pytest.raises(ValueError, match="even"):
        RoPEFunction.apply(q[..., :23], k[..., :23], cos[..., :23], sin[..., :23])
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rope(q, k, cos[:, :3], sin[:, :3])


@cuda_only
@pytest.mark.parametrize("lead,heads,kv_heads,hd", [((2, 1024), 32, 8, 128), ((3, 37), 3, 1, 24)], ids=str)
def test_bf16_no_worse_than_torch(lead, heads, kv_heads, hd):
    q, k, dq, dk = _inputs(lead, heads, kv_heads, hd, torch.bfloat16, seed=8)
    cos, sin = cos_sin(torch.randint(0, 8192, lead, generator=torch.Generator().manual_seed(3)), hd)
    want = _run(apply_rope_ref, q.double(), k.double(), cos.double(), sin.double(), dq.double(), dk.double())
    tb = _run(_hf16, q, k, cos, sin, dq, dk)
    got = _run(apply_rope, q, k, cos, sin, dq, dk)
    for g, t, r in zip(got, tb, want):
        assert g.dtype == torch.bfloat16
        assert _err(g, r) <= 2 * _err(t, r) + 1e-2 * r.abs().max().item(), (_err(g, r), _err(t, r))
