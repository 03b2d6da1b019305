"""LoRA layer, apply_lora, and PEFT adapter-format compatibility (fast, CPU)."""

from __future__ import annotations

import json
import math
import os
import warnings

import pytest
import torch
from helpers import save_tiny_hf_llama
from safetensors.torch import load_file, save_file
from torch import nn

from fastsft.model.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DEFAULT_TARGET_MODULES,
    LoRALinear,
    apply_lora,
    load_adapter,
    load_lora_state_dict,
    lora_modules,
    lora_state_dict,
    save_adapter,
    trainable_parameters,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _tiny_hf_dir(tmp_path, *, seed=0, tie=False):
    """A tiny random transformers LlamaForCausalLM saved under tmp_path/base."""
    return save_tiny_hf_llama(tmp_path / "base", vocab_size=VOCAB, tie=tie, seed=seed)


def _hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _fastsft_model(path):
    from fastsft.model.loading import load_model

    return load_model(path, dtype=torch.float32, device="cpu").eval()


def _fs_logits(model, ids):
    with torch.no_grad():
        return model.logits(model(ids)).float()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _randomize_lora(model, seed=123):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in lora_modules(model).values():
            for lin in (mod.lora_A, mod.lora_B):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.2)


def _ids(seed=7, b=2, t=11):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------------
# LoRALinear
# ----------------------------------------------------------------------------------------------------------------------


def test_init_like_peft_output_unchanged():
    torch.manual_seed(0)
    base = nn.Linear(64, 40, bias=True)
    x = torch.randn(3, 5, 64)
    ref = base(x)
    lora = LoRALinear(base, r=8, alpha=16)
    assert lora.base_layer is base
    assert lora.lora_A.weight.shape == (8, 64) and lora.lora_B.weight.shape == (40, 8)
    assert lora.lora_A.bias is None and lora.lora_B.bias is None
    assert torch.count_nonzero(lora.lora_B.weight) == 0
    # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)), same as PEFT / nn.Linear default
    bound = 1 / math.sqrt(64)
    a = lora.lora_A.weight
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.8 * bound  # actually spread over the interval
    assert torch.equal(lora(x), ref)
    assert lora.weight is base.weight and lora.bias is base.bias
    assert lora.scaling == 2.0


def test_init_bound_matches_peft_layer():
    torch.manual_seed(0)
    host = nn.Module()
    host.q_proj = nn.Linear(256, 32)
    pm = peft.get_peft_model(host, peft.LoraConfig(r=64, lora_alpha=16, target_modules=["q_proj"]))
    theirs = pm.base_model.model.q_proj
    ours = LoRALinear(nn.Linear(256, 32), r=64, alpha=16)
    ta, oa = theirs.lora_A["default"].weight, ours.lora_A.weight
    assert ta.shape == oa.shape
    assert torch.count_nonzero(theirs.lora_B["default"].weight) == 0
    assert theirs.scaling["default"] == ours.scaling
    # same uniform law: same bound, similar std (U(-b, b) has std b / sqrt(3))
    b = 1 / math.sqrt(256)
    for w in (ta, oa):
        assert w.abs().max() <= b
        assert abs(w.std().item() - b / math.sqrt(3)) < 0.05 * b


def test_seeded_init_reproducible():
    def build(seed):
        model = nn.Module()
        model.q_proj = nn.Linear(16, 16)
        model.v_proj = nn.Linear(16, 16)
        apply_lora(model, r=4, target_modules=["q_proj", "v_proj"], seed=seed)
        return model

    a, b, c = build(1), build(1), build(2)
    assert torch.equal(a.q_proj.lora_A.weight, b.q_proj.lora_A.weight)
    assert torch.equal(a.v_proj.lora_A.weight, b.v_proj.lora_A.weight)
    assert not torch.equal(a.q_proj.lora_A.weight, a.v_proj.lora_A.weight)
    assert not torch.equal(a.q_proj.lora_A.weight, c.q_proj.lora_A.weight)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_formula_and_scaling(use_rslora):
    torch.manual_seed(1)
    base = nn.Linear(24, 20, bias=True)
    lora = LoRALinear(base, r=4, alpha=12, use_rslora=use_rslora)
    expected_scaling = 12 / math.sqrt(4) if use_rslora else 12 / 4
    assert lora.scaling == pytest.approx(expected_scaling)
    with torch.no_grad():
        lora.lora_A.weight.normal_()
        lora.lora_B.weight.normal_()
    x = torch.randn(2, 3, 24)
    A, B = lora.lora_A.weight, lora.lora_B.weight
    expected = base(x) + expected_scaling * (x @ A.T @ B.T)
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_differs_from_plain():
    torch.manual_seed(2)
    base = nn.Linear(8, 8)
    plain = LoRALinear(base, r=16, alpha=16)
    rs = LoRALinear(nn.Linear(8, 8), r=16, alpha=16, use_rslora=True)
    assert plain.scaling == 1.0 and rs.scaling == 4.0


