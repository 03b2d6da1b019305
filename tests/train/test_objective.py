"""The training objective of one micro-batch (fastsft.train.objective): the KL anchor's base forward is the
model with its adapters off, the covered tokens are the ones asked for, the loss equals CE + beta KL on the
materialised logits of both models; NEFTune's noise has each sequence's own scale, in training only."""

import math

import pytest
import torch

from fastsft import config as cfgmod
from fastsft.model import ModelConfig, build_model
from fastsft.model.fused import configure_kernels
from fastsft.model.lora import adapters_disabled, apply_lora, lora_modules
from fastsft.train.objective import Objective

_CFG = dict(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64)


def _lora_model(seed=0):
    base = build_model(ModelConfig(**_CFG), seed=seed)
    tuned = build_model(ModelConfig(**_CFG), seed=seed)
    apply_lora(tuned, r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(tuned).values():  # a tuned model that differs from its base
            m.lora_B.weight.copy_(0.2 * torch.randn(m.lora_B.weight.shape, generator=g))
    return base.eval(), tuned.train()


def _packed_batch():
    g = torch.Generator().manual_seed(2)
    lens = [5, 9, 3]
    ids = torch.randint(0, 61, (1, 20), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens] + [torch.arange(3)])[None]  # 3 tokens of padding
    targets = torch.full((1, 20), -100)
    targets[0, 2:4] = ids[0, 3:5]  # the response of sequence 1
    targets[0, 9:13] = ids[0, 10:14]  # of sequence 2
    return {"input_ids": ids, "targets": targets, "position_ids": pos,
            "cu_seqlens": torch.tensor([0, 5, 14, 17, 20], dtype=torch.int32), "max_seqlen": 9,
            "row_lengths": torch.tensor([17]), "num_tokens": 17}


def _padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (2, 8), generator=g)
    targets = torch.full((2, 8), -100)
    targets[0, 3:5] = ids[0, 4:6]
    targets[1, 1:2] = ids[1, 2:3]
    return {"input_ids": ids, "targets": targets, "position_ids": torch.arange(8).repeat(2, 1),
            "lengths": torch.tensor([6, 3]), "num_tokens": 9}


