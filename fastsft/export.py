"""Merge a LoRA adapter into its base model and write a full Hugging Face checkpoint.

``fastsft export --model PATH --adapter DIR --out DIR [--dtype ...]`` is :func:`export_main`.
The result is ``config.json`` + ``model.safetensors`` (via fastsft's ``save_pretrained``) plus the
tokenizer files, loadable with ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
from typing import Sequence

import torch
from torch import nn

from fastsft.model.lora import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LoRALinear,
    load_adapter,
    lora_modules,
    read_adapter_config,
)

__all__ = ["merge_lora", "export_merged", "export_main", "copy_tokenizer_files", "TOKENIZER_FILE_PATTERNS"]

# Files copied next to the merged weights (adapter dir first, else the base model dir).
TOKENIZER_FILE_PATTERNS: tuple[str, ...] = (
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "*.jinja",
    "fastsft_tokenizer.json",
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


class ExportError(ValueError):
    """Bad input to the exporter (missing paths, invalid adapter, ...)."""


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Replace every :class:`LoRALinear` in ``model`` by its merged ``nn.Linear``, in place.

    Returns the merged module names (empty when the model has no LoRA layers)."""
    mods = lora_modules(model)
    names = list(mods)
    # A base weight shared with another module (e.g. lm_head tied to embed_tokens) cannot be merged
    # into a new tensor without breaking the tie (and save_pretrained would drop the tied lm_head).
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name, mod in mods.items():
        w = getattr(mod.base_layer, "weight", None)
        shared = owners.get(id(w), []) if isinstance(w, torch.Tensor) else []
        if len(shared) > 1:
            others = ", ".join(s for s in shared if not s.startswith(name + "."))
            raise ValueError(
                f"cannot merge LoRA into {name}: its weight is shared with {others} (tied embeddings); "
                "merging would untie them"
            )
    for name in names:
        mod = model.get_submodule(name)
        assert isinstance(mod, LoRALinear)
        merged = mod.merged()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, merged)
    return names


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and dtype not in DTYPES.values():
            raise ExportError(f"unsupported dtype {dtype}; choose from {', '.join(DTYPES)}")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[key]


def _checkpoint_dtype(model_path: str) -> torch.dtype | None:
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    name = cfg.get("torch_dtype") or cfg.get("dtype")
    if isinstance(name, str):
        return DTYPES.get(name.lower().removeprefix("torch."))
    return None


def _matching_files(directory: str) -> list[str]:
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return []
    return [
        e
        for e in entries
        if os.path.isfile(os.path.join(directory, e)) and any(fnmatch.fnmatch(e, p) for p in TOKENIZER_FILE_PATTERNS)
    ]


