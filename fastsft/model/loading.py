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
from .nf4 import QUANT_STATE_KEY, target_linear_names
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


def _bnb_quantization(d: Path) -> Optional[dict]:
    """The checkpoint's bitsandbytes 4-bit quantization_config, None for a dense checkpoint."""
    with open(d / "config.json", encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise ValueError(f"{d}: quantization method {method!r} is not supported; fastsft loads dense "
                         "(bf16/fp16/fp32) or bitsandbytes NF4 (bnb-4bit) checkpoints")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise ValueError(f"{d}: bitsandbytes 8-bit checkpoints are not supported; use the bf16 checkpoint "
                         "with model.load_in_4bit: true, or a bnb-4bit (NF4) checkpoint")
    if qc.get("bnb_4bit_quant_type", "nf4") != "nf4":
        raise ValueError(f"{d}: bnb 4-bit quant type {qc.get('bnb_4bit_quant_type')!r} is not supported, only nf4")
    if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise ValueError(f"{d}: bnb_4bit_quant_storage {qc['bnb_4bit_quant_storage']!r} is not supported, only uint8")
    return qc


def _quantized_module_names(keys) -> set[str]:
    suffix = ".weight." + QUANT_STATE_KEY
    return {k[: -len(suffix)] for k in keys if k.endswith(suffix)}


def load_model(
    path_or_id: Union[str, os.PathLike],
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    *,
    load_in_4bit: bool = False,
    target_modules=None,
) -> CausalLM:
    """Load a HF model directory (or hub id) with config.json + safetensors weights.

    The model is built on the meta device and each tensor is read straight from its
    safetensors file and converted to `dtype` on `device`, so no second full copy of
    the weights is ever held.

    4-bit (QLoRA) bases, as ``fastsft.model.nf4.NF4Linear`` (bitsandbytes' NF4 format):
    - a pre-quantized ``bnb-4bit`` checkpoint (``quantization_config`` of bitsandbytes, 4-bit nf4)
      loads as it is: every module with a ``weight.quant_state.bitsandbytes__nf4`` entry;
    - ``load_in_4bit=True`` on a dense checkpoint quantizes the linears named in ``target_modules``
      (short names; not the LM head) while loading, one weight at a time: each is read from disk,
      quantized (on `device` when bitsandbytes can, else on the CPU) and only its packed form is
      kept, so the full-precision model never exists on the device."""
    d = resolve_model_dir(path_or_id)
    if not (d / "config.json").is_file():
        raise ValueError(f"no config.json in {d}")
    config = ModelConfig.from_json(d / "config.json")
    quantization = _bnb_quantization(d)
    files = _weight_files(d)

    with torch.device("meta"):
        model = CausalLM(config)
    if quantization is not None:
        quantized = sorted(_quantized_module_names(files))
        if not quantized:
            raise ValueError(f"{d}: config.json says bitsandbytes 4-bit but no weight has an NF4 quant state")
        prequantized = True
    elif load_in_4bit:
        quantized = target_linear_names(model, target_modules or ())
        prequantized = False
    else:
        quantized, prequantized = [], False
    modules = dict(model.named_modules())
    for name in quantized:
        if type(modules.get(name)) is not torch.nn.Linear:
            raise ValueError(f"{d}: quantized weight {name!r} is not a linear layer of the {config.model_type} "
                             "architecture")
    qkeys = {f"{n}.{p}" for n in quantized for p in ("weight", "bias")}

    expected = {k: v for k, v in model.state_dict().items() if k not in qkeys}  # meta: names and shapes
    tied = config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight", None)

    def is_quant_state(k: str) -> bool:
        return any(k.startswith(f"{n}.weight.") for n in quantized) if prequantized else False

    unexpected = [k for k in files if k not in expected and k not in qkeys and not is_quant_state(k)
                  and not _ignored(k) and not (tied and k == "lm_head.weight")]
    if unexpected:
        some = ", ".join(repr(k) for k in sorted(unexpected)[:5])
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(
            f"checkpoint in {d} has keys the {config.model_type} architecture from config.json does not "
            f"use: {some}{more}"
        )
    where = ", ".join(sorted({str(p) for p in files.values()})) or str(d)
    for k in list(expected) + [f"{n}.weight" for n in quantized]:
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

    for name in quantized:
        layer = _load_nf4_layer(modules[name], name, files, dtype, device, prequantized)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)

    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    for name, p in model.named_parameters():
        if p.is_meta:  # cannot happen after the key checks above; defensive
            raise ValueError(f"parameter {name!r} was not loaded from {where}")
        p.requires_grad_(True)
    return model


def _load_nf4_layer(meta_linear: torch.nn.Linear, name: str, files: dict, dtype, device, prequantized: bool):
    """One NF4Linear on `device`: the checkpoint's packed weight and quant state, or the dense
    weight quantized right here (the dense copy is dropped when this returns)."""
    from .nf4 import NF4Linear, quantize_weight

    def read(key):
        with safe_open(str(files[key]), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    bias = read(f"{name}.bias") if f"{name}.bias" in files else None
    if meta_linear.bias is not None and bias is None:
        raise ValueError(f"missing required key {name + '.bias'!r} in checkpoint {files[name + '.weight']}")
    want = tuple(meta_linear.weight.shape)
    if prequantized:
        prefix = f"{name}.weight."
        qs = {k[len(prefix):]: read(k) for k in files if k.startswith(prefix)}
        packed, qs = read(f"{name}.weight").to(device), {k: v.to(device) for k, v in qs.items()}
    else:
        w = read(f"{name}.weight")
        if tuple(w.shape) != want:
            raise ValueError(f"shape mismatch for {name + '.weight'!r} in {files[name + '.weight']}: "
                             f"checkpoint {tuple(w.shape)}, model expects {want}")
        packed, qs = quantize_weight(w.to(dtype), device)
        del w
    try:
        layer = NF4Linear.from_quantized_state(packed, qs, bias=bias, compute_dtype=dtype)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{name}: bad 4-bit weight in {files[name + '.weight']}: {e}") from None
    if (layer.out_features, layer.in_features) != want:
        raise ValueError(f"shape mismatch for {name!r}: the 4-bit weight is {(layer.out_features, layer.in_features)}, "
                         f"the model expects {want}")
    return layer.to(device)


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


def _umask_modes(out: Path) -> None:
    """safetensors creates its files 0600; give them the mode the umask allows (0644 by default), as every
    other file, so a serving process of another user can read them."""
    from fastsft.train.files import process_umask

    for f in out.glob("*.safetensors"):
        os.chmod(f, 0o666 & ~process_umask())


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
        _umask_modes(out)
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
    _umask_modes(out)
    return out
