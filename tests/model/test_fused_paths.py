"""The model's native paths (fused LoRA QKV/MLP/projection, NF4 dequant, RMSNorm, RoPE, SwiGLU kernels)
against its plain torch paths: same outputs and gradients, each piece switchable, memory claims held.

On a CPU machine the Triton kernels run in the interpreter (tests/conftest.py), so shapes stay tiny."""

import pytest
import torch

import fastsft.kernels.geglu as kgeglu
import fastsft.kernels.lora as klora
import fastsft.kernels.rms_norm as krms
import fastsft.kernels.rope as krope
import fastsft.kernels.swiglu as kswiglu
from fastsft.model import ModelConfig, build_model
from fastsft.model.fused import KernelChoice, configure_kernels
from fastsft.model.lora import DEFAULT_TARGET_MODULES, apply_lora, trainable_parameters

_COMMON = dict(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64)
CONFIGS = {
    "llama": dict(model_type="llama"),
    "qwen2_bias": dict(model_type="qwen2", attention_bias=True),
    "qwen3_qknorm": dict(model_type="qwen3", head_dim=16, num_key_value_heads=1),
}
B, T = 2, 21  # 42 tokens: no activation shape collides with a weight shape below


def _model(kind, *, dropout=0.0, nf4=False, targets=DEFAULT_TARGET_MODULES):
    m = build_model(ModelConfig(**{**_COMMON, **CONFIGS[kind]}), seed=0)
    if nf4:
        pytest.importorskip("bitsandbytes")
        from fastsft.model.nf4 import quantize_linears

        quantize_linears(m, targets, compute_dtype=torch.float32)
    apply_lora(m, r=4, alpha=8, dropout=dropout, target_modules=list(targets), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B != 0 so A gets gradients; norms off 1 so their kernels are exercised
        for name, p in m.named_parameters():
            if "lora_B" in name or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    m.train()
    return m


def _batch(packed):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 61, (B, T), generator=g)
    if not packed:
        return ids, {}
    # row 0: sequences of 8 and 13 tokens; row 1: 21 tokens; positions restart per sequence
    pos = torch.cat([torch.arange(8), torch.arange(13), torch.arange(21)]).view(B, T)
    return ids, {"position_ids": pos, "cu_seqlens": torch.tensor([0, 8, 21, 42], dtype=torch.int32)}


def _run(model, kernels, off=(), packed=True, seed=5):
    configure_kernels(model, kernels, off)
    model.zero_grad(set_to_none=True)
    ids, kw = _batch(packed)
    torch.manual_seed(seed)  # the LoRA dropout masks
    h = model(ids, **kw)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(11))
    (h * w).sum().backward()
    return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, rtol=2e-5, grad_atol=1e-5):
    (ha, ga), (hb, gb) = a, b
    torch.testing.assert_close(ha, hb, rtol=rtol, atol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=rtol, atol=grad_atol * gb[n].abs().max().item() + 1e-7, msg=n)


