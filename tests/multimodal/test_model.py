"""MultimodalCausalLM: parity with transformers' LlavaForConditionalGeneration, splicing, freezing, and packed
rows of multimodal records that give each record the loss and gradients it has alone."""

import numpy as np
import pytest
import torch
from helpers_mm import IMAGE_TOKEN, tiny_llava
from PIL import Image

from fastsft.data import ByteTokenizer
from fastsft.loss import fused_linear_cross_entropy
from fastsft.model import ModelConfig, build_model
from fastsft.model.lora import apply_lora, lora_modules
from fastsft.multimodal import MultimodalCausalLM, load_llava, splice_image_features, vision_tower_from_config
from fastsft.multimodal.data import (ImageLoader, build_llava_store, image_processor, packed_image_layout,
                                     padded_image_layout)
from fastsft.packing import pack
from fastsft.train.batching import collate, collate_packed

ATOL = 1e-5


def _batch(N, seed=0):
    """Two rows of 24 tokens: row 0 opens with an image, row 1 has two (one right after the other's text)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 290, (2, 24), generator=g)
    ids[0, :N] = IMAGE_TOKEN
    ids[1, 3:3 + N] = IMAGE_TOKEN
    ids[1, 4 + N:4 + 2 * N] = IMAGE_TOKEN
    labels = ids.clone()
    labels[ids == IMAGE_TOKEN] = -100
    labels[1, :3] = -100
    pix = torch.randn(3, 3, 28, 28, generator=g)
    return ids, labels, pix


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("layer", [-2, -1, [-2, -1]])
def test_forward_and_loss_match_transformers(tmp_path, strategy, layer):
    hf = tiny_llava(strategy, layer)
    hf.save_pretrained(tmp_path)
    m = load_llava(tmp_path).eval()
    N = m.num_image_tokens
    assert N == (4 if strategy == "default" else 5)
    ids, labels, pix = _batch(N)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pix, labels=labels)
        hidden = m(ids, pixel_values=pix)
        other = m(ids, pixel_values=pix.flip(0))  # the images matter: other images, other logits
        loss = fused_linear_cross_entropy(hidden, m.lm_head.weight, labels, shift=True, kernels="off")
    torch.testing.assert_close(m.logits(hidden), ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, ref.loss, atol=ATOL, rtol=0)
    assert (m.logits(other) - ref.logits).abs().max() > 1e-3
    # features spliced at explicit flat offsets are the same as by placeholder order
    starts = torch.tensor([0, 24 + 3, 24 + 4 + N])
    with torch.no_grad():
        torch.testing.assert_close(m(ids, pixel_values=pix, image_starts=starts), hidden, atol=0, rtol=0)


def test_siglip_tower_matches_transformers(tmp_path):
    from transformers import LlavaForConditionalGeneration, SiglipVisionConfig

    cfg = tiny_llava("full", -1).config
    cfg.vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=14, vision_use_head=False)
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    m = load_llava(tmp_path).eval()
    assert m.num_image_tokens == 4  # SigLIP: patches only, no CLS
    ids, labels, pix = _batch(4)
    with torch.no_grad():
        torch.testing.assert_close(m.logits(m(ids, pixel_values=pix)), hf(input_ids=ids, pixel_values=pix).logits,
                                   atol=ATOL, rtol=0)


def test_splice_checks_positions():
    emb = torch.zeros(2, 6, 3)
    ids = torch.tensor([[9, 9, 1, 2, 3, 4], [1, 9, 9, 2, 9, 9]])
    feats = torch.arange(18, dtype=torch.float32).view(3, 2, 3)
    out = splice_image_features(emb, feats, ids, 9)
    flat = out.view(-1, 3)
    assert torch.equal(flat[[0, 1, 7, 8, 10, 11]], feats.view(-1, 3))
    assert torch.equal(flat[[2, 3, 4, 5, 6, 9]], torch.zeros(6, 3))
    # explicit offsets may list the images in any order
    out2 = splice_image_features(emb, feats[[2, 0, 1]], ids, 9, torch.tensor([10, 0, 7]))
    assert torch.equal(out, out2)
    with pytest.raises(ValueError, match="do not match the placeholders"):
        splice_image_features(emb, feats, ids, 9, torch.tensor([0, 6, 10]))
    with pytest.raises(ValueError, match="do not match the placeholders"):  # a placeholder left unfilled
        splice_image_features(emb, feats[:2], ids, 9, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="6 image placeholder tokens for 2 images"):
        splice_image_features(emb, feats[:2], ids, 9)
    with pytest.raises(ValueError, match="outside"):
        splice_image_features(emb, feats[:1], ids, None, torch.tensor([11]))


# ----------------------------------------------------------------------------------------------------
# a fastsft-built model on the byte tokenizer, and LLaVA records with real (generated) image files

IMG_ID = 261  # an unused id of the byte tokenizer
VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 28, "patch_size": 14}


def _mm_model(strategy="default", projector="mlp2x_gelu"):
    lm = build_model(ModelConfig(model_type="llama", vocab_size=272, hidden_size=48, intermediate_size=96,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, tie_word_embeddings=True), seed=0)
    tower = vision_tower_from_config(VISION, seed=0)
    return MultimodalCausalLM(tower, lm, projector_type=projector, vision_feature_select_strategy=strategy,
                              image_token_id=IMG_ID)


def _images(tmp_path):
    colours = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (200, 200, 0)]
    for k, c in enumerate(colours):
        im = Image.new("RGB", (36 + 4 * k, 30), c)
        im.paste((255, 255, 255), (4 * k, 3, 4 * k + 9, 12))
        im.save(tmp_path / f"{k}.png")


RECORDS = [
    {"image": ["0.png", "1.png"], "conversations": [{"from": "human", "value": "<image> vs <image>: which is red?"},
                                                    {"from": "gpt", "value": "the first"}]},
    {"image": "2.png", "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "blue"}]},
    {"conversations": [{"from": "human", "value": "no picture"}, {"from": "gpt", "value": "fine"}]},
    {"image": "3.png", "conversations": [{"from": "human", "value": "<image>"},
                                         {"from": "gpt", "value": "yellow box"}]},
]


def _loss_and_grads(model, batch, pixels, layout, keep=None):
    """Summed CE of the batch (only the tokens where ``keep`` is true), and the trainable parameters' gradients."""
    targets = batch["targets"].clone()
    if keep is not None:
        targets[~keep] = -100
    model.zero_grad()
    args = {"cu_seqlens": batch["cu_seqlens"], "max_seqlen": batch["max_seqlen"]} if "cu_seqlens" in batch else {}
    hidden = model(batch["input_ids"], batch["position_ids"], pixel_values=pixels,
                   image_starts=layout["image_starts"], **args)
    loss = fused_linear_cross_entropy(hidden, model.lm_head.weight, targets, reduction="sum", kernels="off")
    loss.backward()
    return loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()  # text only: no projector
                           for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode, add_bos", [("instruct", "auto"), ("caption", False)])
