"""Packed rows (cu_seqlens): no attention across sequence boundaries, for every architecture."""

import pytest
import torch

import fastsft.model.llama as llama
from fastsft.model import ModelConfig, build_model

ATOL = 1e-5
VOCAB = 97

_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)

CONFIGS = {
    "llama": dict(model_type="llama", rope_theta=500000.0),
    "llama3_rope": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    # window 4 is shorter than the 13- and 9-token sequences, so it bites inside them
    "mistral_sw": dict(model_type="mistral", sliding_window=4),
    # qkv bias; layer 0 full attention, layers 1.. windowed
    "qwen2_bias_sw": dict(model_type="qwen2", attention_bias=True, sliding_window=3, max_window_layers=1),
    "qwen3_qknorm": dict(model_type="qwen3", head_dim=16, num_key_value_heads=1),
}

_MODELS: dict = {}


def _model(kind):
    if kind not in _MODELS:
        m = build_model(ModelConfig(**{**_COMMON, **CONFIGS[kind]}), seed=0).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # move norms and biases off their init so they are exercised
            for name, p in m.named_parameters():
                if "norm" in name or name.endswith(".bias"):
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        _MODELS[kind] = m
    return _MODELS[kind]


def _seqs(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def _pack_rows(rows, T, pad_id=0):
    """rows: list (per row) of lists of 1-D token tensors. Returns ids [B,T], pos [B,T], cu over the
    flat B*T tokens. Unused row tails become a padding sequence, except after the last row."""
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    cu = [0]
    for b, seqs in enumerate(rows):
        t = 0
        for s in seqs:
            ids[b, t:t + len(s)] = s
            pos[b, t:t + len(s)] = torch.arange(len(s))
            t += len(s)
            cu.append(b * T + t)
        if t < T:
            pos[b, t:] = torch.arange(T - t)
            if b < B - 1:
                cu.append((b + 1) * T)  # explicit "padding sequence" closing the row
    return ids, pos, torch.tensor(cu, dtype=torch.int32)


def _solo(m, s):
    with torch.no_grad():
        return m(s[None])[0]


def _check_rows(m, rows, ids, hidden):
    T = ids.shape[1]
    for b, seqs in enumerate(rows):
        t = 0
        for s in seqs:
            ref = _solo(m, s)
            got = hidden[b, t:t + len(s)]
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
            torch.testing.assert_close(m.logits(got), m.logits(ref), atol=ATOL, rtol=0)
            t += len(s)
        assert t <= T


KINDS = list(CONFIGS)


@pytest.mark.parametrize("kind", KINDS)
def test_single_row_no_contamination(kind):
    m = _model(kind)
    rows = [_seqs([5, 13, 1, 9], seed=0)]
    ids, pos, cu = _pack_rows(rows, 28)
    with torch.no_grad():
        h = m(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=13)
        h_derived = m(ids, cu_seqlens=cu)  # position_ids / max_seqlen derived from cu_seqlens
        h_flat = m(ids[0], position_ids=pos[0], cu_seqlens=cu)  # 1-D row -> [T, D]
    assert h.shape == (1, 28, _COMMON["hidden_size"])
    _check_rows(m, rows, ids, h)
    torch.testing.assert_close(h_derived, h, atol=0, rtol=0)
    torch.testing.assert_close(h_flat, h[0], atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_two_packed_rows(kind):
    m = _model(kind)
    rows = [_seqs([5, 13, 1, 9], seed=1), _seqs([7, 2, 12, 4, 3], seed=2)]
    ids, pos, cu = _pack_rows(rows, 28)
    assert cu.tolist() == [0, 5, 18, 19, 28, 35, 37, 49, 53, 56]
    with torch.no_grad():
        h = m(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=13)
    _check_rows(m, rows, ids, h)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_no_nan(kind):
    m = _model(kind)
    # row 0: a padding sequence closes it in cu; row 1: trailing tokens past cu[-1]
    rows = [_seqs([5, 13], seed=3), _seqs([9, 1, 6], seed=4)]
    ids, pos, cu = _pack_rows(rows, 24)
    assert cu.tolist() == [0, 5, 18, 24, 33, 34, 40]
    with torch.no_grad():
        h = m(ids, position_ids=pos, cu_seqlens=cu)
        h_nopos = m(ids, cu_seqlens=cu)
    assert torch.isfinite(h).all() and torch.isfinite(m.logits(h)).all()
    _check_rows(m, rows, ids, h)
    torch.testing.assert_close(h_nopos, h, atol=0, rtol=0)
    # a single row whose padding is only "after cu_seqlens[-1]"
    rows = [_seqs([3, 11], seed=5)]
    ids, pos, cu = _pack_rows(rows, 20)
    assert cu.tolist() == [0, 3, 14]
    with torch.no_grad():
        h = m(ids, position_ids=pos, cu_seqlens=cu)
    assert torch.isfinite(h).all()
    _check_rows(m, rows, ids, h)


@pytest.mark.parametrize("kind", ["mistral_sw", "qwen2_bias_sw", "qwen3_qknorm"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_gradients_equal_sum_of_solo_gradients(kind, ckpt):
    m = _model(kind)
    seqs = _seqs([5, 13, 1, 9], seed=6)
    ids, pos, cu = _pack_rows([seqs], 30)  # 2 trailing pad tokens
    w = torch.randn(30, VOCAB, generator=torch.Generator().manual_seed(7))
    w[28:] = 0  # loss ignores padding
    m.train()
    m.gradient_checkpointing = ckpt
    try:
        m.zero_grad(set_to_none=True)
        (m.logits(m(ids, position_ids=pos, cu_seqlens=cu)[0]) * w).sum().backward()
        packed = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
        t = 0
        for s in seqs:
            (m.logits(m(s[None])[0]) * w[t:t + len(s)]).sum().backward()
            t += len(s)
        solo = {n: p.grad.clone() for n, p in m.named_parameters()}
    finally:
        m.gradient_checkpointing = False
        m.zero_grad(set_to_none=True)
        m.eval()
    for n, g in packed.items():
        assert torch.isfinite(g).all(), n
        torch.testing.assert_close(g, solo[n], atol=1e-5, rtol=1e-4, msg=n)
    assert packed["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_packing_actually_isolates():
    """Guard against a vacuous test: without cu_seqlens the same row gives different states."""
    m = _model("llama")
    rows = [_seqs([5, 13, 1, 9], seed=0)]
    ids, pos, cu = _pack_rows(rows, 28)
    with torch.no_grad():
        assert (m(ids, position_ids=pos) - m(ids, position_ids=pos, cu_seqlens=cu)).abs().max() > 1e-3


def test_packed_with_attention_mask():
    """attention_mask may be combined with cu_seqlens (masked keys are hidden on top)."""
    m = _model("mistral_sw")
    rows = [_seqs([5, 13, 1, 9], seed=8)]
    ids, pos, cu = _pack_rows(rows, 28)
    with torch.no_grad():
        h = m(ids, position_ids=pos, cu_seqlens=cu, attention_mask=torch.ones_like(ids))
    _check_rows(m, rows, ids, h)


def test_cpu_uses_mask_path():
    assert llama._varlen_args(torch.tensor([0, 4], dtype=torch.int32), 4, 4, torch.bfloat16) is None
    assert not llama._varlen_supported(torch.device("cpu"), torch.bfloat16)
    assert not llama._varlen_supported(torch.device("cuda"), torch.float32)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, scale=None):
    """CPU stand-in with torch.nn.attention.varlen.varlen_attn's documented semantics: per sequence
    of cu_q, key j visible to query i iff i - left <= j <= i + right (-1 = unbounded); (-1, 0) is
    causal. Fails loudly if any token is left out of cu_seqlens (a real kernel would not write it)."""
    assert cu_q is cu_k and int(cu_q[-1]) == q.shape[0] and cu_q.dtype == torch.int32
    assert int((cu_q[1:] - cu_q[:-1]).max()) <= max_q == max_k
    assert enable_gqa == (k.shape[1] != q.shape[1])
    left, right = window_size
    out = torch.full_like(q, float("nan"))
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        if b == a:
            continue
        qq, kk, vv = (x[a:b].transpose(0, 1) for x in (q, k, v))
        rep = qq.shape[0] // kk.shape[0]
        kk, vv = kk.repeat_interleave(rep, 0), vv.repeat_interleave(rep, 0)
        i = torch.arange(b - a)
        d = i[:, None] - i[None, :]
        allowed = torch.ones_like(d, dtype=torch.bool)
        if left >= 0:
            allowed &= d <= left
        if right >= 0:
            allowed &= -d <= right
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed,
                                                                    scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen2_bias_sw", "qwen3_qknorm"])
def test_varlen_plumbing_with_reference_kernel(kind, monkeypatch):
    """The CUDA varlen path (layout, RoPE, window_size, trailing padding folded into cu_seqlens)
    run on CPU against a reference kernel with varlen_attn's semantics. Real kernels: GPU only."""
    m = _model(kind)
    monkeypatch.setattr(llama, "_varlen_supported", lambda device, dtype: True)
    monkeypatch.setattr(llama, "_varlen_kernel", lambda: ("torch", _reference_varlen))
    llama._varlen_kernel_checked.cache_clear()
    rows = [_seqs([5, 13, 1], seed=9), _seqs([9, 1, 6], seed=10)]
    ids, pos, cu = _pack_rows(rows, 24)
    with torch.no_grad():
        h = m(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=13)
    assert torch.isfinite(h).all()
    _check_rows(m, rows, ids, h)
    monkeypatch.setattr(llama, "PACKED_ATTN_BACKEND", "mask")
    with torch.no_grad():
        torch.testing.assert_close(m(ids, position_ids=pos, cu_seqlens=cu), h, atol=ATOL, rtol=0)


@pytest.mark.parametrize("broken", ["wrong-signature", "wrong-window"])
def test_varlen_kernel_failing_its_self_check_falls_back_to_the_mask(broken, monkeypatch):
    """A kernel whose signature or window convention differs is caught once, with a warning."""
    def bad_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
        if broken == "wrong-signature":
            raise TypeError("varlen_attn() got an unexpected keyword argument 'window_size'")
        return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), enable_gqa=enable_gqa)

    m = _model("llama")
    rows = [_seqs([5, 13, 1], seed=9)]
    ids, pos, cu = _pack_rows(rows, 24)
    with torch.no_grad():
        want = m(ids, position_ids=pos, cu_seqlens=cu)
    monkeypatch.setattr(llama, "_varlen_supported", lambda device, dtype: True)
    monkeypatch.setattr(llama, "_varlen_kernel", lambda: ("torch", bad_kernel))
    llama._varlen_kernel_checked.cache_clear()
    try:
        with pytest.warns(UserWarning, match="failed its self-check"), torch.no_grad():
            got = m(ids, position_ids=pos, cu_seqlens=cu)
    finally:
        llama._varlen_kernel_checked.cache_clear()
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# varlen_attn as each torch release spells it: the call is built from the signature


def _varlen_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                       window_size=(-1, -1)):
    """torch 2.11.0's signature, exactly (read from its wheel): `window_size`, no `enable_gqa`; its flash
    backend takes fewer K/V heads as they are (flash-attention's MQA/GQA)."""
    return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window_size,
                             enable_gqa=key.shape[1] != query.shape[1])


