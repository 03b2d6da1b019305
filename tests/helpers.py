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


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