def test_dropout_train_vs_eval():
    torch.manual_seed(3)
    base = nn.Linear(32, 32)
    lora = LoRALinear(base, r=8, alpha=8, dropout=0.5)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(4, 32)
    expected = base(x) + lora.scaling * (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)
    lora.train()
    y1, y2 = lora(x), lora(x)
    assert not torch.allclose(y1, expected, atol=1e-4)
    assert not torch.allclose(y1, y2)
    lora.eval()
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora(x), lora(x))
    # dropout=0 uses no dropout module at all
    assert isinstance(LoRALinear(nn.Linear(4, 4), r=2).lora_dropout, nn.Identity)


def test_merged_matches_forward_and_keeps_dtype():
    torch.manual_seed(4)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        base = nn.Linear(16, 12, bias=True).to(dtype)
        lora = LoRALinear(base, r=4, alpha=8)
        assert lora.lora_A.weight.dtype == dtype  # LoRA follows a float base dtype by default
        with torch.no_grad():
            lora.lora_B.weight.normal_()
        merged = lora.merged()
        assert isinstance(merged, nn.Linear) and not isinstance(merged, LoRALinear)
        assert merged.weight.dtype == dtype and merged.bias is not None
        x = torch.randn(5, 16).to(dtype)
        torch.testing.assert_close(merged(x).float(), lora(x).float(), rtol=tol, atol=tol)
        # computed in float32 then cast once
        w = (base.weight.float() + lora.scaling * lora.lora_B.weight.float() @ lora.lora_A.weight.float()).to(dtype)
        assert torch.equal(merged.weight, w)