def test_packed_row_gives_each_record_its_own_loss_and_gradients(tmp_path, mode, add_bos):
    """Caption mode without BOS puts every record's first image at its very first token: at the row's start and
    right after the previous record."""
    _images(tmp_path)
    model = _mm_model()
    apply_lora(model.language_model, r=4, alpha=8, seed=0)
    with torch.no_grad():  # lora_B starts at zero: move it so the A gradients are not all zero
        for mod in lora_modules(model.language_model).values():
            mod.lora_B.weight.normal_(0, 0.05)
    params = model.trainable("projector+lora")
    assert any("multi_modal_projector" in n for n, p in model.named_parameters() if p.requires_grad)
    model.train()
    assert not model.vision_tower.training
    N = model.num_image_tokens
    store, report = build_llava_store(RECORDS, ByteTokenizer(), image_dir=tmp_path, image_token_id=IMG_ID,
                                      num_image_tokens=N, max_seq_len=200, mode=mode, add_bos=add_bos)
    assert report["images"] == 4 and report["text_only"] == 1
    if mode == "caption":
        assert all(store.record_images(i)[0][1] == 0 for i in (0, 1, 3))
    loader = ImageLoader(image_processor(VISION))
    plan = pack(store.lengths, 200, strategy="bfd")
    assert plan.num_bins == 1 and len(plan.items) == 4  # one packed row holds every record
    width = 200
    batch = collate_packed(store.tokens, plan, np.arange(1), pad_id=256, width=width)
    layout = packed_image_layout(store, plan, np.arange(1), width)
    pixels = loader(store.image_paths[layout["image_index"].numpy()])
    # image features land at the placeholders of their own records
    flat = batch["input_ids"].view(-1)
    for s in layout["image_starts"]:
        assert bool((flat[s:s + N] == IMG_ID).all())
    assert int((flat == IMG_ID).sum()) == 4 * N

    seq = torch.zeros(width, dtype=torch.long)  # which packed record each token belongs to
    starts = batch["cu_seqlens"].long()
    for k in range(len(plan.items)):
        seq[starts[k]:starts[k + 1]] = k
    total = 0.0
    for k, rec in enumerate(plan.items):
        loss_p, grads_p = _loss_and_grads(model, batch, pixels, layout, keep=(seq == k)[None])
        solo = collate(store.tokens, np.array([rec]), pad_id=256)
        solo_layout = padded_image_layout(store, np.array([rec]), solo["input_ids"].shape[1])
        solo_pix = loader(store.image_paths[solo_layout["image_index"].numpy()])
        loss_s, grads_s = _loss_and_grads(model, solo, solo_pix if len(solo_pix) else None, solo_layout)
        assert loss_s > 0
        torch.testing.assert_close(loss_p, loss_s, atol=ATOL, rtol=0)
        assert set(grads_p) == set(grads_s) and len(grads_p) == len(params)
        for name in grads_s:
            torch.testing.assert_close(grads_p[name], grads_s[name], atol=ATOL, rtol=1e-4, msg=name)
        if store.images_per_record()[rec]:
            assert grads_s["multi_modal_projector.linear_1.weight"].abs().sum() > 0
        total += float(loss_s)
    loss_all, _ = _loss_and_grads(model, batch, pixels, layout)
    assert abs(float(loss_all) - total) < 1e-4
    assert all(p.grad is None for p in model.vision_tower.parameters())