def _varlen_torch_2_11_mha_only(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                                scale=None, window_size=(-1, -1)):
    """The 2.11 signature on a backend that takes only as many K/V heads as query heads."""
    if key.shape[1] != query.shape[1]:
        raise RuntimeError("Number of heads in key/value must equal the number of query heads")
    return _reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=window_size)


def _varlen_torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10's signature: causal flag, no window."""
    raise AssertionError("must not be called: fastsft cannot express windows or causality through it")


def _use_stand_in(monkeypatch, fn):
    monkeypatch.setattr(llama, "_varlen_supported", lambda device, dtype: True)
    monkeypatch.setattr(llama, "_varlen_kernel", lambda: ("torch", fn))
    llama._varlen_kernel_checked.cache_clear()


@pytest.mark.parametrize("stand_in, gqa", [(_varlen_torch_2_11, "native"), (_varlen_torch_2_11_mha_only, "repeat"),
                                           (_reference_varlen, "flag")])
@pytest.mark.parametrize("kind", ["llama", "qwen2_bias_sw"])
def test_varlen_is_chosen_with_each_torch_signature(stand_in, gqa, kind, monkeypatch):
    """torch 2.11 has no `enable_gqa` (passing it raised TypeError, the self-check failed and every packed
    batch ran the dense mask path); later releases need it for GQA. Each is called the way it takes,
    the varlen path is chosen (not the mask), and it equals the mask path, sliding windows included."""
    from fastsft import kernel_usage

    m = _model(kind)
    _use_stand_in(monkeypatch, stand_in)
    try:
        kernel, why = llama._varlen_kernel_checked(torch.device("cpu"), torch.float32)
        assert kernel is not None, why
        assert kernel.gqa == gqa
        rows = [_seqs([5, 13, 1], seed=9), _seqs([9, 1, 6], seed=10)]
        ids, pos, cu = _pack_rows(rows, 24)
        with torch.no_grad():
            h = m(ids, position_ids=pos, cu_seqlens=cu, max_seqlen=13)
        used = kernel_usage.snapshot()["attention"]
        assert used == {"path": "native", "impl": f"torch varlen attention (GQA {gqa})"}, used
        monkeypatch.setattr(llama, "PACKED_ATTN_BACKEND", "mask")
        with torch.no_grad():
            torch.testing.assert_close(m(ids, position_ids=pos, cu_seqlens=cu), h, atol=ATOL, rtol=0)
    finally:
        llama._varlen_kernel_checked.cache_clear()


