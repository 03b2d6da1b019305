"""Merging LoRA adapters and exporting full checkpoints (fast, CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import save_tiny_hf_llama
from torch import nn

from fastsft.export import export_main, export_merged, merge_lora
from fastsft.model.lora import LoRALinear, apply_lora, lora_modules, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

VOCAB = 80


def _tiny_hf_dir(tmp_path, *, tie=False, seed=0):
    """A tiny random transformers LlamaForCausalLM saved under tmp_path/base."""
    return save_tiny_hf_llama(tmp_path / "base", vocab_size=VOCAB, tie=tie, seed=seed)


def _fastsft_model(path):
    from fastsft.model.loading import load_model

    return load_model(path, dtype=torch.float32, device="cpu").eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def _make_adapter(tmp_path, base_dir, *, use_rslora=False, targets=("q_proj", "v_proj", "o_proj", "up_proj")):
    model = _fastsft_model(base_dir)
    apply_lora(model, r=4, alpha=8, target_modules=targets, use_rslora=use_rslora, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in lora_modules(model).values():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.2)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, base_model_name_or_path=str(base_dir), lora_config=None)
    return adapter, model


def _peft_logits(base_dir, adapter, ids):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    return _hf_logits(pm, ids)


def test_merge_lora_in_place(tmp_path):
    base_dir = _tiny_hf_dir(tmp_path)
    adapter, model = _make_adapter(tmp_path, base_dir)
    ids = _ids()
    with torch.no_grad():
        before = model.logits(model(ids))
    names = merge_lora(model)
    assert len(names) == 8
    assert not lora_modules(model)
    for n in names:
        mod = model.get_submodule(n)
        assert type(mod) is nn.Linear and not mod.weight.requires_grad
    assert not any(".base_layer." in k or "lora_" in k for k in model.state_dict())
    with torch.no_grad():
        after = model.logits(model(ids))
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert merge_lora(model) == []  # idempotent on a plain model


@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_merged_loads_in_transformers(tmp_path, use_rslora):
    base_dir = _tiny_hf_dir(tmp_path)
    # tokenizer files: the model dir has a set, the adapter dir none -> copied from the model dir
    (base_dir / "tokenizer.json").write_text('{"fake": true}')
    (base_dir / "tokenizer_config.json").write_text("{}")
    (base_dir / "special_tokens_map.json").write_text("{}")
    (base_dir / "chat_template.jinja").write_text("{{ messages }}")
    adapter, _ = _make_adapter(tmp_path, base_dir, use_rslora=use_rslora)
    out = tmp_path / "merged"
    assert export_merged(base_dir, adapter, out) == str(out)

    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja"} <= files
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    ids = _ids()
    expected = _peft_logits(base_dir, adapter, ids)
    base_logits = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval(), ids)
    assert (expected - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(_hf_logits(merged, ids), expected, rtol=0, atol=1e-4)


def test_export_dtype_and_adapter_tokenizer_precedence(tmp_path):
    base_dir = _tiny_hf_dir(tmp_path)
    (base_dir / "tokenizer.json").write_text('{"from": "model"}')
    (base_dir / "tokenizer_config.json").write_text('{"from": "model"}')
    adapter, _ = _make_adapter(tmp_path, base_dir)
    (adapter / "tokenizer_config.json").write_text('{"from": "adapter"}')
    (adapter / "fastsft_tokenizer.json").write_text('{"type": "byte"}')
    out = tmp_path / "merged_bf16"
    assert export_main(["--model", str(base_dir), "--adapter", str(adapter), "--out", str(out),
                        "--dtype", "bfloat16"]) == 0
    # the tokenizer set comes from the adapter dir only (never mixed with the model's)
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    assert (out / "fastsft_tokenizer.json").is_file() and not (out / "tokenizer.json").exists()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == torch.bfloat16
    ids = _ids()
    expected = _peft_logits(base_dir, adapter, ids)
    torch.testing.assert_close(_hf_logits(merged, ids), expected, rtol=0, atol=0.15)


def test_export_main_missing_adapter(tmp_path, capsys):
    base_dir = _tiny_hf_dir(tmp_path)
    missing = tmp_path / "no_such_adapter"
    capsys.readouterr()  # drop transformers' progress output
    rc = export_main(["--model", str(base_dir), "--adapter", str(missing), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastsft export: error:") and "adapter" in err and str(missing) in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_export_main_bad_input(tmp_path, capsys):
    base_dir = _tiny_hf_dir(tmp_path)
    adapter, _ = _make_adapter(tmp_path, base_dir)
    no_weights = tmp_path / "config_only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((base_dir / "config.json").read_text())
    capsys.readouterr()  # drop transformers' progress output
    cases = [
        ["--model", str(base_dir)],  # missing required args
        ["--model", str(base_dir), "--adapter", str(adapter), "--out", str(tmp_path / "o"), "--dtype", "int8"],
        ["--model", str(tmp_path / "nope"), "--adapter", str(adapter), "--out", str(tmp_path / "o")],
        ["--model", str(base_dir), "--adapter", str(base_dir), "--out", str(tmp_path / "o")],  # no adapter files
        ["--model", str(base_dir), "--adapter", str(adapter), "--out", str(adapter)],  # would clobber
        ["--model", str(no_weights), "--adapter", str(adapter), "--out", str(tmp_path / "o")],  # config only
    ]
    for argv in cases:
        assert export_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("fastsft export: error:") and len(err.splitlines()) == 1, (argv, err)
    # an adapter config fastsft cannot apply is bad input too
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert export_main(["--model", str(base_dir), "--adapter", str(adapter), "--out", str(tmp_path / "o")]) == 2
    assert "DoRA" in capsys.readouterr().err


def test_merge_refuses_tied_lm_head(tmp_path):
    base_dir = _tiny_hf_dir(tmp_path, tie=True)
    model = _fastsft_model(base_dir)
    apply_lora(model, target_modules=["q_proj", "lm_head"])
    assert isinstance(model.lm_head, LoRALinear)
    with pytest.raises(ValueError, match="tied"):
        merge_lora(model)
