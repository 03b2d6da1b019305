"""LLaVA checkpoints in and out: ``LlavaForConditionalGeneration`` directories <-> MultimodalCausalLM.

A LLaVA directory is ``config.json`` (``model_type: llava``: ``vision_config``, ``text_config``,
``image_token_index``, ``projector_hidden_act``, ``vision_feature_layer``, ``vision_feature_select_strategy``,
``multimodal_projector_bias``) plus safetensors. Its tensors come in several layouts, all read here:

    llava-hf on the Hub, and transformers 5's save_pretrained (it writes the original layout back):
        vision_tower.[vision_model.]*   multi_modal_projector.*   language_model.model.*   language_model.lm_head.*
    transformers 4.52+ (its in-memory names):
        model.vision_tower.[vision_model.]*   model.multi_modal_projector.*   model.language_model.*   lm_head.*

Export writes the first (the Hub's llava-1.5 layout, with ``vision_tower.vision_model.``), which transformers
4.x and 5.x and vLLM load. A ``linear`` projector is written as the two-layer one transformers knows, with an
identity activation (``projector_hidden_act: linear``) and ``linear_2`` the identity: the same function.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fastsft.model.config import ModelConfig
from fastsft.model.llama import CausalLM

from .model import MultimodalCausalLM, Projector, vision_tower_from_config

__all__ = ["load_llava", "save_llava", "llava_config_dict", "split_llava_key"]

_TEXT, _VISION, _PROJECTOR = "language", "vision", "projector"


def split_llava_key(key: str) -> Optional[tuple[str, str]]:
    """(part, key within the part) for a LLaVA checkpoint key in any of the layouts above: the language
    model's keys as fastsft's CausalLM names them (``model.layers...``, ``lm_head.weight``), the tower's
    without ``vision_model.``, the projector's as Projector names them. None for a key of no part."""
    if key.startswith("model.") and key.split(".", 2)[1] in ("vision_tower", "multi_modal_projector", "language_model"):
        rest = key[len("model."):]
        if rest.startswith("language_model."):
            return _TEXT, "model." + rest[len("language_model."):]
        key = rest
    if key.startswith("language_model.model."):
        return _TEXT, "model." + key[len("language_model.model."):]
    if key.startswith("language_model.lm_head."):
        return _TEXT, key[len("language_model."):]
    if key.startswith("lm_head."):
        return _TEXT, key
    if key.startswith("vision_tower."):
        rest = key[len("vision_tower."):]
        return _VISION, rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
    if key.startswith("multi_modal_projector."):
        return _PROJECTOR, key[len("multi_modal_projector."):]
    return None


