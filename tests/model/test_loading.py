"""Loading/saving, config parsing, error messages and gradient checkpointing."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from fastsft.model import (
    PRESETS,
    CausalLM,
    ModelConfig,
    build_model,
    load_model,
    save_pretrained,
)

SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

ROUND_TRIP_CONFIGS = {
    "llama_tied": ModelConfig(**SMALL, tie_word_embeddings=True),
    "llama_bias_llama3": ModelConfig(**dict(SMALL, max_position_embeddings=256), attention_bias=True, mlp_bias=True,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 64}),
    "mistral_sw": ModelConfig(**SMALL, model_type="mistral", sliding_window=7),
    "qwen2_sw": ModelConfig(**SMALL, model_type="qwen2", attention_bias=True, sliding_window=5, max_window_layers=1,
                            tie_word_embeddings=True),
    "qwen3": ModelConfig(**SMALL, model_type="qwen3", head_dim=20, rope_theta=1e6),
}


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", list(ROUND_TRIP_CONFIGS))
def test_save_pretrained_round_trip_into_transformers(name, tmp_path):
    cfg = ROUND_TRIP_CONFIGS[name]
    ours = build_model(cfg, seed=1).eval()
    _perturb(ours)
    save_pretrained(ours, tmp_path)
    files = load_file(str(tmp_path / "model.safetensors"))
    assert ("lm_head.weight" in files) == (not cfg.tie_word_embeddings)  # tied weight written once

    hf_cfg = AutoConfig.from_pretrained(tmp_path)
    assert hf_cfg.model_type == cfg.model_type
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 29))
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), hf(ids).logits, atol=1e-4, rtol=0)
    # and back into fastsft: identical config and weights
    again = load_model(tmp_path)
    assert again.config.replace(torch_dtype=None) == cfg
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), atol=0, rtol=0)


def test_sharded_save_and_bf16_load(tmp_path):
    cfg = ROUND_TRIP_CONFIGS["qwen3"]
    ours = build_model(cfg, seed=2)
    save_pretrained(ours, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    back = load_model(tmp_path, dtype=torch.bfloat16)
    assert back.dtype == torch.bfloat16
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(a.to(torch.bfloat16), b, atol=0, rtol=0, msg=k)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert set(hf.state_dict()) == set(ours.state_dict())


def _saved_nano(tmp_path, **over):
    m = build_model(ModelConfig.from_name("nano", **over), seed=0)
    save_pretrained(m, tmp_path)
    return m


def test_extra_inv_freq_and_tied_lm_head_tolerated(tmp_path):
    m = _saved_nano(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.rotary_emb.inv_freq"] = torch.ones(8)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    back = load_model(tmp_path)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = torch.randint(0, 272, (1, 11))
    torch.testing.assert_close(back(ids), m(ids), atol=0, rtol=0)


def test_missing_key_error_names_file_and_key(tmp_path):
    _saved_nano(tmp_path, tie_word_embeddings=False)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as e:
        load_model(tmp_path)
    assert "model.safetensors" in str(e.value)


def test_untied_checkpoint_without_lm_head_errors(tmp_path):
    _saved_nano(tmp_path, tie_word_embeddings=False)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(tmp_path)


def test_unexpected_key_and_shape_mismatch_error(tmp_path):
    _saved_nano(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="o_proj.bias"):
        load_model(tmp_path)
    del sd["model.layers.0.self_attn.o_proj.bias"]
    sd["model.norm.weight"] = torch.ones(65)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"shape mismatch for 'model\.norm\.weight'"):
        load_model(tmp_path)


def test_bin_only_checkpoint_errors(tmp_path):
    ModelConfig.from_name("nano").save_json(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle we would ever open")
    with pytest.raises(ValueError, match="safetensors"):
        load_model(tmp_path)


def test_config_without_weights_errors(tmp_path):
    ModelConfig.from_name("nano").save_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match="no weights"):
        load_model(tmp_path)


def test_not_a_directory_nor_downloadable():
    with pytest.raises(ValueError, match="is not a local directory and could not be downloaded") as e:
        load_model("/nonexistent/dir/for/fastsft-tests")
    assert "\n" not in str(e.value)


def test_unsupported_model_type_and_rope_type(tmp_path):
    d = ModelConfig.from_name("nano").to_hf_dict()
    with pytest.raises(ValueError, match=r"'gpt2'.*llama.*mistral.*qwen2.*qwen3"):
        ModelConfig.from_hf_dict(dict(d, model_type="gpt2"))
    (tmp_path / "config.json").write_text(json.dumps(dict(d, model_type="gpt_neox")))
    with pytest.raises(ValueError, match="gpt_neox"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=r"'proportional'.*default.*linear.*llama3"):
        ModelConfig.from_hf_dict(dict(d, rope_parameters={"rope_type": "proportional", "factor": 4.0,
                                                          "rope_theta": 1e4}))
    with pytest.raises(ValueError, match="proportional"):
        ModelConfig(**SMALL, rope_scaling={"type": "proportional", "factor": 2.0})


def test_transformers4_style_config_is_read():
    d = ModelConfig.from_name("nano").to_hf_dict()
    del d["rope_parameters"]
    d.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    # Qwen2.5-style: a sliding_window value that is disabled by use_sliding_window=false
    q = dict(ModelConfig(**SMALL, model_type="qwen2", attention_bias=True).to_hf_dict(),
             use_sliding_window=False, sliding_window=32768, max_window_layers=21)
    del q["layer_types"]
    cq = ModelConfig.from_hf_dict(q)
    assert cq.sliding_window is None and cq.attention_bias and not cq.o_proj_bias


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = build_model("nano", seed=4)
    _perturb(m)
    m.train()
    ids = torch.randint(0, 272, (2, 23))
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[1, :4] = 0

    def grads(gc):
        m.zero_grad(set_to_none=True)
        m.gradient_checkpointing = gc
        loss = m.logits(m(ids, attention_mask=mask)).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    l0, g0 = grads(False)
    l1, g1 = grads(True)
    assert m.gradient_checkpointing and m.model.gradient_checkpointing
    torch.testing.assert_close(l1, l0, atol=0, rtol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5, msg=n)


def test_tiny_preset():
    cfg = ModelConfig.from_name("tiny")
    assert cfg.vocab_size >= 256 + 3 and cfg.num_key_value_heads < cfg.num_attention_heads
    m = build_model("tiny")
    assert 1_000_000 < m.num_parameters() < 5_000_000
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert "tiny" in PRESETS
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_name("huge-nonexistent")


def test_init_weights_like_hf():
    cfg = ModelConfig(**SMALL, model_type="qwen2", attention_bias=True, initializer_range=0.05)
    m = build_model(cfg, seed=0)
    assert torch.equal(m.model.norm.weight, torch.ones(48))
    assert torch.equal(m.model.layers[0].self_attn.q_proj.bias, torch.zeros(48))
    std = m.model.layers[0].mlp.gate_proj.weight.std().item()
    assert 0.04 < std < 0.06
    m2 = build_model(cfg, seed=0)
    torch.testing.assert_close(m.state_dict(), m2.state_dict(), atol=0, rtol=0)


def test_forward_contract():
    m = build_model("nano").eval()
    ids = torch.randint(0, 272, (2, 9))
    with torch.no_grad():
        h = m(ids)
        assert h.shape == (2, 9, 64)  # hidden states, not logits
        torch.testing.assert_close(m(ids, attention_mask=torch.ones_like(ids)), h, atol=0, rtol=0)
        torch.testing.assert_close(m(ids, position_ids=torch.arange(9).expand(2, 9)), h, atol=0, rtol=0)
        # a fully padded row yields finite outputs
        mask = torch.ones_like(ids)
        mask[0] = 0
        assert torch.isfinite(m(ids, attention_mask=mask)).all()
        # one sequence a row, given as cu_seqlens over the flattened rows: the same as unpacked
        torch.testing.assert_close(m(ids, cu_seqlens=torch.tensor([0, 9, 18], dtype=torch.int32)), h,
                                   atol=1e-5, rtol=1e-5)
    assert not any("rotary" in k for k in m.state_dict())
    assert isinstance(m, CausalLM)
    # projections are plain nn.Linear modules (LoRA swaps them by name)
    assert type(m.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
