"""Gemma 1/2/3 (text) and Phi-3 / Phi-4-mini against transformers, with every math field off its default.

For each configuration: the state-dict keys, logits (plain, left-padded, packed rows against each sequence
alone), the loss with Gemma's final-logit soft-cap inside the fused loss, every full gradient, LoRA
gradients and the PEFT adapter round trip against peft on transformers' model, KV-cache decoding, and
training-mode dropout (Phi-3's residual dropout draws the masks transformers draws). A last test checks
that each Gemma/Phi feature really changes the output (so that none of the parities above is vacuous).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, Phi3Config

from fastsft import kernel_usage
from fastsft.loss import fused_linear_cross_entropy
from fastsft.model import CausalLM, ModelConfig, load_model
from fastsft.model.llama import KVCache
from fastsft.model.lora import apply_lora, lora_modules, save_adapter

peft = pytest.importorskip("peft")

ATOL = 2e-5
B, T = 2, 45  # longer than every sliding window below, not a power of two

_SIZES = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_LAYERS = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]


def _cfg(kind):
    if kind == "gemma":  # attention biases, own RoPE base
        return GemmaConfig(**_SIZES, head_dim=24, attention_bias=True, rope_theta=5000.0)
    if kind == "gemma2":
        return Gemma2Config(**_SIZES, head_dim=24, query_pre_attn_scalar=20, sliding_window=6, layer_types=_LAYERS,
                            attn_logit_softcapping=2.0, final_logit_softcapping=3.0, attention_bias=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    if kind == "gemma3":
        return Gemma3TextConfig(**_SIZES, head_dim=24, query_pre_attn_scalar=20, sliding_window=6, layer_types=_LAYERS,
                                final_logit_softcapping=3.0,
                                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                    "rope_theta": 1e5},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}})
    if kind == "phi3":
        return Phi3Config(**dict(_SIZES, tie_word_embeddings=True), sliding_window=9, resid_pdrop=0.1)
    if kind == "phi4_mini":  # partial rotary (3/4 of each head) with longrope past a 32-token original context
        return Phi3Config(**dict(_SIZES, max_position_embeddings=64), original_max_position_embeddings=32,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                           "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                           "long_factor": [1.5 + 0.2 * i for i in range(6)]})
    raise KeyError(kind)


KINDS = ["gemma", "gemma2", "gemma3", "phi3", "phi4_mini"]
LORA_TARGETS = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def _hf_model(kind, seed=0):
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(_cfg(kind), attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".bias"):  # move norms (Gemma's start at 0) and biases off their init
                p.add_(0.2 * torch.randn_like(p))
            # attention scores and logits of a few units (not ~0.01, as at init): the soft-caps, the
            # attention scale and the activation's tails then really shape the output
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "gate_proj.weight",
                              "gate_up_proj.weight")):
                p.mul_(8.0)
            if name.endswith(("lm_head.weight", "embed_tokens.weight")):
                p.mul_(10.0)
    return hf


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    kind = request.param
    hf = _hf_model(kind)
    d = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(d, safe_serialization=True)
    return kind, hf, load_model(d).eval(), d


def _ids(seed, shape=(B, T)):
    return torch.randint(3, 300, shape, generator=torch.Generator().manual_seed(seed))


def test_state_dict_keys_and_config(pair):
    kind, hf, ours, _ = pair
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == hf.config.tie_word_embeddings
    assert ours.config.model_type == hf.config.model_type


def test_logits_match(pair):
    kind, hf, ours, _ = pair
    ids = _ids(1)
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), hf(ids).logits, atol=ATOL, rtol=1e-5)


def test_left_padded_batch_matches(pair):
    kind, hf, ours, _ = pair
    ids = _ids(2, (3, T))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :20] = 0
    with torch.no_grad():
        got = ours.logits(ours(ids, attention_mask=mask))
        assert torch.isfinite(got).all()
        # each row as transformers computes it alone (a padded batch of transformers' takes longrope's
        # length over the whole batch; fastsft's per row -- see llama.py's RoPE notes)
        for i in range(3):
            real = mask[i].bool()
            torch.testing.assert_close(got[i, real], hf(ids[i, real][None]).logits[0], atol=ATOL, rtol=1e-5)


def test_packed_row_sequences_match_transformers_alone(pair):
    """Three sequences in one row (one past phi4_mini's 32-token original context, so longrope picks its
    long factors for that sequence only), each equal to transformers on it alone."""
    kind, hf, ours, _ = pair
    lens = [7, 40, 11]
    seqs = [_ids(10 + i, (1, n))[0] for i, n in enumerate(lens)]
    row = torch.cat(seqs + [torch.zeros(3, dtype=torch.long)])[None]  # 3 tokens of trailing padding
    cu = torch.tensor([0, 7, 47, 58], dtype=torch.int32)
    kernel_usage.reset()
    with torch.no_grad():
        got = ours.logits(ours(row, cu_seqlens=cu))[0]
        for s, a, b in zip(seqs, cu[:-1].tolist(), cu[1:].tolist()):
            torch.testing.assert_close(got[a:b], hf(s[None]).logits[0], atol=ATOL, rtol=1e-5)
    if kind == "gemma2":  # soft-capped scores: the eager path, and kernels_used says so
        used = kernel_usage.snapshot()["attention"]
        assert used["path"] == "reference" and "soft-capped" in used["reason"]


def _targets(ids, seed):
    """Response-style targets: next tokens, with an ignored prefix per row and the last position ignored."""
    t = torch.full_like(ids, -100)
    t[:, :-1] = ids[:, 1:]
    t[0, :9] = -100
    t[1, :30] = -100
    return t


def _hf_loss(hf, ids, targets):
    logits = hf(ids).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def _our_loss(ours, ids, targets):
    return fused_linear_cross_entropy(ours(ids), ours.lm_head.weight, targets,
                                      softcap=ours.config.final_logit_softcapping)


def test_loss_and_every_gradient_match(pair):
    kind, hf, ours, d = pair
    hf, ours = _hf_model(kind), load_model(d).eval()  # own copies: gradients accumulate; eval: no dropout
    ids = _ids(3)
    targets = _targets(ids, 3)
    want = _hf_loss(hf, ids, targets)
    got = _our_loss(ours, ids, targets)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    want.backward()
    got.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=2e-5, rtol=1e-4, msg=name)


def test_lora_gradients_and_peft_round_trip(pair, tmp_path):
    """fastsft's LoRA (Phi-3: on the fused qkv_proj and gate_up_proj, named as users name them) against
    peft's on transformers' model with the same adapter weights: loss, every LoRA gradient, and the saved
    adapter loading in peft to the same logits."""
    kind, hf, ours, d = pair
    ours = load_model(d).eval()
    names = apply_lora(ours, r=4, alpha=8, target_modules=LORA_TARGETS.get(kind.split("_")[0] if kind != "phi4_mini"
                                                                            else "phi3",
                                                                            ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"]),
                       seed=1)
    if kind.startswith("phi"):
        assert {n.rsplit(".", 1)[-1] for n in names} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))
    pm = peft.get_peft_model(_hf_model(kind), peft.LoraConfig(r=4, lora_alpha=8, target_modules=sorted(
        {n.rsplit(".", 1)[-1] for n in names}), lora_dropout=0.0))
    theirs = {n.replace("base_model.model.", "", 1).replace(".default", ""): p for n, p in pm.named_parameters()
              if "lora_" in n}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                theirs[n].copy_(p)
    ids = _ids(4)
    targets = _targets(ids, 4)
    want = _hf_loss(pm, ids, targets)
    got = _our_loss(ours, ids, targets)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    want.backward()
    got.backward()
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, theirs[n].grad, atol=2e-5, rtol=1e-4, msg=n)

    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(d),
                 lora_config={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": names})
    loaded = peft.PeftModel.from_pretrained(_hf_model(kind), str(tmp_path / "adapter")).eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), loaded(ids).logits, atol=ATOL, rtol=1e-5)


def test_kv_cache_decoding_equals_full_forwards(pair):
    kind, hf, ours, _ = pair
    ids = _ids(6, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = KVCache()
        parts = [ours(ids[:, :20], attention_mask=mask[:, :20], kv_cache=cache)]
        for t in range(20, 30):
            parts.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], full[real], atol=ATOL, rtol=1e-5)


def test_training_mode_dropout_matches_transformers(tmp_path):
    """Phi-3's resid_pdrop: the same seed draws the same masks in the same order as transformers."""
    hf = _hf_model("phi3")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.config.resid_dropout == 0.1
    ids = _ids(7)
    hf.train(), ours.train()
    torch.manual_seed(3)
    want = hf(ids).logits
    torch.manual_seed(3)
    got = ours.logits(ours(ids))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    with torch.no_grad():
        assert (ours.eval().logits(ours(ids)) - got).abs().max() > 1e-3  # dropout did bite