@pytest.mark.parametrize("kernels", ["off", "on"])
def test_base_forward_is_the_model_without_its_adapters(kernels):
    """Also through the fused LoRA blocks (kernels on): disabled layers compute their base alone."""
    base, tuned = _lora_model()
    configure_kernels(tuned, kernels, off=["rms_norm", "rope", "swiglu", "geglu"])
    batch = _packed_batch()
    objective = Objective(tuned, torch.device("cpu"), kl_to_base=0.5)
    args = objective.forward_args(batch)
    with torch.no_grad():
        want = base(batch["input_ids"], **args)
        got = objective.base_hidden(batch["input_ids"], args)
        tuned_h = tuned(batch["input_ids"], **args)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (tuned_h - want).abs().max() > 1e-3  # the adapters do change the model ...
    assert tuned.training and all(m.adapter_enabled for m in lora_modules(tuned).values())  # ... and are back on
    with adapters_disabled(tuned), torch.no_grad():
        torch.testing.assert_close(tuned.eval()(batch["input_ids"], **args), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", [_packed_batch, _padded_batch], ids=["packed", "padded"])
def test_kl_tokens_all_covers_every_next_token_of_each_sequence(make):
    batch = make()
    _, tuned = _lora_model()
    mask = Objective(tuned, torch.device("cpu"), kl_to_base=0.1, kl_tokens="all").kl_mask(batch)
    if make is _packed_batch:  # sequences 0-4, 5-13, 14-16: all but their last token; padding never
        want = [i for i in range(20) if i not in (4, 13, 16, 17, 18, 19)]
        assert mask[0].nonzero().squeeze(1).tolist() == want
    else:  # rows of 6 and 3 real tokens
        assert mask.tolist() == [[True] * 5 + [False] * 3, [True] * 2 + [False] * 6]
    assert Objective(tuned, torch.device("cpu"), kl_to_base=0.1).kl_mask(batch) is None  # response tokens only


@pytest.mark.parametrize("kl_tokens", ["response", "all"])
def test_loss_is_ce_plus_beta_kl_on_the_full_logits(kl_tokens):
    base, tuned = _lora_model()
    tuned.eval()  # no LoRA dropout in the comparison
    batch = _packed_batch()
    objective = Objective(tuned, torch.device("cpu"), kl_to_base=0.7, kl_tokens=kl_tokens)
    loss, parts = objective(batch, num_items=7)
    args = objective.forward_args(batch)
    with torch.no_grad():
        lp = torch.log_softmax(tuned.logits(tuned(batch["input_ids"], **args)), -1)[0]
        lpb = torch.log_softmax(base.logits(base(batch["input_ids"], **args)), -1)[0]
    y = batch["targets"][0]
    has = y != -100
    ce = -lp[has].gather(1, y[has][:, None]).sum()
    covered = objective.kl_mask(batch)[0] | has if kl_tokens == "all" else has
    kl = (lpb.exp() * (lpb - lp)).sum(-1)[covered].sum()
    torch.testing.assert_close(loss.detach(), (ce + 0.7 * kl) / 7, atol=1e-5, rtol=1e-5)
    assert parts["kl"] == pytest.approx(float(kl / 7), rel=1e-4, abs=1e-6) and parts["kl"] > 0


def test_without_the_anchor_the_objective_is_the_plain_loss():
    _, tuned = _lora_model()
    tuned.eval()
    batch = _padded_batch()
    loss, parts = Objective(tuned, torch.device("cpu"))(batch, num_items=3)
    from fastsft.loss import fused_linear_cross_entropy

    with torch.no_grad():
        want = fused_linear_cross_entropy(tuned(batch["input_ids"], position_ids=batch["position_ids"]),
                                          tuned.lm_head.weight, batch["targets"], reduction="sum", num_items=3)
    assert parts == {} and torch.equal(loss.detach(), want)


# ---------------------------------------------------------------------------------------------------- NEFTune

def _noise(model, ids, **kw):
    """The noise NEFTune added to the embeddings of one forward (captured at the first layer's input)."""
    seen = {}
    def grab(module, args):
        seen.setdefault("h", args[0].detach())  # returns None: the forward's arguments stay as they are

    hook = model.model.layers[0].register_forward_pre_hook(grab)
    try:
        model(ids, **kw)
    finally:
        hook.remove()
    return seen["h"] - model.model.embed(ids)


def test_neftune_scales_each_packed_sequence_by_its_own_length():
    model = build_model(ModelConfig(**_CFG), seed=0).train()
    Objective(model, torch.device("cpu"), neftune_alpha=5.0)
    batch = _packed_batch()
    torch.manual_seed(0)
    with torch.no_grad():
        noise = _noise(model, batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"])
    d = _CFG["hidden_size"]
    for a, b in ((0, 5), (5, 14), (14, 17), (17, 20)):
        bound = 5.0 / math.sqrt((b - a) * d)
        part = noise[0, a:b].abs()
        assert part.max() <= bound * (1 + 1e-5) and part.max() > 0.9 * bound, (a, b)  # U(-1, 1) * bound


def test_neftune_padded_rows_use_their_real_length_and_eval_adds_nothing():
    model = build_model(ModelConfig(**_CFG), seed=0).train()
    objective = Objective(model, torch.device("cpu"), neftune_alpha=5.0)
    batch = _padded_batch()
    with torch.no_grad():
        noise = _noise(model, batch["input_ids"], **objective.forward_args(batch))
        d = _CFG["hidden_size"]
        for row, length in enumerate((6, 3)):
            assert noise[row].abs().max() <= 5.0 / math.sqrt(length * d) * (1 + 1e-5)
            assert noise[row].abs().max() > 0.9 * 5.0 / math.sqrt(length * d)
        model.eval()
        assert torch.equal(_noise(model, batch["input_ids"], **objective.forward_args(batch)),
                           torch.zeros(2, 8, d))


def test_config_refuses_the_anchor_without_lora_and_negative_values():
    for overrides, key in (({"lora.enabled": False, "train.kl_to_base": 0.1}, "train.kl_to_base"),
                           ({"train.kl_to_base": -1.0}, "train.kl_to_base"),
                           ({"train.neftune_alpha": -2.0}, "train.neftune_alpha")):
        with pytest.raises(cfgmod.ConfigError, match=key) as e:
            cfgmod.load(None, overrides)
        assert "\n" not in str(e.value)
