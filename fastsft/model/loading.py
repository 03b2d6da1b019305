"""Load Hugging Face Llama-family checkpoints (safetensors only, or a llama.cpp GGUF file) into
fastsft's CausalLM, and save CausalLM back in a layout transformers loads."""

from __future__ import annotations

import functools
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

__all__ = ["load_model", "load_config", "load_gguf_config", "is_gguf_path", "resolve_model_dir", "save_pretrained"]

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
    if is_gguf_path(path_or_id):
        return load_gguf_config(path_or_id)
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
      kept, so the full-precision model never exists on the device.

    A ``.gguf`` file (llama.cpp, Ollama, Unsloth exports) is dequantised tensor by tensor to `dtype`
    (see ``_load_gguf_model``); its tokenizer and chat template load with ``load_tokenizer(path)``."""
    if is_gguf_path(path_or_id):
        return _load_gguf_model(Path(path_or_id).expanduser(), dtype, device, load_in_4bit=load_in_4bit,
                                target_modules=target_modules)
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
        _set_submodule(model, name, _load_nf4_layer(modules[name], name, files, dtype, device, prequantized))
    return _finish_loading(model, state, where)


def _set_submodule(model: CausalLM, name: str, layer: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def _finish_loading(model: CausalLM, state: dict, where) -> CausalLM:
    """Assign the loaded tensors to the meta-built model, tie the head, and check nothing stayed on meta."""
    model.load_state_dict(state, strict=False, assign=True)
    state.clear()
    model.tie_weights()
    for name, p in model.named_parameters():
        if p.is_meta:  # cannot happen after the key checks of the callers; defensive
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


# ------------------------------------------------------------------------------------------------
# GGUF files: the architecture and config through transformers' GGUF reader, the tensors dequantised
# by the gguf package one at a time (never the whole file in float32 at once)

# general.architecture values fastsft loads (those transformers' GGUF reader reads too: not Gemma 1's
# "gemma"); llama.cpp writes Mistral models as "llama", and Gemma 3's text model, from any Gemma 3
# checkpoint, as "gemma3".
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
_GGUF_GEMMA = ("gemma2", "gemma3")
_GGUF_INSTALL = "pip install 'fastsft[gguf]' (the gguf package)"
# {arch}.<key> metadata that fastsft reads for some architectures (the value goes into the config) ...
_GGUF_READ_KEYS = {
    "attention.sliding_window": ("gemma2", "gemma3", "phi3"),
    "attn_logit_softcapping": ("gemma2",),
    "final_logit_softcapping": ("gemma2", "gemma3"),
}
# ... and metadata that changes the math and that fastsft does not implement: refused, never ignored.
_GGUF_REFUSED_KEYS = {
    "attention.sliding_window": "sliding-window attention",
    "attention.scale": "a custom attention scale",
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
    "logit_scale": "a logit scale",
    "embedding_scale": "an embedding scale",
    "residual_scale": "a residual scale",
}
# Llama 3.x RoPE scaling as llama.cpp's converter writes it into rope_freqs.weight (the factor is read
# off the tensor; these three are the same in every Llama 3.1/3.2/3.3 release).
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# RoPE tensors read into the config, not the state dict.
_GGUF_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def is_gguf_path(path_or_id) -> bool:
    """A path ending in .gguf (any case) that is not a directory."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        return False
    p = Path(path_or_id).expanduser()
    return p.name.lower().endswith(".gguf") and not p.is_dir()


def _gguf_reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ValueError(f"{path}: loading a GGUF file needs the gguf package: {_GGUF_INSTALL}") from None
    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - bad magic, truncated file, ...: one line
        raise ValueError(f"{path} is not a readable GGUF file: {' '.join(str(e).split()) or type(e).__name__}") \
            from None


def _gguf_value(reader, key: str):
    """A scalar or string metadata value, None when absent (arrays are not needed here)."""
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None or not f.data or f.types[0] == GGUFValueType.ARRAY:
        return None
    part = f.parts[f.data[0]]
    if f.types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part.tolist()[0]