@pytest.mark.parametrize("kind, change", [
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(query_pre_attn_scalar=24)),
    ("gemma2", dict(layer_types=["full_attention"] * 4)),
    ("gemma3", dict(rope_local_theta=10000.0)),
    ("gemma3", dict(rope_scaling=None)),
    ("gemma", dict(hidden_act="gelu")),
    ("phi4_mini", dict(partial_rotary_factor=0.5, rope_scaling=None)),
])
def test_each_feature_changes_the_output(kind, change, tmp_path):
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    other = CausalLM(ours.config.replace(**change)).eval()
    other.load_state_dict(ours.state_dict())
    ids = _ids(8)
    with torch.no_grad():
        if "hidden_act" in change:  # exact vs tanh GELU differ by < 1e-3 of a unit: look at one MLP on wide inputs
            x = 3 * torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
            assert (other.model.layers[0].mlp(x) - ours.model.layers[0].mlp(x)).abs().max() > 1e-5
        else:
            assert (other.logits(other(ids)) - ours.logits(ours(ids))).abs().max() > 1e-3


def test_partial_lora_targets_on_fused_projections_are_refused(tmp_path):
    hf = _hf_model("phi3")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    with pytest.raises(ValueError, match="fuses q_proj, k_proj, v_proj into one qkv_proj.*target qkv_proj"):
        apply_lora(ours, target_modules=["q_proj", "v_proj"])
    names = apply_lora(ours, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])  # the default list: Phi-3's layers whole
    assert len(names) == 4 * 4