def test_varlen_without_a_window_argument_falls_back_loudly(monkeypatch):
    """torch 2.10's varlen_attn (no window_size): not called; the fallback says why and what it costs,
    and the record says so too."""
    from fastsft import kernel_usage

    m = _model("mistral_sw")
    rows = [_seqs([5, 13, 1], seed=9)]
    ids, pos, cu = _pack_rows(rows, 24)
    with torch.no_grad():
        want = m(ids, position_ids=pos, cu_seqlens=cu)
    kernel_usage.reset()  # that was the CPU's mask path; what follows is the "GPU" one
    _use_stand_in(monkeypatch, _varlen_torch_2_10)
    try:
        with pytest.warns(UserWarning, match=r"attention falls back .*takes no window_size.*Expected cost: packed rows"):
            with torch.no_grad():
                got = m(ids, position_ids=pos, cu_seqlens=cu)
    finally:
        llama._varlen_kernel_checked.cache_clear()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    used = kernel_usage.snapshot()["attention"]
    assert used["path"] == "reference" and "window_size" in used["reason"] and "9x" in used["cost"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the real varlen kernel (GPU session script)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_varlen_kernel_is_chosen_on_the_gpu(dtype):
    """On a GPU the installed torch's (or flash-attn's) varlen kernel passes its self-check and packed rows
    use it, for bf16 and fp16 -- never the dense mask path."""
    from fastsft import kernel_usage

    llama._varlen_kernel_checked.cache_clear()
    kernel, why = llama._varlen_kernel_checked(torch.device("cuda"), dtype)
    assert kernel is not None, why
    m = build_model(ModelConfig(**{**_COMMON, **CONFIGS["qwen2_bias_sw"]}), dtype=dtype, device="cuda", seed=0)
    rows = [_seqs([5, 13, 1], seed=9), _seqs([9, 1, 6], seed=10)]
    ids, pos, cu = _pack_rows(rows, 24)
    with torch.no_grad():
        m(ids.cuda(), position_ids=pos.cuda(), cu_seqlens=cu.cuda(), max_seqlen=13)
    assert kernel_usage.snapshot()["attention"]["path"] == "native", kernel_usage.snapshot()["attention"]
