"""4-bit bases at load time: bnb-4bit checkpoints (written by transformers + bitsandbytes) load as they
are; dense checkpoints quantize weight by weight with `load_in_4bit`; unsupported quantizations are
clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

bnbF = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")

from fastsft.model import load_model  # noqa: E402
from fastsft.model.lora import DEFAULT_TARGET_MODULES  # noqa: E402
from fastsft.model.nf4 import NF4Linear  # noqa: E402

VOCAB = 272  # the byte tokenizer's ids fit (tests the trainer on this base)


def _hf_llama(path, seed=0):
    # in_features multiples of 64: bitsandbytes 0.50 on CPU repacks 4-bit weights for its own matmul
    # assuming whole blocks per row (and its dequantize_4bit is wrong for rows shorter than a block)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6, attention_bias=True)
    transformers.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    return path


def _bnb_config(**kw):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    dense = _hf_llama(root / "dense")
    hf4 = transformers.AutoModelForCausalLM.from_pretrained(dense, quantization_config=_bnb_config(),
                                                            device_map="cpu", dtype=torch.float32)
    hf4.save_pretrained(root / "bnb4")
    return dense, root / "bnb4"


def _ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def _nf4_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, NF4Linear))


def test_bnb_4bit_checkpoint_loads_as_is(checkpoints):
    _, bnb4 = checkpoints
    model = load_model(bnb4)
    names = _nf4_names(model)
    assert len(names) == 2 * len(DEFAULT_TARGET_MODULES)
    saved = load_file(str(bnb4 / "model.safetensors"))
    for name in names:  # the packed codes and quant state are the file's, byte for byte
        layer = model.get_submodule(name)
        assert torch.equal(layer.weight, saved[f"{name}.weight"])
        assert torch.equal(layer.absmax, saved[f"{name}.weight.absmax"])
        if "self_attn" in name:  # attention_bias: the dense biases ride along
            assert torch.equal(layer.bias, saved[f"{name}.bias"])
    # oracle: the dense transformers model with every 4-bit weight replaced by bitsandbytes'
    # dequantize_4bit of the file's codes (bnb's own CPU 4-bit matmul rounds absmax to bf16)
    dense, _ = checkpoints
    hf = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    with torch.no_grad():
        for name in names:
            qs = bnbF.QuantState.from_dict({k[len(name) + 8:]: v for k, v in saved.items()
                                            if k.startswith(f"{name}.weight.")}, device="cpu")
            hf.get_submodule(name).weight.copy_(bnbF.dequantize_4bit(saved[f"{name}.weight"], qs))
        want = hf(_ids()).logits
        got = model.logits(model(_ids()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_load_in_4bit_quantizes_a_dense_checkpoint_like_bitsandbytes(checkpoints):
    dense, bnb4 = checkpoints
    model = load_model(dense, load_in_4bit=True, target_modules=DEFAULT_TARGET_MODULES)
    pre = load_model(bnb4)
    assert _nf4_names(model) == _nf4_names(pre)
    weights = load_file(str(dense / "model.safetensors"))
    for name in _nf4_names(model):
        packed, _ = bnbF.quantize_4bit(weights[f"{name}.weight"], blocksize=64, compress_statistics=True,
                                       quant_type="nf4")
        assert torch.equal(model.get_submodule(name).weight, packed)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model(_ids())), pre.logits(pre(_ids())), rtol=0, atol=0)


def test_load_in_4bit_only_targets(checkpoints):
    dense, _ = checkpoints
    model = load_model(dense, load_in_4bit=True, target_modules=["gate_proj", "down_proj"])
    assert [n.rsplit(".", 1)[-1] for n in _nf4_names(model)] == ["down_proj", "gate_proj"] * 2
    assert type(model.lm_head) is torch.nn.Linear
    with pytest.raises(ValueError, match="no linear layer named"):
        load_model(dense, load_in_4bit=True, target_modules=["nope"])


@pytest.mark.parametrize("change, message", [
    ({"load_in_8bit": True, "_load_in_8bit": True, "load_in_4bit": False, "_load_in_4bit": False}, "8-bit"),
    ({"bnb_4bit_quant_type": "fp4"}, "fp4"),
    ({"quant_method": "gptq"}, "gptq"),
])
def test_unsupported_quantizations_are_clear_errors(checkpoints, tmp_path, change, message):
    _, bnb4 = checkpoints
    d = tmp_path / "q"
    d.mkdir()
    for f in bnb4.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_model(d)


def test_qlora_trains_from_a_bnb_4bit_checkpoint(checkpoints, tmp_path):
    """The trainer on a pre-quantized base: loss falls, the adapter (PEFT format) reloads onto it."""
    from fastsft import config as cfgmod
    from fastsft.model.lora import load_adapter
    from fastsft.train.loop import train

    _, bnb4 = checkpoints
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": "ab" * (i % 3 + 1), "completion": "cd" * (i % 4 + 1)} for i in range(64)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = cfgmod.load(None, {
        "model.path": str(bnb4), "model.tokenizer": "byte", "data.datasets": [str(data)], "data.max_seq_len": 32,
        "train.max_steps": 6, "train.lr": 5e-3, "eval.exact_match": 0, "output.progress": False,
        "output.plot": False, "output.dir": str(tmp_path / "run"),
    })
    summary = train(cfg)
    assert summary["eval_after"]["eval_loss"] < summary["eval_before"]["eval_loss"]
    base = load_model(bnb4)
    assert load_adapter(base, tmp_path / "run" / "adapter")
