"""Logit parity between fastsft's decoder and transformers' reference implementations."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from fastsft.model import CausalLM, load_model

ATOL = 1e-4
B, T = 2, 37  # T deliberately not a power of two

_COMMON = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


def _cfg(kind):
    c = dict(_COMMON)
    if kind == "llama":
        return LlamaConfig(**c, tie_word_embeddings=False, rope_theta=500000.0)
    if kind == "llama_tied_bias":
        return LlamaConfig(**c, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    if kind == "llama_mha":
        c["num_key_value_heads"] = 4
        return LlamaConfig(**c, tie_word_embeddings=False)
    if kind == "llama3_rope":
        c["max_position_embeddings"] = 256
        return LlamaConfig(
            **c,
            tie_word_embeddings=True,
            rope_theta=10000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    if kind == "llama_linear_rope":
        return LlamaConfig(**c, tie_word_embeddings=False, rope_scaling={"rope_type": "linear", "factor": 4.0})
    if kind == "mistral_sw":
        return MistralConfig(**c, tie_word_embeddings=False, sliding_window=8)
    if kind == "qwen2":
        return Qwen2Config(**c, tie_word_embeddings=True)
    if kind == "qwen2_sw":
        return Qwen2Config(**c, tie_word_embeddings=False, use_sliding_window=True, sliding_window=6,
                           max_window_layers=1)
    if kind == "qwen3":
        return Qwen3Config(**c, head_dim=24, tie_word_embeddings=False)
    if kind == "qwen3_tied_bias":
        return Qwen3Config(**c, head_dim=24, tie_word_embeddings=True, attention_bias=True)
    raise KeyError(kind)


KINDS = ["llama", "llama_tied_bias", "llama_mha", "llama3_rope", "llama_linear_rope", "mistral_sw",
         "qwen2", "qwen2_sw", "qwen3", "qwen3_tied_bias"]


def _hf_model(kind, seed=0):
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(_cfg(kind), attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # move norms and biases away from their init so they are exercised
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    kind = request.param
    hf = _hf_model(kind)
    d = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(d, safe_serialization=True)
    ours = load_model(d).eval()
    return kind, hf, ours, d


def test_state_dict_keys_match(pair):
    kind, hf, ours, d = pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert not any("rotary" in k for k in ours.state_dict())
    tied = hf.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied


def test_logits_match(pair):
    kind, hf, ours, _ = pair
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (B, T))
    with torch.no_grad():
        ref = hf(ids).logits
        hidden = ours(ids)
        got = ours.logits(hidden)
    assert hidden.shape == (B, T, hf.config.hidden_size)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_left_padded_batch_matches(pair):
    kind, hf, ours, _ = pair
    torch.manual_seed(2)
    ids = torch.randint(0, hf.config.vocab_size, (3, T))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :20] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours.logits(ours(ids, attention_mask=mask))  # positions derived from the mask
        got_explicit = ours.logits(ours(ids, attention_mask=mask, position_ids=pos))
    assert torch.isfinite(got).all()  # fully padded query rows must not produce NaN
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_explicit, got, atol=0, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    hf = _hf_model("qwen3")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    index = tmp_path / "model.safetensors.index.json"
    assert index.is_file()
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    ours = load_model(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (B, T))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), hf(ids).logits, atol=ATOL, rtol=0)


def test_window_and_scaling_actually_bite():
    """Guard against a vacuous test: the sliding window and llama3 scaling change the output."""
    from fastsft.model import ModelConfig, build_model

    base = ModelConfig(**{k: v for k, v in _COMMON.items()})
    ids = torch.randint(0, 101, (1, T))
    m = build_model(base, seed=3).eval()
    variants = [base.replace(model_type="mistral", sliding_window=8),
                base.replace(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})]
    with torch.no_grad():
        h = m(ids)
        for cfg in variants:
            m2 = CausalLM(cfg).eval()
            m2.load_state_dict(m.state_dict())
            assert (m2(ids) - h).abs().max() > 1e-3