def copy_tokenizer_files(sources: Sequence[str], out_dir: str) -> list[str]:
    """Copy the tokenizer files of the first directory in ``sources`` that has any into ``out_dir``.

    The set is taken from a single directory, so pieces of two tokenizers are never mixed.
    Returns the copied file names."""
    for src in sources:
        files = _matching_files(src)
        if files:
            for f in files:
                shutil.copyfile(os.path.join(src, f), os.path.join(out_dir, f))
            return files
    return []


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters (what byte-level BPE uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_byte_tokenizer(out_dir: str) -> None:
    """fastsft's byte tokenizer as files transformers loads (``tokenizer.json`` + config): byte-level BPE
    with no merges over the 256 bytes (id = byte value), then its special tokens at their ids, and a
    ChatML chat template (the rendering fastsft trains byte-tokenizer conversations with)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fastsft.data.tokenizer import ByteTokenizer

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = sorted(ByteTokenizer.SPECIALS.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False) for text, _ in specials])
    for text, i in specials:
        assert tok.token_to_id(text) == i, (text, i)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(out_dir)


def _validate_paths(model_path: str, adapter_dir: str, out_dir: str) -> None:
    if os.path.isfile(model_path) and model_path.lower().endswith(".gguf"):
        pass  # a GGUF base (fastsft/model/loading.py dequantises it)
    elif not os.path.isdir(model_path):
        raise ExportError(f"model directory not found: {model_path}")
    elif not os.path.isfile(os.path.join(model_path, "config.json")):
        if os.path.isfile(os.path.join(model_path, "base_model", "config.json")):  # a run directory
            raise ExportError(f"no config.json in model directory {model_path}; it is a fastsft run directory: its "
                              f"base model is {os.path.join(model_path, 'base_model')} and its adapter "
                              f"{os.path.join(model_path, 'adapter')}")
        raise ExportError(f"no config.json in model directory {model_path}")
    if not os.path.isdir(adapter_dir):
        raise ExportError(f"adapter directory not found: {adapter_dir}")
    if not os.path.isfile(os.path.join(adapter_dir, ADAPTER_CONFIG_NAME)) \
            and os.path.isfile(os.path.join(adapter_dir, "adapter", ADAPTER_CONFIG_NAME)):  # a run directory
        raise ExportError(f"no {ADAPTER_CONFIG_NAME} in adapter directory {adapter_dir}; it is a fastsft run "
                          f"directory: its adapter is {os.path.join(adapter_dir, 'adapter')}")
    for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(adapter_dir, name)):
            raise ExportError(f"no {name} in adapter directory {adapter_dir}")
    out_real = os.path.realpath(out_dir)
    for other, what in ((model_path, "model"), (adapter_dir, "adapter")):
        if out_real == os.path.realpath(other):
            raise ExportError(f"--out must differ from the {what} directory ({other})")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"output path exists and is not a directory: {out_dir}")


def export_merged(
    model_path: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    *,
    device: str | torch.device = "cpu",
) -> str:
    """Load the base model at ``model_path``, apply + merge the adapter in ``adapter_dir`` and write a
    full checkpoint (``config.json`` + ``model.safetensors`` + tokenizer files) to ``out_dir``.

    ``dtype`` (``float32``/``bfloat16``/``float16``): dtype of the written weights; default the base
    checkpoint's dtype (float32 if unknown). Each merge is summed in float32. Returns ``out_dir``.
    Raises :class:`ExportError` (a ``ValueError``) on bad input."""
    from fastsft.model.loading import load_model, save_pretrained

    model_path, adapter_dir, out_dir = os.fspath(model_path), os.fspath(adapter_dir), os.fspath(out_dir)
    out_dtype = _parse_dtype(dtype)
    _validate_paths(model_path, adapter_dir, out_dir)
    try:
        read_adapter_config(adapter_dir)  # fail before loading the (large) base model
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(str(e)) from None

    ckpt_dtype = _checkpoint_dtype(model_path) or torch.float32
    out_dtype = out_dtype or ckpt_dtype
    # Load at the precision of the checkpoint (no loss); LoRALinear.merged() sums in float32.
    try:
        model = load_model(model_path, dtype=ckpt_dtype, device=device)
    except ValueError as e:  # unsupported architecture, missing/pickle-only weights, ...
        raise ExportError(f"cannot load base model from {model_path}: {e}") from None
    try:
        load_adapter(model, adapter_dir)
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(str(e)) from None
    merge_lora(model)
    if ckpt_dtype != out_dtype:
        model.to(out_dtype)
    os.makedirs(out_dir, exist_ok=True)
    save_pretrained(model, out_dir)
    copied = copy_tokenizer_files([adapter_dir, model_path], out_dir)
    if copied == ["fastsft_tokenizer.json"]:  # fastsft's byte tokenizer, nothing transformers reads
        write_byte_tokenizer(out_dir)  # so transformers' AutoTokenizer loads the merged model's tokenizer
    gen_cfg = os.path.join(model_path, "generation_config.json")
    if os.path.isfile(gen_cfg) and not os.path.exists(os.path.join(out_dir, "generation_config.json")):
        shutil.copyfile(gen_cfg, os.path.join(out_dir, "generation_config.json"))
    return out_dir


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise _ArgError(message)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastsft export",
        description="Merge a LoRA adapter into its base model and write a full safetensors checkpoint.",
    )
    p.add_argument("--model", required=True, metavar="PATH", help="base model directory (config.json + safetensors)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="PEFT-format LoRA adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the merged checkpoint")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="dtype of the written weights (default: base checkpoint's)"
    )
    return p


def export_main(argv: Sequence[str] | None = None) -> int:
    """``fastsft export``: returns 0 on success, 2 on bad input (one-line error on stderr), 1 on failure."""
    parser = _build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except _ArgError as e:
        print(f"fastsft export: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        out = export_merged(args.model, args.adapter, args.out, dtype=args.dtype)
    except ExportError as e:
        print(f"fastsft export: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the CLI reports, never tracebacks
        print(f"fastsft export: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"fastsft export: wrote merged model to {out}")
    return 0
