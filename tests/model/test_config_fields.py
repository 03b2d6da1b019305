"""Every config field that changes the math is read (and honoured) or refused, never ignored.

The walk goes over transformers' config classes of each family fastsft loads and fails on a declared field
that fastsft.model.config.HF_FIELDS does not list as read, refused or inert; a read field must change the
ModelConfig it parses to, a refused one must raise. Then fastsft's reading of a config.json -- with every
field at transformers' defaults, and with every math field off them -- is compared with transformers' own,
and attention_dropout (read since this walk found it ignored) is checked against transformers in training.
"""

import dataclasses
import inspect
import typing

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

import fastsft.model.config as config_mod
import fastsft.model.llama as llama
from fastsft import kernel_usage
from fastsft.model import ModelConfig, build_model, load_model

FAMILIES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}


def _declared(cls) -> set:
    """The fields transformers' config class declares, and the attributes every instance carries."""
    if dataclasses.is_dataclass(cls):  # transformers 5
        names = {f.name for f in dataclasses.fields(cls)}
    else:  # transformers 4: __init__ keywords
        names = {n for n, p in inspect.signature(cls.__init__).parameters.items()
                 if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    return names | set(cls().to_dict())


def _unaccounted(cls) -> set:
    return _declared(cls) - set(config_mod.HF_FIELDS)


def test_families_are_the_supported_ones():
    assert set(FAMILIES) == set(config_mod.SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_declared_field_is_read_refused_or_inert(family):
    missing = _unaccounted(FAMILIES[family])
    assert not missing, (f"{FAMILIES[family].__name__} declares {sorted(missing)}, which fastsft neither reads nor "
                         "refuses: implement or refuse each in fastsft/model/config.py HF_FIELDS (or list it as "
                         "inert if it cannot change the math)")


def test_every_rope_parameter_is_read_refused_or_inert():
    read = {k for required, optional in config_mod.ROPE_KEYS.values() for k in required + optional}
    known = read | set(config_mod.ROPE_KEYS_REFUSED) | set(config_mod.ROPE_KEYS_INERT)
    assert not set(typing.get_type_hints(RopeParameters)) - known


def test_the_walk_and_the_load_catch_a_removed_entry(monkeypatch):
    """Drop attention_dropout from the table: the walk names it, and a config.json setting it off
    transformers' default is refused by name (on the default value it still loads)."""
    monkeypatch.delitem(config_mod.HF_FIELDS, "attention_dropout")
    assert _unaccounted(LlamaConfig) == {"attention_dropout"}
    base = _base("llama")
    ModelConfig.from_hf_dict(dict(base, attention_dropout=0.0))
    with pytest.raises(ValueError, match=r"field 'attention_dropout' = 0\.1 changes the model") as e:
        ModelConfig.from_hf_dict(dict(base, attention_dropout=0.1))
    assert "\n" not in str(e.value)


def test_unknown_undeclared_keys_are_ignored_like_transformers_does():
    cfg = ModelConfig.from_hf_dict(dict(_base("llama"), unsloth_version="2026.1", auto_map={"x": "y"}))
    assert cfg == ModelConfig.from_hf_dict(_base("llama"))


# ---------------------------------------------------------------------------------------------------- read / refused

def _base(family):
    d = dict(model_type=family, vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
             tie_word_embeddings=False, initializer_range=0.02, attention_dropout=0.0,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family != "qwen2":
        d["head_dim"] = 16
    if family == "mistral":
        d["sliding_window"] = 8
    if family in ("qwen2", "qwen3"):
        d.update(use_sliding_window=True, sliding_window=8, max_window_layers=2)
    return d


def _perturbed(field, value):
    special = {
        "attention_dropout": 0.1,
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        "layer_types": ["sliding_attention"] * 4,
    }
    if field in special:
        return special[field]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2
    raise AssertionError(f"no perturbation for {field}={value!r}")


def _read_cases():
    for family, cls in FAMILIES.items():
        for field in sorted(_declared(cls)):
            if config_mod.HF_FIELDS.get(field) == config_mod.READ and field != "model_type":
                yield family, field


@pytest.mark.parametrize("family, field", list(_read_cases()))
def test_a_read_field_changes_the_config(family, field):
    base = _base(family)
    value = base.get(field, config_mod.HF_DEFAULTS[family].get(field))
    if field == "layer_types":
        value = None
    changed = ModelConfig.from_hf_dict(dict(base, **{field: _perturbed(field, value)}))
    assert changed != ModelConfig.from_hf_dict(base), f"{family}: {field} is listed as read but changes nothing"


@pytest.mark.parametrize("extra, base_changes", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, {}),  # transformers 4 spelling
    ({"rope_theta": 5e5}, {"rope_parameters": None}),
    ({"original_max_position_embeddings": 16},
     {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}}),
])
def test_undeclared_keys_transformers_reads_are_read(extra, base_changes):
    base = dict(_base("llama"), **base_changes)
    assert ModelConfig.from_hf_dict(dict(base, **extra)) != ModelConfig.from_hf_dict(base)
    q = _base("qwen2")  # Qwen2Config declares no head_dim, but its attention reads one
    assert ModelConfig.from_hf_dict(dict(q, head_dim=32)).head_dim == 32


