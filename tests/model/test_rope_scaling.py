"""yarn, dynamic NTK and longrope RoPE against transformers: frequencies, attention factor and logits.

dynamic and longrope change frequencies with the sequence length (largest position + 1): dynamic past
max_position_embeddings, longrope past original_max_position_embeddings. transformers keys on the largest
position of the whole batch; fastsft keys on each sequence (row, or packed sequence), so every sequence
gets what transformers gives it alone. The tests run lengths on both sides of each threshold, alone,
in padded batches and in packed rows.
"""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import fastsft.model.llama as llama
from fastsft.model import ModelConfig, load_model

ATOL = 2e-5
VOCAB = 101
THRESHOLD = 32  # dynamic: max_position_embeddings; longrope/yarn: original_max_position_embeddings
SHORT, LONG = 20, 45  # sequence lengths below and above THRESHOLD

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)
_G = torch.Generator().manual_seed(7)
_SHORT_F = (1.0 + torch.rand(8, generator=_G)).tolist()  # head_dim 16 -> 8 factors each
_LONG_F = (1.0 + 6 * torch.rand(8, generator=_G)).tolist()

ROPES = {
    "yarn": dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=THRESHOLD,
        beta_fast=16.0, beta_slow=2.0)),
    "yarn_mscale_untruncated": dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="yarn", rope_theta=50000.0, factor=8.0, original_max_position_embeddings=16,
        mscale=0.9, mscale_all_dim=0.5, truncate=False)),
    "yarn_attention_factor": dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=2.5, original_max_position_embeddings=THRESHOLD,
        attention_factor=1.3)),
    "yarn_factor_from_context": dict(max_position_embeddings=128, rope_parameters=dict(  # factor 128 / 32
        rope_type="yarn", rope_theta=10000.0, factor=None, original_max_position_embeddings=THRESHOLD)),
    "dynamic": dict(max_position_embeddings=THRESHOLD, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=3.0)),
    "longrope": dict(max_position_embeddings=128, rope_parameters=dict(  # Phi-3: factor from 128 / 32
        rope_type="longrope", rope_theta=10000.0, short_factor=_SHORT_F, long_factor=_LONG_F,
        original_max_position_embeddings=THRESHOLD)),
    "longrope_factor": dict(max_position_embeddings=128, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=_SHORT_F, long_factor=_LONG_F,
        original_max_position_embeddings=THRESHOLD, factor=2.5)),
}
KINDS = list(ROPES)


def _hf_config(kind, family="llama"):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    spec = json.loads(json.dumps(ROPES[kind]))  # a private copy: transformers edits the dict
    return cls(**_COMMON, **spec)


def _fresh_rotary(hf):
    """transformers' dynamic rotary keeps the longest length it has seen: give each call a new one."""
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)


_PAIRS: dict = {}


def _pair(kind, family, tmp_path_factory):
    key = (kind, family)
    if key not in _PAIRS:
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(_hf_config(kind, family), attn_implementation="eager").float().eval()
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name or name.endswith(".bias"):
                    p.add_(0.2 * torch.randn_like(p))
        d = tmp_path_factory.mktemp(f"{family}_{kind}")
        hf.save_pretrained(d, safe_serialization=True)
        _PAIRS[key] = hf, load_model(d).eval(), d
    return _PAIRS[key]


def _hf_logits(hf, ids, **kw):
    _fresh_rotary(hf)
    with torch.no_grad():
        return hf(ids, **kw).logits


# ---------------------------------------------------------------------------------------------------- cos/sin