def test_gemma_legacy_gelu_means_tanh_gelu_as_in_transformers():
    d = dict(_cfg("gemma").to_dict(), hidden_act="gelu")
    assert ModelConfig.from_hf_dict(d).hidden_act == "gelu_pytorch_tanh"


def test_round_trip_of_written_configs():
    for kind in KINDS:
        cfg = ModelConfig.from_hf_dict(_cfg(kind).to_dict())
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg, kind


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "phi3"])
def test_fastsft_train_on_a_checkpoint_directory_end_to_end(kind, tmp_path):
    """`fastsft train --model DIR` on a transformers checkpoint of the family: the run finishes, the loss
    moves, the adapter loads in peft on transformers' model to fastsft's logits, and the merged export
    loads in transformers to the same logits."""
    import json
    import os
    import subprocess
    import sys

    from fastsft.model.lora import load_adapter

    base = tmp_path / "base"
    _hf_model(kind).save_pretrained(base)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "fastsft", "train", "--model", str(base), "--model.tokenizer", "byte",
           "--train.max_steps", "3", "--data.builtin_size", "100", "--eval.exact_match", "0",
           "--output.progress", "false", "--output", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kernels_used"]["geglu" if kind.startswith("gemma") else "swiglu"]["path"] != "unused"
    ids = _ids(9)
    ours = load_model(base)
    load_adapter(ours, run / "adapter")
    ours.eval()
    theirs = peft.PeftModel.from_pretrained(_hf_model(kind), str(run / "adapter")).eval()
    with torch.no_grad():
        want = ours.logits(ours(ids))
        torch.testing.assert_close(theirs(ids).logits, want, atol=ATOL, rtol=1e-5)
        assert (_hf_model(kind)(ids).logits - want).abs().max() > 1e-4  # the adapter trained
    proc = subprocess.run([sys.executable, "-m", "fastsft", "export", "--model", str(base), "--adapter",
                           str(run / "adapter"), "--out", str(tmp_path / "merged")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-4, rtol=1e-4)
