"""Load Hugging Face Llama-family checkpoints (safetensors only) into fastsft's
CausalLM, and save CausalLM back in a layout transformers loads."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .llama import CausalLM

__all__ = ["load_model", "load_config", "resolve_model_dir", "save_pretrained"]

# Checkpoint keys that carry no learnable state for us and are silently skipped.
_IGNORED_KEY_PATTERNS = (re.compile(r"(^|\.)rotary_emb\.(inv_freq|original_inv_freq)$"),)

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]


def resolve_model_dir(path_or_id: Union[str, os.PathLike]) -> Path:
    """A local directory as-is; anything else is treated as a Hugging Face Hub repo id."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    repo_id = str(path_or_id)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - any failure becomes one clear line
        msg = " ".join(f"{type(e).__name__}: {e}".split())
        raise ValueError(
            f"model {repo_id!r} is not a local directory and could not be downloaded: {msg}"
        ) from None


def load_config(path_or_id: Union[str, os.PathLike]) -> ModelConfig:
    d = resolve_model_dir(path_or_id)
    cfg = d / "config.json"
    if not cfg.is_file():
        raise ValueError(f"no config.json in {d}")
    return ModelConfig.from_json(cfg)


def _weight_files(d: Path) -> dict[str, Path]:
    """Map every checkpoint tensor name to the safetensors file holding it."""
    index = d / "model.safetensors.index.json"
    single = d / "model.safetensors"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        out = {}
        for key, fname in weight_map.items():
            fp = d / fname
            if not fp.is_file():
                raise ValueError(f"{index} lists shard {fname!r} (for {key!r}) but {fp} does not exist")
            out[key] = fp
        return out
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    if any((d / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ValueError(
            f"{d} only has PyTorch pickle weights (pytorch_model.bin); fastsft never loads pickles. "
            "Convert the checkpoint to safetensors first, e.g. "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )
    raise ValueError(
        f"{d} has a config.json but no weights (model.safetensors or model.safetensors.index.json); "
        "use fastsft.model.build_model(config) for a randomly initialised model"
    )


def _ignored(key: str) -> bool:
    return any(p.search(key) for p in _IGNORED_KEY_PATTERNS)


def load_model(
    path_or_id: Union[str, os.PathLike],
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> CausalLM:
    """Load a HF model directory (or hub id) with config.json + safetensors weights.

    The model is built on the meta device and each tensor is read straight from its
    safetensors file and converted to `dtype` on `device`, so no second full copy of
    the weights is ever held."""
    d = resolve_model_dir(path_or_id)
    if not (d / "config.json").is_file():
        raise ValueError(f"no config.json in {d}")
    config = ModelConfig.from_json(d / "config.json")
    files = _weight_files(d)

    with torch.device("meta"):
        model = CausalLM(config)
    expected = model.state_dict()  # meta tensors: names and shapes only
    tied = config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)

    unexpected = [k for k in files if k not in expected and not _ignored(k) and not (tied and k == "lm_head.weight")]
    if unexpected:
        some = ", ".join(repr(k) for k in sorted(unexpected)[:5])
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(
            f"checkpoint in {d} has keys the {config.model_type} architecture from config.json does not "
            f"use: {some}{more}"
        )
    where = ", ".join(sorted({str(p) for p in files.values()})) or str(d)
    for k in expected:
        if k not in files:
            raise ValueError(f"missing required key {k!r} in checkpoint {where}")

    # Group keys by file so every shard is opened once.
    by_file: dict[Path, list[str]] = {}
    for k in expected:
        by_file.setdefault(files[k], []).append(k)
    state: dict[str, torch.Tensor] = {}
    for fp, keys in by_file.items():
        with safe_open(str(fp), framework="pt", device="cpu") as f:
            for k in keys:
                t = f.get_tensor(k)
                want = tuple(expected[k].shape)
                if tuple(t.shape) != want:
                    raise ValueError(
                        f"shape mismatch for {k!r} in {fp}: checkpoint {tuple(t.shape)}, model expects {want}"
                    )
                if t.is_floating_point():
                    t = t.to(dtype=dtype)
                state[k] = t.to(device=device)
                del t

    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    for name, p in model.named_parameters():
        if p.is_meta:  # cannot happen after the key checks above; defensive
            raise ValueError(f"parameter {name!r} was not loaded from {where}")
        p.requires_grad_(True)
    return model


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.I)
    if not m:
        raise ValueError(f"cannot parse shard size {size!r} (examples: 5GB, 500MB, 100000)")
    num = float(m.group(1))
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(num * mult)


def save_pretrained(
    model: CausalLM,
    out_dir: Union[str, os.PathLike],
    max_shard_size: Optional[Union[int, str]] = None,
) -> Path:
    """Write config.json + model.safetensors (or shards + index) loadable by transformers'
    AutoModelForCausalLM.from_pretrained. A tied lm_head is written once, as embed_tokens."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    dtype = model.dtype
    dtype_name = str(dtype).replace("torch.", "")
    config.replace(torch_dtype=dtype_name).save_json(out / "config.json")

    sd = model.state_dict()
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    meta = {"format": "pt"}

    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        (out / stale).unlink(missing_ok=True)
    if limit is None or total <= limit:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return out

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    with open(out / "model.safetensors.index.json", "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return out