@pytest.mark.parametrize("field, accepted", [(k, v) for k, v in config_mod.HF_FIELDS.items() if isinstance(v, tuple)])
def test_a_refused_field_is_one_clear_line(field, accepted):
    ok = dict(_base("llama"), **{field: accepted[-1]})
    ModelConfig.from_hf_dict(ok)
    bad = {"hidden_act": "gelu_pytorch_tanh", "partial_rotary_factor": 0.5}[field]
    with pytest.raises(ValueError, match=field) as e:
        ModelConfig.from_hf_dict(dict(ok, **{field: bad}))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------- same reading

def _rope_numbers(inv, factor, inv_long):
    return {"inv_freq": inv, "attention_factor": torch.tensor(float(factor)), "inv_freq_long": inv_long}


def _activation(name):
    probe = torch.linspace(-6, 6, 101)
    return "silu" if torch.equal(ACT2FN[name](probe), torch.nn.functional.silu(probe)) else name


def _hf_view(c):
    """What transformers' modeling code builds from config ``c`` (the math of it)."""
    mt, L = c.model_type, c.num_hidden_layers
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if mt == "mistral":
        windows = [c.sliding_window] * L
    elif mt in ("qwen2", "qwen3"):
        windows = [c.sliding_window if t == "sliding_attention" else None for t in c.layer_types]
    else:
        windows = [None] * L
    qkv_bias, o_bias = {"qwen2": (True, False), "mistral": (False, False)}.get(mt) or (c.attention_bias,) * 2
    rope_type = c.rope_parameters["rope_type"]
    if rope_type == "default":
        inv = 1.0 / (c.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        numbers = _rope_numbers(inv, 1.0, inv)
    else:
        fn = ROPE_INIT_FUNCTIONS[rope_type]
        inv, factor = fn(c, "cpu")
        numbers = _rope_numbers(inv, factor, fn(c, "cpu", seq_len=torch.tensor(4 * c.max_position_embeddings))[0]
                                if rope_type in ("dynamic", "longrope") else inv)
    plain = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                 layers=L, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=head_dim,
                 eps=c.rms_norm_eps, tied=c.tie_word_embeddings, attention_dropout=c.attention_dropout,
                 qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=getattr(c, "mlp_bias", False), qk_norm=mt == "qwen3",
                 act=_activation(c.hidden_act), windows=windows, rope_type=rope_type)
    return plain, numbers