@pytest.fixture
def calls(monkeypatch):
    """Counts the native entry points the model reaches (so a test cannot pass on the torch path)."""
    counts = {k: 0 for k in ("rms_norm", "rope", "swiglu", "geglu", "lora_qkv", "lora_mlp", "lora_linear")}

    def counting(name, fn):
        def wrapped(*a, **k):
            counts[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(krms, "rms_norm", counting("rms_norm", krms.rms_norm))
    monkeypatch.setattr(krope, "apply_rope", counting("rope", krope.apply_rope))
    monkeypatch.setattr(kswiglu, "swiglu", counting("swiglu", kswiglu.swiglu))
    monkeypatch.setattr(kgeglu, "geglu", counting("geglu", kgeglu.geglu))
    for name in ("lora_qkv", "lora_mlp", "lora_linear"):
        monkeypatch.setattr(klora, name, counting(name, getattr(klora, name)))
    return counts


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("packed", [True, False])
def test_native_paths_match_torch_paths(kind, packed, calls):
    model = _model(kind)
    ref = _run(model, "off", packed=packed)
    assert not any(calls.values())
    got = _run(model, "on", packed=packed)
    _assert_same(got, ref)
    L = _COMMON["num_hidden_layers"]
    norms = 2 * L + 1 + (2 * L if kind == "qwen3_qknorm" else 0)
    assert calls == {"rms_norm": norms, "rope": L, "swiglu": 0, "geglu": 0, "lora_qkv": L, "lora_mlp": L,
                     "lora_linear": L}


FAMILIES = {  # Gemma 2 / 3 and Phi-3 layers: the pieces each takes
    "gemma2": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                   attn_logit_softcapping=3.0, final_logit_softcapping=5.0),
    "gemma3": dict(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=12, sliding_window=5,
                   layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(model_type="phi3", sliding_window=7),
}


@pytest.mark.parametrize("kind", list(FAMILIES))
@pytest.mark.parametrize("packed", [True, False])
def test_native_paths_of_gemma_and_phi3_layers(kind, packed, calls, monkeypatch):
    """Gemma: the (1 + w) RMSNorm and GeGLU kernels (its MLP never takes the SiLU-only fused LoRA block);
    Phi-3: single fused LoRA projections on qkv_proj / gate_up_proj and the SwiGLU kernel on the halves."""
    monkeypatch.setitem(CONFIGS, kind, FAMILIES[kind])
    model = _model(kind)
    ref = _run(model, "off", packed=packed)
    assert not any(calls.values())
    # Gemma 3's q/k norms amplify fp32 rounding in the LoRA gradients to ~3e-5 of their largest entry on
    # both paths alike (each is as far from a float64 run as the other): a looser bound than Llama's
    _assert_same(_run(model, "on", packed=packed), ref, grad_atol=1e-4)
    L = _COMMON["num_hidden_layers"]
    if kind == "phi3":
        want = {"rms_norm": 2 * L + 1, "rope": L, "swiglu": L, "geglu": 0, "lora_qkv": 0, "lora_mlp": 0,
                "lora_linear": 4 * L}
    else:
        norms = 4 * L + 1 + (2 * L if kind == "gemma3" else 0)  # sandwich norms (+ q/k norms)
        want = {"rms_norm": norms, "rope": L, "swiglu": 0, "geglu": L, "lora_qkv": L, "lora_mlp": 0,
                "lora_linear": 4 * L}  # o_proj, and gate/up/down one by one
    assert calls == want


def test_partial_targets_use_single_projections_and_swiglu(calls):
    """q/v adapted only: q and v run the fused single projection, k is plain; the MLP's gating uses
    the SwiGLU kernel because its projections are not LoRA layers."""
    model = _model("llama", targets=("q_proj", "v_proj"))
    ref = _run(model, "off")
    _assert_same(_run(model, "on"), ref)
    assert calls["lora_qkv"] == 0 and calls["lora_mlp"] == 0
    assert calls["lora_linear"] == 4 and calls["swiglu"] == 2


@pytest.mark.parametrize("piece", ["lora", "rms_norm", "rope", "swiglu"])
def test_each_piece_switches_off(piece, calls):
    model = _model("llama", targets=("q_proj", "k_proj", "v_proj", "o_proj"))  # MLP plain: swiglu runs
    ref = _run(model, "off")
    _assert_same(_run(model, "on", off=[piece]), ref)
    off_calls = {"lora": ("lora_qkv", "lora_linear"), "rms_norm": ("rms_norm",), "rope": ("rope",),
                 "swiglu": ("swiglu",)}[piece]
    for name, n in calls.items():
        assert (n == 0) == (name in off_calls or name in ("lora_mlp", "geglu")), (name, n)  # a SwiGLU model


def test_dropout_draws_the_same_masks():
    """LoRA dropout > 0: the fused blocks draw their masks in the modules' order (q, k, v; gate, up,
    down), so a seeded run is the same on either path."""
    model = _model("llama", dropout=0.3)
    _assert_same(_run(model, "on", off=["rms_norm", "rope", "swiglu"]), _run(model, "off"))


def test_nf4_bases_match_and_save_no_dense_weight():
    model = _model("qwen2_bias", nf4=True)
    weight_shapes = {tuple(m.base_layer.dequantize().shape) for m in model.modules() if hasattr(m, "lora_A")}
    weight_shapes |= {(s[1], s[0]) for s in weight_shapes}

    def saved(kernels):
        configure_kernels(model, kernels, off=["rms_norm", "rope", "swiglu"])
        params = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
        store = {}

        def pack(t):
            if t.data_ptr() not in params:
                store[t.data_ptr()] = (tuple(t.shape), t.numel() * t.element_size())
            return t

        ids, kw = _batch(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = model(ids, **kw)
        h.sum().backward()
        return store

    ref, fused = saved("off"), saved("on")
    assert not any(shape in weight_shapes for shape, _ in fused.values())
    r = 4  # no x A^T [tokens, r] kept either
    assert not any(shape == (B * T, r) for shape, _ in fused.values())
    assert any(shape == (B * T, r) for shape, _ in ref.values())
    assert sum(n for _, n in fused.values()) < sum(n for _, n in ref.values())
    _assert_same(_run(model, "on"), _run(model, "off"), rtol=1e-4)


def test_auto_is_torch_on_cpu_and_modes_validated():
    t = torch.zeros(2)
    auto = KernelChoice("auto")
    assert not any(auto.use(p, t) for p in ("lora", "rms_norm", "rope", "swiglu"))
    assert KernelChoice("on").use("lora", t) and not KernelChoice("on", frozenset({"lora"})).use("lora", t)
    with pytest.raises(ValueError, match="kernels must be"):
        KernelChoice("fast")
    with pytest.raises(ValueError, match="unknown kernel pieces"):
        KernelChoice("on", frozenset({"flash"}))


def test_trainable_parameters_unchanged_by_configuration():
    model = _model("llama")
    before = [id(p) for p in trainable_parameters(model)]
    configure_kernels(model, "on")
    assert [id(p) for p in trainable_parameters(model)] == before


# ----------------------------------------------------------------------------------------------------
# every weight dtype x autocast the config allows (model.dtype x train.precision), through the model


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_fused_lora_under_every_weight_dtype_and_autocast(weights, autocast, calls):
    """The fused LoRA blocks run (not crash) and are as accurate as the plain LoRA layers for each
    frozen-base dtype, with and without bf16 autocast: the trainer keeps LoRA factors in float32 beside a
    base in any of these dtypes. (Autocast gives bf16 projections of a float32/float16 stream; in-place
    ops inside the fused Functions must not meet operands in two dtypes.) Accuracy: error against the
    same model in float32 at most twice the plain path's own (flash-attention's rule for low precision)."""
    m = _model("llama", dropout=0.2)
    m.to(weights)
    for p in trainable_parameters(m):  # what the trainer does: optimizer state and updates in float32
        p.data = p.data.float()
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        fused = _run(m, "on", off=("rms_norm", "rope", "swiglu"))
    assert calls["lora_qkv"] and calls["lora_mlp"]
    with ctx:
        plain = _run(m, "off")
    m.float()  # the same (rounded) weights, every op in float32: the truth both are measured against
    truth = _run(m, "off")
    assert fused[0].dtype == plain[0].dtype
    if weights == torch.float32 and autocast is None:
        _assert_same(fused, plain)
        return
    (hf, gf), (hp, gp), (ht, gt) = fused, plain, truth
    assert gf.keys() == gp.keys() == gt.keys() and gf
    assert all(gf[n].dtype == gp[n].dtype == torch.float32 for n in gf)

    def err(a, b):  # relative Frobenius error; over all LoRA gradients at once (per tensor it is noise)
        a, b = [torch.cat([t.float().flatten() for t in x]) for x in (a, b)]
        return ((a - b).norm() / b.norm()).item()

    assert err([hf], [ht]) <= 2 * err([hp], [ht]) + 1e-4
    names = sorted(gf)
    assert err([gf[n] for n in names], [gt[n] for n in names]) <= 2 * err([gp[n] for n in names], [gt[n] for n in names]) + 1e-4


# ----------------------------------------------------------------------------------------------------
# self-checks (what kernels auto runs on a GPU before trusting a piece), here on the CPU


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, None), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, None), (torch.float16, torch.bfloat16)])
def test_lora_self_check_passes_for_every_dtype_and_autocast(dtype, autocast):
    from fastsft.model import fused

    fused._self_check.cache_clear()
    with torch.no_grad():  # a piece is first used in an eval forward: the check must still get gradients
        assert fused._self_check("lora", torch.device("cpu"), dtype, autocast) is None


