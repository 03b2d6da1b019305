"""LLaVA-style vision-language model: a frozen vision tower, a trainable projector, fastsft's decoder.

    v   = vision_tower(pixels).hidden_states[vision_feature_layer]     [n, P (+1 CLS), Dv]   no_grad, eval
    v   = v[:, 1:] ("default": CLS dropped) | v ("full")                [n, N, Dv]
    e   = projector(v)                                                  [n, N, D]   linear | mlp2x_gelu
    x   = embed(input_ids) with x[image_starts[k] + j] = e[k, j]        [B, T, D]
    h   = decoder(inputs_embeds=x, position_ids, cu_seqlens, ...)       [B, T, D]   hidden states, no logits

Each image occupies N consecutive placeholder tokens (``image_token_id``, labels ignored) in input_ids; to
packing, attention and the loss they are tokens like any other. ``image_starts`` are offsets over the
flattened ``[B * T]`` tokens, so one rule covers padded and packed rows; without them the placeholders are
found by id and filled in order (as transformers' ``masked_scatter``). The decoder is fastsft's CausalLM,
unchanged (its kernels, LoRA, QLoRA and the fused loss apply); its ``inputs_embeds`` entry point is the
only hook. The vision tower is transformers' ``CLIPVisionModel`` / ``SiglipVisionModel``; the projector's
submodules are named as transformers' ``LlavaMultiModalProjector`` (``linear_1``, ``act``, ``linear_2``) so
its weights map 1:1 (``linear`` keeps ``linear_1`` only).
"""

from __future__ import annotations

import json
from pathlib import Path
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from fastsft.model.llama import CausalLM

__all__ = ["Projector", "MultimodalCausalLM", "VisionFeatureCache", "VISION_MODEL_TYPES", "PROJECTOR_TYPES",
           "FEATURE_STRATEGIES", "load_vision_tower", "vision_tower_from_config", "num_image_tokens",
           "splice_image_features"]

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")
FEATURE_STRATEGIES = ("default", "full")
# model_type of a vision tower's config -> transformers class; a full CLIP/SigLIP model's directory
# (model_type clip / siglip) gives its vision half
VISION_MODEL_TYPES = {"clip_vision_model": "CLIPVisionModel", "clip": "CLIPVisionModel",
                      "siglip_vision_model": "SiglipVisionModel", "siglip": "SiglipVisionModel"}


# --------------------------------------------------------------------------- vision tower
def _vision_class(model_type: str):
    import transformers

    if model_type not in VISION_MODEL_TYPES:
        raise ValueError(f"vision tower model_type {model_type!r} is not supported; fastsft takes "
                         f"{', '.join(sorted(VISION_MODEL_TYPES))}")
    return getattr(transformers, VISION_MODEL_TYPES[model_type])


def _vision_config(config):
    """A transformers vision config from a config object or dict (a full CLIP/SigLIP config: its vision part)."""
    import transformers

    if isinstance(config, dict):
        mt = config.get("model_type", "clip_vision_model")
        if mt in ("clip", "siglip"):
            config = dict(config.get("vision_config") or {})
            mt = f"{mt}_vision_model"
        cls = {"clip_vision_model": transformers.CLIPVisionConfig,
               "siglip_vision_model": transformers.SiglipVisionConfig}.get(mt)
        if cls is None:
            raise ValueError(f"vision tower model_type {mt!r} is not supported; fastsft takes "
                             f"{', '.join(sorted(VISION_MODEL_TYPES))}")
        return cls(**{k: v for k, v in config.items() if k != "model_type"})
    if getattr(config, "model_type", None) in ("clip", "siglip"):
        return config.vision_config
    return config


def _freeze(tower: nn.Module) -> nn.Module:
    tower.requires_grad_(False)
    return tower.eval()


def vision_tower_from_config(config, dtype: torch.dtype = torch.float32, seed: Optional[int] = None) -> nn.Module:
    """A randomly initialised, frozen vision tower from a transformers vision config (or its dict)."""
    config = _vision_config(config)
    if seed is not None:
        torch.manual_seed(seed)
    tower = _vision_class(config.model_type)(config)
    return _freeze(tower.to(dtype))