def _our_view(cfg):
    plain = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                 layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                 head_dim=cfg.head_dim, eps=cfg.rms_norm_eps, tied=cfg.tie_word_embeddings,
                 attention_dropout=cfg.attention_dropout, qkv_bias=cfg.attention_bias, o_bias=cfg.o_proj_bias,
                 mlp_bias=cfg.mlp_bias, qk_norm=cfg.qk_norm, act="silu",
                 windows=[cfg.layer_sliding_window(i) for i in range(cfg.num_hidden_layers)], rope_type=cfg.rope_type)
    long = (llama.compute_inv_freq(cfg, 4 * cfg.max_position_embeddings)
            if cfg.rope_type in ("dynamic", "longrope") else llama.compute_inv_freq(cfg))
    return plain, _rope_numbers(llama.compute_inv_freq(cfg), llama.rope_attention_factor(cfg), long)


OFF_DEFAULTS = {
    "llama": dict(model_type="llama", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5,
                  max_position_embeddings=96, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                  attention_dropout=0.1, initializer_range=0.05, pretraining_tp=2, hidden_act="swish",
                  rope_parameters=dict(rope_type="yarn", rope_theta=5e4, factor=3.0,
                                       original_max_position_embeddings=32, beta_fast=8, beta_slow=2, mscale=0.7,
                                       mscale_all_dim=0.3, truncate=False)),
    "mistral": dict(model_type="mistral", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=24, rms_norm_eps=1e-5,
                    max_position_embeddings=48, tie_word_embeddings=True, sliding_window=8, attention_dropout=0.05,
                    rope_parameters=dict(rope_type="dynamic", rope_theta=2e4, factor=2.0)),
    "qwen2": dict(model_type="qwen2", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5,
                  max_position_embeddings=128, tie_word_embeddings=True, use_sliding_window=True, sliding_window=6,
                  max_window_layers=1, attention_dropout=0.2,
                  rope_parameters=dict(rope_type="longrope", rope_theta=1e6, short_factor=[1.5] * 12,
                                       long_factor=[float(i + 1) for i in range(12)],
                                       original_max_position_embeddings=32, attention_factor=1.2)),
    "qwen3": dict(model_type="qwen3", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=True, attention_bias=True, use_sliding_window=True,
                  sliding_window=5, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                  attention_dropout=0.1,
                  rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=64)),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["all defaults", "sizes only", "every field off its default"])
def test_fastsft_reads_and_writes_a_config_as_transformers_does(family, which):
    d = {"all defaults": {"model_type": family},
         # the rest at transformers' defaults, which differ per family (Qwen3's head_dim is 128 whatever the sizes)
         "sizes only": dict(model_type=family, vocab_size=101, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
         "every field off its default": OFF_DEFAULTS[family]}[which]
    ours = ModelConfig.from_hf_dict(d)
    want_plain, want_numbers = _hf_view(AutoConfig.for_model(family, **{k: v for k, v in d.items()
                                                                         if k != "model_type"}))
    got_plain, got_numbers = _our_view(ours)
    assert got_plain == want_plain
    torch.testing.assert_close(got_numbers, want_numbers, atol=0, rtol=1e-6)
    written = ours.to_hf_dict()  # what save_json writes, read back by transformers
    back_plain, back_numbers = _hf_view(AutoConfig.for_model(family, **{k: v for k, v in written.items()
                                                                         if k != "model_type"}))
    assert back_plain == want_plain
    torch.testing.assert_close(back_numbers, want_numbers, atol=0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- attention_dropout

_DROP = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128)


def test_attention_dropout_matches_transformers_in_training(tmp_path):
    """Same seed, same masks: SDPA draws its dropout mask as transformers' eager attention does, over the
    same [B, H, T, T] probabilities (causal fast path, and the masked path of a padded batch)."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**_DROP, attention_dropout=0.3),
                                          attn_implementation="eager").float()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.attention_dropout == 0.3
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :6] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    for kw in ({}, {"attention_mask": mask}):
        hf.train(), ours.train()
        torch.manual_seed(3)
        want = hf(ids, **kw, **({"position_ids": pos} if kw else {})).logits
        torch.manual_seed(3)
        got = ours.logits(ours(ids, **kw))
        real = mask.bool() if kw else torch.ones_like(mask, dtype=torch.bool)
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
        hf.eval(), ours.eval()
        with torch.no_grad():
            evaluated = ours.logits(ours(ids, **kw))
            torch.testing.assert_close(evaluated[real], hf(ids, **kw, **({"position_ids": pos} if kw else {}))
                                       .logits[real], atol=1e-5, rtol=0)
        assert (got[real] - evaluated[real]).abs().max() > 1e-3  # dropout did bite in training


def _packed_batch():
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    return ids, torch.tensor([0, 7, 20, 30], dtype=torch.int32)


def _fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, causal=True, window_size=(-1, -1)):
    """flash-attn's varlen signature on CPU: SDPA over the block-diagonal causal mask, with its dropout."""
    n = q.shape[0]
    seq = torch.searchsorted(cu_q.long(), torch.arange(n), right=True)
    i = torch.arange(n)
    allowed = (seq[:, None] == seq[None, :]) & (i[:, None] >= i[None, :])
    rep = q.shape[1] // k.shape[1]
    qq, kk, vv = (x.transpose(0, 1)[None] for x in (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)))
    return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed,
                                                            dropout_p=dropout_p)[0].transpose(0, 1)