def test_lora_self_check_catches_a_wrong_backward(monkeypatch):
    """A fused LoRA path that gets the gradient wrong (here: the LoRA term of dX dropped) is refused
    with the real exception, not trusted."""
    from fastsft.model import fused

    real = klora.lora_linear_backward

    def wrong(dy, x, w, a, b, scaling, noise, dx=None, need_a=True, need_b=True):
        return real(dy, x, w, a, b, 0.0 if w is not None else scaling, noise, dx, need_a, need_b)

    monkeypatch.setattr(klora, "lora_linear_backward", wrong)
    fused._self_check.cache_clear()
    try:
        error = fused._self_check("lora", torch.device("cpu"), torch.float32, None)
    finally:
        fused._self_check.cache_clear()
    assert error is not None and error.startswith("AssertionError: an output or gradient of the fused LoRA"), error


@pytest.mark.parametrize("piece", ["rms_norm", "rope", "swiglu", "geglu"])
def test_triton_self_checks_pass_inside_no_grad_and_autocast(piece):
    """The first use of a piece can be an eval forward under no_grad and autocast: its self-check
    (forward and gradients against the reference) must not fail for that reason."""
    from fastsft.model import fused

    fused._self_check.cache_clear()
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused._self_check(piece, torch.device("cpu"), torch.float32, None) is None
    finally:
        fused._self_check.cache_clear()