@pytest.mark.parametrize("kind", KINDS)
def test_inv_freq_and_attention_factor_match_transformers(kind):
    hf_cfg = _hf_config(kind)
    ours = ModelConfig.from_hf_dict(hf_cfg.to_dict())
    fn = ROPE_INIT_FUNCTIONS[ours.rope_type]
    want, want_factor = fn(hf_cfg, "cpu")
    assert llama.rope_attention_factor(ours) == pytest.approx(want_factor, rel=1e-12)
    torch.testing.assert_close(llama.compute_inv_freq(ours), want, atol=0, rtol=1e-6)
    if ours.rope_type in ("dynamic", "longrope"):
        for n in (THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, 3 * THRESHOLD):
            # transformers' forward passes the length as a tensor (max(position_ids) + 1)
            want_n = fn(hf_cfg, "cpu", seq_len=torch.tensor(n))[0] if n > THRESHOLD else want
            torch.testing.assert_close(llama.compute_inv_freq(ours, n), want_n, atol=0, rtol=1e-6, msg=str(n))
        lengths = torch.tensor([[THRESHOLD], [LONG]])  # one length per row -> [2, 1, d/2]
        batched = llama.compute_inv_freq(ours, lengths)
        assert batched.shape == (2, 1, 8)
        torch.testing.assert_close(batched[1, 0], llama.compute_inv_freq(ours, LONG), atol=0, rtol=0)
        assert not torch.equal(batched[0, 0], batched[1, 0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [SHORT, LONG])
def test_cos_sin_match_transformers(kind, T):
    hf_cfg = _hf_config(kind)
    hf_rot = AutoModelForCausalLM.from_config(hf_cfg).model.rotary_emb
    ours = llama.RotaryEmbedding(ModelConfig.from_hf_dict(hf_cfg.to_dict()))
    pos = torch.arange(T)[None]
    want_cos, want_sin = hf_rot(torch.zeros(1, T, 64), pos)
    cos, sin = ours(pos, torch.float32)
    torch.testing.assert_close(cos, want_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, want_sin, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [SHORT, LONG])
def test_logits_match_transformers(kind, T, tmp_path_factory):
    hf, ours, _ = _pair(kind, "llama", tmp_path_factory)
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        got = ours.logits(ours(ids))
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_qwen2_logits_match_transformers(kind, tmp_path_factory):
    hf, ours, _ = _pair(kind, "qwen2", tmp_path_factory)
    ids = torch.randint(0, VOCAB, (1, LONG), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), _hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_padded_rows_get_their_own_length(kind, tmp_path_factory):
    """Left-padded batch: a row of SHORT real tokens next to one of LONG. transformers keys the whole batch
    on LONG; fastsft gives the short row the frequencies transformers gives it alone."""
    hf, ours, _ = _pair(kind, "llama", tmp_path_factory)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, VOCAB, (2, LONG), generator=g)
    mask = torch.ones(2, LONG, dtype=torch.long)
    mask[1, :LONG - SHORT] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        got = ours.logits(ours(ids, attention_mask=mask))
    torch.testing.assert_close(got[0], _hf_logits(hf, ids[:1])[0], atol=ATOL, rtol=0)
    alone = _hf_logits(hf, ids[1:, LONG - SHORT:])[0]
    torch.testing.assert_close(got[1, LONG - SHORT:], alone, atol=ATOL, rtol=0)
    # transformers' batched answer for the short row differs: it used the long row's frequencies
    batched = _hf_logits(hf, ids, attention_mask=mask, position_ids=pos)
    assert (batched[1, LONG - SHORT:] - alone).abs().max() > 10 * ATOL


@pytest.mark.parametrize("kind", ["dynamic", "longrope", "yarn"])
def test_packed_row_sequences_match_transformers_alone(kind, tmp_path_factory):
    """One packed row [SHORT, LONG, 9 tokens, padding] and a second row [THRESHOLD + 1, THRESHOLD]: each
    sequence equals transformers on that sequence alone, on both sides of the threshold."""
    hf, ours, _ = _pair(kind, "llama", tmp_path_factory)
    g = torch.Generator().manual_seed(5)
    rows = [[SHORT, LONG, 9], [THRESHOLD + 1, THRESHOLD]]
    T = 80
    ids = torch.zeros(2, T, dtype=torch.long)
    cu, spans = [0], []
    for b, lengths in enumerate(rows):
        t = 0
        for n in lengths:
            ids[b, t:t + n] = torch.randint(0, VOCAB, (n,), generator=g)
            spans.append((b, t, n))
            t += n
            cu.append(b * T + t)
        if b == 0:
            cu.append(T)  # row 0's padding closes as its own sequence
    cu = torch.tensor(cu, dtype=torch.int32)
    with torch.no_grad():
        got = ours.logits(ours(ids, cu_seqlens=cu))
    for b, t, n in spans:
        torch.testing.assert_close(got[b, t:t + n], _hf_logits(hf, ids[b:b + 1, t:t + n])[0], atol=ATOL, rtol=0,
                                   msg=f"row {b}, tokens {t}..{t + n}")


