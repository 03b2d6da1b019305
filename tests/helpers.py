"""Helpers shared by tests (tests/ is on pytest's pythonpath: `from helpers import ...`)."""

import torch


def save_tiny_hf_llama(path, *, vocab_size: int, tie: bool = False, seed: int = 0):
    """A tiny random transformers LlamaForCausalLM saved (float32 safetensors) at ``path``."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    transformers.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    return path


def write_jsonl(path, records, encoding="utf-8"):
    """``records`` as JSONL at ``path`` (non-ASCII kept as is, in ``encoding``); returns the path."""
    import json

    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode(encoding))
    return path


def stored(spec, **kw):
    """The byte-tokenizer token store of one dataset in record order (no split, no shuffle), and its report."""
    from fastsft.data import ByteTokenizer, DatasetSpec
    from fastsft.data.pipeline import load_dataset

    store, report = load_dataset(DatasetSpec.coerce(spec), ByteTokenizer(), max_seq_len=512, **kw)
    return [list(store[i][0]) for i in range(len(store))], report


def data_error(spec, **kw) -> str:
    """The one-line DataError that building ``spec`` (byte tokenizer) raises."""
    import pytest

    from fastsft.data import ByteTokenizer, DataError, build_dataset

    with pytest.raises(DataError) as e:
        build_dataset([spec], ByteTokenizer(), max_seq_len=512, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