def test_vision_tower_stays_frozen_and_in_eval():
    model = _mm_model(strategy="full", projector="linear")
    model.train()
    assert model.language_model.training and not model.vision_tower.training
    assert not any(p.requires_grad for p in model.vision_tower.parameters())
    params = model.trainable("projector")
    assert {id(p) for p in params} == {id(p) for p in model.multi_modal_projector.parameters()}
    ids = torch.full((1, 12), 65)
    ids[0, 2:2 + model.num_image_tokens] = IMG_ID
    hidden = model(ids, pixel_values=torch.randn(1, 3, 28, 28))
    hidden.sum().backward()
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert model.language_model.lm_head.weight.grad is None
    with pytest.raises(ValueError, match="no LoRA layers"):
        model.trainable("projector+lora")
    with pytest.raises(ValueError, match="placeholder tokens but no images"):
        model(ids)


def test_feature_cache_runs_the_tower_once_per_image(tmp_path):
    from fastsft.multimodal import VisionFeatureCache

    _images(tmp_path)
    model = _mm_model()
    loader = ImageLoader(image_processor(VISION))
    asked = []

    def load(keys):
        asked.append(list(keys))
        return loader(keys)

    cache = VisionFeatureCache(model, max_images=2)
    paths = [str(tmp_path / f"{k}.png") for k in range(4)]
    first = cache([paths[0], paths[1], paths[0]], load)
    assert asked == [[paths[0], paths[1]]]  # a repeated image is computed once
    # (to fp32 rounding: a batch of 3 images may take a different matmul path than the cache's batch of 2)
    torch.testing.assert_close(first, model.vision_features(loader([paths[0], paths[1], paths[0]])))
    again = cache([paths[1], paths[2]], load)
    assert asked[-1] == [paths[2]] and len(cache) == 2  # 1.png from the cache; 0.png evicted (least recent)
    torch.testing.assert_close(again, model.vision_features(loader([paths[1], paths[2]])))
    cache([paths[0]], load)
    assert asked[-1] == [paths[0]] and (cache.hits, cache.misses) == (2, 4)
    # the cached features give the same hidden states as pixels
    ids = torch.full((1, 10), 65)
    ids[0, 3:3 + model.num_image_tokens] = IMG_ID
    with torch.no_grad():
        torch.testing.assert_close(model(ids, vision_features=cache([paths[2]], load)),
                                   model(ids, pixel_values=loader([paths[2]])), atol=0, rtol=0)
