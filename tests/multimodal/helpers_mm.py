"""Tiny LLaVA models for the multimodal tests (random weights, nothing downloaded)."""

import torch

VOCAB = 300
IMAGE_TOKEN = 299


def tiny_llava_config(strategy="default", layer=-2, *, image_size=28, tie=False, act="gelu"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=image_size, patch_size=14, projection_dim=16)
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    n = (image_size // 14) ** 2 + (0 if strategy == "default" else 1)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, image_seq_length=n,
                       vision_feature_select_strategy=strategy, vision_feature_layer=layer,
                       projector_hidden_act=act, tie_word_embeddings=tie)


def tiny_llava(strategy="default", layer=-2, seed=0, **kw):
    """A transformers LlavaForConditionalGeneration in fp32 eval mode, norms and biases moved off their init."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    m = LlavaForConditionalGeneration(tiny_llava_config(strategy, layer, **kw)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith(".bias") or "multi_modal_projector" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return m