def _weight_files(d: Path) -> dict[str, Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            return {k: d / v for k, v in json.load(f)["weight_map"].items()}
    single = d / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise ValueError(f"{d}: no model.safetensors or model.safetensors.index.json (fastsft reads safetensors only)")


def _read(files: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for fp, ks in by_file.items():
        with safe_open(str(fp), framework="pt", device="cpu") as f:
            for k in ks:
                out[k] = f.get_tensor(k)
    return out


def _read_part(files: dict[str, Path], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """{name within the part: tensor} for ``names`` {name within the part: checkpoint key}."""
    raw = _read(files, list(names.values()))
    return {name: raw[key] for name, key in names.items()}


def _load_part(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, where: Path, dtype, device,
               optional_missing: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module`` by name, with shape checks and one-line errors naming the keys."""
    own = module.state_dict()
    # the tower's own names may carry the vision_model. prefix (transformers 4) or not (5)
    prefix = "vision_model." if what == _VISION and next(iter(own)).startswith("vision_model.") else ""
    state = {prefix + k: v for k, v in state.items()}
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not k.endswith(optional_missing))
    if unexpected or missing:
        raise ValueError(f"{where}: the {what} part does not match its config: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"{where}: {what} tensor {k!r} has shape {tuple(t.shape)}, the config gives "
                             f"{tuple(own[k].shape)}")
    module.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in state.items()},
                           strict=False, assign=True)


def load_llava(path: Union[str, os.PathLike], dtype: torch.dtype = torch.float32,
               device: Union[str, torch.device] = "cpu", *, vision_dtype: Optional[torch.dtype] = None
               ) -> MultimodalCausalLM:
    """A MultimodalCausalLM from a local LlavaForConditionalGeneration directory: transformers' vision tower
    (frozen), the projector, and fastsft's decoder for the language model (in ``dtype``; the tower in
    ``vision_dtype``, default ``dtype``). For QLoRA quantize the decoder afterwards
    (``fastsft.model.nf4.quantize_linears(model.language_model, ...)``)."""
    d = Path(path).expanduser()
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"no config.json in {d}")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "llava":
        raise ValueError(f"{cfg_path}: model_type {cfg.get('model_type')!r} is not 'llava' "
                         "(LlavaForConditionalGeneration)")
    text = dict(cfg.get("text_config") or {})
    text.setdefault("model_type", "llama")  # LlavaConfig's default text model
    # LlavaConfig ties the head when either level says so (its __post_init__)
    tied = bool(cfg.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    text["tie_word_embeddings"] = tied
    text_config = ModelConfig.from_hf_dict(text)
    vision_config = dict(cfg.get("vision_config") or {})
    vision_config.setdefault("model_type", "clip_vision_model")

    files = _weight_files(d)
    parts: dict[str, dict[str, str]] = {_TEXT: {}, _VISION: {}, _PROJECTOR: {}}
    stray = []
    for k in files:
        split = split_llava_key(k)
        if split is None:
            if not k.endswith(("rotary_emb.inv_freq", "image_newline")):
                stray.append(k)
            continue
        parts[split[0]][split[1]] = k
    if stray:
        raise ValueError(f"{d}: checkpoint keys outside the vision tower, projector and language model: {stray[:5]}")
    if tied:
        parts[_TEXT].pop("lm_head.weight", None)

    tower = vision_tower_from_config(vision_config, dtype=vision_dtype or dtype).to(device)
    _load_part(tower, _read_part(files, parts[_VISION]), _VISION, d, vision_dtype or dtype, device)

    with torch.device("meta"):
        lm = CausalLM(text_config)
    lm_state = _read_part(files, parts[_TEXT])
    own = lm.state_dict()
    if tied:
        own.pop("lm_head.weight", None)
    lm_state = {k: v for k, v in lm_state.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = sorted(set(own) - set(lm_state)), sorted(set(lm_state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{d}: the language model does not match its text_config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for k, t in lm_state.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise ValueError(f"{d}: language model tensor {k!r} has shape {tuple(t.shape)}, text_config gives "
                             f"{tuple(own[k].shape)}")
    lm.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v).to(device) for k, v in lm_state.items()},
                       strict=False, assign=True)
    lm.tie_weights()

    layer = cfg.get("vision_feature_layer", -2)
    n_layers = 1 if isinstance(layer, int) else len(layer)
    with torch.device(device):
        projector = Projector(tower.config.hidden_size * n_layers, text_config.hidden_size, kind="mlp2x_gelu",
                              act=cfg.get("projector_hidden_act", "gelu"),
                              bias=bool(cfg.get("multimodal_projector_bias", True))).to(dtype)
    proj_state = _read_part(files, parts[_PROJECTOR])
    _load_part(projector, proj_state, _PROJECTOR, d, dtype, device)

    return MultimodalCausalLM(tower, lm, projector=projector, vision_feature_layer=layer,
                              vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"),
                              image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32000)))


def llava_config_dict(model: MultimodalCausalLM) -> dict:
    """The LlavaConfig dict of ``model`` (config.json of an export)."""
    if model.image_token_id is None:
        raise ValueError("the model has no image_token_id; LLaVA checkpoints need one")
    text = model.language_model.config.to_hf_dict()
    text.pop("architectures", None)
    vision = model.vision_tower.config.to_dict()
    for k in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        vision.pop(k, None)
    proj = model.multi_modal_projector
    dtype = str(model.dtype).replace("torch.", "")
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": int(model.image_token_id),
        "image_seq_length": model.num_image_tokens,
        "projector_hidden_act": proj.act_name if proj.kind == "mlp2x_gelu" else "linear",
        "multimodal_projector_bias": proj.linear_1.bias is not None,
        "vision_feature_layer": model.vision_feature_layer,
        "vision_feature_select_strategy": model.vision_feature_select_strategy,
        "tie_word_embeddings": bool(model.language_model.config.tie_word_embeddings),
        "dtype": dtype,
        "torch_dtype": dtype,
    }


def save_llava(model: MultimodalCausalLM, out_dir: Union[str, os.PathLike], *, image_processor=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the LLaVA Hub layout, loadable by transformers'
    LlavaForConditionalGeneration (and its generate). ``image_processor`` (a transformers image processor)
    is saved beside it as preprocessor_config.json. LoRA layers must be merged first
    (``fastsft.export.merge_lora(model.language_model)``); the adapter alone is saved in PEFT format instead."""
    from fastsft.model.lora import lora_modules

    if lora_modules(model):
        raise ValueError("save_llava: the model has LoRA layers; merge them first "
                         "(fastsft.export.merge_lora(model.language_model)) or save the adapter alone")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    lm = model.language_model
    for k, v in lm.state_dict().items():
        if k == "lm_head.weight":
            if lm.config.tie_word_embeddings:
                continue
            tensors["language_model.lm_head.weight"] = v
        else:
            tensors["language_model." + k] = v  # model.layers... -> language_model.model.layers...
    for k, v in model.vision_tower.state_dict().items():
        if k.endswith("position_ids"):
            continue
        k = k[len("vision_model."):] if k.startswith("vision_model.") else k
        tensors["vision_tower.vision_model." + k] = v
    proj = model.multi_modal_projector
    for k, v in proj.state_dict().items():
        tensors["multi_modal_projector." + k] = v
    if proj.kind == "linear":  # the identity as linear_2 (exact in any float dtype)
        D = proj.linear_1.out_features
        tensors["multi_modal_projector.linear_2.weight"] = torch.eye(D, dtype=proj.linear_1.weight.dtype)
        if proj.linear_1.bias is not None:
            tensors["multi_modal_projector.linear_2.bias"] = torch.zeros(D, dtype=proj.linear_1.weight.dtype)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(out / "config.json", "w", encoding="utf-8") as f:
        json.dump(llava_config_dict(model), f, indent=2)
        f.write("\n")
    if image_processor is not None:
        image_processor.save_pretrained(str(out))
    return out