def _gguf_dequantizable(reader, path: Path) -> None:
    """Refuse, before anything is dequantised, tensor types the gguf package cannot unpack."""
    import gguf.quants
    from gguf import GGMLQuantizationType as Q

    traits = getattr(gguf.quants, "_type_traits", None)
    if traits is None:  # an older gguf: dequantize() itself says so below
        return
    ok = {Q.F32, Q.F16} | set(traits)
    bad = {}
    for t in reader.tensors:
        if t.tensor_type not in ok:
            bad.setdefault(t.tensor_type.name, t.name)
    if bad:
        found = ", ".join(f"{q} (e.g. {name})" for q, name in sorted(bad.items()))
        raise ValueError(f"{path}: GGUF tensor type {found} cannot be dequantised by the installed gguf package; "
                         f"supported: {', '.join(sorted(q.name for q in ok))}")


def _gguf_rope_scaling(reader, arch: str, head_dim: int, rope_theta: float, path: Path) -> Optional[dict]:
    """The RoPE scaling a GGUF file carries, as a config rope_scaling dict (None: plain RoPE).

    llama.cpp stores Llama 3.x scaling not as metadata but as per-frequency divisors in the
    ``rope_freqs.weight`` tensor (transformers' reader ignores it): they are matched against the
    llama3 rule and kept as that rope type, or refused."""
    import numpy as np

    kind = _gguf_value(reader, f"{arch}.rope.scaling.type")
    scaling = None
    factors = {t.name: t for t in reader.tensors if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")}
    if factors:
        return _gguf_longrope(reader, arch, head_dim, factors, path)
    if kind not in (None, "none"):
        if kind not in ("linear", "yarn"):
            raise ValueError(f"{path}: unsupported rope scaling type {kind!r} in the GGUF metadata; fastsft loads "
                             "GGUF files with default, linear, yarn, llama3 (rope_freqs) or longrope (rope_factors) RoPE")
        factor = _gguf_value(reader, f"{arch}.rope.scaling.factor")
        if not isinstance(factor, (int, float)):
            raise ValueError(f"{path}: {kind} rope scaling without {arch}.rope.scaling.factor in the GGUF metadata")
        scaling = {"rope_type": kind, "factor": float(factor)}
        if kind == "yarn":
            scaling.update(_gguf_yarn(reader, arch, path))
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    if not freqs:
        return scaling
    from gguf import dequantize

    got = np.asarray(dequantize(freqs[0].data, freqs[0].tensor_type), dtype=np.float64).reshape(-1)
    if np.all(got == 1.0):
        return scaling
    if scaling is not None or got.size != head_dim // 2:
        raise ValueError(f"{path}: rope_freqs.weight ({got.size} values) does not fit a head_dim of {head_dim}"
                         if scaling is None else f"{path}: both rope scaling metadata and rope_freqs.weight")
    factor = float(got.max())
    low, high, old = (_LLAMA3_ROPE[k] for k in ("low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings"))
    wavelen = 2 * np.pi * rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (old / wavelen - low) / (high - low)
    want = np.where(wavelen < old / high, 1.0,
                    np.where(wavelen > old / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(got, want, rtol=1e-5, atol=0):
        raise ValueError(f"{path}: rope_freqs.weight is not Llama 3 RoPE scaling (low_freq_factor {low}, "
                         f"high_freq_factor {high}, original context {old}); fastsft cannot express it")
    return {"rope_type": "llama3", "factor": factor, **_LLAMA3_ROPE}


def _gguf_yarn(reader, arch: str, path: Path) -> dict:
    """YaRN's parameters as llama.cpp's converter writes them (Qwen2.5/Qwen3 long-context releases): the
    original context, and the beta corrections where given; the attention factor follows from the factor
    as in transformers (0.1 ln(factor) + 1). Keys whose transformers meaning differs are refused."""
    out = {}
    ctx = _gguf_value(reader, f"{arch}.rope.scaling.original_context_length")
    if not isinstance(ctx, int) or ctx <= 0:
        raise ValueError(f"{path}: yarn rope scaling without {arch}.rope.scaling.original_context_length in the "
                         "GGUF metadata")
    out["original_max_position_embeddings"] = ctx
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = _gguf_value(reader, f"{arch}.rope.scaling.{key}")
        if value is not None:
            out[name] = float(value)
    for key in ("yarn_log_multiplier", "yarn_ext_factor", "yarn_attn_factor", "attn_factor"):
        value = _gguf_value(reader, f"{arch}.rope.scaling.{key}")
        if value is not None and not (key == "attn_factor" and value == 1.0):
            raise ValueError(f"{path}: the GGUF metadata sets {arch}.rope.scaling.{key} = {value} for yarn, which "
                             "fastsft does not read from GGUF files; use the model's Hugging Face checkpoint")
    return out


def _gguf_longrope(reader, arch: str, head_dim: int, factors: dict, path: Path) -> dict:
    """Phi-3's longrope as llama.cpp stores it: the per-frequency short/long divisors as the tensors
    rope_factors_short/long.weight, the original context and the attention factor as metadata.
    head_dim here is the rotated width (rope.dimension_count)."""
    import numpy as np
    from gguf import dequantize

    if set(factors) != {"rope_factors_long.weight", "rope_factors_short.weight"}:
        raise ValueError(f"{path}: longrope needs both rope_factors_long.weight and rope_factors_short.weight")
    lists = {}
    for name, t in factors.items():
        values = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        if values.size != head_dim // 2:
            raise ValueError(f"{path}: {name} has {values.size} values; the rotary width {head_dim} needs "
                             f"{head_dim // 2}")
        lists[name.split("_")[2].split(".")[0]] = [float(v) for v in values]
    ctx = _gguf_value(reader, f"{arch}.rope.scaling.original_context_length")
    if not isinstance(ctx, int) or ctx <= 0:
        raise ValueError(f"{path}: longrope (rope_factors tensors) without "
                         f"{arch}.rope.scaling.original_context_length in the GGUF metadata")
    out = {"rope_type": "longrope", "short_factor": lists["short"], "long_factor": lists["long"],
           "original_max_position_embeddings": ctx}
    attn = _gguf_value(reader, f"{arch}.rope.scaling.attn_factor")
    if attn is not None:
        out["attention_factor"] = float(attn)
    return out


def _gguf_gemma_fields(reader, arch: str, hf: dict) -> None:
    """What llama.cpp's Gemma graphs use and transformers' GGUF reader leaves at its config defaults: the
    soft-caps from the metadata (absent: none), the attention scale by llama.cpp's rule (1/sqrt(head_dim),
    or 1/sqrt(hidden / heads) for the 27B models: 46 layers in Gemma 2, 62 in Gemma 3), and Gemma 3's
    local RoPE base (rope.freq_base_swa, else llama.cpp's 10000)."""
    big = {"gemma2": 46, "gemma3": 62}[arch] == hf["num_hidden_layers"]
    hf["query_pre_attn_scalar"] = hf["hidden_size"] // hf["num_attention_heads"] if big else hf["head_dim"]
    hf["final_logit_softcapping"] = _gguf_value(reader, f"{arch}.final_logit_softcapping")
    hf["sliding_window"] = _gguf_value(reader, f"{arch}.attention.sliding_window")
    hf.pop("layer_types", None)  # llama.cpp's patterns are transformers' defaults: every 2nd (6th) layer global
    if arch == "gemma2":
        hf["attn_logit_softcapping"] = _gguf_value(reader, f"{arch}.attn_logit_softcapping")
    else:
        hf["rope_local_base_freq"] = float(_gguf_value(reader, f"{arch}.rope.freq_base_swa") or 10000.0)
        hf["sliding_window_pattern"] = 6
        global_rope = dict((hf.get("rope_parameters") or {}).get("full_attention") or {})
        hf["rope_theta"] = global_rope.get("rope_theta", hf.get("rope_theta", 1e6))
        hf["rope_parameters"] = None  # rebuilt from rope_theta / rope_local_base_freq / rope_scaling below


@functools.lru_cache(maxsize=1)
def _read_gguf(path: str, mtime_ns: int, size: int):
    """(GGUFReader, ModelConfig) of one file, parsed once per process (preflight, then load_model); the
    reader memory-maps the file, so holding it costs address space, not memory."""
    p = Path(path)
    reader = _gguf_reader(p)
    arch = _gguf_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{p}: GGUF architecture {arch!r} is not supported; fastsft loads GGUF files of: "
                         f"{', '.join(GGUF_ARCHITECTURES)} (Mistral GGUFs are llama)")
    for key, what in _GGUF_REFUSED_KEYS.items():
        if f"{arch}.{key}" in reader.fields and arch not in _GGUF_READ_KEYS.get(key, ()):
            raise ValueError(f"{p}: the GGUF metadata sets {arch}.{key} ({what}), which fastsft does not read from "
                             "GGUF files; use the model's Hugging Face checkpoint")
    if (_gguf_value(reader, f"{arch}.expert_count") or 0) > 0:
        raise ValueError(f"{p}: mixture-of-experts GGUF files are not supported by fastsft")
    _gguf_dequantizable(reader, p)
    try:
        from transformers import AutoConfig
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        parsed = dict(load_gguf_checkpoint(str(p), return_tensors=False)["config"])
        model_type = parsed.pop("model_type")
        # through the transformers config class: its defaults are what transformers' GGUF model uses
        hf = AutoConfig.for_model(model_type, **parsed).to_dict()
    except ImportError as e:
        raise ValueError(f"{p}: loading a GGUF file needs the gguf package: {_GGUF_INSTALL} ({e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: transformers cannot read this GGUF file: {' '.join(str(e).split())}") from None
    # llama.cpp's own rule: head width from attention.key_length, else hidden / heads (transformers keeps its
    # config class's default, which for Qwen3 is 128 whatever the file says)
    key_len, value_len = (_gguf_value(reader, f"{arch}.attention.{k}") for k in ("key_length", "value_length"))
    if key_len is not None and value_len is not None and key_len != value_len:
        raise ValueError(f"{p}: attention key_length {key_len} != value_length {value_len} is not supported")
    hf["head_dim"] = int(key_len or hf["hidden_size"] // hf["num_attention_heads"])
    rot = _gguf_value(reader, f"{arch}.rope.dimension_count") or hf["head_dim"]
    if rot != hf["head_dim"]:
        if arch != "phi3":
            raise ValueError(f"{p}: partial RoPE ({rot} of {hf['head_dim']} dimensions) is not supported by fastsft "
                             f"for {arch}")
        hf["partial_rotary_factor"] = rot / hf["head_dim"]  # Phi-4-mini: 96 of 128
    if arch in _GGUF_GEMMA:
        _gguf_gemma_fields(reader, arch, hf)
    if arch == "phi3":
        hf["sliding_window"] = _gguf_value(reader, f"{arch}.attention.sliding_window")
        hf.pop("rope_scaling", None)
        hf["original_max_position_embeddings"] = None  # the rope_factors' own (metadata), if any
    rope_params = hf.get("rope_parameters") or {}
    rope_theta = rope_params.get("rope_theta") or hf.get("rope_theta") or 10000.0
    scaling = _gguf_rope_scaling(reader, arch, rot, float(rope_theta), p)
    if scaling is not None:  # in both layouts (transformers 4's rope_scaling, 5's rope_parameters), base included
        hf["rope_theta"] = rope_theta
        hf["rope_scaling"] = hf["rope_parameters"] = {"rope_theta": rope_theta, **scaling}
    elif arch in ("gemma3", "phi3"):
        hf["rope_scaling"] = None
        hf["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    if "partial_rotary_factor" in hf and isinstance(hf.get("rope_parameters"), dict):
        hf["rope_parameters"]["partial_rotary_factor"] = hf["partial_rotary_factor"]
    try:
        config = ModelConfig.from_hf_dict(hf)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: {' '.join(str(e).split())}") from None
    return reader, config


def _gguf(path_or_id) -> tuple:
    p = Path(path_or_id).expanduser()
    if not p.is_file():
        raise ValueError(f"GGUF file {p} does not exist")
    st = p.stat()
    reader, config = _read_gguf(str(p.resolve()), st.st_mtime_ns, st.st_size)
    return reader, config.replace()  # a copy: callers may change theirs


def load_gguf_config(path: Union[str, os.PathLike]) -> ModelConfig:
    """The ModelConfig of a GGUF file; a one-line ValueError for what fastsft cannot load (architecture,
    tensor types, RoPE variants, the gguf package missing)."""
    return _gguf(path)[1]


def _gguf_tensor_names(model: CausalLM, arch: str) -> dict[str, str]:
    """GGUF tensor name -> fastsft state-dict key (fastsft's keys are transformers' keys)."""
    import gguf

    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    out = {}
    for key in model.state_dict():
        module, _, suffix = key.rpartition(".")
        g = names.get_name(module)
        if g is not None:
            out[f"{g}.{suffix}"] = key
    return out


def _unpermute_qk(w, n_head: int):
    """Undo llama.cpp's convert_hf_to_gguf.py permute of q/k rows (its rotary pairs are interleaved; HF's
    are split in halves). Only the "llama" architecture is permuted; qwen2/qwen3 are written as they are."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _load_gguf_model(path: Path, dtype: torch.dtype, device, *, load_in_4bit: bool, target_modules) -> CausalLM:
    """A GGUF file as a CausalLM in `dtype` on `device`: each tensor is dequantised to float32 (the gguf
    package's numpy dequantisers, which transformers' GGUF loading uses too), converted and moved on its
    own. ``load_in_4bit`` quantizes the target linears to NF4 as they arrive."""
    import numpy as np

    from .nf4 import NF4Linear, quantize_weight

    reader, config = _gguf(path)  # first: a missing gguf package is its one-line error
    from gguf import dequantize

    arch = _gguf_value(reader, "general.architecture")
    with torch.device("meta"):
        model = CausalLM(config)
    quantized = target_linear_names(model, target_modules or ()) if load_in_4bit else []
    qweights = {f"{n}.weight": n for n in quantized}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # meta: names and shapes
    expected = {k: v for k, v in model.state_dict().items() if k not in qweights}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    to_key = _gguf_tensor_names(model, arch)
    unexpected = [t.name for t in reader.tensors if to_key.get(t.name) not in expected and
                  to_key.get(t.name) not in qweights and t.name not in _GGUF_ROPE_TENSORS]  # read with the config
    if unexpected:
        some = ", ".join(repr(k) for k in sorted(unexpected)[:5])
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ValueError(f"{path}: GGUF tensors the {config.model_type} architecture does not use: {some}{more}")
    present = {to_key[t.name] for t in reader.tensors if t.name in to_key}
    missing = [k for k in list(expected) + list(qweights) if k not in present]
    if missing:
        raise ValueError(f"{path}: missing required tensor for {missing[0]!r} in the GGUF file")

    state: dict[str, torch.Tensor] = {}
    packed: dict[str, tuple] = {}
    for t in reader.tensors:
        key = to_key.get(t.name)
        if key is None:
            continue
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path}: tensor {t.name}: {e}; update the gguf package or use another "
                             "quantisation of the model") from None
        if arch in _GGUF_GEMMA and key.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp's converter stores Gemma's (1 + w) norm weights with the 1 added
        if arch == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute_qk(w, config.num_attention_heads)
        elif arch == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute_qk(w, config.num_key_value_heads)
        want = shapes[key]
        if tuple(w.shape) != want:
            raise ValueError(f"shape mismatch for {key!r} ({t.name}) in {path}: GGUF {tuple(w.shape)}, "
                             f"model expects {want}")
        w = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)  # a copy: the reader's arrays are read-only
        if key in qweights:
            packed[qweights[key]] = quantize_weight(w, device)
        else:
            state[key] = w.to(device)
        del w

    modules = dict(model.named_modules())
    for name in quantized:
        bias = state.pop(f"{name}.bias", None)
        layer = NF4Linear.from_quantized_state(*packed.pop(name), bias=bias, compute_dtype=dtype)
        if (layer.out_features, layer.in_features) != tuple(modules[name].weight.shape):
            raise ValueError(f"shape mismatch for {name!r}: the 4-bit weight does not fit the model")
        _set_submodule(model, name, layer.to(device))
    return _finish_loading(model, state, path)


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