def load_vision_tower(path: Union[str, Path], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A frozen, eval-mode vision tower from a local Hugging Face directory (CLIP or SigLIP, the vision
    model alone or the full two-tower model: its vision half)."""
    d = Path(path).expanduser()
    cfg = d / "config.json"
    if not cfg.is_file():
        raise ValueError(f"vision tower {str(path)!r}: no config.json in {d}")
    with open(cfg, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    cls = _vision_class(model_type)
    tower = cls.from_pretrained(str(d), dtype=dtype, local_files_only=True)
    return _freeze(tower)


def num_image_tokens(vision_config, strategy: str = "default") -> int:
    """Tokens one image takes in the decoder: its patches, plus CLIP's CLS token under "full"."""
    if strategy not in FEATURE_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy must be one of {FEATURE_STRATEGIES}, got {strategy!r}")
    vc = _vision_config(vision_config)
    patches = (vc.image_size // vc.patch_size) ** 2
    cls_token = 1 if vc.model_type == "clip_vision_model" else 0  # SigLIP has none
    # "default" drops the first position whatever it is, as transformers does
    return patches + cls_token - (1 if strategy == "default" else 0)


# --------------------------------------------------------------------------- projector
class Projector(nn.Module):
    """Vision features -> decoder embeddings: ``linear`` (linear_1) or ``mlp2x_gelu`` (linear_1, act, linear_2),
    named as transformers' LlavaMultiModalProjector. ``act``: a transformers activation name (LLaVA: gelu)."""

    def __init__(self, in_features: int, out_features: int, kind: str = "mlp2x_gelu", act: str = "gelu",
                 bias: bool = True):
        super().__init__()
        if kind not in PROJECTOR_TYPES:
            raise ValueError(f"projector must be one of {PROJECTOR_TYPES}, got {kind!r}")
        from transformers.activations import ACT2FN

        self.kind, self.act_name = kind, act
        self.linear_1 = nn.Linear(in_features, out_features, bias=bias)
        if kind == "mlp2x_gelu":
            self.act = ACT2FN[act]
            self.linear_2 = nn.Linear(out_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(self.act(x))
        return x


# --------------------------------------------------------------------------- splicing
def splice_image_features(embeds: torch.Tensor, features: torch.Tensor, input_ids: torch.Tensor,
                          image_token_id: Optional[int], image_starts: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
    """``embeds`` [B, T, D] (or [T, D]) with image k's N features written at tokens ``image_starts[k] + j``
    (offsets over the flattened tokens), out of place so gradients reach the features. Without
    ``image_starts`` the placeholders (``input_ids == image_token_id``) take the features in order. Every
    written position must hold the placeholder id, and every placeholder must be written."""
    n, N, D = features.shape
    flat_ids = input_ids.reshape(-1)
    is_placeholder = flat_ids == image_token_id if image_token_id is not None else None
    if image_starts is None:
        if is_placeholder is None:
            raise ValueError("splice_image_features needs image_starts or an image_token_id")
        idx = is_placeholder.nonzero().squeeze(-1)
        if idx.numel() != n * N:
            raise ValueError(f"{idx.numel()} image placeholder tokens for {n} images of {N} tokens ({n * N})")
    else:
        image_starts = image_starts.to(device=embeds.device, dtype=torch.long).reshape(-1)
        if image_starts.numel() != n:
            raise ValueError(f"{image_starts.numel()} image_starts for {n} images")
        idx = (image_starts[:, None] + torch.arange(N, device=embeds.device)).reshape(-1)
        if n and (int(idx.min()) < 0 or int(idx.max()) >= flat_ids.numel()):
            raise ValueError(f"image tokens at {int(idx.min())}..{int(idx.max())} lie outside the "
                             f"{flat_ids.numel()} tokens of the batch")
        if is_placeholder is not None:
            covered = int(is_placeholder[idx].sum())
            if covered != idx.numel() or int(is_placeholder.sum()) != idx.numel():
                raise ValueError(f"image_starts do not match the placeholders: {covered} of the {idx.numel()} "
                                 f"image positions hold image_token_id {image_token_id}, and the batch has "
                                 f"{int(is_placeholder.sum())} placeholders")
    flat = embeds.reshape(-1, D)
    return flat.index_copy(0, idx, features.reshape(-1, D).to(flat.dtype)).view(embeds.shape)


# --------------------------------------------------------------------------- the model
class MultimodalCausalLM(nn.Module):
    """Vision tower (frozen, eval, no_grad) + projector + fastsft decoder. ``forward`` returns the decoder's
    final-normed hidden states; the loss owns the LM head (``lm_head``, ``logits`` as CausalLM's)."""

    def __init__(self, vision_tower: nn.Module, language_model: CausalLM, *, projector: Optional[Projector] = None,
                 projector_type: str = "mlp2x_gelu", projector_act: str = "gelu", projector_bias: bool = True,
                 vision_feature_layer: Union[int, Sequence[int]] = -2,
                 vision_feature_select_strategy: str = "default", image_token_id: Optional[int] = None):
        super().__init__()
        if vision_feature_select_strategy not in FEATURE_STRATEGIES:
            raise ValueError(f"vision_feature_select_strategy must be one of {FEATURE_STRATEGIES}, "
                             f"got {vision_feature_select_strategy!r}")
        layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
        depth = vision_tower.config.num_hidden_layers
        for layer in layers:  # hidden_states has depth + 1 entries (the embeddings first)
            if not -(depth + 1) <= layer <= depth:
                raise ValueError(f"vision_feature_layer {layer} is outside the tower's {depth + 1} hidden states")
        self.vision_tower = _freeze(vision_tower)
        self.language_model = language_model
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token_id = image_token_id
        if projector is None:
            projector = Projector(vision_tower.config.hidden_size * len(layers), language_model.config.hidden_size,
                                  kind=projector_type, act=projector_act, bias=projector_bias)
            projector.to(dtype=language_model.dtype, device=language_model.device)
        self.multi_modal_projector = projector

    # -- pieces ---------------------------------------------------------------
    @property
    def config(self):
        """The decoder's ModelConfig (what the loss and the loop read: final_logit_softcapping, ...)."""
        return self.language_model.config

    @property
    def model(self):
        """The decoder's backbone (``Objective`` sets ``model.model.neftune_alpha``)."""
        return self.language_model.model

    @property
    def lm_head(self) -> nn.Linear:
        return self.language_model.lm_head

    @property
    def num_image_tokens(self) -> int:
        return num_image_tokens(self.vision_tower.config, self.vision_feature_select_strategy)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.logits(hidden)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_tower.eval()  # frozen: no dropout, whatever the rest does
        return self

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    # -- image features ---------------------------------------------------------
    @torch.no_grad()
    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's selected features [n, N, Dv * layers] for images [n, C, H, W], without gradients."""
        tower = self.vision_tower
        dtype = next(tower.parameters()).dtype
        out = tower(pixel_values.to(dtype=dtype, device=next(tower.parameters()).device), output_hidden_states=True)
        layers = ([self.vision_feature_layer] if isinstance(self.vision_feature_layer, int)
                  else self.vision_feature_layer)
        feats = [out.hidden_states[i] for i in layers]
        if self.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def image_features(self, pixel_values: Optional[torch.Tensor] = None,
                       vision_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Projected image embeddings [n, N, D] from pixels, or from precomputed (cached) tower features."""
        if vision_features is None:
            vision_features = self.vision_features(pixel_values)
        proj = self.multi_modal_projector
        return proj(vision_features.to(dtype=proj.linear_1.weight.dtype, device=proj.linear_1.weight.device))

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_starts: Optional[torch.Tensor] = None,
              vision_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The decoder's input embeddings with the images' features spliced in at their placeholders."""
        embeds = self.language_model.model.embed(input_ids)
        if pixel_values is None and vision_features is None:
            if self.image_token_id is not None and bool((input_ids == self.image_token_id).any()):
                raise ValueError("input_ids hold image placeholder tokens but no images were given")
            return embeds
        feats = self.image_features(pixel_values, vision_features)
        return splice_image_features(embeds, feats, input_ids, self.image_token_id, image_starts)

    # -- forward ----------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, *, pixel_values: Optional[torch.Tensor] = None,
                image_starts: Optional[torch.Tensor] = None, vision_features: Optional[torch.Tensor] = None,
                kv_cache=None, seq_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Hidden states [B, T, D] (or [T, D] for a 1-D row), as CausalLM.forward, for tokens whose image
        placeholders take the features of ``pixel_values`` [n, C, H, W] (or of precomputed ``vision_features``
        [n, N, Dv]): image k at flattened offsets ``image_starts[k] .. + N`` (packed or padded rows alike), or,
        without image_starts, the k-th run of placeholders."""
        embeds = self.embed(input_ids, pixel_values, image_starts, vision_features)
        return self.language_model(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, kv_cache=kv_cache,
                                   seq_lengths=seq_lengths, inputs_embeds=embeds)

    def trainable(self, what: str) -> list[nn.Parameter]:
        """Set requires_grad for a training stage and return the trainable parameters: "projector" (stage 1),
        "projector+lora" (LoRA already applied to ``language_model``), "projector+full". The tower stays frozen."""
        from fastsft.model.lora import lora_modules

        if what not in ("projector", "projector+lora", "projector+full"):
            raise ValueError(f"trainable must be projector, projector+lora or projector+full, got {what!r}")
        lora = lora_modules(self.language_model)
        if what == "projector+lora" and not lora:
            raise ValueError("trainable 'projector+lora': the language model has no LoRA layers (apply_lora first)")
        for name, p in self.language_model.named_parameters():
            is_lora = ".lora_A." in name or ".lora_B." in name
            p.requires_grad_(what == "projector+full" or (what == "projector+lora" and is_lora))
        self.multi_modal_projector.requires_grad_(True)
        self.vision_tower.requires_grad_(False)
        return [p for p in self.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- feature cache
class VisionFeatureCache:
    """The frozen tower's features per image, computed once: ``cache(keys, load_pixels) -> [n, N, Dv]`` runs
    the tower only on the images not cached (``load_pixels(missing_keys) -> [m, C, H, W]``, e.g. an
    ``ImageLoader``), keeping at most ``max_images`` (least recently used out) on ``device`` (default: where
    the tower computes). The tower is frozen and in eval mode, so a cached feature is the one it would
    compute again; the projector, which trains, runs on them every step (``forward(vision_features=...)``).
    Memory: N * Dv * bytes per image (576 * 1024 * 2 = 1.2 MB for CLIP ViT-L/14-336 in bf16)."""

    def __init__(self, model: MultimodalCausalLM, max_images: int, device: Optional[torch.device] = None):
        self.model, self.max_images, self.device = model, int(max_images), device
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def __call__(self, keys: Sequence[str], load_pixels: Callable[[list], torch.Tensor]) -> torch.Tensor:
        keys = [str(k) for k in keys]
        missing = list(dict.fromkeys(k for k in keys if k not in self._store))
        fresh = {}
        if missing:
            pixels = load_pixels(missing)
            # one image a forward: an image's features must not depend on which images missed with it (a batched
            # matmul may round differently by batch size), or a resumed run, whose cache starts empty, would
            # not replay the uninterrupted run bit for bit
            fresh = {k: self.model.vision_features(pixels[i : i + 1])[0] for i, k in enumerate(missing)}
        self.hits += len(keys) - len(missing)  # images served without a tower forward of their own
        self.misses += len(missing)
        out = []
        for k in keys:
            f = fresh.get(k)
            if f is None:
                f = self._store[k]
                self._store.move_to_end(k)
            out.append(f)
        for k, f in fresh.items():
            if self.max_images > 0:
                self._store[k] = f if self.device is None else f.to(self.device)
                if len(self._store) > self.max_images:
                    self._store.popitem(last=False)
        dev = out[0].device if out else None
        return torch.stack([f.to(dev) for f in out]) if out else torch.zeros(0)