def test_packed_rows_apply_dropout_on_every_path(monkeypatch):
    m = build_model(ModelConfig(**_DROP, attention_dropout=0.25), seed=1).train()
    ids, cu = _packed_batch()
    torch.manual_seed(4)
    masked = m(ids, cu_seqlens=cu)  # CPU: the masked-SDPA path
    m.eval()
    with torch.no_grad():
        assert (m(ids, cu_seqlens=cu) - masked).abs().max() > 1e-3
    m.train()
    # a flash-attn varlen kernel gets dropout_p, and draws the same masks over the same probabilities
    monkeypatch.setattr(llama, "_varlen_supported", lambda device, dtype: True)
    flash = llama.VarlenKernel("flash_attn", _fake_flash_varlen, "native")
    monkeypatch.setattr(llama, "_varlen_kernel_checked", lambda device, dtype: (flash, ""))
    torch.manual_seed(4)
    torch.testing.assert_close(m(ids, cu_seqlens=cu), masked, atol=1e-5, rtol=0)
    assert kernel_usage.snapshot()["attention"].get("native")
    # torch's varlen_attn has no dropout_p: in training the row takes the masked path, loudly
    kernel_usage.reset()
    torch_kernel = llama.VarlenKernel("torch", lambda *a, **k: pytest.fail("varlen_attn called"), "flag")
    monkeypatch.setattr(llama, "_varlen_kernel_checked", lambda device, dtype: (torch_kernel, ""))
    torch.manual_seed(4)
    with pytest.warns(UserWarning, match="attention_dropout"):
        torch.testing.assert_close(m(ids, cu_seqlens=cu), masked, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="dropout"):
        llama.VarlenArgs(cu, 13, torch_kernel, torch.float32).attend(*torch.randn(3, 30, 4, 12), None, 0.1)


@pytest.mark.parametrize("offload", [False, True])
def test_checkpointed_layers_redraw_the_same_dropout_masks(offload):
    m = build_model(ModelConfig(**_DROP, attention_dropout=0.3), seed=2).train()
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(5))

    def grads(ckpt):
        m.zero_grad(set_to_none=True)
        m.gradient_checkpointing, m.offload_activations = ckpt, offload
        torch.manual_seed(9)
        m.logits(m(ids)).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_attention_dropout_round_trips_and_is_validated():
    cfg = ModelConfig(**_DROP, attention_dropout=0.15)
    assert cfg.to_hf_dict()["attention_dropout"] == 0.15
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    with pytest.raises(ValueError, match="attention_dropout"):
        ModelConfig(**_DROP, attention_dropout=1.5)