def test_packed_varlen_path_passes_sequences_to_rope(tmp_path_factory, monkeypatch):
    """On the varlen path (no seq_ids needed for attention) dynamic RoPE still keys per packed sequence."""
    _, ours, _ = _pair("dynamic", "llama", tmp_path_factory)
    seen = []
    real = llama.RotaryEmbedding.forward

    def spy(self, position_ids, dtype, seq_ids=None):
        seen.append(seq_ids)
        return real(self, position_ids, dtype, seq_ids=seq_ids)

    monkeypatch.setattr(llama.RotaryEmbedding, "forward", spy)
    monkeypatch.setattr(llama, "_varlen_args", lambda *a, **k: None)  # what a CUDA run does before attention
    ids = torch.randint(0, VOCAB, (1, 50))
    cu = torch.tensor([0, 10, 50], dtype=torch.int32)
    with torch.no_grad():
        ours(ids, position_ids=torch.cat([torch.arange(10), torch.arange(40)])[None], cu_seqlens=cu)
    assert seen[-1] is not None and seen[-1].tolist()[0] == [0] * 10 + [1] * 40


# ---------------------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("kind", KINDS)
def test_config_json_spellings_and_write_back(kind, tmp_path_factory):
    """transformers 5 (rope_parameters) and 4 (top-level rope_theta, rope_scaling with "type") read the same;
    the config.json fastsft writes gives transformers the same frequencies and attention factor."""
    hf, ours, d = _pair(kind, "llama", tmp_path_factory)
    v5 = json.loads((d / "config.json").read_text())
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    rope = dict(v5["rope_parameters"])
    v4["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    v4["rope_scaling"] = rope
    assert ModelConfig.from_hf_dict(v4) == ModelConfig.from_hf_dict(v5) == ours.config
    out = tmp_path_factory.mktemp("written")
    ours.config.save_json(out)
    back = AutoConfig.from_pretrained(out)
    fn = ROPE_INIT_FUNCTIONS[ours.config.rope_type]
    for n in (None, torch.tensor(LONG)):
        want_inv, want_factor = fn(hf.config, "cpu", seq_len=n)
        inv, factor = fn(back, "cpu", seq_len=n)
        torch.testing.assert_close(inv, want_inv, atol=0, rtol=0)
        assert factor == want_factor
    assert ModelConfig.from_json(out) == ours.config


def test_su_is_longrope_and_phi3_top_level_original_context():
    base = ModelConfig(**_COMMON, max_position_embeddings=128).to_hf_dict()
    rope = dict(short_factor=_SHORT_F, long_factor=_LONG_F)
    su = ModelConfig.from_hf_dict(dict(base, rope_scaling=dict(rope, type="su"), original_max_position_embeddings=16,
                                       rope_parameters=None))
    longrope = ModelConfig.from_hf_dict(dict(base, rope_parameters=dict(
        rope, rope_type="longrope", original_max_position_embeddings=16)))
    assert su == longrope and su.rope_type == "longrope"
    assert su.to_hf_dict()["rope_scaling"]["rope_type"] == "longrope"
    assert su.to_hf_dict()["original_max_position_embeddings"] == 16
    # the top-level spelling wins over the rope dict's, as transformers 5 does at run time
    over = ModelConfig.from_hf_dict(dict(base, original_max_position_embeddings=16, rope_parameters=dict(
        rope, rope_type="longrope", original_max_position_embeddings=64)))
    assert over.rope_scaling["original_max_position_embeddings"] == 16
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**dict(base, original_max_position_embeddings=16,
                                                                      rope_parameters=dict(rope, rope_type="longrope",
                                                                      original_max_position_embeddings=64))))
    want = hf.model.rotary_emb(torch.zeros(1, 20, 64), torch.arange(20)[None])[0]
    got = llama.RotaryEmbedding(over)(torch.arange(20)[None], torch.float32)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_missing_original_context_defaults_to_max_position_embeddings():
    base = ModelConfig(**_COMMON, max_position_embeddings=96).to_hf_dict()
    c = ModelConfig.from_hf_dict(dict(base, rope_parameters=dict(rope_type="yarn", factor=2.0, rope_theta=1e4)))
    assert c.rope_scaling["original_max_position_embeddings"] == 96


@pytest.mark.parametrize("rope, match", [
    (dict(rope_type="yarn", factor=2.0, partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(rope_type="longrope", short_factor=[1.0] * 3, long_factor=[1.0] * 8), "short_factor"),
    (dict(rope_type="dynamic"), "factor"),
    (dict(rope_type="proportional", factor=2.0), "proportional"),
])
def test_bad_rope_parameters_are_one_clear_line(rope, match):
    base = ModelConfig(**_COMMON).to_hf_dict()
    with pytest.raises(ValueError, match=match) as e:
        ModelConfig.from_hf_dict(dict(base, rope_parameters=dict(rope, rope_theta=1e4), rope_scaling=None))
    assert "\n" not in str(e.value)
