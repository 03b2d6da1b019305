"""LLaVA directories: every key layout loads; fastsft's export loads back into transformers'
LlavaForConditionalGeneration with fastsft's logits, and generates."""

import json

import pytest
import torch
from helpers_mm import IMAGE_TOKEN, tiny_llava
from safetensors.torch import load_file, save_file

from fastsft.model.lora import apply_lora
from fastsft.multimodal import MultimodalCausalLM, load_llava, save_llava
from fastsft.multimodal.llava_io import split_llava_key

ATOL = 1e-5


def _inputs(N, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 290, (2, 16), generator=g)
    ids[0, 1:1 + N] = IMAGE_TOKEN
    ids[1, 4:4 + N] = IMAGE_TOKEN
    return ids, torch.randn(2, 3, 28, 28, generator=g)


def _hf_load(path):
    from transformers import LlavaForConditionalGeneration

    m, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return m.eval()


def _perturb(model, seed=3):
    """Move every trainable-in-principle weight, so an export of the original weights cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("vision_tower"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def _greedy(model, ids, pix, steps):
    out = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model.logits(model(out, pixel_values=pix))[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], dim=1)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("tie", [False, True])
def test_export_round_trip(tmp_path, tie):
    hf = tiny_llava("default", -2, tie=tie)
    hf.save_pretrained(tmp_path / "src")
    m = load_llava(tmp_path / "src").eval()
    _perturb(m)
    save_llava(m, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["image_token_index"] == IMAGE_TOKEN and cfg["image_seq_length"] == 4
    back = _hf_load(tmp_path / "out")
    ids, pix = _inputs(m.num_image_tokens)
    with torch.no_grad():
        ours = m.logits(m(ids, pixel_values=pix))
        theirs = back(input_ids=ids, pixel_values=pix).logits
        before = hf(input_ids=ids, pixel_values=pix).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    assert (before - ours).abs().max() > 1e-3  # the export holds the changed weights
    # transformers generates from the export, greedily the same tokens as fastsft
    one, one_pix = ids[:1], pix[:1]
    gen = back.generate(input_ids=one, pixel_values=one_pix, attention_mask=torch.ones_like(one), max_new_tokens=5,
                        do_sample=False, eos_token_id=None, pad_token_id=0)
    assert gen.shape == (1, one.shape[1] + 5)
    assert torch.equal(gen[:, one.shape[1]:], _greedy(m, one, one_pix, 5))
    # and fastsft reads its own export back unchanged
    again = load_llava(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.logits(again(ids, pixel_values=pix)), ours, atol=0, rtol=0)


def test_linear_projector_exports_as_identity_second_layer(tmp_path):
    hf = tiny_llava("full", -1)
    hf.save_pretrained(tmp_path / "src")
    src = load_llava(tmp_path / "src")
    m = MultimodalCausalLM(src.vision_tower, src.language_model, projector_type="linear",
                           vision_feature_layer=-1, vision_feature_select_strategy="full",
                           image_token_id=IMAGE_TOKEN).eval()
    assert not hasattr(m.multi_modal_projector, "linear_2")
    save_llava(m, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["projector_hidden_act"] == "linear"
    back = _hf_load(tmp_path / "out")
    ids, pix = _inputs(m.num_image_tokens)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pix).logits, m.logits(m(ids, pixel_values=pix)),
                                   atol=ATOL, rtol=0)


LAYOUTS = {  # the on-disk key of three tensors in each layout
    "hub": ("vision_tower.vision_model.embeddings.class_embedding", "language_model.model.norm.weight",
            "language_model.lm_head.weight"),
    "transformers5_save": ("vision_tower.embeddings.class_embedding", "language_model.model.norm.weight",
                           "language_model.lm_head.weight"),
    "transformers4_52": ("model.vision_tower.vision_model.embeddings.class_embedding",
                         "model.language_model.norm.weight", "lm_head.weight"),
}


def _to_layout(key: str, layout: str) -> str:
    part, rest = split_llava_key(key)
    if part == "projector":
        return ("model." if layout == "transformers4_52" else "") + "multi_modal_projector." + rest
    if part == "vision":
        return {"hub": "vision_tower.vision_model.", "transformers5_save": "vision_tower.",
                "transformers4_52": "model.vision_tower.vision_model."}[layout] + rest
    if rest.startswith("lm_head."):
        return ("language_model." if layout != "transformers4_52" else "") + rest
    return ("language_model." if layout != "transformers4_52" else "model.language_model.") + \
        (rest if layout != "transformers4_52" else rest[len("model."):])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_key_layout_loads(tmp_path, layout):
    hf = tiny_llava("default", -2)
    hf.save_pretrained(tmp_path / "src")
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    renamed = {_to_layout(k, layout): v for k, v in state.items()}
    assert set(LAYOUTS[layout]) <= set(renamed)
    d = tmp_path / layout
    d.mkdir()
    save_file(renamed, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    m = load_llava(d).eval()
    ids, pix = _inputs(m.num_image_tokens)
    with torch.no_grad():
        torch.testing.assert_close(m.logits(m(ids, pixel_values=pix)), hf(input_ids=ids, pixel_values=pix).logits,
                                   atol=ATOL, rtol=0)


def test_load_errors(tmp_path):
    hf = tiny_llava("default", -2)
    hf.save_pretrained(tmp_path / "src")
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    state["something.else"] = torch.zeros(1)
    d = tmp_path / "bad"
    d.mkdir()
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    with pytest.raises(ValueError, match="outside the vision tower, projector and language model"):
        load_llava(d)
    cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    del state["something.else"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        load_llava(d)
    m = load_llava(tmp_path / "src")
    apply_lora(m.language_model, r=2, alpha=4)
    with pytest.raises(ValueError, match="merge them first"):
        save_llava(m, tmp_path / "out")