class _FakeQuantLinear(nn.Module):
    """Stand-in for a 4-bit layer: the weight is not a float parameter, but it can dequantize()."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        scale = lin.weight.detach().abs().max() / 127
        self.register_buffer("qweight", torch.round(lin.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None

    def dequantize(self):
        return self.qweight.float() * self.scale

    def forward(self, x):
        return x @ self.dequantize().T


def test_non_float_base_layer():
    torch.manual_seed(5)
    q = _FakeQuantLinear(nn.Linear(16, 8, bias=False))
    lora = LoRALinear(q, r=2, alpha=4)
    assert lora.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(3, 16)
    merged = lora.merged()
    torch.testing.assert_close(merged(x), lora(x), rtol=1e-5, atol=1e-5)


def test_invalid_args():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), r=2, dropout=1.0)
    with pytest.raises(TypeError):
        LoRALinear(nn.ReLU(), r=2)


# ----------------------------------------------------------------------------------------------------------------------
# apply_lora
# ----------------------------------------------------------------------------------------------------------------------


def test_apply_lora_freezes_and_targets(tmp_path):
    model = _fastsft_model(_tiny_hf_dir(tmp_path))
    names = apply_lora(model, r=4, alpha=8)
    assert len(names) == 2 * len(DEFAULT_TARGET_MODULES)
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    assert not any("lm_head" in n for n in names)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert len(trainable_parameters(model)) == len(trainable)
    with pytest.raises(ValueError, match="already"):
        apply_lora(model)
    # new LoRA modules follow the model's train/eval mode (eval: dropout off)
    m2 = _fastsft_model(_tiny_hf_dir(tmp_path / "m2"))
    apply_lora(m2, dropout=0.3)
    assert not any(m.training for m in lora_modules(m2).values())
    m2.train()
    assert all(m.lora_dropout.training for m in lora_modules(m2).values())


def test_apply_lora_optimizer_step_only_moves_lora(tmp_path):
    model = _fastsft_model(_tiny_hf_dir(tmp_path)).train()
    apply_lora(model, r=4, alpha=8, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.5)
    ids = _ids()
    logits = model.logits(model(ids))
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        if n.endswith("lora_B.weight"):
            assert changed, n
        elif "lora_" not in n:
            assert not changed, n
            assert p.grad is None, n


def test_apply_lora_target_forms(tmp_path):
    path = _tiny_hf_dir(tmp_path)
    # regex (full name)
    m = _fastsft_model(path)
    names = apply_lora(m, target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    # all-linear excludes lm_head
    m = _fastsft_model(path)
    names = apply_lora(m, target_modules="all-linear")
    assert len(names) == 14 and "lm_head" not in names
    # lm_head only when asked
    m = _fastsft_model(path)
    assert apply_lora(m, target_modules=["lm_head"]) == ["lm_head"]
    assert isinstance(m.lm_head, LoRALinear)


def test_apply_lora_no_match_error(tmp_path):
    m = _fastsft_model(_tiny_hf_dir(tmp_path))
    with pytest.raises(ValueError) as ei:
        apply_lora(m, target_modules=["query", "value"])
    msg = str(ei.value)
    assert "query" in msg and "q_proj" in msg and "down_proj" in msg and "lm_head" in msg
    assert not lora_modules(m)
    assert all(p.requires_grad for p in m.parameters())  # nothing frozen on failure


# ----------------------------------------------------------------------------------------------------------------------
# PEFT format
# ----------------------------------------------------------------------------------------------------------------------

ROUND_TRIP_CASES = [
    dict(r=8, alpha=16, target_modules=DEFAULT_TARGET_MODULES, use_rslora=False, dropout=0.05),
    dict(r=4, alpha=32, target_modules=("q_proj", "v_proj", "down_proj"), use_rslora=True, dropout=0.0),
    dict(r=2, alpha=3, target_modules=r"model\.layers\.1\.(self_attn\.o_proj|mlp\.up_proj)", use_rslora=False,
         dropout=0.0),
]


@pytest.mark.parametrize("case", ROUND_TRIP_CASES, ids=["all-default", "rslora-subset", "regex-one-layer"])
def test_fastsft_adapter_loads_in_peft(tmp_path, case):
    base_dir = _tiny_hf_dir(tmp_path)
    model = _fastsft_model(base_dir)
    names = apply_lora(model, **case)
    _randomize_lora(model)
    ids = _ids()
    ours = _fs_logits(model, ids)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model_name_or_path=str(base_dir), lora_config=case)
    assert sorted(os.listdir(adapter)) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]  # no temp leftovers

    cfg = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == case["r"] and cfg["lora_alpha"] == case["alpha"] and cfg["use_rslora"] == case["use_rslora"]
    assert cfg["lora_dropout"] == case["dropout"] and cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False
    assert cfg["inference_mode"] is True and cfg["modules_to_save"] is None
    assert cfg["base_model_name_or_path"] == str(base_dir)
    if isinstance(case["target_modules"], str):
        assert isinstance(cfg["target_modules"], str)  # regex kept so only those layers match
    else:
        assert cfg["target_modules"] == sorted(case["target_modules"])
    keys = set(load_file(adapter / ADAPTER_WEIGHTS_NAME))
    assert keys == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}

    # PEFT parses our config without any warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pcfg = peft.PeftConfig.from_pretrained(str(adapter))
    assert isinstance(pcfg, peft.LoraConfig) and pcfg.r == case["r"]

    pm = peft.PeftModel.from_pretrained(_hf_model(base_dir), str(adapter)).eval()
    theirs = _hf_logits(pm, ids)
    base_only = _hf_logits(_hf_model(base_dir), ids)
    assert (theirs - base_only).abs().max() > 1e-2  # the adapter really does something
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    # PEFT would save exactly the same keys (and values) for that model
    peft_dir = tmp_path / "peft_resaved"
    pm.save_pretrained(str(peft_dir))
    resaved = load_file(peft_dir / ADAPTER_WEIGHTS_NAME)
    mine = load_file(adapter / ADAPTER_WEIGHTS_NAME)
    assert set(resaved) == set(mine)
    for k in mine:
        assert torch.equal(resaved[k], mine[k]), k


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_fastsft(tmp_path, use_rslora):
    base_dir = _tiny_hf_dir(tmp_path)
    torch.manual_seed(11)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"], use_rslora=use_rslora,
        lora_dropout=0.1, task_type="CAUSAL_LM", init_lora_weights=False,  # random B: non-trivial adapter
    )
    pm = peft.get_peft_model(_hf_model(base_dir), cfg).eval()
    adapter = tmp_path / "peft_adapter"
    pm.save_pretrained(str(adapter))
    ids = _ids(seed=3)
    theirs = _hf_logits(pm, ids)

    model = _fastsft_model(base_dir)
    names = load_adapter(model, adapter)
    assert len(names) == 6
    mod = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(mod, LoRALinear) and mod.r == 4 and mod.lora_dropout_p == 0.1
    assert mod.scaling == pytest.approx(8 / 2 if use_rslora else 8 / 4)
    model.eval()
    torch.testing.assert_close(_fs_logits(model, ids), theirs, rtol=0, atol=1e-4)
    # trainable after loading: only LoRA
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_state_dict_round_trip(tmp_path):
    base_dir = _tiny_hf_dir(tmp_path)
    a = _fastsft_model(base_dir)
    apply_lora(a, r=4, target_modules=["q_proj", "o_proj"])
    _randomize_lora(a, seed=5)
    sd = {k: v.clone() for k, v in lora_state_dict(a).items()}
    assert all(k.startswith("base_model.model.model.layers.") for k in sd)
    b = _fastsft_model(base_dir)
    apply_lora(b, r=4, target_modules=["q_proj", "o_proj"])
    load_lora_state_dict(b, sd)
    ids = _ids()
    torch.testing.assert_close(_fs_logits(a, ids), _fs_logits(b, ids), rtol=0, atol=0)
    # in-memory PEFT naming with the adapter name segment is accepted too
    c = _fastsft_model(base_dir)
    apply_lora(c, r=4, target_modules=["q_proj", "o_proj"])
    load_lora_state_dict(c, {k.replace(".weight", ".default.weight"): v for k, v in sd.items()})
    torch.testing.assert_close(_fs_logits(a, ids), _fs_logits(c, ids), rtol=0, atol=0)


def _saved_adapter(tmp_path):
    base_dir = _tiny_hf_dir(tmp_path)
    model = _fastsft_model(base_dir)
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    _randomize_lora(model)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model_name_or_path=str(base_dir), lora_config=None)
    return base_dir, adapter


def test_load_adapter_unexpected_key(tmp_path):
    base_dir, adapter = _saved_adapter(tmp_path)
    wf = adapter / ADAPTER_WEIGHTS_NAME
    sd = load_file(wf)
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    sd["base_model.model.model.layers.0.self_attn.q_projX.lora_A.weight"] = sd.pop(k)
    save_file(sd, wf)
    with pytest.raises(ValueError) as ei:
        load_adapter(_fastsft_model(base_dir), adapter)
    assert "q_projX.lora_A.weight" in str(ei.value) and str(wf) in str(ei.value)


def test_load_adapter_missing_key(tmp_path):
    base_dir, adapter = _saved_adapter(tmp_path)
    wf = adapter / ADAPTER_WEIGHTS_NAME
    sd = load_file(wf)
    k = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del sd[k]
    save_file(sd, wf)
    with pytest.raises(ValueError, match="missing key") as ei:
        load_adapter(_fastsft_model(base_dir), adapter)
    assert k in str(ei.value) and str(wf) in str(ei.value)


def test_load_adapter_shape_mismatch(tmp_path):
    base_dir, adapter = _saved_adapter(tmp_path)
    cfg_path = adapter / ADAPTER_CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 8  # tensors were saved with r=4
    cfg_path.write_text(json.dumps(cfg))
    model = _fastsft_model(base_dir)
    with pytest.raises(ValueError, match="shape mismatch") as ei:
        load_adapter(model, adapter)
    assert "lora_A.weight" in str(ei.value) and ADAPTER_WEIGHTS_NAME in str(ei.value)
    # a failed load leaves the model untouched
    assert not lora_modules(model)
    assert all(p.requires_grad for p in model.parameters())


def test_load_adapter_bad_config(tmp_path):
    base_dir, adapter = _saved_adapter(tmp_path)
    cfg_path = adapter / ADAPTER_CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_adapter(_fastsft_model(base_dir), adapter)
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="LORA"):
        load_adapter(_fastsft_model(base_dir), adapter)
    os.remove(cfg_path)
    with pytest.raises(FileNotFoundError):
        load_adapter(_fastsft_model(base_dir), adapter)
