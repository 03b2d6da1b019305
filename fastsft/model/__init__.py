"""fastsft's lean Llama-family decoder: config, model, loading and saving."""

from .config import ARCHITECTURES, PRESETS, SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, ModelConfig
from .llama import CausalLM, build_model
from .loading import load_config, load_model, resolve_model_dir, save_pretrained

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "ModelConfig",
    "CausalLM",
    "build_model",
    "load_config",
    "load_model",
    "resolve_model_dir",
    "save_pretrained",
]
