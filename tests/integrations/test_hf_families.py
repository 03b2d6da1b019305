"""Which transformers families `fastsft.integrations.hf.patch` handles, checked one by one: for each, a tiny
random model's training loss and every gradient through the fused loss equal transformers' own to fp32
rounding; the logit scalings it cannot reproduce are refused at patch time. README.md lists the same
families (a test below keeps the two in step)."""

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from fastsft.integrations import hf

V = 64
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, head_dim=8, pad_token_id=0)
# model_type -> config overrides that put its loss-relevant knobs off their defaults
FAMILIES = {
    "llama": {}, "mistral": {}, "mixtral": {}, "qwen2": {}, "qwen2_moe": {}, "qwen3": {}, "qwen3_moe": {},
    "gemma": {}, "gemma2": dict(final_logit_softcapping=2.0), "gemma3_text": dict(final_logit_softcapping=5.0),
    "phi": {}, "phi3": {}, "phimoe": {}, "granite": dict(logits_scaling=3.0), "granitemoe": dict(logits_scaling=2.0),
    "cohere": dict(logit_scale=0.5), "cohere2": dict(logit_scale=0.25), "olmo": {}, "olmo2": {}, "olmo3": {},
    "olmoe": {}, "stablelm": {}, "starcoder2": {}, "gpt2": {}, "gpt_neox": {}, "falcon": {}, "falcon_h1": {},
    "glm": {}, "glm4": {}, "smollm3": {}, "exaone4": {}, "ernie4_5": {}, "seed_oss": {}, "apertus": {},
    "minimax": {}, "gpt_oss": {}, "mpt": {}, "bloom": {}, "opt": {}, "persimmon": {}, "nemotron": {},
    "helium": {}, "bitnet": {}, "arcee": {}, "hunyuan_v1_dense": {}, "lfm2": {}, "mamba": {}, "jetmoe": {},
}
# model_type -> (overrides, what the refusal names)
REFUSED = {"falcon_h1": (dict(lm_head_multiplier=2.0), "lm_head_multiplier")}


def tiny(model_type: str, **overrides):
    cfg = transformers.AutoConfig.for_model(model_type)
    for key, value in {**SMALL, **overrides}.items():
        try:
            setattr(cfg, key, value)
        except AttributeError:  # derived there (Falcon's head_dim is hidden_size / heads)
            assert key in SMALL, key
    for key in ("n_embd", "d_model"):  # the GPT-2-era names of the same sizes
        if hasattr(cfg, key):
            setattr(cfg, key, SMALL["hidden_size"])
    for key in ("n_layer", "n_layers"):
        if hasattr(cfg, key):
            setattr(cfg, key, 2)
    for key in ("n_head", "n_heads"):
        if hasattr(cfg, key):
            setattr(cfg, key, 4)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(cfg).float().train()


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_loss_and_gradients_match_transformers(model_type):
    ref = tiny(model_type, **FAMILIES[model_type])
    pat = hf.patch(copy.deepcopy(ref)).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, 10), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 7] = -100
    torch.manual_seed(5)  # the same dropout / router draws in both
    want = ref(input_ids=ids, labels=labels, use_cache=False)
    want.loss.backward()
    torch.manual_seed(5)
    got = pat(input_ids=ids, labels=labels, use_cache=False)
    got.loss.backward()
    assert got.logits is None  # the fused path ran: no [tokens x vocab] logits
    assert abs(got.loss.item() - want.loss.item()) < 1e-5
    for (name, a), (_, b) in zip(ref.named_parameters(), pat.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_type", list(REFUSED))
def test_logit_scalings_it_cannot_reproduce_are_refused(model_type):
    overrides, named = REFUSED[model_type]
    with pytest.raises(TypeError, match=named):
        hf.patch(tiny(model_type, **overrides))


def test_the_readme_lists_exactly_these_families():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    m = re.search(r"Checked families \(`model_type`\): (.+?)\.\n", readme, re.S)
    assert m, "README: the 'Checked families' sentence is missing"
    listed = re.findall(r"`([a-z0-9_]+)`", m.group(1))
    assert listed == list(FAMILIES)
