"""Generation with the KV cache: each step's logits equal a full forward over the whole sequence, and
greedy continuations of left-padded prompts are the same tokens with and without the cache."""

import numpy as np
import pytest
import torch

from fastsft.model import ModelConfig, build_model
from fastsft.model.llama import KVCache
from fastsft.model.lora import apply_lora
from fastsft.train.evaluate import greedy_generate

SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama_gqa": ModelConfig(**SMALL),
    "sliding_window": ModelConfig(**SMALL, sliding_window=5),
    "qwen3_qk_norm": ModelConfig(**SMALL, model_type="qwen3", qk_norm=True, head_dim=16),
    "yarn": ModelConfig(**dict(SMALL, max_position_embeddings=64),
                        rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}),
}


def prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 97, size=n) for n in (7, 3, 11)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_steps_equal_full_forwards(name):
    torch.manual_seed(0)
    model = build_model(CONFIGS[name], seed=0).eval()
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj"], seed=1)
    with torch.no_grad():
        for p in model.parameters():  # LoRA B starts at zero: make the adapter count
            p.add_(0.01 * torch.randn_like(p))
    ps = prompts()
    width = max(len(p) for p in ps)
    ids = torch.zeros(len(ps), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(ps):
        ids[r, width - len(p):] = torch.as_tensor(p)
        mask[r, width - len(p):] = 1
    cache = KVCache()
    new = ids
    with torch.no_grad():
        for step in range(6):
            cached = model.logits(model(new, attention_mask=mask, kv_cache=cache)[:, -1])
            full = model.logits(model(ids, attention_mask=mask)[:, -1])
            torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-4, msg=f"step {step}")
            new = full.argmax(-1, keepdim=True)
            ids = torch.cat([ids, new], dim=1)
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    assert len(cache) == ids.shape[1] - 1


def test_greedy_generation_is_the_same_with_and_without_the_cache():
    model = build_model(CONFIGS["sliding_window"], seed=3).eval()
    ps = prompts(1)
    kw = dict(pad_id=0, stop_ids={5}, max_new_tokens=12, device="cpu")
    assert greedy_generate(model, ps, **kw) == greedy_generate(model, ps, use_cache=False, **kw)


def test_a_mask_that_does_not_cover_the_cache_is_refused():
    model = build_model(CONFIGS["llama_gqa"], seed=0).eval()
    cache = KVCache()
    with torch.no_grad():
        model(torch.ones(1, 4, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match=r"attention_mask must be \[B, past \+ T\]"):
            model(torch.ones(1, 1, dtype=torch.long), attention_mask=torch.ones(1, 1), kv_cache=cache)
